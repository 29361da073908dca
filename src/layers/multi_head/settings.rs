//! A layer's settings besides its sizes: which keys a query sees
//! ([`Causality`]), how positions are told apart ([`PositionEncoding`]), and
//! how a reader says them (`Display`; rotary embeddings say theirs in
//! `decode/rope`).

use std::fmt;

use crate::decode::rope::Rope;

/// Which keys each query of a layer may see, whatever the call's masks add.
///
/// # Examples
///
/// ```
/// use attn::{Causality, MultiHeadConfig};
///
/// let mistral = MultiHeadConfig::new(32, 4).with_causality(Causality::SlidingWindow(4096));
/// assert_eq!(mistral.causality(), Causality::SlidingWindow(4096));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Every query sees every key (encoders: BERT, ViT, T5's encoder; cross-attention).
    None,
    /// Query `i` sees keys up to its own position, aligned bottom-right
    /// ([`Mask::CausalBottomRight`](crate::Mask::CausalBottomRight)): decoders.
    Causal,
    /// Causal within a window: each query sees itself and the `size − 1` positions
    /// before it ([`Mask::SlidingWindow`](crate::Mask::SlidingWindow)): Mistral.
    SlidingWindow(usize),
}

impl Causality {
    /// The window of [`SlidingWindow`](Self::SlidingWindow), `None` otherwise.
    pub(crate) fn window(self) -> Option<usize> {
        match self {
            Causality::SlidingWindow(size) => Some(size),
            Causality::None | Causality::Causal => None,
        }
    }
}

/// How a layer tells tokens apart by position, inside the attention.
///
/// Absolute position embeddings added before the layer (GPT-2, BERT, ViT) need
/// nothing here; T5's learned relative bias is a per-call
/// [`Mask::Bias`](crate::Mask::Bias) built by [`RelativeBuckets`](crate::RelativeBuckets).
///
/// # Examples
///
/// ```
/// use attn::{MultiHeadConfig, PositionEncoding, Rope};
///
/// let llama = MultiHeadConfig::new(64, 8).with_positions(PositionEncoding::Rope(Rope::new(500_000.0)));
/// assert!(matches!(llama.positions(), PositionEncoding::Rope(_)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PositionEncoding {
    /// Nothing inside the layer.
    None,
    /// Rotary embeddings on the projected queries and keys, at each token's position.
    Rope(Rope),
    /// ALiBi with the standard slopes of `n_heads` heads
    /// ([`alibi_slopes`](crate::alibi_slopes)): Bloom, MPT.
    Alibi,
}

/// # Examples
///
/// ```
/// use attn::Causality;
///
/// assert_eq!(Causality::None.to_string(), "not causal");
/// assert_eq!(Causality::SlidingWindow(4096).to_string(), "causal within a sliding window of 4096 positions");
/// ```
impl fmt::Display for Causality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Causality::None => write!(f, "not causal"),
            Causality::Causal => write!(f, "causal"),
            Causality::SlidingWindow(size) => {
                write!(f, "causal within a sliding window of {size} positions")
            }
        }
    }
}

/// # Examples
///
/// ```
/// use attn::{PositionEncoding, Rope};
///
/// assert_eq!(PositionEncoding::Alibi.to_string(), "ALiBi biases");
/// assert_eq!(
///     PositionEncoding::Rope(Rope::new(10_000.0)).to_string(),
///     "rotary positions (θ = 10000, half-split pairs)"
/// );
/// ```
impl fmt::Display for PositionEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PositionEncoding::None => write!(f, "no position encoding"),
            PositionEncoding::Rope(rope) => write!(f, "rotary positions ({rope})"),
            PositionEncoding::Alibi => write!(f, "ALiBi biases"),
        }
    }
}
