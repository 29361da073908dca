//! How the fused backward runs over the heads of a call and over threads: where
//! each head's gradients go, and where a head falls back to the reference path.

use ndarray::{Array2, Array4, ArrayView2, ArrayView4, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use super::arch::{Arch, Dispatch, KernelArch, KernelElement};
use super::backward::{
    BlockScratch, HeadInputs, HeadPanels, HeadRest, HeadTargets, Part, Pass, Upstream,
};
use super::fusable::{extent_of, fusable};
use super::ops::{BackwardHead, PackBackward, TileWidth};
use super::options::Parallelism;
use super::params::{BACKWARD_PARTS, BACKWARD_QUERIES as BQ};
use super::report::{self, Path};
use crate::core::backward::{Gradients, HeadBackward, add_bias_gradient};
use crate::core::problem::Problem;
use crate::core::reference::SavedView;
use crate::core::scoring::Scoring;
use crate::flex::program::Program;

/// The memory a thread runs heads in, kept from head to head: a head's keys and
/// values packed, and its query blocks' working memory.
struct Work<A, X: Pass<A>> {
    panels: X::Panels,
    scratch: X::Scratch,
}

/// The backward on the register tiles of the instruction set, in the compute
/// type.
impl<A: KernelElement> Pass<A> for Arch {
    type Panels = HeadPanels<A>;
    type Scratch = BlockScratch<A>;

    fn kind(self) -> KernelArch {
        Dispatch::<A>::kind(self)
    }

    fn panels(self) -> HeadPanels<A> {
        HeadPanels::new(Dispatch::<A>::dispatch(self, TileWidth))
    }

    fn scratch(self, _: usize, d_v: usize) -> BlockScratch<A> {
        BlockScratch::new(d_v, Dispatch::<A>::dispatch(self, TileWidth))
    }

    fn pack(
        self,
        panels: &mut HeadPanels<A>,
        k: ArrayView2<'_, A>,
        v: ArrayView2<'_, A>,
        forward: bool,
    ) {
        self.dispatch(PackBackward {
            panels,
            k,
            v,
            forward,
        });
    }

    fn head<P: Program<A>>(
        self,
        inputs: &HeadInputs<'_, '_, A, P>,
        upstream: Upstream<'_, A>,
        (panels, scratch): (&HeadPanels<A>, &mut BlockScratch<A>),
        part: Part,
        out: HeadTargets<'_, A>,
    ) -> Option<HeadRest<A>> {
        self.dispatch(BackwardHead {
            inputs,
            upstream,
            panels,
            scratch,
            part,
            out,
        })
    }
}

/// One query head's gradients, or one part's: `dq` (the part's blocks' rows,
/// one after another), `dk` and `dv` in arrays of their own, each `None` where
/// the pass added it into the call's.
struct HeadGradients<A> {
    dq: Option<Array2<A>>,
    dk: Option<Array2<A>>,
    dv: Option<Array2<A>>,
    rest: HeadRest<A>,
}

/// Which of a head's gradients it adds straight into the call's: its rows of
/// `dQ` unless its query blocks are dealt to parts, and its key/value head's
/// `dK` and `dV` unless other query heads share them (those are summed in head
/// order).
#[derive(Clone, Copy)]
struct Written {
    queries: bool,
    keys: bool,
}

/// The call's rows a head adds into, as [`Written`] says.
struct CallRows<'g, A> {
    dq: Option<ArrayViewMut2<'g, A>>,
    keys: Option<(ArrayViewMut2<'g, A>, ArrayViewMut2<'g, A>)>,
}

/// The gradients of every head of `problem` given `d_out`, `(batch, heads, L, d_v)`,
/// and the forward's output and log-sum-exp if it kept them, by the fused backward
/// pass; heads whose inputs need it by the reference path. A head adds straight
/// into the call's gradients where it is the only one to ([`Written`]); what
/// several add to is summed in a fixed order (a call of one head deals its query
/// blocks to [`BACKWARD_PARTS`] tasks, summed in part order), so the result does
/// not depend on the number of threads.
pub(crate) fn backward<A: KernelElement, P: Program<A>, X: Pass<A>>(
    problem: &Problem<'_, A, A, P>,
    pass: X,
    d_out: ArrayView4<'_, A>,
    saved: Option<SavedView<'_, A>>,
    parallelism: Parallelism,
) -> Gradients<A> {
    let (batch, heads, l, _) = problem.q.dim();
    if problem.v.dim().3 == 0 {
        // values of no width: no output, so every gradient is zero, but for
        // non-finite inputs, whose NaN the reference path defines (cheap here)
        report::count(Path::Reference, batch * heads);
        return problem.backward(d_out, saved);
    }
    let upstream = |b: usize, h: usize| Upstream {
        d_out: d_out.index_axis(Axis(0), b).index_axis_move(Axis(0), h),
        saved: saved.map(|saved| saved.head(b, h)),
    };
    // the parts depend on the shapes only
    let parts = match batch * heads {
        1 => l.div_ceil(BQ).clamp(1, BACKWARD_PARTS),
        _ => 1,
    };
    let written = Written {
        queries: parts == 1,
        keys: parts == 1 && problem.group_size() == 1,
    };
    let (d, d_v) = (problem.q.dim().3, problem.v.dim().3);
    let work = || Work::<A, X> {
        panels: pass.panels(),
        scratch: pass.scratch(d, d_v),
    };
    report::arch_used(pass.kind());
    let mut grads = Gradients::zeros(problem);
    let run = |work: &mut Work<A, X>, (head, into): (usize, CallRows<'_, A>)| {
        let (b, h) = (head / heads, head % heads);
        let task = Task {
            problem,
            pass,
            b,
            h,
            upstream: upstream(b, h),
        };
        task.run(work, parts, parallelism, into)
    };
    let rows = rows_of_heads(&mut grads, written);
    let per_head: Vec<Option<Vec<HeadGradients<A>>>> = match parallelism {
        Parallelism::Sequential => {
            let mut work = work();
            let tasks = rows.into_iter().enumerate();
            tasks.map(|task| run(&mut work, task)).collect()
        }
        Parallelism::Rayon => rows
            .into_par_iter()
            .enumerate()
            .map_init(work, run)
            .collect(),
    };
    for (head, fused) in per_head.into_iter().enumerate() {
        let (b, h) = (head / heads, head % heads);
        let path = match fused {
            Some(_) => Path::FusedBackward,
            None => Path::Reference,
        };
        report::count(path, 1);
        let parts = fused.unwrap_or_else(|| {
            clear(&mut grads, problem, (b, h), written);
            vec![reference_head(problem, b, h, upstream(b, h))]
        });
        add_parts(&mut grads, problem, (b, h), parts);
    }
    grads
}

/// Each head's rows of the call's `dQ`, `dK` and `dV` that it adds into
/// ([`Written`]), in head order (batch row by batch row).
fn rows_of_heads<A>(grads: &mut Gradients<A>, written: Written) -> Vec<CallRows<'_, A>> {
    fn heads<A>(x: &mut Array4<A>) -> impl Iterator<Item = ArrayViewMut2<'_, A>> {
        x.view_mut()
            .into_outer_iter_mut()
            .flat_map(|batch_row| batch_row.into_outer_iter_mut())
    }
    let Gradients { dq, dk, dv, .. } = grads;
    // (`keys` written only where there are as many key/value heads as queries')
    let mut keys = heads(dk).zip(heads(dv));
    heads(dq)
        .map(|dq| CallRows {
            dq: written.queries.then_some(dq),
            keys: written.keys.then(|| keys.next()).flatten(),
        })
        .collect()
}

/// Clears the `dK` and `dV` head `h` of batch row `b` added into the call's
/// before its program failed (its `dQ` rows the reference path's overwrite).
fn clear<A: KernelElement, P>(
    grads: &mut Gradients<A>,
    problem: &Problem<'_, A, A, P>,
    (b, h): (usize, usize),
    written: Written,
) {
    if written.keys {
        let kv = problem.kv_head(h);
        grads.dk.slice_mut(s![b, kv, .., ..]).fill(A::zero());
        grads.dv.slice_mut(s![b, kv, .., ..]).fill(A::zero());
    }
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
        if let Some(dq) = part.dq {
            let blocks = Part { index, count }.blocks(l);
            for (rows, dq) in blocks.zip(dq.axis_chunks_iter(Axis(0), BQ)) {
                grads.dq.slice_mut(s![b, h, rows, ..]).assign(&dq);
            }
        }
        for (total, x) in [(&mut grads.dk, part.dk), (&mut grads.dv, part.dv)] {
            if let Some(x) = x {
                let mut total = total.slice_mut(s![b, kv, .., ..]);
                total.zip_mut_with(&x, |a, &x| *a += x);
            }
        }
        for (m, bias) in part.rest.bias.iter().enumerate() {
            let mut target = problem.bias_gradient_of(&mut grads.bias, m, b, h);
            target.zip_mut_with(bias, |a, &x| *a += x);
        }
        grads.add_program(h, &part.rest.score, part.rest.sink);
    }
}

/// One head of a call for the fused pass.
struct Task<'t, 'p, 'u, A, P, X> {
    problem: &'t Problem<'p, A, A, P>,
    pass: X,
    b: usize,
    h: usize,
    upstream: Upstream<'u, A>,
}

impl<A: KernelElement, P: Program<A>, X: Pass<A>> Task<'_, '_, '_, A, P, X> {
    /// The head by the fused pass, into the call's rows `into` where given and
    /// arrays of its own for the rest; its query blocks dealt to `parts` tasks
    /// (which then take none of `into`): one after another in `work`'s memory,
    /// or on the pool, each thread with working memory of its own. `None`
    /// where its inputs or its program need the reference path.
    fn run(
        self,
        work: &mut Work<A, X>,
        parts: usize,
        parallelism: Parallelism,
        into: CallRows<'_, A>,
    ) -> Option<Vec<HeadGradients<A>>> {
        let Task {
            problem,
            pass,
            b,
            h,
            upstream,
        } = self;
        let (l, d) = (problem.q.dim().2, problem.q.dim().3);
        let (s, d_v) = (problem.k.dim().2, problem.v.dim().3);
        let Work { panels, scratch } = work;
        fused_head(problem, pass, (b, h), upstream, panels, |inputs, panels| {
            let part = |scratch: &mut X::Scratch, index: usize, into: CallRows<'_, A>| {
                let part = Part {
                    index,
                    count: parts,
                };
                let rows = part.blocks(l).map(|rows| rows.len()).sum();
                let (mut own_dq, mut own_keys) = (None, None);
                let dq = match into.dq {
                    Some(dq) => dq,
                    None => own_dq.insert(Array2::zeros((rows, d))).view_mut(),
                };
                let (dk, dv) = match into.keys {
                    Some(keys) => keys,
                    None => {
                        let (dk, dv) =
                            own_keys.insert((Array2::zeros((s, d)), Array2::zeros((s, d_v))));
                        (dk.view_mut(), dv.view_mut())
                    }
                };
                let out = HeadTargets { dq, dk, dv };
                let rest = pass.head(inputs, upstream, (panels, scratch), part, out)?;
                let (dk, dv) = own_keys.unzip();
                Some(HeadGradients {
                    dq: own_dq,
                    dk,
                    dv,
                    rest,
                })
            };
            if parts == 1 {
                return part(scratch, 0, into).map(|head| vec![head]);
            }
            let none = || CallRows {
                dq: None,
                keys: None,
            };
            match parallelism {
                Parallelism::Sequential => (0..parts)
                    .map(|index| part(scratch, index, none()))
                    .collect(),
                Parallelism::Rayon => (0..parts)
                    .into_par_iter()
                    .map_init(
                        || pass.scratch(d, d_v),
                        |scratch, index| part(scratch, index, none()),
                    )
                    .collect(),
            }
        })
    }
}

/// Runs `run` on head `h` of batch row `b` with its keys and values packed
/// into `panels`; `None` where its inputs or `upstream` need the reference
/// path (or `run` says its program does).
fn fused_head<A: KernelElement, P: Program<A>, X: Pass<A>, R>(
    problem: &Problem<'_, A, A, P>,
    pass: X,
    (b, h): (usize, usize),
    upstream: Upstream<'_, A>,
    panels: &mut X::Panels,
    run: impl FnOnce(&HeadInputs<'_, '_, A, P>, &X::Panels) -> Option<R>,
) -> Option<R> {
    let q = problem.query(b, h);
    let (k, v) = problem.keys_values(b, problem.kv_head(h));
    let masks = problem.block_masks(b, h);
    let finite = extent_of(&upstream.d_out).finite;
    let queries = (extent_of(&q), q.ncols());
    if !(finite && fusable(queries, &masks, problem.scale, extent_of(&k), extent_of(&v))) {
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
    pass.pack(panels, k, v, forward);
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
        dq: Some(dq),
        dk: Some(dk),
        dv: Some(dv),
        rest: HeadRest { bias, score, sink },
    }
}
