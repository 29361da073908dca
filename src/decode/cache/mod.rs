//! Keys and values of past positions, for decoding one or a few tokens at a time:
//! the storage (here) and attention over it (`attend.rs`).

mod attend;

pub(crate) use attend::{LayerStep, Settings};

use ndarray::{Array2, Array4, ArrayRef4, ArrayView2, ArrayView4, s};

use crate::element::{Element, Storage};
use crate::error::{Error, Result};

/// A key/value cache for incremental decoding, per batch and key/value head
/// (grouped-query aware: it holds `kv_heads`, queries may have a multiple).
///
/// [`KvCache::new`] keeps every position, growing its storage by doubling
/// (appending is amortised O(1) per token: nothing is copied per step).
/// [`KvCache::sliding`] keeps the last `window` positions in a ring (a step
/// overwrites the oldest slot), for sliding-window attention; once positions
/// wrap, each slot is written twice, `window` apart, so the held positions are
/// always one contiguous run in position order ([`keys`](Self::keys) is a view, no
/// copy). Either kind allocates as positions arrive (a ring at most twice its
/// window), never for sizes alone: a cache made from a hostile `config.json`'s
/// window costs nothing until tokens come.
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
    pub(super) keys: Array4<A>,
    pub(super) values: Array4<A>,
    /// `(batch, slots)`: whether a slot holds a real token (not padding), per row.
    pub(super) real: Array2<bool>,
    /// Per batch row: the real tokens appended so far.
    pub(super) positions: Vec<usize>,
    /// Positions held (at most the window for a sliding cache).
    pub(super) len: usize,
    /// Positions appended in all.
    pub(super) seen: usize,
    pub(super) window: Option<usize>,
    /// The scores' scale; `None`: `1/√d_k`.
    pub(super) scale: Option<A>,
    /// Why the sizes given to [`new`](Self::new) cannot make a cache (every call
    /// that writes returns it); nothing is allocated then.
    pub(super) fault: Option<Error>,
}

impl<A: Storage> KvCache<A> {
    /// An empty cache that keeps every position.
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::KvCache::<f64>::new(2, 4, 16, 16);
    /// assert!(cache.is_empty());
    /// ```
    pub fn new(batch: usize, kv_heads: usize, d_k: usize, d_v: usize) -> Self {
        Self::of_sizes([batch, kv_heads, d_k, d_v], None)
    }

    /// An empty cache that keeps the last `window` positions: each query attends to
    /// itself and the `window − 1` positions before it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `window` or a size is 0, or the cache's
    /// `batch · kv_heads · 2·window · d` values cannot be addressed. The memory
    /// is allocated as positions arrive: a call that writes returns
    /// [`Error::Cache`] where the system refuses it.
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::KvCache::<f32>::sliding(1, 1, 4, 4, 128)?;
    /// assert_eq!(cache.window(), Some(128));
    /// assert!(attn::KvCache::<f32>::sliding(1, 1, 4, 4, usize::MAX / 2).is_err());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn sliding(
        batch: usize,
        kv_heads: usize,
        d_k: usize,
        d_v: usize,
        window: usize,
    ) -> Result<Self> {
        let mut cache = Self::of_sizes([batch, kv_heads, d_k, d_v], Some(window));
        match cache.fault.take() {
            Some(fault) => Err(fault),
            None => Ok(cache),
        }
    }

    /// A cache of these sizes, or an empty one holding why they cannot make one.
    pub(crate) fn of_sizes(sizes: [usize; 4], window: Option<usize>) -> Self {
        // every slot twice, `window` apart: the held run is contiguous
        let slots = window.map_or(Some(0), |w| w.checked_mul(2));
        // no slots yet: they are allocated as positions arrive
        let storage = check_sizes::<A>(sizes, window, slots).and_then(|()| {
            Arrays::allocate(sizes, 0)
                .zip(filled(sizes[0], 0))
                .ok_or_else(|| Error::InvalidConfig {
                    reason: format!(
                        "{}: the memory cannot be allocated",
                        constructor(sizes, window)
                    ),
                })
        });
        let ((storage, positions), fault) = match storage {
            Ok(storage) => (storage, None),
            Err(fault) => ((Arrays::empty(), Vec::new()), Some(fault)),
        };
        KvCache {
            keys: storage.keys,
            values: storage.values,
            real: storage.real,
            positions,
            len: 0,
            seen: 0,
            window,
            scale: None,
            fault,
        }
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

    /// Every step multiplies its scores by `scale` instead of `1/√d_k` (T5
    /// attends unscaled: `scale = 1`). A layer's
    /// [`new_cache`](crate::MultiHeadAttention::new_cache) gives its cache the
    /// layer's scale. The scale is checked by each step, before anything is
    /// written: zero, NaN or infinity make it [`Error::InvalidScale`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::array;
    ///
    /// // two keys, unscaled: weights softmax([0, 2]) for the second query
    /// let mut cache = attn::KvCache::<f64>::new(1, 1, 2, 1).with_scale(1.0);
    /// let q = array![[[[1.0, 1.0], [1.0, 1.0]]]];
    /// let k = array![[[[0.0, 0.0], [1.0, 1.0]]]];
    /// let v = array![[[[0.0], [1.0]]]];
    /// let out = cache.attend(&q, &k, &v)?;
    /// let expected = 2f64.exp() / (1.0 + 2f64.exp());
    /// assert!((out[[0, 0, 1, 0]] - expected).abs() < 1e-15);
    ///
    /// let mut zero = attn::KvCache::<f64>::new(1, 1, 2, 1).with_scale(0.0);
    /// assert!(matches!(zero.attend(&q, &k, &v), Err(attn::Error::InvalidScale { .. })));
    /// assert!(zero.is_empty());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_scale(mut self, scale: A) -> Self {
        self.scale = Some(scale);
        self
    }

    /// The factor on the scores of every step: the one given to
    /// [`with_scale`](Self::with_scale), else `1/√d_k`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::KvCache::<f64>::new(1, 1, 4, 4).scale(), 0.5);
    /// assert_eq!(attn::KvCache::<f64>::new(1, 1, 4, 4).with_scale(1.0).scale(), 1.0);
    /// ```
    pub fn scale(&self) -> A {
        let d_k = self.keys.dim().3;
        self.scale
            .unwrap_or_else(|| A::from_compute(A::Compute::from_f64(1.0 / (d_k as f64).sqrt())))
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

    /// Whether the sizes it was made with make a cache.
    pub(crate) fn usable(&self) -> Result<()> {
        self.fault.clone().map_or(Ok(()), Err)
    }

    /// New keys and values fit the cache, and the cache can grow to hold them.
    pub(super) fn check(&self, k: &ArrayRef4<A>, v: &ArrayRef4<A>) -> Result<()> {
        self.usable()?;
        let (b, h, _, d_k) = self.keys.dim();
        let d_v = self.values.dim().3;
        let t = k.dim().2;
        if k.dim() != (b, h, t, d_k) {
            return Err(Error::Shape {
                what: "new keys must be (the cache's batch, kv_heads, T, d_k)",
                expected: vec![b, h, t, d_k],
                found: k.shape().to_vec(),
            });
        }
        if v.dim() != (b, h, t, d_v) {
            return Err(Error::Shape {
                what: "new values must be (the cache's batch, kv_heads, T of the new keys, d_v)",
                expected: vec![b, h, t, d_v],
                found: v.shape().to_vec(),
            });
        }
        if self.window.is_none() {
            // growth doubles the capacity: twice what will be held must fit
            let capacity = self.len.checked_add(t).and_then(|n| n.checked_mul(2));
            check_sizes::<A>([b, h, d_k, d_v], None, capacity)?;
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
        self.write(k, v, Array2::from_elem((b, t), true).view())
    }

    /// [`append`](Self::append) of checked keys, values and padding flags; only
    /// the storage's growth can fail, and then nothing is written.
    pub(super) fn write(
        &mut self,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        real: ArrayView2<'_, bool>,
    ) -> Result<()> {
        let t = k.dim().2;
        self.reserve(t)?;
        match self.window {
            None => {
                let new = s![.., .., self.len..self.len + t, ..];
                self.keys.slice_mut(new).assign(k);
                self.values.slice_mut(new).assign(v);
                self.real
                    .slice_mut(s![.., self.len..self.len + t])
                    .assign(&real);
                self.len += t;
            }
            Some(window) => {
                // only the last `window` new positions can survive; a slot's
                // second copy is read only once positions have wrapped (the held
                // run then ends past `window`, in copies of the newest positions)
                for i in t.saturating_sub(window)..t {
                    let position = self.seen + i;
                    let slot = position % window;
                    let copies = if position < window { 1 } else { 2 };
                    for copy in [slot, slot + window].into_iter().take(copies) {
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
        Ok(())
    }

    /// Slots for `t` more positions: where the storage has too few it grows
    /// (doubling, at least 16 slots, a ring at most `2 · window`), keeping the
    /// held run; where the system refuses the memory, an [`Error::Cache`] and the
    /// cache as it was.
    fn reserve(&mut self, t: usize) -> Result<()> {
        let (batch, kv_heads, capacity, d_k) = self.keys.dim();
        let d_v = self.values.dim().3;
        let needed = match self.window {
            None => self.len.saturating_add(t),
            // both copies of every slot once positions wrap
            Some(window) if self.seen.saturating_add(t) > window => 2 * window,
            Some(_) => self.seen + t,
        };
        if needed <= capacity {
            return Ok(());
        }
        let most = self.window.map_or(usize::MAX, |w| 2 * w);
        let slots = capacity.saturating_mul(2).max(needed).max(16).min(most);
        let sizes = [batch, kv_heads, d_k, d_v];
        let refused = || Error::Cache {
            reason: format!(
                "{}: the memory for {slots} positions cannot be allocated",
                constructor(sizes, self.window)
            ),
        };
        let mut bigger = Arrays::allocate(sizes, slots).ok_or_else(refused)?;
        // before wrapping, a ring's held run starts at slot 0 like a growing cache's
        let held = s![.., .., ..self.len, ..];
        bigger.keys.slice_mut(held).assign(&self.keys.slice(held));
        bigger
            .values
            .slice_mut(held)
            .assign(&self.values.slice(held));
        bigger
            .real
            .slice_mut(s![.., ..self.len])
            .assign(&self.real.slice(s![.., ..self.len]));
        self.keys = bigger.keys;
        self.values = bigger.values;
        self.real = bigger.real;
        Ok(())
    }
}

/// Sizes that make a cache: each at least 1, and `batch · kv_heads · slots · d`
/// values (and `batch · slots` flags) addressable.
fn check_sizes<A>(sizes: [usize; 4], window: Option<usize>, slots: Option<usize>) -> Result<()> {
    let [batch, kv_heads, d_k, d_v] = sizes;
    let named = || constructor(sizes, window);
    if sizes.contains(&0) || window == Some(0) {
        return Err(Error::InvalidConfig {
            reason: format!("{}: every size must be at least 1", named()),
        });
    }
    let limit = isize::MAX as usize / std::mem::size_of::<A>().max(1);
    let values = |d: usize| {
        [batch, kv_heads, d]
            .iter()
            .try_fold(slots?.max(1), |n, &x| n.checked_mul(x))
            .filter(|&n| n <= limit)
    };
    if values(d_k).is_none() || values(d_v).is_none() {
        return Err(Error::InvalidConfig {
            reason: format!(
                "{}: {} positions of keys and values do not fit in memory",
                named(),
                slots.map_or("so many".to_string(), |n| n.to_string())
            ),
        });
    }
    Ok(())
}

/// The call that made a cache of these sizes, for its errors.
fn constructor(sizes: [usize; 4], window: Option<usize>) -> String {
    let [batch, kv_heads, d_k, d_v] = sizes;
    match window {
        Some(w) => format!(
            "KvCache::sliding(batch {batch}, kv_heads {kv_heads}, d_k {d_k}, d_v {d_v}, window {w})"
        ),
        None => format!("KvCache::new(batch {batch}, kv_heads {kv_heads}, d_k {d_k}, d_v {d_v})"),
    }
}

/// A cache's arrays, allocated only where the allocator can give them (a size
/// that passes the address checks may still be more than the machine has).
struct Arrays<A> {
    keys: Array4<A>,
    values: Array4<A>,
    real: Array2<bool>,
}

impl<A: Storage> Arrays<A> {
    fn empty() -> Self {
        Arrays {
            keys: Array4::from_elem((0, 0, 0, 0), zero()),
            values: Array4::from_elem((0, 0, 0, 0), zero()),
            real: Array2::from_elem((0, 0), true),
        }
    }

    /// Zeroed arrays of `slots` positions, or `None` where their sizes overflow or
    /// the allocator refuses them.
    fn allocate(sizes: [usize; 4], slots: usize) -> Option<Self> {
        let [batch, kv_heads, d_k, d_v] = sizes;
        let count = |d: usize| {
            [kv_heads, slots, d]
                .iter()
                .try_fold(batch, |n, &x| n.checked_mul(x))
        };
        let keys = filled(count(d_k)?, zero())?;
        let values = filled(count(d_v)?, zero())?;
        let real = filled(batch.checked_mul(slots)?, true)?;
        Some(Arrays {
            keys: Array4::from_shape_vec((batch, kv_heads, slots, d_k), keys).ok()?,
            values: Array4::from_shape_vec((batch, kv_heads, slots, d_v), values).ok()?,
            real: Array2::from_shape_vec((batch, slots), real).ok()?,
        })
    }
}

/// `n` copies of `value`, or `None` where the allocator refuses the memory.
fn filled<T: Clone>(n: usize, value: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, value);
    Some(v)
}

/// Zero in any storage type.
fn zero<A: Storage>() -> A {
    A::from_compute(<A::Compute as Element>::from_f64(0.0))
}
