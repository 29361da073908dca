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
//! Block products run on the forward's micro-kernels ([`super::gemm`]): the keys
//! and values are packed once per head, a query block's rows once per block, a
//! key block's `P` and `dS` once each; everything is compiled per instruction
//! set in [`super::arch`]. [`super::run::backward`] runs the heads in
//! parallel, each with its own `dK` and `dV`, summed over the query heads of a
//! key/value head in head order (a call of one head deals its query blocks to
//! [`Part`]s, summed in part order), so the result does not depend on the
//! number of threads; heads whose inputs are not finite, or could overflow,
//! take the reference path.
//!
//! [`BACKWARD_QUERIES`]: super::params::BACKWARD_QUERIES
//! [`BACKWARD_KEYS`]: super::params::BACKWARD_KEYS

mod head;

use std::ops::Range;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, s};

use super::float::{KernelFloat, MulAdd};
use super::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ};
use super::tiled::Tiles;
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::program::Program;
use head::{BlockGradients, Head, Queries};
pub(crate) use head::{BlockScratch, HeadPanels};

// every key block starts a panel of keys, for the widest tiles (32 keys)
const _: () = assert!(BK.is_multiple_of(32));

/// Where one query head's `dQ`, `dK` and `dV` go, zero to begin with: the
/// call's own rows where nothing else adds to them, else arrays of the head's
/// (or of one part's, whose `dq` holds its blocks' rows one after another) for
/// the caller to sum.
pub(crate) struct HeadTargets<'g, A> {
    pub(crate) dq: ArrayViewMut2<'g, A>,
    pub(crate) dk: ArrayViewMut2<'g, A>,
    pub(crate) dv: ArrayViewMut2<'g, A>,
}

/// The rest of one query head's gradients.
pub(crate) struct HeadRest<A> {
    /// This head's part of every bias's gradient, `(L or 1, S or 1)`.
    pub(crate) bias: Vec<Array2<A>>,
    /// The gradients of the program's score modification's parameters, and of
    /// the head's sink (0 without one).
    pub(crate) score: Vec<A>,
    pub(crate) sink: A,
}

/// One query head whose inputs the fused pass may take (checked by the caller).
pub(crate) struct HeadInputs<'h, 'p, A, P> {
    pub(crate) scoring: Scoring<'h, P>,
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

/// What a head's query blocks run with: its keys and values packed, and the
/// working memory of the thread they run on.
pub(crate) struct Shared<'s, A> {
    pub(crate) panels: &'s HeadPanels<A>,
    pub(crate) scratch: &'s mut BlockScratch<A>,
}

/// Which query blocks (of [`BQ`] rows) of a head one task computes: blocks
/// `index, index + count, …`; interleaved, so that under a causal mask every
/// part has its share of the long rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    pub(crate) index: usize,
    pub(crate) count: usize,
}

impl Part {
    /// The part's query rows of a head of `l`, block by block.
    pub(crate) fn blocks(self, l: usize) -> impl Iterator<Item = Range<usize>> {
        (self.index * BQ..l)
            .step_by(self.count * BQ)
            .map(move |first| first..(first + BQ).min(l))
    }
}

/// The gradients of one query head by the fused pass over its keys and values
/// packed as `shared` holds them, from the query blocks of `part` (the whole
/// head, or a part whose gradients the caller sums with the other parts'),
/// added into `out`; `M` says how `a·b + c` is computed and `tiles` are the
/// micro-kernels (the caller compiles them for its instruction set). `None`
/// when the program made a score NaN or `+∞` (`out` is then partly written).
#[inline(always)]
pub(crate) fn head<A, M, T, P, const NR: usize>(
    tiles: T,
    inputs: &HeadInputs<'_, '_, A, P>,
    upstream: Upstream<'_, A>,
    shared: Shared<'_, A>,
    part: Part,
    out: HeadTargets<'_, A>,
) -> Option<HeadRest<A>>
where
    A: KernelFloat,
    M: MulAdd,
    T: Tiles<A, NR>,
    P: Program<A>,
{
    let q = inputs.q;
    let mut rest = HeadRest {
        bias: inputs
            .bias_shapes
            .iter()
            .map(|&s| Array2::zeros(s))
            .collect(),
        score: vec![A::zero(); inputs.scoring.program.parameters()],
        sink: A::zero(),
    };
    let Shared { panels, scratch } = shared;
    let head = Head::<A, P, NR>::of(inputs, panels);
    let HeadTargets {
        dq: mut d_q,
        mut dk,
        mut dv,
    } = out;
    let HeadRest { bias, score, sink } = &mut rest;
    let blocks = d_q.axis_chunks_iter_mut(Axis(0), BQ);
    for (rows, dq) in part.blocks(q.nrows()).zip(blocks) {
        let queries = Queries::of::<A, P, T, NR>(tiles, inputs, rows.clone(), scratch);
        let upstream = Upstream {
            d_out: upstream.d_out.slice_move(s![rows.clone(), ..]),
            saved: upstream
                .saved
                .map(|(o, lse)| (o.slice_move(s![rows.clone(), ..]), lse.slice_move(s![rows]))),
        };
        let out = BlockGradients {
            dq,
            dk: dk.view_mut(),
            dv: dv.view_mut(),
            bias,
            score,
            sink,
        };
        if !head.query_block::<M, T>(tiles, &queries, upstream, scratch, out) {
            return None;
        }
    }
    d_q.mapv_inplace(|x| x * inputs.scale);
    Some(rest)
}
