//! Hugging Face checkpoints: `config.json` mapped to attention settings.

mod fields;
mod rope;

use std::path::Path;

use serde_json::Value;

use super::StateDict;
use super::block::{is_under, nearest};
use super::families::{Biases, Causal, Heads, Positions, Scale, Window};
use super::layout::Layout;
use super::safetensors::SafeTensors;
use crate::decode::position::RelativeBuckets;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layers::multi_head::{Causality, MultiHeadAttention, MultiHeadConfig, PositionEncoding};
use rope::rope;

/// A Hugging Face checkpoint as `save_pretrained` writes it: `config.json` and
/// `model.safetensors`. Gives each attention block's [`MultiHeadConfig`]
/// (sizes, grouped-query heads, head width, biases, scale, causal or sliding
/// window — per layer where `layer_types` says so —, RoPE with its scaling,
/// ALiBi, a soft-cap, sinks), its [`Layout`], and the layer loaded from the
/// file.
///
/// Model types: llama, mistral, qwen2, gemma2, gpt_oss, gpt2, gpt_neox, bloom,
/// bert, roberta, vit, bart, t5. Whether a block is causal follows the model type and, for
/// encoder–decoder models, the module's name (`decoder` self-attention is
/// causal; cross-attention, `encoder_attn` / `EncDecAttention`, is not). For
/// anything else, build a [`MultiHeadConfig`] by hand and call
/// [`MultiHeadConfig::load`] with a [`Layout`].
///
/// # Examples
///
/// ```no_run
/// use attn::HfModel;
///
/// let model = HfModel::open("tiny-llama")?; // a folder from save_pretrained
/// let layer = model.attention::<f32>("model.layers.0.self_attn")?;
/// println!("{} heads of {}", layer.config().n_heads(), layer.config().head_dim());
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug)]
pub struct HfModel {
    config: Value,
    /// Where `config.json` was read from, for its errors.
    config_path: String,
    model_type: String,
    tensors: SafeTensors,
}

impl HfModel {
    /// Reads `dir/config.json` and `dir/model.safetensors`.
    ///
    /// # Errors
    ///
    /// [`Error::File`] when either cannot be read or parsed, or `config.json` has
    /// no `model_type`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::HfModel::open("no/such/folder").is_err());
    /// ```
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let config_path = path.display().to_string();
        let json = std::fs::read_to_string(&path).map_err(|e| Error::File {
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
        // config.json first: its errors are about it, whatever the weights hold
        let (config, model_type) = parse_config(&json, &config_path)?;
        Ok(HfModel {
            config,
            config_path,
            model_type,
            tensors: SafeTensors::open(dir.join("model.safetensors"))?,
        })
    }

    /// A checkpoint from the text of its `config.json` and its weights.
    ///
    /// # Errors
    ///
    /// [`Error::File`] when the text is not JSON or has no `model_type`.
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// let weights = attn::SafeTensors::from_bytes(bytes)?; // an empty file
    /// let model = attn::HfModel::from_parts(r#"{"model_type": "gpt2", "n_embd": 8, "n_head": 2}"#, weights)?;
    /// assert_eq!(model.config("transformer.h.0.attn")?.d_model(), 8);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn from_parts(config_json: &str, tensors: SafeTensors) -> Result<Self> {
        let config_path = "config.json".to_string();
        let (config, model_type) = parse_config(config_json, &config_path)?;
        Ok(HfModel {
            config,
            config_path,
            model_type,
            tensors,
        })
    }

    /// The state-dict prefixes of the file's attention blocks, in the order of
    /// their layers (`model.layers.2` before `model.layers.10`): each one a
    /// module to pass to [`attention`](Self::attention).
    ///
    /// # Errors
    ///
    /// The errors of [`layout`](Self::layout).
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{"transformer.h.0.attn.c_attn.weight":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},
    /// #   "transformer.h.10.attn.c_attn.weight":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},
    /// #   "transformer.h.2.attn.c_attn.weight":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// let weights = attn::SafeTensors::from_bytes(bytes)?;
    /// let model = attn::HfModel::from_parts(r#"{"model_type": "gpt2", "n_embd": 8, "n_head": 2}"#, weights)?;
    /// assert_eq!(
    ///     model.attention_modules()?,
    ///     ["transformer.h.0.attn", "transformer.h.2.attn", "transformer.h.10.attn"]
    /// );
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attention_modules(&self) -> Result<Vec<String>> {
        let marker = format!(".{}", self.layout()?.marker());
        let mut modules: Vec<String> = StateDict::<f32>::names(&self.tensors)
            .iter()
            .filter_map(|name| name.strip_suffix(&marker).map(str::to_string))
            .collect();
        // numbers in the path compare as numbers
        modules.sort_by_cached_key(|m| {
            m.split('.')
                .map(|part| match part.parse::<u64>() {
                    Ok(n) => (n, String::new()),
                    Err(_) => (u64::MAX, part.to_string()),
                })
                .collect::<Vec<_>>()
        });
        Ok(modules)
    }

    /// The `model_type` of `config.json`.
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # let weights = attn::SafeTensors::from_bytes(bytes)?;
    /// let model = attn::HfModel::from_parts(r#"{"model_type": "bert"}"#, weights)?;
    /// assert_eq!(model.model_type(), "bert");
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// The weights file.
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # let weights = attn::SafeTensors::from_bytes(bytes)?;
    /// let model = attn::HfModel::from_parts(r#"{"model_type": "bert"}"#, weights)?;
    /// assert!(attn::StateDict::<f32>::names(model.tensors()).is_empty());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn tensors(&self) -> &SafeTensors {
        &self.tensors
    }

    /// The attention block at `module` (its state-dict prefix, e.g.
    /// `model.layers.0.self_attn`; [`attention_modules`](Self::attention_modules)
    /// lists them), loaded from the file. Layers compute in `f32` or `f64`: a
    /// bf16 or f16 checkpoint loads exactly as `f32`; attention over half
    /// precision is [`scaled_dot_product`](crate::scaled_dot_product) or a
    /// `KvCache<bf16>` on the projected heads ([`project`](MultiHeadAttention::project)).
    ///
    /// # Errors
    ///
    /// The errors of [`config`](Self::config), [`layout`](Self::layout) and
    /// [`MultiHeadConfig::load`].
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # let weights = attn::SafeTensors::from_bytes(bytes)?;
    /// let model = attn::HfModel::from_parts(r#"{"model_type": "gpt2", "n_embd": 8, "n_head": 2}"#, weights)?;
    /// let err = model.attention::<f32>("transformer.h.0.attn").unwrap_err();
    /// assert!(err.to_string().contains("nothing under this prefix"));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attention<A: Element>(&self, module: &str) -> Result<MultiHeadAttention<A>> {
        let config = self.config(module)?;
        let names = StateDict::<f32>::names(&self.tensors);
        if !names.iter().any(|name| is_under(name, module)) {
            let modules = self.attention_modules()?;
            return Err(Error::Tensor {
                name: module.to_string(),
                reason: format!(
                    "the weights have nothing under this prefix; {} (HfModel::attention_modules lists them all)",
                    nearest(
                        modules.iter().map(String::as_str),
                        module,
                        "attention blocks"
                    )
                ),
            });
        }
        config.load(&self.tensors, module, &self.layout()?)
    }

    /// Where the model keeps its attention weights.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a model type attn does not map.
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # let weights = attn::SafeTensors::from_bytes(bytes)?;
    /// let model = attn::HfModel::from_parts(r#"{"model_type": "bloom"}"#, weights)?;
    /// assert_eq!(model.layout()?, attn::Layout::bloom());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn layout(&self) -> Result<Layout> {
        Ok((self.family()?.layout)())
    }

    /// The configuration of the attention block at `module`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a model type attn does not map, a missing
    /// or non-numeric size, a RoPE type other than default, linear, llama3 or yarn.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, Projection};
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # let weights = attn::SafeTensors::from_bytes(bytes)?;
    ///
    /// let json = r#"{"model_type": "qwen2", "hidden_size": 48, "num_attention_heads": 6,
    ///                "num_key_value_heads": 2, "rope_theta": 1000000.0}"#;
    /// let config = attn::HfModel::from_parts(json, weights)?.config("model.layers.0.self_attn")?;
    /// assert_eq!((config.n_kv_heads(), config.causality()), (2, Causality::Causal));
    /// assert!(config.has_bias_on(Projection::Key) && !config.has_bias_on(Projection::Output));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn config(&self, module: &str) -> Result<MultiHeadConfig> {
        let family = self.family()?;
        let decoder_self = module.contains("decoder")
            && !module.contains("encoder_attn")
            && !module.contains("EncDecAttention");
        let heads_key = match family.heads {
            Heads::EncoderDecoder if decoder_self || module.contains("encoder_attn") => {
                "decoder_attention_heads"
            }
            Heads::EncoderDecoder => "encoder_attention_heads",
            Heads::Shared => "num_attention_heads",
        };
        let d_model = self.size(&["hidden_size", "n_embd", "d_model"])?;
        let n_heads = self.size(&[heads_key, "n_head", "num_heads"])?;
        let mut config = MultiHeadConfig::new(d_model, n_heads);
        if let Some(kv) = self.optional_size("num_key_value_heads")? {
            config = config.with_kv_heads(kv);
        }
        if let Some(head_dim) = self
            .optional_size("head_dim")?
            .or(self.optional_size("d_kv")?)
        {
            config = config.with_head_dim(head_dim);
        }
        config = match family.biases {
            Biases::All => config,
            Biases::None => config.without_bias(),
            Biases::Only(on) => config.with_bias_on(on),
            Biases::Flag {
                key,
                default,
                otherwise,
            } => {
                if self.flag(key, default)? {
                    config
                } else {
                    config.with_bias_on(otherwise)
                }
            }
        };
        match family.scale {
            Scale::Head => {}
            Scale::Fixed(scale) => config = config.with_scale(scale),
            Scale::QueryPreAttnScalar => {
                let scalar = self.positive_number("query_pre_attn_scalar")?;
                config = config.with_scale(scalar.powf(-0.5));
            }
        }
        if family.softcap
            && let Some(cap) = self.optional_number("attn_logit_softcapping")?
        {
            config = config.with_softcap(cap);
        }
        if family.sinks {
            config = config.with_sinks();
        }
        if self.flag("use_bidirectional_attention", false)? {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "{}: use_bidirectional_attention is not mapped (a causal {} block is)",
                    self.config_path, self.model_type
                ),
            });
        }
        let causal = match family.causal {
            Causal::Always => true,
            Causal::Never => false,
            Causal::DecoderSelf => decoder_self,
        };
        let window = match family.window {
            Window::Always => self.optional_size("sliding_window")?,
            Window::WhenFlagged if self.flag("use_sliding_window", false)? => {
                self.optional_size("sliding_window")?
            }
            Window::PerLayer => self.layer_window(module)?,
            Window::WhenFlagged | Window::None => None,
        };
        config = config.with_causality(match (causal, window) {
            (false, _) => Causality::None,
            (true, None) => Causality::Causal,
            (true, Some(w)) => Causality::SlidingWindow(w),
        });
        Ok(match family.positions {
            Positions::Rope => config.with_positions(PositionEncoding::Rope(rope(
                &self.config,
                &self.config_path,
                config.head_dim(),
            )?)),
            Positions::Alibi => config.with_positions(PositionEncoding::Alibi),
            Positions::None => config,
        })
    }

    /// T5's relative position buckets for the self-attention block at `module`
    /// (bidirectional in the encoder), `None` for other models and for
    /// cross-attention. The table is `{module}.relative_attention_bias.weight`
    /// in the first block of each stack; later blocks reuse the first's bias.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `relative_attention_num_buckets` or
    /// `relative_attention_max_distance` is not a non-negative integer, or the
    /// two do not make buckets ([`RelativeBuckets::check`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # let weights = attn::SafeTensors::from_bytes(bytes)?;
    /// let json = r#"{"model_type": "t5", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}"#;
    /// let model = attn::HfModel::from_parts(json, weights)?;
    /// let buckets = model.relative_buckets("encoder.block.0.layer.0.SelfAttention")?.expect("t5");
    /// assert!(buckets.bidirectional);
    /// assert!(model.relative_buckets("decoder.block.0.layer.1.EncDecAttention")?.is_none());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn relative_buckets(&self, module: &str) -> Result<Option<RelativeBuckets>> {
        if !self.family()?.relative_buckets || module.contains("EncDecAttention") {
            return Ok(None);
        }
        let buckets = RelativeBuckets {
            num_buckets: self
                .optional_size("relative_attention_num_buckets")?
                .unwrap_or(32),
            max_distance: self
                .optional_size("relative_attention_max_distance")?
                .unwrap_or(128),
            bidirectional: !module.contains("decoder"),
        };
        buckets.check().map_err(|e| Error::InvalidConfig {
            reason: format!("{}: {e}", self.config_path),
        })?;
        Ok(Some(buckets))
    }
}

/// `config.json`'s value and its `model_type`.
fn parse_config(json: &str, path: &str) -> Result<(Value, String)> {
    let file_error = |reason: String| Error::File {
        path: path.to_string(),
        reason,
    };
    let config: Value =
        serde_json::from_str(json).map_err(|e| file_error(format!("not JSON: {e}")))?;
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| file_error("no \"model_type\" string".to_string()))?
        .to_string();
    Ok((config, model_type))
}
