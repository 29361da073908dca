//! Keys and values of past positions, for decoding one or a few tokens at a time.

use ndarray::{s, Array2, Array4, ArrayRef2, ArrayRef4, ArrayView2, ArrayView4, Axis};

use crate::core::mask::{broadcast_all, Mask};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::sdpa::{AttentionOutput, ScaledDotProduct};

/// A key/value cache for incremental decoding, per batch and key/value head
/// (grouped-query aware: it holds `kv_heads`, queries may have a multiple).
///
/// [`KvCache::new`] keeps every position, growing its storage by doubling
/// (appending is amortised O(1) per token: nothing is copied per step).
/// [`KvCache::sliding`] keeps the last `window` positions in a ring (a step
/// overwrites the oldest slot), for sliding-window attention; each slot is
/// written twice, `window` apart, so the held positions are always one
/// contiguous run in position order ([`keys`](Self::keys) is a view, no copy).
///
/// [`attend`](Self::attend) appends new keys and values and lets the new queries
/// attend to every cached position with bottom-right causal alignment (query `i` of
/// `T` new ones sits at position `len + i`), through the fused kernel.
/// [`attend_padded`](Self::attend_padded) also takes which new tokens are padding
/// (a left-padded batch, as generation uses) and further masks, and
/// [`attend_padded_with_weights`](Self::attend_padded_with_weights) returns the
/// step's attention weights. Each batch row counts its own real tokens
/// ([`positions`](Self::positions)): the position of its next token, for rotary
/// embeddings.
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
    /// `(batch, slots)`: whether a slot holds a real token (not padding), per row.
    real: Array2<bool>,
    /// Per batch row: the real tokens appended so far.
    positions: Vec<usize>,
    /// Positions held (at most the window for a sliding cache).
    len: usize,
    /// Positions appended in all.
    seen: usize,
    window: Option<usize>,
}

/// What one step of attention over the cache returns: the output, and the
/// weights when asked for.
type Step<A> = (Array4<A>, Option<Array4<A>>);

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
            real: Array2::from_elem((batch, 0), true),
            positions: vec![0; batch],
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
        // every slot twice, `window` apart: the held run is contiguous
        Ok(KvCache {
            keys: Array4::zeros((batch, kv_heads, 2 * window, d_k)),
            values: Array4::zeros((batch, kv_heads, 2 * window, d_v)),
            real: Array2::from_elem((batch, 2 * window), true),
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

    /// Positions appended since the cache was made, padding included (the same
    /// for every batch row; for each row's own count of real tokens see
    /// [`positions`](Self::positions)).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 1, 2, 2).positions_seen(), 0);
    /// ```
    pub fn positions_seen(&self) -> usize {
        self.seen
    }

    /// Per batch row, the real (not padding) tokens appended so far: the position
    /// of the row's next token.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array4};
    ///
    /// let mut cache = attn::KvCache::<f32>::new(2, 1, 2, 2);
    /// let x = Array4::<f32>::ones((2, 1, 3, 2));
    /// cache.attend_padded(&x, &x, &x, &array![[true, true, true], [false, true, true]], &[])?;
    /// assert_eq!(cache.positions(), &[3, 2]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn positions(&self) -> &[usize] {
        &self.positions
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

    /// Where the held run of slots begins.
    fn start(&self) -> usize {
        match self.window {
            Some(window) => (self.seen - self.len) % window,
            None => 0,
        }
    }

    /// The cached keys, `(batch, kv_heads, len, d_k)`, oldest first (in a sliding
    /// cache too).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 2, 3, 4).keys().dim(), (1, 2, 0, 3));
    /// ```
    pub fn keys(&self) -> ArrayView4<'_, A> {
        let start = self.start();
        self.keys.slice(s![.., .., start..start + self.len, ..])
    }

    /// The cached values, `(batch, kv_heads, len, d_v)`, in the order of [`keys`](Self::keys).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(1, 2, 3, 4).values().dim(), (1, 2, 0, 4));
    /// ```
    pub fn values(&self) -> ArrayView4<'_, A> {
        let start = self.start();
        self.values.slice(s![.., .., start..start + self.len, ..])
    }

    /// Whether each held position is a real token (`true`) or padding, per batch
    /// row: `(batch, len)`, in the order of [`keys`](Self::keys).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f32>::new(3, 1, 2, 2).real().dim(), (3, 0));
    /// ```
    pub fn real(&self) -> ArrayView2<'_, bool> {
        let start = self.start();
        self.real.slice(s![.., start..start + self.len])
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

    /// Appends new keys and values (amortised O(1) per position), all real tokens.
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
        let (b, _, t, _) = k.dim();
        self.write(k, v, Array2::from_elem((b, t), true).view());
        Ok(())
    }

    /// [`append`](Self::append) of checked keys, values and padding flags.
    fn write(&mut self, k: &ArrayRef4<A>, v: &ArrayRef4<A>, real: ArrayView2<'_, bool>) {
        let t = k.dim().2;
        match self.window {
            None => {
                if self.len + t > self.keys.dim().2 {
                    let capacity = (2 * self.keys.dim().2).max(self.len + t).max(16);
                    self.keys = grown(&self.keys, self.len, capacity);
                    self.values = grown(&self.values, self.len, capacity);
                    let mut flags = Array2::from_elem((self.real.nrows(), capacity), true);
                    flags
                        .slice_mut(s![.., ..self.len])
                        .assign(&self.real.slice(s![.., ..self.len]));
                    self.real = flags;
                }
                let new = s![.., .., self.len..self.len + t, ..];
                self.keys.slice_mut(new).assign(k);
                self.values.slice_mut(new).assign(v);
                self.real
                    .slice_mut(s![.., self.len..self.len + t])
                    .assign(&real);
                self.len += t;
            }
            Some(window) => {
                // only the last `window` new positions can survive
                for i in t.saturating_sub(window)..t {
                    let slot = (self.seen + i) % window;
                    for copy in [slot, slot + window] {
                        self.keys
                            .slice_mut(s![.., .., copy, ..])
                            .assign(&k.slice(s![.., .., i, ..]));
                        self.values
                            .slice_mut(s![.., .., copy, ..])
                            .assign(&v.slice(s![.., .., i, ..]));
                        self.real.column_mut(copy).assign(&real.column(i));
                    }
                }
                self.len = (self.len + t).min(window);
            }
        }
        for (count, row) in self.positions.iter_mut().zip(real.rows()) {
            *count += row.iter().filter(|&&r| r).count();
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
        let (b, _, t, _) = q.dim();
        let real = Array2::from_elem((b, t), true);
        Ok(self.step(q, k_new, v_new, &real, &[], false)?.0)
    }

    /// [`attend`](Self::attend) for a batch whose rows have padding: `real[[b, t]]`
    /// says whether new token `t` of row `b` is a real token (Hugging Face's
    /// `attention_mask`, 1 = real). No query attends to a padding key, so a
    /// left-padded row gives the numbers of its sequence alone; a padding query
    /// sees no real key before it and gives output 0. `masks` apply too (ALiBi, a
    /// bias); they broadcast to `(batch, heads, T, S)`, where the `S` keys are the
    /// held positions, oldest first, then the new ones (for a sliding cache and
    /// `T > 1`, the held positions before this step's).
    ///
    /// # Shapes
    ///
    /// As [`attend`](Self::attend), and `real: (batch, T)`.
    ///
    /// # Errors
    ///
    /// As [`attend`](Self::attend), and [`Error::Shape`] when `real` is not
    /// `(batch, T)`; the cache is then left as it was.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::KvCache;
    /// use ndarray::{array, s, Array4};
    ///
    /// // row 1 is row 0's last two tokens, left-padded
    /// let x = Array4::from_shape_fn((1, 1, 3, 2), |(_, _, t, j)| (t * 2 + j) as f64 / 5.0);
    /// let padded = ndarray::concatenate(ndarray::Axis(0), &[x.view(), x.view()])?;
    /// let mut cache = KvCache::<f64>::new(2, 1, 2, 2);
    /// let out = cache.attend_padded(&padded, &padded, &padded, &array![[true; 3], [false, true, true]], &[])?;
    /// let mut alone = KvCache::<f64>::new(1, 1, 2, 2);
    /// let tail = x.slice(s![.., .., 1.., ..]);
    /// let expected = alone.attend(&tail, &tail, &tail)?;
    /// assert!((&out.slice(s![1.., .., 1.., ..]) - &expected).iter().all(|e| e.abs() < 1e-15));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn attend_padded(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
    ) -> Result<Array4<A>> {
        Ok(self.step(q, k_new, v_new, real, masks, false)?.0)
    }

    /// [`attend_padded`](Self::attend_padded), also returning the step's attention
    /// weights over the keys it saw (for pictures of decoding).
    ///
    /// # Shapes
    ///
    /// Output `(batch, heads, T, d_v)`, weights `(batch, heads, T, S)` with `S`
    /// as in [`attend_padded`](Self::attend_padded).
    ///
    /// # Errors
    ///
    /// As [`attend_padded`](Self::attend_padded).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array4};
    ///
    /// let mut cache = attn::KvCache::<f32>::new(1, 1, 2, 2);
    /// let x = Array4::<f32>::ones((1, 1, 4, 2));
    /// let step = cache.attend_padded_with_weights(&x, &x, &x, &array![[true; 4]], &[])?;
    /// assert_eq!(step.weights.dim(), (1, 1, 4, 4));
    /// assert_eq!(step.weights[[0, 0, 3, 0]], 0.25);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attend_padded_with_weights(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
    ) -> Result<AttentionOutput<A, ndarray::Ix4>> {
        let (output, weights) = self.step(q, k_new, v_new, real, masks, true)?;
        Ok(AttentionOutput {
            output,
            weights: weights.expect("asked for the weights"),
        })
    }

    /// One step: checks everything before writing, attends, appends.
    fn step(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<Step<A>> {
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
        if real.dim() != (b, t) {
            return Err(Error::Shape {
                what: "real (which new tokens are not padding) must be (batch, new tokens)",
                expected: vec![b, t],
                found: real.shape().to_vec(),
            });
        }
        if let (Some(window), true) = (self.window, t > 1) {
            return self.chunk_in_window(window, q, k_new, v_new, real, masks, weights);
        }
        // the masks must fit the keys this step will see, before any is written
        let keys_seen = match self.window {
            Some(window) => (self.len + t).min(window),
            None => self.len + t,
        };
        broadcast_all(masks, &[b, heads, t, keys_seen])?;
        // one new position in a ring: after writing it, every held slot is within
        // its window; so are all positions of a cache that keeps everything
        self.write(k_new, v_new, real.view());
        let keep = self
            .real()
            .to_owned()
            .insert_axis(Axis(1))
            .insert_axis(Axis(1));
        let padded = keep.iter().any(|&r| !r);
        let mut attention = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
        if padded {
            attention = attention.with_mask(Mask::keep(&keep));
        }
        for mask in masks {
            attention = attention.with_mask(mask.reborrow());
        }
        run(&attention, q, self.keys(), self.values(), weights)
    }

    /// Several new positions in a sliding cache: attend over the held slots and the
    /// new positions together (one copy of the window), masked by position, then
    /// keep the newest.
    #[allow(clippy::too_many_arguments)]
    fn chunk_in_window(
        &mut self,
        window: usize,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<Step<A>> {
        let (b, _, t, _) = q.dim();
        let held = self.len;
        // `check` made the new keys and values match the cache in every other axis
        let keys = ndarray::concatenate(Axis(2), &[self.keys(), k_new.view()])
            .expect("checked: new keys match the cache");
        let values = ndarray::concatenate(Axis(2), &[self.values(), v_new.view()])
            .expect("checked: new values match the cache");
        let flags = ndarray::concatenate(Axis(1), &[self.real(), real.view()])
            .expect("checked: one flag per row and new token");
        // key j sits at position seen − held + j; new query i at seen + i
        let keep = Array4::from_shape_fn((b, 1, t, held + t), |(row, _, i, j)| {
            let (query, key) = (held + i, j);
            flags[[row, j]] && key <= query && key + window > query
        });
        let mut attention = ScaledDotProduct::new().with_mask(Mask::keep(&keep));
        for mask in masks {
            attention = attention.with_mask(mask.reborrow());
        }
        let out = run(&attention, q, keys.view(), values.view(), weights)?;
        self.write(k_new, v_new, real.view());
        Ok(out)
    }
}

/// The step's attention, with or without its weights.
fn run<A: Element>(
    attention: &ScaledDotProduct<'_, A>,
    q: &ArrayRef4<A>,
    keys: ArrayView4<'_, A>,
    values: ArrayView4<'_, A>,
    weights: bool,
) -> Result<Step<A>> {
    if weights {
        let out = attention.forward_batched_with_weights(q, &keys, &values)?;
        Ok((out.output, Some(out.weights)))
    } else {
        Ok((attention.forward_batched(q, &keys, &values)?, None))
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
