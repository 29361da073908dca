//! How the direct path runs over the key/value groups of a call and over
//! threads (split-key decoding: each group's keys cut into parts that run in
//! parallel), and where a head falls back to the reference path.

use ndarray::{ArrayView2, ArrayView4, ArrayViewMut1, ArrayViewMut2, CowArray, Ix2, s};
use rayon::prelude::*;

use super::arch::{Arch, Dispatch, KernelElement};
use super::direct::{Group, Memory, Native, PartialMut, Partials, Rows, Source, Widening};
use super::float::KernelFloat;
use super::ops::AttendPart;
use super::options::Parallelism;
use super::params::{DIRECT_CHUNK, DIRECT_PARALLEL_MIN_WORK, DIRECT_PART};
use super::report::{self, Path};
use super::run::KvGroup;
use super::tiled::Output;
use crate::core::mask::Mask2;
use crate::core::problem::Problem;
use crate::element::{Half, Storage};
use crate::flex::program::Program;

/// Every group by the direct path, its keys cut into parts of at most [`DIRECT_PART`]
/// that run in parallel; heads whose inputs need it then by the reference path.
pub(crate) fn direct<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    arch: Arch,
    groups: &mut [KvGroup<'_, '_, A>],
    parallelism: Parallelism,
) {
    let stored = standard_heads(problem, groups);
    let rows = rows_of::<A, Native<A>>(&stored);
    direct_over(problem, arch, groups, parallelism, &rows, |b, h, out| {
        problem.solve_head(b, h, Some(out), None)
    });
}

/// [`direct`] over keys and values stored in half precision, read where they lie
/// and widened chunk by chunk. A head whose inputs need the reference path gets
/// its keys and values widened whole.
pub(crate) fn direct_half<H: Half, P: Program<f32>>(
    problem: &Problem<'_, f32, H, P>,
    arch: Arch,
    groups: &mut [KvGroup<'_, '_, f32>],
    parallelism: Parallelism,
) {
    let stored = standard_heads(problem, groups);
    let rows = rows_of::<f32, Widening<H>>(&stored);
    direct_over(problem, arch, groups, parallelism, &rows, |b, h, out| {
        widened_reference(problem, b, h, out, None)
    });
}

/// Head `h` of batch `b` by the reference path, its keys and values stored in
/// half precision widened whole (and its queries, if they are); its output
/// written as `O`, each row's log-sum-exp into `lse` if asked.
pub(crate) fn widened_reference<H, Q, P, O>(
    problem: &Problem<'_, f32, H, P, Q>,
    b: usize,
    h: usize,
    out: ArrayViewMut2<'_, O>,
    lse: Option<ArrayViewMut1<'_, f32>>,
) where
    H: Half,
    Q: Storage<Compute = f32>,
    P: Program<f32>,
    O: Output<f32>,
{
    let kv = problem.kv_head(h);
    let widened = |x: &ArrayView4<'_, H>| x.slice(s![b, kv, .., ..]).mapv(H::to_compute);
    let (keys, values) = (widened(&problem.k), widened(&problem.v));
    let queries = problem.query(b, h).mapv(Q::to_compute);
    let (output, row_lse) = problem.lse_head(b, h, queries.view(), keys.view(), values.view());
    O::assign(out, output.view());
    if let Some(mut lse) = lse {
        lse.assign(&row_lse);
    }
}

/// One group's keys and values in standard layout.
type StandardHead<'p, KV> = (CowArray<'p, KV, Ix2>, CowArray<'p, KV, Ix2>);

/// Each group's keys and values in standard layout (views where they are).
fn standard_heads<'p, A: Copy, KV: Clone, P, Q>(
    problem: &'p Problem<'_, A, KV, P, Q>,
    groups: &[KvGroup<'_, '_, A>],
) -> Vec<StandardHead<'p, KV>> {
    groups
        .iter()
        .map(|g| {
            let (k, v) = problem.keys_values(g.b, g.kv);
            (standard(k), standard(v))
        })
        .collect()
}

/// The rows the direct path reads of each group's keys and values.
fn rows_of<'s, A: KernelFloat, S: Source<A>>(
    stored: &'s [StandardHead<'_, S::Elem>],
) -> Vec<(S::Rows<'s>, S::Rows<'s>)> {
    let slice = |x: &'s CowArray<'_, S::Elem, Ix2>| {
        x.as_slice().expect("standard-layout arrays are slices")
    };
    stored
        .iter()
        .map(|(k, v)| (S::rows(slice(k)), S::rows(slice(v))))
        .collect()
}

/// The direct path over each group's keys and values read as `rows[g]`;
/// `fallback(b, h, out)` computes a head whose inputs the fused arithmetic
/// cannot stand for. The problem's own keys and values give only the shapes.
pub(crate) fn direct_over<A: KernelElement, KV: Sync, R: Rows<A>, P: Program<A>>(
    problem: &Problem<'_, A, KV, P>,
    arch: Arch,
    groups: &mut [KvGroup<'_, '_, A>],
    parallelism: Parallelism,
    rows: &[(R, R)],
    fallback: impl Fn(usize, usize, ArrayViewMut2<'_, A>),
) {
    let s = problem.k.dim().2;
    let d_v = problem.v.dim().3;
    let inputs: Vec<DirectInputs<'_, A>> = groups
        .iter()
        .map(|g| {
            let heads = problem.query_heads(g.kv);
            DirectInputs {
                queries: heads.clone().map(|h| problem.query(g.b, h)).collect(),
                masks: heads.map(|h| problem.block_masks(g.b, h)).collect(),
            }
        })
        .collect();
    // S ≥ 1 (smaller problems went row by row); the parts as even as whole
    // chunks allow, so that a cache a little past a multiple of DIRECT_PART
    // is not one task of a few keys more per group
    let parts = s.div_ceil(DIRECT_PART);
    let part_len = s.div_ceil(parts).next_multiple_of(DIRECT_CHUNK);
    let query_rows = inputs
        .first()
        .map_or(0, |g| g.queries.len() * problem.q.dim().2);
    let mut partials = Partials::<A>::new(groups.len() * parts, query_rows, d_v);
    let run = |memory: &mut Memory<A>, (task, out): (usize, PartialMut<'_, A>)| {
        let (g, part) = (task / parts, task % parts);
        let inputs = &inputs[g];
        let group = Group {
            program: problem.program,
            b: groups[g].b,
            first_head: problem.query_heads(groups[g].kv).start,
            queries: &inputs.queries,
            masks: &inputs.masks,
            keys: rows[g].0,
            values: rows[g].1,
            s,
            d_v,
            scale: problem.scale,
        };
        let first = part * part_len;
        let part = first..(first + part_len).min(s);
        arch.dispatch(AttendPart {
            group: &group,
            part,
            memory,
            out,
        });
    };
    // each thread's working memory kept from part to part; a call too small
    // to pay for handing work to the pool runs where it is called (the parts
    // are the same, and so are the numbers)
    let slots = partials.slots();
    let work = groups.len() * query_rows * s * (problem.q.dim().3 + d_v);
    match parallelism {
        Parallelism::Rayon if work >= DIRECT_PARALLEL_MIN_WORK => {
            let slots = slots.into_par_iter().enumerate();
            slots.for_each_init(Memory::default, run);
        }
        _ => {
            let mut memory = Memory::default();
            slots
                .into_iter()
                .enumerate()
                .for_each(|slot| run(&mut memory, slot));
        }
    }
    report::arch_used(Dispatch::<A>::kind(arch));
    for (g, group) in groups.iter_mut().enumerate() {
        let first_head = problem.query_heads(group.kv).start;
        let sinks = |h| problem.program.sink(first_head + h);
        let bad = partials.finish(g * parts..(g + 1) * parts, group.outs, sinks);
        report::count(Path::Direct, group.outs.len() - bad.len());
        report::count(Path::Reference, bad.len());
        for h in bad {
            fallback(group.b, first_head + h, group.outs[h].view_mut());
        }
    }
}

/// `x` itself if it is in standard layout, else a standard-layout copy.
fn standard<A: Clone>(x: ArrayView2<'_, A>) -> CowArray<'_, A, Ix2> {
    if x.is_standard_layout() {
        x.into()
    } else {
        x.as_standard_layout().into_owned().into()
    }
}

/// One group's queries and masks, for the direct path.
struct DirectInputs<'p, A> {
    queries: Vec<ArrayView2<'p, A>>,
    masks: Vec<Vec<Mask2<'p, A>>>,
}
