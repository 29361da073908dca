//! Keys and values of past positions, for decoding one or a few tokens at a time.

use ndarray::{s, Array2, Array4, ArrayRef4, ArrayView4, Axis};

use crate::core::mask::Mask;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::sdpa::ScaledDotProduct;

/// A key/value cache for incremental decoding, per batch and key/value head
/// (grouped-query aware: it holds `kv_heads`, queries may have a multiple).
///
/// [`KvCache::new`] keeps every position, growing its storage by doubling
/// (appending is amortised O(1) per token: nothing is copied per step).
/// [`KvCache::sliding`] keeps the last `window` positions in a ring (a step
/// overwrites the oldest slot), for sliding-window attention.
///
/// [`attend`](Self::attend) appends new keys and values and lets the new queries
/// attend to every cached position with bottom-right causal alignment (query `i` of
/// `T` new ones sits at position `len + i`), through the fused kernel.
///
/// # Shapes
///
/// Keys `(batch, kv_heads, positions, d_k)`, values `(batch, kv_heads, positions, d_v)`.
///
/// # Examples
///
/// ```
/// use attn::KvCache;
/// use ndarray::Array4;
///
/// let mut cache = KvCache::<f32>::new(1, 2, 8, 8);
/// let prompt = Array4::<f32>::ones((1, 2, 5, 8));
/// let out = cache.attend(&Array4::ones((1, 4, 5, 8)), &prompt, &prompt)?; // 4 query heads share 2
/// assert_eq!((out.dim(), cache.len()), ((1, 4, 5, 8), 5));
/// let step = Array4::<f32>::ones((1, 2, 1, 8));
/// cache.attend(&Array4::ones((1, 4, 1, 8)), &step, &step)?;
/// assert_eq!(cache.len(), 6);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache<A> {
    keys: Array4<A>,
    values: Array4<A>,
    /// Positions held (at most the window for a sliding cache).
    len: usize,
    /// Positions appended in all.
    seen: usize,
    window: Option<usize>,
}

impl<A: Element> KvCache<A> {
    /// An empty cache that keeps every position.
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::KvCache::<f64>::new(2, 4, 16, 16);
    /// assert!(cache.is_empty());
    /// ```
    pub fn new(batch: usize, kv_heads: usize, d_k: usize, d_v: usize) -> Self {
        KvCache {
            keys: Array4::zeros((batch, kv_heads, 0, d_k)),
            values: Array4::zeros((batch, kv_heads, 0, d_v)),
            len: 0,
            seen: 0,
            window: None,
        }
    }

    /// An empty cache that keeps the last `window` positions: each query attends to
    /// itself and the `window − 1` positions before it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `window` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::KvCache::<f32>::sliding(1, 1, 4, 4, 128)?;
    /// assert_eq!(cache.window(), Some(128));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn sliding(
        batch: usize,
        kv_heads: usize,
        d_k: usize,
        d_v: usize,
        window: usize,
    ) -> Result<Self> {
        if window == 0 {
            return Err(Error::InvalidConfig {
                reason: "a sliding cache needs a window of at least 1".to_string(),
            });
        }
        Ok(KvCache {
            keys: Array4::zeros((batch, kv_heads, window, d_k)),
            values: Array4::zeros((batch, kv_heads, window, d_v)),
            window: Some(window),
            ..Self::new(batch, kv_heads, d_k, d_v)
        })
    }

    /// Positions held.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 1, 2, 2).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::KvCache::<f32>::new(1, 1, 2, 2).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions appended since the cache was made (the position of the next token).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 1, 2, 2).positions_seen(), 0);
    /// ```
    pub fn positions_seen(&self) -> usize {
        self.seen
    }

    /// The window of a sliding cache.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 1, 2, 2).window(), None);
    /// ```
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// The cached keys, `(batch, kv_heads, len, d_k)`; in a sliding cache, in ring order.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 2, 3, 4).keys().dim(), (1, 2, 0, 3));
    /// ```
    pub fn keys(&self) -> ArrayView4<'_, A> {
        self.keys.slice(s![.., .., ..self.len, ..])
    }

    /// The cached values, `(batch, kv_heads, len, d_v)`, in the order of [`keys`](Self::keys).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 2, 3, 4).values().dim(), (1, 2, 0, 4));
    /// ```
    pub fn values(&self) -> ArrayView4<'_, A> {
        self.values.slice(s![.., .., ..self.len, ..])
    }

    fn check(&self, k: &ArrayRef4<A>, v: &ArrayRef4<A>) -> Result<()> {
        let (b, h, _, d_k) = self.keys.dim();
        let d_v = self.values.dim().3;
        let (kb, kh, kt, kd) = k.dim();
        let (vb, vh, vt, vd) = v.dim();
        if (kb, kh, kd) != (b, h, d_k) || (vb, vh, vd) != (b, h, d_v) || kt != vt {
            return Err(Error::Shape {
                what: "new keys and values must match the cache (batch, kv_heads, ·, d) and each other's length",
                expected: vec![b, h, kt, d_k, b, h, kt, d_v],
                found: [k.shape(), v.shape()].concat(),
            });
        }
        Ok(())
    }

    /// Appends new keys and values (amortised O(1) per position).
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when they do not match the cache or each other.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut cache = attn::KvCache::<f64>::new(1, 1, 2, 2);
    /// let kv = ndarray::Array4::<f64>::ones((1, 1, 3, 2));
    /// cache.append(&kv, &kv)?;
    /// assert_eq!(cache.len(), 3);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn append(&mut self, k: &ArrayRef4<A>, v: &ArrayRef4<A>) -> Result<()> {
        self.check(k, v)?;
        self.write(k, v);
        Ok(())
    }

    /// [`append`](Self::append) of checked keys and values.
    fn write(&mut self, k: &ArrayRef4<A>, v: &ArrayRef4<A>) {
        let t = k.dim().2;
        match self.window {
            None => {
                if self.len + t > self.keys.dim().2 {
                    let capacity = (2 * self.keys.dim().2).max(self.len + t).max(16);
                    self.keys = grown(&self.keys, self.len, capacity);
                    self.values = grown(&self.values, self.len, capacity);
                }
                self.keys
                    .slice_mut(s![.., .., self.len..self.len + t, ..])
                    .assign(k);
                self.values
                    .slice_mut(s![.., .., self.len..self.len + t, ..])
                    .assign(v);
                self.len += t;
            }
            Some(window) => {
                // only the last `window` new positions can survive
                for i in t.saturating_sub(window)..t {
                    let slot = (self.seen + i) % window;
                    self.keys
                        .slice_mut(s![.., .., slot, ..])
                        .assign(&k.slice(s![.., .., i, ..]));
                    self.values
                        .slice_mut(s![.., .., slot, ..])
                        .assign(&v.slice(s![.., .., i, ..]));
                }
                self.len = (self.len + t).min(window);
            }
        }
        self.seen += t;
    }

    /// Appends `k_new`, `v_new` and returns the new queries' attention over every
    /// cached position: bottom-right causal, within the window of a sliding cache.
    ///
    /// # Shapes
    ///
    /// `q: (batch, heads, T, d_k)` with `kv_heads` dividing `heads`,
    /// `k_new: (batch, kv_heads, T, d_k)`, `v_new: (batch, kv_heads, T, d_v)` →
    /// `(batch, heads, T, d_v)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the new queries, keys or values do not match the cache
    /// (the cache is then left as it was), and the errors of
    /// [`ScaledDotProduct::forward_batched`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array4;
    ///
    /// let mut cache = attn::KvCache::<f32>::sliding(1, 1, 4, 4, 2)?;
    /// for _ in 0..5 {
    ///     let x = Array4::<f32>::ones((1, 1, 1, 4));
    ///     cache.attend(&x, &x, &x)?;
    /// }
    /// assert_eq!((cache.len(), cache.positions_seen()), (2, 5));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attend(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
    ) -> Result<Array4<A>> {
        self.check(k_new, v_new)?;
        let (b, kv_heads, _, d_k) = self.keys.dim();
        let (qb, heads, t, qd) = q.dim();
        // checked before anything is written: a failed call leaves the cache as it was
        if k_new.dim().2 != t || qb != b || heads % kv_heads.max(1) != 0 || qd != d_k {
            return Err(Error::Shape {
                what: "new queries must be (batch, a multiple of kv_heads, as many positions as the new keys, d_k)",
                expected: vec![b, heads.next_multiple_of(kv_heads.max(1)), k_new.dim().2, d_k],
                found: q.shape().to_vec(),
            });
        }
        match self.window {
            // one new position in a ring: after writing it, every held slot is within
            // its window; so are all positions of a cache that keeps everything
            Some(_) if t > 1 => self.attend_chunk_in_window(q, k_new, v_new),
            _ => {
                self.write(k_new, v_new);
                ScaledDotProduct::new()
                    .with_mask(Mask::CausalBottomRight)
                    .forward_batched(q, &self.keys(), &self.values())
            }
        }
    }

    /// Several new positions in a sliding cache: attend over the held slots and the
    /// new positions together (one copy of the window), masked by position, then
    /// keep the newest.
    fn attend_chunk_in_window(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
    ) -> Result<Array4<A>> {
        let window = self.window.unwrap_or(usize::MAX);
        let t = q.dim().2;
        let held = self.len;
        // `check` made the new keys and values match the cache in every other axis
        let keys = ndarray::concatenate(Axis(2), &[self.keys(), k_new.view()])
            .expect("checked: new keys match the cache");
        let values = ndarray::concatenate(Axis(2), &[self.values(), v_new.view()])
            .expect("checked: new values match the cache");
        // the position of every key: held slots by ring arithmetic, then the new ones
        let position = |slot: usize| -> usize {
            if slot >= held {
                self.seen + slot - held
            } else {
                // slot s holds the latest position p < seen with p % window == s
                let newest = self.seen - 1;
                newest - (newest + window - slot) % window
            }
        };
        let keep = Array2::from_shape_fn((t, held + t), |(i, slot)| {
            let (query, key) = (self.seen + i, position(slot));
            key <= query && key + window > query
        });
        let out = ScaledDotProduct::new()
            .with_mask(Mask::keep(&keep))
            .forward_batched(q, &keys, &values)?;
        self.write(k_new, v_new);
        Ok(out)
    }
}

/// `x` with room for `capacity` positions, its first `len` copied.
fn grown<A: Element>(x: &Array4<A>, len: usize, capacity: usize) -> Array4<A> {
    let (b, h, _, d) = x.dim();
    let mut bigger = Array4::zeros((b, h, capacity, d));
    bigger
        .slice_mut(s![.., .., ..len, ..])
        .assign(&x.slice(s![.., .., ..len, ..]));
    bigger
}
