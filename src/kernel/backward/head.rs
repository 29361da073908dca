//! One query head of the fused backward pass: its keys and values packed, and
//! the two passes over the key blocks of each block of its queries.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, CowArray, Ix2, s};

use super::{HeadInputs, Upstream};
use crate::core::backward::add_bias_gradient;
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::blocks::BlockClass;
use crate::flex::program::{Program, Row};
use crate::kernel::float::{KernelFloat, MulAdd};
use crate::kernel::gemm::{RowTiles, Target, product};
use crate::kernel::online::{inverse_total, softmax_update};
use crate::kernel::pack::Panels;
use crate::kernel::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ, MR, SOFTMAX_LANES};
use crate::kernel::tiled::Tiles;

/// One head's keys and values packed for the products: `Kᵀ` and `Vᵀ` in
/// panels of `NR` keys (for `S = Q·Kᵀ`, `dP = dO·Vᵀ`), and `K` and `V` in
/// panels of `NR` columns (for `dQ = dS·K` and, when the forward runs again,
/// `O = P·V`). Packed once per head, shared by its parts.
pub(crate) struct HeadPanels<A> {
    keys_t: Panels<A>,
    values_t: Panels<A>,
    keys: Panels<A>,
    values: Panels<A>,
}

impl<A: KernelFloat> HeadPanels<A> {
    /// Empty panels, `nr` wide, to [`repack`](Self::repack) head after head.
    pub(crate) fn new(nr: usize) -> Self {
        HeadPanels {
            keys_t: Panels::new(nr),
            values_t: Panels::new(nr),
            keys: Panels::new(nr),
            values: Panels::new(nr),
        }
    }

    /// How many keys or columns a panel holds.
    pub(crate) fn width(&self) -> usize {
        self.keys_t.width
    }

    /// Packs `k: (S, d)` and `v: (S, d_v)` for `tiles`, `NR` wide (`V` by
    /// columns only when the forward runs again), in the memory of the head
    /// packed before.
    #[inline(always)]
    pub(crate) fn repack<T: Tiles<A, NR>, const NR: usize>(
        &mut self,
        tiles: T,
        k: ArrayView2<'_, A>,
        v: ArrayView2<'_, A>,
        forward: bool,
    ) {
        let ((s, d), d_v) = (k.dim(), v.ncols());
        let (k, v) = (standard(k), standard(v));
        let (k, v) = (
            k.as_slice().expect("standard layout"),
            v.as_slice().expect("standard layout"),
        );
        self.keys_t.pack_lines_by::<NR>(tiles, k, d, s, d);
        self.values_t.pack_lines_by::<NR>(tiles, v, d_v, s, d_v);
        self.keys.pack_steps::<NR>(k, d, d, s);
        if forward {
            self.values.pack_steps::<NR>(v, d_v, d_v, s);
        }
    }
}

/// What one query head attends over, its keys and values packed for the
/// products.
pub(super) struct Head<'h, 'p, A, P, const NR: usize> {
    masks: &'h [Mask2<'p, A>],
    scoring: Scoring<'h, P>,
    /// The number of queries `L` and keys `S` of the head, and the widths.
    l: usize,
    s: usize,
    d: usize,
    d_v: usize,
    panels: &'h HeadPanels<A>,
}

/// Where one query block's gradients go: its rows of `dQ`, the head's `dK`, `dV`,
/// parts of the bias gradients and the program's.
pub(super) struct BlockGradients<'g, A> {
    pub(super) dq: ArrayViewMut2<'g, A>,
    pub(super) dk: ArrayViewMut2<'g, A>,
    pub(super) dv: ArrayViewMut2<'g, A>,
    pub(super) bias: &'g mut [Array2<A>],
    pub(super) score: &'g mut [A],
    pub(super) sink: &'g mut A,
}

/// One block of query rows, times the scale (packed into the scratch's panels).
pub(super) struct Queries {
    /// Index of the block's first row among the head's queries, and its rows.
    first: usize,
    rows: usize,
}

impl Queries {
    /// Rows `rows` of the head's queries times the scale, packed as the left
    /// operand of `S = Q·Kᵀ` and the right one of `dK = dSᵀ·Q`.
    #[inline(always)]
    pub(super) fn of<A: KernelFloat, P, T: Tiles<A, NR>, const NR: usize>(
        tiles: T,
        inputs: &HeadInputs<'_, '_, A, P>,
        rows: std::ops::Range<usize>,
        scratch: &mut BlockScratch<A>,
    ) -> Self {
        let d = inputs.q.ncols();
        // row by row whatever the view's strides (`mapv` would keep a
        // column-major view's order)
        let q: Vec<A> = inputs
            .q
            .slice(s![rows.clone(), ..])
            .iter()
            .map(|&x| x * inputs.scale)
            .collect();
        let q = &q[..];
        let rows_by = RowTiles::<T, NR>(tiles);
        scratch
            .q_rows
            .pack_lines_by::<MR>(rows_by, q, d, rows.len(), d);
        scratch.q_cols.pack_steps::<NR>(q, d, d, rows.len());
        Queries {
            first: rows.start,
            rows: rows.len(),
        }
    }
}

/// Working memory for one query block, reused across blocks.
pub(crate) struct BlockScratch<A> {
    /// Scores, then weights, of one key block: `BQ × BK`.
    p: Array2<A>,
    /// The raw scores `Q·Kᵀ·scale` of one key block, before a score
    /// modification (kept only under one): `BQ × BK`.
    raw: Array2<A>,
    /// `dP`, then `dS`, of one key block: `BQ × BK`.
    ds: Array2<A>,
    /// The block's outputs, `BQ × d_v`.
    pub(super) o: Array2<A>,
    /// Each row's log-sum-exp and `D = rowsum(dO ∘ O)`.
    pub(super) lse: Vec<A>,
    d: Vec<A>,
    /// The block's scaled queries and `dO` as left and right operands.
    q_rows: Panels<A>,
    q_cols: Panels<A>,
    d_out_rows: Panels<A>,
    d_out_cols: Panels<A>,
    /// `P` (forward), `Pᵀ`, `dS` and `dSᵀ` of one key block as left operands.
    p_rows: Panels<A>,
    p_t: Panels<A>,
    ds_rows: Panels<A>,
    ds_t: Panels<A>,
}

impl<A: KernelFloat> BlockScratch<A> {
    pub(crate) fn new(d_v: usize, nr: usize) -> Self {
        BlockScratch {
            p: Array2::zeros((BQ, BK)),
            raw: Array2::zeros((BQ, BK)),
            ds: Array2::zeros((BQ, BK)),
            o: Array2::zeros((BQ, d_v)),
            lse: vec![A::zero(); BQ],
            d: vec![A::zero(); BQ],
            q_rows: Panels::new(MR),
            q_cols: Panels::new(nr),
            d_out_rows: Panels::new(MR),
            d_out_cols: Panels::new(nr),
            p_rows: Panels::new(MR),
            p_t: Panels::new(MR),
            ds_rows: Panels::new(MR),
            ds_t: Panels::new(MR),
        }
    }
}

/// A standard-layout copy of `x` where it is not one already.
fn standard<A: Clone>(x: ArrayView2<'_, A>) -> CowArray<'_, A, Ix2> {
    if x.is_standard_layout() {
        CowArray::from(x)
    } else {
        CowArray::from(x.as_standard_layout().into_owned())
    }
}

impl<'h, 'p, A: KernelFloat, P: Program<A>, const NR: usize> Head<'h, 'p, A, P, NR> {
    /// The head, over its keys and values packed as `panels`.
    pub(super) fn of(inputs: &HeadInputs<'h, 'p, A, P>, panels: &'h HeadPanels<A>) -> Self {
        Head {
            masks: inputs.masks,
            scoring: inputs.scoring,
            l: inputs.q.nrows(),
            s: inputs.k.nrows(),
            d: inputs.k.ncols(),
            d_v: inputs.v.ncols(),
            panels,
        }
    }

    /// The keys any row of the block may see, cut into key blocks (the first
    /// starting at a multiple of `NR`, so that each starts a panel of keys),
    /// with their class under the program; empty blocks are left out.
    #[inline(always)]
    fn key_blocks(
        &self,
        queries: &Queries,
    ) -> impl Iterator<Item = (std::ops::Range<usize>, BlockClass)> + use<'_, 'h, 'p, A, P, NR>
    {
        let rows = queries.first..queries.first + queries.rows;
        let reach = self.scoring.reach(self.masks, rows.clone(), self.l, self.s);
        let (start, end) = (reach.start / NR * NR, reach.end);
        let Scoring { program, b, h } = self.scoring;
        (start..end)
            .step_by(BK)
            .map(move |j| j..(j + BK).min(end))
            .map(move |keys| (keys.clone(), program.class(b, h, rows.clone(), keys)))
            .filter(|&(_, class)| class != BlockClass::Empty)
    }

    /// `S = (Q·scale)·Kᵀ` for keys `keys`, modified and masked, into the first
    /// rows and columns of `scratch.p` (and, under a score modification, the
    /// raw scores into `scratch.raw`); `false` when the modification made an
    /// attended score NaN or `+∞`.
    #[inline(always)]
    fn scores<T: Tiles<A, NR>>(
        &self,
        tiles: T,
        queries: &Queries,
        (keys, class): (&std::ops::Range<usize>, BlockClass),
        scratch: &mut BlockScratch<A>,
    ) -> bool {
        let c = scratch.p.as_slice_mut().expect("standard layout");
        let target = Target {
            c: &mut *c,
            stride: BK,
            add: false,
        };
        product(
            tiles,
            &scratch.q_rows,
            &self.panels.keys_t,
            0..self.d,
            keys.clone(),
            target,
        );
        if !P::IDENTITY {
            let raw = scratch.raw.as_slice_mut().expect("standard layout");
            raw[..queries.rows * BK].copy_from_slice(&c[..queries.rows * BK]);
        }
        let mut finite = true;
        for (i, row) in c.chunks_exact_mut(BK).take(queries.rows).enumerate() {
            finite &= self.scoring.prepare_row(
                self.masks,
                queries.first + i,
                self.l,
                self.s,
                keys.start,
                &mut row[..keys.len()],
                class,
            );
        }
        finite
    }

    /// One query block: the forward's log-sum-exp and output (kept, or computed
    /// again), then the gradients; `dq` is the block's rows of `dQ` (unscaled),
    /// `dk` and `dv` the head's, accumulated.
    #[inline(always)]
    pub(super) fn query_block<M: MulAdd, T: Tiles<A, NR>>(
        &self,
        tiles: T,
        queries: &Queries,
        upstream: Upstream<'_, A>,
        scratch: &mut BlockScratch<A>,
        out: BlockGradients<'_, A>,
    ) -> bool {
        let BlockGradients {
            mut dq,
            mut dk,
            mut dv,
            bias,
            score,
            sink,
        } = out;
        let (rows, d, d_v) = (queries.rows, self.d, self.d_v);
        let d_out = standard(upstream.d_out);
        match upstream.saved {
            Some((o, lse)) => {
                scratch.o.slice_mut(s![..rows, ..]).assign(&o);
                for (x, &y) in scratch.lse.iter_mut().zip(&lse) {
                    // the pass below needs +∞ where no key is seen (weights 0)
                    *x = if y == A::neg_infinity() {
                        A::infinity()
                    } else {
                        y
                    };
                }
            }
            None => {
                if !self.forward::<M, T>(tiles, queries, scratch) {
                    return false;
                }
            }
        }
        // D = rowsum(dO ∘ O)
        for (i, d) in scratch.d.iter_mut().take(rows).enumerate() {
            *d = d_out
                .row(i)
                .iter()
                .zip(scratch.o.row(i))
                .fold(A::zero(), |t, (&g, &o)| t + g * o);
        }
        // the sink's weight exp(σ − lse) and gradient −Σ pσ·D
        if let Some(logit) = self.scoring.sink() {
            for (&lse, &d) in scratch.lse.iter().zip(&scratch.d).take(rows) {
                *sink -= (logit - lse).exp() * d;
            }
        }
        let d_out = d_out.as_slice().expect("standard layout");
        let rows_by = RowTiles::<T, NR>(tiles);
        scratch
            .d_out_rows
            .pack_lines_by::<MR>(rows_by, d_out, d_v, rows, d_v);
        scratch.d_out_cols.pack_steps::<NR>(d_out, d_v, d_v, rows);
        let dq = dq.as_slice_mut().expect("rows of a standard-layout array");
        let dk = dk.as_slice_mut().expect("standard layout");
        let dv = dv.as_slice_mut().expect("standard layout");
        for (keys, class) in self.key_blocks(queries) {
            let n = keys.len();
            if !self.scores(tiles, queries, (&keys, class), scratch) {
                return false;
            }
            let p = scratch.p.as_slice_mut().expect("standard layout");
            // P = exp(S − lse) with the token's exp (the sums are not needed)
            for (row, &lse) in p.chunks_exact_mut(BK).zip(&scratch.lse).take(rows) {
                tiles.exp_and_sum::<M>(&mut row[..n], lse);
            }
            // dV += Pᵀ·dO
            scratch.p_t.pack_steps::<MR>(p, BK, n, rows);
            let target = Target {
                c: &mut dv[keys.start * d_v..],
                stride: d_v,
                add: true,
            };
            product(
                tiles,
                &scratch.p_t,
                &scratch.d_out_cols,
                0..rows,
                0..d_v,
                target,
            );
            // dP = dO·Vᵀ, then dS = P ∘ (dP − D)
            let ds = scratch.ds.as_slice_mut().expect("standard layout");
            let target = Target {
                c: &mut *ds,
                stride: BK,
                add: false,
            };
            product(
                tiles,
                &scratch.d_out_rows,
                &self.panels.values_t,
                0..d_v,
                keys.clone(),
                target,
            );
            let p_rows = p.chunks_exact(BK).zip(&scratch.d);
            for (ds, (p, &d)) in ds.chunks_exact_mut(BK).zip(p_rows).take(rows) {
                for (x, &p) in ds[..n].iter_mut().zip(&p[..n]) {
                    *x = p * (*x - d);
                }
            }
            // dS is the gradient by every bias added to the scores
            let ds_view = scratch.ds.slice(s![..rows, ..n]);
            for target in bias.iter_mut() {
                add_bias_gradient(target.view_mut(), ds_view, queries.first, keys.start);
            }
            // through the score modification: dS by the raw scores
            if !P::IDENTITY {
                let Scoring { program, b, h } = self.scoring;
                let ds = scratch.ds.as_slice_mut().expect("standard layout");
                let raw = scratch.raw.as_slice().expect("standard layout");
                let rows_of = |x: usize| x * BK;
                for i in 0..rows {
                    let (ds, raw) = (&mut ds[rows_of(i)..][..n], &raw[rows_of(i)..][..n]);
                    let row_at = Row {
                        b,
                        h,
                        i: queries.first + i,
                        j0: keys.start,
                    };
                    program.chain_row(row_at, raw, ds, score);
                }
            }
            // dQ += dS·K, dK += dSᵀ·(Q·scale)
            let ds = scratch.ds.as_slice().expect("standard layout");
            let rows_by = RowTiles::<T, NR>(tiles);
            scratch
                .ds_rows
                .pack_lines_by::<MR>(rows_by, ds, BK, rows, n);
            scratch.ds_t.pack_steps::<MR>(ds, BK, n, rows);
            let target = Target {
                c: &mut *dq,
                stride: d,
                add: true,
            };
            product(
                tiles,
                &scratch.ds_rows,
                &self.panels.keys,
                keys.clone(),
                0..d,
                target,
            );
            let target = Target {
                c: &mut dk[keys.start * d..],
                stride: d,
                add: true,
            };
            product(tiles, &scratch.ds_t, &scratch.q_cols, 0..rows, 0..d, target);
        }
        true
    }

    /// The forward pass of one query block: each row's output and log-sum-exp
    /// (`+∞` for a row that sees no key, so that every weight of the backward is 0),
    /// into `scratch`; `false` when the program made a score NaN or `+∞`.
    #[inline(always)]
    pub(super) fn forward<M: MulAdd, T: Tiles<A, NR>>(
        &self,
        tiles: T,
        queries: &Queries,
        scratch: &mut BlockScratch<A>,
    ) -> bool {
        let rows = queries.rows;
        // a sink starts every row's softmax: exp(sink − sink) = 1 in the sum
        let sink = self.scoring.sink();
        let mut max = [sink.unwrap_or(A::neg_infinity()); BQ];
        let mut sum = [if sink.is_some() { A::one() } else { A::zero() }; BQ];
        scratch.o.fill(A::zero());
        for (keys, class) in self.key_blocks(queries) {
            let n = keys.len();
            if !self.scores(tiles, queries, (&keys, class), scratch) {
                return false;
            }
            let p = scratch.p.as_slice_mut().expect("standard layout");
            for (i, row) in p.chunks_exact_mut(BK).take(rows).enumerate() {
                let alpha =
                    softmax_update::<A, M, SOFTMAX_LANES>(&mut row[..n], &mut max[i], &mut sum[i]);
                scratch.o.row_mut(i).mapv_inplace(|x| x * alpha);
            }
            let rows_by = RowTiles::<T, NR>(tiles);
            scratch.p_rows.pack_lines_by::<MR>(rows_by, p, BK, rows, n);
            let target = Target {
                c: scratch.o.as_slice_mut().expect("standard layout"),
                stride: self.d_v,
                add: true,
            };
            product(
                tiles,
                &scratch.p_rows,
                &self.panels.values,
                keys,
                0..self.d_v,
                target,
            );
        }
        for i in 0..rows {
            let inverse = inverse_total(sum[i]);
            scratch.o.row_mut(i).mapv_inplace(|x| x * inverse);
            scratch.lse[i] = if sum[i] > A::zero() {
                max[i] + sum[i].ln()
            } else {
                A::infinity()
            };
        }
        true
    }
}
