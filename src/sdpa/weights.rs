//! The calls that give attention's weights, `(L, S)` for every head beside
//! the output: by the reference path, which keeps them (the fused kernels never
//! hold more than a block of scores).

use ndarray::{Array2, ArrayRef, ArrayRef2, ArrayRef4, Dimension, Ix2, Ix4};

use super::ScaledDotProduct;
use crate::core::problem::AttentionDim;
use crate::core::reference::weighted_values;
use crate::element::{Element, Storage};
use crate::error::Result;

/// The output of attention together with the attention weights that made it.
///
/// # Shapes
///
/// 2-D (`D = Ix2`): `output: (L, d_v)`, `weights: (L, S)`. Batched (`D = Ix4`):
/// `output: (batch, heads, L, d_v)`, `weights: (batch, heads, L, S)`.
///
/// # Examples
///
/// ```
/// use ndarray::array;
///
/// let q = array![[0.0_f64, 1.0]];
/// let kv = array![[1.0, 0.0], [0.0, 1.0]];
/// let out = attn::ScaledDotProduct::new().forward_with_weights(&q, &kv, &kv)?;
/// assert!((out.weights.sum() - 1.0).abs() < 1e-15);
/// assert_eq!(out.output.dim(), (1, 2));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOutput<A, D: Dimension> {
    /// `weights · V`.
    pub output: ndarray::Array<A, D>,
    /// The attention weights; each row sums to 1, or is all 0 where fully masked.
    pub weights: ndarray::Array<A, D>,
}

/// Every intermediate of one attention call, for learners and for debugging.
///
/// # Shapes
///
/// `scores`, `scaled` and `weights` are `(L, S)`; `output` is `(L, d_v)`.
///
/// # Examples
///
/// ```
/// use ndarray::array;
///
/// let x = array![[1.0_f64, 0.0], [1.0, 1.0]];
/// let t = attn::ScaledDotProduct::new().trace(&x, &x, &x)?;
/// assert_eq!(t.scores, array![[1.0, 1.0], [1.0, 2.0]]); // QKᵀ
/// assert_eq!(t.scaled[[1, 1]], 2.0 / 2f64.sqrt()); // QKᵀ/√d_k
/// assert_eq!(t.weights.row(0), array![0.5, 0.5]);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionTrace<A> {
    /// The raw scores `QKᵀ`.
    pub scores: Array2<A>,
    /// `QKᵀ·scale`, plus any bias, with `−∞` at every masked position.
    pub scaled: Array2<A>,
    /// `softmax(scaled)`, row-wise.
    pub weights: Array2<A>,
    /// `weights · V`.
    pub output: Array2<A>,
}

impl<A: Storage> ScaledDotProduct<'_, A> {
    /// [`forward`](Self::forward), also returning the attention weights.
    ///
    /// # Shapes
    ///
    /// `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)` → output `(L, d_v)`, weights `(L, S)`.
    ///
    /// # Errors
    ///
    /// See [`ScaledDotProduct`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let q = Array2::<f64>::zeros((2, 3));
    /// let kv = Array2::<f64>::ones((4, 3));
    /// let out = attn::ScaledDotProduct::new().forward_with_weights(&q, &kv, &kv)?;
    /// assert_eq!(out.weights, Array2::from_elem((2, 4), 0.25));
    /// assert_eq!(out.output, Array2::<f64>::ones((2, 3)));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_with_weights(
        &self,
        q: &ArrayRef2<A>,
        k: &ArrayRef2<A>,
        v: &ArrayRef2<A>,
    ) -> Result<AttentionOutput<A, Ix2>> {
        self.with_weights(q, k, v)
    }

    /// The attention weights alone: `softmax(QKᵀ·scale)`, masked.
    ///
    /// # Shapes
    ///
    /// `q: (L, d_k)`, `k: (S, d_k)` → `(L, S)`.
    ///
    /// # Errors
    ///
    /// See [`ScaledDotProduct`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::array;
    ///
    /// let q = array![[0.0_f32, 0.0]];
    /// let k = array![[1.0, 2.0], [3.0, 4.0]];
    /// let w = attn::ScaledDotProduct::new().weights(&q, &k)?;
    /// assert_eq!(w, array![[0.5, 0.5]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn weights(&self, q: &ArrayRef2<A>, k: &ArrayRef2<A>) -> Result<Array2<A>> {
        let (q, k) = (
            A::compute(q.view(), self.parallelism),
            A::compute(k.view(), self.parallelism),
        );
        let slopes = self.slopes_in_compute();
        Ok(A::store(
            self.in_compute(&slopes).weights_compute(&q, &k)?,
            self.parallelism,
        ))
    }

    /// [`forward_batched`](Self::forward_batched), also returning the weights of every head.
    ///
    /// # Shapes
    ///
    /// Output `(batch, heads, L, d_v)`, weights `(batch, heads, L, S)`.
    ///
    /// # Errors
    ///
    /// See [`ScaledDotProduct`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array4;
    ///
    /// let q = Array4::<f64>::zeros((1, 2, 3, 4));
    /// let kv = Array4::<f64>::zeros((1, 2, 5, 4));
    /// let out = attn::ScaledDotProduct::new().forward_batched_with_weights(&q, &kv, &kv)?;
    /// assert_eq!(out.weights, Array4::from_elem((1, 2, 3, 5), 0.2));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_batched_with_weights(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
    ) -> Result<AttentionOutput<A, Ix4>> {
        self.with_weights(q, k, v)
    }

    /// [`forward_with_weights`](Self::forward_with_weights) in any shape: the
    /// inputs in the compute type, the output and weights rounded back.
    fn with_weights<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
    ) -> Result<AttentionOutput<A, D>> {
        let [q, k, v] = [q, k, v].map(|x| A::compute(x.view(), self.parallelism));
        let slopes = self.slopes_in_compute();
        let out = self.in_compute(&slopes).with_weights_compute(&q, &k, &v)?;
        Ok(AttentionOutput {
            output: A::store(out.output, self.parallelism),
            weights: A::store(out.weights, self.parallelism),
        })
    }
}

impl<A: Element> ScaledDotProduct<'_, A> {
    /// Every step of one 2-D call: raw scores, scaled and masked scores, weights, output.
    ///
    /// The weights and output are those of [`forward_with_weights`](Self::forward_with_weights).
    ///
    /// # Shapes
    ///
    /// See [`AttentionTrace`].
    ///
    /// # Errors
    ///
    /// See [`ScaledDotProduct`].
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, ScaledDotProduct};
    /// use ndarray::array;
    ///
    /// let x = array![[1.0_f64], [2.0]];
    /// let t = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft).trace(&x, &x, &x)?;
    /// assert_eq!(t.scores, array![[1.0, 2.0], [2.0, 4.0]]);
    /// assert_eq!(t.scaled[[0, 1]], f64::NEG_INFINITY);
    /// assert_eq!(t.output[[0, 0]], 1.0);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn trace(
        &self,
        q: &ArrayRef2<A>,
        k: &ArrayRef2<A>,
        v: &ArrayRef2<A>,
    ) -> Result<AttentionTrace<A>> {
        let problem = self.check(q, k, v)?;
        let head = problem.attend_head(0, 0, q.view(), k.view());
        let output = weighted_values(&head, v.view());
        Ok(AttentionTrace {
            scores: q.dot(&k.t()),
            scaled: head.scaled,
            weights: head.weights,
            output,
        })
    }
}

/// The attention weights `softmax(QKᵀ/√d_k)` of 2-D inputs; every row sums to 1.
///
/// # Shapes
///
/// `q: (L, d_k)`, `k: (S, d_k)` → `(L, S)`.
///
/// # Errors
///
/// [`Error::QueryKeyWidth`](crate::Error::QueryKeyWidth) when `q` and `k` differ in `d_k`, and
/// [`Error::ZeroWidth`](crate::Error::ZeroWidth) when `d_k = 0`.
///
/// # Examples
///
/// ```
/// use attn::attention_weights;
/// use ndarray::array;
///
/// let q = array![[2.0_f64, 0.0], [0.0, 0.0]];
/// let k = array![[1.0, 0.0], [-1.0, 0.0]];
/// let w = attention_weights(&q, &k)?;
/// assert!((w.row(0).sum() - 1.0).abs() < 1e-15);
/// assert_eq!(w.row(1), array![0.5, 0.5]);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn attention_weights<A: Storage>(q: &ArrayRef2<A>, k: &ArrayRef2<A>) -> Result<Array2<A>> {
    ScaledDotProduct::new().weights(q, k)
}
