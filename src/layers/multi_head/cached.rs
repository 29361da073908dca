//! Multi-head attention one or a few tokens at a time, with a key/value cache.

use ndarray::{Array2, Array3, ArrayRef2, ArrayRef3, Ix3};

use super::padding::positions_of;
use super::{MultiHeadAttention, MultiHeadOutput, alibi};
use crate::core::mask::Mask;
use crate::decode::cache::{KvCache, LayerStep, Settings};
use crate::element::Element;
use crate::error::{Error, Result};

impl<A: Element> MultiHeadAttention<A> {
    /// An empty cache for this layer's keys and values: `batch` rows of
    /// `n_kv_heads` heads, sliding if the layer has a sliding window.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, Init, MultiHeadConfig};
    ///
    /// let mistral = MultiHeadConfig::new(32, 4).with_kv_heads(1)
    ///     .with_causality(Causality::SlidingWindow(3))
    ///     .random::<f32>(Init::XavierUniform, 0)?;
    /// assert_eq!(mistral.new_cache(2).window(), Some(3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn new_cache(&self, batch: usize) -> KvCache<A> {
        let (kv, hd) = (self.config.n_kv_heads(), self.config.head_dim());
        // sizes that cannot make a cache (a batch of 0) are reported by its first step
        KvCache::of_sizes([batch, kv, hd, hd], self.config.causality().window())
            .with_scale(A::from_f64(self.config.scale()))
    }

    /// Self-attention of new tokens with a [`KvCache`]: projects `x`, appends its
    /// keys and values to the cache and attends causally to every cached position
    /// (within the window of a sliding cache or layer). A prompt fills the cache
    /// in one call; each decoding step then passes its new token(s). Rotary
    /// embeddings rotate each token at its row's position (see
    /// [`KvCache::positions`]). The cache makes attention causal whatever the
    /// layer's [`Causality`](crate::Causality); the layer's scale and window apply whatever the
    /// cache's own (a sliding cache's ring narrower than the layer's window keeps
    /// attention within the ring). [`new_cache`](Self::new_cache) makes the
    /// cache that fits.
    ///
    /// # Shapes
    ///
    /// `x: (B, T, d_model)` → `(B, T, d_model)`; the cache holds
    /// `(B, n_kv_heads, ·, head_dim)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `kdim` or `vdim` differs from `d_model` (a
    /// cache holds self-attention keys) or the cache's sizes cannot make a cache,
    /// [`Error::Shape`] when `x` or the cache does not fit the layer; the cache
    /// is then left as it was.
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
        let (b, t, _) = x.dim();
        Ok(self
            .cached(x, &Array2::from_elem((b, t), true), cache, false)?
            .output)
    }

    /// [`forward_cached`](Self::forward_cached) for a batch whose rows are padded
    /// (generation pads on the left): `real[[b, t]]` says whether new token `t` of
    /// row `b` is a real token (Hugging Face's `attention_mask` for the new tokens).
    /// Padding keys are never attended to and do not advance their row's
    /// position, so each row gives the numbers of its sequence alone.
    ///
    /// # Shapes
    ///
    /// `x: (B, T, d_model)`, `real: (B, T)` → `(B, T, d_model)`.
    ///
    /// # Errors
    ///
    /// As [`forward_cached`](Self::forward_cached), [`Error::Shape`] when `real`
    /// is not `(B, T)`, and [`Error::InvalidConfig`] when a row of a sliding
    /// cache would hold padding between real tokens, as
    /// [`KvCache::attend_padded`] says (a cache that keeps every position moves
    /// the row's padding first instead, and gives its numbers alone).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, Init, MultiHeadConfig, PositionEncoding, Rope};
    /// use ndarray::{array, Array3};
    ///
    /// let llama = MultiHeadConfig::new(16, 4).with_kv_heads(2)
    ///     .with_causality(Causality::Causal)
    ///     .with_positions(PositionEncoding::Rope(Rope::new(500_000.0)))
    ///     .random::<f32>(Init::XavierUniform, 0)?;
    /// let mut cache = llama.new_cache(2);
    /// let prompt = Array3::<f32>::ones((2, 3, 16));
    /// llama.forward_cached_padded(&prompt, &array![[true, true, true], [false, true, true]], &mut cache)?;
    /// llama.forward_cached_padded(&Array3::ones((2, 1, 16)), &array![[true], [true]], &mut cache)?;
    /// assert_eq!(cache.positions(), &[4, 3]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_cached_padded(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        cache: &mut KvCache<A>,
    ) -> Result<Array3<A>> {
        Ok(self.cached(x, real, cache, false)?.output)
    }

    /// [`forward_cached_padded`](Self::forward_cached_padded), also returning the
    /// step's attention weights over the keys it saw (the cached positions, oldest
    /// first, then the new ones; see [`KvCache::attend_padded`]).
    ///
    /// # Shapes
    ///
    /// Output `(B, T, d_model)`, head weights `(B, n_heads, T, S)`, mean weights `(B, T, S)`.
    ///
    /// # Errors
    ///
    /// As [`forward_cached_padded`](Self::forward_cached_padded).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, MultiHeadConfig};
    /// use ndarray::{array, Array3};
    ///
    /// let gpt2 = MultiHeadConfig::new(8, 2).random::<f64>(Init::XavierUniform, 0)?;
    /// let mut cache = gpt2.new_cache(1);
    /// gpt2.forward_cached_padded(&Array3::ones((1, 4, 8)), &array![[true; 4]], &mut cache)?;
    /// let step = gpt2.forward_cached_padded_with_weights(&Array3::ones((1, 1, 8)), &array![[true]], &mut cache)?;
    /// assert_eq!(step.head_weights.dim(), (1, 2, 1, 5));
    /// assert!((step.mean_weights.sum() - 1.0).abs() < 1e-12);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_cached_padded_with_weights(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        cache: &mut KvCache<A>,
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        self.cached(x, real, cache, true)
    }

    /// One cached step, with or without the weights.
    fn cached(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        cache: &mut KvCache<A>,
        weights: bool,
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        let config = &self.config;
        let d = config.d_model();
        config.check_cacheable()?;
        cache.usable()?;
        let (b, t, _) = x.dim();
        let (cache_b, cache_kv, _, cache_hd) = cache.keys().dim();
        if (cache_kv, cache_hd) != (config.n_kv_heads(), config.head_dim()) {
            return Err(Error::Shape {
                what: "the cache must hold (B, n_kv_heads, ·, head_dim) of this layer: make it with the layer's new_cache",
                expected: vec![cache_b, config.n_kv_heads(), cache.len(), config.head_dim()],
                found: cache.keys().shape().to_vec(),
            });
        }
        if b != cache_b {
            return Err(Error::Shape {
                what: "x must be (B, T, d_model), B the cache's batch",
                expected: vec![cache_b, t, d],
                found: x.shape().to_vec(),
            });
        }
        if real.dim() != (b, t) {
            return Err(Error::Shape {
                what: "real (which new tokens are not padding) must be (B, T) of x",
                expected: vec![b, t],
                found: real.shape().to_vec(),
            });
        }
        // each row continues from its own count of real tokens
        let mut positions = positions_of(real);
        for (mut row, &start) in positions.rows_mut().into_iter().zip(cache.positions()) {
            row += start;
        }
        let heads = self.project_at(x, x, x, &positions, &positions)?;
        let slopes = self.slopes();
        // the cache is causal itself; the layer's scale and window apply, whatever
        // the cache's own (a ring narrower than the window keeps it narrower)
        let settings = Settings {
            scale: Some(A::from_f64(config.scale())),
            window: config.causality().window(),
            run: LayerStep {
                softcap: config.softcap().map(A::from_f64),
                sinks: self.sinks.as_deref(),
            },
        };
        let alibi: Vec<Mask<'_, A>> = alibi(&slopes).into_iter().collect();
        let (output, head_weights) = cache.step(
            settings, &heads.q, &heads.k, &heads.v, real, &alibi, weights,
        )?;
        self.finish(output, head_weights)
    }
}
