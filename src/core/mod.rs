//! What every path of the crate agrees on: the checked problem, masks, softmax and
//! the readable reference path that the fast kernels are measured against.

pub(crate) mod backward;
pub(crate) mod mask;
pub(crate) mod problem;
pub(crate) mod reference;
pub(crate) mod reorder;
pub(crate) mod scoring;
pub(crate) mod softmax;
