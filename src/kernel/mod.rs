//! The fused CPU kernel: attention without the `L × S` score matrix.
//!
//! For each `(batch, key/value head)` the keys and values are packed once; the
//! query heads that share them are cut into blocks of rows, and the blocks run
//! in parallel, each streaming over the keys with an online softmax
//! ([`tiled`]). Heads with only a few query rows (decoding against a cache) read
//! the keys and values where they lie ([`direct`]); problems too small for any of
//! that go one row at a time ([`rowwise`]). Inputs that are not finite, or large enough that a score could
//! overflow, take the reference path, which defines what happens then.

mod direct;
mod dispatch;
mod float;
mod rowwise;
mod tiled;

use ndarray::{s, ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis};
use rayon::prelude::*;

pub(crate) use dispatch::Dispatch;
use tiled::{extent_of, Block, Extent, PackedKeys, PackedValues, Scratch, BR};

use crate::mask::Mask2;
use crate::sdpa::Problem;
use crate::Element;

/// Which implementation computes attention's output.
///
/// # Examples
///
/// ```
/// use attn::{Kernel, ScaledDotProduct};
/// use ndarray::Array2;
///
/// let x = Array2::from_shape_fn((300, 64), |(i, j)| ((i * 31 + j * 17) % 13) as f32 / 13.0);
/// let fused = ScaledDotProduct::new().with_kernel(Kernel::Fused).forward(&x, &x, &x)?;
/// let plain = ScaledDotProduct::new().with_kernel(Kernel::Plain).forward(&x, &x, &x)?;
/// let diff = (&fused - &plain).iter().fold(0.0_f32, |m, d| m.max(d.abs()));
/// assert!(diff < 1e-5);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// The fused kernel (default): tiled; for heads of at most eight query rows
    /// (decoding), direct over the unpacked keys and values; row by row for tiny
    /// problems.
    #[default]
    Auto,
    /// The readable reference path: the score matrix, its softmax, then the product.
    Plain,
    /// The tiled fused kernel at every size.
    Fused,
}

/// Whether the fused kernel spreads its work over threads.
///
/// # Examples
///
/// ```
/// use attn::{Parallelism, ScaledDotProduct};
/// use ndarray::Array2;
///
/// let x = Array2::<f64>::ones((256, 32));
/// let one_thread = ScaledDotProduct::new().with_parallelism(Parallelism::Sequential);
/// assert_eq!(one_thread.forward(&x, &x, &x)?, ScaledDotProduct::new().forward(&x, &x, &x)?);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// On the calling thread only.
    Sequential,
    /// Blocks of query rows over the current rayon thread pool (default): the global
    /// pool, sized by `RAYON_NUM_THREADS` or the number of cores, or the pool of a
    /// surrounding `ThreadPool::install`.
    #[default]
    Rayon,
}

/// Problems with at most this many `L·S·(d_k + d_v)` per head go row by row.
const TINY: usize = 1 << 14;
/// Heads with at most this many query rows take the direct path: packing the keys
/// and values would cost as much as attending to them.
const FEW_ROWS: usize = 8;

/// Writes attention's output for every head of `problem` into `out`, which is
/// `(batch, heads, L, d_v)` in standard layout.
pub(crate) fn forward<A: Element>(
    problem: &Problem<'_, A>,
    out: ArrayViewMut4<'_, A>,
    kernel: Kernel,
    parallelism: Parallelism,
) {
    let (batch, heads, l, d) = problem.q.dim();
    let (_, kv_heads, s, _) = problem.k.dim();
    let d_v = problem.v.dim().3;
    if kernel == Kernel::Plain || !out.is_standard_layout() {
        problem.solve(Some(out), None);
        return;
    }
    if batch * heads * l * d_v == 0 {
        return;
    }
    let tiny = kernel == Kernel::Auto && l * s * (d + d_v) <= TINY;
    let direct = kernel == Kernel::Auto && l <= FEW_ROWS;
    if tiny && batch * heads == 1 {
        // one small head, the common 2-D call: no bookkeeping at all
        let out = out.index_axis_move(Axis(0), 0).index_axis_move(Axis(0), 0);
        attend_rowwise_head(problem, 0, 0, out);
        return;
    }
    let Ok(mut flat) = out.into_shape_with_order((batch * heads, l, d_v)) else {
        debug_assert!(false, "a standard-layout array reshapes");
        return;
    };
    let mut head_outs: Vec<ArrayViewMut2<'_, A>> = flat.outer_iter_mut().collect();
    // the query heads sharing key/value head (b, kv) are chunk b·kv_heads + kv
    let group = heads / kv_heads;
    let mut groups: Vec<KvGroup<'_, '_, A>> = head_outs
        .chunks_mut(group)
        .enumerate()
        .map(|(i, outs)| KvGroup {
            b: i / kv_heads,
            kv: i % kv_heads,
            outs,
        })
        .collect();
    if tiny {
        for g in &mut groups {
            for (h, out) in g.query_heads().zip(g.outs.iter_mut()) {
                attend_rowwise_head(problem, g.b, h, out.view_mut());
            }
        }
        return;
    }
    if direct {
        attend_direct(problem, &mut groups, parallelism);
        return;
    }
    // pack as many key/value heads at a time as fit in PACKED_BYTES, and run all
    // their blocks in one parallel region
    let packed_bytes =
        (s.div_ceil(tiled::BC) * tiled::BC * (d + d_v)).max(1) * std::mem::size_of::<A>();
    // but at least one per thread: a head of few query rows is only one task
    let threads = match parallelism {
        Parallelism::Sequential => 1,
        Parallelism::Rayon => rayon::current_num_threads(),
    };
    let per_wave = (PACKED_BYTES / packed_bytes).max(threads);
    for wave in groups.chunks_mut(per_wave) {
        attend_tiled(problem, wave, parallelism);
    }
}

/// Extra memory the tiled kernel may use for packed keys and values at once (or
/// one key/value head per thread, if more).
const PACKED_BYTES: usize = 1 << 20;

/// The query heads that share one key/value head, and their outputs.
struct KvGroup<'o, 'a, A> {
    b: usize,
    kv: usize,
    outs: &'o mut [ArrayViewMut2<'a, A>],
}

impl<A> KvGroup<'_, '_, A> {
    fn query_heads(&self) -> std::ops::Range<usize> {
        self.kv * self.outs.len()..(self.kv + 1) * self.outs.len()
    }
}

/// Head `h` of batch `b` row by row, or by the reference path if its inputs need it.
fn attend_rowwise_head<A: Element>(
    problem: &Problem<'_, A>,
    b: usize,
    h: usize,
    out: ArrayViewMut2<'_, A>,
) {
    let kv = h / (problem.q.dim().1 / problem.k.dim().1);
    let (q, k, v) = (
        head_view(&problem.q, b, h),
        head_view(&problem.k, b, kv),
        head_view(&problem.v, b, kv),
    );
    let masks = problem.block_masks(b, h);
    if fusable(&q, &masks, problem.scale, extent_of(&k), extent_of(&v)) {
        rowwise::attend_head(q, k, v, &masks, problem.scale, out);
    } else {
        problem.solve_head(b, h, Some(out), None);
    }
}

/// Every group by the direct path, its keys cut into parts of [`direct::PART`]
/// that run in parallel; heads whose inputs need it then by the reference path.
fn attend_direct<A: Element>(
    problem: &Problem<'_, A>,
    groups: &mut [KvGroup<'_, '_, A>],
    parallelism: Parallelism,
) {
    let s = problem.k.dim().2;
    let d_v = problem.v.dim().3;
    let inputs: Vec<DirectInputs<'_, A>> = groups
        .iter()
        .map(|g| {
            let heads = g.query_heads();
            let (k, v) = (
                head_view(&problem.k, g.b, g.kv),
                head_view(&problem.v, g.b, g.kv),
            );
            DirectInputs {
                queries: heads
                    .clone()
                    .map(|h| head_view(&problem.q, g.b, h))
                    .collect(),
                masks: heads.map(|h| problem.block_masks(g.b, h)).collect(),
                keys: standard(k),
                values: standard(v),
            }
        })
        .collect();
    let parts = s.div_ceil(direct::PART); // S ≥ 1: smaller problems went row by row
    let run = |task: usize| {
        let (inputs, part) = (&inputs[task / parts], task % parts);
        let (Some(keys), Some(values)) = (inputs.keys.as_slice(), inputs.values.as_slice()) else {
            unreachable!("standard-layout arrays are slices")
        };
        let group = direct::Group {
            queries: &inputs.queries,
            masks: &inputs.masks,
            keys,
            values,
            s,
            d_v,
            scale: problem.scale,
        };
        let first = part * direct::PART;
        A::attend_part(&group, first..(first + direct::PART).min(s))
    };
    let tasks = 0..groups.len() * parts;
    let partials: Vec<direct::Partial<A>> = match parallelism {
        Parallelism::Sequential => tasks.map(run).collect(),
        Parallelism::Rayon => tasks.into_par_iter().map(run).collect(),
    };
    for (g, partials) in groups.iter_mut().zip(partials.chunks(parts)) {
        let first_head = g.query_heads().start;
        for h in direct::finish(partials, g.outs) {
            problem.solve_head(g.b, first_head + h, Some(g.outs[h].view_mut()), None);
        }
    }
}

/// `x` itself if it is in standard layout, else a standard-layout copy.
fn standard<A: Clone>(x: ArrayView2<'_, A>) -> ndarray::CowArray<'_, A, ndarray::Ix2> {
    if x.is_standard_layout() {
        x.into()
    } else {
        x.as_standard_layout().into_owned().into()
    }
}

/// One group's inputs to the direct path, keys and values in standard layout.
struct DirectInputs<'p, A> {
    queries: Vec<ArrayView2<'p, A>>,
    masks: Vec<Vec<Mask2<'p, A>>>,
    keys: ndarray::CowArray<'p, A, ndarray::Ix2>,
    values: ndarray::CowArray<'p, A, ndarray::Ix2>,
}

/// One block of query rows and where its output goes.
struct Task<'a, A> {
    block: Block<'a, A>,
    out: ArrayViewMut2<'a, A>,
}

/// Head `h` of batch `b`.
fn head_view<'a, A>(x: &ArrayView4<'a, A>, b: usize, h: usize) -> ArrayView2<'a, A> {
    (*x).index_axis_move(Axis(0), b).index_axis_move(Axis(0), h)
}

/// Packed keys and values of one key/value head.
struct Packed<A> {
    keys: PackedKeys<A>,
    values: PackedValues<A>,
    key_extent: Extent<A>,
    value_extent: Extent<A>,
}

fn attend_tiled<A: Element>(
    problem: &Problem<'_, A>,
    wave: &mut [KvGroup<'_, '_, A>],
    parallelism: Parallelism,
) {
    let nr = A::tile_width();
    let pack = |g: &KvGroup<'_, '_, A>| {
        let (k, v) = (
            problem.k.slice(s![g.b, g.kv, .., ..]),
            problem.v.slice(s![g.b, g.kv, .., ..]),
        );
        let (keys, key_extent) = PackedKeys::pack(&k, nr);
        let (values, value_extent) = PackedValues::pack(&v, nr);
        Packed {
            keys,
            values,
            key_extent,
            value_extent,
        }
    };
    let packed: Vec<Packed<A>> = match parallelism {
        Parallelism::Sequential => wave.iter().map(pack).collect(),
        Parallelism::Rayon => wave.par_iter().map(pack).collect(),
    };
    let masks: Vec<Vec<Vec<Mask2<'_, A>>>> = wave
        .iter()
        .map(|g| {
            g.query_heads()
                .map(|h| problem.block_masks(g.b, h))
                .collect()
        })
        .collect();
    let (s, d) = (problem.k.dim().2, problem.k.dim().3);
    let mut tasks = Vec::new();
    for ((group, packed), masks) in wave.iter_mut().zip(&packed).zip(&masks) {
        let b = group.b;
        let query_heads = group.query_heads();
        for ((h, out), masks) in query_heads.zip(group.outs.iter_mut()).zip(masks) {
            let q = head_view(&problem.q, b, h);
            if !fusable(
                &q,
                masks,
                problem.scale,
                packed.key_extent,
                packed.value_extent,
            ) {
                problem.solve_head(b, h, Some(out.view_mut()), None);
                continue;
            }
            let l = q.nrows();
            for (c, chunk) in out.axis_chunks_iter_mut(Axis(0), BR).enumerate() {
                let first_row = c * BR;
                let block = Block {
                    q: q.slice_move(s![first_row..first_row + chunk.nrows(), ..]),
                    first_row,
                    l,
                    s,
                    keys: &packed.keys,
                    values: &packed.values,
                    masks,
                    scale: problem.scale,
                };
                tasks.push(Task { block, out: chunk });
            }
        }
    }
    let col_tiles = problem.v.dim().3.div_ceil(nr);
    match parallelism {
        Parallelism::Sequential => {
            let mut scratch = Scratch::new(d, col_tiles, nr);
            for task in tasks {
                A::attend_block(&task.block, &mut scratch, task.out);
            }
        }
        Parallelism::Rayon => tasks.into_par_iter().for_each_init(
            || Scratch::new(d, col_tiles, nr),
            |scratch, task| A::attend_block(&task.block, scratch, task.out),
        ),
    }
}

/// Whether the fused kernels compute this head exactly as the reference path
/// would: every input finite, no bias of NaN or `+∞`, and no score or running
/// sum that could overflow.
fn fusable<A: Element>(
    q: &ArrayView2<'_, A>,
    masks: &[Mask2<'_, A>],
    scale: A,
    keys: Extent<A>,
    values: Extent<A>,
) -> bool {
    let queries = extent_of(q);
    if !(queries.finite && keys.finite && values.finite) {
        return false;
    }
    let f = |x: A| x.to_f64().unwrap_or(f64::INFINITY);
    let limit = f(A::max_value()) / 4.0;
    let score_bound = q.ncols() as f64 * f(queries.max_abs) * f(scale.abs()) * f(keys.max_abs);
    let mut bias_bound = 0.0_f64;
    for mask in masks {
        match mask {
            Mask2::Bias(bias) => {
                for &x in bias.iter() {
                    if x.is_nan() || x == A::infinity() {
                        return false;
                    }
                    if x.is_finite() {
                        bias_bound = bias_bound.max(f(x.abs()));
                    }
                }
            }
            Mask2::Alibi(slope) => {
                if !slope.is_finite() {
                    return false;
                }
                bias_bound += f(slope.abs()) * q.nrows().max(values.rows) as f64;
            }
            _ => {}
        }
    }
    score_bound + bias_bound < limit && f(values.max_abs) * values.rows as f64 <= limit
}
