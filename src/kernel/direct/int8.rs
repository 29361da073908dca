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
/// `scale / 2 = max|x| / 65534`, to nearest, ties to even); 0 for a row of zeros, NaN for a row that is
/// not finite (so that what it scores is NaN, and the head goes to the
/// reference path).
#[inline(always)]
pub(crate) fn round_to_i16(x: &[f32], out: &mut [i16]) -> f32 {
    // sixteen lanes of maxima, and of `Σ v·0`, which is NaN exactly where a
    // value is NaN or infinite (`a > m` alone would pass over a NaN)
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
    if bad {
        out.fill(0);
        return f32::NAN;
    }
    if max == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let inverse = 32767.0 / max;
    for (o, &v) in out.iter_mut().zip(x) {
        let rounded = (v * inverse).round_ties_even();
        // SAFETY: every value is finite (checked above) and |v| ≤ max, so
        // |rounded| ≤ 32767: in range of i32 (an unchecked conversion
        // vectorises; a saturating `as` does not)
        *o = unsafe { rounded.to_int_unchecked::<i32>() } as i16;
    }
    max / 32767.0
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
