//! What the kernels see of programmable attention: one [`Program`] per call,
//! monomorphised into every kernel body — [`Plain`] for attention without one
//! (everything it adds compiles away), [`Flex`] for a score modification, a
//! block mask and attention sinks.

use std::ops::Range;

use ndarray::{ArrayView1, NdFloat};

use super::blocks::{BlockClass, BlockMask};
use super::function::{At, KeepAll, KeepMod, ScoreMod};

/// Where a row of scores sits: query `i` of batch row `b`, head `h`, against
/// keys `j0 ..`.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub b: usize,
    pub h: usize,
    pub i: usize,
    pub j0: usize,
}

impl Row {
    /// The position of the row's `j`-th score.
    #[inline(always)]
    fn at(self, j: usize) -> At {
        At {
            batch: self.b,
            head: self.h,
            query: self.i,
            key: self.j0 + j,
        }
    }
}

/// A call's score modification, keep predicate and sinks, as the kernels apply
/// them to one [`Row`] of scores at a time.
pub trait Program<A>: Sync {
    /// Nothing to apply: no modification, no predicate, no sinks.
    const PLAIN: bool;
    /// The score modification is the identity.
    const IDENTITY: bool;

    /// Replaces each raw score `s` (`q·k·scale`) of the row by the modified one.
    fn score_row(&self, row_at: Row, row: &mut [A]);

    /// The class of queries `rows` against keys `keys` (full without a mask).
    fn class(&self, b: usize, h: usize, rows: Range<usize>, keys: Range<usize>) -> BlockClass;

    /// The keys queries `rows` may see, of `s` (all of them without a mask).
    fn reach(&self, b: usize, h: usize, rows: Range<usize>, s: usize) -> Range<usize>;

    /// Writes `masked` where the predicate drops a position of the row.
    fn keep_row(&self, row_at: Row, row: &mut [A], masked: A);

    /// Head `h`'s sink logit, if the call has sinks.
    fn sink(&self, h: usize) -> Option<A>;

    /// The number of learnable parameters of the modification.
    fn parameters(&self) -> usize;

    /// The backward through the modification, on one row: adds the gradients
    /// of its parameters, `Σ ds·∂score/∂θ`, to `gradients`, then turns `ds`
    /// (by the modified scores) into the gradient by the raw scores `raw`.
    /// Positions with `ds = 0` (not attended) are left out.
    fn chain_row(&self, row_at: Row, raw: &[A], ds: &mut [A], gradients: &mut [A]);
}

/// Attention without a program.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl<A> Program<A> for Plain {
    const PLAIN: bool = true;
    const IDENTITY: bool = true;

    #[inline(always)]
    fn score_row(&self, _: Row, _: &mut [A]) {}

    #[inline(always)]
    fn class(&self, _: usize, _: usize, _: Range<usize>, _: Range<usize>) -> BlockClass {
        BlockClass::Full
    }

    #[inline(always)]
    fn reach(&self, _: usize, _: usize, _: Range<usize>, s: usize) -> Range<usize> {
        0..s
    }

    #[inline(always)]
    fn keep_row(&self, _: Row, _: &mut [A], _: A) {}

    #[inline(always)]
    fn sink(&self, _: usize) -> Option<A> {
        None
    }

    fn parameters(&self) -> usize {
        0
    }

    #[inline(always)]
    fn chain_row(&self, _: Row, _: &[A], _: &mut [A], _: &mut [A]) {}
}

/// A score modification `F`, an optional block mask over a predicate `K`, and
/// optional sinks, one logit per query head.
pub struct Flex<'a, A, F, K = KeepAll> {
    pub(crate) score: &'a F,
    pub(crate) blocks: Option<&'a BlockMask<K>>,
    pub(crate) sinks: Option<ArrayView1<'a, A>>,
}

impl<A, F, K> Program<A> for Flex<'_, A, F, K>
where
    A: NdFloat,
    F: ScoreMod<A>,
    K: KeepMod,
{
    const PLAIN: bool = false;
    const IDENTITY: bool = F::IDENTITY;

    #[inline(always)]
    fn score_row(&self, row_at: Row, row: &mut [A]) {
        if F::IDENTITY {
            return;
        }
        self.score.score_row(row_at.at(0), row);
    }

    #[inline(always)]
    fn class(&self, b: usize, h: usize, rows: Range<usize>, keys: Range<usize>) -> BlockClass {
        match self.blocks {
            Some(blocks) if !K::ALL => blocks.class_of(b, h, rows, keys),
            _ => BlockClass::Full,
        }
    }

    #[inline(always)]
    fn keep_row(&self, row_at: Row, row: &mut [A], masked: A) {
        if let Some(blocks) = self.blocks
            && !K::ALL
        {
            let Row { b, h, i, j0 } = row_at;
            blocks.keep_row(b, h, i, j0, row, masked);
        }
    }

    #[inline(always)]
    fn reach(&self, b: usize, h: usize, rows: Range<usize>, s: usize) -> Range<usize> {
        match self.blocks {
            Some(blocks) if !K::ALL => blocks.reach(b, h, rows, s),
            _ => 0..s,
        }
    }

    #[inline(always)]
    fn sink(&self, h: usize) -> Option<A> {
        self.sinks.map(|sinks| sinks[h])
    }

    fn parameters(&self) -> usize {
        self.score.parameters()
    }

    #[inline(always)]
    fn chain_row(&self, row_at: Row, raw: &[A], ds: &mut [A], gradients: &mut [A]) {
        if !F::IDENTITY {
            self.score.backward_row(row_at.at(0), raw, ds, gradients);
        }
    }
}
