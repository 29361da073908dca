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
//! The block products are a [`Products`]: on the forward's micro-kernels in the
//! compute type ([`PanelProducts`]: the keys and values packed once per head,
//! a query block's rows once per block, a key block's `P` and `dS` read where
//! they lie),
//! or, for bf16 inputs on a CPU with AMX, on the tiles (in [`super::arch`]);
//! everything is compiled per instruction set in [`super::arch`]. The softmax,
//! masks, score modification and `dS` run between them in the compute type.
//! [`super::run_backward::backward`] runs the heads in parallel, each with its
//! own `dK` and `dV`, summed over the query heads of a key/value head in head
//! order (a call of one head deals its query blocks to [`Part`]s, summed in
//! part order), so the result does not depend on the number of threads; heads
//! whose inputs are not finite, or could overflow, take the reference path.
//!
//! [`BACKWARD_QUERIES`]: super::params::BACKWARD_QUERIES
//! [`BACKWARD_KEYS`]: super::params::BACKWARD_KEYS

mod head;
mod panels;

use std::ops::Range;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, s};

use super::arch::KernelArch;
use super::float::{KernelFloat, MulAdd};
use super::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ};
use super::tiled::Tiles;
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::program::Program;
pub(crate) use head::RowScratch;
use head::{BlockGradients, Head, Queries};
pub(crate) use panels::{BlockScratch, HeadPanels, PanelProducts, standard};

// every key block starts a panel of keys, for the widest tiles (32 keys)
const _: () = assert!(BK.is_multiple_of(32));

/// The block products of the backward pass on one instruction set, over one
/// head's keys and values and one query block's queries and `dO`, each packed
/// as the products read them ([`PanelProducts`] on the register tiles of the
/// compute type; AMX tiles over bf16 in [`super::arch`]). Scores, weights and
/// their gradients pass in and out in rows of [`BK`] of the compute type; `dK`
/// and `dV` are the part's, `(S, d)` and `(S, d_v)`, and `dQ` the block's rows.
pub(crate) trait Products<A> {
    /// Packs a block of query rows `q` (times `scale`) and its `dO` rows
    /// (`d_out`, rows of `d_v` one after another).
    fn block(&mut self, q: ArrayView2<'_, A>, scale: A, d_out: &[A]);
    /// `S = (Q·scale)·Kᵀ` for keys `keys`, into the block's rows of `s`.
    fn scores(&mut self, keys: Range<usize>, s: &mut [A]);
    /// `O += P·V` over keys `keys` (the forward run again), `o` in rows of `d_v`.
    fn weighted_values(&mut self, p: &[A], keys: Range<usize>, o: &mut [A]);
    /// `dV[keys] += Pᵀ·dO`.
    fn value_gradient(&mut self, p: &[A], keys: Range<usize>, dv: &mut [A]);
    /// `dP = dO·Vᵀ` for keys `keys`, into the block's rows of `dp`.
    fn weight_gradient(&mut self, keys: Range<usize>, dp: &mut [A]);
    /// `dQ += dS·K` (unscaled; `dq` the block's rows of `d`) and
    /// `dK[keys] += dSᵀ·(Q·scale)`.
    fn input_gradients(&mut self, ds: &[A], keys: Range<usize>, dq: &mut [A], dk: &mut [A]);
    /// After the block's last key block: whatever the products kept of `dQ`
    /// added into the block's rows.
    fn end_block(&mut self, dq: &mut [A]);
    /// After the part's last block: whatever they kept of `dK` and `dV` added
    /// into the part's.
    fn end_part(&mut self, dk: &mut [A], dv: &mut [A]);
}

/// How the heads of a backward call run on one instruction set: the memory
/// their products read and work in, and the pass over one head.
pub(crate) trait Pass<A>: Copy + Send + Sync {
    /// One head's keys and values packed for the products.
    type Panels: Send + Sync;
    /// A thread's working memory for query blocks.
    type Scratch: Send;
    /// The instruction set the products run on.
    fn kind(self) -> KernelArch;
    /// Empty panels, to pack head after head.
    fn panels(self) -> Self::Panels;
    /// Working memory for those heads' query blocks.
    fn scratch(self, d: usize, d_v: usize) -> Self::Scratch;
    /// Packs one head's `k: (S, d)` and `v: (S, d_v)` into `panels` (what the
    /// forward needs too when it runs again).
    fn pack(
        self,
        panels: &mut Self::Panels,
        k: ArrayView2<'_, A>,
        v: ArrayView2<'_, A>,
        forward: bool,
    );
    /// [`head()`] on this instruction set's products.
    fn head<P: Program<A>>(
        self,
        inputs: &HeadInputs<'_, '_, A, P>,
        upstream: Upstream<'_, A>,
        work: (&Self::Panels, &mut Self::Scratch),
        part: Part,
        out: HeadTargets<'_, A>,
    ) -> Option<HeadRest<A>>;
}

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
    pub(crate) saved: Option<Kept<'a, A>>,
}

/// A head's (or a block's) output and log-sum-exp per row, as the forward
/// kept them.
pub(crate) type Kept<'a, A> = (ArrayView2<'a, A>, ArrayView1<'a, A>);

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

/// The gradients of one query head by the fused pass on `products` (over its
/// keys and values), from the query blocks of `part` (the whole head, or a
/// part whose gradients the caller sums with the other parts'), added into
/// `out`, with `rows` the thread's working memory; `M` says how `a·b + c` is
/// computed and `tiles` are the softmax's (the caller compiles them for its
/// instruction set). `None` when the program made a score NaN or `+∞` (`out`
/// is then partly written).
#[inline(always)]
pub(crate) fn head<A, M, T, P, B, const NR: usize>(
    tiles: T,
    inputs: &HeadInputs<'_, '_, A, P>,
    upstream: Upstream<'_, A>,
    (products, rows): (&mut B, &mut RowScratch<A>),
    part: Part,
    out: HeadTargets<'_, A>,
) -> Option<HeadRest<A>>
where
    A: KernelFloat,
    M: MulAdd,
    T: Tiles<A, NR>,
    P: Program<A>,
    B: Products<A>,
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
    let head = Head::<A, P, NR>::of(inputs);
    let HeadTargets {
        dq: mut d_q,
        mut dk,
        mut dv,
    } = out;
    let HeadRest { bias, score, sink } = &mut rest;
    let blocks = d_q.axis_chunks_iter_mut(Axis(0), BQ);
    for (block, dq) in part.blocks(q.nrows()).zip(blocks) {
        let queries = Queries {
            first: block.start,
            rows: block.len(),
        };
        let d_out = standard(upstream.d_out.slice_move(s![block.clone(), ..]));
        let d_out = d_out.as_slice().expect("standard layout");
        products.block(q.slice(s![block.clone(), ..]), inputs.scale, d_out);
        let saved = upstream.saved.map(|(o, lse)| {
            (
                o.slice_move(s![block.clone(), ..]),
                lse.slice_move(s![block]),
            )
        });
        let out = BlockGradients {
            dq,
            dk: dk.view_mut(),
            dv: dv.view_mut(),
            bias,
            score,
            sink,
        };
        if !head.query_block::<M, T, B>(tiles, products, &queries, (d_out, saved), rows, out) {
            return None;
        }
    }
    let (dk, dv) = (
        dk.as_slice_mut().expect("standard layout"),
        dv.as_slice_mut().expect("standard layout"),
    );
    products.end_part(dk, dv);
    d_q.mapv_inplace(|x| x * inputs.scale);
    Some(rest)
}
