//! The kernel's entry points for inputs stored in half precision (bf16, f16):
//! which plans read them as stored (the tiled plans over bf16 pairs, the
//! direct path's keys and values) and where they are widened to `f32`.

use ndarray::{Array4, ArrayView4, ArrayViewMut1, ArrayViewMut2};

use super::arch::Arch;
use super::native::{
    choose_backward, choose_forward_lse, kv_groups, output_of, per_head, run_plan,
};
use super::options::{Kernel, Parallelism};
use super::plan::Plan;
use super::run_direct;
#[cfg(target_arch = "x86_64")]
use super::{run, run_backward, tiled::Output};
use crate::core::backward::Gradients;
use crate::core::problem::Problem;
use crate::core::reference::{Saved, SavedView};
use crate::element::Half;
use crate::error::Result;
use crate::flex::program::Program;

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
pub(super) fn forward_half<H: Half, P: Program<f32>>(
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
pub(super) fn forward_lse_half<H: Half, P: Program<f32>>(
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

/// [`backward`] for inputs stored in half precision (widened to `f32`): on
/// AMX tiles where the inputs are bf16 and the CPU (and `ATTN_KERNEL_ARCH`)
/// has AMX, the weights and their gradients rounded to bf16 for the tiles'
/// products ([`arch::Amx`]); else as `f32` does.
///
/// # Errors
///
/// As [`forward`].
pub(super) fn backward_half<H: Half, P: Program<f32>>(
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
