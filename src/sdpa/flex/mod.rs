//! Programmable attention's calls: [`FlexAttention`], scaled dot-product
//! attention with a score modification, a block mask and attention sinks,
//! forward and backward through the fused kernels.

mod layer;
mod weights;

pub(crate) use layer::LayerScore;

use ndarray::{Array, Array1, ArrayD, ArrayRef, ArrayRef1, ArrayView1, CowArray, Dimension, Ix1};

use super::ScaledDotProduct;
use super::lse::AttentionLse;
use crate::core::problem::AttentionDim;
use crate::element::{Element, Storage};
use crate::error::{Error, Result};
use crate::flex::blocks::BlockMask;
use crate::flex::function::{Identity, KeepAll, KeepMod, ScoreMod};
use crate::flex::program::{Flex, Plain};
use crate::kernel::Parallelism;

/// Scaled dot-product attention programmed by the user: a score modification
/// `F` ([`ScoreMod`]), a block mask over a keep predicate `K` ([`BlockMask`]),
/// and attention sinks, together with every option of the
/// [`ScaledDotProduct`] it was made from (scale, [`Mask`](crate::Mask)s,
/// kernel, threads):
///
/// `softmax(f(QKᵀ·scale) + bias, masked by the masks and the predicate)·V`,
/// with, per query head `h`, a sink logit `σₕ` in the softmax's denominator
/// (gpt-oss's sinks: `exp(sⱼ − m) / (Σₖ exp(sₖ − m) + exp(σₕ − m))`).
///
/// The fused kernels run the program, monomorphised, in every path (tiled,
/// direct, row-wise, backward), in f32, f64 and half-precision storage; blocks
/// the mask empties are skipped, blocks it keeps whole never call the
/// predicate. The backward returns the gradients of the queries, keys,
/// values, biases, the modification's parameters and the sinks
/// ([`FlexGradients`]).
///
/// Made by [`ScaledDotProduct::with_score_mod`],
/// [`with_block_mask`](ScaledDotProduct::with_block_mask) or
/// [`with_sinks`](ScaledDotProduct::with_sinks), and the same calls on it.
///
/// # Shapes
///
/// As [`ScaledDotProduct::forward_with_lse`]: 2-D `q: (L, d_k)`, `k: (S, d_k)`,
/// `v: (S, d_v)` or batched `q: (batch, heads, L, d_k)`,
/// `k: (batch, kv_heads, S, d_k)`, `v: (batch, kv_heads, S, d_v)`. The block
/// mask's shape must broadcast to `(batch, heads, L, S)` (`(1, 1, L, S)` for
/// 2-D); sinks are `(heads,)` (`(1,)` for 2-D).
///
/// # Errors
///
/// Those of [`ScaledDotProduct::forward_with_lse`], and
/// [`Error::MaskShape`] for a block mask of another shape,
/// [`Error::Shape`] for sinks of another length, [`Error::InvalidConfig`] for
/// a sink that is not finite.
///
/// # Examples
///
/// Gemma 2's soft-capping and a causal mask written as a predicate:
///
/// ```
/// use attn::flex::{At, BlockMask, SoftCap};
/// use attn::ScaledDotProduct;
/// use ndarray::Array2;
///
/// let x = Array2::from_shape_fn((6, 4), |(i, j)| (i * j) as f64 * 0.5);
/// let causal = BlockMask::new(|at: At| at.key <= at.query, [1, 1, 6, 6])?;
/// let attention = ScaledDotProduct::new()
///     .with_score_mod(SoftCap::new(5.0))
///     .with_block_mask(&causal);
/// let out = attention.forward(&x, &x, &x)?;
/// assert_eq!(out.row(0), x.row(0)); // the first query sees only itself
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct FlexAttention<'m, A, F = Identity, K = KeepAll> {
    attention: ScaledDotProduct<'m, A>,
    score: F,
    blocks: Option<&'m BlockMask<K>>,
    sinks: Option<CowArray<'m, A, Ix1>>,
}

/// The gradients of a loss through [`FlexAttention`]: by its inputs, biases,
/// score modification and sinks.
///
/// # Shapes
///
/// `q`, `k`, `v` and `bias` as in [`AttentionGradients`](crate::AttentionGradients);
/// `score: (parameters,)` ([`ScoreMod::parameters`]); `sinks: (heads,)` when
/// the call had sinks.
///
/// # Examples
///
/// ```
/// use attn::ScaledDotProduct;
/// use ndarray::{array, Array2};
///
/// let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
/// let sinks = array![0.5];
/// let attention = ScaledDotProduct::new().with_sinks(&sinks);
/// let g = attention.backward(&x, &x, &x, &Array2::ones((2, 2)))?;
/// assert!(g.sinks.unwrap()[0] < 0.0); // a larger sink takes weight from the values
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FlexGradients<A: Storage, D: Dimension> {
    /// `∂loss/∂q`.
    pub q: Array<A, D>,
    /// `∂loss/∂k`.
    pub k: Array<A, D>,
    /// `∂loss/∂v`.
    pub v: Array<A, D>,
    /// `∂loss/∂bias` for every [`Mask::Bias`](crate::Mask::Bias), in order, each
    /// shaped like its bias.
    pub bias: Vec<ArrayD<A>>,
    /// `∂loss/∂θ` for the score modification's parameters, in the compute type
    /// (the parameters' own: `f32` for `bf16` and `f16`).
    pub score: Array1<A::Compute>,
    /// `∂loss/∂σ` for the sinks, when the call had them.
    pub sinks: Option<Array1<A>>,
}

impl<'m, A: Storage> ScaledDotProduct<'m, A> {
    /// This attention with a score modification (see [`FlexAttention`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::flex::{At, score_mod};
    /// use attn::ScaledDotProduct;
    /// use ndarray::array;
    ///
    /// // a bias that favours the first key
    /// let first = score_mod(|s: f64, at: At| if at.key == 0 { s + 10.0 } else { s }, |_, _| 1.0);
    /// let x = array![[1.0, 0.0], [0.0, 1.0]];
    /// let out = ScaledDotProduct::new().with_score_mod(first).forward(&x, &x, &x)?;
    /// assert!(out[[1, 0]] > 0.99);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_score_mod<F: ScoreMod<A::Compute>>(self, score: F) -> FlexAttention<'m, A, F> {
        FlexAttention::from(self).with_score_mod(score)
    }

    /// This attention under a block mask (see [`FlexAttention`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::flex::{At, BlockMask};
    /// use attn::ScaledDotProduct;
    /// use ndarray::Array2;
    ///
    /// let x = Array2::<f32>::eye(3);
    /// let diagonal = BlockMask::new(|at: At| at.key == at.query, [1, 1, 3, 3])?;
    /// let out = ScaledDotProduct::new().with_block_mask(&diagonal).forward(&x, &x, &x)?;
    /// assert_eq!(out, x); // each query sees only its own key
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_block_mask<K: KeepMod>(
        self,
        blocks: &'m BlockMask<K>,
    ) -> FlexAttention<'m, A, Identity, K> {
        FlexAttention::from(self).with_block_mask(blocks)
    }

    /// This attention with one sink logit per query head (see [`FlexAttention`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::ScaledDotProduct;
    /// use ndarray::{array, Array2};
    ///
    /// let x = Array2::<f64>::zeros((2, 4));
    /// let v = Array2::<f64>::ones((2, 4));
    /// // two keys of score 0 and a sink of 0: each key weighs 1/3
    /// let out = ScaledDotProduct::new().with_sinks(&array![0.0]).forward(&x, &x, &v)?;
    /// assert!((out[[0, 0]] - 2.0 / 3.0).abs() < 1e-15);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_sinks(self, sinks: &'m ArrayRef1<A>) -> FlexAttention<'m, A> {
        FlexAttention::from(self).with_sinks(sinks)
    }
}

impl<'m, A> From<ScaledDotProduct<'m, A>> for FlexAttention<'m, A> {
    fn from(attention: ScaledDotProduct<'m, A>) -> Self {
        FlexAttention {
            attention,
            score: Identity,
            blocks: None,
            sinks: None,
        }
    }
}

impl<'m, A: Storage, F, K> FlexAttention<'m, A, F, K> {
    /// The same attention with the score modification `score` instead.
    pub fn with_score_mod<G: ScoreMod<A::Compute>>(self, score: G) -> FlexAttention<'m, A, G, K> {
        FlexAttention {
            attention: self.attention,
            score,
            blocks: self.blocks,
            sinks: self.sinks,
        }
    }

    /// The same attention under the block mask `blocks` instead.
    pub fn with_block_mask<L: KeepMod>(
        self,
        blocks: &'m BlockMask<L>,
    ) -> FlexAttention<'m, A, F, L> {
        FlexAttention {
            attention: self.attention,
            score: self.score,
            blocks: Some(blocks),
            sinks: self.sinks,
        }
    }

    /// The same attention with sinks `sinks`, one logit per query head.
    pub fn with_sinks(mut self, sinks: &'m ArrayRef1<A>) -> Self {
        self.sinks = Some(sinks.view().into());
        self
    }

    /// The score modification.
    pub fn score_mod(&self) -> &F {
        &self.score
    }
}

impl<A: Storage, F: ScoreMod<A::Compute>, K: KeepMod> FlexAttention<'_, A, F, K> {
    /// Attention's output under the program, for 2-D or batched inputs in any
    /// storage type (computed in its compute type, rounded once).
    ///
    /// # Shapes
    ///
    /// As [`FlexAttention`]: `(L, d_v)` or `(batch, heads, L, d_v)`.
    ///
    /// # Errors
    ///
    /// As [`FlexAttention`].
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::flex::RelativeBias;
    /// use attn::ScaledDotProduct;
    /// use ndarray::{Array1, Array4};
    ///
    /// let x = Array4::<f32>::from_shape_fn((1, 2, 5, 4), |(_, h, i, j)| (h + i * j) as f32 * 0.1);
    /// let bias = RelativeBias::new(Array1::linspace(-1.0, 1.0, 9)); // k − q from −4 to 4
    /// let out = ScaledDotProduct::new().with_score_mod(bias).forward(&x, &x, &x)?;
    /// assert_eq!(out.dim(), (1, 2, 5, 4));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
    ) -> Result<Array<A, D>> {
        let (q, k, v) = (q.view(), k.view(), v.view());
        if self.is_plain() {
            return self.attention.attend(q, k, v);
        }
        let sinks = self.sinks_in_compute();
        let sinks = sinks.as_ref().map(|sinks| sinks.view());
        let program = |scores| self.program(scores, sinks);
        self.attention.attend_under(q, k, v, program)
    }

    /// Whether the program adds nothing to plain attention: then the call
    /// runs the plain kernels.
    fn is_plain(&self) -> bool {
        self.score.is_identity() && self.blocks.is_none() && self.sinks.is_none()
    }

    /// The sinks in the compute type.
    fn sinks_in_compute(&self) -> Option<CowArray<'_, A::Compute, Ix1>> {
        self.sinks
            .as_ref()
            .map(|sinks| A::compute(sinks.view(), Parallelism::Sequential))
    }

    /// The program of a call whose scores have the shape `scores`, checked
    /// against it.
    fn program<'p>(
        &'p self,
        scores: [usize; 4],
        sinks: Option<ArrayView1<'p, A::Compute>>,
    ) -> Result<Flex<'p, A::Compute, F, K>> {
        let heads = scores[1];
        if let Some(blocks) = self.blocks {
            blocks.check(scores)?;
        }
        self.score.check(scores)?;
        if let Some(sinks) = sinks {
            check_sinks(sinks, heads)?;
        }
        Ok(Flex {
            score: &self.score,
            blocks: self.blocks,
            sinks,
        })
    }
}

impl<A: Storage, F: ScoreMod<A::Compute>, K: KeepMod> FlexAttention<'_, A, F, K> {
    /// [`forward`](Self::forward), also returning each row's log-sum-exp (the
    /// sink included) for [`backward_with_lse`](Self::backward_with_lse).
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
    /// let x = Array2::<f64>::zeros((1, 2));
    /// let out = ScaledDotProduct::new().with_sinks(&array![0.0]).forward_with_lse(&x, &x, &x)?;
    /// assert!((out.lse[0] - 2f64.ln()).abs() < 1e-15); // one key of score 0 and the sink
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_with_lse<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
    ) -> Result<AttentionLse<A, D>> {
        if self.is_plain() {
            return self.attention.forward_with_lse(q, k, v);
        }
        let sinks = self.sinks_in_compute();
        let sinks = sinks.as_ref().map(|sinks| sinks.view());
        let program = |scores| self.program(scores, sinks);
        self.attention.lse_under([q, k, v], program)
    }

    /// The gradients of a loss through this attention given `d_out =
    /// ∂loss/∂output`, running the forward again inside the fused backward.
    /// In `bf16` and `f16` the pass runs in `f32` on the widened inputs (on AMX
    /// tiles for `bf16`, where the CPU has them) and each gradient of an input
    /// or a sink is rounded once, as [`ScaledDotProduct::backward`]'s.
    ///
    /// # Shapes
    ///
    /// `d_out` has the output's shape; see [`FlexGradients`].
    ///
    /// # Errors
    ///
    /// As [`FlexAttention`], and [`Error::Shape`] for a `d_out` of another shape.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::flex::SoftCap;
    /// use attn::ScaledDotProduct;
    /// use ndarray::Array2;
    ///
    /// let x = Array2::from_shape_fn((3, 2), |(i, j)| (i + 2 * j) as f64);
    /// let attention = ScaledDotProduct::new().with_score_mod(SoftCap::new(1.5));
    /// let g = attention.backward(&x, &x, &x, &Array2::ones((3, 2)))?;
    /// assert_eq!(g.score.len(), 1); // the cap's gradient
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
        d_out: &ArrayRef<A, D>,
    ) -> Result<FlexGradients<A, D>> {
        self.gradients([q, k, v], None, d_out)
    }

    /// [`backward`](Self::backward) from a kept forward
    /// ([`forward_with_lse`](Self::forward_with_lse) of the same inputs): the
    /// forward is not run again.
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward), and [`Error::Shape`] for a kept forward
    /// of another shape.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::ScaledDotProduct;
    /// use ndarray::{array, Array2};
    ///
    /// let x = Array2::from_shape_fn((3, 2), |(i, j)| (i * j) as f64);
    /// let sinks = array![0.3];
    /// let attention = ScaledDotProduct::new().with_sinks(&sinks);
    /// let forward = attention.forward_with_lse(&x, &x, &x)?;
    /// let d_out = Array2::ones((3, 2));
    /// let kept = attention.backward_with_lse(&x, &x, &x, &forward, &d_out)?;
    /// let again = attention.backward(&x, &x, &x, &d_out)?;
    /// assert!((kept.q - again.q).iter().all(|d| d.abs() < 1e-14));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward_with_lse<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
        forward: &AttentionLse<A, D>,
        d_out: &ArrayRef<A, D>,
    ) -> Result<FlexGradients<A, D>> {
        self.gradients([q, k, v], Some(forward), d_out)
    }

    /// Every backward call, in any storage type: the inputs (and the kept
    /// output) in the compute type, each gradient of the inputs rounded back
    /// once, the score modification's in the compute type (its parameters').
    fn gradients<D: AttentionDim>(
        &self,
        inputs: [&ArrayRef<A, D>; 3],
        forward: Option<&AttentionLse<A, D>>,
        d_out: &ArrayRef<A, D>,
    ) -> Result<FlexGradients<A, D>> {
        let grads = if self.is_plain() {
            (self.attention).gradients_in_compute(inputs, forward, d_out, |_| Ok(Plain))?
        } else {
            let sinks = self.sinks_in_compute();
            let sinks = sinks.as_ref().map(|sinks| sinks.view());
            let program = |scores| self.program(scores, sinks);
            (self.attention).gradients_in_compute(inputs, forward, d_out, program)?
        };
        let inputs = (self.attention).stored([grads.dq, grads.dk, grads.dv], grads.bias);
        Ok(FlexGradients {
            bias: inputs.bias,
            q: inputs.q,
            k: inputs.k,
            v: inputs.v,
            score: grads.score,
            sinks: (self.sinks.is_some())
                .then(|| A::store(grads.sinks, self.attention.parallelism)),
        })
    }
}

/// Checks sinks for `heads` query heads: one logit per head, each finite.
///
/// # Errors
///
/// [`Error::Shape`] for another length, [`Error::InvalidConfig`] for a logit
/// that is not finite.
pub(crate) fn check_sinks<E: Element>(sinks: ArrayView1<'_, E>, heads: usize) -> Result<()> {
    if sinks.len() != heads {
        return Err(Error::Shape {
            what: "sinks (one logit per query head)",
            expected: vec![heads],
            found: vec![sinks.len()],
        });
    }
    match sinks.iter().find(|&&x| !finite(x)) {
        Some(bad) => Err(Error::InvalidConfig {
            reason: format!("a sink logit must be finite, got {bad:?}"),
        }),
        None => Ok(()),
    }
}

/// Whether `x` is finite.
fn finite<E: Element>(x: E) -> bool {
    x.is_finite()
}
