//! Every operation a token runs: one struct per kernel body, holding its
//! arguments, whose [`Op::run`] calls the body with the token's micro-kernels,
//! tile width and multiply-add. [`Dispatch::dispatch`](super::arch::Dispatch)
//! compiles each for the instruction set of the call.

use std::ops::Range;

use half::bf16;
use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2};

use super::arch::{Op, Token};
use super::backward::{
    self, BlockScratch, HeadInputs, HeadPanels, HeadRest, HeadTargets, PanelProducts, Part,
    Upstream,
};
use super::direct::{self, Group, Memory, PartialMut, Rows};
use super::float::KernelFloat;
use super::pack::{self, Entry, HeadMemory, PackedHead, Pair};
use super::tiled::{self, Block, KeyTiles, Output, PairsBy, Scratch};
use crate::flex::program::Program;

/// The token's tile width (columns of a register tile), for sizing scratch.
pub(crate) struct TileWidth;

impl<A: KernelFloat, K> Op<A, K> for TileWidth {
    type Output = usize;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, K, NR>, const NR: usize>(self, _: T) -> usize {
        NR
    }
}

/// [`pack::pack_head`] (or, for bf16 keys as pairs, [`pack::pack_head_pairs`]):
/// one key/value head packed for the token's tiles into `memory` (keys as
/// entries `K`, values as `V`), the transposition of the keys running with its
/// vectors.
pub(crate) struct PackHead<'v, 'a, KV, K, V> {
    pub(crate) k: &'v ArrayView2<'a, KV>,
    pub(crate) v: &'v ArrayView2<'a, KV>,
    pub(crate) memory: HeadMemory<K, V>,
}

impl<A: KernelFloat> Op<A> for PackHead<'_, '_, A, A, A> {
    type Output = PackedHead<A>;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, token: T) -> PackedHead<A> {
        pack::pack_head::<A, NR>(self.k, self.v, token, self.memory)
    }
}

impl<K: Pair> Op<f32, K> for PackHead<'_, '_, bf16, K, K::Value> {
    type Output = PackedHead<f32, K>;

    #[inline(always)]
    fn run<T: Token<f32, NR> + KeyTiles<f32, K, NR>, const NR: usize>(
        self,
        token: T,
    ) -> PackedHead<f32, K> {
        pack::pack_head_pairs::<K, NR>(self.k, self.v, PairsBy(token), self.memory)
    }
}

/// [`tiled::attend_block`]: one block of query rows of the tiled kernel, its
/// output written as `O`.
pub(crate) struct AttendBlock<'b, 'a, A, K: Entry<A>, P, O> {
    pub(crate) block: &'b Block<'a, A, K, P>,
    pub(crate) scratch: &'b mut Scratch<A, K>,
    pub(crate) out: ArrayViewMut2<'b, O>,
    pub(crate) lse: Option<ArrayViewMut1<'b, A>>,
}

impl<A: KernelFloat, K: Entry<A>, P: Program<A>, O: Output<A>> Op<A, K>
    for AttendBlock<'_, '_, A, K, P, O>
{
    type Output = bool;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, K, NR>, const NR: usize>(self, token: T) -> bool {
        let Self {
            block,
            scratch,
            out,
            lse,
        } = self;
        tiled::attend_block::<A, T::MulAdd, T, K, P, O, NR>(token, block, scratch, out, lse)
    }
}

/// [`direct::attend_part`]: the query rows of one group over one part of its
/// keys, into the part's place, with the thread's working memory.
pub(crate) struct AttendPart<'r, 'g, 'p, 'm, A, R, P> {
    pub(crate) group: &'r Group<'g, 'p, A, R, P>,
    pub(crate) part: Range<usize>,
    pub(crate) memory: &'m mut Memory<A>,
    pub(crate) out: PartialMut<'m, A>,
}

impl<A: KernelFloat, R: Rows<A>, P: Program<A>> Op<A> for AttendPart<'_, '_, '_, '_, A, R, P> {
    type Output = ();

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, token: T) {
        let Self {
            group,
            part,
            memory,
            out,
        } = self;
        direct::attend_part::<A, T::MulAdd, T, R, P>(token, group, part, memory, out);
    }
}

/// [`backward::head`] on the register tiles' products: the gradients of one
/// query head, or of a part of its query blocks, added into `out` (`None` when
/// its program made a score NaN or `+∞`).
pub(crate) struct BackwardHead<'r, 'h, 'p, 'u, 'g, A, P> {
    pub(crate) inputs: &'r HeadInputs<'h, 'p, A, P>,
    pub(crate) upstream: Upstream<'u, A>,
    /// The head's keys and values packed, and the thread's working memory.
    pub(crate) panels: &'r HeadPanels<A>,
    pub(crate) scratch: &'r mut BlockScratch<A>,
    /// The query blocks to compute.
    pub(crate) part: Part,
    pub(crate) out: HeadTargets<'g, A>,
}

impl<A: KernelFloat, P: Program<A>> Op<A> for BackwardHead<'_, '_, '_, '_, '_, A, P> {
    type Output = Option<HeadRest<A>>;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(
        self,
        token: T,
    ) -> Option<HeadRest<A>> {
        let BlockScratch { panels, rows } = self.scratch;
        let mut products = PanelProducts::<A, T, NR> {
            tiles: token,
            head: self.panels,
            block: panels,
            rows: 0,
            d: self.inputs.q.ncols(),
            d_v: self.inputs.v.ncols(),
        };
        backward::head::<A, T::MulAdd, T, P, _, NR>(
            token,
            self.inputs,
            self.upstream,
            (&mut products, rows),
            self.part,
            self.out,
        )
    }
}

/// [`HeadPanels::repack`]: one head's keys and values packed for the backward's
/// products (its values by columns too when the forward runs again).
pub(crate) struct PackBackward<'a, 'p, A> {
    pub(crate) panels: &'p mut HeadPanels<A>,
    pub(crate) k: ArrayView2<'a, A>,
    pub(crate) v: ArrayView2<'a, A>,
    pub(crate) forward: bool,
}

impl<A: KernelFloat> Op<A> for PackBackward<'_, '_, A> {
    type Output = ();

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, token: T) {
        self.panels
            .repack::<T, NR>(token, self.k, self.v, self.forward);
    }
}
