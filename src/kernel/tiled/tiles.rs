//! The tiled kernel's micro-kernels, which a token implements ([`Tiles`],
//! [`KeyTiles`]), and a block's products by default, tile by tile with them.

use std::ops::Range;

use half::bf16;
use ndarray::{ArrayView2, Axis};

use crate::kernel::float::{KernelFloat, MulAdd};
use crate::kernel::online::{exp_and_sum, fold_step, rescale, row_max};
use crate::kernel::pack::{
    Entry, PackPairPanel, PackPanel, PackedKeys, PackedValues, Pair, scatter_pairs,
};
use crate::kernel::params::{BC, BR, MR};

/// Packs a block's queries (times the scale, where the entries hold it) as
/// `tile_rows × depth × MR` entries, tile by tile with the token's
/// [`KeyTiles::pack_query_tile`].
#[inline(always)]
fn pack_queries<A, K, T, const NR: usize>(
    tiles: T,
    block: ArrayView2<'_, K::Query>,
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
    rows: ArrayView2<'_, K::Query>,
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

/// `O = α·O + P·V` for keys `j0 .. j0 + keys`, tile by tile of `MR` rows, over
/// values stored as `V` (`T::KEYS` keys a step).
#[inline(always)]
pub(crate) fn accumulate<A: KernelFloat, V, T: ValueTiles<A, V, NR>, const NR: usize>(
    tiles: T,
    weights: Weights<'_, A>,
    values: &PackedValues<V>,
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
        let first = ct * values.s + j0 / T::KEYS;
        let v_block = &v_rows[first..first + keys.div_ceil(T::KEYS)];
        for t in 0..tile_rows {
            let rows: [&[A; BC]; MR] = std::array::from_fn(|i| &p_rows[t * MR + i]);
            let first = ct * BR + t * MR;
            let o_tile: &mut [[A; NR]; MR] = (&mut o_tiles[first..first + MR])
                .try_into()
                .expect("an output tile holds MR rows");
            let alpha: &[A; MR] = alpha[t * MR..(t + 1) * MR]
                .try_into()
                .expect("MR factors per tile");
            tiles.values_tile(&rows, v_block, alpha, o_tile);
        }
    }
}

/// The value micro-kernel over values stored as `V`: the element itself (every
/// [`Tiles`], by [`Tiles::value_tile`]), or pairs of two keys' values where a
/// token multiplies pairs (AVX512_BF16).
pub(crate) trait ValueTiles<A, V, const NR: usize>: Copy {
    /// Keys whose values one step of `V` holds.
    const KEYS: usize;

    /// `O = α·O + P·V` on one tile: `p` holds `MR` rows of weights, `v` one
    /// step of `NR` values per `KEYS` keys.
    fn values_tile(self, p: &[&[A; BC]; MR], v: &[[V; NR]], alpha: &[A; MR], o: &mut [[A; NR]; MR]);
}

impl<A: Copy, T: Tiles<A, NR>, const NR: usize> ValueTiles<A, A, NR> for T {
    const KEYS: usize = 1;

    #[inline(always)]
    fn values_tile(
        self,
        p: &[&[A; BC]; MR],
        v: &[[A; NR]],
        alpha: &[A; MR],
        o: &mut [[A; NR]; MR],
    ) {
        self.value_tile(p, v, alpha, o)
    }
}

/// The two register-blocked micro-kernels, `MR × NR` tiles kept in registers;
/// implemented in [`crate::kernel::arch`] by a value that proves its instructions run.
pub(crate) trait Tiles<A: Copy, const NR: usize>: PackPanel<A, NR> {
    /// A tile of `S = Q·Kᵀ`: `q` holds the `d` columns of `MR` queries, `k` the `d`
    /// components of `NR` keys. Only the first `rows` rows are asked for: the
    /// others may be left zero, and each row's bits are the same for every
    /// `rows` that includes it.
    fn score_tile(self, q: &[[A; MR]], k: &[[A; NR]], rows: usize) -> [[A; NR]; MR];
    /// `C (=|+=) A·B` on one tile of `rows ≤ MR` rows, for the backward's
    /// and the layers' products: `A(i, p) = a[i·LINE + p·STEP]` (packed lines,
    /// `LINE = 1, STEP = MR`; or a matrix's rows or columns where it lies),
    /// `b` one step of `NR` columns per step of the sum, `c` the tile's rows
    /// `stride` apart (their first `NR` entries; `add`: added to). Each entry
    /// has the bits of [`score_tile`](Self::score_tile) on the lines packed,
    /// whatever `rows`; no line past `rows` is read.
    ///
    /// # Panics
    ///
    /// If `a` or `c` is too short for the tile.
    fn product_tile<const LINE: usize, const STEP: usize>(
        self,
        a: &[A],
        b: &[[A; NR]],
        rows: usize,
        c: &mut [A],
        stride: usize,
        add: bool,
    );
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
        A: Entry<A, Query = A>,
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
        softmax_rows::<A, M, Self, NR>(self, s, width, 0..rows, scale, state);
    }
}

/// [`Tiles::block_softmax`] row by row for the rows `rows` of the block, with
/// the token's own maximum and `exp`.
#[inline(always)]
pub(crate) fn softmax_rows<A: KernelFloat, M: MulAdd, T: Tiles<A, NR>, const NR: usize>(
    tiles: T,
    s: &mut [A],
    width: usize,
    rows: Range<usize>,
    scale: Option<A>,
    state: RowStates<'_, A>,
) {
    for (i, row) in s
        .chunks_exact_mut(BC)
        .enumerate()
        .take(rows.end)
        .skip(rows.start)
    {
        let row = &mut row[..width];
        if let Some(scale) = scale {
            row.iter_mut().for_each(|x| *x *= scale);
        }
        let step = rescale::<A, M>(state.max[i], tiles.row_max(row));
        let block_sum = tiles.exp_and_sum::<M>(row, step.shift);
        state.alpha[i] = fold_step(step, block_sum, &mut state.max[i], &mut state.sum[i]);
    }
}

/// A token's [`KeyTiles::pack_pair_panel`] as the packer of a head's keys.
#[derive(Clone, Copy)]
pub(crate) struct PairsBy<T>(pub(crate) T);

impl<K: Pair, T: KeyTiles<f32, K, NR>, const NR: usize> PackPairPanel<K, NR> for PairsBy<T> {
    #[inline(always)]
    fn pack_pair_panel(self, keys: &[bf16], d: usize, lines: usize, out: &mut [[K; NR]]) {
        self.0.pack_pair_panel(keys, d, lines, out);
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

    /// [`PackPairPanel::pack_pair_panel`] for keys stored in bf16 packed as
    /// pairs `K`: one pair at a time unless the token transposes them.
    #[inline(always)]
    fn pack_pair_panel(self, keys: &[bf16], d: usize, lines: usize, out: &mut [[K; NR]])
    where
        K: Pair,
    {
        scatter_pairs(keys, d, lines, out);
    }

    /// Packs a block's queries `q: (rows ≤ BR, d)` as stored, `depth` entries each, into
    /// `out` (`BR · depth` entries), times `scale` where the entries hold it.
    #[inline(always)]
    fn pack_block_queries(self, q: ArrayView2<'_, K::Query>, scale: A, depth: usize, out: &mut [K])
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
    fn pack_query_tile(self, rows: ArrayView2<'_, K::Query>, scale: A, out: &mut [[K; MR]])
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
    fn pack_query_tile(
        self,
        rows: ArrayView2<'_, <A as Entry<A>>::Query>,
        scale: A,
        out: &mut [[A; MR]],
    ) {
        Tiles::pack_query_tile(self, rows, scale, out);
    }
}
