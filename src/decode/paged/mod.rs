//! A paged key/value cache: a pool of fixed-size blocks shared by many
//! sequences through their block tables (vLLM's layout), in any stored type,
//! int8 included. The pool and its sequences are here; a step's attention is
//! in `attend.rs`, the stored types in `element.rs`.

mod attend;
mod element;
mod sequences;
mod write;

use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::Array3;

pub(crate) use attend::step_masks;
pub use element::{CacheElement, PerCache};

use crate::element::Element;
use crate::error::{Error, Result};

/// A key/value cache for serving many sequences at once: a pool of blocks of
/// `block_size` positions, each sequence a table of blocks. Sequences of any
/// lengths decode together with no padding (each step attends over its own
/// sequence's blocks only), a sequence grows one block at a time, and
/// [`fork`](Self::fork) shares a prefix's blocks between sequences, copying a
/// shared block only when one of them writes to it (copy on write).
///
/// Keys and values are stored as `E` ([`CacheElement`]): `f32`, `f64`,
/// `bf16`, `f16`, or `i8` with one `f32` scale per (token, key/value head) —
/// 68 bytes per row of 64 where `bf16` takes 128. A decoding step reads the
/// blocks where they lie and widens (or dequantises) them in registers, through
/// the fused kernel's direct path; a longer chunk (a prompt) gathers the
/// sequence's rows once and runs the tiled kernel.
///
/// Every step attends over the keys and values as stored: an int8 cache's
/// new positions are quantised before its queries see them, so a prompt
/// appended in chunks gives the numbers of the prompt at once.
///
/// With int8, each stored element is within `mⱼ/254` of its value (`mⱼ` the
/// largest magnitude of its row). On CPUs with AVX512_VNNI a decoding step
/// also rounds each scaled query row and each chunk's weights to 16 bits and
/// sums the products exactly in integers (`vpdpwssd`). Together: the scores of
/// a query `q` at scale `c` against key `j` are off by at most
/// `εⱼ = c·mⱼ·(‖q‖₁/254 + d_k·‖q‖∞/32767)`, and, with `ε = maxⱼ εⱼ` and
/// `V = maxⱼ max|vⱼ|`, every output element is within
/// `(e^{2ε} − 1)·V + V/127` of the `f32` cache's (plus `f32` rounding; the
/// tests check it on random inputs and on Hugging Face models' cached steps).
///
/// # Shapes
///
/// A step takes queries `(heads, T, d_k)` with `kv_heads` dividing `heads`,
/// new keys `(kv_heads, T, d_k)` and values `(kv_heads, T, d_v)`, and returns
/// `(heads, T, d_v)`.
///
/// # Errors
///
/// [`Error::Cache`] when the pool has too few free blocks for a step, a
/// sequence was freed or belongs to another cache, or an int8 cache is given
/// a NaN or infinite key or value; nothing is written then.
///
/// # Examples
///
/// ```
/// use attn::PagedKvCache;
/// use ndarray::Array3;
///
/// // 64 blocks of 16 positions, 2 key/value heads of width 8, stored as int8
/// let mut cache = PagedKvCache::<i8>::new(64, 16, 2, 8, 8)?;
/// let (a, b) = (cache.add_sequence(), cache.add_sequence());
/// let prompt = |t| Array3::from_shape_fn((2, t, 8), |(h, i, j)| ((h + i * j) % 5) as f32 / 5.0);
/// cache.attend(a, &Array3::ones((4, 20, 8)), &prompt(20), &prompt(20))?; // 4 query heads
/// cache.attend(b, &Array3::ones((4, 3, 8)), &prompt(3), &prompt(3))?;
/// assert_eq!((cache.len(a)?, cache.len(b)?), (20, 3));
/// assert_eq!(cache.free_blocks(), 64 - 2 - 1);
/// let child = cache.fork(a)?; // shares a's two blocks
/// assert_eq!(cache.free_blocks(), 61);
/// cache.free(a)?;
/// assert!(cache.len(a).is_err());
/// assert_eq!(cache.len(child)?, 20);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PagedKvCache<E: CacheElement> {
    /// `(kv_heads, blocks, block_size, d_k)` and `(…, d_v)`, row-major: a
    /// head's blocks one after another, so a sequence whose blocks were taken
    /// in order is read as one stream.
    keys: Vec<E>,
    values: Vec<E>,
    /// `(kv_heads, blocks, block_size)`: each row's scale (int8 only).
    key_scales: Vec<f32>,
    value_scales: Vec<f32>,
    /// Per block: the sequences whose tables hold it (0: free).
    refs: Vec<u32>,
    /// The free blocks, taken from the end.
    free: Vec<usize>,
    slots: Vec<Slot>,
    /// Which cache this is: a sequence of another cache is refused.
    id: u64,
    sizes: Sizes,
    /// The scores' scale; `None`: `1/√d_k`.
    scale: Option<E::Compute>,
    /// The positions a query sees, itself included.
    window: Option<usize>,
}

/// A cache's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sizes {
    blocks: usize,
    block_size: usize,
    kv_heads: usize,
    d_k: usize,
    d_v: usize,
}

/// A sequence's place: the sequence while it lives, and a count of the
/// sequences it has held (so an id of a freed one is never taken for its
/// successor).
#[derive(Debug, Clone, Default)]
struct Slot {
    generation: u64,
    sequence: Option<Sequence>,
}

/// A sequence: its blocks in order, and its positions.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sequence {
    pub(crate) table: Vec<usize>,
    pub(crate) len: usize,
}

/// A sequence of one [`PagedKvCache`], from
/// [`add_sequence`](PagedKvCache::add_sequence) or [`fork`](PagedKvCache::fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SequenceId {
    cache: u64,
    slot: usize,
    generation: u64,
}

/// The identity of the next cache made.
static NEXT_CACHE: AtomicU64 = AtomicU64::new(0);

impl<E: CacheElement> PagedKvCache<E> {
    /// A pool of `blocks` blocks of `block_size` positions for `kv_heads`
    /// key/value heads of widths `d_k` (keys) and `d_v` (values), allocated
    /// now, and no sequence.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when a size is 0 or the pool cannot be
    /// addressed or allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::PagedKvCache::<half::bf16>::new(128, 16, 8, 64, 64)?;
    /// assert_eq!(cache.bytes(), 2 * 128 * 16 * 8 * 64 * 2);
    /// assert!(attn::PagedKvCache::<f32>::new(0, 16, 8, 64, 64).is_err());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn new(
        blocks: usize,
        block_size: usize,
        kv_heads: usize,
        d_k: usize,
        d_v: usize,
    ) -> Result<Self> {
        let sizes = Sizes {
            blocks,
            block_size,
            kv_heads,
            d_k,
            d_v,
        };
        let named = || {
            format!(
                "PagedKvCache::new(blocks {blocks}, block_size {block_size}, kv_heads {kv_heads}, d_k {d_k}, d_v {d_v})"
            )
        };
        if [blocks, block_size, kv_heads, d_k, d_v].contains(&0) {
            return Err(Error::InvalidConfig {
                reason: format!("{}: every size must be at least 1", named()),
            });
        }
        let rows = [blocks, kv_heads, block_size]
            .iter()
            .try_fold(1_usize, |n, &x| n.checked_mul(x));
        let elements = |width: usize| {
            rows.and_then(|r| r.checked_mul(width))
                .filter(|&n| n <= isize::MAX as usize / std::mem::size_of::<E>().max(4))
        };
        let (Some(rows), Some(key_len), Some(value_len)) = (rows, elements(d_k), elements(d_v))
        else {
            return Err(Error::InvalidConfig {
                reason: format!("{}: the pool does not fit in memory", named()),
            });
        };
        let refused = || Error::InvalidConfig {
            reason: format!("{}: the pool's memory cannot be allocated", named()),
        };
        let scale_rows = if E::SCALED { rows } else { 0 };
        Ok(PagedKvCache {
            keys: filled(key_len, E::zero()).ok_or_else(refused)?,
            values: filled(value_len, E::zero()).ok_or_else(refused)?,
            key_scales: filled(scale_rows, 0.0).ok_or_else(refused)?,
            value_scales: filled(scale_rows, 0.0).ok_or_else(refused)?,
            refs: filled(blocks, 0).ok_or_else(refused)?,
            free: (0..blocks).rev().collect(),
            slots: Vec::new(),
            id: NEXT_CACHE.fetch_add(1, Ordering::Relaxed),
            sizes,
            scale: None,
            window: None,
        })
    }

    /// Every step multiplies its scores by `scale` instead of `1/√d_k`; a
    /// step checks it before writing (zero, NaN or infinity make it
    /// [`Error::InvalidScale`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::PagedKvCache::<f64>::new(4, 4, 1, 2, 2)?.with_scale(1.0);
    /// assert_eq!(cache.scale(), 1.0);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_scale(mut self, scale: E::Compute) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Each query attends to itself and the `window − 1` positions before it
    /// (sliding-window attention).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `window` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// let cache = attn::PagedKvCache::<f32>::new(4, 4, 1, 2, 2)?.with_window(3)?;
    /// assert_eq!(cache.window(), Some(3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_window(mut self, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(Error::InvalidConfig {
                reason: "a paged cache's window must be at least 1".into(),
            });
        }
        self.window = Some(window);
        Ok(self)
    }

    /// The factor on every step's scores.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::PagedKvCache::<f64>::new(4, 4, 1, 4, 4)?.scale(), 0.5);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn scale(&self) -> E::Compute {
        let d_k = self.sizes.d_k as f64;
        self.scale
            .unwrap_or_else(|| E::Compute::from_f64(1.0 / d_k.sqrt()))
    }

    /// The window of [`with_window`](Self::with_window).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::PagedKvCache::<f32>::new(4, 4, 1, 2, 2)?.window(), None);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Positions per block.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?.block_size(), 16);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn block_size(&self) -> usize {
        self.sizes.block_size
    }

    /// Blocks no sequence holds.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?.free_blocks(), 4);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Bytes of the pool (keys, values and int8 scales of every block).
    ///
    /// # Examples
    ///
    /// ```
    /// // one block of 16 positions, 1 head of width 64: 16 rows of 64 bytes and a scale, twice
    /// assert_eq!(attn::PagedKvCache::<i8>::new(1, 16, 1, 64, 64)?.bytes(), 2 * 16 * 68);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn bytes(&self) -> usize {
        self.block_bytes() * self.sizes.blocks
    }

    /// Bytes of the blocks that sequences hold.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut cache = attn::PagedKvCache::<f32>::new(4, 2, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// cache.append(s, &ndarray::Array3::ones((1, 3, 2)), &ndarray::Array3::ones((1, 3, 2)))?;
    /// assert_eq!(cache.bytes_in_use(), 2 * (2 * 2 * 2 * 4)); // two blocks
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn bytes_in_use(&self) -> usize {
        self.block_bytes() * (self.sizes.blocks - self.free.len())
    }

    /// `(kv_heads, d_k, d_v)`.
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.sizes.kv_heads, self.sizes.d_k, self.sizes.d_v)
    }

    /// Bytes of one block.
    fn block_bytes(&self) -> usize {
        let Sizes {
            block_size,
            kv_heads,
            d_k,
            d_v,
            ..
        } = self.sizes;
        // `new` made every block's product addressable
        block_size * kv_heads * (E::bytes_per_row(d_k) + E::bytes_per_row(d_v))
    }

    /// The keys `sequence` holds, as they are stored (int8 dequantised),
    /// `(kv_heads, len, d_k)`.
    ///
    /// # Errors
    ///
    /// As [`len`](Self::len).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mut cache = attn::PagedKvCache::<i8>::new(4, 16, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// cache.append(s, &ndarray::array![[[1.0, -0.5]]], &ndarray::array![[[0.0, 0.0]]])?;
    /// assert_eq!(cache.keys(s)?, ndarray::array![[[1.0, -64.0 / 127.0]]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn keys(&self, sequence: SequenceId) -> Result<Array3<E::Compute>> {
        let sequence = self.sequence(sequence)?;
        Ok(self.gather(sequence, &self.keys, &self.key_scales, self.sizes.d_k))
    }

    /// The values `sequence` holds, `(kv_heads, len, d_v)`, as
    /// [`keys`](Self::keys).
    ///
    /// # Errors
    ///
    /// As [`len`](Self::len).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mut cache = attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 3)?;
    /// let s = cache.add_sequence();
    /// assert_eq!(cache.values(s)?.dim(), (1, 0, 3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn values(&self, sequence: SequenceId) -> Result<Array3<E::Compute>> {
        let sequence = self.sequence(sequence)?;
        Ok(self.gather(sequence, &self.values, &self.value_scales, self.sizes.d_v))
    }

    /// The first row of head `kv`'s rows in `block`.
    pub(crate) fn first_row(&self, block: usize, kv: usize) -> usize {
        (kv * self.sizes.blocks + block) * self.sizes.block_size
    }

    /// A sequence's rows of `data` as the values they stand for,
    /// `(kv_heads, len, width)`.
    fn gather(
        &self,
        sequence: &Sequence,
        data: &[E],
        scales: &[f32],
        width: usize,
    ) -> Array3<E::Compute> {
        let (kv_heads, size) = (self.sizes.kv_heads, self.sizes.block_size);
        let zero = E::Compute::from_f64(0.0);
        let mut out = Array3::from_elem((kv_heads, sequence.len, width), zero);
        for kv in 0..kv_heads {
            for p in 0..sequence.len {
                let row = self.first_row(sequence.table[p / size], kv) + p % size;
                let scale = scales.get(row).copied().unwrap_or(1.0);
                let mut target = out.slice_mut(ndarray::s![kv, p, ..]);
                let target = target.as_slice_mut().expect("a row of a standard array");
                E::load(&data[row * width..(row + 1) * width], scale, target);
            }
        }
        out
    }
}

/// `n` copies of `value`, or `None` where the allocator refuses the memory.
fn filled<T: Clone>(n: usize, value: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, value);
    Some(v)
}
