//! The readable reference path: the `L × S` scores, their row-wise softmax, then
//! the product with `V`. It defines what every input does (masks, `−∞`, NaN,
//! empty sizes); the fused kernels are checked against it and fall back to it.

use ndarray::{
    Array1, Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut1,
    ArrayViewMut2, ArrayViewMut4, s,
};

use super::mask::{self, Mask2};
use super::problem::Problem;
use super::scoring::Scoring;
use super::softmax::{softmax_in_place, softmax_rows, softmax_with_sink_in_place};
use crate::element::Element;
use crate::flex::blocks::BlockClass;
use crate::flex::program::Program;

/// What a forward pass keeps for the backward: its output `(batch, heads, L, d_v)`
/// and each row's log-sum-exp `(batch, heads, L)` (`−∞` for a row that sees no key).
pub(crate) struct Saved<A> {
    pub(crate) output: Array4<A>,
    pub(crate) lse: Array3<A>,
}

impl<A: Element> Saved<A> {
    /// Zeros for every head of `problem`.
    pub(crate) fn zeros<KV, P, Q>(problem: &Problem<'_, A, KV, P, Q>) -> Self {
        let (batch, heads, l, _) = problem.q.dim();
        Saved {
            output: Array4::zeros((batch, heads, l, problem.v.dim().3)),
            lse: Array3::zeros((batch, heads, l)),
        }
    }

    /// Each head's output and its rows' log-sum-exps, head by head of batch
    /// by batch.
    pub(crate) fn per_head(&mut self) -> (Vec<ArrayViewMut2<'_, A>>, Vec<ArrayViewMut1<'_, A>>) {
        let outs = (self.output.outer_iter_mut())
            .flat_map(|heads| heads.into_outer_iter_mut())
            .collect();
        let lses = (self.lse.outer_iter_mut())
            .flat_map(|heads| heads.into_outer_iter_mut())
            .collect();
        (outs, lses)
    }
}

/// A kept forward as the backward reads it, borrowed: `output: (batch, heads,
/// L, d_v)`, `lse: (batch, heads, L)`.
#[derive(Clone, Copy)]
pub(crate) struct SavedView<'a, A> {
    pub(crate) output: ArrayView4<'a, A>,
    pub(crate) lse: ArrayView3<'a, A>,
}

impl<'a, A> SavedView<'a, A> {
    /// Head `h` of batch `b`: its output and each row's log-sum-exp.
    pub(crate) fn head(self, b: usize, h: usize) -> (ArrayView2<'a, A>, ArrayView1<'a, A>) {
        (
            self.output.slice_move(s![b, h, .., ..]),
            self.lse.slice_move(s![b, h, ..]),
        )
    }
}

/// One head's scaled, masked scores and their weights.
pub(crate) struct Head<A> {
    /// `QKᵀ·scale`, modified by the program's score modification, plus
    /// biases, `−∞` where masked: `(L, S)`.
    pub(crate) scaled: Array2<A>,
    /// `softmax(scaled)`, row-wise: `(L, S)`.
    pub(crate) weights: Array2<A>,
    /// The sink's weight in each row's softmax (empty without a sink).
    pub(crate) sink_weights: Vec<A>,
}

impl<A: Element, P: Program<A>> Problem<'_, A, A, P> {
    /// Writes the output and/or weights of every `(batch, head)` block.
    pub(crate) fn solve(
        &self,
        mut output: Option<ArrayViewMut4<'_, A>>,
        mut weights: Option<ArrayViewMut4<'_, A>>,
    ) {
        let (batch, heads, _, _) = self.q.dim();
        for b in 0..batch {
            for h in 0..heads {
                self.solve_head(
                    b,
                    h,
                    output.as_mut().map(|o| o.slice_mut(s![b, h, .., ..])),
                    weights.as_mut().map(|w| w.slice_mut(s![b, h, .., ..])),
                );
            }
        }
    }

    /// Head `h` of batch `b`: writes its output and/or weights.
    pub(crate) fn solve_head(
        &self,
        b: usize,
        h: usize,
        output: Option<ArrayViewMut2<'_, A>>,
        weights: Option<ArrayViewMut2<'_, A>>,
    ) {
        let (k, v) = self.keys_values(b, self.kv_head(h));
        let head = self.attend_head(b, h, self.query(b, h), k);
        if let Some(mut output) = output {
            output.assign(&weighted_values(&head, v));
        }
        if let Some(mut weights) = weights {
            weights.assign(&head.weights);
        }
    }
}

impl<A: Element, KV, P: Program<A>, Q> Problem<'_, A, KV, P, Q> {
    /// Head `h` of batch `b`, queries `q`, against keys `k` (the head's own,
    /// perhaps widened).
    pub(crate) fn attend_head(
        &self,
        b: usize,
        h: usize,
        q: ArrayView2<'_, A>,
        k: ArrayView2<'_, A>,
    ) -> Head<A> {
        let scoring = Scoring {
            program: self.program,
            b,
            h,
        };
        attend_head(q, k, self.scale, &self.block_masks(b, h), scoring)
    }

    /// [`forward_lse_head`](Problem::forward_lse_head) of queries `q` against
    /// keys `k` and values `v` (the head's own, perhaps widened).
    pub(crate) fn lse_head(
        &self,
        b: usize,
        h: usize,
        q: ArrayView2<'_, A>,
        k: ArrayView2<'_, A>,
        v: ArrayView2<'_, A>,
    ) -> (Array2<A>, Array1<A>) {
        let head = self.attend_head(b, h, q, k);
        let sink = self.program.sink(h);
        let lse = head.scaled.rows().into_iter().map(|row| {
            let max = row.fold(
                A::neg_infinity(),
                |m, &x| if x > m || x.is_nan() { x } else { m },
            );
            let max = match sink {
                Some(sink) if !max.is_nan() => max.max(sink),
                _ => max,
            };
            if max == A::neg_infinity() || !max.is_finite() {
                return max;
            }
            let sink = sink.map_or(A::zero(), |sink| (sink - max).exp());
            max + row.fold(sink, |t, &x| t + (x - max).exp()).ln()
        });
        (weighted_values(&head, v), lse.collect())
    }
}

impl<A: Element, P: Program<A>> Problem<'_, A, A, P> {
    /// Every head's output and log-sum-exp per row, by the reference path.
    pub(crate) fn forward_lse(&self) -> Saved<A> {
        let (batch, heads, _, _) = self.q.dim();
        let mut saved = Saved::zeros(self);
        for b in 0..batch {
            for h in 0..heads {
                let (output, lse) = self.forward_lse_head(b, h);
                saved.output.slice_mut(s![b, h, .., ..]).assign(&output);
                saved.lse.slice_mut(s![b, h, ..]).assign(&lse);
            }
        }
        saved
    }

    /// Head `h` of batch `b`: its output and each row's log-sum-exp of the scaled,
    /// masked scores (`−∞` for a row that sees no key, NaN where a score is).
    pub(crate) fn forward_lse_head(&self, b: usize, h: usize) -> (Array2<A>, Array1<A>) {
        let (k, v) = self.keys_values(b, self.kv_head(h));
        self.lse_head(b, h, self.query(b, h), k, v)
    }
}

/// Scaled, modified, masked scores and weights of one head.
pub(crate) fn attend_head<A: Element, P: Program<A>>(
    q: ArrayView2<'_, A>,
    k: ArrayView2<'_, A>,
    scale: A,
    masks: &[Mask2<'_, A>],
    scoring: Scoring<'_, P>,
) -> Head<A> {
    // Scaling Q before the product keeps QKᵀ finite for huge inputs whose scaled
    // scores are finite.
    let mut scaled = q.mapv(|x| x * scale).dot(&k.t());
    if P::PLAIN {
        mask::apply(masks, &mut scaled);
        let weights = softmax_rows(&scaled);
        let sink_weights = Vec::new();
        return Head {
            scaled,
            weights,
            sink_weights,
        };
    }
    let (l, s) = scaled.dim();
    for (i, mut row) in scaled.rows_mut().into_iter().enumerate() {
        let mut scores = row.to_vec();
        scoring.prepare_row(masks, i, l, s, 0, &mut scores, BlockClass::Partial);
        row.iter_mut().zip(scores).for_each(|(x, y)| *x = y);
    }
    let mut weights = scaled.clone();
    let mut sink_weights = Vec::new();
    for mut row in weights.rows_mut() {
        match scoring.sink() {
            Some(sink) => sink_weights.push(softmax_with_sink_in_place(&mut row, sink)),
            None => softmax_in_place(&mut row),
        }
    }
    Head {
        scaled,
        weights,
        sink_weights,
    }
}

/// `weights · V`, where positions with a `−∞` score are never read.
pub(crate) fn weighted_values<A: Element>(head: &Head<A>, v: ArrayView2<'_, A>) -> Array2<A> {
    masked_product(head.weights.view(), v, |i, j| {
        head.scaled[[i, j]] != A::neg_infinity()
    })
}

/// `coeffs · rows`, where the coefficient `(i, j)` is 0 unless `attended(i, j)`,
/// and row `j` of `rows` is then never read.
///
/// The matrix product is exact whenever `rows` is finite. A result row that
/// comes out non-finite is summed again over its attended positions only, so a
/// NaN or infinity in a masked-out row cannot leak in through `0 · NaN`.
pub(crate) fn masked_product<A: Element>(
    coeffs: ArrayView2<'_, A>,
    rows: ArrayView2<'_, A>,
    attended: impl Fn(usize, usize) -> bool,
) -> Array2<A> {
    let mut output = coeffs.dot(&rows);
    for (i, mut out) in output.rows_mut().into_iter().enumerate() {
        if out.iter().all(|x| x.is_finite()) {
            continue;
        }
        out.fill(A::zero());
        for (j, row) in rows.rows().into_iter().enumerate() {
            if attended(i, j) {
                out.scaled_add(coeffs[[i, j]], &row);
            }
        }
    }
    output
}
