//! The fused, tiled kernel: for a block of `BR` queries, stream the keys in blocks
//! of `BC`, computing `S = Q·Kᵀ` with a register-blocked micro-kernel, updating a
//! running maximum and sum per row (online softmax) and accumulating `P·V`, so the
//! `L × S` scores never exist in memory.
//!
//! Everything here is safe Rust: fixed-size arrays as register tiles, `as_chunks`
//! views instead of indexing. The body is generic over the element, the tile
//! width `NR`, how `a·b + c` is computed, the micro-kernels ([`Tiles`],
//! [`KeyTiles`]) and the entries queries and keys are packed as ([`Entry`]: one
//! component, or a pair for bf16 dot products); [`super::arch`] compiles it once
//! per instruction set.

mod output;
mod tiles;

use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

use super::float::{KernelFloat, MulAdd};
use super::online::inverse_total;
use super::pack::{Entry, PackedKeys, PackedValues};
use super::params::{BC, BR};
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::blocks::BlockClass;
use crate::flex::program::Program;
use crate::kept::{Kept, Loan};

pub(crate) use output::Output;
pub(crate) use tiles::{
    KeyTiles, PairsBy, Panels, RowStates, Tiles, ValueTiles, Weights, accumulate, scatter_queries,
    softmax_rows,
};

/// One block of query rows of one head, with everything it attends over; its
/// keys are packed as entries `K`.
pub(crate) struct Block<'a, A, K: Entry<A>, P> {
    /// The head's program (its batch row and query head).
    pub(crate) scoring: Scoring<'a, P>,
    /// The block's query rows, `(rows ≤ BR, d)`, as stored.
    pub(crate) q: ArrayView2<'a, K::Query>,
    /// Index of the block's first row among the head's `l` queries.
    pub(crate) first_row: usize,
    /// Number of queries `L` of the head.
    pub(crate) l: usize,
    /// Number of keys `S`.
    pub(crate) s: usize,
    pub(crate) keys: &'a PackedKeys<K>,
    pub(crate) values: &'a PackedValues<K::Value>,
    pub(crate) masks: &'a [Mask2<'a, A>],
    pub(crate) scale: A,
}

/// Per-thread working memory of the kernel, sized for one block; its queries are
/// packed as entries `K`.
pub(crate) struct Scratch<A, K = A> {
    q: Vec<K>,
    s: Vec<A>,
    o: Vec<A>,
    max: Vec<A>,
    sum: Vec<A>,
    alpha: Vec<A>,
}

impl<A: KernelFloat, K: Entry<A>> Scratch<A, K> {
    /// For queries of `d` components and `col_tiles` tiles of `nr` value
    /// columns: the one this thread kept from its last block ([`Loan`]), sized
    /// anew, or a new one.
    pub(crate) fn lent(d: usize, col_tiles: usize, nr: usize) -> Loan<Self> {
        let mut scratch = Loan::take_or(|| Scratch {
            q: Vec::new(),
            s: Vec::new(),
            o: Vec::new(),
            max: Vec::new(),
            sum: Vec::new(),
            alpha: Vec::new(),
        });
        // every block writes what it reads of these first
        let sized: &mut Self = &mut scratch;
        sized.q.resize(BR * K::depth(d), K::zero());
        sized.s.resize(BR * BC, A::zero());
        sized.o.resize(BR * col_tiles * nr, A::zero());
        for row_state in [&mut sized.max, &mut sized.sum, &mut sized.alpha] {
            row_state.resize(BR, A::zero());
        }
        scratch
    }
}

impl<A: KernelFloat, K: Entry<A>> Kept for Scratch<A, K> {
    fn bytes(&self) -> usize {
        let values = self.s.capacity() + self.o.capacity() + 3 * BR;
        self.q.capacity() * size_of::<K>() + values * size_of::<A>()
    }
}

/// Computes one block of output rows into `out: (rows, d_v)` (rounded to `O`
/// as each row is written), and each row's log-sum-exp into `lse` if asked
/// (`−∞` for a row that sees no key); `false` when the program made a score NaN
/// or `+∞` (the head is then left to the reference path).
#[inline(always)]
pub(crate) fn attend_block<A, M, T, K, P, O, const NR: usize>(
    tiles: T,
    block: &Block<'_, A, K, P>,
    scratch: &mut Scratch<A, K>,
    mut out: ArrayViewMut2<'_, O>,
    lse: Option<ArrayViewMut1<'_, A>>,
) -> bool
where
    A: KernelFloat,
    M: MulAdd,
    T: Tiles<A, NR> + KeyTiles<A, K, NR>,
    K: Entry<A>,
    P: Program<A>,
    O: Output<A>,
{
    let rows = block.q.nrows();
    // the rows the token computes: whole tiles of its rows
    let computed = rows.next_multiple_of(T::ROW_TILE);
    tiles.pack_block_queries(block.q, block.scale, block.keys.depth, &mut scratch.q);
    scratch.o.fill(A::zero());
    // a sink starts every row's softmax: exp(sink − sink) = 1 in the sum
    let sink = block.scoring.sink();
    scratch.max.fill(sink.unwrap_or(A::neg_infinity()));
    scratch
        .sum
        .fill(if sink.is_some() { A::one() } else { A::zero() });

    // the scale where the token takes it: in the softmax where the masks only
    // hide scores (−∞ stays −∞ times a positive scale)
    let scale = K::scale_after(block.scale);
    let (score_scale, softmax_scale) = match scale {
        Some(scale) if T::SCALE_IN_SOFTMAX && scale > A::zero() && hides_only(block) => {
            (None, Some(scale))
        }
        _ => (scale, None),
    };
    let needed = keys_needed::<A, K, P, NR>(block);
    let key_end = needed.end;
    let (scoring, first_row) = (block.scoring, block.first_row);
    let mut finite = true;
    for j0 in needed.step_by(BC) {
        // the last block may be short: work on whole panels of its keys only
        let keys = (key_end - j0).min(BC);
        let class = scoring.program.class(
            scoring.b,
            scoring.h,
            first_row..first_row + rows,
            j0..j0 + keys,
        );
        if class == BlockClass::Empty {
            continue;
        }
        let width = keys.div_ceil(NR) * NR;
        let panels = Panels {
            j0,
            width,
            rows: computed,
        };
        tiles.block_scores(&scratch.q, block.keys, panels, score_scale, &mut scratch.s);
        finite &= if P::PLAIN {
            mask_scores(block, j0, keys, width, class, &mut scratch.s)
        } else {
            // inlined: the program's functions compiled with the token's
            // instructions (the plain masks measured faster out of line)
            mask_scores_inlined(block, j0, keys, width, class, &mut scratch.s)
        };
        let state = RowStates {
            max: &mut scratch.max,
            sum: &mut scratch.sum,
            alpha: &mut scratch.alpha,
        };
        tiles.block_softmax::<M>(&mut scratch.s, width, computed, softmax_scale, state);
        let p = Weights {
            p: &mut scratch.s,
            alpha: &scratch.alpha,
            keys,
            width,
            rows: computed,
        };
        tiles.block_values(p, block.values, j0, &mut scratch.o);
    }

    let o_tiles = scratch.o.as_chunks::<NR>().0;
    for (i, row) in out.axis_iter_mut(Axis(0)).enumerate() {
        let inverse = inverse_total(scratch.sum[i]);
        O::write_row(row, (o_tiles, i), inverse);
    }
    if let Some(mut lse) = lse {
        // the sum is of exp(s − max) (the sink's included)
        for (x, (&max, &sum)) in lse.iter_mut().zip(scratch.max.iter().zip(&scratch.sum)) {
            *x = if sum > A::zero() {
                max + sum.ln()
            } else {
                A::neg_infinity()
            };
        }
    }
    finite
}

/// The keys any row of the block may attend to, the first rounded down to a
/// panel of `NR` (empty when it sees none): a window's or a document's first
/// key wastes less than a panel, not up to a key block.
fn keys_needed<A: KernelFloat, K: Entry<A>, P: Program<A>, const NR: usize>(
    block: &Block<'_, A, K, P>,
) -> std::ops::Range<usize> {
    let rows = block.first_row..block.first_row + block.q.nrows();
    let reach = block.scoring.reach(block.masks, rows, block.l, block.s);
    reach.start / NR * NR..reach.end
}

/// Whether the block's masks and program only hide scores (set them to `−∞`),
/// never change one.
fn hides_only<A: KernelFloat, K: Entry<A>, P: Program<A>>(block: &Block<'_, A, K, P>) -> bool {
    P::IDENTITY
        && block.masks.iter().all(|mask| {
            matches!(
                mask,
                Mask2::Keep(_)
                    | Mask2::CausalTopLeft
                    | Mask2::CausalBottomRight
                    | Mask2::SlidingWindow(_)
            )
        })
}

/// [`mask_scores_inlined`], out of line.
fn mask_scores<A: KernelFloat, K: Entry<A>, P: Program<A>>(
    block: &Block<'_, A, K, P>,
    j0: usize,
    keys: usize,
    width: usize,
    class: BlockClass,
    s: &mut [A],
) -> bool {
    mask_scores_inlined(block, j0, keys, width, class, s)
}

/// Applies the program, padding, bias, keep and causal masks to the scores of
/// keys `j0 ..`; `false` when the program made an attended score NaN or `+∞`.
#[inline(always)]
fn mask_scores_inlined<A: KernelFloat, K: Entry<A>, P: Program<A>>(
    block: &Block<'_, A, K, P>,
    j0: usize,
    keys: usize,
    width: usize,
    class: BlockClass,
    s: &mut [A],
) -> bool {
    let s_rows = s.as_chunks_mut::<BC>().0;
    let valid = block.s.saturating_sub(j0).min(keys);
    let mut finite = true;
    for (i, row) in s_rows.iter_mut().enumerate() {
        row[valid..width].fill(A::neg_infinity());
        if i < block.q.nrows() {
            finite &= block.scoring.prepare_row(
                block.masks,
                block.first_row + i,
                block.l,
                block.s,
                j0,
                &mut row[..valid],
                class,
            );
        }
    }
    finite
}
