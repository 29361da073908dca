//! The int8 cache's integer dot products with AVX512_VNNI: `vpdpwssd` sums 32
//! products of 16-bit integers into 16 `i32` lanes. Bytes are sign-extended to
//! 16 bits as they are loaded; value rows are taken two keys at a time,
//! interleaved so that each lane's pair holds one column of both keys.

use std::arch::x86_64::*;

/// Whether this CPU has AVX512_VNNI (with the AVX-512 F and BW an
/// [`Avx512`](super::avx512::Avx512) token proves).
pub(super) fn detect() -> bool {
    is_x86_feature_detected!("avx512vnni")
}

/// [`scores_i8`](crate::kernel::direct::scores_i8) for `d` a multiple of 32,
/// four keys at a time, their sums reduced together.
///
/// # Safety
///
/// The CPU must have AVX-512 F, BW and VNNI; `q` holds whole rows of `d`,
/// `keys` whole rows of `d`, `out` at least `rows · n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
pub(super) unsafe fn scores(q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
    debug_assert!(d.is_multiple_of(32));
    let n = keys.len() / d;
    for (r, q) in q.chunks_exact(d).enumerate() {
        for j in (0..n).step_by(4) {
            // past the last key, repeat it and ignore the result
            let key = |u: usize| (j + u).min(n - 1) * d;
            let mut acc = [_mm512_setzero_si512(); 4];
            for p in (0..d).step_by(32) {
                // SAFETY: p + 32 ≤ d: 32 i16 of the query, 32 bytes of each key
                unsafe {
                    let x = _mm512_loadu_si512(q.as_ptr().add(p).cast());
                    for (u, acc) in acc.iter_mut().enumerate() {
                        let k = keys.as_ptr().add(key(u) + p);
                        let y = _mm512_cvtepi8_epi16(_mm256_loadu_si256(k.cast()));
                        *acc = _mm512_dpwssd_epi32(*acc, x, y);
                    }
                }
            }
            let sums = sum4(acc);
            let used = (n - j).min(4);
            out[r * n + j..][..used].copy_from_slice(&sums[..used]);
        }
    }
}

/// The lanes of each of four accumulators summed: halves, then pairs.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
fn sum4(acc: [__m512i; 4]) -> [i32; 4] {
    let half =
        |x: __m512i| _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64::<1>(x));
    let (a, b, c, e) = (half(acc[0]), half(acc[1]), half(acc[2]), half(acc[3]));
    let t = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, e));
    let s = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
    let mut out = [0_i32; 4];
    // SAFETY: four i32 into an array of four
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), s) };
    out
}

/// [`values_i8`](crate::kernel::direct::values_i8) for `d_v` a multiple of 32:
/// two keys at a time, their weights one 32-bit pair.
///
/// # Safety
///
/// As [`scores`]; `values` holds one row of `d_v` per weight of `w`, `out` at
/// least `d_v` values, and `w` at most 256 weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn values(w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
    debug_assert!(d_v.is_multiple_of(32) && w.len() <= 256);
    let n = w.len().min(values.len() / d_v);
    // each pair of weights as one i32 (an odd last key pairs with itself at
    // weight 0)
    let mut pairs = [0_i32; 128];
    for (i, pair) in pairs.iter_mut().enumerate().take(n.div_ceil(2)) {
        let second = w.get(2 * i + 1).copied().unwrap_or(0);
        *pair = i32::from(w[2 * i] as u16) | (i32::from(second as u16) << 16);
    }
    for c0 in (0..d_v).step_by(32) {
        // lanes of `low` hold columns 8L + i, of `high` 8L + 4 + i (i < 4) of
        // 128-bit lane L: how the 16-bit unpacks interleave two rows
        let (mut low, mut high) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        for (i, &pair) in pairs.iter().enumerate().take(n.div_ceil(2)) {
            let (j, next) = (2 * i, (2 * i + 1).min(n - 1));
            // SAFETY: rows j and next exist; c0 + 32 ≤ d_v
            unsafe {
                let row = |k: usize| values.as_ptr().add(k * d_v + c0);
                let a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(row(j).cast()));
                let b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(row(next).cast()));
                let pair = _mm512_set1_epi32(pair);
                low = _mm512_dpwssd_epi32(low, _mm512_unpacklo_epi16(a, b), pair);
                high = _mm512_dpwssd_epi32(high, _mm512_unpackhi_epi16(a, b), pair);
            }
        }
        let (mut l, mut h) = ([0_i32; 16], [0_i32; 16]);
        // SAFETY: 16 i32 into each array
        unsafe {
            _mm512_storeu_si512(l.as_mut_ptr().cast(), low);
            _mm512_storeu_si512(h.as_mut_ptr().cast(), high);
        }
        for lane in 0..4 {
            for i in 0..4 {
                out[c0 + 8 * lane + i] = l[4 * lane + i];
                out[c0 + 8 * lane + 4 + i] = h[4 * lane + i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kernel::direct::{scores_i8, values_i8};

    /// Pseudo-random integers over the whole range of `T`.
    fn ints<T: TryFrom<i64>>(n: usize, seed: u64, bound: i64) -> Vec<T> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = (state >> 33) as i64 % (2 * bound + 1) - bound;
                T::try_from(x).unwrap_or_else(|_| unreachable!("within the bound"))
            })
            .collect()
    }

    #[test]
    fn vnni_sums_equal_the_scalar_ones_at_the_extremes() {
        if !super::detect() || !is_x86_feature_detected!("avx512bw") {
            return; // nothing to compare on this CPU
        }
        for (d, n) in [(32, 1), (64, 7), (512, 9), (96, 256)] {
            let q: Vec<i16> = ints(2 * d, 1, 32767);
            let mut keys: Vec<i8> = ints(n * d, 2, 127);
            keys[0] = 127; // the largest products
            let (mut vnni, mut scalar) = (vec![0; 2 * n], vec![0; 2 * n]);
            // SAFETY: `detect` and the check above: AVX-512 F, BW and VNNI
            unsafe { super::scores(&q, &keys, d, &mut vnni) };
            scores_i8(&q, &keys, d, &mut scalar);
            assert_eq!(vnni, scalar, "scores, d {d}, n {n}");
            let w: Vec<i16> = ints(n, 3, 32767)
                .into_iter()
                .map(|w: i16| w.max(0))
                .collect();
            let (mut vnni, mut scalar) = (vec![0; d], vec![0; d]);
            // SAFETY: as above
            unsafe { super::values(&w, &keys, d, &mut vnni) };
            values_i8(&w, &keys, d, &mut scalar);
            assert_eq!(vnni, scalar, "values, d {d}, n {n}");
        }
    }
}
