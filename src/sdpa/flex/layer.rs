//! How a layer calls its attention with the soft-cap and sinks it was
//! configured with: one generic call, whatever score modification that makes.

use ndarray::{Array4, ArrayRef1, ArrayRef4};

use super::FlexAttention;
use crate::element::Storage;
use crate::error::Result;
use crate::flex::{ScoreMod, SoftCap};
use crate::sdpa::ScaledDotProduct;

/// A call a layer makes through its attention, whatever score modification
/// that attention carries: one generic method, as Rust's closures cannot be
/// generic.
pub(crate) trait LayerCall<A: Storage> {
    /// What the call returns.
    type Output;

    /// The call through `attention`.
    fn call<F: ScoreMod<A::Compute>>(
        self,
        attention: &FlexAttention<'_, A, F>,
    ) -> Result<Self::Output>;
}

/// A forward call over projected heads, with the weights when asked for.
pub(crate) struct Forward<'h, A> {
    pub(crate) q: &'h ArrayRef4<A>,
    pub(crate) k: &'h ArrayRef4<A>,
    pub(crate) v: &'h ArrayRef4<A>,
    pub(crate) weights: bool,
}

impl<A: Storage> LayerCall<A> for Forward<'_, A> {
    type Output = (Array4<A>, Option<Array4<A>>);

    fn call<F: ScoreMod<A::Compute>>(
        self,
        attention: &FlexAttention<'_, A, F>,
    ) -> Result<Self::Output> {
        let Forward { q, k, v, weights } = self;
        if weights {
            let out = attention.forward_with_weights(q, k, v)?;
            Ok((out.output, Some(out.weights)))
        } else {
            Ok((attention.forward(q, k, v)?, None))
        }
    }
}

impl<'m, A: Storage> ScaledDotProduct<'m, A> {
    /// `call` through this attention with a layer's soft-cap (Gemma 2) and
    /// sinks (gpt-oss), each optional; with neither, the plain kernels run.
    pub(crate) fn call_with<C: LayerCall<A>>(
        self,
        softcap: Option<A::Compute>,
        sinks: Option<&'m ArrayRef1<A>>,
        call: C,
    ) -> Result<C::Output> {
        let mut attention = FlexAttention::from(self);
        if let Some(sinks) = sinks {
            attention = attention.with_sinks(sinks);
        }
        match softcap {
            None => call.call(&attention),
            Some(cap) => call.call(&attention.with_score_mod(SoftCap::new(cap))),
        }
    }
}
