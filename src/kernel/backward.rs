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
//! Block products are general matrix products on views. Heads run in parallel,
//! each with its own `dK` and `dV`, summed over the query heads of a key/value
//! head in head order, so the result does not depend on the number of threads.
//! Heads whose inputs are not finite, or could overflow, take the reference path.
//!
//! [`BACKWARD_QUERIES`]: super::params::BACKWARD_QUERIES
//! [`BACKWARD_KEYS`]: super::params::BACKWARD_KEYS

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::float::{KernelFloat, Separate};
use super::fusable::{extent_of, fusable};
use super::online::{inverse_total, softmax_update};
use super::options::Parallelism;
use super::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ, LANES};
use super::report::{self, Path};
use crate::core::backward::Gradients;
use crate::core::mask::{apply_row, keys_in_reach, Mask2};
use crate::core::problem::Problem;

/// One query head's gradients: `dq` for the head, `dk` and `dv` for its
/// key/value head (to be summed with the other query heads of its group).
struct HeadGradients<A> {
    dq: Array2<A>,
    dk: Array2<A>,
    dv: Array2<A>,
}

/// The gradients of every head of `problem` given `d_out`, `(batch, heads, L, d_v)`.
pub(crate) fn backward<A: KernelFloat>(
    problem: &Problem<'_, A>,
    d_out: ndarray::ArrayView4<'_, A>,
    parallelism: Parallelism,
) -> Gradients<A> {
    let (batch, heads, _, _) = problem.q.dim();
    let run = |task: usize| {
        let (b, h) = (task / heads, task % heads);
        let d_out = d_out.index_axis(Axis(0), b).index_axis_move(Axis(0), h);
        head_backward(problem, b, h, d_out)
    };
    let tasks = 0..batch * heads;
    let per_head: Vec<(HeadGradients<A>, Path)> = match parallelism {
        Parallelism::Sequential => tasks.map(run).collect(),
        Parallelism::Rayon => tasks.into_par_iter().map(run).collect(),
    };
    let mut grads = Gradients::zeros(problem);
    for (task, (head, path)) in per_head.into_iter().enumerate() {
        report::count(path, 1);
        let (b, h) = (task / heads, task % heads);
        let kv = problem.kv_head(h);
        grads.dq.slice_mut(s![b, h, .., ..]).assign(&head.dq);
        grads
            .dk
            .slice_mut(s![b, kv, .., ..])
            .zip_mut_with(&head.dk, |a, &x| *a += x);
        grads
            .dv
            .slice_mut(s![b, kv, .., ..])
            .zip_mut_with(&head.dv, |a, &x| *a += x);
    }
    grads
}

/// Query head `h` of batch `b`, fused if its inputs allow, else by the reference path.
fn head_backward<A: KernelFloat>(
    problem: &Problem<'_, A>,
    b: usize,
    h: usize,
    d_out: ArrayView2<'_, A>,
) -> (HeadGradients<A>, Path) {
    let q = problem.query(b, h);
    let (k, v) = problem.keys_values(b, problem.kv_head(h));
    let masks = problem.block_masks(b, h);
    let finite = extent_of(&d_out).finite;
    if !(finite && fusable(&q, &masks, problem.scale, extent_of(&k), extent_of(&v))) {
        let (dq, dk, dv) = problem.backward_head(b, h, d_out);
        return (HeadGradients { dq, dk, dv }, Path::Reference);
    }
    let mut grads = HeadGradients {
        dq: Array2::zeros(q.raw_dim()),
        dk: Array2::zeros(k.raw_dim()),
        dv: Array2::zeros(v.raw_dim()),
    };
    let head = Head {
        k,
        v,
        masks: &masks,
        l: q.nrows(),
    };
    let mut scratch = BlockScratch::new(v.ncols());
    for (c, dq) in grads.dq.axis_chunks_iter_mut(Axis(0), BQ).enumerate() {
        let rows = c * BQ..c * BQ + dq.nrows();
        let q_block = q.slice(s![rows.clone(), ..]).mapv(|x| x * problem.scale);
        let d_out = d_out.slice(s![rows.clone(), ..]);
        let queries = Queries {
            first: rows.start,
            q: q_block.view(),
            d_out,
        };
        head.query_block(&queries, &mut scratch, dq, &mut grads.dk, &mut grads.dv);
    }
    grads.dq.mapv_inplace(|x| x * problem.scale);
    (grads, Path::FusedBackward)
}

/// What one query head attends over.
struct Head<'h, 'p, A> {
    k: ArrayView2<'p, A>,
    v: ArrayView2<'p, A>,
    masks: &'h [Mask2<'p, A>],
    /// The number of queries `L` of the head.
    l: usize,
}

/// One block of query rows: the queries times the scale, and their `dO`.
struct Queries<'a, A> {
    /// Index of the block's first row among the head's queries.
    first: usize,
    q: ArrayView2<'a, A>,
    d_out: ArrayView2<'a, A>,
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

impl<A: KernelFloat> Head<'_, '_, A> {
    /// The keys any row of the block may see, cut into key blocks.
    fn key_blocks(&self, queries: &Queries<'_, A>) -> impl Iterator<Item = std::ops::Range<usize>> {
        let s = self.k.nrows();
        let last = queries.first + queries.q.nrows() - 1;
        let start = keys_in_reach(self.masks, queries.first, self.l, s).start;
        let end = keys_in_reach(self.masks, last, self.l, s).end;
        (start..end).step_by(BK).map(move |j| j..(j + BK).min(end))
    }

    /// `S = (Q·scale)·Kᵀ` for keys `keys`, masked, into the first rows and
    /// columns of `s`.
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

    /// Both passes of one query block: `dq` is the block's rows of `dQ`
    /// (unscaled); `dk` and `dv` the head's, accumulated.
    fn query_block(
        &self,
        queries: &Queries<'_, A>,
        scratch: &mut BlockScratch<A>,
        mut dq: ArrayViewMut2<'_, A>,
        dk: &mut Array2<A>,
        dv: &mut Array2<A>,
    ) {
        let rows = queries.q.nrows();
        self.forward(queries, scratch);
        for keys in self.key_blocks(queries) {
            let n = keys.len();
            self.scores(queries, &keys, &mut scratch.p);
            let mut p = scratch.p.slice_mut(s![..rows, ..n]);
            for (i, mut row) in p.outer_iter_mut().enumerate() {
                let lse = scratch.lse[i];
                row.mapv_inplace(|x| A::exp_nonpositive::<Separate>(x - lse));
            }
            let p = p.view();
            // dV += Pᵀ·dO
            let mut dv_block = dv.slice_mut(s![keys.clone(), ..]);
            general_mat_mul(A::one(), &p.t(), &queries.d_out, A::one(), &mut dv_block);
            // dP = dO·Vᵀ, then dS = P ∘ (dP − D)
            let mut ds = scratch.ds.slice_mut(s![..rows, ..n]);
            let v = self.v.slice(s![keys.clone(), ..]);
            general_mat_mul(A::one(), &queries.d_out, &v.t(), A::zero(), &mut ds);
            for ((mut ds, p), &d) in ds.outer_iter_mut().zip(p.outer_iter()).zip(&scratch.d) {
                ds.zip_mut_with(&p, |x, &p| *x = p * (*x - d));
            }
            // dQ += dS·K, dK += dSᵀ·(Q·scale)
            let k = self.k.slice(s![keys.clone(), ..]);
            general_mat_mul(A::one(), &ds, &k, A::one(), &mut dq);
            let mut dk_block = dk.slice_mut(s![keys, ..]);
            general_mat_mul(A::one(), &ds.t(), &queries.q, A::one(), &mut dk_block);
        }
    }

    /// The forward pass of one query block: each row's log-sum-exp and
    /// `D = rowsum(dO ∘ O)`, into `scratch`.
    fn forward(&self, queries: &Queries<'_, A>, scratch: &mut BlockScratch<A>) {
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
                let alpha = softmax_update::<A, Separate, LANES>(row, &mut max[i], &mut sum[i]);
                scratch.o.row_mut(i).mapv_inplace(|x| x * alpha);
            }
            let v = self.v.slice(s![keys, ..]);
            let mut o = scratch.o.slice_mut(s![..rows, ..]);
            general_mat_mul(A::one(), &p.view(), &v, A::one(), &mut o);
        }
        for i in 0..rows {
            let inverse = inverse_total(sum[i]);
            // a row that sees no key: lse = +∞ makes every weight of pass 2 zero
            scratch.lse[i] = if sum[i] > A::zero() {
                max[i] + sum[i].ln()
            } else {
                A::infinity()
            };
            scratch.d[i] = queries
                .d_out
                .row(i)
                .iter()
                .zip(scratch.o.row(i))
                .fold(A::zero(), |t, (&g, &o)| t + g * o * inverse);
        }
    }
}
