//! The fused backward pass's block products on AMX tiles, for inputs stored in
//! bf16 ([`crate::kernel::backward`](mod@crate::kernel::backward) runs the softmax, masks and
//! gradients between them in f32).
//!
//! Every product is a tile product `C += A·B` with `A` in rows of bf16 and `B`
//! in rows of pairs (two consecutive entries of a column side by side), so the
//! block's scores and weights never need transposing:
//!
//! | product | `A` | `B` | `C` |
//! |---|---|---|---|
//! | `S = Q·Kᵀ` | queries' rows | keys' panels | scores' rows |
//! | `dP = dO·Vᵀ` | `dO`'s rows | values' panels | `dP`'s rows |
//! | `dQ += dS·K` | `dS`'s rows | keys in pairs of keys | the block's `dQ` |
//! | `dKᵀ += Qᵀ·dS` | `Qᵀ`'s rows | `dS` in pairs of query rows | the part's `dKᵀ` |
//! | `dVᵀ += dOᵀ·P` | `dOᵀ`'s rows | `P` in pairs of query rows | the part's `dVᵀ` |
//!
//! and, when the forward runs again, `O += P·V` (`P`'s rows, values in pairs of
//! keys). `dKᵀ` and `dVᵀ` are transposed into the part's `dK` and `dV` once, at
//! its end.
//!
//! Accuracy: the inputs are bf16 values (exact in a tile), the weights `P` and
//! their gradients `dS` are rounded to bf16 for the products that take them
//! (each by at most 2⁻⁹ of itself, as PyTorch's CPU kernel does), and every
//! sum is f32. `dS = P ∘ (dP − D)` itself is computed from the f32 `P` and
//! `dP`.

use std::ops::Range;

use half::bf16;
use ndarray::ArrayView2;

use super::block::STEP;
use super::{Amx, NR};
use crate::flex::program::Program;
use crate::kernel::arch::{KernelArch, Op, Token};
use crate::kernel::backward::{
    self, HeadInputs, HeadRest, HeadTargets, Part, Pass, Products, RowScratch, Upstream,
};
use crate::kernel::pack::{Bf16Pair, Entry, PackedKeys, PackedValues, Scatter, TilePair};
use crate::kernel::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ};
use crate::kernel::tiled::KeyTiles;

const _: () = assert!(BQ.is_multiple_of(STEP) && BK.is_multiple_of(STEP));

/// One head's keys and values for the tiles: as panels of 16 keys (`B` of the
/// scores and of `dP`), and in pairs of keys (`B` of `dQ += dS·K` and, when
/// the forward runs again, of `O += P·V`).
pub(crate) struct PairPanels {
    keys: PackedKeys<TilePair>,
    values: PackedKeys<TilePair>,
    key_pairs: PackedValues<Bf16Pair>,
    value_pairs: Option<PackedValues<Bf16Pair>>,
}

impl PairPanels {
    /// Packs `k: (S, d)` and `v: (S, d_v)`, bf16 values widened to f32 (so
    /// narrowed back exactly).
    fn pack(k: ArrayView2<'_, f32>, v: ArrayView2<'_, f32>, forward: bool) -> Self {
        let (k, v) = (k.mapv(bf16::from_f32), v.mapv(bf16::from_f32));
        let (k, v) = (k.view(), v.view());
        PairPanels {
            keys: PackedKeys::pack_pairs::<NR>(&k, Scatter, Vec::new()).0,
            values: PackedKeys::pack_pairs::<NR>(&v, Scatter, Vec::new()).0,
            key_pairs: PackedValues::pack_key_pairs::<NR>(&k, Vec::new()).0,
            value_pairs: forward.then(|| PackedValues::pack_key_pairs::<NR>(&v, Vec::new()).0),
        }
    }
}

/// A thread's working memory for query blocks on the tiles: their rows, and
/// their operands for the tiles.
pub(crate) struct PairScratch {
    rows: RowScratch<f32>,
    tiles: BlockTiles,
}

/// One query block's operands for the tiles, and the sums kept across blocks.
struct BlockTiles {
    /// The block's queries and `dO` as rows of pairs (`A` of the scores and
    /// of `dP`), `BQ × depth`.
    q: Vec<TilePair>,
    d_out: Vec<TilePair>,
    /// `Qᵀ` and `dOᵀ` in bf16, one row of `BQ` queries per component, rows to
    /// a whole tile.
    q_t: Vec<bf16>,
    d_out_t: Vec<bf16>,
    /// A key block's weights in rows (the forward's `P·V`) and in pairs of
    /// query rows, `BQ × BK`.
    p_rows: Vec<bf16>,
    p_pairs: Vec<Bf16Pair>,
    /// Its `dS` likewise.
    ds_rows: Vec<bf16>,
    ds_pairs: Vec<Bf16Pair>,
    /// The block's `dQ` (unscaled) and `P·V`, in rows of whole tiles.
    dq: Vec<f32>,
    o: Vec<f32>,
    /// The part's `dKᵀ` (unscaled) and `dVᵀ`, in rows of the keys to a whole
    /// panel.
    dk_t: Vec<f32>,
    dv_t: Vec<f32>,
}

/// The widths the scratch is cut to: the depths of queries and values in
/// pairs, and their components to whole tiles of 16 columns.
#[derive(Clone, Copy)]
struct Widths {
    depth: usize,
    value_depth: usize,
    d: usize,
    d_v: usize,
    d_tiles: usize,
    d_v_tiles: usize,
}

impl Widths {
    fn of(d: usize, d_v: usize) -> Self {
        Widths {
            depth: TilePair::depth(d),
            value_depth: TilePair::depth(d_v),
            d,
            d_v,
            d_tiles: d.div_ceil(NR),
            d_v_tiles: d_v.div_ceil(NR),
        }
    }
}

impl PairScratch {
    fn new(d: usize, d_v: usize) -> Self {
        let w = Widths::of(d, d_v);
        let tiles = BlockTiles {
            q: vec![TilePair::zero(); BQ * w.depth],
            d_out: vec![TilePair::zero(); BQ * w.value_depth],
            q_t: vec![bf16::ZERO; w.d_tiles * NR * BQ],
            d_out_t: vec![bf16::ZERO; w.d_v_tiles * NR * BQ],
            p_rows: vec![bf16::ZERO; BQ * BK],
            p_pairs: vec![Bf16Pair(0); BQ / 2 * BK],
            ds_rows: vec![bf16::ZERO; BQ * BK],
            ds_pairs: vec![Bf16Pair(0); BQ / 2 * BK],
            dq: vec![0.0; BQ * w.d_tiles * NR],
            o: vec![0.0; BQ * w.d_v_tiles * NR],
            dk_t: Vec::new(),
            dv_t: Vec::new(),
        };
        PairScratch {
            rows: RowScratch::new(d_v),
            tiles,
        }
    }
}

/// The backward of bf16 inputs (widened to f32) on AMX tiles.
impl Pass<f32> for Amx {
    type Panels = Option<PairPanels>;
    type Scratch = PairScratch;

    fn kind(self) -> KernelArch {
        KernelArch::Amx
    }

    fn panels(self) -> Option<PairPanels> {
        None
    }

    fn scratch(self, d: usize, d_v: usize) -> PairScratch {
        PairScratch::new(d, d_v)
    }

    fn pack(
        self,
        panels: &mut Option<PairPanels>,
        k: ArrayView2<'_, f32>,
        v: ArrayView2<'_, f32>,
        forward: bool,
    ) {
        *panels = Some(PairPanels::pack(k, v, forward));
    }

    fn head<P: Program<f32>>(
        self,
        inputs: &HeadInputs<'_, '_, f32, P>,
        upstream: Upstream<'_, f32>,
        (panels, scratch): (&Option<PairPanels>, &mut PairScratch),
        part: Part,
        out: HeadTargets<'_, f32>,
    ) -> Option<HeadRest<f32>> {
        let head = panels.as_ref().expect("a head is packed before it runs");
        self.vectorize::<f32, TilePair, _, NR>(PairBackwardHead {
            amx: self,
            inputs,
            upstream,
            head,
            scratch,
            part,
            out,
        })
    }
}

/// [`backward::head`] on the tiles' products.
struct PairBackwardHead<'r, 'h, 'p, 'u, 'g, P> {
    amx: Amx,
    inputs: &'r HeadInputs<'h, 'p, f32, P>,
    upstream: Upstream<'u, f32>,
    head: &'r PairPanels,
    scratch: &'r mut PairScratch,
    part: Part,
    out: HeadTargets<'g, f32>,
}

impl<P: Program<f32>> Op<f32, TilePair> for PairBackwardHead<'_, '_, '_, '_, '_, P> {
    type Output = Option<HeadRest<f32>>;

    #[inline(always)]
    fn run<T: Token<f32, N> + KeyTiles<f32, TilePair, N>, const N: usize>(
        self,
        token: T,
    ) -> Option<HeadRest<f32>> {
        let (d, d_v) = (self.inputs.q.ncols(), self.inputs.v.ncols());
        let keys = self.inputs.k.nrows().next_multiple_of(NR);
        let w = Widths::of(d, d_v);
        let PairScratch { rows, tiles } = self.scratch;
        for (sums, width) in [(&mut tiles.dk_t, w.d_tiles), (&mut tiles.dv_t, w.d_v_tiles)] {
            sums.clear();
            sums.resize(width * NR * keys, 0.0);
        }
        let mut products = PairProducts {
            amx: self.amx,
            head: self.head,
            block: tiles,
            w,
            rows: 0,
            keys,
            scale: self.inputs.scale,
        };
        backward::head::<f32, T::MulAdd, T, P, _, N>(
            token,
            self.inputs,
            self.upstream,
            (&mut products, rows),
            self.part,
            self.out,
        )
    }
}

/// The block products on the tiles, over `head` and the block in `block`.
struct PairProducts<'a> {
    amx: Amx,
    head: &'a PairPanels,
    block: &'a mut BlockTiles,
    w: Widths,
    /// The block's rows, the head's keys to a whole panel, and the scale.
    rows: usize,
    keys: usize,
    scale: f32,
}

impl Products<f32> for PairProducts<'_> {
    #[inline(always)]
    fn block(&mut self, q: ArrayView2<'_, f32>, _: f32, d_out: &[f32]) {
        let (rows, w) = (q.nrows(), self.w);
        self.rows = rows;
        let block = &mut *self.block;
        let amx = self.amx;
        amx.narrow_block(q, w.depth, &mut block.q);
        let d_out = ArrayView2::from_shape((rows, w.d_v), d_out).expect("rows of d_v");
        amx.narrow_block(d_out, w.value_depth, &mut block.d_out);
        transpose_pairs(&block.q, (rows, w.d), &mut block.q_t);
        transpose_pairs(&block.d_out, (rows, w.d_v), &mut block.d_out_t);
        block.dq.fill(0.0);
    }

    #[inline(always)]
    fn scores(&mut self, keys: Range<usize>, s: &mut [f32]) {
        let (rows, n) = (self.rows, keys.len());
        let (q, panels) = (&self.block.q, &self.head.keys);
        self.amx
            .panel_product((q, rows), (panels, keys.start / NR, n), (s, BK));
        for row in s.chunks_exact_mut(BK).take(rows) {
            for x in &mut row[..n] {
                *x *= self.scale;
            }
        }
    }

    #[inline(always)]
    fn weighted_values(&mut self, p: &[f32], keys: Range<usize>, o: &mut [f32]) {
        let (w, rows, n) = (self.w, self.rows, keys.len());
        let values = self
            .head
            .value_pairs
            .as_ref()
            .expect("packed for the forward");
        let block = &mut *self.block;
        self.amx.narrow_rows((p, BK), rows, n, &mut block.p_rows);
        block.o.fill(0.0);
        let a = (&block.p_rows[..], rows);
        self.amx
            .key_pair_product(a, (values, keys.start, n), &mut block.o);
        let width = w.d_v_tiles * NR;
        for (o, sums) in o
            .chunks_exact_mut(w.d_v)
            .zip(block.o.chunks_exact(width))
            .take(rows)
        {
            for (o, &x) in o.iter_mut().zip(sums) {
                *o += x;
            }
        }
    }

    #[inline(always)]
    fn value_gradient(&mut self, p: &[f32], keys: Range<usize>, _: &mut [f32]) {
        let (rows, n) = (self.rows, keys.len());
        let block = &mut *self.block;
        self.amx.pair_rows((p, BK), rows, n, &mut block.p_pairs);
        let a = (&block.d_out_t[..], self.w.d_v_tiles);
        let c = (&mut block.dv_t[..], self.keys, keys.start);
        self.amx.transposed_product(a, (&block.p_pairs, rows, n), c);
    }

    #[inline(always)]
    fn weight_gradient(&mut self, keys: Range<usize>, dp: &mut [f32]) {
        let (d_out, panels) = (&self.block.d_out, &self.head.values);
        let b = (panels, keys.start / NR, keys.len());
        self.amx.panel_product((d_out, self.rows), b, (dp, BK));
    }

    #[inline(always)]
    fn input_gradients(&mut self, ds: &[f32], keys: Range<usize>, _: &mut [f32], _: &mut [f32]) {
        let (w, rows, n) = (self.w, self.rows, keys.len());
        let block = &mut *self.block;
        self.amx.narrow_rows((ds, BK), rows, n, &mut block.ds_rows);
        self.amx.pair_rows((ds, BK), rows, n, &mut block.ds_pairs);
        // dQ += dS·K
        let b = (&self.head.key_pairs, keys.start, n);
        self.amx
            .key_pair_product((&block.ds_rows, rows), b, &mut block.dq);
        // dKᵀ += Qᵀ·dS
        let a = (&block.q_t[..], w.d_tiles);
        let c = (&mut block.dk_t[..], self.keys, keys.start);
        self.amx
            .transposed_product(a, (&block.ds_pairs, rows, n), c);
    }

    #[inline(always)]
    fn end_block(&mut self, dq: &mut [f32]) {
        let (d, width) = (self.w.d, self.w.d_tiles * NR);
        let sums = self.block.dq.chunks_exact(width);
        for (dq, sums) in dq.chunks_exact_mut(d).zip(sums) {
            for (x, &s) in dq.iter_mut().zip(sums) {
                *x += s;
            }
        }
    }

    #[inline(always)]
    fn end_part(&mut self, dk: &mut [f32], dv: &mut [f32]) {
        let (w, keys, scale) = (self.w, self.keys, self.scale);
        let block = &*self.block;
        add_transposed(dk, w.d, &block.dk_t, keys, scale);
        add_transposed(dv, w.d_v, &block.dv_t, keys, 1.0);
    }
}

/// `x[j][c] += factor·t[c][j]` for the rows `j` of `x` (rows of `width`),
/// `t` in rows of `keys`.
#[inline(always)]
fn add_transposed(x: &mut [f32], width: usize, t: &[f32], keys: usize, factor: f32) {
    for (j, row) in x.chunks_exact_mut(width).enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            *x += factor * t[c * keys + j];
        }
    }
}

/// `rows` rows of `width` components packed as rows of pairs (`x`, whole
/// steps a row) transposed into `out`: row `c` of `out` (`BQ` entries) holds
/// component `c` of every row, zero past the rows.
#[inline(always)]
fn transpose_pairs(x: &[TilePair], (rows, width): (usize, usize), out: &mut [bf16]) {
    let depth = TilePair::depth(width);
    for (i, row) in x.chunks_exact(depth).take(rows).enumerate() {
        for (c, pair) in row.iter().take(width.div_ceil(2)).enumerate() {
            let TilePair(Bf16Pair(bits)) = *pair;
            out[2 * c * BQ + i] = bf16::from_bits(bits as u16);
            if 2 * c + 1 < width {
                out[(2 * c + 1) * BQ + i] = bf16::from_bits((bits >> 16) as u16);
            }
        }
    }
    for row in out.chunks_exact_mut(BQ).take(width) {
        row[rows..].fill(bf16::ZERO);
    }
}
