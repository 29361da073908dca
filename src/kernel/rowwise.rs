//! Attention one query row at a time, for problems too small to pay for packing:
//! each row's scores live in one buffer of `S` numbers, never an `L × S` matrix.

use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2};

use super::float::KernelFloat;
use super::float::Separate;
use super::online::{exp_and_sum, exp_and_sum_with, fold_max, inverse_total, row_max, shift_of};
use super::params::SOFTMAX_LANES;
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
    let s = v.nrows();
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
            *score = scaled_dot(query, scale, key);
        }
        let class = scoring.program.class(scoring.b, scoring.h, i..i + 1, 0..s);
        if !scoring.prepare_row(masks, i, l, s, 0, scores, class) {
            return false;
        }
        // the whole row is one block: no running state to rescale; a row of a
        // few scores is too short to vectorise, so the standard library's exp
        let sink = scoring.sink();
        let max = row_max::<A, 1>(scores);
        let shift = shift_of(sink.map_or(max, |sink| fold_max(max, sink)));
        let mut total = match s < SOFTMAX_LANES {
            true => exp_and_sum_with::<A, 1>(scores, shift, A::exp),
            false => exp_and_sum::<A, Separate, SOFTMAX_LANES>(scores, shift),
        };
        if let Some(sink) = sink {
            total += (sink - shift).exp();
        }
        weigh_values(scores, v, inverse_total(total), out.row_mut(i));
    }
    true
}

/// `out = Σⱼ pⱼ·vⱼ · inverse` over the rows `vⱼ` of `v`, eight columns at a time
/// with their sums in registers, the last `d_v mod 8` one by one. Summed one
/// column at a time, heads of 16 × 16 × 32 or 4 × 4 × 64 ran 1.9–2.1× slower;
/// key by key into the output row, a 3 × 4 call ran 13 % slower.
#[inline(always)]
fn weigh_values<A: KernelFloat>(scores: &[A], v: &[A], inverse: A, mut out: ArrayViewMut1<'_, A>) {
    const W: usize = 8;
    let d_v = out.len();
    let rows = || scores.iter().zip(v.chunks_exact(d_v));
    for start in (0..d_v / W).map(|b| b * W) {
        let mut sums = [A::zero(); W];
        for (&p, value) in rows() {
            let value = value[start..]
                .first_chunk::<W>()
                .expect("W columns from start");
            for c in 0..W {
                sums[c] += p * value[c];
            }
        }
        for c in 0..W {
            out[start + c] = sums[c] * inverse;
        }
    }
    for c in d_v / W * W..d_v {
        let sum = rows().fold(A::zero(), |sum, (&p, value)| sum + p * value[c]);
        out[c] = sum * inverse;
    }
}

/// `Σ (aᵢ·scale)·bᵢ` in four running sums: one sum is a chain of dependent adds,
/// and the scores of a 16 × 16 × 32 head took 1.6× longer so, once the value
/// sums were no longer the slower part. The scale goes into every product, not
/// onto the sum: the fused pre-check bounds the scaled scores, not `a·b`.
#[inline(always)]
fn scaled_dot<A: KernelFloat>(a: &[A], scale: A, b: &[A]) -> A {
    let ((a4, a_rest), (b4, b_rest)) = (a.as_chunks::<4>(), b.as_chunks::<4>());
    let mut lanes = [A::zero(); 4];
    for (x, y) in a4.iter().zip(b4) {
        for c in 0..4 {
            lanes[c] += x[c] * scale * y[c];
        }
    }
    let rest = (a_rest.iter().zip(b_rest)).fold(A::zero(), |t, (&x, &y)| t + x * scale * y);
    (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]) + rest
}
