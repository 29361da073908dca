//! Keys and values of past positions, for decoding one or a few tokens at a time:
//! the cache and its views (here), its storage (`storage.rs`) and attention over
//! it (`attend.rs`).

mod attend;
mod storage;

pub(crate) use attend::{LayerStep, Settings};
use storage::{Arrays, check_sizes, constructor, filled};

use ndarray::{Array2, Array4, ArrayRef4, ArrayView2, ArrayView4, s};

use super::position::Run;
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
    /// Per batch row: whether its real tokens are one run so far.
    pub(super) runs: Vec<Run>,
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
                .zip(filled(sizes[0], 0).zip(filled(sizes[0], Run::Before)))
                .ok_or_else(|| Error::InvalidConfig {
                    reason: format!(
                        "{}: the memory cannot be allocated",
                        constructor(sizes, window)
                    ),
                })
        });
        let ((storage, (positions, runs)), fault) = match storage {
            Ok(storage) => (storage, None),
            Err(fault) => ((Arrays::empty(), (Vec::new(), Vec::new())), Some(fault)),
        };
        KvCache {
            keys: storage.keys,
            values: storage.values,
            real: storage.real,
            positions,
            runs,
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
    /// cache too). A row whose padding a step moved before its real tokens (see
    /// [`attend_padded`](Self::attend_padded)) holds its padding first, then its
    /// real tokens, oldest first.
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
}
