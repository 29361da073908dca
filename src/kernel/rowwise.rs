//! Attention one query row at a time, for problems too small to pay for packing:
//! each row's scores live in one buffer of `S` numbers, never an `L × S` matrix.

use ndarray::{ArrayView2, ArrayViewMut2};

use super::float::KernelFloat;
use super::online::{exp_and_sum_with, fold_max, inverse_total, row_max, shift_of};
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::program::Program;

/// One head's inputs: queries `(L, d)`, keys `(S, d)`, values `(S, d_v)`.
pub(crate) struct HeadRows<'h, 'p, A> {
    pub(crate) q: ArrayView2<'p, A>,
    pub(crate) k: ArrayView2<'p, A>,
    pub(crate) v: ArrayView2<'p, A>,
    pub(crate) masks: &'h [Mask2<'p, A>],
    pub(crate) scale: A,
}

/// One head: `out = softmax(f(QKᵀ·scale) + masks)·V` under the program, for
/// finite inputs; `false` when the program made a score NaN or `+∞` (`out`
/// then holds nothing of use).
pub(crate) fn attend_head<A: KernelFloat, P: Program<A>>(
    head: HeadRows<'_, '_, A>,
    scoring: Scoring<'_, P>,
    mut out: ArrayViewMut2<'_, A>,
) -> bool {
    let HeadRows {
        q,
        k,
        v,
        masks,
        scale,
    } = head;
    let (l, d) = q.dim();
    let (s, d_v) = v.dim();
    let (q, k, v) = (
        q.as_standard_layout(),
        k.as_standard_layout(),
        v.as_standard_layout(),
    );
    let (Some(q), Some(k), Some(v)) = (q.as_slice(), k.as_slice(), v.as_slice()) else {
        unreachable!("standard-layout arrays are slices")
    };
    // small heads keep their scratch on the stack
    let mut on_stack = [A::zero(); 64];
    let mut on_heap = Vec::new();
    let scores = if s <= on_stack.len() {
        &mut on_stack[..s]
    } else {
        on_heap.resize(s, A::zero());
        &mut on_heap[..]
    };
    for (i, query) in q.chunks_exact(d).enumerate() {
        for (score, key) in scores.iter_mut().zip(k.chunks_exact(d)) {
            *score = query
                .iter()
                .zip(key)
                .fold(A::zero(), |acc, (&a, &b)| acc + a * scale * b);
        }
        let class = scoring.program.class(scoring.b, scoring.h, i..i + 1, 0..s);
        if !scoring.prepare_row(masks, i, l, s, 0, scores, class) {
            return false;
        }
        // the whole row is one block: no running state to rescale; too short to
        // vectorise, so the standard library's exp
        let sink = scoring.sink();
        let max = row_max::<A, 1>(scores);
        let shift = shift_of(sink.map_or(max, |sink| fold_max(max, sink)));
        let mut total = exp_and_sum_with::<A, 1>(scores, shift, A::exp);
        if let Some(sink) = sink {
            total += (sink - shift).exp();
        }
        // column by column, each sum in a register (a row of sums in memory
        // waited on its own stores, key after key)
        let inverse = inverse_total(total);
        let mut out = out.row_mut(i);
        for c in 0..d_v {
            let sum = scores
                .iter()
                .zip(v.chunks_exact(d_v))
                .fold(A::zero(), |sum, (&p, row)| sum + p * row[c]);
            out[c] = sum * inverse;
        }
    }
    true
}
