//! The model families whose `config.json` maps onto attn's attention: one record
//! each. A new family is one more record here (and its golden test).

use super::layout::Layout;
use crate::layers::multi_head::Projection::{self, Key, Output, Query, Value};

/// How one family's attention blocks are built from its `config.json`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Family {
    /// The `model_type`s of `config.json` it covers.
    pub(crate) model_types: &'static [&'static str],
    /// Where its blocks keep their weights.
    pub(crate) layout: fn() -> Layout,
    /// Which projections have biases.
    pub(crate) biases: Biases,
    /// Where its number of heads is written.
    pub(crate) heads: Heads,
    /// Which blocks are causal.
    pub(crate) causal: Causal,
    /// Where a sliding window is given, if the family has one.
    pub(crate) window: Window,
    /// How positions enter the scores.
    pub(crate) positions: Positions,
    /// The factor on the scores.
    pub(crate) scale: Scale,
    /// Whether its self-attention takes T5's learned relative buckets.
    pub(crate) relative_buckets: bool,
    /// Scores soft-capped at `attn_logit_softcapping` (Gemma 2).
    pub(crate) softcap: bool,
    /// A sink logit per head, `{module}.sinks` (gpt-oss).
    pub(crate) sinks: bool,
    /// What transformers' config class gives the keys a `config.json` leaves
    /// out (absent, not null), where attn reads them.
    pub(crate) defaults: &'static [(&'static str, Default)],
}

/// A config class's default for a key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Default {
    Size(u64),
    Number(f64),
}

/// The factor on the scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scale {
    /// `1/√head_dim`.
    Head,
    /// A fixed factor (T5: 1, unscaled).
    Fixed(f64),
    /// `query_pre_attn_scalar^(−1/2)` (Gemma 2).
    QueryPreAttnScalar,
}

/// Which projections have a bias.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Biases {
    /// Every projection.
    All,
    /// None.
    None,
    /// These only.
    Only(&'static [Projection]),
    /// Every projection when the flag `key` (absent: `default`) is true, else
    /// `otherwise`.
    Flag {
        key: &'static str,
        default: bool,
        otherwise: &'static [Projection],
    },
}

/// Where the number of query heads is written.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Heads {
    /// `num_attention_heads` (or `n_head`, `num_heads`).
    Shared,
    /// `decoder_attention_heads` for the decoder's blocks (self- and
    /// cross-attention), `encoder_attention_heads` for the encoder's (BART).
    EncoderDecoder,
}

/// Which blocks are causal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Causal {
    /// Every block (decoder-only models).
    Always,
    /// None (encoders).
    Never,
    /// The decoder's self-attention (encoder–decoder models).
    DecoderSelf,
}

/// Where a sliding window is given.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Window {
    /// The family has none.
    None,
    /// `sliding_window`, when present and not null.
    Always,
    /// `sliding_window`, when the flag `use_sliding_window` is true.
    WhenFlagged,
    /// `sliding_window` where `layer_types[layer]` is `"sliding_attention"`
    /// (Gemma 2, gpt-oss).
    PerLayer,
}

/// How positions enter the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Positions {
    /// Not in the attention block (learned embeddings, or a relative bias).
    None,
    /// Rotary embeddings on queries and keys.
    Rope,
    /// ALiBi slopes.
    Alibi,
}

/// A decoder-only family with rotary positions: Llama's shape.
const fn rotary(model_types: &'static [&'static str], biases: Biases, window: Window) -> Family {
    Family {
        model_types,
        layout: Layout::llama,
        biases,
        heads: Heads::Shared,
        causal: Causal::Always,
        window,
        positions: Positions::Rope,
        scale: Scale::Head,
        relative_buckets: false,
        softcap: false,
        sinks: false,
        defaults: &[],
    }
}

/// An encoder family: bidirectional, positions outside the block.
const fn encoder(
    model_types: &'static [&'static str],
    layout: fn() -> Layout,
    biases: Biases,
) -> Family {
    Family {
        model_types,
        layout,
        biases,
        heads: Heads::Shared,
        causal: Causal::Never,
        window: Window::None,
        positions: Positions::None,
        scale: Scale::Head,
        relative_buckets: false,
        softcap: false,
        sinks: false,
        defaults: &[],
    }
}

/// Every family attn maps, checked against `save_pretrained` checkpoints in
/// `tests/golden/hf/`.
pub(crate) const FAMILIES: [Family; 12] = [
    rotary(
        &["llama"],
        Biases::Flag {
            key: "attention_bias",
            default: false,
            otherwise: &[],
        },
        Window::None,
    ),
    rotary(
        &["mistral"],
        Biases::Flag {
            key: "attention_bias",
            default: false,
            otherwise: &[],
        },
        Window::Always,
    ),
    rotary(
        &["qwen2"],
        Biases::Only(&[Query, Key, Value]),
        Window::WhenFlagged,
    ),
    // soft-capped scores, the scale from query_pre_attn_scalar, sliding and global layers
    Family {
        scale: Scale::QueryPreAttnScalar,
        softcap: true,
        defaults: &[
            ("query_pre_attn_scalar", Default::Number(256.0)),
            ("attn_logit_softcapping", Default::Number(50.0)),
            ("sliding_window", Default::Size(4096)),
        ],
        ..rotary(
            &["gemma2"],
            Biases::Flag {
                key: "attention_bias",
                default: false,
                otherwise: &[],
            },
            Window::PerLayer,
        )
    },
    // sinks, biases on every projection, sliding and global layers
    Family {
        sinks: true,
        defaults: &[("sliding_window", Default::Size(128))],
        ..rotary(
            &["gpt_oss"],
            Biases::Flag {
                key: "attention_bias",
                default: true,
                otherwise: &[],
            },
            Window::PerLayer,
        )
    },
    Family {
        model_types: &["gpt2"],
        layout: Layout::gpt2,
        positions: Positions::None,
        ..rotary(&[], Biases::All, Window::None)
    },
    Family {
        model_types: &["gpt_neox"],
        layout: Layout::bloom,
        ..rotary(
            &[],
            Biases::Flag {
                key: "attention_bias",
                default: true,
                otherwise: &[],
            },
            Window::None,
        )
    },
    Family {
        model_types: &["bloom"],
        layout: Layout::bloom,
        positions: Positions::Alibi,
        ..rotary(&[], Biases::All, Window::None)
    },
    encoder(&["bert", "roberta"], Layout::bert, Biases::All),
    encoder(
        &["vit"],
        Layout::vit,
        Biases::Flag {
            key: "qkv_bias",
            default: true,
            otherwise: &[Output],
        },
    ),
    Family {
        model_types: &["bart"],
        heads: Heads::EncoderDecoder,
        causal: Causal::DecoderSelf,
        ..encoder(&[], Layout::bart, Biases::All)
    },
    // unscaled scores, relative position buckets
    Family {
        model_types: &["t5"],
        causal: Causal::DecoderSelf,
        scale: Scale::Fixed(1.0),
        relative_buckets: true,
        ..encoder(&[], Layout::t5, Biases::None)
    },
];

/// The family of a `model_type`.
pub(crate) fn family(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&model_type))
}

/// Every mapped `model_type`, for messages.
pub(crate) fn known() -> String {
    let names: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().copied())
        .collect();
    names.join(", ")
}
