//! The readable reference path: the `L × S` scores, their row-wise softmax, then
//! the product with `V`. It defines what every input does (masks, `−∞`, NaN,
//! empty sizes); the fused kernels are checked against it and fall back to it.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, ArrayViewMut4};

use super::mask::{self, Mask2};
use super::problem::Problem;
use super::softmax::softmax_rows;
use crate::element::Element;

/// One head's scaled, masked scores and their weights.
pub(crate) struct Head<A> {
    /// `QKᵀ·scale` plus biases, `−∞` where masked: `(L, S)`.
    pub(crate) scaled: Array2<A>,
    /// `softmax(scaled)`, row-wise: `(L, S)`.
    pub(crate) weights: Array2<A>,
}

impl<A: Element> Problem<'_, A> {
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
        let head = attend_head(self.query(b, h), k, self.scale, &self.block_masks(b, h));
        if let Some(mut output) = output {
            output.assign(&weighted_values(&head, v));
        }
        if let Some(mut weights) = weights {
            weights.assign(&head.weights);
        }
    }
}

/// Scaled, masked scores and weights of one head.
pub(crate) fn attend_head<A: Element>(
    q: ArrayView2<'_, A>,
    k: ArrayView2<'_, A>,
    scale: A,
    masks: &[Mask2<'_, A>],
) -> Head<A> {
    // Scaling Q before the product keeps QKᵀ finite for huge inputs whose scaled
    // scores are finite.
    let mut scaled = q.mapv(|x| x * scale).dot(&k.t());
    mask::apply(masks, &mut scaled);
    let weights = softmax_rows(&scaled);
    Head { scaled, weights }
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
