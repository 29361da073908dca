//! Multi-head attention: `concat(head₁ … head_h)·W_O + b_o`, with grouped-query heads.

mod backward;
mod cached;
mod check;
mod config;
mod forward;
mod heads;
mod packed;
mod padding;
mod paged;
mod settings;
mod weights;

use ndarray::{
    Array, Array1, Array2, Array3, Array4, ArrayRef2, ArrayView3, ArrayView4, ArrayViewMut2, Axis,
    CowArray, Dimension, Ix3,
};
use rand::Rng;

pub use backward::MultiHeadGradients;
pub use config::{Causality, MultiHeadConfig, PositionEncoding, Projection};
pub use heads::QkvHeads;
pub use weights::MultiHeadWeights;

use super::init::Init;
use super::linear::Linear;
use crate::core::mask::Mask;
use crate::decode::position::alibi_slopes;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::rng;
use crate::sdpa::ScaledDotProduct;
use crate::sdpa::flex::{FlexAttention, LayerScore};

/// Multi-head attention, as PyTorch's `nn.MultiheadAttention(batch_first=True)`
/// and the attention blocks of Hugging Face models (Llama, Mistral, Qwen2, Gemma 2,
/// gpt-oss, GPT-2, GPT-NeoX, Bloom, BERT, ViT, BART, T5): grouped-query heads, any
/// head width, biases per projection, a scale, a causal or sliding-window pattern,
/// rotary or ALiBi positions, a soft-cap on the scores and attention sinks, all set
/// on its [`MultiHeadConfig`] (the soft-cap and sinks run as
/// [`FlexAttention`](crate::flex::FlexAttention) does, in the fused kernels).
///
/// Each head `h` attends with `softmax(Q_h K_hᵀ·scale)·V_h` on its slice of the
/// projected (and, with RoPE, rotated) queries, keys and values; the heads are
/// concatenated and projected by `W_O`. With `n_kv_heads < n_heads`, query head
/// `h` uses key/value head `h / (n_heads / n_kv_heads)`.
///
/// Masks: **`true` = may attend**, as in PyTorch's `scaled_dot_product_attention`,
/// **the opposite of `nn.MultiheadAttention`'s `key_padding_mask` and boolean
/// `attn_mask`** (there `true` = masked out): negate those (`mask.mapv(|m| !m)`).
/// Hugging Face's `attention_mask` (1 = real token) means what ours means; pass it
/// to [`forward_padded`](Self::forward_padded) as is.
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
    /// A sink logit per query head, where the configuration has sinks.
    sinks: Option<Array1<A>>,
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
    /// divide `d_model` (and no head width is set), `kdim` or `vdim` is 0,
    /// `n_kv_heads` does not divide `n_heads`, the scale is 0 or not finite, a
    /// sliding window is 0, a soft-cap is not finite and positive, the rotary
    /// settings do not fit the head (see
    /// [`Rope::check`](crate::Rope::check)); or when `init` is invalid.
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
        let (d, inner, kv) = (self.d_model(), self.inner_dim(), self.kv_width());
        let packed = init == Init::TorchMultihead && self.kdim() == d && self.vdim() == d;
        let sample = |which: Projection, rng: &mut R| {
            let shape = which.shape(&self);
            match (which, init) {
                // PyTorch: out_proj is a Linear with its own bounds
                (Projection::Output, Init::TorchMultihead) => {
                    let bound = 1.0 / (inner as f64).sqrt();
                    Init::Uniform {
                        low: -bound,
                        high: bound,
                    }
                    .sample(shape, rng)
                }
                // one packed in_proj_weight (inner + 2·kv, d): its fans
                _ if packed => init.sample_with_fans(shape, (shape.0, inner + 2 * kv), rng),
                _ => init.sample(shape, rng),
            }
        };
        let [w_q, w_k, w_v, w_o] = [
            sample(Projection::Query, rng)?,
            sample(Projection::Key, rng)?,
            sample(Projection::Value, rng)?,
            sample(Projection::Output, rng)?,
        ];
        let zeros = |which: Projection| {
            self.has_bias_on(which)
                .then(|| Array1::zeros(which.shape(&self).1))
        };
        self.with_weights(MultiHeadWeights {
            w_q,
            w_k,
            w_v,
            w_o,
            b_q: zeros(Projection::Query),
            b_k: zeros(Projection::Key),
            b_v: zeros(Projection::Value),
            b_o: zeros(Projection::Output),
            sinks: self.has_sinks().then(|| Array1::zeros(self.n_heads())),
        })
    }

    /// Builds the layer from given weights.
    ///
    /// # Errors
    ///
    /// The configuration errors of [`random`](Self::random); [`Error::Shape`] when a
    /// weight or bias does not have its shape (see [`MultiHeadWeights`]), or when a
    /// bias is given to a projection without one (see
    /// [`with_bias_on`](Self::with_bias_on)) or missing from one with one, and
    /// sinks the same way ([`with_sinks`](Self::with_sinks));
    /// [`Error::InvalidConfig`] for a sink that is not finite.
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
    ///     b_q: None, b_k: None, b_v: None, b_o: None, sinks: None,
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
        let (linears, sinks) = weights.into_parts(&self)?;
        Ok(MultiHeadAttention {
            linears,
            sinks,
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
        MultiHeadWeights::from_parts(&self.linears, self.sinks.as_ref())
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
}

impl<A: Element> MultiHeadAttention<A> {
    /// `(B, heads, L, head_dim)` → `concat(heads)·W_O + b_o`, `(B, L, d_model)`.
    fn merge_heads(&self, heads: ArrayView4<'_, A>) -> Result<Array3<A>> {
        self.linears[3].forward_batched_named("concatenated heads", &concat(heads))
    }

    /// [`merge_heads`](Self::merge_heads) of a batch of one, `(1, heads, L,
    /// head_dim)`, into `out: (L, d_model)`.
    fn merge_heads_into(&self, heads: ArrayView4<'_, A>, out: ArrayViewMut2<'_, A>) -> Result<()> {
        let concatenated = concat(heads);
        let rows = concatenated.index_axis(Axis(0), 0);
        self.linears[3].forward_into("concatenated heads", &rows, out)
    }

    /// The ALiBi slopes of the layer's heads (empty without ALiBi); the masks of
    /// [`attention`](Self::attention) borrow them.
    fn slopes(&self) -> Array1<A> {
        match self.config.positions() {
            PositionEncoding::Alibi => alibi_slopes(self.config.n_heads())
                .into_iter()
                .map(A::from_f64)
                .collect(),
            PositionEncoding::None | PositionEncoding::Rope(_) => Array1::zeros(0),
        }
    }

    /// The masks of the layer's own configuration: its causal pattern and ALiBi
    /// (borrowing `slopes`).
    fn layer_masks<'m>(&self, slopes: &'m Array1<A>) -> Vec<Mask<'m, A>> {
        let mut masks = Vec::with_capacity(2);
        match self.config.causality() {
            Causality::None => {}
            Causality::Causal => masks.push(Mask::CausalBottomRight),
            Causality::SlidingWindow(size) => masks.push(Mask::SlidingWindow(size)),
        }
        masks.extend(alibi(slopes));
        masks
    }

    /// The layer's attention: its scale and [`layer_masks`](Self::layer_masks)
    /// (borrowing `slopes`, [`slopes`](Self::slopes)), then the call's masks,
    /// its soft-cap and sinks.
    fn attention<'m>(
        &'m self,
        masks: &'m [Mask<'_, A>],
        slopes: &'m Array1<A>,
    ) -> FlexAttention<'m, A, LayerScore<A>> {
        let mut attention = ScaledDotProduct::new().with_scale(A::from_f64(self.config.scale()));
        for mask in self.layer_masks(slopes) {
            attention = attention.with_mask(mask);
        }
        for mask in masks {
            attention = attention.with_mask(mask.reborrow());
        }
        let softcap = self.config.softcap().map(A::from_f64);
        attention.layered(softcap, self.sinks.as_deref())
    }
}

/// The ALiBi mask of a layer's `slopes`, none where it has none.
fn alibi<A>(slopes: &Array1<A>) -> Option<Mask<'_, A>> {
    (!slopes.is_empty()).then(|| Mask::Alibi(slopes.view()))
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

/// Positions `0..n` for every batch row.
fn in_order(batch: usize, n: usize) -> Array2<usize> {
    Array2::from_shape_fn((batch, n), |(_, i)| i)
}

/// `(B, heads, n, head_dim)` → `(B, n, heads·head_dim)`: the heads side by
/// side, borrowed where they lie token by token already (one head), else
/// copied once.
fn concat<A: Element>(heads: ArrayView4<'_, A>) -> CowArray<'_, A, Ix3> {
    let (b, h, n, hd) = heads.dim();
    let tokens = heads.permuted_axes([0, 2, 1, 3]);
    let shape = (b, n, h * hd);
    let holds = "(B, n, heads, head_dim) holds B × n rows of heads·head_dim";
    if tokens.is_standard_layout() {
        CowArray::from(tokens.into_shape_with_order(shape).expect(holds))
    } else {
        let owned = tokens.as_standard_layout().into_owned();
        CowArray::from(owned.into_shape_with_order(shape).expect(holds))
    }
}

/// `(B, n, heads·head_dim)` → `(B, heads, n, head_dim)`.
fn split<A: Element>(x: Array3<A>, heads: usize, head_dim: usize) -> Array4<A> {
    let (b, n, _) = x.dim();
    x.into_shape_with_order((b, n, heads, head_dim))
        .expect("(B, n, heads·head_dim) holds B × n × heads rows of head_dim")
        .permuted_axes([0, 2, 1, 3])
}
