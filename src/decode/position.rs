//! Where tokens are: ALiBi slopes, rotary position embeddings, and masks built
//! from sequence lengths and windows.

use ndarray::{Array2, Array4, ArrayRef2};

use crate::element::Element;
use crate::error::{Error, Result};

/// ALiBi's per-head slopes (Press et al., 2022): for `n` a power of two, the
/// geometric sequence `2^(−8/n), 2^(−16/n), …, 2^(−8)`; otherwise the slopes of
/// the power of two `m` below `n`, then every other slope of `2m`, as the paper's
/// reference code does. Use them with [`Mask::Alibi`](crate::Mask::Alibi).
///
/// # Examples
///
/// ```
/// let slopes = attn::alibi_slopes(8);
/// assert_eq!(slopes, vec![0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
/// assert_eq!(attn::alibi_slopes(6).len(), 6);
/// ```
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    let power_of_two = |m: usize| -> Vec<f64> {
        let start = 2f64.powf(-8.0 / m as f64);
        (1..=m).map(|i| start.powi(i as i32)).collect()
    };
    if n == 0 {
        return Vec::new();
    }
    let m = 1 << (usize::BITS - 1 - n.leading_zeros());
    let mut slopes = power_of_two(m);
    slopes.extend(power_of_two(2 * m).into_iter().step_by(2).take(n - m));
    slopes
}

/// How rotary embeddings pair up the features of a head.
///
/// # Examples
///
/// ```
/// use attn::RopeLayout;
///
/// assert_ne!(RopeLayout::Interleaved, RopeLayout::HalfSplit);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Features `(2i, 2i + 1)` rotate together (RoFormer's formula).
    Interleaved,
    /// Features `(i, i + d/2)` rotate together (GPT-NeoX, LLaMA as in Hugging Face).
    HalfSplit,
}

/// Rotary position embeddings (RoPE): rotates each pair of features of row `r`
/// by the angle `positions[r] · base^(−2i/d)` for pair `i`.
///
/// Apply it to queries and keys (not values) with their absolute positions, so
/// keys in a [`KvCache`](crate::KvCache) keep the rotation of where they were.
///
/// # Shapes
///
/// `x: (n, d)` with `d` even, `positions.len() == n` → `(n, d)`.
///
/// # Errors
///
/// [`Error::Shape`] when `positions` has not one entry per row,
/// [`Error::InvalidConfig`] when `d` is odd or `base` is not finite and above 1.
///
/// # Examples
///
/// ```
/// use attn::{rope, RopeLayout};
/// use ndarray::array;
///
/// let x = array![[1.0_f64, 0.0], [1.0, 0.0]];
/// let r = rope(&x, &[0, 1], 10_000.0, RopeLayout::Interleaved)?;
/// assert_eq!(r.row(0), x.row(0)); // position 0: no rotation
/// assert!((r[[1, 0]] - 1f64.cos()).abs() < 1e-15 && (r[[1, 1]] - 1f64.sin()).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn rope<A: Element>(
    x: &ArrayRef2<A>,
    positions: &[usize],
    base: f64,
    layout: RopeLayout,
) -> Result<Array2<A>> {
    let (n, d) = x.dim();
    if positions.len() != n {
        return Err(Error::Shape {
            what: "rope positions: one per row",
            expected: vec![n],
            found: vec![positions.len()],
        });
    }
    if d % 2 != 0 || !(base.is_finite() && base > 1.0) {
        return Err(Error::InvalidConfig {
            reason: format!(
                "rope needs an even width and a finite base above 1, got width {d} and base {base}"
            ),
        });
    }
    let half = d / 2;
    let mut out = x.to_owned();
    for (mut row, &position) in out.rows_mut().into_iter().zip(positions) {
        for i in 0..half {
            let angle = position as f64 * base.powf(-2.0 * i as f64 / d as f64);
            let (sin, cos) = (A::from_f64(angle.sin()), A::from_f64(angle.cos()));
            let (a, b) = match layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::HalfSplit => (i, i + half),
            };
            let (x0, x1) = (row[a], row[b]);
            row[a] = x0 * cos - x1 * sin;
            row[b] = x0 * sin + x1 * cos;
        }
    }
    Ok(out)
}

/// A key-padding keep-mask from sequence lengths: batch `b` may attend to its
/// first `lengths[b]` keys of `s`. Shaped `(batch, 1, 1, S)` so it broadcasts over
/// heads and queries in [`ScaledDotProduct::forward_batched`](crate::ScaledDotProduct::forward_batched)
/// and multi-head attention.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when a length exceeds `s`.
///
/// # Examples
///
/// ```
/// let mask = attn::key_padding(&[3, 1], 3)?;
/// assert_eq!(mask.shape(), &[2, 1, 1, 3]);
/// assert_eq!(mask[[1, 0, 0, 1]], false);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn key_padding(lengths: &[usize], s: usize) -> Result<Array4<bool>> {
    if let Some(&too_long) = lengths.iter().find(|&&n| n > s) {
        return Err(Error::InvalidConfig {
            reason: format!("a sequence of length {too_long} does not fit {s} keys"),
        });
    }
    Ok(Array4::from_shape_fn(
        (lengths.len(), 1, 1, s),
        |(b, _, _, j)| j < lengths[b],
    ))
}
