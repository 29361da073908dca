//! The online softmax's `exp` with AVX-512: `eˣ = 2^(n/16) · eʳ` with
//! `2^(j/16)` looked up in a table of sixteen values held in registers
//! (`vpermps`, `vpermt2pd`), so `|r| ≤ ln 2 / 32` and a polynomial of degree 3
//! (f32) or 7 (f64) is enough where the generic
//! [`exp_nonpositive`](crate::kernel::float::KernelFloat::exp_nonpositive)
//! needs 7 or 13. The softmax runs on the same FMA ports as the micro-kernels: four
//! fewer multiply-adds per sixteen scores made f32 prefill 3–4 % faster on
//! Zen 4 (N = 128–2048, one thread, 2026-12-05), decoding steps 1–2 %. The
//! power `2^m` by `vscalefps`/`vscalefpd` under the mask of the lanes above the
//! lowest argument (no clamp, no integer shifts: three instructions fewer, the
//! same bits) made it 2–3 % faster on Intel (f32, 2026-12-06).

use std::arch::x86_64::*;

/// `2^(j/16)` for `j = 0 .. 16`, each the nearest f32.
pub(super) const TABLE: [f32; 16] = [
    1.0,
    1.044_273_7,
    1.090_507_7,
    1.138_788_6,
    1.189_207_1,
    1.241_857_8,
    1.296_839_6,
    1.354_255_6,
    std::f32::consts::SQRT_2,
    1.476_826_2,
    1.542_210_8,
    1.610_490_3,
    1.681_792_9,
    1.756_252_2,
    1.834_008_1,
    1.915_206_6,
];

/// Below this `eˣ` is 0 (as the generic `exp`): `e⁻⁸⁷` is just above the
/// smallest normal f32.
pub(super) const LOWEST: f32 = -87.0;

/// Replaces each `x` of `row` by `exp(x − shift)` and returns their sum, for
/// `x ≤ shift` (or `−∞`): within 2 units in the last place of the exact value
/// (the table's rounding, the last multiply-add's, and `r`'s), 0 below
/// `e⁻⁸⁷`. A NaN score is not carried through (the kernels hand a head with
/// one to the reference path before its output is used).
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
pub(super) unsafe fn exp_and_sum_f32(row: &mut [f32], shift: f32) -> f32 {
    // SAFETY: the caller upholds this function's contract (AVX-512 F); each load
    // reads, each store writes, sixteen f32 of `row` (or the masked tail's).
    unsafe {
        let table = _mm512_loadu_ps(TABLE.as_ptr());
        let shift = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let (chunks, rest) = row.as_chunks_mut::<16>();
        for chunk in chunks {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), shift), table);
            _mm512_storeu_ps(chunk.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
        if !rest.is_empty() {
            let lanes: __mmask16 = (1 << rest.len()) - 1;
            let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, rest.as_ptr()), shift);
            let e = _mm512_maskz_mov_ps(lanes, exp16(x, table));
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), lanes, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_reduce_add_ps(sum)
    }
}

/// `eˣ` of sixteen lanes `x ≤ 0`, `table` holding [`TABLE`].
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
pub(super) unsafe fn exp16(x: __m512, table: __m512) -> __m512 {
    const SIXTEEN_LOG2_E: f32 = 16.0 * std::f32::consts::LOG2_E;
    // ln 2 / 16 = C1 + C2, C1 with few bits so that n·C1 is exact (Cody–Waite)
    const C1: f32 = 0.693_359_4 / 16.0;
    const C2: f32 = -2.121_944_4e-4 / 16.0;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: t's low bits hold n = round(16·x·log₂e)
    // SAFETY: the caller upholds this function's contract (AVX-512 F).
    unsafe {
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(SIXTEEN_LOG2_E), _mm512_set1_ps(ROUND));
        let n = _mm512_sub_ps(t, _mm512_set1_ps(ROUND));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-C1), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-C2), r);
        // eʳ − 1 = r + r²/2 + r³/6: the next term is below 1e-8 for |r| ≤ ln 2 / 32
        let q = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0 / 6.0), _mm512_set1_ps(0.5));
        let q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0));
        let q = _mm512_mul_ps(q, r);
        // n = 16·m + j: the low four bits of t pick 2^(j/16) (vpermps reads only
        // those); vscalefps multiplies by 2^⌊n/16⌋ = 2^m. Below LOWEST (−∞,
        // NaN) the lanes are not computed: r may be NaN there.
        let two_j = _mm512_permutexvar_ps(_mm512_castps_si512(t), table);
        let p = _mm512_fmadd_ps(two_j, q, two_j);
        let kept = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(LOWEST));
        _mm512_maskz_scalef_ps(kept, p, _mm512_mul_ps(n, _mm512_set1_ps(1.0 / 16.0)))
    }
}

/// `2^(j/16)` for `j = 0 .. 16`, each the nearest f64.
pub(super) const TABLE_F64: [f64; 16] = [
    1.0,
    1.044_273_782_427_413_8,
    1.090_507_732_665_257_7,
    1.138_788_634_756_691_6,
    1.189_207_115_002_721,
    1.241_857_812_073_484,
    1.296_839_554_651_009_6,
    1.354_255_546_936_892_7,
    std::f64::consts::SQRT_2,
    1.476_826_145_939_499_3,
    1.542_210_825_407_940_7,
    1.610_490_331_949_254_3,
    1.681_792_830_507_429,
    1.756_252_160_373_299_5,
    1.834_008_086_409_342_4,
    1.915_206_561_397_147_4,
];

/// Below this `eˣ` is 0 (as the generic `exp`): `e⁻⁷⁰⁸` is just above the
/// smallest normal f64.
pub(super) const LOWEST_F64: f64 = -708.0;

/// [`exp_and_sum_f32`] for f64, eight lanes at a time: within 2 units in the
/// last place, 0 below `e⁻⁷⁰⁸`.
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
pub(super) unsafe fn exp_and_sum_f64(row: &mut [f64], shift: f64) -> f64 {
    // SAFETY: the caller upholds this function's contract (AVX-512 F); each load
    // reads, each store writes, eight f64 of `row` (or the masked tail's).
    unsafe {
        let low = _mm512_loadu_pd(TABLE_F64.as_ptr());
        let high = _mm512_loadu_pd(TABLE_F64.as_ptr().add(8));
        let shift = _mm512_set1_pd(shift);
        let mut sum = _mm512_setzero_pd();
        let (chunks, rest) = row.as_chunks_mut::<8>();
        for chunk in chunks {
            let e = exp8(
                _mm512_sub_pd(_mm512_loadu_pd(chunk.as_ptr()), shift),
                low,
                high,
            );
            _mm512_storeu_pd(chunk.as_mut_ptr(), e);
            sum = _mm512_add_pd(sum, e);
        }
        if !rest.is_empty() {
            let lanes: __mmask8 = (1 << rest.len()) - 1;
            let x = _mm512_sub_pd(_mm512_maskz_loadu_pd(lanes, rest.as_ptr()), shift);
            let e = _mm512_maskz_mov_pd(lanes, exp8(x, low, high));
            _mm512_mask_storeu_pd(rest.as_mut_ptr(), lanes, e);
            sum = _mm512_add_pd(sum, e);
        }
        _mm512_reduce_add_pd(sum)
    }
}

/// `eˣ` of eight lanes `x ≤ 0`, `low` and `high` holding [`TABLE_F64`]'s
/// halves; as [`exp16`].
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn exp8(x: __m512d, low: __m512d, high: __m512d) -> __m512d {
    const SIXTEEN_LOG2_E: f64 = 16.0 * std::f64::consts::LOG2_E;
    const C1: f64 = 0.693_145_751_953_125 / 16.0;
    const C2: f64 = 1.428_606_820_309_417_3e-6 / 16.0;
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
    // eʳ − 1 to degree 7: the next term is below 2e-18 for |r| ≤ ln 2 / 32
    const INVERSE_FACTORIALS: [f64; 6] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
    // SAFETY: the caller upholds this function's contract (AVX-512 F).
    unsafe {
        let t = _mm512_fmadd_pd(x, _mm512_set1_pd(SIXTEEN_LOG2_E), _mm512_set1_pd(ROUND));
        let n = _mm512_sub_pd(t, _mm512_set1_pd(ROUND));
        let r = _mm512_fmadd_pd(n, _mm512_set1_pd(-C1), x);
        let r = _mm512_fmadd_pd(n, _mm512_set1_pd(-C2), r);
        let mut q = _mm512_set1_pd(INVERSE_FACTORIALS[0]);
        for &c in &INVERSE_FACTORIALS[1..] {
            q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(c));
        }
        let q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0));
        let q = _mm512_mul_pd(q, r);
        // n = 16·m + j: vpermt2pd reads the low four bits of each index
        let two_j = _mm512_permutex2var_pd(low, _mm512_castpd_si512(t), high);
        let p = _mm512_fmadd_pd(two_j, q, two_j);
        let kept = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(x, _mm512_set1_pd(LOWEST_F64));
        _mm512_maskz_scalef_pd(kept, p, _mm512_mul_pd(n, _mm512_set1_pd(1.0 / 16.0)))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Rows of every length to 40 (the tail) over `[-100, 0]` and `−∞`
    /// through `exp_and_sum` (f32): each value within 2 units in the last place
    /// of `f64::exp`, 0 below `lowest`, and the sum the values' sum.
    pub(in crate::kernel::arch) fn assert_within_two_ulps(
        exp_and_sum: impl Fn(&mut [f32], f32) -> f32,
        lowest: f32,
    ) {
        let mut worst = 0.0_f64;
        let mut state = 0x9e37_79b9_u32;
        for len in 0..=40 {
            for _ in 0..2000 {
                let row: Vec<f32> = (0..len)
                    .map(|i| {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        match (state % 97, i % 3) {
                            (0, _) => f32::NEG_INFINITY,
                            (_, 0) => -(state as f32 / u32::MAX as f32) * 100.0,
                            _ => -(state as f32 / u32::MAX as f32) * 3.0,
                        }
                    })
                    .collect();
                let shift = -0.25;
                let mut out = row.clone();
                let sum = exp_and_sum(&mut out, shift);
                let mut total = 0.0_f64;
                for (&x, &e) in row.iter().zip(&out) {
                    let x = x - shift; // as the kernel rounds it
                    if x < lowest {
                        assert_eq!(e, 0.0, "exp({x})");
                        continue;
                    }
                    let want = f64::from(x).exp();
                    let ulp = want * f64::from(f32::EPSILON);
                    worst = worst.max((f64::from(e) - want).abs() / ulp);
                    total += f64::from(e);
                }
                assert!((f64::from(sum) - total).abs() <= 1e-6 * total.max(1.0));
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulps");
        eprintln!("worst error {worst:.3} ulps");
    }

    /// As [`assert_within_two_ulps`] for f64: rows of every length to 20 over
    /// `[-800, 0]` and `−∞`.
    pub(in crate::kernel::arch) fn assert_f64_within_two_ulps(
        exp_and_sum: impl Fn(&mut [f64], f64) -> f64,
        lowest: f64,
    ) {
        let mut worst = 0.0_f64;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..=20 {
            for _ in 0..4000 {
                let row: Vec<f64> = (0..len)
                    .map(|i| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                        match (state % 97, i % 3) {
                            (0, _) => f64::NEG_INFINITY,
                            (_, 0) => -u * 800.0,
                            _ => -u * 3.0,
                        }
                    })
                    .collect();
                let shift = -0.25;
                let mut out = row.clone();
                let sum = exp_and_sum(&mut out, shift);
                let mut total = 0.0_f64;
                for (&x, &e) in row.iter().zip(&out) {
                    let x = x - shift;
                    if x < lowest {
                        assert_eq!(e, 0.0, "exp({x})");
                        continue;
                    }
                    let want = x.exp();
                    worst = worst.max((e - want).abs() / (want * f64::EPSILON));
                    total += e;
                }
                assert!((sum - total).abs() <= 1e-14 * total.max(1.0));
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulps");
        eprintln!("worst error {worst:.3} ulps");
    }

    #[test]
    fn exp_and_sum_is_within_two_ulps() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512 F");
            return;
        }
        // SAFETY: checked above that the CPU has AVX-512 F.
        assert_within_two_ulps(|row, shift| unsafe { exp_and_sum_f32(row, shift) }, LOWEST);
    }

    #[test]
    fn exp_and_sum_f64_is_within_two_ulps() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512 F");
            return;
        }
        // SAFETY: checked above that the CPU has AVX-512 F.
        assert_f64_within_two_ulps(
            |row, shift| unsafe { exp_and_sum_f64(row, shift) },
            LOWEST_F64,
        );
    }
}
