//! The online softmax, one step at a time: every fused path (tiled, direct,
//! row-wise) computes `softmax(s)·V` from these functions, so each numeric step
//! exists once.
//!
//! A row's state is its running maximum `m` and sum `l = Σ exp(s − m)`. A new
//! block of scores with maximum `m_b` moves the maximum to `max(m, m_b)`, turns
//! the block into `exp(s − m_new)` and rescales what was summed so far by
//! `α = exp(m − m_new)`. A row that has seen only `−∞` (masked keys) keeps
//! `m = −∞`; its shift is 0, so `−∞ − (−∞)` never reaches `exp`, and its output
//! is 0 because its sum is.

use super::float::{KernelFloat, MulAdd};

/// The larger of `m` and `x`. A NaN `x` leaves `m`: the fused paths only keep
/// rows free of NaN (they check, and hand the others to the reference path).
#[inline(always)]
pub(crate) fn fold_max<A: PartialOrd>(m: A, x: A) -> A {
    if x > m { x } else { m }
}

/// The largest entry of `row`, folded over `N` lanes and then across them;
/// `−∞` for an empty row.
#[inline(always)]
pub(crate) fn row_max<A: KernelFloat, const N: usize>(row: &[A]) -> A {
    let (chunks, rest) = row.as_chunks::<N>();
    let mut lanes = [A::neg_infinity(); N];
    for chunk in chunks {
        for c in 0..N {
            lanes[c] = fold_max(lanes[c], chunk[c]);
        }
    }
    let tail = rest.iter().fold(A::neg_infinity(), |m, &x| fold_max(m, x));
    lanes.iter().fold(tail, |m, &x| fold_max(m, x))
}

/// What scores are shifted by before `exp` for a row whose maximum is `max`:
/// the maximum itself, or 0 while it is `−∞`.
#[inline(always)]
pub(crate) fn shift_of<A: KernelFloat>(max: A) -> A {
    if max == A::neg_infinity() {
        A::zero()
    } else {
        max
    }
}

/// A row's new state after a block whose maximum is `m_block`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rescale<A> {
    /// `max(m_old, m_block)`.
    pub(crate) max: A,
    /// What the block's scores are shifted by before `exp` ([`shift_of`] `max`).
    pub(crate) shift: A,
    /// `exp(m_old − shift)`: the factor for what was summed so far.
    pub(crate) alpha: A,
}

/// The running-maximum update of one row: see [`Rescale`].
#[inline(always)]
pub(crate) fn rescale<A: KernelFloat, M: MulAdd>(m_old: A, m_block: A) -> Rescale<A> {
    let max = fold_max(m_old, m_block);
    let shift = shift_of(max);
    Rescale {
        max,
        shift,
        alpha: A::exp_nonpositive::<M>(m_old - shift),
    }
}

/// Replaces each score `x` of `row` by `exp(x − shift)` and returns their sum,
/// summed over `N` lanes, with the kernels' own `exp` (which vectorises).
#[inline(always)]
pub(crate) fn exp_and_sum<A: KernelFloat, M: MulAdd, const N: usize>(row: &mut [A], shift: A) -> A {
    exp_and_sum_with::<A, N>(row, shift, A::exp_nonpositive::<M>)
}

/// [`exp_and_sum`] with a given `exp`: a row of a few scores, too short to
/// vectorise, is faster with the standard library's (a table, not a long
/// polynomial).
#[inline(always)]
pub(crate) fn exp_and_sum_with<A: KernelFloat, const N: usize>(
    row: &mut [A],
    shift: A,
    exp: impl Fn(A) -> A,
) -> A {
    let (chunks, rest) = row.as_chunks_mut::<N>();
    let mut lanes = [A::zero(); N];
    for chunk in chunks {
        for c in 0..N {
            let p = exp(chunk[c] - shift);
            chunk[c] = p;
            lanes[c] += p;
        }
    }
    let mut total = A::zero();
    for x in rest {
        *x = exp(*x - shift);
        total += *x;
    }
    lanes.iter().fold(total, |t, &x| t + x)
}

/// One step of the online softmax on one row: turns the block of scores `row`
/// into `exp(s − shift)`, updates the row's running `max` and `sum`, and returns
/// `α`, the factor that rescales the row's output so far.
#[inline(always)]
pub(crate) fn softmax_update<A: KernelFloat, M: MulAdd, const N: usize>(
    row: &mut [A],
    max: &mut A,
    sum: &mut A,
) -> A {
    let step = rescale::<A, M>(*max, row_max::<A, N>(row));
    let block_sum = exp_and_sum::<A, M, N>(row, step.shift);
    fold_step(step, block_sum, max, sum)
}

/// The end of a step of [`softmax_update`] whose block of scores was turned
/// into `exp(s − step.shift)` summing to `block_sum` (by a token's own `exp`):
/// the row's new `max` and `sum`, and `α`. (Not a function taking the `exp` as
/// a closure: a closure is a function of its own, which the compiler may
/// leave out of line, compiled without the kernels' instruction sets.)
#[inline(always)]
pub(crate) fn fold_step<A: KernelFloat>(
    step: Rescale<A>,
    block_sum: A,
    max: &mut A,
    sum: &mut A,
) -> A {
    *max = step.max;
    *sum = *sum * step.alpha + block_sum;
    step.alpha
}

/// What a row's unnormalised output is multiplied by at the end: `1/total`, or 0
/// for a row that attended to nothing (`total = 0`), so it gives 0, never NaN.
#[inline(always)]
pub(crate) fn inverse_total<A: KernelFloat>(total: A) -> A {
    if total > A::zero() {
        A::one() / total
    } else {
        A::zero()
    }
}

/// The weight of a partial result whose row maximum was `part_max` when the
/// parts are merged under the shift of their common maximum: `exp(part_max −
/// shift)`, 0 for a part that saw only masked keys.
#[inline(always)]
pub(crate) fn part_weight<A: KernelFloat, M: MulAdd>(part_max: A, shift: A) -> A {
    A::exp_nonpositive::<M>(part_max - shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::float::Separate;

    const INF: f64 = f64::INFINITY;

    #[test]
    fn fold_max_skips_nan_and_keeps_order() {
        assert_eq!(fold_max(1.0, 2.0), 2.0);
        assert_eq!(fold_max(2.0, 1.0), 2.0);
        assert_eq!(fold_max(-INF, -INF), -INF);
        assert_eq!(fold_max(1.0, f64::NAN), 1.0);
    }

    #[test]
    fn row_max_over_lanes_and_tail() {
        let row = [0.5, -1.0, 3.0, 2.0, -INF, 7.0, 1.0];
        assert_eq!(row_max::<f64, 4>(&row), 7.0); // 7 sits in the tail
        assert_eq!(row_max::<f64, 2>(&row[..4]), 3.0);
        assert_eq!(row_max::<f64, 4>(&[]), -INF);
        assert_eq!(row_max::<f64, 4>(&[-INF; 9]), -INF);
    }

    #[test]
    fn rescale_moves_the_maximum_and_scales_the_past() {
        let step = rescale::<f64, Separate>(1.0, 3.0);
        assert_eq!((step.max, step.shift), (3.0, 3.0));
        assert!((step.alpha - (-2.0f64).exp()).abs() < 1e-16);
        // a block below the maximum changes nothing
        let step = rescale::<f64, Separate>(3.0, 1.0);
        assert_eq!(
            step,
            Rescale {
                max: 3.0,
                shift: 3.0,
                alpha: 1.0
            }
        );
    }

    #[test]
    fn rescale_of_masked_rows_never_makes_nan() {
        // a block whose scores are all −∞, on a row that has seen nothing yet
        let step = rescale::<f64, Separate>(-INF, -INF);
        assert_eq!(
            step,
            Rescale {
                max: -INF,
                shift: 0.0,
                alpha: 0.0
            }
        );
        // the first finite block of a row that saw only −∞
        let step = rescale::<f64, Separate>(-INF, 2.0);
        assert_eq!(
            step,
            Rescale {
                max: 2.0,
                shift: 2.0,
                alpha: 0.0
            }
        );
        // an all −∞ block after finite ones keeps the row as it was
        let step = rescale::<f64, Separate>(2.0, -INF);
        assert_eq!(
            step,
            Rescale {
                max: 2.0,
                shift: 2.0,
                alpha: 1.0
            }
        );
    }

    #[test]
    fn exp_and_sum_over_lanes_and_tail() {
        let mut row = [0.0, -1.0, -INF, -2.0, 0.0];
        let total = exp_and_sum::<f64, Separate, 2>(&mut row, 0.0);
        let want = [1.0, (-1f64).exp(), 0.0, (-2f64).exp(), 1.0];
        for (got, want) in row.iter().zip(want) {
            assert!((got - want).abs() < 1e-16, "{got} vs {want}");
        }
        assert!((total - want.iter().sum::<f64>()).abs() < 1e-15);
    }

    #[test]
    fn exp_and_sum_with_the_standard_exp_agrees() {
        let mut ours = [0.0, -1.0, -INF, -2.5, -0.25, -7.0, -3.0];
        let mut std = ours;
        let a = exp_and_sum::<f64, Separate, 4>(&mut ours, 0.5);
        let b = exp_and_sum_with::<f64, 4>(&mut std, 0.5, f64::exp);
        assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        for (x, y) in ours.iter().zip(&std) {
            assert!((x - y).abs() <= 2.0 * f64::EPSILON * y, "{x} vs {y}");
        }
    }

    #[test]
    fn softmax_update_over_two_blocks_equals_softmax_of_both() {
        let scores = [0.3, -1.2, 2.5, 0.0, 1.1, -0.7, 3.2, 0.4];
        let (mut max, mut sum) = (f64::NEG_INFINITY, 0.0);
        let (mut first, mut second) = ([0.0; 4], [0.0; 4]);
        first.copy_from_slice(&scores[..4]);
        second.copy_from_slice(&scores[4..]);
        let alpha0 = softmax_update::<f64, Separate, 4>(&mut first, &mut max, &mut sum);
        let alpha1 = softmax_update::<f64, Separate, 4>(&mut second, &mut max, &mut sum);
        assert_eq!(alpha0, 0.0); // nothing summed before the first block
        assert!((alpha1 - (2.5f64 - 3.2).exp()).abs() < 1e-16);
        assert_eq!(max, 3.2);
        let want: f64 = scores.iter().map(|x| (x - 3.2).exp()).sum();
        assert!((sum - want).abs() < 1e-15, "{sum} vs {want}");
        // the first block's weights, rescaled, are exp(s − final max)
        assert!((first[2] * alpha1 - (2.5f64 - 3.2).exp()).abs() < 1e-16);
    }

    #[test]
    fn a_row_that_stays_fully_masked_sums_to_zero_and_outputs_zero() {
        let (mut max, mut sum) = (f64::NEG_INFINITY, 0.0);
        for _ in 0..3 {
            let mut block = [-INF; 8];
            let alpha = softmax_update::<f64, Separate, 4>(&mut block, &mut max, &mut sum);
            assert_eq!(alpha, 0.0);
            assert_eq!(block, [0.0; 8]);
        }
        assert_eq!((max, sum), (-INF, 0.0));
        assert_eq!(inverse_total(sum), 0.0);
    }

    #[test]
    fn inverse_total_is_one_over_a_positive_total() {
        assert_eq!(inverse_total(4.0_f32), 0.25);
        assert_eq!(inverse_total(0.0_f64), 0.0);
    }

    #[test]
    fn parts_merge_to_the_softmax_of_all_keys() {
        // two parts of one row: maxima 1 and 3, sums of exp(s − own max)
        let (m0, l0, m1, l1) = (1.0_f64, 1.5, 3.0, 2.0);
        let shift = shift_of(fold_max(m0, m1));
        let (w0, w1) = (
            part_weight::<f64, Separate>(m0, shift),
            part_weight::<f64, Separate>(m1, shift),
        );
        assert_eq!(w1, 1.0);
        assert!((w0 * l0 + w1 * l1 - ((-2f64).exp() * 1.5 + 2.0)).abs() < 1e-15);
        // a part that saw only masked keys weighs nothing, even alone
        assert_eq!(part_weight::<f64, Separate>(-INF, shift), 0.0);
        assert_eq!(part_weight::<f64, Separate>(-INF, shift_of(-INF)), 0.0);
    }
}
