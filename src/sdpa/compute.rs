//! The forward calls in the compute type (`f32`, `f64`), and the way there from
//! any storage type: inputs, masks and scale converted (nothing is copied for
//! `f32` and `f64`), outputs rounded back.

use ndarray::{Array2, Array4, ArrayRef2, ArrayRef4, CowArray, Ix1, Ix2, Ix4};

use super::{AttentionOutput, ScaledDotProduct};
use crate::core::mask;
use crate::core::problem::{lift_mut, Problem};
use crate::element::{Element, Half, PerStorage, Storage};
use crate::error::Result;
use crate::kernel;

impl<'m, A: Storage> ScaledDotProduct<'m, A> {
    /// The slopes of every ALiBi mask, in the compute type (borrowed for `f32`
    /// and `f64`); [`in_compute`](Self::in_compute) borrows them.
    pub(super) fn slopes_in_compute(&self) -> Vec<CowArray<'_, A::Compute, Ix1>> {
        mask::slopes_in_compute(&self.masks)
    }

    /// The same attention in the compute type.
    pub(super) fn in_compute<'s>(
        &'s self,
        slopes: &'s [CowArray<'s, A::Compute, Ix1>],
    ) -> ScaledDotProduct<'s, A::Compute> {
        ScaledDotProduct {
            scale: self.scale.map(A::to_compute),
            masks: mask::in_compute(&self.masks, slopes),
            kernel: self.kernel,
            parallelism: self.parallelism,
        }
    }
}

/// A batched call over half-precision inputs: the queries widened to `f32`, the
/// keys and values given to the kernel as they are stored (its plan reads them
/// where they lie, or widens them).
pub(super) type HalfFn<A> = for<'s, 'm, 'x> fn(
    &'s ScaledDotProduct<'m, A>,
    &'x ArrayRef4<A>,
    &'x ArrayRef4<A>,
    &'x ArrayRef4<A>,
) -> Result<Array4<A>>;

/// [`HalfFn`] where the storage type has one: the half types.
pub(super) struct HalfNative;

impl PerStorage for HalfNative {
    type Output<A: Storage> = Option<HalfFn<A>>;

    fn native<A: Element>(self) -> Option<HalfFn<A>> {
        None
    }

    fn half<H: Half>(self) -> Option<HalfFn<H>> {
        Some(half_native::<H>)
    }
}

fn half_native<H: Half>(
    attn: &ScaledDotProduct<'_, H>,
    q: &ArrayRef4<H>,
    k: &ArrayRef4<H>,
    v: &ArrayRef4<H>,
) -> Result<Array4<H>> {
    let q32 = H::compute(q.view());
    let slopes = attn.slopes_in_compute();
    let attn = attn.in_compute(&slopes);
    // the keys and values stay in the half type: the paths read them as they are
    let problem = Problem::new_4d(q32.view(), k.view(), v.view(), &attn.masks, attn.scale)?;
    let (batch, heads, l, _) = q.dim();
    let mut out = Array4::zeros((batch, heads, l, v.dim().3));
    let (kernel, parallelism) = (attn.kernel, attn.parallelism);
    kernel::forward_half(&problem, out.view_mut(), kernel, parallelism)?;
    Ok(H::store(out))
}

impl<'m, A: Element> ScaledDotProduct<'m, A> {
    pub(super) fn forward_compute(
        &self,
        q: &ArrayRef2<A>,
        k: &ArrayRef2<A>,
        v: &ArrayRef2<A>,
    ) -> Result<Array2<A>> {
        let problem = self.check_2d(q, k, v)?;
        let mut output = Array2::zeros((q.nrows(), v.ncols()));
        kernel::forward(
            &problem,
            lift_mut(output.view_mut()),
            self.kernel,
            self.parallelism,
        )?;
        Ok(output)
    }

    pub(super) fn forward_with_weights_compute(
        &self,
        q: &ArrayRef2<A>,
        k: &ArrayRef2<A>,
        v: &ArrayRef2<A>,
    ) -> Result<AttentionOutput<A, Ix2>> {
        let problem = self.check_2d(q, k, v)?;
        let mut output = Array2::zeros((q.nrows(), v.ncols()));
        let mut weights = Array2::zeros((q.nrows(), k.nrows()));
        problem.solve(
            Some(lift_mut(output.view_mut())),
            Some(lift_mut(weights.view_mut())),
        );
        Ok(AttentionOutput { output, weights })
    }

    pub(super) fn weights_compute(&self, q: &ArrayRef2<A>, k: &ArrayRef2<A>) -> Result<Array2<A>> {
        let problem = self.check_2d(q, k, k)?;
        let mut weights = Array2::zeros((q.nrows(), k.nrows()));
        problem.solve(None, Some(lift_mut(weights.view_mut())));
        Ok(weights)
    }

    pub(super) fn forward_batched_compute(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
    ) -> Result<Array4<A>> {
        let problem = self.check_4d(q, k, v)?;
        let (batch, heads, l, _) = q.dim();
        let mut output = Array4::zeros((batch, heads, l, v.dim().3));
        kernel::forward(&problem, output.view_mut(), self.kernel, self.parallelism)?;
        Ok(output)
    }

    pub(super) fn forward_batched_with_weights_compute(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
    ) -> Result<AttentionOutput<A, Ix4>> {
        let problem = self.check_4d(q, k, v)?;
        let (batch, heads, l, _) = q.dim();
        let mut output = Array4::zeros((batch, heads, l, v.dim().3));
        let mut weights = Array4::zeros((batch, heads, l, k.dim().2));
        problem.solve(Some(output.view_mut()), Some(weights.view_mut()));
        Ok(AttentionOutput { output, weights })
    }

    pub(super) fn check_2d<'a>(
        &'a self,
        q: &'a ArrayRef2<A>,
        k: &'a ArrayRef2<A>,
        v: &'a ArrayRef2<A>,
    ) -> Result<Problem<'a, A>> {
        Problem::new_2d(q.view(), k.view(), v.view(), &self.masks, self.scale)
    }

    pub(super) fn check_4d<'a>(
        &'a self,
        q: &'a ArrayRef4<A>,
        k: &'a ArrayRef4<A>,
        v: &'a ArrayRef4<A>,
    ) -> Result<Problem<'a, A>> {
        Problem::new_4d(q.view(), k.view(), v.view(), &self.masks, self.scale)
    }
}
