//! Gradients through multi-head attention: every weight and bias, and each input.

use ndarray::{Array, ArrayRef2, ArrayRef3, Axis, Dimension, Ix2, Ix3};

use super::weights::MultiHeadWeights;
use super::{
    MultiHeadAttention, PositionEncoding, batch_of_one, concat, in_callers_shapes, in_order, split,
};
use crate::core::mask::Mask;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layers::linear::LinearGradients;

/// The gradients of a loss through a [`MultiHeadAttention`], given the gradient by
/// its output: one per input, and one per weight and bias, shaped like the layer's
/// weights.
///
/// For self-attention, where one sequence is the query, key and value input, its
/// gradient is `query + key + value`.
///
/// # Shapes
///
/// 2-D (`D = Ix2`): `query: (L, d_model)`, `key: (S, kdim)`, `value: (S, vdim)`;
/// batched (`D = Ix3`): the same with a leading batch axis. `weights` as in
/// [`MultiHeadWeights`], summed over the batch and positions.
///
/// # Examples
///
/// ```
/// use attn::{Init, MultiHeadConfig};
/// use ndarray::Array2;
///
/// let mha = MultiHeadConfig::new(8, 2).random::<f64>(Init::TorchMultihead, 0)?;
/// let x = Array2::from_shape_fn((3, 8), |(i, j)| (i as f64 - j as f64) / 8.0);
/// let g = mha.backward(&x, &x, &x, &[], &Array2::ones((3, 8)))?;
/// let d_x = &g.query + &g.key + &g.value; // self-attention: x is all three inputs
/// assert_eq!((d_x.dim(), g.weights.w_q.dim()), ((3, 8), (8, 8)));
/// // the output bias adds to every output entry: its gradient counts the rows
/// assert_eq!(g.weights.b_o, Some(ndarray::Array1::from_elem(8, 3.0)));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MultiHeadGradients<A, D: Dimension> {
    /// `∂loss/∂query`.
    pub query: Array<A, D>,
    /// `∂loss/∂key`.
    pub key: Array<A, D>,
    /// `∂loss/∂value`.
    pub value: Array<A, D>,
    /// `∂loss/∂w_q`, … `∂loss/∂b_o`, in the layer's `(in, out)` layout; biases
    /// `None` where the layer has none.
    pub weights: MultiHeadWeights<A>,
}

impl<A: Element> MultiHeadAttention<A> {
    /// The gradients of a loss by the inputs and every weight, given
    /// `d_out = ∂loss/∂output` of [`forward`](Self::forward) with the same masks.
    ///
    /// # Shapes
    ///
    /// `query: (L, d_model)`, `key: (S, kdim)`, `value: (S, vdim)`,
    /// `d_out: (L, d_model)` → see [`MultiHeadGradients`].
    ///
    /// # Errors
    ///
    /// The errors of [`forward`](Self::forward), and [`Error::Shape`] when `d_out`
    /// is not `(L, d_model)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, Mask, MultiHeadConfig};
    /// use ndarray::Array2;
    ///
    /// let mha = MultiHeadConfig::new(4, 2).random::<f64>(Init::XavierUniform, 1)?;
    /// let x = Array2::from_shape_fn((5, 4), |(i, j)| (i * 4 + j) as f64 / 20.0);
    /// let g = mha.backward(&x, &x, &x, &[Mask::CausalTopLeft], &Array2::ones((5, 4)))?;
    /// assert_eq!(g.weights.w_o.dim(), (4, 4));
    /// assert!(mha.backward(&x, &x, &x, &[], &Array2::ones((5, 3))).is_err());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward(
        &self,
        query: &ArrayRef2<A>,
        key: &ArrayRef2<A>,
        value: &ArrayRef2<A>,
        masks: &[Mask<'_, A>],
        d_out: &ArrayRef2<A>,
    ) -> Result<MultiHeadGradients<A, Ix2>> {
        let g = self
            .backward_batched(
                &batch_of_one(query),
                &batch_of_one(key),
                &batch_of_one(value),
                masks,
                &batch_of_one(d_out),
            )
            .map_err(in_callers_shapes)?;
        Ok(MultiHeadGradients {
            query: g.query.index_axis_move(Axis(0), 0),
            key: g.key.index_axis_move(Axis(0), 0),
            value: g.value.index_axis_move(Axis(0), 0),
            weights: g.weights,
        })
    }

    /// [`backward`](Self::backward) on batched inputs; weight gradients are summed
    /// over the batch.
    ///
    /// # Shapes
    ///
    /// `query: (B, L, d_model)`, `key: (B, S, kdim)`, `value: (B, S, vdim)`,
    /// `d_out: (B, L, d_model)` → see [`MultiHeadGradients`].
    ///
    /// # Errors
    ///
    /// The errors of [`forward_batched`](Self::forward_batched), and
    /// [`Error::Shape`] when `d_out` is not `(B, L, d_model)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::Array3;
    ///
    /// let mha = MultiHeadConfig::new(8, 4).with_kv_heads(2).random::<f32>(Init::TorchMultihead, 0)?;
    /// let x = Array3::<f32>::ones((2, 3, 8));
    /// let g = mha.backward_batched(&x, &x, &x, &[], &Array3::ones((2, 3, 8)))?;
    /// assert_eq!(g.weights.w_k.dim(), (8, 4)); // 2 key/value heads of width 2
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward_batched(
        &self,
        query: &ArrayRef3<A>,
        key: &ArrayRef3<A>,
        value: &ArrayRef3<A>,
        masks: &[Mask<'_, A>],
        d_out: &ArrayRef3<A>,
    ) -> Result<MultiHeadGradients<A, Ix3>> {
        let heads = self.project(query, key, value)?;
        let (b, l, _) = query.dim();
        let expected = [b, l, self.config.d_model()];
        if d_out.shape() != expected {
            return Err(Error::Shape {
                what: "d_out (the gradient of the loss by the output) must be (B, L, d_model)",
                expected: expected.to_vec(),
                found: d_out.shape().to_vec(),
            });
        }
        // forward again to the concatenated heads (keeping each row's
        // log-sum-exp), then back through W_O and the attention
        let (q, k, v) = (&heads.q, &heads.k, &heads.v);
        let slopes = self.slopes();
        let attention = self.attention(masks, &slopes);
        let forward = attention.forward_with_lse(q, k, v)?;
        let LinearGradients {
            input,
            weight: w_o,
            bias: b_o,
        } = self.linears[3].backward_batched(&concat(forward.output.view()), d_out)?;
        let d_heads = split(input, self.config.n_heads(), self.config.head_dim());
        let mut g = attention.backward_with_lse(q, k, v, &forward, &d_heads)?;
        // rotary embeddings are rotations: their gradient rotates back
        if let PositionEncoding::Rope(rope) = self.config.positions() {
            rope.apply_transpose(&mut g.q, &in_order(b, l))?;
            rope.apply_transpose(&mut g.k, &in_order(b, key.dim().1))?;
        }
        let [w_q, w_k, w_v, _] = &self.linears;
        let g_q = w_q.backward_batched(query, &concat(g.q.view()))?;
        let g_k = w_k.backward_batched(key, &concat(g.k.view()))?;
        let g_v = w_v.backward_batched(value, &concat(g.v.view()))?;
        Ok(MultiHeadGradients {
            query: g_q.input,
            key: g_k.input,
            value: g_v.input,
            weights: MultiHeadWeights {
                w_q: g_q.weight,
                w_k: g_k.weight,
                w_v: g_v.weight,
                w_o,
                b_q: g_q.bias,
                b_k: g_k.bias,
                b_v: g_v.bias,
                b_o,
                sinks: g.sinks,
            },
        })
    }
}
