//! Attention on [`ndarray`]: scaled dot-product `softmax(QKᵀ/√d_k)·V`, with masks,
//! batches, heads and grouped-query attention, exact against PyTorch.
//!
//! # Which type for which task
//!
//! | task | types |
//! |---|---|
//! | attention on Q, K, V you have | [`scaled_dot_product`], [`ScaledDotProduct`] ([`Mask`], [`AttentionOutput`], [`AttentionTrace`]) |
//! | one head with its own `W_Q`, `W_K`, `W_V` | [`QkvProjection`] |
//! | a multi-head layer, a model's attention block | [`MultiHeadConfig`] → [`MultiHeadAttention`] ([`Causality`], [`PositionEncoding`], [`Rope`], [`RelativeBuckets`]) |
//! | weights from a checkpoint (feature `load`) | `HfModel`, `MultiHeadConfig::load` with a `Layout`, `SafeTensors` |
//! | your own score function or mask, sinks (soft-capping, documents, trees) | [`flex`]: [`ScaledDotProduct::with_score_mod`], [`with_block_mask`](ScaledDotProduct::with_block_mask), [`with_sinks`](ScaledDotProduct::with_sinks) |
//! | generation, a token at a time | [`KvCache`], [`MultiHeadAttention::new_cache`] |
//! | prompts of different lengths in one call, no padding | [`MultiHeadAttention::forward_packed`] |
//! | training | `backward` on each of the above ([`AttentionGradients`], [`MultiHeadGradients`]), [`Linear`] |
//! | half precision | `half::bf16`, `half::f16` ([`Storage`]) through [`ScaledDotProduct`] and [`KvCache`] |
//! | pictures (feature `plot`) | `plot::Heatmap`, `plot::Figure` |
//! | PyTorch/NumPy-identical random weights | [`rng`], [`Init`] |
//!
//! # Quick start
//!
//! ```
//! use attn::scaled_dot_product;
//! use ndarray::array;
//!
//! // three tokens, d_k = 2
//! let x = array![[1.0_f64, 0.0], [0.0, 1.0], [1.0, 1.0]];
//! let out = scaled_dot_product(&x, &x, &x)?; // self-attention without projections
//! assert_eq!(out.dim(), (3, 2));
//! # Ok::<(), attn::Error>(())
//! ```
//!
//! Options — a scale, masks, the weights, a step-by-step trace, batched and
//! grouped-query inputs — live on [`ScaledDotProduct`]:
//!
//! ```
//! use attn::{Mask, ScaledDotProduct};
//! use ndarray::Array2;
//!
//! let q = Array2::<f32>::ones((4, 8));
//! let out = ScaledDotProduct::new()
//!     .with_mask(Mask::CausalTopLeft)
//!     .forward_with_weights(&q, &q, &q)?;
//! assert_eq!(out.weights[[0, 1]], 0.0); // the first token sees only itself
//! # Ok::<(), attn::Error>(())
//! ```
//!
//! Training takes gradients: [`ScaledDotProduct::backward`] (and, from a forward
//! that kept each row's log-sum-exp, [`ScaledDotProduct::backward_with_lse`]), and
//! the layers' own: [`Linear::backward`], [`QkvProjection::self_attention_backward`],
//! [`MultiHeadAttention::backward`].
//!
//! ```
//! use attn::ScaledDotProduct;
//! use ndarray::Array2;
//!
//! let x = Array2::from_shape_fn((4, 8), |(i, j)| ((i + j) % 3) as f64);
//! let attn = ScaledDotProduct::new();
//! let forward = attn.forward_with_lse(&x, &x, &x)?;
//! let d_out = &forward.output * 2.0; // loss = sum(output²)
//! let grads = attn.backward_with_lse(&x, &x, &x, &forward, &d_out)?;
//! assert_eq!(grads.k.dim(), (4, 8));
//! # Ok::<(), attn::Error>(())
//! ```
//!
//! Real models: [`MultiHeadAttention`] takes the settings of Llama, Mistral,
//! Qwen2, GPT-2, GPT-NeoX, Bloom, BERT, ViT, BART and T5 on its
//! [`MultiHeadConfig`] (grouped-query heads, head width, biases per projection,
//! scale, [`Causality`], [`PositionEncoding`]: [`Rope`] or ALiBi), decodes a
//! padded batch with a [`KvCache`], and loads its weights from a checkpoint with
//! `HfModel` or `MultiHeadConfig::load` (feature `load`, on by default).
//!
//! Half precision: `half::bf16` and `half::f16` inputs (any [`Storage`] type)
//! go through [`scaled_dot_product`], [`ScaledDotProduct`]'s forward and
//! backward calls and [`KvCache`], computed in f32 and rounded once.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

// the README loads a checkpoint: its examples need the `load` feature
#[cfg(all(doctest, feature = "load"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// Layers, from the bottom: `element`/`error` ← `core` (checked problem, masks,
// softmax, reference path) ← `kernel` (fused paths) ← `sdpa` (the public
// scaled dot-product API) ← `decode` ← `layers` ← `load` (weights files).
// Imports run down only.
mod core;
mod decode;
mod element;
mod error;
pub mod flex;
mod kept;
mod kernel;
mod layers;
#[cfg(feature = "load")]
mod load;
#[cfg(feature = "plot")]
pub mod plot;
#[cfg(feature = "mpi")]
pub mod ring;
pub mod rng;
mod sdpa;

/// The `ndarray` this crate is built on (0.17): arrays from `attn::ndarray` are
/// always the types attn's functions take, whatever else a program depends on.
pub use ndarray;

/// The `half` crate whose `bf16` and `f16` attention takes (see [`Storage`]).
pub use half;

pub use crate::core::mask::Mask;
pub use crate::core::problem::AttentionDim;
pub use crate::core::softmax::{softmax_rows, softmax_rows_in_place};
pub use decode::cache::KvCache;
pub use decode::paged::{CacheElement, PagedKvCache, SequenceId};
pub use decode::position::{RelativeBuckets, alibi_slopes, key_padding};
pub use decode::rope::{Rope, RopeLayout, RopeScaling, rope};
pub use element::{Element, Storage};
pub use error::{Error, Result};
pub use kernel::{Kernel, Parallelism};
#[doc(hidden)]
pub use kernel::{KernelArch, KernelPaths, kernel_paths};
pub use layers::init::Init;
pub use layers::linear::{Linear, LinearGradients};
pub use layers::multi_head::{
    Causality, MultiHeadAttention, MultiHeadConfig, MultiHeadGradients, MultiHeadOutput,
    MultiHeadWeights, PositionEncoding, Projection, QkvHeads,
};
pub use layers::parameter_free;
pub use layers::projection::{ProjectionShape, QkvGradients, QkvProjection};
#[cfg(feature = "load")]
pub use load::{StateDict, hf::HfModel, layout::Layout, safetensors::SafeTensors};
pub use sdpa::{
    AttentionGradients, AttentionLse, AttentionOutput, AttentionTrace, ScaledDotProduct,
    attention_weights, merge_attention, scaled_dot_product,
};

/// `f` on a pool of `threads` threads, for the unit tests that compare the bits
/// of one thread and several.
#[cfg(test)]
pub(crate) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a pool of threads")
        .install(f)
}
