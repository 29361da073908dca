//! The matrix products of the layers, on the pool's threads: every part is
//! the same arithmetic whatever the number of threads, so the bits never
//! depend on it. A layer's forward products run on its weight packed once
//! ([`Packed`], `crate::kernel`'s `weight_product`); the backward's products
//! are here.

use ndarray::linalg::general_mat_mul;
use std::sync::OnceLock;

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use crate::element::Element;
use crate::error::Result;
use crate::kernel::PRODUCT_PARALLEL_MIN_WORK as PARALLEL_MIN_WORK;
use crate::kernel::{PackedWeight, pack_weight};

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
    use super::rows_per_part;

    #[test]
    fn products_are_shared_only_when_large_and_worth_it() {
        assert_eq!(rows_per_part(300, 96 * 80, 2), Some(160));
        assert_eq!(rows_per_part(300, 96 * 80, 1), None);
        assert_eq!(rows_per_part(16, 512 * 512, 2), None, "one part of 16 rows");
        assert_eq!(rows_per_part(64, 64 * 64, 2), None, "too little work");
    }
}
