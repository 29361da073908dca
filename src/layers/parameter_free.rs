//! Attention without learned weights: CrossViT's parameter-free `SA` and `CAT`,
//! and SAGAN-style self-attention over an image feature map.

use ndarray::{
    Array, Array2, Array3, Array4, ArrayRef2, ArrayRef3, ArrayRef4, Axis, Dimension, Ix3, Ix4,
};

use crate::element::Element;
use crate::error::{Error, Result};
use crate::sdpa::{ScaledDotProduct, scaled_dot_product};

/// Parameter-free self-attention `SA(X) = softmax(XXᵀ/√d_x)·X`.
///
/// # Shapes
///
/// `x: (N, d_x)` → `(N, d_x)`.
///
/// # Errors
///
/// [`Error::ZeroWidth`] when `d_x = 0`.
///
/// # Examples
///
/// ```
/// use attn::parameter_free::sa;
/// use ndarray::array;
///
/// let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
/// let e = (1.0 / 2f64.sqrt()).exp(); // exp(x·x/√2) for a token with itself
/// let out = sa(&x)?;
/// assert!((out[[0, 0]] - e / (e + 1.0)).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn sa<A: Element>(x: &ArrayRef2<A>) -> Result<Array2<A>> {
    scaled_dot_product(x, x, x)
}

/// CrossViT's composite `CAT(Q, K, V) = softmax(SA(Q)·SA(K)ᵀ/√d_k)·SA(V)`.
///
/// # Shapes
///
/// `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)` → `(L, d_v)`.
///
/// # Errors
///
/// The errors of [`scaled_dot_product`]: `q` and `k` must share `d_k`, `k` and `v`
/// their length, and `d_k > 0`, `d_v > 0`.
///
/// # Examples
///
/// ```
/// use attn::parameter_free::{cat, sa};
/// use ndarray::array;
///
/// let q = array![[1.0_f64, 0.0]];
/// let kv = array![[0.5, 1.0], [1.0, -1.0]];
/// let direct = attn::scaled_dot_product(&sa(&q)?, &sa(&kv)?, &sa(&kv)?)?;
/// assert_eq!(cat(&q, &kv, &kv)?, direct);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn cat<A: Element>(q: &ArrayRef2<A>, k: &ArrayRef2<A>, v: &ArrayRef2<A>) -> Result<Array2<A>> {
    if q.ncols() != k.ncols() {
        return Err(Error::QueryKeyWidth {
            query: q.shape().to_vec(),
            key: k.shape().to_vec(),
        });
    }
    if k.nrows() != v.nrows() {
        return Err(Error::KeyValueLength {
            key: k.shape().to_vec(),
            value: v.shape().to_vec(),
        });
    }
    scaled_dot_product(&sa(q)?, &sa(k)?, &sa(v)?)
}

/// Self-attention over the pixels of an image feature map, as in SAGAN:
/// no projections and no scaling.
///
/// The map `x: (C, H, W)` is read as `X: (C, N)` with `N = H·W` pixels (pixel
/// `n = h·W + w`), then `S = XᵀX` (pixel-to-pixel similarity over channels),
/// `A = softmax(S)` row-wise, `o = X·Aᵀ` (every pixel a mix of all pixels), back to
/// `(C, H, W)`. With a residual weight `γ` the output is `γ·o + x`.
///
/// # Shapes
///
/// `(C, H, W)` → output `(C, H, W)`, weights `(N, N)`; batched `(B, C, H, W)` →
/// `(B, C, H, W)`, weights `(B, N, N)`.
///
/// # Examples
///
/// ```
/// use attn::parameter_free::FeatureMapAttention;
/// use ndarray::Array3;
///
/// let x = Array3::from_shape_fn((2, 2, 2), |(c, h, w)| (c + 2 * h + w) as f64 / 4.0);
/// let out = FeatureMapAttention::new().forward(&x)?;
/// assert_eq!(out.weights.dim(), (4, 4)); // pixel-to-pixel attention map
/// let with_residual = FeatureMapAttention::new().with_residual(0.5).forward(&x)?;
/// let expected = &out.output * 0.5 + &x;
/// assert!((&with_residual.output - &expected).iter().all(|d| d.abs() < 1e-15));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureMapAttention<A> {
    residual: Option<A>,
}

/// A feature map after attention, with the pixel-to-pixel weights.
///
/// # Shapes
///
/// Unbatched (`D = Ix3`): `output: (C, H, W)`, `weights: (N, N)`.
/// Batched (`D = Ix4`): `output: (B, C, H, W)`, `weights: (B, N, N)`.
///
/// # Examples
///
/// ```
/// use attn::parameter_free::FeatureMapAttention;
/// use ndarray::Array3;
///
/// let out = FeatureMapAttention::new().forward(&Array3::<f32>::zeros((3, 2, 2)))?;
/// assert_eq!(out.weights.row(0).sum(), 1.0);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMapOutput<A, D: Dimension> {
    /// `o` (or `γ·o + x`), shaped like the input.
    pub output: Array<A, D>,
    /// `A = softmax(XᵀX)`: row `n` says how much each pixel contributes to pixel `n`.
    pub weights: Array<A, D::Smaller>,
}

impl<A: Element> Default for FeatureMapAttention<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Element> FeatureMapAttention<A> {
    /// Feature-map attention without a residual: the output is `o`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::parameter_free::FeatureMapAttention;
    /// use ndarray::Array3;
    ///
    /// let x = Array3::<f64>::ones((1, 1, 1)); // one pixel attends to itself
    /// assert_eq!(FeatureMapAttention::new().forward(&x)?.output, x);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn new() -> Self {
        FeatureMapAttention { residual: None }
    }

    /// SAGAN's residual: the output is `γ·o + x` (SAGAN learns `γ`, starting at 0).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::parameter_free::FeatureMapAttention;
    /// use ndarray::Array3;
    ///
    /// let x = Array3::<f64>::ones((2, 2, 1));
    /// assert_eq!(FeatureMapAttention::new().with_residual(0.0).forward(&x)?.output, x);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_residual(mut self, gamma: A) -> Self {
        self.residual = Some(gamma);
        self
    }

    /// Attention over the pixels of one feature map.
    ///
    /// # Shapes
    ///
    /// `x: (C, H, W)` → output `(C, H, W)`, weights `(H·W, H·W)`.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroWidth`] when `C = 0`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::parameter_free::FeatureMapAttention;
    /// use ndarray::Array3;
    ///
    /// let x = Array3::from_shape_fn((2, 3, 4), |(c, h, w)| (c * 12 + h * 4 + w) as f32 / 24.0);
    /// let out = FeatureMapAttention::new().forward(&x)?;
    /// assert_eq!((out.output.dim(), out.weights.dim()), ((2, 3, 4), (12, 12)));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward(&self, x: &ArrayRef3<A>) -> Result<FeatureMapOutput<A, Ix3>> {
        let (c, h, w) = x.dim();
        check_channels(c, x.shape())?;
        let pixels = x
            .to_shape((c, h * w))
            .expect("(C, H, W) holds C rows of H·W pixels");
        let tokens = pixels.t(); // (N, C): one row per pixel
        let attended = ScaledDotProduct::new()
            .with_scale(A::one())
            .forward_with_weights(&tokens, &tokens, &tokens)?;
        // o = X·Aᵀ = (A·T)ᵀ, with T = Xᵀ
        let o = attended.output.t();
        let mut output: Array3<A> = o
            .to_shape((c, h, w))
            .expect("(C, H·W) holds C maps of H × W")
            .into_owned();
        if let Some(gamma) = self.residual {
            output.zip_mut_with(x, |o, &x| *o = gamma * *o + x);
        }
        Ok(FeatureMapOutput {
            output,
            weights: attended.weights,
        })
    }

    /// [`forward`](Self::forward) on every map of a batch.
    ///
    /// # Shapes
    ///
    /// `x: (B, C, H, W)` → output `(B, C, H, W)`, weights `(B, H·W, H·W)`.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::parameter_free::FeatureMapAttention;
    /// use ndarray::Array4;
    ///
    /// let x = Array4::<f64>::ones((3, 2, 2, 2));
    /// let out = FeatureMapAttention::new().forward_batched(&x)?;
    /// assert_eq!(out.weights.dim(), (3, 4, 4));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_batched(&self, x: &ArrayRef4<A>) -> Result<FeatureMapOutput<A, Ix4>> {
        let (b, c, h, w) = x.dim();
        check_channels(c, x.shape())?;
        let n = h * w;
        let mut output = Array4::zeros((b, c, h, w));
        let mut weights = Array3::zeros((b, n, n));
        for (i, map) in x.outer_iter().enumerate() {
            let one = self.forward(&map)?;
            output.index_axis_mut(Axis(0), i).assign(&one.output);
            weights.index_axis_mut(Axis(0), i).assign(&one.weights);
        }
        Ok(FeatureMapOutput { output, weights })
    }
}

fn check_channels(c: usize, shape: &[usize]) -> Result<()> {
    if c == 0 {
        return Err(Error::ZeroWidth {
            what: "channels C",
            shape: shape.to_vec(),
        });
    }
    Ok(())
}
