//! The pre-check of the tiled and row-wise paths: a head is computed by the fused
//! arithmetic only where that gives what the reference path gives. Inputs that
//! are not finite, or large enough that a score or a running sum could overflow,
//! go to the reference path, which defines what happens then.

use std::borrow::Cow;

use ndarray::{ArrayView1, ArrayView2};

use super::params::SCAN_LANES;
use super::sweep::{Sweep, vectorized};
use crate::core::mask::Mask2;
use crate::element::Element;

/// What the pre-check needs to know of one head's queries, keys or values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent<A> {
    /// Every entry is finite.
    pub(crate) finite: bool,
    /// The largest absolute entry where every entry is finite (else any value).
    pub(crate) max_abs: A,
    /// The number of rows.
    pub(crate) rows: usize,
}

/// Whether `x` is finite, its largest absolute entry, and its number of rows.
#[inline]
pub(crate) fn extent_of<A: Element>(x: &ArrayView2<'_, A>) -> Extent<A> {
    vectorized(ExtentOf(x))
}

/// [`extent_of`] as a [`Sweep`]: compiled with the CPU's vectors.
struct ExtentOf<'a, 'x, A>(&'a ArrayView2<'x, A>);

impl<A: Element> Sweep for ExtentOf<'_, '_, A> {
    type Output = Extent<A>;

    #[inline(always)]
    fn run(self) -> Extent<A> {
        let x = self.0;
        let mut scan = Scan::new();
        match x.as_slice_memory_order() {
            Some(few) if few.len() < SCAN_LANES => return short_extent(few, x.nrows()),
            Some(all) => scan.add(all),
            None => x.outer_iter().for_each(|row| scan.add(&row_slice(row))),
        }
        scan.extent(x.nrows())
    }
}

/// The extent of fewer entries than [`SCAN_LANES`] (a tiny head), `rows` rows:
/// four lanes in registers, folded at once.
#[inline(always)]
fn short_extent<A: Element>(values: &[A], rows: usize) -> Extent<A> {
    let max_abs = tree_max(fold_four([A::zero(); 4], values));
    Extent {
        finite: max_abs.is_finite(),
        max_abs,
        rows,
    }
}

/// `lanes` after the [`sticky_max`] of `|x|` for each entry of `values`, four
/// at a time (a few entries: chains a quarter as long as sixteen lanes'). The
/// lanes spelled out as a loop: `array::map` and `from_fn` were left as calls.
#[inline(always)]
fn fold_four<A: Element>(mut lanes: [A; 4], values: &[A]) -> [A; 4] {
    let (quads, tail) = values.as_chunks::<4>();
    for quad in quads {
        for (m, &x) in lanes.iter_mut().zip(quad) {
            *m = sticky_max(*m, x.abs());
        }
    }
    for (m, &x) in lanes.iter_mut().zip(tail) {
        *m = sticky_max(*m, x.abs());
    }
    lanes
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
    /// The largest absolute entry so far, lane by lane, NaN entries passed over
    /// (a lane the four-lane pass made NaN stays NaN).
    lanes: [A; SCAN_LANES],
    /// `x·0` summed lane by lane: 0 while every entry is finite, NaN for good
    /// once one is not (`∞·0` and `NaN·0` are NaN).
    spread: [A; SCAN_LANES],
    /// Lanes that hold an entry (the others are still 0): a tiny head's few
    /// entries take one lane, and the final fold reads only those.
    used: usize,
}

const _: () = assert!(SCAN_LANES >= 4, "the short-slice pass uses four lanes");

/// The larger of `m` and `x`, NaN once either is: a NaN `m` stays, since no `x`
/// compares greater than it.
#[inline(always)]
fn sticky_max<A: Element>(m: A, x: A) -> A {
    if x > m || x.is_nan() { x } else { m }
}

/// The larger of `m` and `x`: one `maxps` (a NaN `x` leaves `m`, a NaN `m`
/// stays).
#[inline(always)]
fn larger<A: Element>(m: A, x: A) -> A {
    if x > m { x } else { m }
}

impl<A: Element> Scan<A> {
    pub(crate) fn new() -> Self {
        Scan {
            lanes: [A::zero(); SCAN_LANES],
            spread: [A::zero(); SCAN_LANES],
            used: 0,
        }
    }

    /// Takes in the entries of `values`.
    #[inline(always)]
    pub(crate) fn add(&mut self, values: &[A]) {
        // a maximum of |x| and a sum of x·0 per lane: two chains of one
        // instruction each, where a NaN-sticky maximum is a chain of three
        // (two compares and a blend) and ran at a tenth of the bytes' speed;
        // the lanes in locals, not behind `self`, so that the compiler keeps
        // them in registers
        let (chunks, rest) = values.as_chunks::<SCAN_LANES>();
        if chunks.is_empty() {
            // fewer entries than lanes (a tiny head's rows): four lanes, and only
            // those for `extent` to fold
            let first: &mut [A; 4] = (&mut self.lanes[..4]).try_into().expect("four lanes");
            *first = fold_four(*first, rest);
            self.used = self.used.max(4);
            return;
        }
        let (mut lanes, mut spread) = (self.lanes, self.spread);
        for chunk in chunks {
            for ((m, z), &x) in lanes.iter_mut().zip(&mut spread).zip(chunk) {
                *m = larger(*m, x.abs());
                *z += x * A::zero();
            }
        }
        for ((m, z), &x) in lanes.iter_mut().zip(&mut spread).zip(rest) {
            *m = larger(*m, x.abs());
            *z += x * A::zero();
        }
        (self.lanes, self.spread) = (lanes, spread);
        self.used = SCAN_LANES;
    }

    /// The extent of everything added, `rows` rows.
    #[inline]
    pub(crate) fn extent(&self, rows: usize) -> Extent<A> {
        // pairwise over a fixed number of lanes (a fold over `used` lanes from
        // memory was a chain as long as the lanes)
        let max_abs = match self.lanes.first_chunk::<4>() {
            Some(&four) if self.used <= 4 => tree_max(four),
            _ => tree_max(self.lanes),
        };
        let spread = self.spread.iter().fold(A::zero(), |sum, &z| sum + z);
        Extent {
            finite: max_abs.is_finite() && spread == A::zero(),
            max_abs,
            rows,
        }
    }
}

/// The [`sticky_max`] of `N` (a power of two) lanes, halves first.
#[inline(always)]
fn tree_max<A: Element, const N: usize>(mut lanes: [A; N]) -> A {
    let mut width = N;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] = sticky_max(lanes[i], lanes[i + width]);
        }
    }
    lanes[0]
}

/// Whether the fused kernels compute this head exactly as the reference path
/// would: every input finite, no bias of NaN or `+∞`, and no score or running
/// sum that could overflow. `queries`: the extent of the head's queries and
/// their width `d_k`.
pub(crate) fn fusable<A: Element>(
    (queries, depth): (Extent<A>, usize),
    masks: &[Mask2<'_, A>],
    scale: A,
    keys: Extent<A>,
    values: Extent<A>,
) -> bool {
    if !(queries.finite && keys.finite && values.finite) {
        return false;
    }
    let f = |x: A| x.to_f64().unwrap_or(f64::INFINITY);
    let limit = f(A::max_value()) / 4.0;
    let score_bound = depth as f64 * f(queries.max_abs) * f(scale.abs()) * f(keys.max_abs);
    let rows = queries.rows.max(values.rows);
    let Some(bias_bound) = masks
        .iter()
        .try_fold(0.0, |sum, mask| Some(sum + mask.bias_bound(rows)?))
    else {
        return false;
    };
    score_bound + bias_bound < limit && f(values.max_abs) * values.rows as f64 <= limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, s};

    #[test]
    fn a_scan_finds_the_extent_and_every_non_finite_entry() {
        // every position of a 5 x 7 head (lanes and tail), every kind of entry,
        // contiguous and not (a view of 7 of 8 columns scans row by row)
        for at in 0..35 {
            for (bad, finite) in [
                (f64::NAN, false),
                (f64::INFINITY, false),
                (-f64::INFINITY, false),
                (-9.0, true),
            ] {
                let mut x = Array2::from_shape_fn((5, 8), |(i, j)| (i * 7 + j) as f64 / 10.0 - 1.0);
                x[(at / 7, at % 7)] = bad;
                let strided = x.slice(s![.., ..7]);
                let contiguous = strided.to_owned();
                for extent in [extent_of(&strided), extent_of(&contiguous.view())] {
                    assert_eq!(extent.finite, finite, "{bad} at {at}");
                    if finite {
                        assert_eq!((extent.max_abs, extent.rows), (9.0, 5));
                    }
                }
            }
        }
        // a tiny head (fewer entries than lanes: the four-lane pass), then a
        // longer one after it in the same scan (every lane)
        for at in 0..12 {
            for bad in [f32::NAN, f32::INFINITY] {
                let mut tiny = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 - 6.0);
                tiny[(at / 4, at % 4)] = bad;
                assert!(!extent_of(&tiny.view()).finite, "{bad} at {at}");
                let mut scan = Scan::new();
                scan.add(tiny.as_slice().expect("contiguous"));
                scan.add(&[1.0; 40]);
                assert!(!scan.extent(4).finite, "{bad} at {at}, then more");
            }
        }
        let tiny = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 - 6.0);
        assert_eq!(extent_of(&tiny.view()).max_abs, 6.0);
        let x = Array2::from_shape_fn((3, 40), |(i, j)| -((i * 40 + j) as f32));
        let extent = extent_of(&x.view());
        assert!(extent.finite);
        assert_eq!(extent.max_abs, 119.0);
    }
}
