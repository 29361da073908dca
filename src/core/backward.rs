//! The readable reference backward pass: the gradients of a loss through
//! attention, given `∂loss/∂output`, with the `L × S` weights of one head in
//! memory at a time. The fused backward kernel is checked against it.
//!
//! With `S = QKᵀ·scale + bias` (masked to `−∞`), `P = softmax(S)` row-wise and
//! `O = P·V`:
//!
//! - `dV = Pᵀ·dO`
//! - `dP = dO·Vᵀ`, `Dᵢ = Σⱼ Pᵢⱼ·dPᵢⱼ` (= `dOᵢ·Oᵢ`)
//! - `dS = P ∘ (dP − D)`, 0 wherever a mask excludes the position
//! - `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`
//!
//! A query that sees no key has `P = 0`: its gradients are 0 and it adds nothing
//! to `dK` and `dV`. With grouped-query heads, `dK` and `dV` of a key/value head
//! are summed over the query heads that share it.
//!
//! Under a program: a score modification `f` makes the scores `f(QKᵀ·scale)`,
//! so `dQ` and `dK` take `dS ∘ f′` and `f`'s parameters `Σ dS·∂f/∂θ`; a sink
//! logit `σ` of weight `pσ = exp(σ − lse)` per row has the gradient
//! `−Σᵢ pσᵢ·Dᵢ` (it has no value, so `dP` is 0 there).

use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut2, Axis, s};

use super::problem::Problem;
use super::reference::{SavedView, masked_product};
use crate::element::Element;
use crate::flex::program::{Program, Row};

/// The gradients of one call: `dq` shaped like the queries, `dk` and `dv` like
/// the keys and values, all `(batch, heads, ·, ·)`, and one per bias mask, in the
/// bias's shape lifted to 4-D.
pub(crate) struct Gradients<A> {
    pub(crate) dq: Array4<A>,
    pub(crate) dk: Array4<A>,
    pub(crate) dv: Array4<A>,
    pub(crate) bias: Vec<Array4<A>>,
    /// The program's: its score modification's parameters, and one sink per
    /// query head (empty without sinks).
    pub(crate) score: Array1<A>,
    pub(crate) sinks: Array1<A>,
}

/// One query head's gradients by the reference path.
pub(crate) struct HeadBackward<A> {
    pub(crate) dq: Array2<A>,
    pub(crate) dk: Array2<A>,
    pub(crate) dv: Array2<A>,
    /// The gradient by the scores after the modification (that of every bias).
    pub(crate) d_s: Array2<A>,
    /// The modification's parameters' gradients, and the head's sink's.
    pub(crate) score: Vec<A>,
    pub(crate) sink: A,
}

impl<A: Element> Gradients<A> {
    /// Zero gradients for `problem`'s inputs.
    pub(crate) fn zeros<P: Program<A>>(problem: &Problem<'_, A, A, P>) -> Self {
        let heads = problem.q.dim().1;
        let sinks = if problem.program.sink(0).is_some() {
            heads
        } else {
            0
        };
        Gradients {
            score: Array1::zeros(problem.program.parameters()),
            sinks: Array1::zeros(sinks),
            dq: Array4::zeros(problem.q.raw_dim()),
            dk: Array4::zeros(problem.k.raw_dim()),
            dv: Array4::zeros(problem.v.raw_dim()),
            bias: problem
                .bias_shapes
                .iter()
                .map(|&s| Array4::zeros(s))
                .collect(),
        }
    }
}

/// Adds one head's `dS` block (rows from `first_row`, keys from `first_key`) to
/// a bias gradient's block for that head: rows or keys the bias broadcasts over
/// (its size 1 there) are summed.
pub(crate) fn add_bias_gradient<A: Element>(
    mut target: ArrayViewMut2<'_, A>,
    d_s: ArrayView2<'_, A>,
    first_row: usize,
    first_key: usize,
) {
    let (rows, keys) = target.dim();
    for (i, row) in d_s.outer_iter().enumerate() {
        let ti = if rows == 1 { 0 } else { first_row + i };
        for (j, &x) in row.iter().enumerate() {
            let tj = if keys == 1 { 0 } else { first_key + j };
            target[[ti, tj]] += x;
        }
    }
}

impl<A: Element, P> Problem<'_, A, A, P> {
    /// Bias gradient `m`'s block for head `h` of batch `b`: `(L or 1, S or 1)`.
    pub(crate) fn bias_gradient_of<'g>(
        &self,
        grads: &'g mut [Array4<A>],
        m: usize,
        b: usize,
        h: usize,
    ) -> ArrayViewMut2<'g, A> {
        let shape = self.bias_shapes[m];
        let (gb, gh) = (
            if shape[0] == 1 { 0 } else { b },
            if shape[1] == 1 { 0 } else { h },
        );
        grads[m].slice_mut(s![gb, gh, .., ..])
    }
}

impl<A: Element, P: Program<A>> Problem<'_, A, A, P> {
    /// The gradients of every head by the reference path; `d_out` is
    /// `(batch, heads, L, d_v)`, checked by the caller, and `saved` what the
    /// forward kept, if it did (see [`backward_head`](Self::backward_head)).
    pub(crate) fn backward(
        &self,
        d_out: ArrayView4<'_, A>,
        saved: Option<SavedView<'_, A>>,
    ) -> Gradients<A> {
        let mut grads = Gradients::zeros(self);
        let (batch, heads, _, _) = self.q.dim();
        for b in 0..batch {
            for h in 0..heads {
                let kv = self.kv_head(h);
                let d_out = d_out.index_axis(Axis(0), b).index_axis_move(Axis(0), h);
                let saved = saved.map(|saved| saved.head(b, h));
                let HeadBackward {
                    dq,
                    dk,
                    dv,
                    d_s,
                    score,
                    sink,
                } = self.backward_head(b, h, d_out, saved);
                grads.add_program(h, &score, sink);
                for m in 0..self.bias_shapes.len() {
                    let target = self.bias_gradient_of(&mut grads.bias, m, b, h);
                    add_bias_gradient(target, d_s.view(), 0, 0);
                }
                grads
                    .dq
                    .index_axis_mut(Axis(0), b)
                    .index_axis_mut(Axis(0), h)
                    .assign(&dq);
                let mut grads_b = (
                    grads.dk.index_axis_mut(Axis(0), b),
                    grads.dv.index_axis_mut(Axis(0), b),
                );
                // a key/value head sums the gradients of the query heads sharing it
                grads_b
                    .0
                    .index_axis_mut(Axis(0), kv)
                    .zip_mut_with(&dk, |a, &x| *a += x);
                grads_b
                    .1
                    .index_axis_mut(Axis(0), kv)
                    .zip_mut_with(&dv, |a, &x| *a += x);
            }
        }
        grads
    }

    /// The gradients of query head `h` of batch `b` alone. Given the forward's
    /// output and log-sum-exp (`saved`), the weights are that forward's,
    /// `exp(s − lse)`, and `D = dO·O`: the forward may have seen more keys than
    /// this call (attention over shards of the keys, merged), and then these are
    /// this shard's parts of the whole's gradients.
    pub(crate) fn backward_head(
        &self,
        b: usize,
        h: usize,
        d_out: ArrayView2<'_, A>,
        saved: Option<(ArrayView2<'_, A>, ArrayView1<'_, A>)>,
    ) -> HeadBackward<A> {
        let q = self.query(b, h);
        let (k, v) = self.keys_values(b, self.kv_head(h));
        let head = self.attend_head(b, h, q, k);
        let scaled = &head.scaled;
        let seen = |i: usize, j: usize| scaled[[i, j]] != A::neg_infinity();
        // dP at masked positions may hold anything (a NaN value row): never read
        let d_p = d_out.dot(&v.t());
        let (p, sink_weights, totals): (_, _, Vec<A>) = match saved {
            None => {
                let totals = (0..scaled.nrows())
                    .map(|i| {
                        (0..scaled.ncols())
                            .filter(|&j| seen(i, j))
                            .fold(A::zero(), |t, j| t + head.weights[[i, j]] * d_p[[i, j]])
                    })
                    .collect();
                (head.weights, head.sink_weights, totals)
            }
            Some((o, lse)) => {
                // a row that saw no key has lse = −∞ and weights 0
                let weight = |x: A, lse: A| {
                    if lse == A::neg_infinity() {
                        A::zero()
                    } else {
                        (x - lse).exp()
                    }
                };
                let p = Array2::from_shape_fn(scaled.raw_dim(), |(i, j)| {
                    if seen(i, j) {
                        weight(scaled[[i, j]], lse[i])
                    } else {
                        A::zero()
                    }
                });
                let sink_weights = match self.program.sink(h) {
                    Some(logit) => lse.iter().map(|&lse| weight(logit, lse)).collect(),
                    None => Vec::new(),
                };
                let totals = (d_out.rows().into_iter().zip(o.rows()))
                    .map(|(g, o)| g.dot(&o))
                    .collect();
                (p, sink_weights, totals)
            }
        };
        let dv = masked_product(p.t(), d_out, |j, i| seen(i, j));
        let mut d_sink = A::zero();
        let mut d_s = Array2::zeros(p.raw_dim());
        for (i, (mut row, &total)) in d_s.outer_iter_mut().zip(&totals).enumerate() {
            for j in (0..p.ncols()).filter(|&j| seen(i, j)) {
                row[j] = p[[i, j]] * (d_p[[i, j]] - total);
            }
            // the sink's gradient: −pσ·D (it has no value, so dP is 0 there)
            if let Some(&weight) = sink_weights.get(i) {
                d_sink -= weight * total;
            }
        }
        // through the modification: dS by the raw scores, and its parameters
        let mut d_raw = d_s.clone();
        let mut score = vec![A::zero(); self.program.parameters()];
        if !P::IDENTITY {
            let raw = q.mapv(|x| x * self.scale).dot(&k.t());
            for (i, (mut d, raw)) in d_raw.outer_iter_mut().zip(raw.outer_iter()).enumerate() {
                let (mut d_row, raw_row) = (d.to_vec(), raw.to_vec());
                self.program
                    .chain_row(Row { b, h, i, j0: 0 }, &raw_row, &mut d_row, &mut score);
                d.iter_mut().zip(d_row).for_each(|(x, y)| *x = y);
            }
        }
        let dq = masked_product(d_raw.view(), k, seen) * self.scale;
        let dk = masked_product(d_raw.t(), q, |j, i| seen(i, j)) * self.scale;
        HeadBackward {
            dq,
            dk,
            dv,
            d_s,
            score,
            sink: d_sink,
        }
    }
}

impl<A: Element> Gradients<A> {
    /// Adds one query head's program gradients: its modification's
    /// parameters' and its sink's.
    pub(crate) fn add_program(&mut self, h: usize, score: &[A], sink: A) {
        self.score.iter_mut().zip(score).for_each(|(t, &x)| *t += x);
        if let Some(total) = self.sinks.get_mut(h) {
            *total += sink;
        }
    }
}
