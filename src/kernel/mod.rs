//! The fused CPU kernel: attention without the `L × S` score matrix.
//!
//! This file is the router: [`forward`] takes a problem in any storage type and
//! decides, once, how it runs (a [`Plan`]: reference, nothing, row-wise, direct,
//! tiled, or tiled over bf16 key pairs, with the instruction set detected once);
//! [`run`] runs the plan over the heads and threads:
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

use ndarray::{Array4, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4, Axis};

pub use arch::KernelArch;
pub use options::{Kernel, Parallelism};
pub use report::{KernelPaths, kernel_paths};

use arch::{Arch, KernelElement};
pub(crate) use direct::round_to_i8;
pub(crate) use params::{DIRECT_MAX_ROWS, PRODUCT_PARALLEL_MIN_WORK};
use plan::Plan;
use report::Path;
use run::KvGroup;
use tiled::Output;
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

/// The output array of `problem`, `(batch, heads, L, d_v)`, over `zeros`
/// (`zeros(len)` gives its values).
fn output_of<T, A, KV, P, Q>(
    problem: &Problem<'_, A, KV, P, Q>,
    zeros: impl FnOnce(usize) -> Vec<T>,
) -> Array4<T> {
    let (batch, heads, l, _) = problem.q.dim();
    let shape = (batch, heads, l, problem.v.dim().3);
    let values = zeros(shape.0 * shape.1 * shape.2 * shape.3);
    Array4::from_shape_vec(shape, values).expect("one value per element")
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

/// [`backward`] for inputs stored in half precision (widened to `f32`): on
/// AMX tiles where the inputs are bf16 and the CPU (and `ATTN_KERNEL_ARCH`)
/// has AMX, the weights and their gradients rounded to bf16 for the tiles'
/// products ([`arch::Amx`]); else as `f32` does.
///
/// # Errors
///
/// As [`forward`].
fn backward_half<H: Half, P: Program<f32>>(
    problem: &Problem<'_, f32, f32, P>,
    d_out: ArrayView4<'_, f32>,
    saved: Option<SavedView<'_, f32>>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Gradients<f32>> {
    #[cfg(target_arch = "x86_64")]
    if H::BF16
        && kernel != Kernel::Plain
        && let Some(tiles) = Arch::detect()?.amx_tiles()
    {
        let grads = run_backward::backward(problem, tiles, d_out, saved, parallelism);
        return Ok(grads);
    }
    choose_backward(problem, d_out, saved, kernel, parallelism)
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

/// [`forward`] over inputs stored in half precision, by one [`Plan`]: the
/// direct path reads the keys and values where they lie; the tiled path packs
/// bf16 queries, keys and values as pairs for the bf16 dot products or AMX
/// tiles where the CPU (and `ATTN_KERNEL_ARCH`) has them, and writes each
/// output row in the storage type as its block finishes it; every other plan
/// widens the queries (the direct path's too), keys and values to `f32` once,
/// here, and runs as `f32` does, its output rounded at the end.
///
/// # Errors
///
/// As [`forward`].
fn forward_half<H: Half, P: Program<f32>>(
    problem: &Problem<'_, f32, H, P, H>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Array4<H>> {
    let plan = Plan::of(problem, kernel)?.for_half::<H>();
    #[cfg(target_arch = "x86_64")]
    if let Plan::TiledBf16Pairs(_) | Plan::TiledAmx(_) = plan {
        // each row rounded as its block finishes it: no f32 output
        let mut out = output_of(problem, |len| H::zeroed(len, parallelism));
        let mut outs: Vec<_> = per_head(out.view_mut()).collect();
        tiled_bf16(problem, plan, &mut outs, None, parallelism);
        return Ok(out);
    }
    let mut out = output_of(problem, |len| H::zeros(len, parallelism));
    let q = H::compute(problem.q, parallelism);
    let problem = problem.with_queries(q.view());
    if let Plan::Direct(arch) = plan {
        let mut outs: Vec<_> = per_head(out.view_mut()).collect();
        let mut groups = kv_groups(&problem, &mut outs, None);
        run_direct::direct_half(&problem, arch, &mut groups, parallelism);
    } else {
        // every other plan reads f32 keys and values
        let (k, v) = (
            H::compute(problem.k, parallelism),
            H::compute(problem.v, parallelism),
        );
        run_plan(
            &problem.with_keys_values(k.view(), v.view()),
            plan,
            out.view_mut(),
            parallelism,
        );
        H::done(k);
        H::done(v);
    }
    H::done(q);
    Ok(H::store(out, parallelism))
}

/// [`forward_lse`] over inputs stored in half precision: the tiled plans over
/// bf16 pairs keep each row's log-sum-exp as the `f32` kernel does; every
/// other plan widens the inputs once and runs as `f32` does.
///
/// # Errors
///
/// As [`forward`].
fn forward_lse_half<H: Half, P: Program<f32>>(
    problem: &Problem<'_, f32, H, P, H>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Saved<f32>> {
    let plan = Plan::of(problem, kernel)?.for_half::<H>();
    match plan {
        #[cfg(target_arch = "x86_64")]
        Plan::TiledBf16Pairs(_) | Plan::TiledAmx(_) => {
            let mut saved = Saved::zeros(problem);
            let (mut outs, mut lses) = saved.per_head();
            tiled_bf16(problem, plan, &mut outs, Some(&mut lses), parallelism);
            Ok(saved)
        }
        _ => {
            let [q, k, v] = [problem.q, problem.k, problem.v].map(|x| H::compute(x, parallelism));
            let saved = choose_forward_lse(
                &problem.with_inputs(q.view(), k.view(), v.view()),
                kernel,
                parallelism,
            );
            [q, k, v].into_iter().for_each(H::done);
            saved
        }
    }
}

/// The tiled kernel over bf16 keys and values by one of the plans over bf16
/// pairs (AVX512_BF16 dot products or AMX tiles): every head's output into
/// `outs`, and its rows' log-sum-exps into `lses` if the call keeps them.
#[cfg(target_arch = "x86_64")]
fn tiled_bf16<'o, H: Half, P: Program<f32>, O: Output<f32>>(
    problem: &Problem<'_, f32, H, P, H>,
    plan: Plan,
    outs: &mut [ArrayViewMut2<'o, O>],
    lses: Option<&mut [ArrayViewMut1<'o, f32>]>,
    parallelism: Parallelism,
) {
    let [Some(q), Some(k), Some(v)] = [problem.q, problem.k, problem.v].map(H::as_bf16) else {
        unreachable!("the plan has pairs only for bf16 inputs")
    };
    let problem = problem.with_inputs(q, k, v);
    let mut groups = kv_groups(&problem, outs, lses);
    let fallback = |b, h, out: ArrayViewMut2<'_, O>, lse: Option<ArrayViewMut1<'_, f32>>| {
        run_direct::widened_reference(&problem, b, h, out, lse)
    };
    match plan {
        Plan::TiledBf16Pairs(dots) => {
            run::tiled(&problem, dots, &mut groups, parallelism, fallback)
        }
        Plan::TiledAmx(tiles) => run::tiled(&problem, tiles, &mut groups, parallelism, fallback),
        _ => unreachable!("called for the plans over bf16 pairs only"),
    }
}

/// The outputs `outs` (one per batch and query head, in that order), and their
/// rows' log-sum-exps `lses` if the call keeps them, grouped by the key/value
/// head they attend with: group `b·kv_heads + kv`.
fn kv_groups<'o, 'a, A: Copy, KV, P, Q, O>(
    problem: &Problem<'_, A, KV, P, Q>,
    outs: &'o mut [ArrayViewMut2<'a, O>],
    lses: Option<&'o mut [ArrayViewMut1<'a, A>]>,
) -> Vec<KvGroup<'o, 'a, A, O>> {
    let (kv_heads, group) = (problem.k.dim().1, problem.group_size());
    let mut lses = lses.map(|lses| lses.chunks_mut(group));
    outs.chunks_mut(group)
        .enumerate()
        .map(|(i, outs)| KvGroup {
            b: i / kv_heads,
            kv: i % kv_heads,
            outs,
            lses: lses.as_mut().and_then(Iterator::next),
        })
        .collect()
}

/// Counts every head of `problem` as served by the reference path ([`Kernel::Plain`]).
fn count_all_reference<A, P>(problem: &Problem<'_, A, A, P>) {
    let (batch, heads, _, _) = problem.q.dim();
    report::count(Path::Reference, batch * heads);
}

/// The forward with log-sum-exp by the path `kernel` asks for: the tiled
/// kernel keeps each row's log-sum-exp as it finishes the row (heads whose
/// inputs need it by the reference path).
fn choose_forward_lse<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Saved<A>> {
    if kernel == Kernel::Plain {
        count_all_reference(problem);
        return Ok(problem.forward_lse());
    }
    let arch = Arch::detect()?;
    let mut saved = Saved::zeros(problem);
    if saved.lse.is_empty() {
        return Ok(saved);
    }
    let (mut outs, mut lses) = saved.per_head();
    let mut groups = kv_groups(problem, &mut outs, Some(&mut lses));
    run::tiled(
        problem,
        arch,
        &mut groups,
        parallelism,
        |b, h, mut out, lse| {
            let (output, row_lse) = problem.forward_lse_head(b, h);
            out.assign(&output);
            if let Some(mut lse) = lse {
                lse.assign(&row_lse);
            }
        },
    );
    Ok(saved)
}

/// The backward pass by the path `kernel` asks for.
fn choose_backward<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    d_out: ArrayView4<'_, A>,
    saved: Option<SavedView<'_, A>>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Gradients<A>> {
    if kernel == Kernel::Plain {
        count_all_reference(problem);
        return Ok(problem.backward(d_out, saved));
    }
    Ok(run_backward::backward(
        problem,
        Arch::detect()?,
        d_out,
        saved,
        parallelism,
    ))
}

/// Plans the call and runs it.
fn choose_path<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    kernel: Kernel,
    parallelism: Parallelism,
) -> Result<Array4<A>> {
    let plan = Plan::of(problem, kernel)?;
    let mut out = output_of(problem, |len| A::zeros(len, parallelism));
    run_plan(problem, plan, out.view_mut(), parallelism);
    Ok(out)
}

/// Runs every head of `problem` as `plan` says.
fn run_plan<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    plan: Plan,
    out: ArrayViewMut4<'_, A>,
    parallelism: Parallelism,
) {
    let heads = problem.q.dim().1;
    match plan {
        Plan::Reference => {
            count_all_reference(problem);
            problem.solve(Some(out), None);
        }
        Plan::Nothing => {}
        Plan::Rowwise if problem.q.dim().0 * heads == 1 => {
            // one small head, the common 2-D call: no bookkeeping at all
            let out = out.index_axis_move(Axis(0), 0).index_axis_move(Axis(0), 0);
            run::rowwise_head(problem, 0, 0, out);
        }
        Plan::Rowwise => {
            for (i, out) in per_head(out).enumerate() {
                run::rowwise_head(problem, i / heads, i % heads, out);
            }
        }
        Plan::Direct(arch) => {
            let mut outs: Vec<_> = per_head(out).collect();
            let mut groups = kv_groups(problem, &mut outs, None);
            run_direct::direct(problem, arch, &mut groups, parallelism);
        }
        Plan::Tiled(arch) => {
            let mut outs: Vec<_> = per_head(out).collect();
            let mut groups = kv_groups(problem, &mut outs, None);
            run::tiled(problem, arch, &mut groups, parallelism, |b, h, out, _| {
                problem.solve_head(b, h, Some(out), None)
            });
        }
        #[cfg(target_arch = "x86_64")]
        Plan::TiledBf16Pairs(_) | Plan::TiledAmx(_) => {
            unreachable!("planned for bf16 keys only, by forward_half")
        }
    }
}

/// One output per (batch, query head), in that order.
fn per_head<'o, A>(out: ArrayViewMut4<'o, A>) -> impl Iterator<Item = ArrayViewMut2<'o, A>> {
    out.into_outer_iter_mut()
        .flat_map(|heads| heads.into_outer_iter_mut())
}
