//! Programmable attention: score modifications and keep predicates written in
//! Rust, run inside the fused kernels, forward and backward.

mod blocks;
mod function;
mod masks;
pub(crate) mod program;
mod score;

pub use crate::sdpa::flex::{FlexAttention, FlexGradients};
pub use blocks::{BLOCK_KEYS, BLOCK_QUERIES, BlockClass, BlockMask};
pub use function::{At, Identity, KeepAll, KeepMod, ScoreFn, ScoreMod, score_mod};
pub use masks::{Documents, PrefixLm, TreeMask};
pub use score::{RelativeBias, SoftCap};
