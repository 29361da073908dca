//! Gradients through the projections and the attention on top of them.

use ndarray::{Array1, Array2, ArrayRef2};

use super::QkvProjection;
use crate::element::Element;
use crate::error::Result;
use crate::sdpa::ScaledDotProduct;

/// The gradients of a loss through a [`QkvProjection`] and the attention on top of
/// it, given the gradient by the attention's output: one per input, and one per
/// weight and bias, named as the layer's.
///
/// For self-attention, where one sequence `x` is all three inputs, its gradient is
/// `query_in + key_in + value_in`.
///
/// # Shapes
///
/// `query_in: (L, query_in)`, `key_in: (S, key_in)`, `value_in: (S, value_in)`;
/// `w_q`, `w_k`, `w_v` and the biases shaped like the layer's.
///
/// # Examples
///
/// ```
/// use attn::{Init, ProjectionShape, QkvProjection, ScaledDotProduct};
/// use ndarray::Array2;
///
/// let proj = QkvProjection::<f64>::random(ProjectionShape::new(4, 3, 2), Init::XavierUniform, 0)?;
/// let x = Array2::from_shape_fn((5, 4), |(i, j)| (i + j) as f64 / 10.0);
/// let g = proj.self_attention_backward(&x, &ScaledDotProduct::new(), &Array2::ones((5, 2)))?;
/// let d_x = &g.query_in + &g.key_in + &g.value_in;
/// assert_eq!((d_x.dim(), g.w_q.dim(), g.w_v.dim()), ((5, 4), (4, 3), (4, 2)));
/// assert!(g.b_q.is_none()); // no biases in this layer
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QkvGradients<A> {
    /// `∂loss/∂` the query inputs.
    pub query_in: Array2<A>,
    /// `∂loss/∂` the key inputs.
    pub key_in: Array2<A>,
    /// `∂loss/∂` the value inputs.
    pub value_in: Array2<A>,
    /// `∂loss/∂W_Q`.
    pub w_q: Array2<A>,
    /// `∂loss/∂W_K`.
    pub w_k: Array2<A>,
    /// `∂loss/∂W_V`.
    pub w_v: Array2<A>,
    /// `∂loss/∂b_q`, where the layer has biases.
    pub b_q: Option<Array1<A>>,
    /// `∂loss/∂b_k`, where the layer has biases.
    pub b_k: Option<Array1<A>>,
    /// `∂loss/∂b_v`, where the layer has biases.
    pub b_v: Option<Array1<A>>,
}

impl<A: Element> QkvProjection<A> {
    /// The gradients of a loss through
    /// [`cross_attention`](Self::cross_attention), given
    /// `d_out = ∂loss/∂output`, with the same attention options.
    ///
    /// # Shapes
    ///
    /// `x: (L, query_in)`, `keys_in: (S, key_in)`, `values_in: (S, value_in)`,
    /// `d_out: (L, d_v)` → see [`QkvGradients`].
    ///
    /// # Errors
    ///
    /// The errors of [`cross_attention`](Self::cross_attention), and
    /// [`Error::Shape`](crate::Error::Shape) when `d_out` is not `(L, d_v)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, ProjectionShape, QkvProjection, ScaledDotProduct};
    /// use ndarray::Array2;
    ///
    /// let shape = ProjectionShape::new(4, 3, 2).with_context(5, 6);
    /// let proj = QkvProjection::<f64>::random(shape, Init::XavierUniform, 1)?;
    /// let (cls, tokens, values) = (Array2::ones((1, 4)), Array2::ones((7, 5)), Array2::ones((7, 6)));
    /// let g = proj.cross_attention_backward(&cls, &tokens, &values, &ScaledDotProduct::new(), &Array2::ones((1, 2)))?;
    /// assert_eq!((g.key_in.dim(), g.w_v.dim()), ((7, 5), (6, 2)));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn cross_attention_backward(
        &self,
        x: &ArrayRef2<A>,
        keys_in: &ArrayRef2<A>,
        values_in: &ArrayRef2<A>,
        attn: &ScaledDotProduct<'_, A>,
        d_out: &ArrayRef2<A>,
    ) -> Result<QkvGradients<A>> {
        let (q, k, v) = (self.query(x)?, self.key(keys_in)?, self.value(values_in)?);
        let forward = attn.forward_with_lse(&q, &k, &v)?;
        let g = attn.backward_with_lse(&q, &k, &v, &forward, d_out)?;
        let g_q = self.q.backward(x, &g.q)?;
        let g_k = self.k.backward(keys_in, &g.k)?;
        let g_v = self.v.backward(values_in, &g.v)?;
        Ok(QkvGradients {
            query_in: g_q.input,
            key_in: g_k.input,
            value_in: g_v.input,
            w_q: g_q.weight,
            w_k: g_k.weight,
            w_v: g_v.weight,
            b_q: g_q.bias,
            b_k: g_k.bias,
            b_v: g_v.bias,
        })
    }

    /// The gradients of a loss through
    /// [`self_attention`](Self::self_attention): `x` is all three inputs, so its
    /// gradient is `query_in + key_in + value_in` of the result.
    ///
    /// # Shapes
    ///
    /// `x: (L, d_in)`, `d_out: (L, d_v)` → see [`QkvGradients`].
    ///
    /// # Errors
    ///
    /// As [`cross_attention_backward`](Self::cross_attention_backward).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, QkvProjection, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// let proj = QkvProjection::new(Array2::<f64>::eye(2), Array2::eye(2), Array2::eye(2))?;
    /// let x = array![[1.0, 0.0], [0.0, 1.0]];
    /// let causal = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft);
    /// let g = proj.self_attention_backward(&x, &causal, &array![[1.0, 0.0], [0.0, 0.0]])?;
    /// // the first token sees only itself: its output is its value, whatever W_Q is
    /// assert_eq!(g.w_q, Array2::<f64>::zeros((2, 2)));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn self_attention_backward(
        &self,
        x: &ArrayRef2<A>,
        attn: &ScaledDotProduct<'_, A>,
        d_out: &ArrayRef2<A>,
    ) -> Result<QkvGradients<A>> {
        self.cross_attention_backward(x, x, x, attn, d_out)
    }
}
