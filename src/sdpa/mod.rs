//! Scaled dot-product attention, `softmax(QKᵀ/√d_k)·V`: the public calls. Each
//! checks its arguments, converts half-precision storage where the kernel needs
//! it, and hands the problem to `kernel` (which runs the fused paths, or the
//! readable reference path of `core::reference`).

pub(crate) mod backward;
mod compute;
pub(crate) mod flex;
mod lse;
mod weights;

use ndarray::{Array2, Array4, ArrayRef2, ArrayRef4};

pub use backward::AttentionGradients;
pub use lse::{AttentionLse, merge_attention};
pub use weights::{AttentionOutput, AttentionTrace, attention_weights};

use crate::core::mask::Mask;
use crate::element::Storage;
use crate::error::Result;
use crate::kernel::{Kernel, Parallelism};

/// Scaled dot-product attention with options: a scale and any number of masks.
///
/// `softmax(QKᵀ·scale + bias)·V`, where `scale` defaults to `1/√d_k` and the
/// masks (see [`Mask`]) all apply together. Build it with [`new`](Self::new) and
/// the `with_*` calls, then call it on 2-D inputs with [`forward`](Self::forward)
/// or on batched ones with [`forward_batched`](Self::forward_batched).
///
/// # Shapes
///
/// 2-D: `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)` → `(L, d_v)`; weights `(L, S)`.
///
/// Batched: `q: (batch, heads, L, d_k)`, `k: (batch, kv_heads, S, d_k)`,
/// `v: (batch, kv_heads, S, d_v)` → `(batch, heads, L, d_v)`. With fewer key/value
/// heads than query heads (grouped-query attention) `kv_heads` must divide `heads`,
/// and query head `h` uses key/value head `h / (heads / kv_heads)`, as PyTorch's
/// `enable_gqa` does.
///
/// Inputs may be owned arrays, views, transposed views or slices with any strides.
/// `L = 0` gives an empty output; `S = 0` gives zeros.
///
/// # Errors
///
/// Every call returns an [`Error`](crate::Error) rather than panicking when `d_k` differs between
/// `q` and `k` ([`Error::QueryKeyWidth`](crate::Error::QueryKeyWidth)), `k` and `v` hold different numbers of
/// positions ([`Error::KeyValueLength`](crate::Error::KeyValueLength)), batch or head sizes disagree
/// ([`Error::BatchShape`](crate::Error::BatchShape), [`Error::HeadGroups`](crate::Error::HeadGroups)), a mask does not broadcast
/// ([`Error::MaskShape`](crate::Error::MaskShape)), the scale is zero or not finite ([`Error::InvalidScale`](crate::Error::InvalidScale)),
/// or `d_k = 0` ([`Error::ZeroWidth`](crate::Error::ZeroWidth)).
///
/// # Examples
///
/// ```
/// use attn::{Mask, ScaledDotProduct};
/// use ndarray::array;
///
/// let q = array![[1.0_f64, 0.0], [0.0, 1.0]];
/// let k = array![[1.0, 0.0], [0.0, 1.0]];
/// let v = array![[10.0, 0.0], [0.0, 10.0]];
/// let attn = ScaledDotProduct::new().with_scale(100.0).with_mask(Mask::CausalTopLeft);
/// let out = attn.forward_with_weights(&q, &k, &v)?;
/// assert_eq!(out.weights.row(0), array![1.0, 0.0]); // query 0 sees key 0 only
/// assert!((out.output[[1, 1]] - 10.0).abs() < 1e-12); // query 1 matches key 1
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ScaledDotProduct<'m, A> {
    scale: Option<A>,
    masks: Vec<Mask<'m, A>>,
    kernel: Kernel,
    parallelism: Parallelism,
}

impl<A: Storage> Default for ScaledDotProduct<'_, A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m, A: Storage> ScaledDotProduct<'m, A> {
    /// Attention with the default scale `1/√d_k` and no mask.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::array;
    ///
    /// let x = array![[1.0_f32, 2.0]];
    /// let out = attn::ScaledDotProduct::new().forward(&x, &x, &x)?;
    /// assert_eq!(out, x); // a single key returns its value row
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn new() -> Self {
        ScaledDotProduct {
            scale: None,
            masks: Vec::new(),
            kernel: Kernel::Auto,
            parallelism: Parallelism::Rayon,
        }
    }

    /// Multiplies the scores by `scale` instead of `1/√d_k`.
    ///
    /// The scale is checked when attention is computed: zero, NaN or infinity
    /// is an [`Error::InvalidScale`](crate::Error::InvalidScale) then.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::array;
    ///
    /// let q = array![[1.0_f64, 0.0]];
    /// let kv = array![[1.0, 0.0], [0.0, 1.0]];
    /// let w = attn::ScaledDotProduct::new().with_scale(2f64.ln()).weights(&q, &kv)?;
    /// assert!((w[[0, 0]] - 2.0 / 3.0).abs() < 1e-15); // e^{ln 2} : e^0 = 2 : 1
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_scale(mut self, scale: A) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Adds a mask; every mask given applies (see [`Mask`] for how they combine).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// let x = Array2::<f64>::ones((3, 2));
    /// let w = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft).weights(&x, &x)?;
    /// assert_eq!(w.row(1), array![0.5, 0.5, 0.0]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_mask(mut self, mask: Mask<'m, A>) -> Self {
        self.masks.push(mask);
        self
    }

    /// Chooses the implementation of [`forward`](Self::forward) and
    /// [`forward_batched`](Self::forward_batched) (default [`Kernel::Auto`]).
    /// Calls that return weights always take the reference path, which computes them.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Kernel, ScaledDotProduct};
    /// use ndarray::Array2;
    ///
    /// let x = Array2::<f64>::eye(4);
    /// let reference = ScaledDotProduct::new().with_kernel(Kernel::Plain).forward(&x, &x, &x)?;
    /// let fused = ScaledDotProduct::new().with_kernel(Kernel::Fused).forward(&x, &x, &x)?;
    /// assert!((&reference - &fused).iter().all(|d| d.abs() < 1e-15));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Chooses whether the fused kernel uses threads (default [`Parallelism::Rayon`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Parallelism, ScaledDotProduct};
    /// use ndarray::Array2;
    ///
    /// let x = Array2::<f32>::ones((512, 64));
    /// let out = ScaledDotProduct::new().with_parallelism(Parallelism::Sequential).forward(&x, &x, &x)?;
    /// assert_eq!(out, x);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Attention on 2-D inputs: `softmax(QKᵀ·scale)·V`.
    ///
    /// # Shapes
    ///
    /// `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)` → `(L, d_v)`.
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
    /// let q = array![[1.0_f64, 0.0]];
    /// let k = array![[1.0, 0.0], [-1.0, 0.0]];
    /// let v = array![[1.0], [0.0]];
    /// let out = attn::ScaledDotProduct::new().with_scale(2f64.ln() / 2.0).forward(&q, &k, &v)?;
    /// assert!((out[[0, 0]] - 2.0 / 3.0).abs() < 1e-15);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward(
        &self,
        q: &ArrayRef2<A>,
        k: &ArrayRef2<A>,
        v: &ArrayRef2<A>,
    ) -> Result<Array2<A>> {
        self.attend(q.view(), k.view(), v.view())
    }

    /// Attention on batched, multi-head inputs, with grouped-query support.
    ///
    /// Masks broadcast to `(batch, heads, L, S)`.
    ///
    /// # Shapes
    ///
    /// `q: (batch, heads, L, d_k)`, `k: (batch, kv_heads, S, d_k)`,
    /// `v: (batch, kv_heads, S, d_v)` → `(batch, heads, L, d_v)`.
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
    /// let q = Array4::<f32>::ones((2, 8, 5, 16)); // 8 query heads
    /// let kv = Array4::<f32>::ones((2, 2, 7, 16)); // 2 key/value heads
    /// let out = attn::ScaledDotProduct::new().forward_batched(&q, &kv, &kv)?;
    /// assert_eq!(out.dim(), (2, 8, 5, 16));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_batched(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
    ) -> Result<Array4<A>> {
        self.attend(q.view(), k.view(), v.view())
    }
}

/// Attention on 2-D inputs with the default scale `1/√d_k` and no mask:
/// `softmax(QKᵀ/√d_k)·V`.
///
/// For a scale, masks or the weights, use [`ScaledDotProduct`].
///
/// # Shapes
///
/// `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)` → `(L, d_v)`; any strides.
///
/// # Errors
///
/// [`Error::QueryKeyWidth`](crate::Error::QueryKeyWidth) when `q` and `k` differ in `d_k`,
/// [`Error::KeyValueLength`](crate::Error::KeyValueLength) when `k` and `v` differ in `S`, and
/// [`Error::ZeroWidth`](crate::Error::ZeroWidth) when `d_k = 0`.
///
/// # Examples
///
/// ```
/// use attn::scaled_dot_product;
/// use ndarray::array;
///
/// let q = array![[1.0_f64, 0.0, 1.0, 0.0]];
/// let k = array![[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]];
/// let v = array![[1.0, 2.0], [3.0, 4.0]];
/// let out = scaled_dot_product(&q, &k, &v)?; // scores [1, 0]: weights [e/(e+1), 1/(e+1)]
/// let w0 = 1f64.exp() / (1f64.exp() + 1.0);
/// assert!((out[[0, 0]] - (w0 * 1.0 + (1.0 - w0) * 3.0)).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn scaled_dot_product<A: Storage>(
    q: &ArrayRef2<A>,
    k: &ArrayRef2<A>,
    v: &ArrayRef2<A>,
) -> Result<Array2<A>> {
    ScaledDotProduct::new().forward(q, k, v)
}
