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

use ndarray::{Array2, Array4, ArrayView2, ArrayView4, ArrayViewMut2, Axis, s};

use super::problem::Problem;
use super::reference::{attend_head, masked_product};
use crate::element::Element;

/// The gradients of one call: `dq` shaped like the queries, `dk` and `dv` like
/// the keys and values, all `(batch, heads, ·, ·)`, and one per bias mask, in the
/// bias's shape lifted to 4-D.
pub(crate) struct Gradients<A> {
    pub(crate) dq: Array4<A>,
    pub(crate) dk: Array4<A>,
    pub(crate) dv: Array4<A>,
    pub(crate) bias: Vec<Array4<A>>,
}

impl<A: Element> Gradients<A> {
    /// Zero gradients for `problem`'s inputs.
    pub(crate) fn zeros(problem: &Problem<'_, A>) -> Self {
        Gradients {
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

impl<A: Element> Problem<'_, A> {
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

impl<A: Element> Problem<'_, A> {
    /// The gradients of every head by the reference path; `d_out` is
    /// `(batch, heads, L, d_v)`, checked by the caller.
    pub(crate) fn backward(&self, d_out: ArrayView4<'_, A>) -> Gradients<A> {
        let mut grads = Gradients::zeros(self);
        let (batch, heads, _, _) = self.q.dim();
        for b in 0..batch {
            for h in 0..heads {
                let kv = self.kv_head(h);
                let d_out = d_out.index_axis(Axis(0), b).index_axis_move(Axis(0), h);
                let (dq, dk, dv, d_s) = self.backward_head(b, h, d_out);
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

    /// `(dq, dk, dv, dS)` of query head `h` of batch `b` alone (`dS`, the
    /// gradient by the scaled, biased scores, is that of every bias).
    pub(crate) fn backward_head(
        &self,
        b: usize,
        h: usize,
        d_out: ArrayView2<'_, A>,
    ) -> (Array2<A>, Array2<A>, Array2<A>, Array2<A>) {
        let q = self.query(b, h);
        let (k, v) = self.keys_values(b, self.kv_head(h));
        let head = attend_head(q, k, self.scale, &self.block_masks(b, h));
        let (p, scaled) = (&head.weights, &head.scaled);
        let seen = |i: usize, j: usize| scaled[[i, j]] != A::neg_infinity();
        let dv = masked_product(p.t(), d_out, |j, i| seen(i, j));
        // dP at masked positions may hold anything (a NaN value row): never read
        let d_p = d_out.dot(&v.t());
        let mut d_s = Array2::zeros(p.raw_dim());
        for (i, mut row) in d_s.outer_iter_mut().enumerate() {
            let attended = || (0..p.ncols()).filter(move |&j| seen(i, j));
            let total = attended().fold(A::zero(), |t, j| t + p[[i, j]] * d_p[[i, j]]);
            for j in attended() {
                row[j] = p[[i, j]] * (d_p[[i, j]] - total);
            }
        }
        let dq = masked_product(d_s.view(), k, seen) * self.scale;
        let dk = masked_product(d_s.t(), q, |j, i| seen(i, j)) * self.scale;
        (dq, dk, dv, d_s)
    }
}
