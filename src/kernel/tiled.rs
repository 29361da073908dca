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

use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

use super::float::{KernelFloat, MulAdd};
use super::online::{exp_and_sum, fold_step, inverse_total, rescale, row_max};
use super::pack::{Entry, PackPanel, PackedKeys, PackedValues};
use super::params::{BC, BR, MR};
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::blocks::BlockClass;
use crate::flex::program::Program;

/// One block of query rows of one head, with everything it attends over; its
/// keys are packed as entries `K`.
pub(crate) struct Block<'a, A, K: Entry<A>, P> {
    /// The head's program (its batch row and query head).
    pub(crate) scoring: Scoring<'a, P>,
    /// The block's query rows, `(rows ≤ BR, d)`.
    pub(crate) q: ArrayView2<'a, A>,
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
    /// For queries of `d` components.
    pub(crate) fn new(d: usize, col_tiles: usize, nr: usize) -> Self {
        Scratch {
            q: vec![K::zero(); BR * K::depth(d)],
            s: vec![A::zero(); BR * BC],
            o: vec![A::zero(); BR * col_tiles * nr],
            max: vec![A::zero(); BR],
            sum: vec![A::zero(); BR],
            alpha: vec![A::zero(); BR],
        }
    }
}

/// Computes one block of output rows into `out: (rows, d_v)`, and each row's
/// log-sum-exp into `lse` if asked (`−∞` for a row that sees no key); `false`
/// when the program made a score NaN or `+∞` (the head is then left to the
/// reference path).
#[inline(always)]
pub(crate) fn attend_block<A, M, T, K, P, const NR: usize>(
    tiles: T,
    block: &Block<'_, A, K, P>,
    scratch: &mut Scratch<A, K>,
    mut out: ArrayViewMut2<'_, A>,
    lse: Option<ArrayViewMut1<'_, A>>,
) -> bool
where
    A: KernelFloat,
    M: MulAdd,
    T: Tiles<A, NR> + KeyTiles<A, K, NR>,
    K: Entry<A>,
    P: Program<A>,
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
    for (i, mut row) in out.axis_iter_mut(Axis(0)).enumerate() {
        let inverse = inverse_total(scratch.sum[i]);
        for (ct, columns) in row.axis_chunks_iter_mut(Axis(0), NR).enumerate() {
            for (x, &o) in columns.into_iter().zip(&o_tiles[ct * BR + i]) {
                *x = o * inverse;
            }
        }
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

/// Packs a block's queries (times the scale, where the entries hold it) as
/// `tile_rows × depth × MR` entries, tile by tile with the token's
/// [`KeyTiles::pack_query_tile`].
#[inline(always)]
fn pack_queries<A, K, T, const NR: usize>(
    tiles: T,
    block: ArrayView2<'_, A>,
    scale: A,
    depth: usize,
    q: &mut [K],
) where
    A: Copy,
    K: Entry<A>,
    T: KeyTiles<A, K, NR>,
{
    let q_tiles = q.as_chunks_mut::<MR>().0.chunks_exact_mut(depth);
    for (out, rows) in q_tiles.zip(block.axis_chunks_iter(Axis(0), MR)) {
        tiles.pack_query_tile(rows, scale, out);
    }
}

/// [`KeyTiles::pack_query_tile`] query by query, each entry stored on its own.
#[inline(always)]
pub(crate) fn scatter_queries<A: Copy, K: Entry<A>>(
    rows: ArrayView2<'_, A>,
    scale: A,
    out: &mut [[K; MR]],
) {
    if rows.nrows() < MR {
        out.fill([K::zero(); MR]);
    }
    for (i, row) in rows.outer_iter().enumerate() {
        K::pack_query(row, scale, |p, x| out[p][i] = x);
    }
}

/// Which scores to compute: key panels `j0 .. j0 + width` (whole panels of `NR`
/// keys) for the first `rows` query rows (whole tiles of the token's rows).
#[derive(Clone, Copy)]
pub(crate) struct Panels {
    pub(crate) j0: usize,
    pub(crate) width: usize,
    pub(crate) rows: usize,
}

/// `S = Q·Kᵀ` for the keys of `panels`, into the rows of `s: BR × BC`, times
/// `scale` where the packed queries do not carry it, tile by tile of `MR` rows.
#[inline(always)]
fn scores<A: KernelFloat, K, T: KeyTiles<A, K, NR>, const NR: usize>(
    tiles: T,
    q: &[K],
    keys: &PackedKeys<K>,
    panels: Panels,
    scale: Option<A>,
    s: &mut [A],
) {
    let depth = keys.depth;
    let q_rows = q.as_chunks::<MR>().0;
    let k_rows = keys.data.as_chunks::<NR>().0;
    let s_rows = s.as_chunks_mut::<BC>().0;
    for panel in 0..panels.width / NR {
        let first = (panels.j0 / NR + panel) * depth;
        let k_panel = &k_rows[first..first + depth];
        for t in 0..panels.rows / MR {
            let tile = tiles.key_tile(&q_rows[t * depth..(t + 1) * depth], k_panel);
            for (i, tile_row) in tile.iter().enumerate() {
                let row = &mut s_rows[t * MR + i][panel * NR..(panel + 1) * NR];
                match scale {
                    None => row.copy_from_slice(tile_row),
                    Some(scale) => {
                        for (x, &dot) in row.iter_mut().zip(tile_row) {
                            *x = dot * scale;
                        }
                    }
                }
            }
        }
    }
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

/// The online softmax's state of a block's rows: each row's maximum and sum so
/// far, and the factor `α` a step writes.
pub(crate) struct RowStates<'a, A> {
    pub(crate) max: &'a mut [A],
    pub(crate) sum: &'a mut [A],
    pub(crate) alpha: &'a mut [A],
}

/// One block's weights `P = exp(S − shift)`, row by row, and the factors `α` that
/// rescale each row's output so far. The weights are the scores' memory, which
/// the next block's scores overwrite: a token may store them its own way there
/// (rounded, narrowed) for its [`KeyTiles::block_values`].
pub(crate) struct Weights<'a, A> {
    /// `BR × BC`, of which the first `rows` rows and `keys` columns are in use
    /// (`keys .. width` zero).
    pub(crate) p: &'a mut [A],
    pub(crate) alpha: &'a [A],
    pub(crate) keys: usize,
    pub(crate) width: usize,
    pub(crate) rows: usize,
}

/// `O = α·O + P·V` for keys `j0 .. j0 + keys`, tile by tile of `MR` rows.
#[inline(always)]
pub(crate) fn accumulate<A: KernelFloat, T: Tiles<A, NR>, const NR: usize>(
    tiles: T,
    weights: Weights<'_, A>,
    values: &PackedValues<A>,
    j0: usize,
    o: &mut [A],
) {
    let Weights {
        p,
        alpha,
        keys,
        rows,
        ..
    } = weights;
    let tile_rows = rows / MR;
    let p_rows = p.as_chunks::<BC>().0;
    let v_rows = values.data.as_chunks::<NR>().0;
    // O is stored column tile by column tile: `(col_tiles × BR) × NR`
    let o_tiles = o.as_chunks_mut::<NR>().0;
    let col_tiles = values.col_tiles;
    for ct in 0..col_tiles {
        let first = ct * values.s + j0;
        let v_block = &v_rows[first..first + keys];
        for t in 0..tile_rows {
            let rows: [&[A; BC]; MR] = std::array::from_fn(|i| &p_rows[t * MR + i]);
            let first = ct * BR + t * MR;
            let o_tile: &mut [[A; NR]; MR] = (&mut o_tiles[first..first + MR])
                .try_into()
                .expect("an output tile holds MR rows");
            let alpha: &[A; MR] = alpha[t * MR..(t + 1) * MR]
                .try_into()
                .expect("MR factors per tile");
            tiles.value_tile(&rows, v_block, alpha, o_tile);
        }
    }
}

/// The two register-blocked micro-kernels, `MR × NR` tiles kept in registers;
/// implemented in [`super::arch`] by a value that proves its instructions run.
pub(crate) trait Tiles<A: Copy, const NR: usize>: PackPanel<A, NR> {
    /// A tile of `S = Q·Kᵀ`: `q` holds the `d` columns of `MR` queries, `k` the `d`
    /// components of `NR` keys. Only the first `rows` rows are asked for: the
    /// others may be left zero, and each row's bits are the same for every
    /// `rows` that includes it.
    fn score_tile(self, q: &[[A; MR]], k: &[[A; NR]], rows: usize) -> [[A; NR]; MR];
    /// `O = α·O + P·V` on one tile, over the keys of a block: `p` holds `MR` rows
    /// of weights, `v` one row of `NR` values per key (at most `BC`). The
    /// block's product is summed on its own before it is added to the rescaled
    /// total: blocked summation keeps long rows accurate.
    fn value_tile(self, p: &[&[A; BC]; MR], v: &[[A; NR]], alpha: &[A; MR], o: &mut [[A; NR]; MR]);

    /// Packs a tile of at most `MR` query rows times `scale`: `out[p][i]` =
    /// component `p` of row `i`, the lanes past the rows zero. One store per
    /// component unless the token has a faster way.
    #[inline(always)]
    fn pack_query_tile(self, rows: ArrayView2<'_, A>, scale: A, out: &mut [[A; MR]])
    where
        A: Entry<A>,
    {
        scatter_queries(rows, scale, out);
    }

    /// The largest score of `row` ([`row_max`] over `NR` lanes) unless the
    /// token has a faster way.
    #[inline(always)]
    fn row_max(self, row: &[A]) -> A
    where
        A: KernelFloat,
    {
        row_max::<A, NR>(row)
    }

    /// Replaces each score `x` of `row` by `exp(x − shift)` and returns their
    /// sum ([`exp_and_sum`]) unless the token has a faster way.
    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [A], shift: A) -> A
    where
        A: KernelFloat,
    {
        exp_and_sum::<A, M, NR>(row, shift)
    }

    /// Whether the token takes the scale of scores that masks only hide in
    /// [`block_softmax`](Self::block_softmax) (one rounding fewer, no pass of
    /// its own) rather than in [`KeyTiles::block_scores`].
    const SCALE_IN_SOFTMAX: bool = false;

    /// The online softmax's step over the first `width` scores of the first
    /// `rows` rows of `s` (rows of `BC`), each times `scale` if given: the
    /// weights replace the scores, in the form the token's
    /// [`KeyTiles::block_values`] reads, and each row's state moves on
    /// ([`rescale`], [`fold_step`]). Row by row with the token's own maximum
    /// and `exp` unless it has a faster way.
    #[inline(always)]
    fn block_softmax<M: MulAdd>(
        self,
        s: &mut [A],
        width: usize,
        rows: usize,
        scale: Option<A>,
        state: RowStates<'_, A>,
    ) where
        A: KernelFloat,
    {
        for (i, row) in s.chunks_exact_mut(BC).take(rows).enumerate() {
            let row = &mut row[..width];
            if let Some(scale) = scale {
                row.iter_mut().for_each(|x| *x *= scale);
            }
            let step = rescale::<A, M>(state.max[i], self.row_max(row));
            let block_sum = self.exp_and_sum::<M>(row, step.shift);
            state.alpha[i] = fold_step(step, block_sum, &mut state.max[i], &mut state.sum[i]);
        }
    }
}

/// The score micro-kernel over queries and keys packed as entries `K`: a tile of
/// `S = Q·Kᵀ` from the `depth` entries of `MR` queries and `NR` keys. For
/// `K = A` it is [`Tiles::score_tile`].
///
/// A block's products are methods too, by default tile by tile with the
/// micro-kernels; a token with a unit of its own (AMX's tile registers)
/// replaces them, with its own rows per tile.
pub(crate) trait KeyTiles<A, K, const NR: usize>: Copy {
    /// Query rows per tile of the block's products: a block computes its rows
    /// rounded up to a multiple (a divisor of `BR`).
    const ROW_TILE: usize = MR;

    fn key_tile(self, q: &[[K; MR]], k: &[[K; NR]]) -> [[A; NR]; MR];

    /// Packs a block's queries `q: (rows ≤ BR, d)`, `depth` entries each, into
    /// `out` (`BR · depth` entries), times `scale` where the entries hold it.
    #[inline(always)]
    fn pack_block_queries(self, q: ArrayView2<'_, A>, scale: A, depth: usize, out: &mut [K])
    where
        A: Copy,
        K: Entry<A>,
    {
        pack_queries(self, q, scale, depth, out);
    }

    /// The block's scores `S = Q·Kᵀ` for `panels`, into the rows of `s: BR × BC`,
    /// times `scale` where the packed queries do not carry it.
    #[inline(always)]
    fn block_scores(
        self,
        q: &[K],
        keys: &PackedKeys<K>,
        panels: Panels,
        scale: Option<A>,
        s: &mut [A],
    ) where
        A: KernelFloat,
    {
        scores(self, q, keys, panels, scale, s);
    }

    /// `O = α·O + P·V` for keys `j0 .. j0 + keys` of the block, `o` stored
    /// column tile by column tile (`col_tiles × BR × NR`); each block's product
    /// summed on its own before it is added to the rescaled total.
    fn block_values(
        self,
        weights: Weights<'_, A>,
        values: &PackedValues<K::Value>,
        j0: usize,
        o: &mut [A],
    ) where
        K: Entry<A>;

    /// Packs a tile of at most `MR` query rows as entries `K` (times `scale`
    /// where the entries hold it), the lanes past the rows zero. For `K = A` it
    /// is [`Tiles::pack_query_tile`].
    #[inline(always)]
    fn pack_query_tile(self, rows: ArrayView2<'_, A>, scale: A, out: &mut [[K; MR]])
    where
        A: Copy,
        K: Entry<A>,
    {
        scatter_queries(rows, scale, out);
    }
}

impl<A: KernelFloat, T: Tiles<A, NR>, const NR: usize> KeyTiles<A, A, NR> for T {
    #[inline(always)]
    fn key_tile(self, q: &[[A; MR]], k: &[[A; NR]]) -> [[A; NR]; MR] {
        self.score_tile(q, k, MR)
    }

    #[inline(always)]
    fn block_values(
        self,
        weights: Weights<'_, A>,
        values: &PackedValues<<A as Entry<A>>::Value>,
        j0: usize,
        o: &mut [A],
    ) {
        accumulate(self, weights, values, j0, o);
    }

    #[inline(always)]
    fn pack_query_tile(self, rows: ArrayView2<'_, A>, scale: A, out: &mut [[A; MR]])
    where
        A: Entry<A>,
    {
        Tiles::pack_query_tile(self, rows, scale, out);
    }
}
