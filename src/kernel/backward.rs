//! The fused backward pass (FlashAttention-2's, on a CPU): the gradients of
//! attention without the `L × S` weights, one block of queries and keys at a time.
//!
//! For each query head, each block of [`BACKWARD_QUERIES`] query rows makes two
//! passes over the key blocks of [`BACKWARD_KEYS`] keys its masks leave in reach:
//!
//! 1. the forward again, with an online softmax: each row's log-sum-exp
//!    `lse = m + ln l` and output `O`, hence `D = rowsum(dO ∘ O)`;
//! 2. per key block: `P = exp(S − lse)` (0 where masked), `dV += Pᵀ·dO`,
//!    `dP = dO·Vᵀ`, `dS = P ∘ (dP − D)`, `dQ += dS·K`, `dK += dSᵀ·Q·scale`.
//!
//! Block products are general matrix products on views; the rest is compiled per
//! instruction set in [`super::arch`]. [`super::run::backward`] runs the heads in
//! parallel, each with its own `dK` and `dV`, summed over the query heads of a
//! key/value head in head order, so the result does not depend on the number of
//! threads; heads whose inputs are not finite, or could overflow, take the
//! reference path.
//!
//! [`BACKWARD_QUERIES`]: super::params::BACKWARD_QUERIES
//! [`BACKWARD_KEYS`]: super::params::BACKWARD_KEYS

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis};

use super::float::{KernelFloat, MulAdd};
use super::online::{inverse_total, softmax_update};
use super::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ, SOFTMAX_LANES};
use crate::core::backward::add_bias_gradient;
use crate::core::mask::{apply_row, keys_in_reach, Mask2};

/// One query head's gradients: `dq` for the head, `dk` and `dv` for its
/// key/value head (to be summed with the other query heads of its group).
pub(crate) struct HeadGradients<A> {
    pub(crate) dq: Array2<A>,
    pub(crate) dk: Array2<A>,
    pub(crate) dv: Array2<A>,
    /// This head's part of every bias's gradient, `(L or 1, S or 1)`.
    pub(crate) bias: Vec<Array2<A>>,
}

/// One query head whose inputs the fused pass may take (checked by the caller).
pub(crate) struct HeadInputs<'h, 'p, A> {
    pub(crate) q: ArrayView2<'p, A>,
    pub(crate) k: ArrayView2<'p, A>,
    pub(crate) v: ArrayView2<'p, A>,
    pub(crate) masks: &'h [Mask2<'p, A>],
    pub(crate) scale: A,
    /// The shape of this head's part of every bias's gradient, `(L or 1, S or 1)`.
    pub(crate) bias_shapes: &'h [(usize, usize)],
}

/// What the backward pass needs of the forward: `d_out = ∂loss/∂output`, and
/// the forward's output and log-sum-exp per row when it kept them (else the pass
/// runs the forward again).
#[derive(Clone, Copy)]
pub(crate) struct Upstream<'a, A> {
    pub(crate) d_out: ArrayView2<'a, A>,
    pub(crate) saved: Option<(ArrayView2<'a, A>, ArrayView1<'a, A>)>,
}

/// One query head's output and each row's log-sum-exp (`−∞` for a row that sees
/// no key) by the fused forward of the backward pass.
#[inline(always)]
pub(crate) fn forward_head<A: KernelFloat, M: MulAdd>(
    inputs: &HeadInputs<'_, '_, A>,
) -> (Array2<A>, Array1<A>) {
    let l = inputs.q.nrows();
    let (head, mut scratch) = (Head::of(inputs), BlockScratch::new(inputs.v.ncols()));
    let mut output = Array2::zeros((l, inputs.v.ncols()));
    let mut lse = Array1::zeros(l);
    for (c, mut out) in output.axis_chunks_iter_mut(Axis(0), BQ).enumerate() {
        let rows = c * BQ..c * BQ + out.nrows();
        let q_block = inputs
            .q
            .slice(s![rows.clone(), ..])
            .mapv(|x| x * inputs.scale);
        let queries = Queries {
            first: rows.start,
            q: q_block.view(),
        };
        head.forward::<M>(&queries, &mut scratch);
        out.assign(&scratch.o.slice(s![..rows.len(), ..]));
        for (x, &y) in lse.slice_mut(s![rows]).iter_mut().zip(&scratch.lse) {
            *x = if y == A::infinity() {
                A::neg_infinity()
            } else {
                y
            };
        }
    }
    (output, lse)
}

/// The gradients of one query head by the fused pass; `M` says how `a·b + c` is
/// computed (the caller compiles it for its instruction set).
#[inline(always)]
pub(crate) fn head<A: KernelFloat, M: MulAdd>(
    inputs: &HeadInputs<'_, '_, A>,
    upstream: Upstream<'_, A>,
) -> HeadGradients<A> {
    let (q, k, v) = (inputs.q, inputs.k, inputs.v);
    let mut grads = HeadGradients {
        dq: Array2::zeros(q.raw_dim()),
        dk: Array2::zeros(k.raw_dim()),
        dv: Array2::zeros(v.raw_dim()),
        bias: inputs
            .bias_shapes
            .iter()
            .map(|&s| Array2::zeros(s))
            .collect(),
    };
    let (head, mut scratch) = (Head::of(inputs), BlockScratch::new(v.ncols()));
    let HeadGradients {
        dq: d_q,
        dk,
        dv,
        bias,
    } = &mut grads;
    for (c, dq) in d_q.axis_chunks_iter_mut(Axis(0), BQ).enumerate() {
        let rows = c * BQ..c * BQ + dq.nrows();
        let q_block = q.slice(s![rows.clone(), ..]).mapv(|x| x * inputs.scale);
        let queries = Queries {
            first: rows.start,
            q: q_block.view(),
        };
        let upstream = Upstream {
            d_out: upstream.d_out.slice_move(s![rows.clone(), ..]),
            saved: upstream
                .saved
                .map(|(o, lse)| (o.slice_move(s![rows.clone(), ..]), lse.slice_move(s![rows]))),
        };
        let out = BlockGradients { dq, dk, dv, bias };
        head.query_block::<M>(&queries, upstream, &mut scratch, out);
    }
    grads.dq.mapv_inplace(|x| x * inputs.scale);
    grads
}

/// What one query head attends over.
struct Head<'h, 'p, A> {
    k: ArrayView2<'p, A>,
    v: ArrayView2<'p, A>,
    masks: &'h [Mask2<'p, A>],
    /// The number of queries `L` of the head.
    l: usize,
}

/// Where one query block's gradients go: its rows of `dQ`, the head's `dK`, `dV`
/// and parts of the bias gradients.
struct BlockGradients<'g, A> {
    dq: ArrayViewMut2<'g, A>,
    dk: &'g mut Array2<A>,
    dv: &'g mut Array2<A>,
    bias: &'g mut [Array2<A>],
}

/// One block of query rows, times the scale.
struct Queries<'a, A> {
    /// Index of the block's first row among the head's queries.
    first: usize,
    q: ArrayView2<'a, A>,
}

/// Working memory for one query block, reused across blocks.
struct BlockScratch<A> {
    /// Scores, then weights, of one key block: `BQ × BK`.
    p: Array2<A>,
    /// `dP`, then `dS`, of one key block: `BQ × BK`.
    ds: Array2<A>,
    /// The block's outputs, `BQ × d_v`.
    o: Array2<A>,
    /// Each row's log-sum-exp and `D = rowsum(dO ∘ O)`.
    lse: Vec<A>,
    d: Vec<A>,
}

impl<A: KernelFloat> BlockScratch<A> {
    fn new(d_v: usize) -> Self {
        BlockScratch {
            p: Array2::zeros((BQ, BK)),
            ds: Array2::zeros((BQ, BK)),
            o: Array2::zeros((BQ, d_v)),
            lse: vec![A::zero(); BQ],
            d: vec![A::zero(); BQ],
        }
    }
}

impl<'h, 'p, A: KernelFloat> Head<'h, 'p, A> {
    fn of(inputs: &HeadInputs<'h, 'p, A>) -> Self {
        Head {
            k: inputs.k,
            v: inputs.v,
            masks: inputs.masks,
            l: inputs.q.nrows(),
        }
    }

    /// The keys any row of the block may see, cut into key blocks.
    #[inline(always)]
    fn key_blocks(&self, queries: &Queries<'_, A>) -> impl Iterator<Item = std::ops::Range<usize>> {
        let s = self.k.nrows();
        let last = queries.first + queries.q.nrows() - 1;
        let start = keys_in_reach(self.masks, queries.first, self.l, s).start;
        let end = keys_in_reach(self.masks, last, self.l, s).end;
        (start..end).step_by(BK).map(move |j| j..(j + BK).min(end))
    }

    /// `S = (Q·scale)·Kᵀ` for keys `keys`, masked, into the first rows and
    /// columns of `s`.
    #[inline(always)]
    fn scores(&self, queries: &Queries<'_, A>, keys: &std::ops::Range<usize>, s: &mut Array2<A>) {
        let rows = queries.q.nrows();
        let mut block = s.slice_mut(s![..rows, ..keys.len()]);
        let k = self.k.slice(s![keys.clone(), ..]);
        general_mat_mul(A::one(), &queries.q, &k.t(), A::zero(), &mut block);
        for (i, mut row) in block.outer_iter_mut().enumerate() {
            let row = row
                .as_slice_mut()
                .expect("a row of a standard-layout block");
            apply_row(
                self.masks,
                queries.first + i,
                self.l,
                self.k.nrows(),
                keys.start,
                row,
            );
        }
    }

    /// One query block: the forward's log-sum-exp and output (kept, or computed
    /// again), then the gradients; `dq` is the block's rows of `dQ` (unscaled),
    /// `dk` and `dv` the head's, accumulated.
    #[inline(always)]
    fn query_block<M: MulAdd>(
        &self,
        queries: &Queries<'_, A>,
        upstream: Upstream<'_, A>,
        scratch: &mut BlockScratch<A>,
        out: BlockGradients<'_, A>,
    ) {
        let BlockGradients {
            mut dq,
            dk,
            dv,
            bias,
        } = out;
        let rows = queries.q.nrows();
        let d_out = upstream.d_out;
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
            None => self.forward::<M>(queries, scratch),
        }
        // D = rowsum(dO ∘ O)
        for (i, d) in scratch.d.iter_mut().take(rows).enumerate() {
            *d = d_out
                .row(i)
                .iter()
                .zip(scratch.o.row(i))
                .fold(A::zero(), |t, (&g, &o)| t + g * o);
        }
        for keys in self.key_blocks(queries) {
            let n = keys.len();
            self.scores(queries, &keys, &mut scratch.p);
            let mut p = scratch.p.slice_mut(s![..rows, ..n]);
            for (i, mut row) in p.outer_iter_mut().enumerate() {
                let lse = scratch.lse[i];
                row.mapv_inplace(|x| A::exp_nonpositive::<M>(x - lse));
            }
            let p = p.view();
            // dV += Pᵀ·dO
            let mut dv_block = dv.slice_mut(s![keys.clone(), ..]);
            general_mat_mul(A::one(), &p.t(), &d_out, A::one(), &mut dv_block);
            // dP = dO·Vᵀ, then dS = P ∘ (dP − D)
            let mut ds = scratch.ds.slice_mut(s![..rows, ..n]);
            let v = self.v.slice(s![keys.clone(), ..]);
            general_mat_mul(A::one(), &d_out, &v.t(), A::zero(), &mut ds);
            for ((mut ds, p), &d) in ds.outer_iter_mut().zip(p.outer_iter()).zip(&scratch.d) {
                ds.zip_mut_with(&p, |x, &p| *x = p * (*x - d));
            }
            // dS is the gradient by every bias added to the scores
            for target in bias.iter_mut() {
                add_bias_gradient(target.view_mut(), ds.view(), queries.first, keys.start);
            }
            // dQ += dS·K, dK += dSᵀ·(Q·scale)
            let k = self.k.slice(s![keys.clone(), ..]);
            general_mat_mul(A::one(), &ds, &k, A::one(), &mut dq);
            let mut dk_block = dk.slice_mut(s![keys, ..]);
            general_mat_mul(A::one(), &ds.t(), &queries.q, A::one(), &mut dk_block);
        }
    }

    /// The forward pass of one query block: each row's output and log-sum-exp
    /// (`+∞` for a row that sees no key, so that every weight of the backward is 0),
    /// into `scratch`.
    #[inline(always)]
    fn forward<M: MulAdd>(&self, queries: &Queries<'_, A>, scratch: &mut BlockScratch<A>) {
        let rows = queries.q.nrows();
        let mut max = [A::neg_infinity(); BQ];
        let mut sum = [A::zero(); BQ];
        scratch.o.fill(A::zero());
        for keys in self.key_blocks(queries) {
            let n = keys.len();
            self.scores(queries, &keys, &mut scratch.p);
            let mut p = scratch.p.slice_mut(s![..rows, ..n]);
            for (i, mut row) in p.outer_iter_mut().enumerate() {
                let row = row
                    .as_slice_mut()
                    .expect("a row of a standard-layout block");
                let alpha = softmax_update::<A, M, SOFTMAX_LANES>(row, &mut max[i], &mut sum[i]);
                scratch.o.row_mut(i).mapv_inplace(|x| x * alpha);
            }
            let v = self.v.slice(s![keys, ..]);
            let mut o = scratch.o.slice_mut(s![..rows, ..]);
            general_mat_mul(A::one(), &p.view(), &v, A::one(), &mut o);
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
    }
}
