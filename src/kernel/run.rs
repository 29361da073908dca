//! How the row-wise and tiled paths run over the heads of a call and over
//! threads, and where a head falls back to the reference path (the direct
//! path's in `run_direct.rs`, the backward's in `run_backward.rs`).

use ndarray::{ArrayViewMut1, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::arch::{Dispatch, KernelElement, Op};
use super::float::KernelFloat;
use super::fusable::{Extent, Magnitude, extent_of, fusable};
use super::ops::{AttendBlock, PackHead, TileWidth};
use super::options::Parallelism;
use super::pack::{Entry, HeadMemory, PackedHead, head_bytes};
use super::params::{BC, BR, PACKED_BYTES};
use super::report::{self, Path};
use super::rowwise::{self, HeadRows};
use super::tiled::{Block, Output, Scratch};
use crate::core::mask::Mask2;
use crate::core::problem::Problem;
use crate::core::scoring::Scoring;
use crate::flex::program::Program;
use crate::kept::Loan;

/// The query heads that share one key/value head, and their outputs, of
/// elements `O` (and each row's log-sum-exp, where the tiled path is asked for
/// it).
pub(crate) struct KvGroup<'o, 'a, A, O = A> {
    pub(crate) b: usize,
    pub(crate) kv: usize,
    pub(crate) outs: &'o mut [ArrayViewMut2<'a, O>],
    pub(crate) lses: Option<&'o mut [ArrayViewMut1<'a, A>]>,
}

/// Computes a head the fused arithmetic cannot stand for: `(b, h, out, lse)`,
/// the log-sum-exp where the call asks for it.
pub(crate) trait Fallback<A, O>:
    Fn(usize, usize, ArrayViewMut2<'_, O>, Option<ArrayViewMut1<'_, A>>)
{
}

impl<A, O, F> Fallback<A, O> for F where
    F: Fn(usize, usize, ArrayViewMut2<'_, O>, Option<ArrayViewMut1<'_, A>>)
{
}

/// Head `h` of batch `b` row by row, or by the reference path if its inputs need it.
pub(crate) fn rowwise_head<A: KernelElement, P: Program<A>>(
    problem: &Problem<'_, A, A, P>,
    b: usize,
    h: usize,
    mut out: ArrayViewMut2<'_, A>,
) {
    let q = problem.query(b, h);
    let (k, v) = problem.keys_values(b, problem.kv_head(h));
    let masks = problem.block_masks(b, h);
    let scoring = Scoring {
        program: problem.program,
        b,
        h,
    };
    let head = HeadRows {
        q,
        k,
        v,
        masks: &masks,
        scale: problem.scale,
    };
    let queries = (extent_of(&q), q.ncols());
    if fusable(queries, &masks, problem.scale, extent_of(&k), extent_of(&v))
        && rowwise::attend_head(head, scoring, out.view_mut())
    {
        report::count(Path::Rowwise, 1);
    } else {
        report::count(Path::Reference, 1);
        problem.solve_head(b, h, Some(out), None);
    }
}

/// Every group by the tiled kernel, with the micro-kernels `kernel` dispatches
/// to (over queries and keys packed as entries `K`, the queries stored as
/// `K::Query`), its outputs written as `O`: packing as
/// many key/value heads at a time as fit in [`PACKED_BYTES`] (but at least one
/// per thread: a head of few query rows is only one task) and running all their
/// blocks in one parallel region; `fallback` computes a head whose inputs the
/// fused arithmetic cannot stand for.
pub(crate) fn tiled<A, KV, K, D, P, O>(
    problem: &Problem<'_, A, KV, P, K::Query>,
    kernel: D,
    groups: &mut [KvGroup<'_, '_, A, O>],
    parallelism: Parallelism,
    fallback: impl Fallback<A, O>,
) where
    A: KernelFloat,
    KV: Sync,
    K: Entry<A, Query: Magnitude<Float = A>>,
    D: Dispatch<A, K>,
    P: Program<A>,
    O: Output<A>,
    for<'v, 'a> PackHead<'v, 'a, KV, K, K::Value>: Op<A, K, Output = PackedHead<A, K>>,
{
    let (s, d, d_v) = (problem.k.dim().2, problem.k.dim().3, problem.v.dim().3);
    let packed_bytes = head_bytes::<A, K>(s.next_multiple_of(BC), d, d_v).max(1);
    let threads = match parallelism {
        Parallelism::Sequential => 1,
        Parallelism::Rayon => rayon::current_num_threads(),
    };
    let per_wave = (PACKED_BYTES / packed_bytes).max(threads);
    report::arch_used(kernel.kind());
    // each wave packs into the memory of the one before (of the call before,
    // for the first), so that its pages are written over, not faulted in
    let mut memory: Loan<Vec<HeadMemory<K, K::Value>>> = Loan::take_or(Vec::new);
    for wave in groups.chunks_mut(per_wave) {
        let missing = wave.len().saturating_sub(memory.len());
        memory.extend((0..missing).map(|_| HeadMemory::default()));
        let pack = |(g, memory): (&KvGroup<'_, '_, A, O>, HeadMemory<K, K::Value>)| {
            let (k, v) = problem.keys_values(g.b, g.kv);
            kernel.dispatch(PackHead {
                k: &k,
                v: &v,
                memory,
            })
        };
        let heads = memory.drain(..wave.len());
        let packed: Vec<PackedHead<A, K>> = match parallelism {
            Parallelism::Sequential => wave.iter().zip(heads).map(pack).collect(),
            Parallelism::Rayon => {
                let heads: Vec<_> = heads.collect();
                wave.par_iter().zip(heads).map(pack).collect()
            }
        };
        attend_wave(problem, kernel, wave, &packed, parallelism, &fallback);
        memory.extend(packed.into_iter().map(PackedHead::into_memory));
    }
}

/// One block of query rows and where its output goes: query head `head` of
/// group `group` of the wave.
struct Task<'a, A, K: Entry<A>, P, O> {
    block: Block<'a, A, K, P>,
    out: ArrayViewMut2<'a, O>,
    lse: Option<ArrayViewMut1<'a, A>>,
    group: usize,
    head: usize,
}

/// Every block of the query heads of one wave of groups, over their key/value
/// heads `packed` (one per group), in one parallel region; a head whose
/// program made a score NaN or `+∞` is then computed again by `fallback`.
fn attend_wave<A, KV, K, D, P, O>(
    problem: &Problem<'_, A, KV, P, K::Query>,
    kernel: D,
    wave: &mut [KvGroup<'_, '_, A, O>],
    packed: &[PackedHead<A, K>],
    parallelism: Parallelism,
    fallback: &impl Fallback<A, O>,
) where
    A: KernelFloat,
    KV: Sync,
    K: Entry<A, Query: Magnitude<Float = A>>,
    D: Dispatch<A, K>,
    P: Program<A>,
    O: Output<A>,
{
    let nr = kernel.dispatch(TileWidth);
    let masks: Vec<Vec<Vec<Mask2<'_, A>>>> = wave
        .iter()
        .map(|g| {
            problem
                .query_heads(g.kv)
                .map(|h| problem.block_masks(g.b, h))
                .collect()
        })
        .collect();
    // each query head's extent, scanned on the pool (which heads the fused
    // kernel takes decides the tasks)
    let heads: Vec<(usize, usize)> = (wave.iter())
        .flat_map(|g| problem.query_heads(g.kv).map(move |h| (g.b, h)))
        .collect();
    let scan = |&(b, h): &(usize, usize)| extent_of(&problem.query(b, h));
    let extents: Vec<Extent<A>> = match parallelism {
        Parallelism::Sequential => heads.iter().map(scan).collect(),
        Parallelism::Rayon => heads.par_iter().map(scan).collect(),
    };
    let mut extents = extents.into_iter();
    let s = problem.k.dim().2;
    let mut tasks = Vec::new();
    let mut fused = 0;
    for (g, ((group, packed), masks)) in wave.iter_mut().zip(packed).zip(&masks).enumerate() {
        let b = group.b;
        let query_heads = problem.query_heads(group.kv);
        let mut lses = group.lses.as_deref_mut().map(|lses| lses.iter_mut());
        for (index, ((h, out), masks)) in query_heads
            .zip(group.outs.iter_mut())
            .zip(masks)
            .enumerate()
        {
            let lse = lses.as_mut().and_then(Iterator::next);
            let q = problem.query(b, h);
            let queries = extents.next().expect("an extent per query head");
            if !fusable(
                (queries, q.ncols()),
                masks,
                problem.scale,
                packed.key_extent,
                packed.value_extent,
            ) {
                report::count(Path::Reference, 1);
                fallback(b, h, out.view_mut(), lse.map(|lse| lse.view_mut()));
                continue;
            }
            fused += 1;
            let l = q.nrows();
            let mut lse_blocks = lse.map(|lse| lse.axis_chunks_iter_mut(Axis(0), BR));
            for (c, chunk) in out.axis_chunks_iter_mut(Axis(0), BR).enumerate() {
                let first_row = c * BR;
                let block = Block {
                    scoring: Scoring {
                        program: problem.program,
                        b,
                        h,
                    },
                    q: q.slice_move(ndarray::s![first_row..first_row + chunk.nrows(), ..]),
                    first_row,
                    l,
                    s,
                    keys: &packed.keys,
                    values: &packed.values,
                    masks,
                    scale: problem.scale,
                };
                tasks.push(Task {
                    block,
                    out: chunk,
                    lse: lse_blocks.as_mut().and_then(Iterator::next),
                    group: g,
                    head: index,
                });
            }
        }
    }
    let (d, col_tiles) = (problem.k.dim().3, problem.v.dim().3.div_ceil(nr));
    let run = |scratch: &mut Scratch<A, K>, task: Task<'_, A, K, P, O>| {
        let block = AttendBlock {
            block: &task.block,
            scratch,
            out: task.out,
            lse: task.lse,
        };
        (!kernel.dispatch(block)).then_some((task.group, task.head))
    };
    let scratch = || Scratch::lent(d, col_tiles, nr);
    let mut bad: Vec<(usize, usize)> = match parallelism {
        Parallelism::Sequential => {
            let mut scratch = scratch();
            tasks
                .into_iter()
                .filter_map(|task| run(&mut scratch, task))
                .collect()
        }
        Parallelism::Rayon => tasks
            .into_par_iter()
            .map_init(scratch, |scratch, task| run(scratch, task))
            .flatten()
            .collect(),
    };
    bad.sort_unstable();
    bad.dedup();
    report::count(Path::Tiled, fused - bad.len());
    report::count(Path::Reference, bad.len());
    for (g, index) in bad {
        let group = &mut wave[g];
        let h = problem.query_heads(group.kv).start + index;
        let lse = group.lses.as_deref_mut().map(|lses| lses[index].view_mut());
        fallback(group.b, h, group.outs[index].view_mut(), lse);
    }
}
