//! The forward calls in the compute type (`f32`, `f64`), and the way there from
//! any storage type: inputs, masks and scale converted (nothing is copied for
//! `f32` and `f64`), outputs rounded back.

use ndarray::{Array, Array2, Array4, ArrayRef, ArrayRef2, ArrayView, CowArray, Ix1};

use super::{AttentionOutput, ScaledDotProduct};
use crate::core::mask;
use crate::core::problem::{AttentionDim, Problem, lift_mut};
use crate::element::{Element, Storage};
use crate::error::Result;
use crate::flex::program::{Plain, Program};
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

    /// Every forward call, 2-D or batched, in any storage type: the inputs as
    /// they are stored (the kernel's plan reads them where they lie, or widens
    /// them), the output rounded back once.
    pub(super) fn attend<D: AttentionDim>(
        &self,
        q: ArrayView<'_, A, D>,
        k: ArrayView<'_, A, D>,
        v: ArrayView<'_, A, D>,
    ) -> Result<Array<A, D>> {
        self.attend_under(q, k, v, |_| Ok(Plain))
    }

    /// [`attend`](Self::attend) under the program `program` makes, once the
    /// call is checked, from the shape of its scores.
    pub(super) fn attend_under<D: AttentionDim, P: Program<A::Compute>>(
        &self,
        q: ArrayView<'_, A, D>,
        k: ArrayView<'_, A, D>,
        v: ArrayView<'_, A, D>,
        program: impl FnOnce([usize; 4]) -> Result<P>,
    ) -> Result<Array<A, D>> {
        self.solve_under(q, k, v, program, |problem| {
            let out = kernel::forward(problem, self.kernel, self.parallelism)?;
            Ok(D::unlift(out))
        })
    }

    /// The checked problem of a call in any storage type, under the program
    /// `program` makes from the shape of its scores, handed to `solve`: the
    /// queries, keys and values as they are stored (the kernel's plan reads
    /// them where they lie, or widens them).
    pub(super) fn solve_under<D: AttentionDim, P: Program<A::Compute>, R>(
        &self,
        q: ArrayView<'_, A, D>,
        k: ArrayView<'_, A, D>,
        v: ArrayView<'_, A, D>,
        program: impl FnOnce([usize; 4]) -> Result<P>,
        solve: impl FnOnce(&Problem<'_, A::Compute, A, P, A>) -> Result<R>,
    ) -> Result<R> {
        let slopes = self.slopes_in_compute();
        let attn = self.in_compute(&slopes);
        let problem = Problem::new(q, k, v, &attn.masks, attn.scale)?;
        let program = program(problem.scores())?;
        solve(&problem.with_program(&program))
    }
}

impl<'m, A: Element> ScaledDotProduct<'m, A> {
    /// The output and weights of a call of any shape, by the reference path
    /// (the only one that keeps the weights).
    pub(super) fn with_weights_compute<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
    ) -> Result<AttentionOutput<A, D>> {
        let problem = self.check(q, k, v)?;
        let [batch, heads, l, s] = problem.scores();
        let mut output = Array4::zeros((batch, heads, l, problem.v.dim().3));
        let mut weights = Array4::zeros((batch, heads, l, s));
        problem.solve(Some(output.view_mut()), Some(weights.view_mut()));
        Ok(AttentionOutput {
            output: D::unlift(output),
            weights: D::unlift(weights),
        })
    }

    pub(super) fn weights_compute(&self, q: &ArrayRef2<A>, k: &ArrayRef2<A>) -> Result<Array2<A>> {
        let problem = self.check(q, k, k)?;
        let mut weights = Array2::zeros((q.nrows(), k.nrows()));
        problem.solve(None, Some(lift_mut(weights.view_mut())));
        Ok(weights)
    }

    /// The checked problem of a call of any shape.
    pub(super) fn check<'a, D: AttentionDim>(
        &'a self,
        q: &'a ArrayRef<A, D>,
        k: &'a ArrayRef<A, D>,
        v: &'a ArrayRef<A, D>,
    ) -> Result<Problem<'a, A>> {
        Problem::new(q.view(), k.view(), v.view(), &self.masks, self.scale)
    }
}
