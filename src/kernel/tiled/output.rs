//! The type the tiled kernel writes its output in: the compute type itself, or
//! a half type, each row rounded once as its block finishes it (no `f32` copy
//! of the whole output to round afterwards).

use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

use crate::element::Half;
use crate::kernel::float::KernelFloat;
use crate::kernel::params::BR;

/// An output element of the tiled kernel computed in `A`.
pub(crate) trait Output<A: KernelFloat>: Copy + Send + Sync {
    /// `out[i] = values[i]`, rounded to this type; the slices are equally long.
    fn store(values: &[A], out: &mut [Self]);

    /// Writes row `i` of a block: its values are the tiles `o[ct·BR + i]`, `NR`
    /// columns each in order (the last may run past the row), times `inverse`.
    #[inline(always)]
    fn write_row<const NR: usize>(
        mut out: ArrayViewMut1<'_, Self>,
        (o, i): (&[[A; NR]], usize),
        inverse: A,
    ) {
        let Some(out) = out.as_slice_mut() else {
            for (ct, mut columns) in out.axis_chunks_iter_mut(Axis(0), NR).enumerate() {
                for (x, v) in columns.iter_mut().zip(&scaled(o[ct * BR + i], inverse)) {
                    Self::store(std::slice::from_ref(v), std::slice::from_mut(x));
                }
            }
            return;
        };
        // a whole tile rounded in registers (its length known), the last in part
        let (tiles, rest) = out.as_chunks_mut::<NR>();
        for (ct, columns) in tiles.iter_mut().enumerate() {
            Self::store(&scaled(o[ct * BR + i], inverse), columns);
        }
        if !rest.is_empty() {
            let last = scaled(o[tiles.len() * BR + i], inverse);
            Self::store(&last[..rest.len()], rest);
        }
    }

    /// `out = values`, rounded to this type, in any layout.
    fn assign(mut out: ArrayViewMut2<'_, Self>, values: ArrayView2<'_, A>) {
        out.zip_mut_with(&values, |x, v| {
            Self::store(std::slice::from_ref(v), std::slice::from_mut(x))
        });
    }
}

/// `tile · inverse`: a loop inlined into the token's code, where `array::map`
/// was a call out of line, compiled without the token's instructions (the bf16
/// output rows went from 12.7 % to 2.7 % of a call at N = 128 on Zen 5).
#[inline(always)]
fn scaled<A: KernelFloat, const NR: usize>(mut tile: [A; NR], inverse: A) -> [A; NR] {
    for x in &mut tile {
        *x *= inverse;
    }
    tile
}

/// The compute type: each row written straight from the tiles.
impl<A: KernelFloat> Output<A> for A {
    #[inline(always)]
    fn store(values: &[A], out: &mut [A]) {
        out.copy_from_slice(values);
    }

    fn assign(mut out: ArrayViewMut2<'_, A>, values: ArrayView2<'_, A>) {
        out.assign(&values);
    }
}

/// The half types: rounded to nearest, ties to even, as `from_f32`.
impl<H: Half> Output<f32> for H {
    #[inline(always)]
    fn store(values: &[f32], out: &mut [H]) {
        H::narrow(values, out);
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use ndarray::Array2;

    use super::*;

    /// A row of 20 columns (a whole tile of 16 and 4 more) written as bf16 from
    /// the tiles of row 3, contiguous and strided, is each value times the
    /// inverse rounded by `from_f32`; as f32, the product itself.
    #[test]
    fn rows_are_the_tiles_scaled_and_rounded() {
        const NR: usize = 16;
        let o: Vec<[f32; NR]> = (0..2 * BR)
            .map(|t| std::array::from_fn(|c| (t * NR + c) as f32 / 7.0 - 50.0))
            .collect();
        let (i, inverse) = (3, 1.0 / 3.0);
        let want = |c: usize| o[c / NR * BR + i][c % NR] * inverse;

        let mut row = [bf16::ZERO; 20];
        bf16::write_row::<NR>((&mut row[..]).into(), (&o, i), inverse);
        let mut strided = Array2::from_elem((20, 2), bf16::ZERO);
        bf16::write_row::<NR>(strided.column_mut(1), (&o, i), inverse);
        let mut wide = [0.0_f32; 20];
        f32::write_row::<NR>((&mut wide[..]).into(), (&o, i), inverse);
        for c in 0..20 {
            assert_eq!(row[c], bf16::from_f32(want(c)), "column {c}");
            assert_eq!(strided[[c, 1]], row[c], "column {c}, strided");
            assert_eq!(wide[c], want(c), "column {c}, f32");
        }
    }
}
