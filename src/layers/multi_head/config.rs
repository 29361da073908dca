//! The sizes of a multi-head attention layer.

use crate::error::{Error, Result};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiHeadConfig {
    d_model: usize,
    n_heads: usize,
    kdim: Option<usize>,
    vdim: Option<usize>,
    n_kv_heads: Option<usize>,
    bias: bool,
}

impl MultiHeadConfig {
    /// `n_heads` heads over a model width `d_model`; keys and values `d_model` wide,
    /// as many key/value heads as query heads, biases on.
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
            bias: true,
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
    pub fn without_bias(mut self) -> Self {
        self.bias = false;
        self
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

    /// Whether the projections have biases (`true` unless
    /// [`without_bias`](Self::without_bias)).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::MultiHeadConfig::new(8, 2).has_bias());
    /// assert!(!attn::MultiHeadConfig::new(8, 2).without_bias().has_bias());
    /// ```
    pub fn has_bias(&self) -> bool {
        self.bias
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

    /// The width of one head, `d_model / n_heads` (0 while `n_heads` is 0).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).head_dim(), 2);
    /// ```
    pub fn head_dim(&self) -> usize {
        self.d_model.checked_div(self.n_heads).unwrap_or(0)
    }

    /// The width of the projected keys and values, `n_kv_heads · head_dim`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::MultiHeadConfig::new(8, 4).with_kv_heads(2).kv_width(), 4);
    /// ```
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads() * self.head_dim()
    }

    /// Checks the sizes.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the sizes that do not fit.
    pub(crate) fn check(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.d_model == 0 || self.n_heads == 0 {
            return invalid(format!(
                "d_model ({}) and n_heads ({}) must be positive",
                self.d_model, self.n_heads
            ));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return invalid(format!(
                "n_heads ({}) must divide d_model ({})",
                self.n_heads, self.d_model
            ));
        }
        if self.kdim() == 0 || self.vdim() == 0 {
            return invalid(format!(
                "kdim ({}) and vdim ({}) must be positive",
                self.kdim(),
                self.vdim()
            ));
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return invalid(format!(
                "n_kv_heads ({kv}) must be positive and divide n_heads ({})",
                self.n_heads
            ));
        }
        Ok(())
    }
}
