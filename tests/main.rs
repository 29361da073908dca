//! Every integration test in one binary (linking one test binary per file was
//! most of a cold `cargo test`): each file of this folder is a module, named as
//! the file; `cargo test kernel::` runs one of them. `common` holds the shared
//! helpers.

mod common;

mod backward;
mod decode;
#[cfg(feature = "plot")]
mod demos;
mod flex;
mod flex_grad;
mod flex_layers;
mod golden_sdpa;
mod grad;
mod half;
mod half_grad;
#[cfg(feature = "load")]
mod hf_models;
#[cfg(feature = "load")]
mod hostile;
mod kernel;
mod layers;
mod linear;
mod paged;
mod properties;
mod rng;
mod sdpa;
mod shards;
mod views;
