//! Layers with learned weights built on scaled dot-product attention: projections,
//! multi-head attention, and the parameter-free forms; how weights are drawn.

pub(crate) mod init;
pub(crate) mod linear;
pub(crate) mod multi_head;
pub mod parameter_free;
mod product;
pub(crate) mod projection;
