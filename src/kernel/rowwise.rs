//! Attention one query row at a time, for problems too small to pay for packing:
//! each row's scores live in one buffer of `S` numbers, never an `L × S` matrix.

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::mask::{apply_row, Mask2};
use crate::Element;

/// One head: `out = softmax(QKᵀ·scale + masks)·V`, for finite inputs.
pub(crate) fn attend_head<A: Element>(
    q: ArrayView2<'_, A>,
    k: ArrayView2<'_, A>,
    v: ArrayView2<'_, A>,
    masks: &[Mask2<'_, A>],
    scale: A,
    mut out: ArrayViewMut2<'_, A>,
) {
    let (l, s) = (q.nrows(), k.nrows());
    let mut scores = vec![A::zero(); s];
    for (i, (query, mut row_out)) in q.outer_iter().zip(out.outer_iter_mut()).enumerate() {
        for (score, key) in scores.iter_mut().zip(k.outer_iter()) {
            *score = query
                .iter()
                .zip(key.iter())
                .fold(A::zero(), |acc, (&a, &b)| acc + a * scale * b);
        }
        apply_row(masks, i, l, s, 0, &mut scores);
        let max = scores
            .iter()
            .fold(A::neg_infinity(), |m, &x| if x > m { x } else { m });
        row_out.fill(A::zero());
        if max == A::neg_infinity() {
            continue;
        }
        let mut total = A::zero();
        for (score, value) in scores.iter().zip(v.outer_iter()) {
            let p = (*score - max).exp();
            if p > A::zero() {
                total += p;
                row_out.scaled_add(p, &value);
            }
        }
        row_out.mapv_inplace(|x| x / total);
    }
}
