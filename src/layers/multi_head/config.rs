//! The sizes and settings of a multi-head attention layer, and the names of its
//! four projections.

pub use super::settings::{Causality, PositionEncoding};

/// One of the four projections of a [`MultiHeadAttention`](crate::MultiHeadAttention).
///
/// # Examples
///
/// ```
/// use attn::{Init, MultiHeadConfig, Projection};
///
/// let mha = MultiHeadConfig::new(8, 2).with_kdim(3).random::<f32>(Init::XavierUniform, 0)?;
/// assert_eq!(mha.projection(Projection::Key).weight().dim(), (3, 8));
/// assert_eq!(Projection::ALL.len(), 4);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `W_Q`, `b_q`: `(d_model, n_heads·head_dim)`.
    Query,
    /// `W_K`, `b_k`: `(kdim, n_kv_heads·head_dim)`.
    Key,
    /// `W_V`, `b_v`: `(vdim, n_kv_heads·head_dim)`.
    Value,
    /// `W_O`, `b_o`: `(n_heads·head_dim, d_model)`.
    Output,
}

impl Projection {
    /// The four projections, in the order `Q, K, V, O`.
    pub const ALL: [Projection; 4] = [
        Projection::Query,
        Projection::Key,
        Projection::Value,
        Projection::Output,
    ];

    /// This projection's place in [`ALL`](Self::ALL).
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The shape of this projection's weight in `config`, `(in, out)`.
    pub(crate) fn shape(self, config: &MultiHeadConfig) -> (usize, usize) {
        let (d, inner, kv) = (config.d_model(), config.inner_dim(), config.kv_width());
        match self {
            Projection::Query => (d, inner),
            Projection::Key => (config.kdim(), kv),
            Projection::Value => (config.vdim(), kv),
            Projection::Output => (inner, d),
        }
    }
}

/// The sizes of a [`MultiHeadAttention`](crate::MultiHeadAttention): required ones in [`new`](Self::new),
/// optional ones with `with_*`, then one call that checks them and builds.
///
/// # Examples
///
/// ```
/// use attn::{Init, MultiHeadConfig};
///
/// let mha = MultiHeadConfig::new(64, 8).with_kv_heads(2).random::<f32>(Init::TorchMultihead, 0)?;
/// assert_eq!(mha.config().head_dim(), 8);
/// assert!(MultiHeadConfig::new(64, 6).random::<f32>(Init::TorchMultihead, 0).is_err()); // 6 ∤ 64
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiHeadConfig {
    pub(super) d_model: usize,
    pub(super) n_heads: usize,
    pub(super) kdim: Option<usize>,
    pub(super) vdim: Option<usize>,
    pub(super) n_kv_heads: Option<usize>,
    pub(super) head_dim: Option<usize>,
    /// Which projections have a bias, in the order of [`Projection::ALL`].
    pub(super) biases: [bool; 4],
    pub(super) scale: Option<f64>,
    pub(super) causality: Causality,
    pub(super) positions: PositionEncoding,
    pub(super) softcap: Option<f64>,
    pub(super) sinks: bool,
}

impl MultiHeadConfig {
    /// `n_heads` heads over a model width `d_model`; keys and values `d_model` wide,
    /// as many key/value heads as query heads, heads `d_model / n_heads` wide,
    /// biases on, scale `1/√head_dim`, no causal mask, no positions.
    ///
    /// # Examples
    ///
    /// ```
    /// let config = attn::MultiHeadConfig::new(768, 12);
    /// assert_eq!(config.head_dim(), 64);
    /// ```
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        MultiHeadConfig {
            d_model,
            n_heads,
            kdim: None,
            vdim: None,
            n_kv_heads: None,
            head_dim: None,
            biases: [true; 4],
            scale: None,
            causality: Causality::None,
            positions: PositionEncoding::None,
            softcap: None,
            sinks: false,
        }
    }

    /// Keys come from inputs `kdim` wide (PyTorch `kdim`).
    ///
    /// # Examples
    ///
    /// ```
    /// let config = attn::MultiHeadConfig::new(8, 2).with_kdim(5);
    /// assert_eq!(config.kdim(), 5);
    /// ```
    pub fn with_kdim(mut self, kdim: usize) -> Self {
        self.kdim = Some(kdim);
        self
    }

    /// Values come from inputs `vdim` wide (PyTorch `vdim`).
    ///
    /// # Examples
    ///
    /// ```
    /// let config = attn::MultiHeadConfig::new(8, 2).with_vdim(7);
    /// assert_eq!(config.vdim(), 7);
    /// ```
    pub fn with_vdim(mut self, vdim: usize) -> Self {
        self.vdim = Some(vdim);
        self
    }

    /// Grouped-query attention: `n_kv_heads` key/value heads, which must divide `n_heads`.
    ///
    /// # Examples
    ///
    /// ```
    /// let config = attn::MultiHeadConfig::new(64, 8).with_kv_heads(2);
    /// assert_eq!(config.kv_width(), 16);
    /// ```
    pub fn with_kv_heads(mut self, n_kv_heads: usize) -> Self {
        self.n_kv_heads = Some(n_kv_heads);
        self
    }

    /// No biases in any projection.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    ///
    /// let mha = MultiHeadConfig::new(8, 2).without_bias().random::<f64>(Init::XavierUniform, 0)?;
    /// assert!(mha.weights().b_q.is_none());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn without_bias(self) -> Self {
        self.with_bias_on(&[])
    }

    /// Biases on exactly these projections (Qwen2: query, key and value but not
    /// output; Whisper: all but key).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{MultiHeadConfig, Projection::*};
    ///
    /// let qwen2 = MultiHeadConfig::new(48, 6).with_bias_on(&[Query, Key, Value]);
    /// assert!(qwen2.has_bias_on(Key) && !qwen2.has_bias_on(Output));
    /// ```
    pub fn with_bias_on(mut self, projections: &[Projection]) -> Self {
        self.biases = [false; 4];
        for p in projections {
            self.biases[p.index()] = true;
        }
        self
    }

    /// Heads `head_dim` wide, whatever `d_model / n_heads` is (T5, Llama 3 variants):
    /// queries project to `n_heads · head_dim` features and `W_O` back to `d_model`.
    ///
    /// # Examples
    ///
    /// ```
    /// let t5 = attn::MultiHeadConfig::new(32, 4).with_head_dim(16);
    /// assert_eq!((t5.head_dim(), t5.inner_dim()), (16, 64));
    /// ```
    pub fn with_head_dim(mut self, head_dim: usize) -> Self {
        self.head_dim = Some(head_dim);
        self
    }

    /// The factor on `QKᵀ` instead of `1/√head_dim` (T5: 1).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(32, 4).with_scale(1.0).scale(), 1.0);
    /// ```
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Which keys each query sees (decoders are causal).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, MultiHeadConfig};
    /// assert_eq!(MultiHeadConfig::new(8, 2).causality(), Causality::None);
    /// ```
    pub fn with_causality(mut self, causality: Causality) -> Self {
        self.causality = causality;
        self
    }

    /// How the layer encodes positions (rotary embeddings, ALiBi).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{MultiHeadConfig, PositionEncoding};
    /// assert_eq!(MultiHeadConfig::new(8, 2).positions(), PositionEncoding::None);
    /// ```
    pub fn with_positions(mut self, positions: PositionEncoding) -> Self {
        self.positions = positions;
        self
    }

    /// Soft-caps the scaled scores at `cap`: `cap·tanh(s/cap)` before masks
    /// and the softmax (Gemma 2's `attn_logit_softcapping`; see
    /// [`SoftCap`](crate::flex::SoftCap)).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 2).with_softcap(50.0).softcap(), Some(50.0));
    /// ```
    pub fn with_softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Gives every query head a learned sink logit in its softmax's denominator
    /// (gpt-oss's `sinks`): the weights of a row sum to less than 1. The logits
    /// are part of the layer's weights ([`MultiHeadWeights::sinks`](crate::MultiHeadWeights::sinks)).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::MultiHeadConfig::new(8, 2).with_sinks().has_sinks());
    /// ```
    pub fn with_sinks(mut self) -> Self {
        self.sinks = true;
        self
    }

    /// The soft-cap on the scores, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 2).softcap(), None);
    /// ```
    pub fn softcap(&self) -> Option<f64> {
        self.softcap
    }

    /// Whether the layer has attention sinks.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!attn::MultiHeadConfig::new(8, 2).has_sinks());
    /// ```
    pub fn has_sinks(&self) -> bool {
        self.sinks
    }

    /// Whether projection `which` has a bias.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{MultiHeadConfig, Projection};
    /// assert!(MultiHeadConfig::new(8, 2).has_bias_on(Projection::Output));
    /// ```
    pub fn has_bias_on(&self, which: Projection) -> bool {
        self.biases[which.index()]
    }

    /// The factor on `QKᵀ`: `1/√head_dim` unless [`with_scale`](Self::with_scale).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 2).scale(), 0.5);
    /// ```
    pub fn scale(&self) -> f64 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim() as f64).sqrt())
    }

    /// Which keys each query sees.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, MultiHeadConfig};
    /// let gpt2 = MultiHeadConfig::new(32, 4).with_causality(Causality::Causal);
    /// assert_eq!(gpt2.causality(), Causality::Causal);
    /// ```
    pub fn causality(&self) -> Causality {
        self.causality
    }

    /// How the layer encodes positions.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{MultiHeadConfig, PositionEncoding};
    /// let bloom = MultiHeadConfig::new(48, 6).with_positions(PositionEncoding::Alibi);
    /// assert_eq!(bloom.positions(), PositionEncoding::Alibi);
    /// ```
    pub fn positions(&self) -> PositionEncoding {
        self.positions
    }

    /// The model width.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 2).d_model(), 8);
    /// ```
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Whether any projection has a bias (`true` unless
    /// [`without_bias`](Self::without_bias) or [`with_bias_on`](Self::with_bias_on)`(&[])`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::MultiHeadConfig::new(8, 2).has_bias());
    /// assert!(!attn::MultiHeadConfig::new(8, 2).without_bias().has_bias());
    /// ```
    pub fn has_bias(&self) -> bool {
        self.biases.contains(&true)
    }

    /// The number of query heads.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 2).n_heads(), 2);
    /// ```
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// The number of key/value heads (`n_heads` unless set).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).n_kv_heads(), 4);
    /// ```
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// The width of the key inputs (`d_model` unless set).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).kdim(), 8);
    /// ```
    pub fn kdim(&self) -> usize {
        self.kdim.unwrap_or(self.d_model)
    }

    /// The width of the value inputs (`d_model` unless set).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).vdim(), 8);
    /// ```
    pub fn vdim(&self) -> usize {
        self.vdim.unwrap_or(self.d_model)
    }

    /// The width of one head: as set by [`with_head_dim`](Self::with_head_dim), else
    /// `d_model / n_heads` (0 while `n_heads` is 0).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).head_dim(), 2);
    /// ```
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or_else(|| self.d_model.checked_div(self.n_heads).unwrap_or(0))
    }

    /// The width of the projected queries and of the concatenated heads,
    /// `n_heads · head_dim` (`d_model` unless [`with_head_dim`](Self::with_head_dim)).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).inner_dim(), 8);
    /// ```
    pub fn inner_dim(&self) -> usize {
        // saturates where the sizes do not fit; `check` refuses those
        self.n_heads.saturating_mul(self.head_dim())
    }

    /// The width of the projected keys and values, `n_kv_heads · head_dim`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).with_kv_heads(2).kv_width(), 4);
    /// ```
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads().saturating_mul(self.head_dim())
    }
}
