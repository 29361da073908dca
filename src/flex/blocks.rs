//! Block masks: a keep predicate classified once per block of queries and
//! keys, so that the kernels skip what it empties.

use std::ops::Range;

use ndarray::{Array2, ArrayView2, s};
use rayon::prelude::*;

pub use super::function::BlockClass;
use super::function::{At, KeepMod};
use crate::error::{Error, Result};

/// Query rows per block of a [`BlockMask`]: the kernels' query blocks (48 rows
/// forward, 64 backward) are whole numbers of them.
pub const BLOCK_QUERIES: usize = 16;

/// Keys per block of a [`BlockMask`]: the kernels' key blocks (256 keys forward,
/// 128 backward) are whole numbers of them. (128 cost a causal predicate 18 %
/// against the built-in causal mask at N = 512 on Zen 4, from the keys past
/// the diagonal in each block; 64 halves them.)
pub const BLOCK_KEYS: usize = 64;

/// A keep predicate ([`KeepMod`]) with its blocks classified as empty, partial
/// or full, computed once for a shape and reusable across calls of that shape
/// (heads, layers, training steps) — FlexAttention's `BlockMask`. The kernels
/// skip empty blocks and call the predicate only in partial ones, so a sparse
/// pattern costs what it keeps.
///
/// Built for `[batch, heads, L, S]`; a batch or head count of 1 broadcasts over
/// the call's batch rows or heads, and the predicate is then called with
/// `batch = 0` (or `head = 0`) everywhere, so it must not depend on them.
///
/// # Shapes
///
/// `shape = [batch or 1, heads or 1, L, S]`: it must broadcast to the call's
/// scores `(batch, heads, L, S)`; a 2-D call's scores are `(1, 1, L, S)`.
///
/// # Errors
///
/// From [`new`](Self::new): what the predicate's [`KeepMod::check`] finds, and
/// [`Error::InvalidConfig`] when the number of blocks overflows `usize`.
///
/// # Examples
///
/// Two documents of 100 and 28 tokens packed in one sequence of 128:
///
/// ```
/// use attn::flex::{At, BlockClass, BlockMask};
///
/// let document = |i: usize| usize::from(i >= 100);
/// let same_document = move |at: At| document(at.query) == document(at.key);
/// let blocks = BlockMask::new(same_document, [1, 1, 128, 128])?;
/// // query block 0 (rows 0..16) against key block 1 (keys 64..128), partly document 0
/// assert_eq!(blocks.class(0, 0, 0, 1), BlockClass::Partial);
/// assert_eq!(blocks.class(0, 0, 0, 0), BlockClass::Full);
/// assert_eq!(blocks.class(0, 0, 7, 0), BlockClass::Empty); // rows 112..128, document 1
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlockMask<K> {
    keep: K,
    shape: [usize; 4],
    /// One `(query blocks, key blocks)` table per `(batch, head)` of `shape`.
    classes: Vec<Array2<BlockClass>>,
}

impl<K: KeepMod> BlockMask<K> {
    /// Classifies `keep` over `shape = [batch, heads, L, S]` (calling it once
    /// per position, in parallel).
    ///
    /// # Errors
    ///
    /// What the predicate's [`KeepMod::check`] finds, and
    /// [`Error::InvalidConfig`] when the number of blocks overflows `usize`.
    pub fn new(keep: K, shape: [usize; 4]) -> Result<Self> {
        keep.check(shape)?;
        let [batch, heads, l, s] = shape;
        let (rows, cols) = (l.div_ceil(BLOCK_QUERIES), s.div_ceil(BLOCK_KEYS));
        let tables = batch.checked_mul(heads);
        let blocks = tables.and_then(|t| t.checked_mul(rows)?.checked_mul(cols));
        let (Some(tables), Some(_)) = (tables, blocks) else {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a block mask of shape {shape:?} has more blocks than fit in memory"
                ),
            });
        };
        let classify = |table: usize| {
            let (b, h) = (table / heads, table % heads);
            Array2::from_shape_fn((rows, cols), |(r, c)| {
                if K::ALL {
                    return BlockClass::Full;
                }
                let queries = r * BLOCK_QUERIES..((r + 1) * BLOCK_QUERIES).min(l);
                let keys = c * BLOCK_KEYS..((c + 1) * BLOCK_KEYS).min(s);
                keep.block(b, h, queries.clone(), keys.clone())
                    .unwrap_or_else(|| classify_block(&keep, b, h, queries, keys))
            })
        };
        let classes = (0..tables).into_par_iter().map(classify).collect();
        Ok(BlockMask {
            keep,
            shape,
            classes,
        })
    }

    /// The shape it was built for, `[batch or 1, heads or 1, L, S]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The class of query block `query_block` (rows `16·r ..`) against key
    /// block `key_block` (keys `64·c ..`) of batch row `batch` and head `head`
    /// (each taken as 0 where the mask broadcasts).
    ///
    /// # Panics
    ///
    /// When a block or, where the mask does not broadcast, the batch row or
    /// head is out of range.
    pub fn class(
        &self,
        batch: usize,
        head: usize,
        query_block: usize,
        key_block: usize,
    ) -> BlockClass {
        self.table(batch, head)[[query_block, key_block]]
    }

    /// The classes of batch row `batch`, head `head`: `(⌈L/16⌉, ⌈S/64⌉)`.
    ///
    /// # Panics
    ///
    /// As [`class`](Self::class).
    pub fn classes(&self, batch: usize, head: usize) -> ArrayView2<'_, BlockClass> {
        self.table(batch, head).view()
    }

    /// How many blocks are empty, partial and full, over every table.
    pub fn counts(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for class in self.classes.iter().flatten() {
            counts[*class as usize] += 1;
        }
        counts
    }

    /// The predicate.
    pub fn keep_mod(&self) -> &K {
        &self.keep
    }

    /// Checks that the mask serves scores of shape `scores = (batch, heads, L, S)`.
    pub(crate) fn check(&self, scores: [usize; 4]) -> Result<()> {
        let [b, h, l, s] = self.shape;
        let fits = (b == 1 || b == scores[0]) && (h == 1 || h == scores[1]);
        if fits && [l, s] == [scores[2], scores[3]] {
            Ok(())
        } else {
            Err(Error::MaskShape {
                mask: self.shape.to_vec(),
                scores: scores.to_vec(),
            })
        }
    }

    /// The position the predicate sees for query `i`, key `j` of batch row `b`,
    /// head `h`: the batch row and head 0 where the mask broadcasts.
    #[inline(always)]
    pub(crate) fn at(&self, b: usize, h: usize, i: usize, j: usize) -> At {
        let (batch, head) = self.own(b, h);
        At {
            batch,
            head,
            query: i,
            key: j,
        }
    }

    /// Batch row `b` and head `h` as the mask holds them: 0 where it broadcasts.
    #[inline(always)]
    fn own(&self, b: usize, h: usize) -> (usize, usize) {
        let own = |n: usize, x: usize| if n == 1 { 0 } else { x };
        (own(self.shape[0], b), own(self.shape[1], h))
    }

    /// The class of queries `rows` against keys `keys` of batch row `b`, head
    /// `h`: empty or full only when every block they touch is.
    #[inline]
    pub(crate) fn class_of(
        &self,
        b: usize,
        h: usize,
        rows: Range<usize>,
        keys: Range<usize>,
    ) -> BlockClass {
        if rows.is_empty() || keys.is_empty() {
            return BlockClass::Empty;
        }
        let table = self.table(b, h);
        let (rows, keys) = (blocks_of(rows, BLOCK_QUERIES), blocks_of(keys, BLOCK_KEYS));
        let mut blocks = table.slice(s![rows, keys]).into_iter().copied();
        let first = blocks.next().unwrap_or(BlockClass::Empty);
        blocks.fold(first, BlockClass::join)
    }

    /// The keys queries `rows` of batch row `b`, head `h` may see: from the
    /// first key block any of their blocks keeps to the last (of `s` keys).
    pub(crate) fn reach(&self, b: usize, h: usize, rows: Range<usize>, s: usize) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        let table = self.table(b, h);
        let rows = blocks_of(rows, BLOCK_QUERIES);
        let (mut first, mut last) = (usize::MAX, 0);
        for row in table.slice(s![rows, ..]).outer_iter() {
            let kept = |c: &usize| row[*c] != BlockClass::Empty;
            if let Some(c) = (0..row.len()).find(kept) {
                first = first.min(c);
            }
            if let Some(c) = (0..row.len()).rev().find(kept) {
                last = last.max(c + 1);
            }
        }
        if first >= last {
            return 0..0;
        }
        first * BLOCK_KEYS..(last * BLOCK_KEYS).min(s)
    }

    /// Writes `masked` where the predicate drops one of the scores `row` of
    /// query `i` against keys `j0 ..`, calling it only in the partial blocks
    /// the row crosses (a full block keeps its part, an empty one drops it).
    #[inline(always)]
    pub(crate) fn keep_row<A: Copy>(
        &self,
        b: usize,
        h: usize,
        i: usize,
        j0: usize,
        row: &mut [A],
        masked: A,
    ) {
        let table = self.table(b, h);
        let r = i / BLOCK_QUERIES;
        let mut j = 0;
        while j < row.len() {
            let c = (j0 + j) / BLOCK_KEYS;
            let end = ((c + 1) * BLOCK_KEYS - j0).min(row.len());
            match table[[r, c]] {
                BlockClass::Full => {}
                BlockClass::Empty => row[j..end].fill(masked),
                BlockClass::Partial => {
                    for (jj, x) in row[j..end].iter_mut().enumerate() {
                        if !self.keep.keep(self.at(b, h, i, j0 + j + jj)) {
                            *x = masked;
                        }
                    }
                }
            }
            j = end;
        }
    }

    fn table(&self, b: usize, h: usize) -> &Array2<BlockClass> {
        let (b, h) = self.own(b, h);
        &self.classes[b * self.shape[1] + h]
    }
}

/// The blocks of `size` that the non-empty `range` touches.
fn blocks_of(range: Range<usize>, size: usize) -> Range<usize> {
    range.start / size..(range.end - 1) / size + 1
}

/// The class of one block, calling the predicate until the answer is known.
fn classify_block<K: KeepMod>(
    keep: &K,
    b: usize,
    h: usize,
    queries: Range<usize>,
    keys: Range<usize>,
) -> BlockClass {
    let (mut kept, mut dropped) = (false, false);
    for query in queries {
        for key in keys.clone() {
            if keep.keep(At {
                batch: b,
                head: h,
                query,
                key,
            }) {
                kept = true;
            } else {
                dropped = true;
            }
            if kept && dropped {
                return BlockClass::Partial;
            }
        }
    }
    if kept {
        BlockClass::Full
    } else {
        BlockClass::Empty
    }
}
