//! The fused CPU kernel: attention without the `L × S` score matrix.
//!
//! This file chooses a path for each call; [`run`] runs it over the heads and
//! threads:
//! - [`tiled`]: for each `(batch, key/value head)` the keys and values are packed
//!   once ([`pack`]); the query heads that share them are cut into blocks of rows
//!   that run in parallel, each streaming over the keys with an online softmax
//!   ([`online`]) through register-tiled micro-kernels;
//! - [`direct`]: heads with only a few query rows (decoding against a cache) read
//!   the keys and values where they lie;
//! - [`rowwise`]: problems too small for either go one row at a time.
//!
//! The micro-kernels are compiled per instruction set in [`arch`], chosen once per
//! call; [`params`] holds every tuning constant. Inputs that are not finite, or
//! large enough that a score could overflow, take the reference path
//! ([`fusable`]), which defines what happens then; [`report`] tells tests which
//! path ran.

mod arch;
mod backward;
mod direct;
mod float;
mod fusable;
mod gemm;
mod online;
mod options;
mod pack;
mod params;
mod report;
mod rowwise;
mod run;
mod tiled;

use ndarray::{ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis};

pub use arch::KernelArch;
pub use options::{Kernel, Parallelism};
pub use report::{kernel_paths, KernelPaths};

use arch::{Arch, KernelElement};
use params::{DIRECT_MAX_ROWS, ROWWISE_MAX_WORK};
use report::Path;
use run::KvGroup;

use crate::core::backward::Gradients;
use crate::core::problem::Problem;
use crate::core::reference::Saved;
use crate::element::{Element, Half, PerElement};
use crate::error::Result;

/// Writes attention's output for every head of `problem` into `out`,
/// `(batch, heads, L, d_v)`.
///
/// # Errors
///
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when `ATTN_KERNEL_ARCH`
/// holds an unknown value and the tiled or direct path would run.
pub(crate) fn forward<A: Element>(
    problem: &Problem<'_, A>,
    out: ArrayViewMut4<'_, A>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<()> {
    (A::select(Entries).forward)(problem, out, kernel, parallelism)
}

/// The output and each row's log-sum-exp of every head of `problem`: by the
/// fused forward of the backward pass, or the reference path for [`Kernel::Plain`].
///
/// # Errors
///
/// As [`forward`].
pub(crate) fn forward_lse<A: Element>(
    problem: &Problem<'_, A>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Saved<A>> {
    (A::select(Entries).forward_lse)(problem, kernel, parallelism)
}

/// The gradients of every head of `problem` given `d_out = ∂loss/∂output`,
/// `(batch, heads, L, d_v)`, and what the forward kept, if it did: by the fused
/// backward pass, or the reference path for [`Kernel::Plain`].
///
/// # Errors
///
/// As [`forward`].
pub(crate) fn backward<A: Element>(
    problem: &Problem<'_, A>,
    d_out: ArrayView4<'_, A>,
    saved: Option<&Saved<A>>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Gradients<A>> {
    (A::select(Entries).backward)(problem, d_out, saved, kernel, parallelism)
}

/// [`forward`] compiled for one element type.
type ForwardFn<A> =
    for<'p, 'o> fn(&Problem<'p, A>, ArrayViewMut4<'o, A>, Kernel, Parallelism) -> Result<()>;

/// [`forward_lse`] compiled for one element type.
type ForwardLseFn<A> = for<'p> fn(&Problem<'p, A>, Kernel, Parallelism) -> Result<Saved<A>>;

/// [`backward`] compiled for one element type.
type BackwardFn<A> = for<'p, 'd, 's> fn(
    &Problem<'p, A>,
    ArrayView4<'d, A>,
    Option<&'s Saved<A>>,
    Kernel,
    Parallelism,
) -> Result<Gradients<A>>;

/// The kernel's entry points compiled for one element type.
struct EntryPoints<A> {
    forward: ForwardFn<A>,
    forward_lse: ForwardLseFn<A>,
    backward: BackwardFn<A>,
}

/// Picks the entry points for the element type.
struct Entries;

impl PerElement for Entries {
    type Output<A: Element> = EntryPoints<A>;

    fn f32(self) -> EntryPoints<f32> {
        EntryPoints {
            forward: choose_path::<f32>,
            forward_lse: choose_forward_lse::<f32>,
            backward: choose_backward::<f32>,
        }
    }

    fn f64(self) -> EntryPoints<f64> {
        EntryPoints {
            forward: choose_path::<f64>,
            forward_lse: choose_forward_lse::<f64>,
            backward: choose_backward::<f64>,
        }
    }
}

/// Writes attention's output for every head of `problem` into `out` by the
/// direct path, reading the problem's half-precision keys and values where they
/// lie. `false`, with nothing written, when the call is not the direct path's:
/// many query rows, or small enough to go row by row (those convert their
/// inputs, at little cost).
///
/// # Errors
///
/// As [`forward`].
pub(crate) fn forward_half_direct<H: Half>(
    problem: &Problem<'_, f32, H>,
    out: ArrayViewMut4<'_, f32>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<bool> {
    if route(problem, kernel) != Route::Direct {
        return Ok(false);
    }
    let arch = Arch::detect()?;
    let mut outs: Vec<_> = per_head(out).collect();
    let mut groups = kv_groups(problem, &mut outs);
    run::direct_half(problem, arch, &mut groups, parallelism);
    Ok(true)
}

/// Writes attention's output for every head of `problem` into `out` by the tiled
/// kernel with bf16 dot products, packing the problem's bf16 keys as they
/// are. `false`, with nothing written, when the call is not the tiled kernel's,
/// the keys are not bf16, or the CPU (or `ATTN_KERNEL_ARCH`) does not allow
/// AVX512_BF16: then the inputs are converted to f32 for the f32 kernel.
///
/// # Errors
///
/// As [`forward`].
pub(crate) fn forward_half_tiled<H: Half>(
    problem: &Problem<'_, f32, H>,
    out: ArrayViewMut4<'_, f32>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<bool> {
    let (Some(k), Some(v)) = (H::as_bf16(problem.k), H::as_bf16(problem.v)) else {
        return Ok(false);
    };
    if route(problem, kernel) != Route::Tiled {
        return Ok(false);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(dots) = Arch::detect()?.bf16_dots() {
        let problem = problem.with_keys_values(k, v);
        let mut outs: Vec<_> = per_head(out).collect();
        let mut groups = kv_groups(&problem, &mut outs);
        run::tiled(&problem, dots, &mut groups, parallelism, |b, h, out| {
            run::widened_reference(&problem, b, h, out)
        });
        return Ok(true);
    }
    let _ = (k, v, out, parallelism); // no bf16 dot products off x86-64
    Ok(false)
}

/// The outputs `outs` (one per batch and query head, in that order) grouped by
/// the key/value head they attend with: group `b·kv_heads + kv`.
fn kv_groups<'o, 'a, A: Copy, KV>(
    problem: &Problem<'_, A, KV>,
    outs: &'o mut [ArrayViewMut2<'a, A>],
) -> Vec<KvGroup<'o, 'a, A>> {
    let kv_heads = problem.k.dim().1;
    outs.chunks_mut(problem.group_size())
        .enumerate()
        .map(|(i, outs)| KvGroup {
            b: i / kv_heads,
            kv: i % kv_heads,
            outs,
        })
        .collect()
}

/// Counts every head of `problem` as served by the reference path ([`Kernel::Plain`]).
fn count_all_reference<A>(problem: &Problem<'_, A>) {
    let (batch, heads, _, _) = problem.q.dim();
    report::count(Path::Reference, batch * heads);
}

/// The forward with log-sum-exp by the path `kernel` asks for.
fn choose_forward_lse<A: KernelElement>(
    problem: &Problem<'_, A>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Saved<A>> {
    if kernel == Kernel::Plain {
        count_all_reference(problem);
        return Ok(problem.forward_lse());
    }
    Ok(run::forward_lse(problem, Arch::detect()?, parallelism))
}

/// The backward pass by the path `kernel` asks for.
fn choose_backward<A: KernelElement>(
    problem: &Problem<'_, A>,
    d_out: ArrayView4<'_, A>,
    saved: Option<&Saved<A>>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Gradients<A>> {
    if kernel == Kernel::Plain {
        count_all_reference(problem);
        return Ok(problem.backward(d_out));
    }
    Ok(run::backward(
        problem,
        Arch::detect()?,
        d_out,
        saved,
        parallelism,
    ))
}

/// Chooses the path for every head and runs it.
fn choose_path<A: KernelElement>(
    problem: &Problem<'_, A>,
    out: ArrayViewMut4<'_, A>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<()> {
    let heads = problem.q.dim().1;
    match route(problem, kernel) {
        Route::Reference => {
            count_all_reference(problem);
            problem.solve(Some(out), None);
        }
        Route::Nothing => {}
        Route::Rowwise if problem.q.dim().0 * heads == 1 => {
            // one small head, the common 2-D call: no bookkeeping at all
            let out = out.index_axis_move(Axis(0), 0).index_axis_move(Axis(0), 0);
            run::rowwise_head(problem, 0, 0, out);
        }
        Route::Rowwise => {
            for (i, out) in per_head(out).enumerate() {
                run::rowwise_head(problem, i / heads, i % heads, out);
            }
        }
        route => {
            let arch = Arch::detect()?;
            let mut outs: Vec<_> = per_head(out).collect();
            let mut groups = kv_groups(problem, &mut outs);
            if route == Route::Direct {
                run::direct(problem, arch, &mut groups, parallelism);
            } else {
                run::tiled(problem, arch, &mut groups, parallelism, |b, h, out| {
                    problem.solve_head(b, h, Some(out), None)
                });
            }
        }
    }
    Ok(())
}

/// How a forward call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// [`Kernel::Plain`]: the reference path.
    Reference,
    /// No output to compute.
    Nothing,
    /// Small enough to go row by row.
    Rowwise,
    /// A few query rows against many keys: the direct path.
    Direct,
    /// Everything else: the tiled kernel.
    Tiled,
}

/// The route of `problem` under `kernel`.
fn route<A, KV>(problem: &Problem<'_, A, KV>, kernel: Kernel) -> Route {
    let (batch, heads, l, d) = problem.q.dim();
    let (s, d_v) = (problem.k.dim().2, problem.v.dim().3);
    match kernel {
        Kernel::Plain => Route::Reference,
        _ if batch * heads * l * d_v == 0 => Route::Nothing,
        Kernel::Auto if l * s * (d + d_v) <= ROWWISE_MAX_WORK => Route::Rowwise,
        Kernel::Auto if l <= DIRECT_MAX_ROWS => Route::Direct,
        _ => Route::Tiled,
    }
}

/// One output per (batch, query head), in that order.
fn per_head<'o, A>(out: ArrayViewMut4<'o, A>) -> impl Iterator<Item = ArrayViewMut2<'o, A>> {
    out.into_outer_iter_mut()
        .flat_map(|heads| heads.into_outer_iter_mut())
}
