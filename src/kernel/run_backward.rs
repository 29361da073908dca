//! How the fused backward runs over the heads of a call and over threads: where
//! each head's gradients go, and where a head falls back to the reference path.

use ndarray::{Array2, Array4, ArrayView4, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use super::arch::{Arch, Dispatch, KernelElement};
use super::backward::{
    BlockScratch, HeadGradients, HeadInputs, HeadPanels, HeadRest, HeadTargets, Part, Shared,
    Upstream,
};
use super::float::KernelFloat;
use super::fusable::{extent_of, fusable};
use super::ops::{BackwardHead, PackBackward, TileWidth};
use super::options::Parallelism;
use super::params::{BACKWARD_PARTS, BACKWARD_QUERIES as BQ};
use super::report::{self, Path};
use crate::core::backward::{Gradients, HeadBackward, add_bias_gradient};
use crate::core::problem::Problem;
use crate::core::reference::Saved;
use crate::core::scoring::Scoring;
use crate::flex::program::Program;

/// The memory a thread runs heads in, kept from head to head: a head's keys and
/// values packed, and its query blocks' working memory.
struct Work<A> {
    panels: HeadPanels<A>,
    scratch: BlockScratch<A>,
}

impl<A: KernelFloat> Work<A> {
    fn new(d_v: usize, nr: usize) -> Self {
        Work {
            panels: HeadPanels::new(nr),
            scratch: BlockScratch::new(d_v, nr),
        }
    }
}

/// Where the fused pass left a head's gradients.
enum Fused<A> {
    /// Added into the call's `dQ`, `dK` and `dV`; the rest of them.
    Written(HeadRest<A>),
    /// In arrays of their own, one set per part, to be summed in order.
    Own(Vec<HeadGradients<A>>),
}

/// The gradients of every head of `problem` given `d_out`, `(batch, heads, L, d_v)`,
/// and the forward's output and log-sum-exp if it kept them, by the fused backward
/// pass; heads whose inputs need it by the reference path. A head adds straight
/// into the call's gradients unless other query heads share its key/value head
/// (their `dK` and `dV` are summed in head order) or it is a call's only head
/// (its query blocks are dealt to [`BACKWARD_PARTS`] tasks, summed in part
/// order), so the result does not depend on the number of threads.
pub(crate) fn backward<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    arch: Arch,
    d_out: ArrayView4<'_, A>,
    saved: Option<&Saved<A>>,
    parallelism: Parallelism,
) -> Gradients<A> {
    let (batch, heads, l, _) = problem.q.dim();
    let upstream = |b: usize, h: usize| Upstream {
        d_out: d_out.index_axis(Axis(0), b).index_axis_move(Axis(0), h),
        saved: saved.map(|saved| saved.head(b, h)),
    };
    // the parts depend on the shapes only
    let parts = match batch * heads {
        1 => l.div_ceil(BQ).clamp(1, BACKWARD_PARTS),
        _ => 1,
    };
    let nr = Dispatch::<A>::dispatch(arch, TileWidth);
    let d_v = problem.v.dim().3;
    let work = || Work::new(d_v, nr);
    let mut grads = Gradients::zeros(problem);
    // zeros written, not only allocated: the pass reads a gradient before it
    // writes it, and a fresh page read first faults twice (mapping the zero
    // page, then copying it); a call of 8 heads of 512 × 64 measured 4 % faster
    for x in [&mut grads.dq, &mut grads.dk, &mut grads.dv] {
        x.fill(A::zero());
    }
    // each head adds into the call's gradients where no other head or part
    // adds to the same rows
    let written = parts == 1 && problem.group_size() == 1;
    let per_head: Vec<Option<Fused<A>>> = if written {
        let run = |work: &mut Work<A>, (head, out): (usize, HeadTargets<'_, A>)| {
            let (b, h) = (head / heads, head % heads);
            let upstream = upstream(b, h);
            let Work { panels, scratch } = work;
            let rest = fused_head(problem, arch, (b, h), upstream, panels, |inputs, panels| {
                arch.dispatch(BackwardHead {
                    inputs,
                    upstream,
                    shared: Shared { panels, scratch },
                    part: Part::WHOLE,
                    out,
                })
            });
            rest.map(Fused::Written)
        };
        let targets = head_targets(&mut grads);
        match parallelism {
            Parallelism::Sequential => {
                let mut work = work();
                let tasks = targets.into_iter().enumerate();
                tasks.map(|task| run(&mut work, task)).collect()
            }
            Parallelism::Rayon => targets
                .into_par_iter()
                .enumerate()
                .map_init(work, run)
                .collect(),
        }
    } else {
        let run = |work: &mut Work<A>, head: usize| {
            let (b, h) = (head / heads, head % heads);
            own_head(
                problem,
                arch,
                (b, h),
                upstream(b, h),
                work,
                parts,
                parallelism,
            )
            .map(Fused::Own)
        };
        let tasks = 0..batch * heads;
        match parallelism {
            Parallelism::Sequential => {
                let mut work = work();
                tasks.map(|head| run(&mut work, head)).collect()
            }
            Parallelism::Rayon => tasks.into_par_iter().map_init(work, run).collect(),
        }
    };
    for (head, fused) in per_head.into_iter().enumerate() {
        let (b, h) = (head / heads, head % heads);
        let path = match fused {
            Some(_) => Path::FusedBackward,
            None => Path::Reference,
        };
        report::count(path, 1);
        match fused {
            Some(Fused::Written(rest)) => add_rest(&mut grads, problem, (b, h), rest),
            Some(Fused::Own(parts)) => add_parts(&mut grads, problem, (b, h), parts),
            None => {
                if written {
                    // what the fused pass added before the program failed
                    let kv = problem.kv_head(h);
                    grads.dq.slice_mut(s![b, h, .., ..]).fill(A::zero());
                    grads.dk.slice_mut(s![b, kv, .., ..]).fill(A::zero());
                    grads.dv.slice_mut(s![b, kv, .., ..]).fill(A::zero());
                }
                let reference = reference_head(problem, b, h, upstream(b, h));
                add_parts(&mut grads, problem, (b, h), vec![reference]);
            }
        }
    }
    grads
}

/// Adds head `h` of batch row `b`'s gradients, in parts (query blocks dealt
/// as [`Part`]s, in part order), to the call's.
fn add_parts<A: KernelElement, P: Program<A>>(
    grads: &mut Gradients<A>,
    problem: &Problem<'_, A, A, P>,
    (b, h): (usize, usize),
    parts: Vec<HeadGradients<A>>,
) {
    let (l, kv, count) = (problem.q.dim().2, problem.kv_head(h), parts.len());
    for (index, part) in parts.into_iter().enumerate() {
        let blocks = Part { index, count }.blocks(l);
        for (rows, dq) in blocks.zip(part.dq.axis_chunks_iter(Axis(0), BQ)) {
            grads.dq.slice_mut(s![b, h, rows, ..]).assign(&dq);
        }
        let mut dk = grads.dk.slice_mut(s![b, kv, .., ..]);
        dk.zip_mut_with(&part.dk, |a, &x| *a += x);
        let mut dv = grads.dv.slice_mut(s![b, kv, .., ..]);
        dv.zip_mut_with(&part.dv, |a, &x| *a += x);
        add_rest(grads, problem, (b, h), part.rest);
    }
}

/// Adds head `h` of batch row `b`'s bias and program gradients to the call's.
fn add_rest<A: KernelElement, P: Program<A>>(
    grads: &mut Gradients<A>,
    problem: &Problem<'_, A, A, P>,
    (b, h): (usize, usize),
    rest: HeadRest<A>,
) {
    for (m, bias) in rest.bias.iter().enumerate() {
        let mut target = problem.bias_gradient_of(&mut grads.bias, m, b, h);
        target.zip_mut_with(bias, |a, &x| *a += x);
    }
    grads.add_program(h, &rest.score, rest.sink);
}

/// Each head's rows of the call's `dQ`, `dK` and `dV`, in head order (batch row
/// by batch row); for calls whose key/value heads are their query heads.
fn head_targets<A>(grads: &mut Gradients<A>) -> Vec<HeadTargets<'_, A>> {
    fn heads<A>(x: &mut Array4<A>) -> impl Iterator<Item = ArrayViewMut2<'_, A>> {
        x.view_mut()
            .into_outer_iter_mut()
            .flat_map(|batch_row| batch_row.into_outer_iter_mut())
    }
    let Gradients { dq, dk, dv, .. } = grads;
    heads(dq)
        .zip(heads(dk))
        .zip(heads(dv))
        .map(|((dq, dk), dv)| HeadTargets { dq, dk, dv })
        .collect()
}

/// Head `h` of batch row `b` by the fused pass into arrays of its own, its
/// query blocks dealt to `parts` tasks: one after another in `work`'s memory,
/// or on the pool, each thread with working memory of its own.
fn own_head<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    arch: Arch,
    (b, h): (usize, usize),
    upstream: Upstream<'_, A>,
    work: &mut Work<A>,
    parts: usize,
    parallelism: Parallelism,
) -> Option<Vec<HeadGradients<A>>> {
    let (l, d) = (problem.q.dim().2, problem.q.dim().3);
    let (s, d_v) = (problem.k.dim().2, problem.v.dim().3);
    let Work { panels, scratch } = work;
    let nr = panels.width();
    fused_head(problem, arch, (b, h), upstream, panels, |inputs, panels| {
        let part = |scratch: &mut BlockScratch<A>, index: usize| {
            let part = Part {
                index,
                count: parts,
            };
            let rows = part.blocks(l).map(|rows| rows.len()).sum();
            let (mut dq, mut dk, mut dv) = (
                Array2::zeros((rows, d)),
                Array2::zeros((s, d)),
                Array2::zeros((s, d_v)),
            );
            let rest = arch.dispatch(BackwardHead {
                inputs,
                upstream,
                shared: Shared { panels, scratch },
                part,
                out: HeadTargets {
                    dq: dq.view_mut(),
                    dk: dk.view_mut(),
                    dv: dv.view_mut(),
                },
            })?;
            Some(HeadGradients { dq, dk, dv, rest })
        };
        match (parts, parallelism) {
            (1, _) | (_, Parallelism::Sequential) => {
                (0..parts).map(|index| part(scratch, index)).collect()
            }
            (_, Parallelism::Rayon) => (0..parts)
                .into_par_iter()
                .map_init(|| BlockScratch::new(d_v, nr), part)
                .collect(),
        }
    })
}

/// Runs `run` on head `h` of batch row `b` with its keys and values packed
/// into `panels`; `None` where its inputs or `upstream` need the reference
/// path (or `run` says its program does).
fn fused_head<A: KernelElement, P: Program<A>, R>(
    problem: &Problem<'_, A, A, P>,
    arch: Arch,
    (b, h): (usize, usize),
    upstream: Upstream<'_, A>,
    panels: &mut HeadPanels<A>,
    run: impl FnOnce(&HeadInputs<'_, '_, A, P>, &HeadPanels<A>) -> Option<R>,
) -> Option<R> {
    let q = problem.query(b, h);
    let (k, v) = problem.keys_values(b, problem.kv_head(h));
    let masks = problem.block_masks(b, h);
    let finite = extent_of(&upstream.d_out).finite;
    if !(finite && fusable(&q, &masks, problem.scale, extent_of(&k), extent_of(&v))) {
        return None;
    }
    let bias_shapes = bias_shapes(problem);
    let inputs = HeadInputs {
        scoring: Scoring {
            program: problem.program,
            b,
            h,
        },
        q,
        k,
        v,
        masks: &masks,
        scale: problem.scale,
        bias_shapes: &bias_shapes,
    };
    let forward = upstream.saved.is_none();
    arch.dispatch(PackBackward {
        panels,
        k,
        v,
        forward,
    });
    run(&inputs, panels)
}

/// This head's part of every bias gradient: `(L or 1, S or 1)`.
fn bias_shapes<A, KV, P>(problem: &Problem<'_, A, KV, P>) -> Vec<(usize, usize)> {
    problem.bias_shapes.iter().map(|s| (s[2], s[3])).collect()
}

/// Head `h` of batch `b` by the reference path.
fn reference_head<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    b: usize,
    h: usize,
    upstream: Upstream<'_, A>,
) -> HeadGradients<A> {
    let HeadBackward {
        dq,
        dk,
        dv,
        d_s,
        score,
        sink,
    } = problem.backward_head(b, h, upstream.d_out, upstream.saved);
    let bias = bias_shapes(problem)
        .into_iter()
        .map(|shape| {
            let mut part = Array2::zeros(shape);
            add_bias_gradient(part.view_mut(), d_s.view(), 0, 0);
            part
        })
        .collect();
    HeadGradients {
        dq,
        dk,
        dv,
        rest: HeadRest { bias, score, sink },
    }
}
