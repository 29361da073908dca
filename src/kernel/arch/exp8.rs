//! The online softmax's `exp` with AVX2: `eˣ = 2^(n/8) · eʳ` (f32) or
//! `2^(n/16) · eʳ` (f64) with `2^(j/8)` looked up in a register (`vpermps`) or
//! `2^(j/16)` gathered from a table (`vgatherqpd`), so `|r| ≤ ln 2 / 16` (or
//! `/ 32`) and a polynomial of degree 4 (f32) or 7 (f64) is enough where the
//! generic [`exp_nonpositive`](crate::kernel::float::KernelFloat::exp_nonpositive)
//! needs 7 or 13: the softmax shares the FMA ports with the micro-kernels, and
//! its `exp` was 15 % of an f32 call's time at N = 128 on Zen 3. The power
//! `2^m` is built from the bits of the rounded argument with integer adds and
//! shifts. AVX-512's sixteen-lane `exp` is in `exp.rs`.

use std::arch::x86_64::*;

use super::exp::{LOWEST, LOWEST_F64, TABLE_F64};

/// `2^(j/8)` for `j = 0 .. 8`, each the nearest f32.
const TABLE: [f32; 8] = [
    1.0,
    1.090_507_7,
    1.189_207_1,
    1.296_839_6,
    std::f32::consts::SQRT_2,
    1.542_210_8,
    1.681_792_9,
    1.834_008_1,
];

/// Replaces each `x` of `row` by `exp(x − shift)` and returns their sum, for
/// `x ≤ shift` (or `−∞`): within 2 units in the last place of the exact value,
/// 0 below `e⁻⁸⁷`; the lanes past the last whole eight through a register
/// padded with `−∞`, so every entry has the same function. A NaN score is not
/// carried through (the kernels hand a head with one to the reference path
/// before its output is used).
///
/// # Safety
///
/// The CPU must support AVX2 and FMA.
#[inline(always)]
pub(super) unsafe fn exp_and_sum_f32(row: &mut [f32], shift: f32) -> f32 {
    // SAFETY: the caller upholds this function's contract; each load reads,
    // each store writes, eight f32 of `row` or of the tail's copy.
    unsafe {
        let table = _mm256_loadu_ps(TABLE.as_ptr());
        let shift = _mm256_set1_ps(shift);
        // two sums: the adds of a trip do not wait on each other
        let mut sums = [_mm256_setzero_ps(); 2];
        let (pairs, rest) = row.as_chunks_mut::<16>();
        for pair in pairs {
            for (h, sum) in sums.iter_mut().enumerate() {
                let at = pair.as_mut_ptr().add(8 * h);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(at), shift), table);
                _mm256_storeu_ps(at, e);
                *sum = _mm256_add_ps(*sum, e);
            }
        }
        let (whole, tail) = rest.as_chunks_mut::<8>();
        for chunk in whole {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift), table);
            _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            sums[0] = _mm256_add_ps(sums[0], e);
        }
        if !tail.is_empty() {
            let mut lanes = [f32::NEG_INFINITY; 8];
            lanes[..tail.len()].copy_from_slice(tail);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(lanes.as_ptr()), shift), table);
            _mm256_storeu_ps(lanes.as_mut_ptr(), e);
            tail.copy_from_slice(&lanes[..tail.len()]);
            sums[1] = _mm256_add_ps(sums[1], e);
        }
        let sum = _mm256_add_ps(sums[0], sums[1]);
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }
}

/// `eˣ` of eight lanes `x ≤ 0`, `table` holding [`TABLE`]; 0 below
/// [`LOWEST`] (and for `−∞` and NaN).
///
/// # Safety
///
/// The CPU must support AVX2 and FMA.
#[inline(always)]
unsafe fn exp8(x: __m256, table: __m256) -> __m256 {
    const EIGHT_LOG2_E: f32 = 8.0 * std::f32::consts::LOG2_E;
    // ln 2 / 8 = C1 + C2, C1 with few bits so that n·C1 is exact (Cody–Waite)
    const C1: f32 = 0.693_359_4 / 8.0;
    const C2: f32 = -2.121_944_4e-4 / 8.0;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: t's low bits hold n = round(8·x·log₂e)
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(EIGHT_LOG2_E), _mm256_set1_ps(ROUND));
        let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-C1), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-C2), r);
        // eʳ − 1 = r + r²·(1/2 + r/6 + r²/24): the next term is below 2e-9
        // for |r| ≤ ln 2 / 16; by powers of r (Estrin), not Horner, so that
        // fewer steps wait on each other (the loop was bound by the chain)
        let r2 = _mm256_mul_ps(r, r);
        let c = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0 / 6.0), _mm256_set1_ps(0.5));
        let c = _mm256_fmadd_ps(r2, _mm256_set1_ps(1.0 / 24.0), c);
        let em1 = _mm256_fmadd_ps(r2, c, r);
        // n = 8·m + j: the low three bits of t pick 2^(j/8) (vpermps reads only
        // those); 2^m from t's bits shifted down by three: the base of t is a
        // multiple of eight, and the shift up keeps the low 9 bits, m + 127
        let bits = _mm256_castps_si256(t);
        let two_j = _mm256_permutevar8x32_ps(table, bits);
        let m = _mm256_add_epi32(_mm256_srli_epi32::<3>(bits), _mm256_set1_epi32(127));
        let two_n = _mm256_mul_ps(two_j, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(m)));
        let p = _mm256_fmadd_ps(two_n, em1, two_n);
        // below LOWEST (−∞, NaN) the lanes are 0: r and 2^m are garbage there
        let kept = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LOWEST));
        _mm256_and_ps(p, kept)
    }
}

/// [`exp_and_sum_f32`] for f64, four lanes at a time: within 2 units in the
/// last place, 0 below `e⁻⁷⁰⁸`.
///
/// # Safety
///
/// The CPU must support AVX2 and FMA.
#[inline(always)]
pub(super) unsafe fn exp_and_sum_f64(row: &mut [f64], shift: f64) -> f64 {
    // SAFETY: the caller upholds this function's contract; each load reads,
    // each store writes, four f64 of `row` or of the tail's copy.
    unsafe {
        let shift = _mm256_set1_pd(shift);
        let mut sums = [_mm256_setzero_pd(); 2];
        let (pairs, rest) = row.as_chunks_mut::<8>();
        for pair in pairs {
            for (h, sum) in sums.iter_mut().enumerate() {
                let at = pair.as_mut_ptr().add(4 * h);
                let e = exp4(_mm256_sub_pd(_mm256_loadu_pd(at), shift));
                _mm256_storeu_pd(at, e);
                *sum = _mm256_add_pd(*sum, e);
            }
        }
        let (whole, tail) = rest.as_chunks_mut::<4>();
        for chunk in whole {
            let e = exp4(_mm256_sub_pd(_mm256_loadu_pd(chunk.as_ptr()), shift));
            _mm256_storeu_pd(chunk.as_mut_ptr(), e);
            sums[0] = _mm256_add_pd(sums[0], e);
        }
        if !tail.is_empty() {
            let mut lanes = [f64::NEG_INFINITY; 4];
            lanes[..tail.len()].copy_from_slice(tail);
            let e = exp4(_mm256_sub_pd(_mm256_loadu_pd(lanes.as_ptr()), shift));
            _mm256_storeu_pd(lanes.as_mut_ptr(), e);
            tail.copy_from_slice(&lanes[..tail.len()]);
            sums[1] = _mm256_add_pd(sums[1], e);
        }
        let sum = _mm256_add_pd(sums[0], sums[1]);
        let half = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd::<1>(sum));
        _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)))
    }
}

/// `eˣ` of four lanes `x ≤ 0`: `2^(j/16)` gathered from [`TABLE_F64`], then
/// AVX-512's polynomial (`exp8` in `exp.rs`) by powers of `r`; 0 below
/// [`LOWEST_F64`] (and for `−∞` and NaN).
///
/// # Safety
///
/// The CPU must support AVX2 and FMA.
#[inline(always)]
unsafe fn exp4(x: __m256d) -> __m256d {
    const SIXTEEN_LOG2_E: f64 = 16.0 * std::f64::consts::LOG2_E;
    const C1: f64 = 0.693_145_751_953_125 / 16.0;
    const C2: f64 = 1.428_606_820_309_417_3e-6 / 16.0;
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
    // SAFETY: the caller upholds this function's contract; the gather reads
    // entries 0 .. 16 of the table (its indices are four bits).
    unsafe {
        let c = _mm256_set1_pd;
        let t = _mm256_fmadd_pd(x, c(SIXTEEN_LOG2_E), c(ROUND));
        let n = _mm256_sub_pd(t, c(ROUND));
        let r = _mm256_fmadd_pd(n, c(-C1), x);
        let r = _mm256_fmadd_pd(n, c(-C2), r);
        // eʳ − 1 = r + r²·(1/2 + r/6 + … + r⁵/5040), degree 7: the next term
        // is below 2e-18 for |r| ≤ ln 2 / 32; by powers of r (Estrin), as
        // for f32
        let r2 = _mm256_mul_pd(r, r);
        let r4 = _mm256_mul_pd(r2, r2);
        let low = _mm256_fmadd_pd(r, c(1.0 / 6.0), c(0.5));
        let middle = _mm256_fmadd_pd(r, c(1.0 / 120.0), c(1.0 / 24.0));
        let high = _mm256_fmadd_pd(r, c(1.0 / 5040.0), c(1.0 / 720.0));
        let sum = _mm256_fmadd_pd(r4, high, _mm256_fmadd_pd(r2, middle, low));
        let em1 = _mm256_fmadd_pd(r2, sum, r);
        // n = 16·m + j: the low four bits of t index the table; 2^m from t's
        // bits shifted down by four (the shift up keeps the low 12 bits, m + 1023)
        let bits = _mm256_castpd_si256(t);
        let j = _mm256_and_si256(bits, _mm256_set1_epi64x(15));
        let two_j = _mm256_i64gather_pd::<8>(TABLE_F64.as_ptr(), j);
        let m = _mm256_add_epi64(_mm256_srli_epi64::<4>(bits), _mm256_set1_epi64x(1023));
        let two_n = _mm256_mul_pd(two_j, _mm256_castsi256_pd(_mm256_slli_epi64::<52>(m)));
        let p = _mm256_fmadd_pd(two_n, em1, two_n);
        let kept = _mm256_cmp_pd::<_CMP_GE_OQ>(x, _mm256_set1_pd(LOWEST_F64));
        _mm256_and_pd(p, kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::arch::exp::tests::{assert_f64_within_two_ulps, assert_within_two_ulps};

    fn has_avx2() -> bool {
        let has = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if !has {
            eprintln!("skipped: this CPU has no AVX2");
        }
        has
    }

    #[test]
    fn exp_and_sum_is_within_two_ulps() {
        if has_avx2() {
            // SAFETY: checked above that the CPU has AVX2 and FMA.
            assert_within_two_ulps(|row, shift| unsafe { exp_and_sum_f32(row, shift) }, LOWEST);
        }
    }

    #[test]
    fn exp_and_sum_f64_is_within_two_ulps() {
        if has_avx2() {
            // SAFETY: checked above that the CPU has AVX2 and FMA.
            assert_f64_within_two_ulps(
                |row, shift| unsafe { exp_and_sum_f64(row, shift) },
                LOWEST_F64,
            );
        }
    }
}
