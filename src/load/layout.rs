//! How models store the weights of an attention block.

/// Where an attention block's weights are in a state dict, and in what layout.
/// Names are relative to the block's prefix (`model.layers.0.self_attn`).
///
/// | layout | models | tensors |
/// |---|---|---|
/// | [`Separate`](Self::Separate) | Llama, Mistral, Qwen2, BART, T5, BERT, ViT | `{q}.weight` `(out, in)`, `{q}.bias`, … for `q k v o` |
/// | [`TorchMultihead`](Self::TorchMultihead) | `nn.MultiheadAttention` | `in_proj_weight` rows `[q; k; v]`, `in_proj_bias`, `out_proj.weight`, `out_proj.bias` |
/// | [`Conv1d`](Self::Conv1d) | GPT-2 | `{qkv}.weight` `(in, out)` columns `[q \| k \| v]`, `{o}.weight` `(in, out)` |
/// | [`FusedPerHead`](Self::FusedPerHead) | Bloom, GPT-NeoX | `{qkv}.weight` rows per head `[h₀: q k v \| h₁: q k v \| …]`, `{o}.weight` `(out, in)` |
///
/// PyTorch's `Linear` stores `(out, in)` and computes `x·Wᵀ + b`; attn's layers
/// hold `(in, out)`: loading transposes. A fused tensor sliced the wrong way
/// gives plausible wrong numbers, which is why the layouts are named here and
/// checked against the configuration's shapes.
///
/// # Examples
///
/// ```
/// use attn::Layout;
///
/// assert_eq!(Layout::llama(), Layout::separate("q_proj", "k_proj", "v_proj", "o_proj"));
/// assert!(matches!(Layout::gpt2(), Layout::Conv1d { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One PyTorch `Linear` per projection, `(out, in)`, with optional biases.
    Separate {
        /// The query projection's module name.
        query: String,
        /// The key projection's module name.
        key: String,
        /// The value projection's module name.
        value: String,
        /// The output projection's module name.
        output: String,
    },
    /// `torch.nn.MultiheadAttention`'s state dict: `in_proj_weight` (rows `[q; k;
    /// v]`; `q_proj_weight`, `k_proj_weight`, `v_proj_weight` when `kdim` or `vdim`
    /// differs from `d_model`), `in_proj_bias`, `out_proj.weight`, `out_proj.bias`.
    TorchMultihead,
    /// GPT-2's `Conv1D`, already `(in, out)`: one fused weight with columns
    /// `[q | k | v]` and its bias, and the output projection.
    Conv1d {
        /// The fused projection's module name (`c_attn`).
        qkv: String,
        /// The output projection's module name (`c_proj`).
        output: String,
    },
    /// One fused `(out, in)` weight whose rows run head by head, each head's
    /// query, key and value rows together (Bloom's and GPT-NeoX's
    /// `query_key_value`), and the output projection.
    FusedPerHead {
        /// The fused projection's module name (`query_key_value`).
        qkv: String,
        /// The output projection's module name (`dense`).
        output: String,
    },
}

impl Layout {
    /// [`Layout::Separate`] with these module names.
    ///
    /// # Examples
    ///
    /// ```
    /// let t5 = attn::Layout::separate("q", "k", "v", "o");
    /// assert_eq!(t5, attn::Layout::t5());
    /// ```
    pub fn separate(query: &str, key: &str, value: &str, output: &str) -> Self {
        Layout::Separate {
            query: query.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            output: output.to_string(),
        }
    }

    /// Llama, Mistral, Qwen2 and most decoders since: `q_proj k_proj v_proj o_proj`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(matches!(attn::Layout::llama(), attn::Layout::Separate { .. }));
    /// ```
    pub fn llama() -> Self {
        Self::separate("q_proj", "k_proj", "v_proj", "o_proj")
    }

    /// BART (and Whisper, Marian): `q_proj k_proj v_proj out_proj`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_ne!(attn::Layout::bart(), attn::Layout::llama());
    /// ```
    pub fn bart() -> Self {
        Self::separate("q_proj", "k_proj", "v_proj", "out_proj")
    }

    /// BERT (and RoBERTa), from the `…attention` module: `self.query self.key
    /// self.value output.dense`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(matches!(attn::Layout::bert(), attn::Layout::Separate { .. }));
    /// ```
    pub fn bert() -> Self {
        Self::separate("self.query", "self.key", "self.value", "output.dense")
    }

    /// ViT, from the `…attention` module: `attention.query attention.key
    /// attention.value output.dense`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(matches!(attn::Layout::vit(), attn::Layout::Separate { .. }));
    /// ```
    pub fn vit() -> Self {
        Self::separate(
            "attention.query",
            "attention.key",
            "attention.value",
            "output.dense",
        )
    }

    /// T5: `q k v o`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(matches!(attn::Layout::t5(), attn::Layout::Separate { .. }));
    /// ```
    pub fn t5() -> Self {
        Self::separate("q", "k", "v", "o")
    }

    /// GPT-2: `c_attn`, `c_proj` ([`Layout::Conv1d`]).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(matches!(attn::Layout::gpt2(), attn::Layout::Conv1d { .. }));
    /// ```
    pub fn gpt2() -> Self {
        Layout::Conv1d {
            qkv: "c_attn".to_string(),
            output: "c_proj".to_string(),
        }
    }

    /// Bloom and GPT-NeoX: `query_key_value`, `dense` ([`Layout::FusedPerHead`]).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(matches!(attn::Layout::bloom(), attn::Layout::FusedPerHead { .. }));
    /// ```
    pub fn bloom() -> Self {
        Layout::FusedPerHead {
            qkv: "query_key_value".to_string(),
            output: "dense".to_string(),
        }
    }
}

impl Layout {
    /// The name, after the block's prefix, of the one weight every block in this
    /// layout has (how a file's attention blocks are found).
    pub(crate) fn marker(&self) -> String {
        match self {
            Layout::Separate { query, .. } => format!("{query}.weight"),
            Layout::TorchMultihead => "out_proj.weight".to_string(),
            Layout::Conv1d { qkv, .. } | Layout::FusedPerHead { qkv, .. } => {
                format!("{qkv}.weight")
            }
        }
    }
}
