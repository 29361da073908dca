//! Row-wise, numerically stable softmax.

use ndarray::{Array2, ArrayRef1, ArrayRef2};

use crate::element::Element;

/// Softmax of every row: `softmax(x)ᵢⱼ = exp(xᵢⱼ − mᵢ) / Σₖ exp(xᵢₖ − mᵢ)`, `mᵢ = maxₖ xᵢₖ`.
///
/// Subtracting the row maximum keeps it stable: `[1234, 0]` gives exactly `[1, 0]`.
/// A row whose entries are all `−∞` (a fully masked row) gives all zeros, never NaN;
/// a row holding a NaN, or `+∞`, gives NaN throughout, as in PyTorch.
///
/// # Shapes
///
/// `x: (rows, n)` → `(rows, n)`; any strides.
///
/// # Examples
///
/// ```
/// use attn::softmax_rows;
/// use ndarray::array;
///
/// let p = softmax_rows(&array![[1234.0_f64, 0.0], [f64::NEG_INFINITY, f64::NEG_INFINITY]]);
/// assert_eq!(p, array![[1.0, 0.0], [0.0, 0.0]]);
/// ```
pub fn softmax_rows<A: Element>(x: &ArrayRef2<A>) -> Array2<A> {
    let mut out = x.to_owned();
    softmax_rows_in_place(&mut out);
    out
}

/// [`softmax_rows`], overwriting `x` with its result.
///
/// # Shapes
///
/// `x: (rows, n)`; any strides.
///
/// # Examples
///
/// ```
/// use attn::softmax_rows_in_place;
/// use ndarray::array;
///
/// let mut x = array![[0.0_f32, 0.0, 0.0, 0.0]];
/// softmax_rows_in_place(&mut x);
/// assert_eq!(x, array![[0.25, 0.25, 0.25, 0.25]]);
/// ```
pub fn softmax_rows_in_place<A: Element>(x: &mut ArrayRef2<A>) {
    for mut row in x.rows_mut() {
        softmax_in_place(&mut row);
    }
}

/// Softmax of one row, in place.
pub(crate) fn softmax_in_place<A: Element>(row: &mut ArrayRef1<A>) {
    let max = row_max(row);
    if max.is_nan() {
        row.fill(A::nan());
        return;
    }
    if max == A::neg_infinity() {
        row.fill(A::zero());
        return;
    }
    let mut sum = A::zero();
    row.mapv_inplace(|x| {
        let e = (x - max).exp();
        sum += e;
        e
    });
    row.mapv_inplace(|e| e / sum);
}

/// Softmax of one row with a sink: a logit `sink` that joins the denominator
/// and has no value, `exp(xⱼ − m) / (Σₖ exp(xₖ − m) + exp(sink − m))` with
/// `m = max(maxₖ xₖ, sink)`; returns the sink's own weight. A row that sees no
/// key gives zeros (the sink takes all the weight); a NaN or `+∞` gives NaN
/// throughout.
pub(crate) fn softmax_with_sink_in_place<A: Element>(row: &mut ArrayRef1<A>, sink: A) -> A {
    let max = row_max(row);
    if max.is_nan() {
        row.fill(A::nan());
        return A::nan();
    }
    let max = max.max(sink);
    let weight = (sink - max).exp();
    let mut sum = weight;
    row.mapv_inplace(|x| {
        let e = (x - max).exp();
        sum += e;
        e
    });
    row.mapv_inplace(|e| e / sum);
    weight / sum
}

/// The largest entry of a row; NaN if any entry is NaN; `−∞` for an empty row.
fn row_max<A: Element>(row: &ArrayRef1<A>) -> A {
    row.fold(A::neg_infinity(), |m, &x| {
        if m.is_nan() || x.is_nan() {
            A::nan()
        } else {
            m.max(x)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    #[test]
    fn stable_for_large_logits() {
        let p = softmax_rows(&array![[1234.0_f32, 0.0], [0.0, -1234.0]]);
        assert_eq!(p, array![[1.0, 0.0], [1.0, 0.0]]);
    }

    #[test]
    fn all_negative_infinity_row_is_zero() {
        let inf = f64::INFINITY;
        let p = softmax_rows(&array![[-inf, -inf, -inf], [-inf, 0.0, -inf]]);
        assert_eq!(p, array![[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
    }

    #[test]
    fn nan_spreads_over_its_row_only() {
        let p = softmax_rows(&array![[f64::NAN, 0.0], [1.0, 1.0]]);
        assert!(p.row(0).iter().all(|x| x.is_nan()));
        assert_eq!(p.row(1), array![0.5, 0.5]);
        let all_masked_but_nan = softmax_rows(&array![[f64::NEG_INFINITY, f64::NAN]]);
        assert!(all_masked_but_nan.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn empty_shapes() {
        assert_eq!(softmax_rows(&Array2::<f64>::zeros((0, 3))).dim(), (0, 3));
        assert_eq!(softmax_rows(&Array2::<f64>::zeros((3, 0))).dim(), (3, 0));
    }

    #[test]
    fn transposed_input_equals_owned_copy() {
        let x = array![[1.0_f64, 2.0, 3.0], [0.5, -1.0, 4.0]];
        let t = x.t();
        assert_eq!(softmax_rows(&t), softmax_rows(&t.to_owned()));
    }
}
