//! One query head of the fused backward pass: the two passes over the key
//! blocks of each block of its queries, around the block products.

use ndarray::{Array2, ArrayViewMut2, s};

use super::{HeadInputs, Kept, Products};
use crate::core::backward::add_bias_gradient;
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::blocks::BlockClass;
use crate::flex::program::{Program, Row};
use crate::kernel::float::{KernelFloat, MulAdd};
use crate::kernel::online::{inverse_total, softmax_update};
use crate::kernel::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ, SOFTMAX_LANES};
use crate::kernel::tiled::Tiles;

/// What one query head attends over.
pub(super) struct Head<'h, 'p, A, P, const NR: usize> {
    masks: &'h [Mask2<'p, A>],
    scoring: Scoring<'h, P>,
    /// The number of queries `L` and keys `S` of the head, and the widths.
    l: usize,
    s: usize,
    d_v: usize,
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

/// One block of query rows.
pub(super) struct Queries {
    /// Index of the block's first row among the head's queries, and its rows.
    pub(super) first: usize,
    pub(super) rows: usize,
}

/// Working memory for one query block's rows, reused across blocks.
pub(crate) struct RowScratch<A> {
    /// Scores, then weights, of one key block: `BQ × BK`.
    p: Array2<A>,
    /// The raw scores `Q·Kᵀ·scale` of one key block, before a score
    /// modification (kept only under one): `BQ × BK`.
    raw: Array2<A>,
    /// `dP`, then `dS`, of one key block: `BQ × BK`.
    ds: Array2<A>,
    /// The block's outputs, `BQ × d_v`.
    o: Array2<A>,
    /// Each row's log-sum-exp and `D = rowsum(dO ∘ O)`.
    lse: Vec<A>,
    d: Vec<A>,
}

impl<A: KernelFloat> RowScratch<A> {
    pub(crate) fn new(d_v: usize) -> Self {
        RowScratch {
            p: Array2::zeros((BQ, BK)),
            raw: Array2::zeros((BQ, BK)),
            ds: Array2::zeros((BQ, BK)),
            o: Array2::zeros((BQ, d_v)),
            lse: vec![A::zero(); BQ],
            d: vec![A::zero(); BQ],
        }
    }
}

impl<'h, 'p, A: KernelFloat, P: Program<A>, const NR: usize> Head<'h, 'p, A, P, NR> {
    /// The head of `inputs`.
    pub(super) fn of(inputs: &HeadInputs<'h, 'p, A, P>) -> Self {
        Head {
            masks: inputs.masks,
            scoring: inputs.scoring,
            l: inputs.q.nrows(),
            s: inputs.k.nrows(),
            d_v: inputs.v.ncols(),
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
    fn scores<B: Products<A>>(
        &self,
        products: &mut B,
        queries: &Queries,
        (keys, class): (&std::ops::Range<usize>, BlockClass),
        scratch: &mut RowScratch<A>,
    ) -> bool {
        let c = scratch.p.as_slice_mut().expect("standard layout");
        products.scores(keys.clone(), c);
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

    /// One query block, its queries and `dO` (`d_out`, rows of `d_v`) packed
    /// into `products`: the forward's log-sum-exp and output (kept, or
    /// computed again), then the gradients; `dq` is the block's rows of `dQ`
    /// (unscaled), `dk` and `dv` the head's, accumulated.
    #[inline(always)]
    pub(super) fn query_block<M: MulAdd, T: Tiles<A, NR>, B: Products<A>>(
        &self,
        tiles: T,
        products: &mut B,
        queries: &Queries,
        (d_out, saved): (&[A], Option<Kept<'_, A>>),
        scratch: &mut RowScratch<A>,
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
        let (rows, d_v) = (queries.rows, self.d_v);
        match saved {
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
                if !self.forward::<M, B>(products, queries, scratch) {
                    return false;
                }
            }
        }
        // D = rowsum(dO ∘ O)
        for (i, d) in scratch.d.iter_mut().take(rows).enumerate() {
            *d = d_out[i * d_v..][..d_v]
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
        let dq = dq.as_slice_mut().expect("rows of a standard-layout array");
        let dk = dk.as_slice_mut().expect("standard layout");
        let dv = dv.as_slice_mut().expect("standard layout");
        for (keys, class) in self.key_blocks(queries) {
            let n = keys.len();
            if !self.scores(products, queries, (&keys, class), scratch) {
                return false;
            }
            let p = scratch.p.as_slice_mut().expect("standard layout");
            // P = exp(S − lse) with the token's exp (the sums are not needed)
            for (row, &lse) in p.chunks_exact_mut(BK).zip(&scratch.lse).take(rows) {
                tiles.exp_and_sum::<M>(&mut row[..n], lse);
            }
            products.value_gradient(p, keys.clone(), dv);
            // dP = dO·Vᵀ, then dS = P ∘ (dP − D)
            let ds = scratch.ds.as_slice_mut().expect("standard layout");
            products.weight_gradient(keys.clone(), ds);
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
            products.input_gradients(ds, keys, dq, dk);
        }
        products.end_block(dq);
        true
    }

    /// The forward pass of one query block: each row's output and log-sum-exp
    /// (`+∞` for a row that sees no key, so that every weight of the backward is 0),
    /// into `scratch`; `false` when the program made a score NaN or `+∞`.
    #[inline(always)]
    fn forward<M: MulAdd, B: Products<A>>(
        &self,
        products: &mut B,
        queries: &Queries,
        scratch: &mut RowScratch<A>,
    ) -> bool {
        let rows = queries.rows;
        // a sink starts every row's softmax: exp(sink − sink) = 1 in the sum
        let sink = self.scoring.sink();
        let mut max = [sink.unwrap_or(A::neg_infinity()); BQ];
        let mut sum = [if sink.is_some() { A::one() } else { A::zero() }; BQ];
        scratch.o.fill(A::zero());
        for (keys, class) in self.key_blocks(queries) {
            let n = keys.len();
            if !self.scores(products, queries, (&keys, class), scratch) {
                return false;
            }
            let p = scratch.p.as_slice_mut().expect("standard layout");
            for (i, row) in p.chunks_exact_mut(BK).take(rows).enumerate() {
                let alpha =
                    softmax_update::<A, M, SOFTMAX_LANES>(&mut row[..n], &mut max[i], &mut sum[i]);
                scratch.o.row_mut(i).mapv_inplace(|x| x * alpha);
            }
            let o = scratch.o.as_slice_mut().expect("standard layout");
            products.weighted_values(p, keys, o);
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
