//! Programmable attention: score modifications and keep predicates written in
//! Rust, run inside the fused kernels, forward and backward — FlexAttention's
//! `score_mod`, `mask_mod` and `BlockMask`, with gradients, on a CPU.
//!
//! - A [`ScoreMod`] changes each scaled score `s = q·k·scale` at its position
//!   [`At`] before the softmax, and gives its derivative (and the gradients of
//!   its parameters) for the backward; [`score_mod`] makes one from closures.
//! - A [`KeepMod`] (any `Fn(At) -> bool`) says which keys each query may see; a
//!   [`BlockMask`] classifies it once per block of 16 queries × 64 keys, so the
//!   kernels skip empty blocks and call it only in partial ones.
//! - Sinks: one logit per query head in the softmax's denominator, without a
//!   value (gpt-oss).
//!
//! [`ScaledDotProduct::with_score_mod`](crate::ScaledDotProduct::with_score_mod),
//! [`with_block_mask`](crate::ScaledDotProduct::with_block_mask) and
//! [`with_sinks`](crate::ScaledDotProduct::with_sinks) make a
//! [`FlexAttention`], which keeps every option of the attention it came from
//! (masks, scale, kernel, threads). The kernels are compiled for the program's
//! types: a keep-all predicate costs nothing, causality written as a predicate
//! runs at the built-in mask's speed, and a sparse mask costs what it keeps.
//!
//! Built in: [`SoftCap`], [`RelativeBias`] (score modifications with learnable
//! parameters), [`Documents`], [`PrefixLm`], [`TreeMask`] (predicates).
//!
//! # Examples
//!
//! A score function of your own, with its derivative, under prefix-LM:
//!
//! ```
//! use attn::flex::{At, BlockMask, PrefixLm, score_mod};
//! use attn::ScaledDotProduct;
//! use ndarray::Array2;
//!
//! let x = Array2::from_shape_fn((6, 4), |(i, j)| (i + j) as f64 * 0.1);
//! let halve_far = score_mod(
//!     |s: f64, at: At| if at.query.abs_diff(at.key) > 2 { s / 2.0 } else { s },
//!     |_, at: At| if at.query.abs_diff(at.key) > 2 { 0.5 } else { 1.0 },
//! );
//! let blocks = BlockMask::new(PrefixLm::new(2), [1, 1, 6, 6])?;
//! let attention = ScaledDotProduct::new().with_score_mod(halve_far).with_block_mask(&blocks);
//! let weights = attention.weights(&x, &x)?;
//! assert_eq!(weights[[0, 2]], 0.0); // past the prefix, causal
//! assert!(weights[[0, 1]] > 0.0); // inside the prefix, both ways
//! let grads = attention.backward(&x, &x, &x, &Array2::ones((6, 4)))?;
//! assert_eq!(grads.q.dim(), (6, 4));
//! # Ok::<(), attn::Error>(())
//! ```

pub(crate) mod blocks;
pub(crate) mod function;
mod masks;
pub(crate) mod program;
mod score;

pub use crate::sdpa::flex::{FlexAttention, FlexGradients};
pub use blocks::{BLOCK_KEYS, BLOCK_QUERIES, BlockClass, BlockMask};
pub use function::{At, Identity, KeepAll, KeepMod, ScoreFn, ScoreMod, score_mod};
pub use masks::{Documents, PrefixLm, TreeMask};
pub use score::{RelativeBias, SoftCap};
