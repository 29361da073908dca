//! The kernel's entry points for the types computed in themselves (`f32`,
//! `f64`): the plan of a call run over its heads; the half types' entry points
//! ([`super::half`]) run their widened calls through them.

use ndarray::{Array4, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4, Axis};

use super::arch::{Arch, KernelElement};
use super::options::{Kernel, Parallelism};
use super::plan::Plan;
use super::report::{self, Path};
use super::run::{self, KvGroup};
use super::{run_backward, run_direct};
use crate::core::backward::Gradients;
use crate::core::problem::Problem;
use crate::core::reference::{Saved, SavedView};
use crate::error::Result;
use crate::flex::program::Program;

/// The output array of `problem`, `(batch, heads, L, d_v)`, over `zeros`
/// (`zeros(len)` gives its values).
pub(super) fn output_of<T, A, KV, P, Q>(
    problem: &Problem<'_, A, KV, P, Q>,
    zeros: impl FnOnce(usize) -> Vec<T>,
) -> Array4<T> {
    let (batch, heads, l, _) = problem.q.dim();
    let shape = (batch, heads, l, problem.v.dim().3);
    let values = zeros(shape.0 * shape.1 * shape.2 * shape.3);
    Array4::from_shape_vec(shape, values).expect("one value per element")
}

/// The outputs `outs` (one per batch and query head, in that order), and their
/// rows' log-sum-exps `lses` if the call keeps them, grouped by the key/value
/// head they attend with: group `b·kv_heads + kv`.
pub(super) fn kv_groups<'o, 'a, A: Copy, KV, P, Q, O>(
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
pub(super) fn choose_forward_lse<A: KernelElement, P: Program<A>>(
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
pub(super) fn choose_backward<A: KernelElement, P: Program<A>>(
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
pub(super) fn choose_path<A: KernelElement, P: Program<A>>(
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
pub(super) fn run_plan<A: KernelElement, P: Program<A>>(
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
pub(super) fn per_head<'o, A>(
    out: ArrayViewMut4<'o, A>,
) -> impl Iterator<Item = ArrayViewMut2<'o, A>> {
    out.into_outer_iter_mut()
        .flat_map(|heads| heads.into_outer_iter_mut())
}
