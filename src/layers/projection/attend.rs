//! Self- and cross-attention on a [`QkvProjection`]'s projections.

use ndarray::{Array2, ArrayRef2, Ix2};

use super::QkvProjection;
use crate::element::Element;
use crate::error::Result;
use crate::sdpa::{AttentionOutput, ScaledDotProduct};

impl<A: Element> QkvProjection<A> {
    /// Self-attention: `softmax(XW_Q (XW_K)ᵀ/√d_k)·XW_V`, with the options of `attn`
    /// (scale, masks).
    ///
    /// # Shapes
    ///
    /// `x: (L, d_in)` → `(L, d_v)`; masks broadcast to `(L, L)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`](crate::Error::Shape) when `x` does not fit the weights; the errors of
    /// [`ScaledDotProduct`] for masks and scale.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, QkvProjection, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// let proj = QkvProjection::new(Array2::<f64>::eye(2), Array2::eye(2), Array2::eye(2))?;
    /// let x = array![[1.0, 0.0], [0.0, 1.0]];
    /// let out = proj.self_attention(&x, &ScaledDotProduct::new().with_mask(Mask::CausalTopLeft))?;
    /// assert_eq!(out.row(0), x.row(0)); // the first token sees only itself
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn self_attention(
        &self,
        x: &ArrayRef2<A>,
        attn: &ScaledDotProduct<'_, A>,
    ) -> Result<Array2<A>> {
        attn.forward(&self.query(x)?, &self.key(x)?, &self.value(x)?)
    }

    /// [`self_attention`](Self::self_attention), also returning the weights `(L, L)`.
    ///
    /// # Shapes
    ///
    /// `x: (L, d_in)` → output `(L, d_v)`, weights `(L, L)`.
    ///
    /// # Errors
    ///
    /// As [`self_attention`](Self::self_attention).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{QkvProjection, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// let proj = QkvProjection::new(Array2::<f64>::zeros((2, 2)), Array2::eye(2), Array2::eye(2))?;
    /// let out = proj.self_attention_with_weights(&array![[1.0, 0.0], [0.0, 1.0]], &ScaledDotProduct::new())?;
    /// assert_eq!(out.weights, Array2::from_elem((2, 2), 0.5)); // Q = 0: uniform weights
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn self_attention_with_weights(
        &self,
        x: &ArrayRef2<A>,
        attn: &ScaledDotProduct<'_, A>,
    ) -> Result<AttentionOutput<A, Ix2>> {
        attn.forward_with_weights(&self.query(x)?, &self.key(x)?, &self.value(x)?)
    }

    /// Cross-attention: queries from `x`, keys from `keys_in` and values from
    /// `values_in` (pass the same context twice when keys and values share it).
    ///
    /// A single query row (`L = 1`, a CLS token as in CrossViT) costs `O(S)`.
    ///
    /// # Shapes
    ///
    /// `x: (L, query_in)`, `keys_in: (S, key_in)`, `values_in: (S, value_in)` → `(L, d_v)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`](crate::Error::Shape) when an input does not fit its weights;
    /// [`Error::KeyValueLength`](crate::Error::KeyValueLength) when `keys_in` and `values_in` differ in `S`; the
    /// errors of [`ScaledDotProduct`] for masks and scale.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{QkvProjection, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// let proj = QkvProjection::new(Array2::<f64>::eye(2), Array2::eye(2), Array2::eye(2))?;
    /// let cls = array![[0.0, 0.0]];
    /// let patches = array![[1.0, 2.0], [3.0, 4.0]];
    /// let out = proj.cross_attention(&cls, &patches, &patches, &ScaledDotProduct::new())?;
    /// assert_eq!(out, array![[2.0, 3.0]]); // a zero query averages the values
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn cross_attention(
        &self,
        x: &ArrayRef2<A>,
        keys_in: &ArrayRef2<A>,
        values_in: &ArrayRef2<A>,
        attn: &ScaledDotProduct<'_, A>,
    ) -> Result<Array2<A>> {
        attn.forward(
            &self.query(x)?,
            &self.key(keys_in)?,
            &self.value(values_in)?,
        )
    }

    /// [`cross_attention`](Self::cross_attention), also returning the weights `(L, S)`.
    ///
    /// # Shapes
    ///
    /// Output `(L, d_v)`, weights `(L, S)`.
    ///
    /// # Errors
    ///
    /// As [`cross_attention`](Self::cross_attention).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{QkvProjection, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// let proj = QkvProjection::new(Array2::<f64>::eye(2), Array2::eye(2), Array2::eye(2))?;
    /// let ctx = array![[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];
    /// let out = proj.cross_attention_with_weights(&array![[0.0, 0.0]], &ctx, &ctx, &ScaledDotProduct::new())?;
    /// assert_eq!(out.weights.dim(), (1, 3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn cross_attention_with_weights(
        &self,
        x: &ArrayRef2<A>,
        keys_in: &ArrayRef2<A>,
        values_in: &ArrayRef2<A>,
        attn: &ScaledDotProduct<'_, A>,
    ) -> Result<AttentionOutput<A, Ix2>> {
        attn.forward_with_weights(
            &self.query(x)?,
            &self.key(keys_in)?,
            &self.value(values_in)?,
        )
    }
}
