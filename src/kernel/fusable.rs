//! The pre-check of the tiled and row-wise paths: a head is computed by the fused
//! arithmetic only where that gives what the reference path gives. Inputs that
//! are not finite, or large enough that a score or a running sum could overflow,
//! go to the reference path, which defines what happens then.

use std::borrow::Cow;

use half::bf16;
use ndarray::{ArrayView1, ArrayView2};

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

/// Whether `x` is finite, its largest absolute entry, and its number of rows:
/// a head of a few vectors' worth as compiled here (choosing the CPU's
/// vectors took longer than their scan), a larger one with them.
#[inline]
pub(crate) fn extent_of<A: Magnitude>(x: &ArrayView2<'_, A>) -> Extent<A::Float> {
    if x.len() <= SMALL_SCAN {
        ExtentOf(x).run()
    } else {
        vectorized(ExtentOf(x))
    }
}

/// The entries up to which a head is scanned without choosing the CPU's vectors.
const SMALL_SCAN: usize = 64;

/// [`extent_of`] as a [`Sweep`]: compiled with the CPU's vectors.
struct ExtentOf<'a, 'x, A>(&'a ArrayView2<'x, A>);

impl<A: Magnitude> Sweep for ExtentOf<'_, '_, A> {
    type Output = Extent<A::Float>;

    #[inline(always)]
    fn run(self) -> Extent<A::Float> {
        let x = self.0;
        let mut scan = Scan::new();
        match x.as_slice_memory_order() {
            Some(all) => scan.add(all),
            None => x.outer_iter().for_each(|row| scan.add(&row_slice(row))),
        }
        scan.extent(x.nrows())
    }
}

/// A row as a slice: borrowed where it is contiguous, copied where it is not.
fn row_slice<A: Clone>(row: ArrayView1<'_, A>) -> Cow<'_, [A]> {
    match row.to_slice() {
        Some(row) => Cow::Borrowed(row),
        None => Cow::Owned(row.to_vec()),
    }
}

/// A float whose magnitudes order as the integers of their bits below the
/// sign (IEEE 754, and bf16 as its upper half): the largest `|x|` of many is
/// the largest of those integers, infinity's is [`INFINITY`](Self::INFINITY)
/// and a NaN's larger. The integers are signed (their sign bit is clear), so
/// that AVX2 compares 64-bit ones in one instruction.
pub(crate) trait Magnitude: Copy {
    type Bits: Copy + Ord + Default;
    const INFINITY: Self::Bits;

    /// The type an [`Extent`] of these values is stated in.
    type Float;

    /// The bits of `|self|`.
    fn magnitude(self) -> Self::Bits;

    /// The float of the bits of a magnitude.
    fn of_magnitude(bits: Self::Bits) -> Self::Float;
}

impl Magnitude for f32 {
    type Bits = i32;
    const INFINITY: i32 = 0x7f80_0000;
    type Float = f32;

    #[inline(always)]
    fn magnitude(self) -> i32 {
        (self.to_bits() & 0x7fff_ffff) as i32
    }

    fn of_magnitude(bits: i32) -> f32 {
        f32::from_bits(bits as u32)
    }
}

impl Magnitude for f64 {
    type Bits = i64;
    const INFINITY: i64 = 0x7ff0_0000_0000_0000;
    type Float = f64;

    #[inline(always)]
    fn magnitude(self) -> i64 {
        (self.to_bits() & 0x7fff_ffff_ffff_ffff) as i64
    }

    fn of_magnitude(bits: i64) -> f64 {
        f64::from_bits(bits as u64)
    }
}

/// bf16's bits are an f32's upper half: its extent is stated in f32.
impl Magnitude for bf16 {
    type Bits = i16;
    const INFINITY: i16 = 0x7f80;
    type Float = f32;

    #[inline(always)]
    fn magnitude(self) -> i16 {
        (self.to_bits() & 0x7fff) as i16
    }

    fn of_magnitude(bits: i16) -> f32 {
        f32::from_bits(u32::from(bits as u16) << 16)
    }
}

/// An [`Extent`] gathered slice by slice, so that a pass that reads the rows for
/// another reason (packing) finds it on the way.
pub(crate) struct Scan<A: Magnitude> {
    /// The largest magnitude so far: one integer maximum an entry, a reduction
    /// the compiler runs in vector registers (the floats' maximum and a sum
    /// of `x·0` to catch a NaN were a maximum and an addition per entry, the
    /// sum a chain the compiler may not reorder).
    largest: A::Bits,
}

impl<A: Magnitude> Scan<A> {
    pub(crate) fn new() -> Self {
        Scan {
            largest: A::Bits::default(),
        }
    }

    /// Takes in the entries of `values`.
    #[inline(always)]
    pub(crate) fn add(&mut self, values: &[A]) {
        // a plain fold: lanes spelled out as an array of maxima made the
        // compiler vectorise across them with gathers
        self.largest = (values.iter()).fold(self.largest, |m, &x| m.max(x.magnitude()));
    }

    /// The extent of `values`, `rows` rows.
    #[inline(always)]
    pub(crate) fn whole(values: &[A], rows: usize) -> Extent<A::Float> {
        let mut scan = Scan::new();
        scan.add(values);
        scan.extent(rows)
    }

    /// The extent of everything added, `rows` rows.
    #[inline]
    pub(crate) fn extent(&self, rows: usize) -> Extent<A::Float> {
        Extent {
            finite: self.largest < A::INFINITY,
            max_abs: A::of_magnitude(self.largest),
            rows,
        }
    }
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
        // every position of a 5 x 7 head (vectors and tail; a head this small
        // is scanned without choosing the CPU's vectors), every kind of entry,
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
        // a tiny head (fewer entries than a vector: the fold's tail), then a
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
        // every position of a head of 200 f32 entries, past the vectors' width
        // (the vectorised loop's body, with the CPU's vectors: more than
        // SMALL_SCAN entries), and the largest magnitude anywhere
        const { assert!(SMALL_SCAN < 200 && 35 <= SMALL_SCAN) };
        for at in 0..200 {
            let mut x = Array2::from_shape_fn((5, 40), |(i, j)| (i * 40 + j) as f32 / 1000.0);
            for (bad, finite) in [(f32::NAN, false), (-f32::INFINITY, false), (-7.5, true)] {
                x[(at / 40, at % 40)] = bad;
                let extent = extent_of(&x.view());
                assert_eq!(extent.finite, finite, "{bad} at {at}");
                if finite {
                    assert_eq!(extent.max_abs, 7.5, "at {at}");
                }
            }
        }
    }

    /// The extent from the bits is the extent of the widened values (their
    /// largest magnitude where all are finite): every bf16 magnitude with
    /// either sign, infinity and NaN among them.
    #[test]
    fn a_bf16_scan_reads_the_bits_as_the_f32_scan_reads_the_values() {
        let every: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        for window in every.chunks(997) {
            let wide: Vec<f32> = window.iter().map(|x| x.to_f32()).collect();
            let (bits, values) = (Scan::whole(window, 3), Scan::whole(&wide, 3));
            assert_eq!(bits.finite, values.finite);
            assert_eq!(bits.rows, values.rows);
            if values.finite {
                assert_eq!(bits.max_abs, values.max_abs);
            }
        }
    }
}
