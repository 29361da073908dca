//! The pre-check of the tiled and row-wise paths: a head is computed by the fused
//! arithmetic only where that gives what the reference path gives. Inputs that
//! are not finite, or large enough that a score or a running sum could overflow,
//! go to the reference path, which defines what happens then.

use std::borrow::Cow;

use ndarray::{ArrayView1, ArrayView2};

use super::online::fold_max;
use crate::core::mask::Mask2;
use crate::element::Element;

/// What the pre-check needs to know of one head's queries, keys or values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent<A> {
    /// Every entry is finite.
    pub(crate) finite: bool,
    /// The largest absolute entry.
    pub(crate) max_abs: A,
    /// The number of rows.
    pub(crate) rows: usize,
}

/// Whether `x` is finite, its largest absolute entry, and its number of rows.
pub(crate) fn extent_of<A: Element>(x: &ArrayView2<'_, A>) -> Extent<A> {
    let mut scan = Scan::new();
    for row in x.outer_iter() {
        scan.add(&row_slice(row));
    }
    scan.extent(x.nrows())
}

/// A row as a slice: borrowed where it is contiguous, copied where it is not.
fn row_slice<A: Clone>(row: ArrayView1<'_, A>) -> Cow<'_, [A]> {
    match row.to_slice() {
        Some(row) => Cow::Borrowed(row),
        None => Cow::Owned(row.to_vec()),
    }
}

/// An [`Extent`] gathered slice by slice, so that a pass that reads the rows for
/// another reason (packing) finds it on the way.
pub(crate) struct Scan<A> {
    /// The largest absolute entry so far, lane by lane.
    lanes: [A; 8],
    /// `Σ 0·x` lane by lane: 0 while every entry is finite, NaN after any other.
    poison: [A; 8],
}

impl<A: Element> Scan<A> {
    pub(crate) fn new() -> Self {
        Scan {
            lanes: [A::zero(); 8],
            poison: [A::zero(); 8],
        }
    }

    /// Takes in the entries of `values`.
    #[inline(always)]
    pub(crate) fn add(&mut self, values: &[A]) {
        // `0·x` is 0 for finite x and NaN otherwise: summing it finds any
        // non-finite entry with plain, vectorisable arithmetic
        let (chunks, rest) = values.as_chunks::<8>();
        for chunk in chunks {
            for ((m, p), &v) in self.lanes.iter_mut().zip(&mut self.poison).zip(chunk) {
                *p += v * A::zero();
                *m = fold_max(*m, v.abs());
            }
        }
        for &v in rest {
            self.poison[0] += v * A::zero();
            self.lanes[0] = fold_max(self.lanes[0], v.abs());
        }
    }

    /// The extent of everything added, `rows` rows.
    pub(crate) fn extent(&self, rows: usize) -> Extent<A> {
        let max_abs = self.lanes.iter().fold(A::zero(), |m, &a| fold_max(m, a));
        Extent {
            finite: self.poison.iter().all(|&p| p == A::zero()) && max_abs.is_finite(),
            max_abs,
            rows,
        }
    }
}

/// Whether the fused kernels compute this head exactly as the reference path
/// would: every input finite, no bias of NaN or `+∞`, and no score or running
/// sum that could overflow.
pub(crate) fn fusable<A: Element>(
    q: &ArrayView2<'_, A>,
    masks: &[Mask2<'_, A>],
    scale: A,
    keys: Extent<A>,
    values: Extent<A>,
) -> bool {
    let queries = extent_of(q);
    if !(queries.finite && keys.finite && values.finite) {
        return false;
    }
    let f = |x: A| x.to_f64().unwrap_or(f64::INFINITY);
    let limit = f(A::max_value()) / 4.0;
    let score_bound = q.ncols() as f64 * f(queries.max_abs) * f(scale.abs()) * f(keys.max_abs);
    let mut bias_bound = 0.0_f64;
    for mask in masks {
        match mask {
            Mask2::Bias(bias) => {
                for &x in bias.iter() {
                    if x.is_nan() || x == A::infinity() {
                        return false;
                    }
                    if x.is_finite() {
                        bias_bound = bias_bound.max(f(x.abs()));
                    }
                }
            }
            Mask2::Alibi(slope) => {
                if !slope.is_finite() {
                    return false;
                }
                bias_bound += f(slope.abs()) * q.nrows().max(values.rows) as f64;
            }
            Mask2::Keep(_)
            | Mask2::CausalTopLeft
            | Mask2::CausalBottomRight
            | Mask2::SlidingWindow(_) => {}
        }
    }
    score_bound + bias_bound < limit && f(values.max_abs) * values.rows as f64 <= limit
}
