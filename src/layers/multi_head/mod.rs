//! Multi-head attention: `concat(head₁ … head_h)·W_O + b_o`, with grouped-query heads.

mod backward;
mod config;
mod weights;

use ndarray::{
    Array, Array1, Array2, Array3, Array4, ArrayRef2, ArrayRef3, ArrayView3, Axis, Dimension, Ix2,
    Ix3,
};
use rand::Rng;

pub use backward::MultiHeadGradients;
pub use config::MultiHeadConfig;
pub use weights::{MultiHeadWeights, Projection};

use super::init::Init;
use super::linear::Linear;
use crate::core::mask::Mask;
use crate::decode::cache::KvCache;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::rng;
use crate::sdpa::ScaledDotProduct;

/// Multi-head attention, as PyTorch's `nn.MultiheadAttention(batch_first=True)`,
/// with grouped-query heads.
///
/// Each head `h` attends with `softmax(Q_h K_hᵀ/√head_dim)·V_h` on its slice of the
/// projected queries, keys and values; the heads are concatenated and projected by
/// `W_O`. With `n_kv_heads < n_heads`, query head `h` uses key/value head
/// `h / (n_heads / n_kv_heads)`.
///
/// # Shapes
///
/// 2-D: `query: (L, d_model)`, `key: (S, kdim)`, `value: (S, vdim)` → `(L, d_model)`.
/// Batched: the same with a leading batch axis. Masks broadcast to
/// `(batch, n_heads, L, S)`, so an `(L, S)` or `(S,)` mask serves every head.
///
/// # Examples
///
/// ```
/// use attn::{Init, Mask, MultiHeadConfig};
/// use ndarray::Array2;
///
/// let mha = MultiHeadConfig::new(16, 4).random::<f64>(Init::TorchMultihead, 42)?;
/// let x = Array2::from_shape_fn((5, 16), |(i, j)| (i as f64 - j as f64) / 10.0);
/// let out = mha.forward_with_weights(&x, &x, &x, &[Mask::CausalTopLeft])?;
/// assert_eq!(out.output.dim(), (5, 16));
/// assert_eq!(out.head_weights.dim(), (4, 5, 5));
/// assert_eq!(out.mean_weights[[0, 1]], 0.0);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MultiHeadAttention<A> {
    config: MultiHeadConfig,
    /// `W_Q`, `W_K`, `W_V`, `W_O` with their biases, in the order of [`Projection::ALL`].
    linears: [Linear<A>; 4],
}

/// The output of multi-head attention with the weights of every head and their mean
/// (PyTorch's `need_weights` with and without `average_attn_weights`).
///
/// # Shapes
///
/// 2-D (`D = Ix2`): `output: (L, d_model)`, `head_weights: (n_heads, L, S)`,
/// `mean_weights: (L, S)`. Batched (`D = Ix3`): each with a leading batch axis.
///
/// # Examples
///
/// ```
/// use attn::{Init, MultiHeadConfig};
/// use ndarray::Array2;
///
/// let mha = MultiHeadConfig::new(8, 2).random::<f32>(Init::XavierUniform, 1)?;
/// let x = Array2::<f32>::ones((3, 8));
/// let out = mha.forward_with_weights(&x, &x, &x, &[])?;
/// assert_eq!(out.mean_weights, Array2::from_elem((3, 3), 1.0 / 3.0));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MultiHeadOutput<A, D: Dimension> {
    /// `concat(heads)·W_O + b_o`.
    pub output: Array<A, D>,
    /// The attention weights of every head.
    pub head_weights: Array<A, D::Larger>,
    /// The weights averaged over heads.
    pub mean_weights: Array<A, D>,
}

impl MultiHeadConfig {
    /// Builds the layer with random weights reproducible from `seed` (see
    /// [`rng::seeded`](crate::rng::seeded)); biases 0. `W_Q, W_K, W_V, W_O` are
    /// drawn in that order. With [`Init::TorchMultihead`] the bounds are PyTorch's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `d_model` or `n_heads` is 0, `n_heads` does not
    /// divide `d_model`, `kdim` or `vdim` is 0, or `n_kv_heads` does not divide
    /// `n_heads`; or when `init` is invalid.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    ///
    /// let a = MultiHeadConfig::new(8, 2).random::<f64>(Init::TorchMultihead, 9)?;
    /// let b = MultiHeadConfig::new(8, 2).random::<f64>(Init::TorchMultihead, 9)?;
    /// assert_eq!(a, b);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn random<A: Element>(self, init: Init, seed: u64) -> Result<MultiHeadAttention<A>> {
        self.random_using(init, &mut rng::seeded(seed))
    }

    /// [`random`](Self::random) with the caller's generator.
    ///
    /// # Errors
    ///
    /// As [`random`](Self::random).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    ///
    /// let mut rng = attn::rng::seeded(1);
    /// let mha = MultiHeadConfig::new(8, 4).with_kdim(3).random_using::<f32, _>(Init::XavierNormal, &mut rng)?;
    /// assert_eq!(mha.weights().w_k.dim(), (3, 8));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn random_using<A: Element, R: Rng + ?Sized>(
        self,
        init: Init,
        rng: &mut R,
    ) -> Result<MultiHeadAttention<A>> {
        self.check()?;
        let (d, kv) = (self.d_model(), self.kv_width());
        let packed = init == Init::TorchMultihead && self.kdim() == d && self.vdim() == d;
        let fans = |rows: usize, cols: usize| {
            if packed {
                (rows, d + 2 * kv)
            } else {
                (rows, cols)
            }
        };
        let w_q = init.sample_with_fans((d, d), fans(d, d), rng)?;
        let w_k = init.sample_with_fans((self.kdim(), kv), fans(self.kdim(), kv), rng)?;
        let w_v = init.sample_with_fans((self.vdim(), kv), fans(self.vdim(), kv), rng)?;
        let w_o = match init {
            Init::TorchMultihead => {
                let bound = 1.0 / (d as f64).sqrt();
                Init::Uniform {
                    low: -bound,
                    high: bound,
                }
                .sample((d, d), rng)?
            }
            _ => init.sample((d, d), rng)?,
        };
        let zeros = |n: usize| self.has_bias().then(|| Array1::zeros(n));
        self.with_weights(MultiHeadWeights {
            w_q,
            w_k,
            w_v,
            w_o,
            b_q: zeros(d),
            b_k: zeros(kv),
            b_v: zeros(kv),
            b_o: zeros(d),
        })
    }

    /// Builds the layer from given weights.
    ///
    /// # Errors
    ///
    /// The configuration errors of [`random`](Self::random); [`Error::Shape`] when a
    /// weight or bias does not have its shape (see [`MultiHeadWeights`]), or when
    /// biases are given to a configuration [`without_bias`](Self::without_bias) or
    /// missing from one with them.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{MultiHeadConfig, MultiHeadWeights};
    /// use ndarray::Array2;
    ///
    /// let w = |r, c| Array2::<f64>::zeros((r, c));
    /// let weights = MultiHeadWeights {
    ///     w_q: w(4, 4), w_k: w(4, 2), w_v: w(4, 2), w_o: w(4, 4),
    ///     b_q: None, b_k: None, b_v: None, b_o: None,
    /// };
    /// let config = MultiHeadConfig::new(4, 2).with_kv_heads(1).without_bias();
    /// assert!(config.with_weights(weights).is_ok());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_weights<A: Element>(
        self,
        weights: MultiHeadWeights<A>,
    ) -> Result<MultiHeadAttention<A>> {
        self.check()?;
        Ok(MultiHeadAttention {
            linears: weights.into_linears(&self)?,
            config: self,
        })
    }
}

impl<A: Element> MultiHeadAttention<A> {
    /// The configuration this layer was built from.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    ///
    /// let config = MultiHeadConfig::new(8, 2);
    /// assert_eq!(config.random::<f32>(Init::XavierUniform, 0)?.config(), &config);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn config(&self) -> &MultiHeadConfig {
        &self.config
    }

    /// A copy of the layer's weights (to borrow one projection, see
    /// [`projection`](Self::projection)).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    ///
    /// let mha = MultiHeadConfig::new(8, 2).random::<f32>(Init::XavierUniform, 0)?;
    /// assert_eq!(mha.weights().w_q.dim(), (8, 8));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn weights(&self) -> MultiHeadWeights<A> {
        MultiHeadWeights::from_linears(&self.linears)
    }

    /// One of the layer's four projections.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig, Projection};
    ///
    /// let mha = MultiHeadConfig::new(8, 4).with_kv_heads(2).random::<f64>(Init::TorchMultihead, 0)?;
    /// let w_v = mha.projection(Projection::Value);
    /// assert_eq!((w_v.in_features(), w_v.out_features()), (8, 4));
    /// assert_eq!(w_v.bias().map(|b| b.len()), Some(4));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn projection(&self, which: Projection) -> &Linear<A> {
        let [q, k, v, o] = &self.linears;
        match which {
            Projection::Query => q,
            Projection::Key => k,
            Projection::Value => v,
            Projection::Output => o,
        }
    }

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
    /// errors of [`ScaledDotProduct`].
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
    /// `(B, L, d_model)`; masks broadcast to `(B, n_heads, L, S)`.
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
        let (q, k, v) = self.split_heads(query, key, value)?;
        let heads = attention(masks).forward_batched(&q, &k, &v)?;
        self.merge_heads(heads)
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
        let (q, k, v) = self.split_heads(query, key, value)?;
        let heads = attention(masks).forward_batched_with_weights(&q, &k, &v)?;
        let n_heads = A::from_f64(self.config.n_heads() as f64);
        let mean_weights = heads.weights.sum_axis(Axis(1)) / n_heads;
        Ok(MultiHeadOutput {
            output: self.merge_heads(heads.output)?,
            head_weights: heads.weights,
            mean_weights,
        })
    }

    /// Self-attention of new tokens with a [`KvCache`]: projects `x`, appends its
    /// keys and values to the cache and attends causally to every cached position
    /// (within the window of a sliding cache). A prompt fills the cache in one call;
    /// each decoding step then passes its new token(s).
    ///
    /// # Shapes
    ///
    /// `x: (B, T, d_model)` → `(B, T, d_model)`; the cache holds
    /// `(B, n_kv_heads, ·, head_dim)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `kdim` or `vdim` differs from `d_model` (a
    /// cache holds self-attention keys), [`Error::Shape`] when `x` or the cache does
    /// not fit the layer.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, KvCache, MultiHeadConfig};
    /// use ndarray::Array3;
    ///
    /// let mha = MultiHeadConfig::new(16, 4).with_kv_heads(2).random::<f32>(Init::TorchMultihead, 0)?;
    /// let mut cache = KvCache::new(1, 2, 4, 4);
    /// let prompt = Array3::<f32>::ones((1, 6, 16));
    /// mha.forward_cached(&prompt, &mut cache)?;
    /// let next = mha.forward_cached(&Array3::ones((1, 1, 16)), &mut cache)?;
    /// assert_eq!((next.dim(), cache.len()), ((1, 1, 16), 7));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_cached(&self, x: &ArrayRef3<A>, cache: &mut KvCache<A>) -> Result<Array3<A>> {
        let d = self.config.d_model();
        if self.config.kdim() != d || self.config.vdim() != d {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a key/value cache holds self-attention keys: kdim ({}) and vdim ({}) must equal d_model ({d})",
                    self.config.kdim(),
                    self.config.vdim()
                ),
            });
        }
        let (q, k, v) = self.split_heads(x, x, x)?;
        let heads = cache.attend(&q, &k, &v)?;
        self.merge_heads(heads)
    }

    /// Projects the inputs and splits them into `(B, heads, seq, head_dim)`.
    fn split_heads(
        &self,
        query: &ArrayRef3<A>,
        key: &ArrayRef3<A>,
        value: &ArrayRef3<A>,
    ) -> Result<(Array4<A>, Array4<A>, Array4<A>)> {
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
        let (h, kv) = (self.config.n_heads(), self.config.n_kv_heads());
        let [w_q, w_k, w_v, _] = &self.linears;
        let q = w_q.forward_batched_named("query width must be d_model", query)?;
        let k = w_k.forward_batched_named("key width must be kdim", key)?;
        let v = w_v.forward_batched_named("value width must be vdim", value)?;
        let hd = self.config.head_dim();
        Ok((split(q, h, hd), split(k, kv, hd), split(v, kv, hd)))
    }

    /// `(B, heads, L, head_dim)` → `concat(heads)·W_O + b_o`, `(B, L, d_model)`.
    fn merge_heads(&self, heads: Array4<A>) -> Result<Array3<A>> {
        self.linears[3].forward_batched_named("concatenated heads", &concat(heads))
    }
}

/// An error of a 2-D call, which runs as a batch of one, in the caller's shapes:
/// without the batch axis the caller never made.
fn in_callers_shapes(e: Error) -> Error {
    let drop_batch = |shape: Vec<usize>| match shape.split_first() {
        Some((1, rest)) if rest.len() == 2 => rest.to_vec(),
        _ => shape,
    };
    match e {
        Error::Shape {
            what,
            expected,
            found,
        } => Error::Shape {
            what,
            expected: drop_batch(expected),
            found: drop_batch(found),
        },
        Error::KeyValueLength { key, value } => Error::KeyValueLength {
            key: drop_batch(key),
            value: drop_batch(value),
        },
        other => other,
    }
}

/// A `(rows, cols)` array as a `(1, rows, cols)` view.
fn batch_of_one<A>(x: &ArrayRef2<A>) -> ArrayView3<'_, A> {
    x.view().insert_axis(Axis(0))
}

/// The core attention with the caller's masks.
fn attention<'m, A: Element>(masks: &[Mask<'m, A>]) -> ScaledDotProduct<'m, A> {
    masks
        .iter()
        .cloned()
        .fold(ScaledDotProduct::new(), ScaledDotProduct::with_mask)
}

/// `(B, heads, n, head_dim)` → `(B, n, heads·head_dim)`: the heads side by side.
fn concat<A: Element>(heads: Array4<A>) -> Array3<A> {
    let (b, h, n, hd) = heads.dim();
    heads
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((b, n, h * hd))
        .expect("(B, n, heads, head_dim) holds B × n rows of heads·head_dim")
}

/// `(B, n, heads·head_dim)` → `(B, heads, n, head_dim)`.
fn split<A: Element>(x: Array3<A>, heads: usize, head_dim: usize) -> Array4<A> {
    let (b, n, _) = x.dim();
    x.into_shape_with_order((b, n, heads, head_dim))
        .expect("(B, n, heads·head_dim) holds B × n × heads rows of head_dim")
        .permuted_axes([0, 2, 1, 3])
}
