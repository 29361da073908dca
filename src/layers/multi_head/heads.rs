//! The projected heads of a call: the first half of multi-head attention, and
//! the output projection that ends it, for users who need a step of their own.

use ndarray::{Array3, Array4, ArrayRef2, ArrayRef3, ArrayRef4};

use super::{MultiHeadAttention, PositionEncoding, in_order, split};
use crate::element::Element;
use crate::error::{Error, Result};

/// The projected heads of one call: queries, keys and values split per head
/// (and rotated, with rotary embeddings), as the layer's attention takes them.
///
/// # Shapes
///
/// `q: (B, n_heads, L, head_dim)`, `k` and `v: (B, n_kv_heads, S, head_dim)`.
///
/// # Examples
///
/// ```
/// use attn::{Init, MultiHeadConfig, ScaledDotProduct};
/// use ndarray::Array3;
///
/// let mha = MultiHeadConfig::new(8, 4).with_kv_heads(2).random::<f64>(Init::XavierUniform, 0)?;
/// let x = Array3::from_shape_fn((1, 3, 8), |(_, i, j)| (i + j) as f64 / 10.0);
/// let heads = mha.project(&x, &x, &x)?;
/// assert_eq!((heads.q.dim(), heads.k.dim()), ((1, 4, 3, 2), (1, 2, 3, 2)));
/// // a custom step between projections and output, here plain attention
/// let mixed = ScaledDotProduct::new().forward_batched(&heads.q, &heads.k, &heads.v)?;
/// assert_eq!(mha.output(&mixed)?, mha.forward_batched(&x, &x, &x, &[])?);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QkvHeads<A> {
    /// Queries per head.
    pub q: Array4<A>,
    /// Keys per key/value head.
    pub k: Array4<A>,
    /// Values per key/value head.
    pub v: Array4<A>,
}

impl<A: Element> MultiHeadAttention<A> {
    /// Projects the inputs and splits them into heads, rotating queries and keys
    /// at positions `0..L` and `0..S` when the layer has rotary embeddings: the
    /// first half of [`forward_batched`](Self::forward_batched), for a custom step
    /// before [`output`](Self::output).
    ///
    /// # Shapes
    ///
    /// As [`forward_batched`](Self::forward_batched) → see [`QkvHeads`].
    ///
    /// # Errors
    ///
    /// The input errors of [`forward_batched`](Self::forward_batched).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::Array3;
    ///
    /// let t5 = MultiHeadConfig::new(4, 2).with_head_dim(3).random::<f32>(Init::XavierUniform, 0)?;
    /// let heads = t5.project(&Array3::ones((1, 5, 4)), &Array3::ones((1, 6, 4)), &Array3::ones((1, 6, 4)))?;
    /// assert_eq!(heads.v.dim(), (1, 2, 6, 3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn project(
        &self,
        query: &ArrayRef3<A>,
        key: &ArrayRef3<A>,
        value: &ArrayRef3<A>,
    ) -> Result<QkvHeads<A>> {
        let (b, l, _) = query.dim();
        let s = key.dim().1;
        self.project_at(query, key, value, &in_order(b, l), &in_order(b, s))
    }

    /// Concatenates attention's heads and projects them by `W_O` (+ `b_o`): the
    /// second half of [`forward_batched`](Self::forward_batched).
    ///
    /// # Shapes
    ///
    /// `heads: (B, n_heads, L, head_dim)` → `(B, L, d_model)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `heads` is not `(B, n_heads, L, head_dim)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::Array4;
    ///
    /// let mha = MultiHeadConfig::new(8, 2).random::<f64>(Init::XavierUniform, 0)?;
    /// assert_eq!(mha.output(&Array4::zeros((1, 2, 3, 4)))?.dim(), (1, 3, 8));
    /// assert!(mha.output(&Array4::zeros((1, 4, 3, 2))).is_err()); // 4 heads of 2, not 2 of 4
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn output(&self, heads: &ArrayRef4<A>) -> Result<Array3<A>> {
        let (b, h, l, hd) = heads.dim();
        if (h, hd) != (self.config.n_heads(), self.config.head_dim()) {
            return Err(Error::Shape {
                what: "heads must be (B, n_heads, L, head_dim)",
                expected: vec![b, self.config.n_heads(), l, self.config.head_dim()],
                found: heads.shape().to_vec(),
            });
        }
        self.merge_heads(heads.view())
    }

    /// [`project`](Self::project) with the positions of every query and key.
    pub(super) fn project_at(
        &self,
        query: &ArrayRef3<A>,
        key: &ArrayRef3<A>,
        value: &ArrayRef3<A>,
        query_positions: &ArrayRef2<usize>,
        key_positions: &ArrayRef2<usize>,
    ) -> Result<QkvHeads<A>> {
        let b = query.dim().0;
        let (bk, s, _) = key.dim();
        let (bv, sv, _) = value.dim();
        if b != bk || b != bv {
            return Err(Error::BatchShape {
                query: query.shape().to_vec(),
                key: key.shape().to_vec(),
                value: value.shape().to_vec(),
            });
        }
        if s != sv {
            return Err(Error::KeyValueLength {
                key: key.shape().to_vec(),
                value: value.shape().to_vec(),
            });
        }
        let (h, kv, hd) = (
            self.config.n_heads(),
            self.config.n_kv_heads(),
            self.config.head_dim(),
        );
        let [w_q, w_k, w_v, _] = &self.linears;
        let q = w_q.forward_batched_named("query width must be d_model", query)?;
        let k = w_k.forward_batched_named("key width must be kdim", key)?;
        let v = w_v.forward_batched_named("value width must be vdim", value)?;
        let (mut q, mut k) = (split(q, h, hd), split(k, kv, hd));
        if let PositionEncoding::Rope(rope) = self.config.positions() {
            rope.apply(&mut q, query_positions)?;
            rope.apply(&mut k, key_positions)?;
        }
        Ok(QkvHeads {
            q,
            k,
            v: split(v, kv, hd),
        })
    }
}
