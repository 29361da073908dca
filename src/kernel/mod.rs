//! The fused CPU kernel: attention without the `L × S` score matrix.
//!
//! This file is the router: [`forward`] takes a problem in any storage type and
//! picks its entry point, the compute types' ([`native`]) or the half types'
//! ([`half`]), which decides, once, how it runs (a [`plan::Plan`]: reference,
//! nothing, row-wise, direct, tiled, or tiled over bf16 pairs, with the
//! instruction set detected once); [`run`] runs the plan over the heads and
//! threads:
//! - [`tiled`]: for each `(batch, key/value head)` the keys and values are packed
//!   once ([`pack`]); the query heads that share them are cut into blocks of rows
//!   that run in parallel, each streaming over the keys with an online softmax
//!   ([`online`]) through register-tiled micro-kernels;
//! - [`direct`]: heads with only a few query rows (decoding against a cache) read
//!   the keys and values where they lie, half precision included;
//! - [`rowwise`]: problems too small for either go one row at a time.
//!
//! Each kernel body is an [`ops`] operation that [`arch`] compiles per
//! instruction set, through one trampoline per token; [`params`] holds every
//! tuning constant but the tile widths, which belong to the tokens. Inputs that
//! are not finite, or large enough that a score could overflow, take the
//! reference path ([`fusable`]), which defines what happens then; [`report`]
//! tells tests which path ran.

mod arch;
mod backward;
mod direct;
mod float;
mod fusable;
mod gemm;
mod half;
mod native;
mod online;
mod ops;
mod options;
mod pack;
pub(crate) mod paged;
mod params;
mod plan;
mod report;
mod rowwise;
mod run;
mod run_backward;
mod run_direct;
pub(crate) mod sweep;
mod tiled;
mod weights;

use ndarray::{Array4, ArrayView4};

pub use arch::KernelArch;
pub use options::{Kernel, Parallelism};
pub use report::{KernelPaths, kernel_paths};

pub(crate) use direct::round_to_i8;
use half::{backward_half, forward_half, forward_lse_half};
use native::{choose_backward, choose_forward_lse, choose_path};
pub(crate) use params::{DIRECT_MAX_ROWS, PRODUCT_PARALLEL_MIN_WORK};
pub(crate) use weights::{PackedWeight, pack_weight, weight_product};

use std::marker::PhantomData;

use crate::core::backward::Gradients;
use crate::core::problem::Problem;
use crate::core::reference::{Saved, SavedView};
use crate::element::{Element, Half, PerElement, PerStorage, Storage};
use crate::error::Result;
use crate::flex::program::Program;

/// Attention's output for every head of `problem`, whose keys and values are
/// stored as `S` (any storage type: the kernel plans how to read them), as
/// `S`, `(batch, heads, L, d_v)`. Its program `P` is compiled into every
/// kernel body.
///
/// # Errors
///
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when `ATTN_KERNEL_ARCH`
/// holds an unknown value and the tiled or direct path would run.
pub(crate) fn forward<S: Storage, P: Program<S::Compute>>(
    problem: &Problem<'_, S::Compute, S, P, S>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Array4<S>> {
    (S::select_storage::<P, _>(Stored(PhantomData)).forward)(problem, kernel, parallelism)
}

/// The output and each row's log-sum-exp of every head of `problem`, whose keys
/// and values are stored as `S` (as [`forward`]): by the tiled kernel, or the
/// reference path for [`Kernel::Plain`].
///
/// # Errors
///
/// As [`forward`].
pub(crate) fn forward_lse<S: Storage, P: Program<S::Compute>>(
    problem: &Problem<'_, S::Compute, S, P, S>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Saved<S::Compute>> {
    (S::select_storage::<P, _>(Stored(PhantomData)).forward_lse)(problem, kernel, parallelism)
}

/// [`forward`], [`forward_lse`] and [`backward`] compiled for one storage type.
struct StoredEntryPoints<S: Storage, P> {
    forward: ForwardFn<S, P>,
    forward_lse: ForwardLseFn<S, P>,
    backward: BackwardFn<S::Compute, P>,
}

/// Picks [`forward`]'s, [`forward_lse`]'s and [`backward`]'s bodies for the
/// storage type: the compute types' own, or the half types' ([`forward_half`],
/// [`forward_lse_half`], [`backward_half`]).
struct Stored<P>(PhantomData<P>);

impl<P> PerStorage<P> for Stored<P> {
    type Output<S: Storage> = StoredEntryPoints<S, P>;

    fn native<A: Element>(self) -> StoredEntryPoints<A, P>
    where
        P: Program<A>,
    {
        let entries = A::select::<P, _>(Entries(PhantomData));
        StoredEntryPoints {
            forward: entries.forward,
            forward_lse: entries.forward_lse,
            backward: entries.backward,
        }
    }

    fn half<H: Half>(self) -> StoredEntryPoints<H, P>
    where
        P: Program<f32>,
    {
        StoredEntryPoints {
            forward: forward_half::<H, P>,
            forward_lse: forward_lse_half::<H, P>,
            backward: backward_half::<H, P>,
        }
    }
}

/// The gradients of every head of `problem` given `d_out = ∂loss/∂output`,
/// `(batch, heads, L, d_v)`, and what the forward kept, if it did, for inputs
/// stored as `S` (given in the compute type): by the fused backward pass, or
/// the reference path for [`Kernel::Plain`].
///
/// # Errors
///
/// As [`forward`].
pub(crate) fn backward<S: Storage, P: Program<S::Compute>>(
    problem: &Problem<'_, S::Compute, S::Compute, P>,
    d_out: ArrayView4<'_, S::Compute>,
    saved: Option<SavedView<'_, S::Compute>>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Gradients<S::Compute>> {
    let backward = S::select_storage::<P, _>(Stored(PhantomData)).backward;
    backward(problem, d_out, saved, kernel, parallelism)
}

/// [`forward`] compiled for one storage type.
type ForwardFn<S, P> = for<'p> fn(
    &Problem<'p, <S as Storage>::Compute, S, P, S>,
    Kernel,
    Parallelism,
) -> Result<Array4<S>>;

/// [`forward_lse`] compiled for one storage type.
type ForwardLseFn<S, P> = for<'p> fn(
    &Problem<'p, <S as Storage>::Compute, S, P, S>,
    Kernel,
    Parallelism,
) -> Result<Saved<<S as Storage>::Compute>>;

/// [`backward`] compiled for one element type.
type BackwardFn<A, P> = for<'p, 'd, 's> fn(
    &Problem<'p, A, A, P>,
    ArrayView4<'d, A>,
    Option<SavedView<'s, A>>,
    Kernel,
    Parallelism,
) -> Result<Gradients<A>>;

/// The kernel's entry points compiled for one element type. `Element` is public
/// and sits below the kernel, so it cannot name [`KernelElement`]; its `select`
/// is the one bridge from generic code to the kernel's per-type code.
struct EntryPoints<A: Element, P> {
    forward: ForwardFn<A, P>,
    forward_lse: ForwardLseFn<A, P>,
    backward: BackwardFn<A, P>,
}

/// Picks the entry points for the element type.
struct Entries<P>(PhantomData<P>);

impl<P> PerElement<P> for Entries<P> {
    type Output<A: Element> = EntryPoints<A, P>;

    fn f32(self) -> EntryPoints<f32, P>
    where
        P: Program<f32>,
    {
        EntryPoints {
            forward: choose_path::<f32, P>,
            forward_lse: choose_forward_lse::<f32, P>,
            backward: choose_backward::<f32, P>,
        }
    }

    fn f64(self) -> EntryPoints<f64, P>
    where
        P: Program<f64>,
    {
        EntryPoints {
            forward: choose_path::<f64, P>,
            forward_lse: choose_forward_lse::<f64, P>,
            backward: choose_backward::<f64, P>,
        }
    }
}
