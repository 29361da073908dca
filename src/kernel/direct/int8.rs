//! Integer dot products for an int8 cache: queries and weights rounded to
//! 16 bits, products summed exactly in `i32`, on CPUs with AVX512_VNNI
//! (`vpdpwssd`, 32 products per instruction, against three instructions per
//! 16 for widening the bytes to f32). The scalar versions here define the
//! results; the arch's versions give the same integers.

/// Largest width whose 16-bit by 8-bit sums fit in `i32`:
/// `512 · 32767 · 127 < 2³¹`.
pub(crate) const MAX_WIDTH: usize = 512;

/// Most weights one value sum takes: `256 · 32767 · 127 < 2³¹` (a chunk of the
/// direct path).
pub(crate) const MAX_KEYS: usize = 256;

/// Widths the vector kernels take: whole registers of 32 bytes.
pub(crate) const WIDTH_STEP: usize = 32;

/// `x` rounded to 16-bit integers at one scale, `x ≈ out · scale` (each within
/// `scale / 2 = max|x| / 65534`, to nearest, ties to even); 0 for a row of
/// zeros, NaN for a row that is not finite (so that what it scores is NaN, and
/// the head goes to the reference path).
#[inline(always)]
pub(crate) fn round_to_i16(x: &[f32], out: &mut [i16]) -> f32 {
    round_to(x, out, 32767.0, |i| i as i16)
}

/// `x` rounded to 8-bit integers at one scale, `x ≈ out · scale` with
/// `scale = max|x| / 127` (each within `scale / 2`, to nearest, ties to
/// even): how an int8 cache stores a row. 0 for a row of zeros, NaN for a row
/// that is not finite (`out` all zeros then).
pub(crate) fn round_to_i8(x: &[f32], out: &mut [i8]) -> f32 {
    round_to(x, out, 127.0, |i| i as i8)
}

/// `x` rounded to integers of magnitude at most `levels` (≤ 2²²) at the scale
/// `max|x| / levels`, each narrowed by `narrow`; see [`round_to_i16`].
///
/// The rounding adds and subtracts 1.5 · 2²³ (exact to nearest, ties to even,
/// for `|v| ≤ 2²²`): it vectorises in any build, where `round_ties_even` is a
/// call to `rintf` without SSE4.1 (the cache's writes run without the
/// kernels' instruction sets).
#[inline(always)]
fn round_to<T>(x: &[f32], out: &mut [T], levels: f32, narrow: impl Fn(i32) -> T) -> f32 {
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2²³
    let max = max_abs(x);
    if max.is_nan() || max == 0.0 {
        out.iter_mut().for_each(|o| *o = narrow(0));
        return max;
    }
    let inverse = levels / max;
    if !inverse.is_finite() {
        tiny_row(x, max, levels, &narrow, out);
        return max / levels;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        // |v · inverse| ≤ levels (up to one rounding), so the sum's last bits
        // are the rounded integer
        let rounded = (v * inverse + SHIFTER) - SHIFTER;
        // SAFETY: every value is finite (checked above) and |v| ≤ max, so
        // |rounded| ≤ levels + 1: in range of i32 (an unchecked conversion
        // vectorises; a saturating `as` does not)
        *o = narrow(unsafe { rounded.to_int_unchecked::<i32>() });
    }
    max / levels
}

/// A row whose largest `|v|` is so small that `levels / max` overflows `f32`
/// (below ~1e-34): rounded in `f64`, where it does not (rare, scalar).
#[cold]
fn tiny_row<T>(x: &[f32], max: f32, levels: f32, narrow: impl Fn(i32) -> T, out: &mut [T]) {
    let inverse = f64::from(levels) / f64::from(max);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = narrow((f64::from(v) * inverse).round_ties_even() as i32);
    }
}

/// The largest `|v|` of `x` (0 for an empty row), NaN if a value is NaN or
/// infinite: sixteen lanes of maxima, and of `Σ v·0`, which is NaN exactly
/// where a value is NaN or infinite (`a > m` alone would pass over a NaN).
#[inline(always)]
fn max_abs(x: &[f32]) -> f32 {
    let (mut max, mut poison) = ([0.0_f32; 16], [0.0_f32; 16]);
    let (parts, rest) = x.as_chunks::<16>();
    for part in parts {
        for ((m, p), &v) in max.iter_mut().zip(&mut poison).zip(part) {
            let a = v.abs();
            *m = if a > *m { a } else { *m };
            *p += v * 0.0;
        }
    }
    for ((m, p), &v) in max.iter_mut().zip(&mut poison).zip(rest) {
        let a = v.abs();
        *m = if a > *m { a } else { *m };
        *p += v * 0.0;
    }
    let max = halving(max, |a, b| if a > b { a } else { b });
    let bad = halving(poison, |a, b| a + b).is_nan();
    if bad { f32::NAN } else { max }
}

/// Sixteen lanes folded by `f` pairwise, halves first (in registers).
#[inline(always)]
fn halving(x: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    let x: [f32; 8] = std::array::from_fn(|i| f(x[i], x[i + 8]));
    let x: [f32; 4] = std::array::from_fn(|i| f(x[i], x[i + 4]));
    let x: [f32; 2] = std::array::from_fn(|i| f(x[i], x[i + 2]));
    f(x[0], x[1])
}

/// `out[r·n + j] = Σₚ q[r·d + p] · keys[j·d + p]` for `n = keys.len() / d`.
pub(crate) fn scores_i8(q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
    let n = keys.len() / d;
    for (r, q) in q.chunks_exact(d).enumerate() {
        for (j, k) in keys.chunks_exact(d).enumerate() {
            out[r * n + j] = q
                .iter()
                .zip(k)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
        }
    }
}

/// `out[c] = Σⱼ w[j] · values[j·d_v + c]`.
pub(crate) fn values_i8(w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
    out[..d_v].fill(0);
    for (&w, row) in w.iter().zip(values.chunks_exact(d_v)) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += i32::from(w) * i32::from(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each value against `(v · (127 / max)).round_ties_even()`, over rows
    /// with ties, the extremes, subnormals and every sign.
    #[test]
    fn round_to_i8_is_the_plain_rounding() {
        let rows: [&[f32]; 5] = [
            &[1.0, -1.0, 0.5 / 127.0, 1.5 / 127.0, -2.5 / 127.0, 0.0, -0.0],
            &[127.0, 0.5, 1.5, 2.5, -126.5, 63.5, -0.5],
            &[f32::MAX, -f32::MAX / 3.0, 1.0],
            &[1e-40, -3e-41, 0.0],
            &[0.3, -0.7, 0.11, 0.999, -0.25, 0.0625, 17.0, -16.9],
        ];
        for row in rows {
            let mut out = vec![0_i8; row.len()];
            let scale = round_to_i8(row, &mut out);
            let max = row.iter().fold(0.0_f32, |m, v| m.max(v.abs()));
            assert_eq!(scale, max / 127.0);
            for (&v, &o) in row.iter().zip(&out) {
                // the product in f32 where 127 / max is finite, else in f64
                let expected = match 127.0 / max {
                    inverse if inverse.is_finite() => f64::from((v * inverse).round_ties_even()),
                    _ => (f64::from(v) * (127.0 / f64::from(max))).round_ties_even(),
                };
                assert_eq!(f64::from(o), expected, "{v} in {row:?}");
            }
        }
        let mut out = [1_i8; 3];
        assert_eq!(round_to_i8(&[0.0; 3], &mut out), 0.0);
        assert_eq!(out, [0; 3]);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut out = [1_i8; 20];
            let mut row = [0.5_f32; 20];
            row[17] = bad;
            assert!(round_to_i8(&row, &mut out).is_nan());
            assert_eq!(out, [0; 20]);
        }
    }

    /// A row too small for `32767 / max` in `f32` still rounds to the full
    /// range (queries of ~1e-36 are not an overflow to infinity).
    #[test]
    fn round_to_i16_takes_tiny_rows() {
        let row = [2e-36_f32, -1e-36, 5e-37, 0.0];
        let mut out = [0_i16; 4];
        let scale = round_to_i16(&row, &mut out);
        assert_eq!(scale, 2e-36 / 32767.0);
        assert_eq!(out, [32767, -16384, 8192, 0]);
    }
}
