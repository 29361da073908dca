//! The weights of [`FlexAttention`], on the reference path.

use ndarray::{Array, Array4, ArrayRef};

use super::FlexAttention;
use crate::core::problem::{AttentionDim, Problem};
use crate::element::{Element, Storage};
use crate::error::Result;
use crate::flex::program::Program;
use crate::flex::{KeepMod, ScoreMod};
use crate::sdpa::AttentionOutput;

impl<A: Storage, F: ScoreMod<A::Compute>, K: KeepMod> FlexAttention<'_, A, F, K> {
    /// The weights of every query over the keys under the program (rows sum
    /// to 1 less the sink's share), for 2-D or batched inputs in any storage
    /// type.
    ///
    /// # Shapes
    ///
    /// `(L, S)` or `(batch, heads, L, S)`.
    ///
    /// # Errors
    ///
    /// As [`FlexAttention`].
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::ScaledDotProduct;
    /// use ndarray::{array, Array2};
    ///
    /// let x = Array2::<f64>::zeros((2, 4));
    /// let sinks = array![0.0];
    /// let w = ScaledDotProduct::new().with_sinks(&sinks).weights(&x, &x)?;
    /// assert!((w.sum_axis(ndarray::Axis(1))[0] - 2.0 / 3.0).abs() < 1e-15);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn weights<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
    ) -> Result<Array<A, D>> {
        Ok(self.solve(q, k, None)?.weights)
    }

    /// The output and the weights in one pass of the reference path (a
    /// layer's or a cache's call that shows its weights).
    pub(crate) fn forward_with_weights<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
    ) -> Result<AttentionOutput<A, D>> {
        self.solve(q, k, Some(v))
    }

    /// The weights, and the output where `v` is given (else empty), on the
    /// reference path in the compute type.
    fn solve<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: Option<&ArrayRef<A, D>>,
    ) -> Result<AttentionOutput<A, D>> {
        let (q, k) = (
            A::compute(q.view(), self.attention.parallelism),
            A::compute(k.view(), self.attention.parallelism),
        );
        let v = v.map(|v| A::compute(v.view(), self.attention.parallelism));
        let slopes = self.attention.slopes_in_compute();
        let attention = self.attention.in_compute(&slopes);
        let problem = attention.check(&q, &k, v.as_deref().unwrap_or(&k))?;
        let sinks = self.sinks_in_compute();
        let (output, weights) = if self.is_plain() {
            solve(&problem, v.is_some())
        } else {
            let program = self.program(problem.scores(), sinks.as_ref().map(|s| s.view()))?;
            solve(&problem.with_program(&program), v.is_some())
        };
        Ok(AttentionOutput {
            output: A::store(D::unlift(output), self.attention.parallelism),
            weights: A::store(D::unlift(weights), self.attention.parallelism),
        })
    }
}

/// The weights of `problem` (and its output, when `output`), 4-D.
fn solve<A: Element, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    output: bool,
) -> (Array4<A>, Array4<A>) {
    let [batch, heads, l, s] = problem.scores();
    let width = if output { problem.v.dim().3 } else { 0 };
    let mut out = Array4::zeros((batch, heads, l, width));
    let mut weights = Array4::zeros((batch, heads, l, s));
    problem.solve(output.then(|| out.view_mut()), Some(weights.view_mut()));
    (out, weights)
}
