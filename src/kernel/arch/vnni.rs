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
/// eight keys at a time, their sums reduced together into one register.
///
/// # Safety
///
/// The CPU must have AVX-512 F, BW, VL and VNNI; `q` holds whole rows of `d`,
/// `keys` whole rows of `d`, `out` at least `rows · n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
pub(super) unsafe fn scores(q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
    debug_assert!(d.is_multiple_of(32));
    let n = keys.len() / d;
    for (r, q) in q.chunks_exact(d).enumerate() {
        for j in (0..n).step_by(8) {
            // past the last key, repeat it and ignore the result
            let key = |u: usize| (j + u).min(n - 1) * d;
            let mut acc = [_mm512_setzero_si512(); 8];
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
            let used = (n - j).min(8);
            let out = &mut out[r * n + j..][..used];
            // SAFETY: the mask stores the first `used` (≤ 8) lanes, `out`'s length
            // (a copy of `used` values was a call to `memcpy`)
            unsafe { _mm256_mask_storeu_epi32(out.as_mut_ptr(), u8::MAX >> (8 - used), sum8(acc)) };
        }
    }
}

/// The lanes of each of eight accumulators summed, in one register: halves of
/// pairs, quarters of pairs of pairs, then neighbours.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
fn sum8(acc: [__m512i; 8]) -> __m256i {
    // 256-bit halves of a and b added: a's eight partial sums, then b's
    let halves = |a, b| {
        let low = _mm512_shuffle_i64x2::<0b01_00_01_00>(a, b);
        let high = _mm512_shuffle_i64x2::<0b11_10_11_10>(a, b);
        _mm512_add_epi32(low, high)
    };
    // 128-bit quarters of x and y added: four partial sums of each of four keys
    let quarters = |x, y| {
        let even = _mm512_shuffle_i32x4::<0b10_00_10_00>(x, y);
        let odd = _mm512_shuffle_i32x4::<0b11_01_11_01>(x, y);
        _mm512_add_epi32(even, odd)
    };
    // quarter L of `first` sums key 2L, of `second` key 2L + 1
    let first = quarters(halves(acc[0], acc[2]), halves(acc[4], acc[6]));
    let second = quarters(halves(acc[1], acc[3]), halves(acc[5], acc[7]));
    // two partial sums each of keys 2L and 2L + 1 in quarter L, then one
    let pairs = _mm512_add_epi32(
        _mm512_unpacklo_epi64(first, second),
        _mm512_unpackhi_epi64(first, second),
    );
    _mm512_cvtepi64_epi32(_mm512_add_epi32(pairs, _mm512_srli_epi64::<32>(pairs)))
}

/// [`values_i8`](crate::kernel::direct::values_i8) for `d_v` a multiple of 32:
/// two keys at a time, their weights one 32-bit pair (as they lie in `w`).
/// Each pair of rows is interleaved by shifts and blends into the pairs of
/// the even columns and of the odd columns (no shuffles beyond the sign
/// extension), and the two sums interleaved once at the end.
///
/// # Safety
///
/// As [`scores`]; `values` holds one row of `d_v` per weight of `w`, `out` at
/// least `d_v` values, and `w` at most 256 weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn values(w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
    debug_assert!(d_v.is_multiple_of(32) && w.len() <= 256);
    let n = w.len().min(values.len() / d_v);
    let (pairs, last) = w[..n].as_chunks::<2>();
    const HIGH: __mmask32 = 0xAAAA_AAAA; // the high 16 bits of each lane
    for c0 in (0..d_v).step_by(32) {
        // rows j and next interleaved: the pairs of the even columns, then of
        // the odd ones
        let interleave = |j: usize, next: usize| {
            // SAFETY: rows j and next exist; c0 + 32 ≤ d_v
            unsafe {
                let row = |k: usize| values.as_ptr().add(k * d_v + c0);
                let a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(row(j).cast()));
                let b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(row(next).cast()));
                (
                    _mm512_mask_blend_epi16(HIGH, a, _mm512_slli_epi32::<16>(b)),
                    _mm512_mask_blend_epi16(HIGH, _mm512_srli_epi32::<16>(a), b),
                )
            }
        };
        // the pair as one i32, its first weight in the low half
        let weights = |pair: [i16; 2]| {
            _mm512_set1_epi32(i32::from(pair[0] as u16) | (i32::from(pair[1] as u16) << 16))
        };
        // lane l of `even` sums column c0 + 2l, of `odd` column c0 + 2l + 1, in
        // two chains each over every other pair of keys, so that no sum waits
        // on the one before
        let zero = _mm512_setzero_si512();
        let (mut even, mut odd, mut even_next, mut odd_next) = (zero, zero, zero, zero);
        let (twos, one) = pairs.as_chunks::<2>();
        for (i, &[first, second]) in twos.iter().enumerate() {
            let (j, w) = (4 * i, weights(first));
            let (low, high) = interleave(j, j + 1);
            even = _mm512_dpwssd_epi32(even, low, w);
            odd = _mm512_dpwssd_epi32(odd, high, w);
            let (low, high) = interleave(j + 2, j + 3);
            let w = weights(second);
            even_next = _mm512_dpwssd_epi32(even_next, low, w);
            odd_next = _mm512_dpwssd_epi32(odd_next, high, w);
        }
        if let [pair] = *one {
            let (j, w) = (4 * twos.len(), weights(pair));
            let (low, high) = interleave(j, j + 1);
            even = _mm512_dpwssd_epi32(even, low, w);
            odd = _mm512_dpwssd_epi32(odd, high, w);
        }
        if let [w] = *last {
            // an odd last key pairs with itself at weight 0
            let (low, high) = interleave(n - 1, n - 1);
            let w = weights([w, 0]);
            even_next = _mm512_dpwssd_epi32(even_next, low, w);
            odd_next = _mm512_dpwssd_epi32(odd_next, high, w);
        }
        let even = _mm512_add_epi32(even, even_next);
        let odd = _mm512_add_epi32(odd, odd_next);
        let first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        let second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        let out = &mut out[c0..c0 + 32];
        // SAFETY: 32 i32 into `out`
        unsafe {
            _mm512_storeu_si512(
                out.as_mut_ptr().cast(),
                _mm512_permutex2var_epi32(even, first, odd),
            );
            _mm512_storeu_si512(
                out.as_mut_ptr().add(16).cast(),
                _mm512_permutex2var_epi32(even, second, odd),
            );
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
        if !super::detect()
            || !is_x86_feature_detected!("avx512bw")
            || !is_x86_feature_detected!("avx512vl")
        {
            return; // nothing to compare on this CPU
        }
        for (d, n) in [(32, 1), (64, 7), (512, 9), (96, 256)] {
            let q: Vec<i16> = ints(2 * d, 1, 32767);
            let mut keys: Vec<i8> = ints(n * d, 2, 127);
            keys[0] = 127; // the largest products
            // four guard values past the sums: the stores stop at the last key
            let (mut vnni, mut scalar) = (vec![i32::MIN; 2 * n + 4], vec![0; 2 * n]);
            // SAFETY: `detect` and the check above: AVX-512 F, BW, VL and VNNI
            unsafe { super::scores(&q, &keys, d, &mut vnni[..2 * n]) };
            scores_i8(&q, &keys, d, &mut scalar);
            assert_eq!(vnni[..2 * n], scalar, "scores, d {d}, n {n}");
            assert_eq!(vnni[2 * n..], [i32::MIN; 4], "past the sums, d {d}, n {n}");
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
