//! Multi-head attention over whole sequences: 2-D, batched, and padded batches.

use ndarray::{Array2, Array3, Array4, ArrayRef2, ArrayRef3, Axis, Ix2, Ix3};

use super::{MultiHeadAttention, MultiHeadOutput, QkvHeads, batch_of_one, in_callers_shapes};
use crate::core::mask::Mask;
use crate::element::Element;
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;

impl<A: Element> MultiHeadAttention<A> {
    /// Multi-head attention on 2-D inputs.
    ///
    /// # Shapes
    ///
    /// `query: (L, d_model)`, `key: (S, kdim)`, `value: (S, vdim)` → `(L, d_model)`;
    /// masks broadcast to `(1, n_heads, L, S)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when an input is not as wide as its projection needs,
    /// [`Error::KeyValueLength`] when `key` and `value` differ in `S`, and the mask
    /// errors of [`ScaledDotProduct`](crate::ScaledDotProduct).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::Array2;
    ///
    /// let mha = MultiHeadConfig::new(8, 2).with_kdim(3).random::<f64>(Init::TorchMultihead, 0)?;
    /// let query = Array2::<f64>::ones((1, 8)); // one CLS token
    /// let tokens = Array2::<f64>::ones((10, 3));
    /// let context = Array2::<f64>::ones((10, 8));
    /// assert_eq!(mha.forward(&query, &tokens, &context, &[])?.dim(), (1, 8));
    /// assert!(mha.forward(&query, &context, &context, &[]).is_err()); // keys must be 3 wide
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward(
        &self,
        query: &ArrayRef2<A>,
        key: &ArrayRef2<A>,
        value: &ArrayRef2<A>,
        masks: &[Mask<'_, A>],
    ) -> Result<Array2<A>> {
        let out = self
            .forward_batched(
                &batch_of_one(query),
                &batch_of_one(key),
                &batch_of_one(value),
                masks,
            )
            .map_err(in_callers_shapes)?;
        Ok(out.index_axis_move(Axis(0), 0))
    }

    /// [`forward`](Self::forward), also returning the weights of every head and their mean.
    ///
    /// # Shapes
    ///
    /// Output `(L, d_model)`, head weights `(n_heads, L, S)`, mean weights `(L, S)`.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::Array2;
    ///
    /// let mha = MultiHeadConfig::new(8, 4).random::<f64>(Init::TorchMultihead, 0)?;
    /// let x = Array2::from_shape_fn((3, 8), |(i, j)| (i * j) as f64 / 8.0);
    /// let out = mha.forward_with_weights(&x, &x, &x, &[])?;
    /// for row in out.mean_weights.rows() {
    ///     assert!((row.sum() - 1.0).abs() < 1e-12);
    /// }
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_with_weights(
        &self,
        query: &ArrayRef2<A>,
        key: &ArrayRef2<A>,
        value: &ArrayRef2<A>,
        masks: &[Mask<'_, A>],
    ) -> Result<MultiHeadOutput<A, Ix2>> {
        let lift = |x: &ArrayRef2<A>| x.view().insert_axis(Axis(0)).to_owned();
        let out = self
            .forward_batched_with_weights(&lift(query), &lift(key), &lift(value), masks)
            .map_err(in_callers_shapes)?;
        Ok(MultiHeadOutput {
            output: out.output.index_axis_move(Axis(0), 0),
            head_weights: out.head_weights.index_axis_move(Axis(0), 0),
            mean_weights: out.mean_weights.index_axis_move(Axis(0), 0),
        })
    }

    /// Multi-head attention on batched inputs.
    ///
    /// # Shapes
    ///
    /// `query: (B, L, d_model)`, `key: (B, S, kdim)`, `value: (B, S, vdim)` →
    /// `(B, L, d_model)`; masks broadcast to `(B, n_heads, L, S)`. Rotary
    /// embeddings, if the layer has them, rotate query `i` and key `j` at
    /// positions `i` and `j` (for left-padded rows, see [`forward_padded`](Self::forward_padded)).
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward), and [`Error::BatchShape`] when the batch sizes differ.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, Mask, MultiHeadConfig};
    /// use ndarray::{array, Array3};
    ///
    /// let mha = MultiHeadConfig::new(8, 2).random::<f32>(Init::TorchMultihead, 0)?;
    /// let x = Array3::<f32>::ones((2, 4, 8));
    /// let lengths = array![[[[true, true, true, true]]], [[[true, true, false, false]]]]; // (B, 1, 1, S)
    /// let out = mha.forward_batched(&x, &x, &x, &[Mask::keep(&lengths)])?;
    /// assert_eq!(out.dim(), (2, 4, 8));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_batched(
        &self,
        query: &ArrayRef3<A>,
        key: &ArrayRef3<A>,
        value: &ArrayRef3<A>,
        masks: &[Mask<'_, A>],
    ) -> Result<Array3<A>> {
        let heads = self.project(query, key, value)?;
        Ok(self.attend(&heads, masks, false)?.output)
    }

    /// [`forward_batched`](Self::forward_batched), also returning the weights.
    ///
    /// # Shapes
    ///
    /// Output `(B, L, d_model)`, head weights `(B, n_heads, L, S)`, mean weights `(B, L, S)`.
    ///
    /// # Errors
    ///
    /// As [`forward_batched`](Self::forward_batched).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::Array3;
    ///
    /// let mha = MultiHeadConfig::new(8, 2).random::<f64>(Init::TorchMultihead, 0)?;
    /// let x = Array3::<f64>::ones((2, 4, 8));
    /// let out = mha.forward_batched_with_weights(&x, &x, &x, &[])?;
    /// assert_eq!(out.head_weights.dim(), (2, 2, 4, 4));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_batched_with_weights(
        &self,
        query: &ArrayRef3<A>,
        key: &ArrayRef3<A>,
        value: &ArrayRef3<A>,
        masks: &[Mask<'_, A>],
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        let heads = self.project(query, key, value)?;
        self.attend(&heads, masks, true)
    }

    /// Self-attention on a batch whose rows are padded: `real[[b, t]]` says
    /// whether token `t` of row `b` is a real token (Hugging Face's
    /// `attention_mask`, 1 = real; left or right padding). No query attends to a
    /// padding key, and rotary embeddings see each real token at its position in
    /// its own sequence (`position = real tokens before it`), so a padded row gives
    /// the numbers of its sequence alone. Padding between a row's real tokens
    /// gives them too: where a distance is read (ALiBi, a sliding window), which
    /// would count the padding, the row's padding is first moved before its
    /// real tokens, the call's `Keep` and `Bias` arrays with it, and the output
    /// and weights come back in the call's order. Padding queries give what
    /// attention over no key gives: 0 before `W_O` (they see none, with left
    /// padding and a causal layer) or an average (they see the real keys,
    /// otherwise); ignore them.
    ///
    /// # Shapes
    ///
    /// `x: (B, L, d_model)`, `real: (B, L)` → `(B, L, d_model)`; further masks
    /// broadcast to `(B, n_heads, L, L)`.
    ///
    /// # Errors
    ///
    /// As [`forward_batched`](Self::forward_batched), and [`Error::Shape`] when
    /// `real` is not `(B, L)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, Init, MultiHeadConfig, PositionEncoding, Rope};
    /// use ndarray::{array, concatenate, s, Array3, Axis};
    ///
    /// let llama = MultiHeadConfig::new(16, 4)
    ///     .with_causality(Causality::Causal)
    ///     .with_positions(PositionEncoding::Rope(Rope::new(10_000.0)))
    ///     .random::<f64>(Init::XavierUniform, 0)?;
    /// let x = Array3::from_shape_fn((1, 3, 16), |(_, t, j)| (t * 16 + j) as f64 / 50.0);
    /// let pad = Array3::zeros((1, 2, 16));
    /// let left_padded = concatenate(Axis(1), &[pad.view(), x.view()])?;
    /// let out = llama.forward_padded(&left_padded, &array![[false, false, true, true, true]], &[])?;
    /// let alone = llama.forward_batched(&x, &x, &x, &[])?;
    /// let e = (&out.slice(s![.., 2.., ..]) - &alone).iter().fold(0.0_f64, |m, d| m.max(d.abs()));
    /// assert!(e < 1e-14);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_padded(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
    ) -> Result<Array3<A>> {
        Ok(self.padded(x, real, masks, false)?.output)
    }

    /// [`forward_padded`](Self::forward_padded), also returning the weights.
    ///
    /// # Shapes
    ///
    /// Output `(B, L, d_model)`, head weights `(B, n_heads, L, L)`, mean weights `(B, L, L)`.
    ///
    /// # Errors
    ///
    /// As [`forward_padded`](Self::forward_padded).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::{array, Array3};
    ///
    /// let bert = MultiHeadConfig::new(8, 2).random::<f64>(Init::XavierUniform, 0)?;
    /// let out = bert.forward_padded_with_weights(&Array3::ones((1, 3, 8)), &array![[true, true, false]], &[])?;
    /// assert_eq!(out.head_weights[[0, 1, 0, 2]], 0.0); // no weight on padding
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_padded_with_weights(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        self.padded(x, real, masks, true)
    }

    /// The layer's attention over projected heads, then `W_O`; the weights (and
    /// their mean) when asked for, else empty.
    pub(super) fn attend(
        &self,
        heads: &QkvHeads<A>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        let slopes = self.slopes();
        let attention = self.attention(masks, &slopes);
        let (output, head_weights) =
            attention.forward_heads(&heads.q, &heads.k, &heads.v, weights)?;
        self.finish(output, head_weights)
    }

    /// `W_O` on the heads, and the mean of the weights over heads.
    pub(super) fn finish(
        &self,
        heads: Array4<A>,
        head_weights: Option<Array4<A>>,
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        let head_weights = head_weights.unwrap_or_else(|| Array4::zeros((0, 0, 0, 0)));
        let n_heads = A::from_f64(head_weights.dim().1.max(1) as f64);
        Ok(MultiHeadOutput {
            output: self.merge_heads(heads.view())?,
            mean_weights: head_weights.sum_axis(Axis(1)) / n_heads,
            head_weights,
        })
    }
}
