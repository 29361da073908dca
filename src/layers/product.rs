//! The matrix products of the layers, on the pool's threads: every part is
//! the same arithmetic whatever the number of threads, so the bits never
//! depend on it. A layer's forward products of more than one row run on its
//! weight packed once ([`Packed`], `crate::kernel`'s `weight_product`); the
//! backward's products and the one row of a decoding step are here.

use ndarray::linalg::general_mat_mul;
use std::sync::OnceLock;

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use crate::element::Element;
use crate::error::Result;
use crate::kernel::PRODUCT_PARALLEL_MIN_WORK as PARALLEL_MIN_WORK;
use crate::kernel::{PackedWeight, pack_weight, scaled_rows};

/// Rows of `W` per part of a row-by-row product: the parts are summed in
/// order, and run on the pool's threads where there are several.
const ROW_BY_ROW_PART: usize = 256;

/// A layer's weight packed for the kernels' register tiles, made by the first
/// product that uses it. A copy of the weight, not a part of the layer's value:
/// equal layers are equal packed or not.
#[derive(Clone)]
pub(crate) struct Packed<A>(OnceLock<PackedWeight<A>>);

impl<A: Element> Packed<A> {
    /// Nothing packed yet.
    pub(crate) fn empty() -> Self {
        Packed(OnceLock::new())
    }

    /// `w` packed, now if no product has packed it yet.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when
    /// `ATTN_KERNEL_ARCH` names no instruction set.
    pub(crate) fn get_or_pack(&self, w: &ArrayView2<'_, A>) -> Result<&PackedWeight<A>> {
        if let Some(packed) = self.0.get() {
            return Ok(packed);
        }
        // two threads may both pack; one copy is kept
        let packed = pack_weight(w)?;
        Ok(self.0.get_or_init(|| packed))
    }
}

impl<A> PartialEq for Packed<A> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<A> std::fmt::Debug for Packed<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            Some(packed) => write!(f, "{packed:?}"),
            None => write!(f, "not packed"),
        }
    }
}

/// `a·b`, the rows of `a` shared among the pool's threads where
/// [`rows_per_part`] says the product is worth sharing: each part is the same
/// product over fewer rows, so its bits do not depend on the thread count.
pub(crate) fn product<A: Element>(a: &ArrayView2<'_, A>, b: &ArrayView2<'_, A>) -> Array2<A> {
    let (n, depth) = a.dim();
    let mut out = Array2::zeros((n, b.ncols()));
    let threads = rayon::current_num_threads();
    let Some(rows) = rows_per_part(n, depth * b.ncols(), threads) else {
        general_mat_mul(A::one(), a, b, A::zero(), &mut out);
        return out;
    };
    let parts: Vec<_> = out
        .axis_chunks_iter_mut(Axis(0), rows)
        .zip(a.axis_chunks_iter(Axis(0), rows))
        .collect();
    parts
        .into_par_iter()
        .for_each(|(mut c, a)| general_mat_mul(A::one(), &a, b, A::zero(), &mut c));
    out
}

/// `x·w` for a few rows of `x` (a decoding step projects one token): rows of
/// `w` scaled and summed with this machine's vectors (the kernel's
/// `scaled_rows`), so that `w` is read once and never packed. The rows
/// of `w` are cut into parts of [`ROW_BY_ROW_PART`], each summed on its own
/// (on the pool's threads, each reading its own contiguous part of `w`), then
/// added in part order: the parts depend on the shapes only, so the bits do
/// not depend on the thread count.
///
/// # Errors
///
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when
/// `ATTN_KERNEL_ARCH` names no instruction set.
pub(crate) fn row_by_row<A: Element>(
    x: &ArrayView2<'_, A>,
    w: &ArrayView2<'_, A>,
) -> Result<Array2<A>> {
    let part = |(x, w): (ArrayView2<'_, A>, ArrayView2<'_, A>)| {
        let mut out = Array2::zeros((x.nrows(), w.ncols()));
        let slice = out.as_slice_mut().expect("a new array is contiguous");
        scaled_rows(&x, &w, slice).map(|()| out)
    };
    let parts: Vec<_> = x
        .axis_chunks_iter(Axis(1), ROW_BY_ROW_PART)
        .zip(w.axis_chunks_iter(Axis(0), ROW_BY_ROW_PART))
        .collect();
    let sums: Vec<Array2<A>> = if parts.len() > 1 && rayon::current_num_threads() > 1 {
        parts.into_par_iter().map(part).collect::<Result<_>>()?
    } else {
        parts.into_iter().map(part).collect::<Result<_>>()?
    };
    let mut sums = sums.into_iter();
    let mut out = sums
        .next()
        .unwrap_or_else(|| Array2::zeros((x.nrows(), w.ncols())));
    for sum in sums {
        out += &sum;
    }
    Ok(out)
}

/// The rows of each of `threads` parts of a product of `n` rows of
/// `work_per_row` multiply-adds (a multiple of 16, for whole register tiles),
/// or `None` when one thread should do it all.
pub(crate) fn rows_per_part(n: usize, work_per_row: usize, threads: usize) -> Option<usize> {
    let work = n.saturating_mul(work_per_row);
    let rows = n.div_ceil(threads.max(1)).next_multiple_of(16);
    (threads > 1 && work >= PARALLEL_MIN_WORK && rows < n).then_some(rows)
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::{ROW_BY_ROW_PART, row_by_row, rows_per_part};
    use crate::on_threads;

    #[test]
    fn products_are_shared_only_when_large_and_worth_it() {
        assert_eq!(rows_per_part(300, 96 * 80, 2), Some(160));
        assert_eq!(rows_per_part(300, 96 * 80, 1), None);
        assert_eq!(rows_per_part(16, 512 * 512, 2), None, "one part of 16 rows");
        assert_eq!(rows_per_part(64, 64 * 64, 2), None, "too little work");
    }

    /// A few rows projected part by part: the same bits on one thread and two,
    /// the product's value, and zeros from a weight of no rows.
    #[test]
    fn row_by_row_parts_have_the_bits_of_one_thread() {
        let (width, out) = (2 * ROW_BY_ROW_PART + 3, 70);
        let rows = 4; // a decoding step's few tokens
        let x = Array2::from_shape_fn((rows, width), |(i, j)| {
            ((i * 31 + j * 17) % 101) as f64 / 37.0 - 1.3
        });
        let w = Array2::from_shape_fn((width, out), |(i, j)| {
            ((i * 7 + j * 29) % 89) as f64 / 41.0 - 1.1
        });
        let on = |threads| on_threads(threads, || row_by_row(&x.view(), &w.view()).expect("valid"));
        let one = on(1);
        assert_eq!(on(2), one);
        // the vectors' sums are the scalar ones, part by part, bit for bit
        let mut want = Array2::<f64>::zeros((rows, out));
        for (xp, wp) in x
            .axis_chunks_iter(ndarray::Axis(1), ROW_BY_ROW_PART)
            .zip(w.axis_chunks_iter(ndarray::Axis(0), ROW_BY_ROW_PART))
        {
            let mut sum = Array2::<f64>::zeros((rows, out));
            for ((i, c), s) in sum.indexed_iter_mut() {
                for j in 0..xp.ncols() {
                    *s += xp[[i, j]] * wp[[j, c]];
                }
            }
            want += &sum;
        }
        assert_eq!(one, want);
        let e = (&one - &x.dot(&w))
            .iter()
            .fold(0.0_f64, |m, d| m.max(d.abs()));
        assert!(e < 1e-12, "{e:e}");
        let none = row_by_row(
            &x.slice(ndarray::s![.., ..0]),
            &w.slice(ndarray::s![..0, ..]),
        )
        .expect("valid");
        assert_eq!(none, Array2::<f64>::zeros((rows, out)));
    }
}
