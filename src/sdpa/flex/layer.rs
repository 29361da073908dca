//! A layer's attention with the soft-cap and sinks it was configured with:
//! one score modification type for a soft-cap or none, so that a layer builds
//! one set of programmed kernels (and runs the plain ones where it has
//! neither a soft-cap nor sinks).

use ndarray::{Array4, ArrayRef1, ArrayRef4, NdFloat};

use super::FlexAttention;
use crate::element::{Element, Storage};
use crate::error::Result;
use crate::flex::{At, ScoreMod, SoftCap};
use crate::sdpa::ScaledDotProduct;

/// Gemma 2's soft-cap, or scores as they are (a layer with sinks alone).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerScore<A>(Option<SoftCap<A>>);

impl<A: Element> ScoreMod<A> for LayerScore<A> {
    #[inline(always)]
    fn score(&self, score: A, at: At) -> A {
        match &self.0 {
            Some(cap) => cap.score(score, at),
            None => score,
        }
    }

    #[inline(always)]
    fn score_row(&self, first: At, row: &mut [A])
    where
        A: Copy,
    {
        // decided once a row: no branch per score
        if let Some(cap) = &self.0 {
            cap.score_row(first, row);
        }
    }

    #[inline(always)]
    fn derivative(&self, score: A, at: At) -> A {
        match &self.0 {
            Some(cap) => cap.derivative(score, at),
            None => A::one(),
        }
    }

    #[inline(always)]
    fn backward_row(&self, first: At, scores: &[A], upstream: &mut [A], _: &mut [A])
    where
        A: NdFloat,
    {
        // a layer's cap is a setting, not a parameter: its gradient is dropped
        if let Some(cap) = &self.0 {
            cap.backward_row(first, scores, upstream, &mut [A::zero()]);
        }
    }

    fn check(&self, scores: [usize; 4]) -> Result<()> {
        self.0.as_ref().map_or(Ok(()), |cap| cap.check(scores))
    }

    fn is_identity(&self) -> bool {
        self.0.is_none()
    }
}

impl<'m, A: Storage> ScaledDotProduct<'m, A> {
    /// This attention with a layer's soft-cap (Gemma 2) and sinks (gpt-oss),
    /// each optional; with neither, its calls run the plain kernels.
    pub(crate) fn layered(
        self,
        softcap: Option<A::Compute>,
        sinks: Option<&'m ArrayRef1<A>>,
    ) -> FlexAttention<'m, A, LayerScore<A::Compute>> {
        let attention =
            FlexAttention::from(self).with_score_mod(LayerScore(softcap.map(SoftCap::new)));
        match sinks {
            Some(sinks) => attention.with_sinks(sinks),
            None => attention,
        }
    }
}

impl<A: Storage> FlexAttention<'_, A, LayerScore<A::Compute>> {
    /// The output over projected heads, and the weights when asked for.
    pub(crate) fn forward_heads(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        weights: bool,
    ) -> Result<(Array4<A>, Option<Array4<A>>)> {
        if weights {
            let out = self.forward_with_weights(q, k, v)?;
            Ok((out.output, Some(out.weights)))
        } else {
            Ok((self.forward(q, k, v)?, None))
        }
    }
}
