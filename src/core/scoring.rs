//! A call's program applied to one head's rows of scores: the score
//! modification, the biases and masks, then the keep predicate — in that order
//! on every path, so that the reference path and the kernels agree.

use std::ops::Range;

use super::mask::{Mask2, apply_row, keys_in_reach};
use crate::element::Element;
use crate::flex::blocks::BlockClass;
use crate::flex::program::{Program, Row};

/// The program of one query head, `h` of batch row `b`.
pub(crate) struct Scoring<'p, P> {
    pub(crate) program: &'p P,
    pub(crate) b: usize,
    pub(crate) h: usize,
}

impl<P> Clone for Scoring<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Scoring<'_, P> {}

impl<P> Scoring<'_, P> {
    /// Turns the raw scores `q·k·scale` of query `i` (of `l`) against keys
    /// `j0 ..` (of `s`) into what the softmax takes: modified, biased and
    /// masked (`−∞`), the predicate applied where `class` says the block is
    /// partly kept (an empty block is all `−∞`). `false` when a modification
    /// made a score that is still attended NaN or `+∞`: the fused paths then
    /// leave the head to the reference path, which defines the result.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare_row<A: Element>(
        &self,
        masks: &[Mask2<'_, A>],
        i: usize,
        l: usize,
        s: usize,
        j0: usize,
        row: &mut [A],
        class: BlockClass,
    ) -> bool
    where
        P: Program<A>,
    {
        if class == BlockClass::Empty {
            row.fill(A::neg_infinity());
            return true;
        }
        let row_at = Row {
            b: self.b,
            h: self.h,
            i,
            j0,
        };
        self.program.score_row(row_at, row);
        // a call out of line per row, even over no masks: 1.3 % of a bf16 call
        if !masks.is_empty() {
            apply_row(masks, i, l, s, j0, row);
        }
        if class == BlockClass::Partial {
            self.program.keep_row(row_at, row, A::neg_infinity());
        }
        // NaN fails the comparison as +∞ does
        P::IDENTITY || row.iter().fold(true, |ok, &x| ok & (x < A::infinity()))
    }

    /// The keys queries `rows` (of `l`, at least one) may see of `s`, by the
    /// causal and window masks and the program's block mask together: from
    /// the first key the first row may see to the last the last row may
    /// (`0..0` when they see none).
    #[inline(always)]
    pub(crate) fn reach<A: Element>(
        &self,
        masks: &[Mask2<'_, A>],
        rows: Range<usize>,
        l: usize,
        s: usize,
    ) -> Range<usize>
    where
        P: Program<A>,
    {
        let first = keys_in_reach(masks, rows.start, l, s).start;
        let last = keys_in_reach(masks, rows.end - 1, l, s).end;
        let program = self.program.reach(self.b, self.h, rows, s);
        let (start, end) = (first.max(program.start), last.min(program.end));
        if start < end { start..end } else { 0..0 }
    }

    /// The head's sink logit, if the call has sinks.
    #[inline(always)]
    pub(crate) fn sink<A>(&self) -> Option<A>
    where
        P: Program<A>,
    {
        self.program.sink(self.h)
    }
}
