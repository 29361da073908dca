//! A layer's settings as a reader says them: `Display` for [`Causality`] and
//! [`PositionEncoding`] (and, in `decode/rope.rs`, for its rotary embeddings).

use std::fmt;

use super::config::{Causality, PositionEncoding};

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
