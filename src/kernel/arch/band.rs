//! The online softmax's step for a band of sixteen rows of scores at once with
//! AVX-512, their weights written as f32 (the AVX-512 f32 blocks) or bf16 (the
//! AMX tiles' `P·V` operand).
//!
//! Row by row, each row pays for two reductions across a register (its maximum,
//! its sum) and a scalar `exp` of its rescaling factor; at 256 keys a row that
//! is a third of its work. Sixteen rows share them: their sixteen registers of
//! lane maxima (and of lane sums) are reduced into one register holding a lane
//! per row ([`across`]), and one [`exp16`] gives the sixteen factors.

use std::arch::x86_64::*;

use super::exp::{TABLE, exp16};
use crate::kernel::params::BC;
use crate::kernel::tiled::RowStates;

/// Rows of a band: the lanes of a register.
pub(super) const BAND: usize = 16;

/// The online softmax's state of a band's rows (see [`crate::kernel::online`]):
/// each row's maximum and sum so far, and the factor `α` the step writes.
pub(super) struct BandState<'a> {
    pub(super) max: &'a mut [f32; BAND],
    pub(super) sum: &'a mut [f32; BAND],
    pub(super) alpha: &'a mut [f32; BAND],
}

/// [`softmax_band`] over the first `bands` bands of sixteen rows of a block's
/// scores `s` (rows of `BC`) and those rows' states.
///
/// # Safety
///
/// As [`softmax_band`].
#[inline(always)]
pub(super) unsafe fn softmax_bands<const BF16: bool>(
    s: &mut [f32],
    width: usize,
    bands: usize,
    scale: f32,
    state: &mut RowStates<'_, f32>,
) {
    let states = state
        .max
        .as_chunks_mut::<BAND>()
        .0
        .iter_mut()
        .zip(state.sum.as_chunks_mut::<BAND>().0)
        .zip(state.alpha.as_chunks_mut::<BAND>().0);
    let rows = s.as_chunks_mut::<{ BAND * BC }>().0.iter_mut();
    for (band, ((max, sum), alpha)) in rows.zip(states).take(bands) {
        // SAFETY: the caller upholds the contract.
        unsafe { softmax_band::<BF16>(band, width, scale, BandState { max, sum, alpha }) };
    }
}

/// One step of the online softmax over the first `width` scores (a multiple of
/// 16) of each of the band's 16 rows of `BC` in `s`, the scores `x` times
/// `scale` (1 where they carry it): the weights `exp(scale·x − shift)` replace
/// the scores. For `BF16` (by [`weight`], within 4·10⁻⁶ of themselves) they
/// are rounded to bf16 and written as 16-bit words from each row's first
/// byte, zero to a whole step of 32 weights; else they are [`exp16`]'s of the
/// argument rounded once, in place, as `exp_and_sum_f32` gives them. The state
/// moves on as by [`crate::kernel::online::rescale`] and
/// [`crate::kernel::online::fold_step`], the sum being of the f32 weights.
/// A NaN score is passed over by the maximum.
///
/// # Safety
///
/// The CPU must support AVX-512 F, and AVX512_BF16 for `BF16`; `scale > 0`.
#[inline(always)]
pub(super) unsafe fn softmax_band<const BF16: bool>(
    s: &mut [f32; BAND * BC],
    width: usize,
    scale: f32,
    state: BandState<'_>,
) {
    assert!(width.is_multiple_of(16) && width <= BC);
    let panels = width / 16;
    let at = s.as_mut_ptr();
    // SAFETY: the caller upholds the CPU's part; every load reads 16 f32 of a
    // row's first `width` (row `r` at `r·BC`), every store writes the 64 bytes
    // at `2j` of a row whose f32 at `j .. j + 32` were read before it, and
    // `2j + 64 ≤ 4·BC`.
    unsafe {
        let mut lanes = [_mm512_set1_ps(f32::NEG_INFINITY); BAND];
        for (r, lane) in lanes.iter_mut().enumerate() {
            let row = at.add(r * BC);
            // two chains of maxima; `vmaxps x, m` leaves `m` for a NaN `x`
            let mut even = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut odd = even;
            for p in (0..panels - panels % 2).step_by(2) {
                even = _mm512_max_ps(_mm512_loadu_ps(row.add(16 * p)), even);
                odd = _mm512_max_ps(_mm512_loadu_ps(row.add(16 * p + 16)), odd);
            }
            if panels % 2 == 1 {
                even = _mm512_max_ps(_mm512_loadu_ps(row.add(16 * (panels - 1))), even);
            }
            *lane = _mm512_max_ps(even, odd);
        }
        let block_max = _mm512_mul_ps(across::<true>(&lanes), _mm512_set1_ps(scale));
        let old = _mm512_loadu_ps(state.max.as_ptr());
        // the maximum moves to the block's where it is larger; the shift is 0
        // for a row that has seen only −∞ (rescale's `shift_of`)
        let max = _mm512_max_ps(block_max, old);
        let unseen = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(max, _mm512_set1_ps(f32::NEG_INFINITY));
        let shift = _mm512_mask_mov_ps(max, unseen, _mm512_setzero_ps());
        let table = _mm512_loadu_ps(TABLE.as_ptr());
        let alpha = exp16(_mm512_sub_ps(old, shift), table);
        _mm512_storeu_ps(state.max.as_mut_ptr(), max);
        _mm512_storeu_ps(state.alpha.as_mut_ptr(), alpha);

        // bf16 weights in base 2: 2^(x·scale·log₂e − shift·log₂e); f32 ones
        // by `exp16(scale·x − shift)`, as `exp_and_sum` gives them row by row
        let base = if BF16 { std::f32::consts::LOG2_E } else { 1.0 };
        let mut shifts = [0.0f32; BAND];
        _mm512_storeu_ps(
            shifts.as_mut_ptr(),
            _mm512_mul_ps(shift, _mm512_set1_ps(base)),
        );
        let scale = _mm512_set1_ps(scale * base);
        let mut sums = [_mm512_setzero_ps(); BAND];
        for (r, sum) in sums.iter_mut().enumerate() {
            let row = at.add(r * BC);
            let minus = _mm512_set1_ps(-shifts[r]);
            for j in (0..width).step_by(32) {
                let low = weights::<BF16>(row.add(j), scale, minus, table);
                let high = match j + 16 < width {
                    true => weights::<BF16>(row.add(j + 16), scale, minus, table),
                    false => _mm512_setzero_ps(),
                };
                *sum = _mm512_add_ps(*sum, _mm512_add_ps(low, high));
                if BF16 {
                    let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                    _mm512_storeu_si512(row.cast::<u16>().add(j).cast(), pairs);
                } else {
                    _mm512_storeu_ps(row.add(j), low);
                    if j + 16 < width {
                        _mm512_storeu_ps(row.add(j + 16), high);
                    }
                }
            }
        }
        let block_sum = across::<false>(&sums);
        let sum = _mm512_loadu_ps(state.sum.as_ptr());
        _mm512_storeu_ps(
            state.sum.as_mut_ptr(),
            _mm512_fmadd_ps(sum, alpha, block_sum),
        );
    }
}

/// The 16 weights of the scores at `at`: [`weight`]'s where they are rounded
/// to bf16 next, else `exp16(scale·x + minus)`.
///
/// # Safety
///
/// The CPU must support AVX-512 F; 16 f32 at `at` are readable.
#[inline(always)]
unsafe fn weights<const BF16: bool>(
    at: *const f32,
    scale: __m512,
    minus: __m512,
    table: __m512,
) -> __m512 {
    // SAFETY: the caller upholds the contract.
    unsafe {
        match BF16 {
            true => weight(at, scale, minus),
            false => exp16(_mm512_fmadd_ps(_mm512_loadu_ps(at), scale, minus), table),
        }
    }
}

/// `2^(scale·x + minus)` of the 16 scores `x` at `at` (`scale` and `minus`
/// in base 2: the weight `exp(s·x − shift)` for `scale = s·log₂e`, `minus =
/// −shift·log₂e`): `2ⁿ·2ʳ` with `n` the nearest integer and `2ʳ`, `|r| ≤ ½`,
/// by a polynomial of degree 4 (within 2.7·10⁻⁶ of itself evaluated in f32),
/// 0 below `2⁻¹²⁵` (so never subnormal) and for a NaN. Rounding the exponent's
/// argument once in base 2 costs at most `|y|·2⁻²⁴·ln 2` more (`y` its value),
/// under 10⁻⁶ of a weight above `e⁻²⁰`. Both are far below the bf16 rounding
/// of the weights that comes next (`2⁻⁹`); the lse moves by as much (3·10⁻⁶).
/// Ten vector instructions where [`exp16`] and its argument take sixteen:
/// the band's softmax is bound by the two vector ports, and this made the
/// bf16 prefill 9–10 % faster (Intel Xeon, N = 512 and 2048, one thread).
/// (A function, not a closure: a closure may be compiled out of line without
/// the caller's instruction sets.)
///
/// # Safety
///
/// The CPU must support AVX-512 F; 16 f32 at `at` are readable.
#[inline(always)]
unsafe fn weight(at: *const f32, scale: __m512, minus: __m512) -> __m512 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: y + ROUND rounds y to an integer
    // 2ʳ on [−½, ½]: least relative error (Lawson's weights), f32 coefficients
    const C: [f32; 5] = [
        0.999_999_3,
        0.693_121_8,
        0.240_247_44,
        0.055_917_86,
        0.009_570_101,
    ];
    // SAFETY: the caller upholds the contract.
    unsafe {
        let y = _mm512_fmadd_ps(_mm512_loadu_ps(at), scale, minus);
        let n = _mm512_sub_ps(
            _mm512_add_ps(y, _mm512_set1_ps(ROUND)),
            _mm512_set1_ps(ROUND),
        );
        let r = _mm512_sub_ps(y, n);
        let mut p = _mm512_set1_ps(C[4]);
        for &c in C[..4].iter().rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // −∞ (a hidden score), NaN and the tail give 0; r is NaN there
        let kept = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, _mm512_set1_ps(-125.0));
        _mm512_maskz_scalef_ps(kept, p, n)
    }
}

/// `a ∘ b`: the larger (`b` where either is NaN), or the sum.
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn combine<const MAX: bool>(a: __m512, b: __m512) -> __m512 {
    // SAFETY: the caller upholds the contract.
    unsafe {
        if MAX {
            _mm512_max_ps(a, b)
        } else {
            _mm512_add_ps(a, b)
        }
    }
}

/// Lane `r` of the result: the 16 lanes of `v[r]` combined (their maximum, or
/// sum): 15 combinations and 30 shuffles for the 16 rows, where one row's own
/// reduction takes 4 and 4.
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn across<const MAX: bool>(v: &[__m512; BAND]) -> __m512 {
    // SAFETY: the caller upholds the contract; shuffles only.
    unsafe {
        // per 128-bit lane k: (a, b) = v[2i], v[2i + 1] give
        // [a0∘a2, b0∘b2, a1∘a3, b1∘b3]
        let mut pairs = [_mm512_setzero_ps(); 8];
        for (i, pair) in pairs.iter_mut().enumerate() {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            *pair = combine::<MAX>(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // per 128-bit lane k: v[4i .. 4i + 4], each over its four lanes of k
        let mut fours = [_mm512_setzero_ps(); 4];
        for (i, four) in fours.iter_mut().enumerate() {
            let (a, b) = (
                _mm512_castps_pd(pairs[2 * i]),
                _mm512_castps_pd(pairs[2 * i + 1]),
            );
            *four = combine::<MAX>(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            );
        }
        // 128-bit lanes (0, 2) with (1, 3): two registers, each lane a half of
        // a four's 128-bit lanes, then the halves
        const EVEN: i32 = 0b10_00_10_00;
        const ODD: i32 = 0b11_01_11_01;
        let mut halves = [_mm512_setzero_ps(); 2];
        for (i, half) in halves.iter_mut().enumerate() {
            let (a, b) = (fours[2 * i], fours[2 * i + 1]);
            *half = combine::<MAX>(
                _mm512_shuffle_f32x4::<EVEN>(a, b),
                _mm512_shuffle_f32x4::<ODD>(a, b),
            );
        }
        let (a, b) = (halves[0], halves[1]);
        combine::<MAX>(
            _mm512_shuffle_f32x4::<EVEN>(a, b),
            _mm512_shuffle_f32x4::<ODD>(a, b),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sixteen rows against a plain f64 step, row by row: each row's maximum
    /// exact, `α` and the sum within f32 rounding, each weight within its bf16
    /// rounding and zero past the row to a whole step of 32 (bf16) or within
    /// two units in the last place and its argument's rounding (f32); rows
    /// that see only `−∞`, a NaN passed over, a maximum that moves and one
    /// that does not.
    #[test]
    fn a_band_steps_as_its_rows_one_by_one() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512 F");
            return;
        }
        steps_as_rows::<false>();
        if is_x86_feature_detected!("avx512bf16") {
            steps_as_rows::<true>();
        } else {
            eprintln!("bf16 weights skipped: this CPU has no AVX512_BF16");
        }
    }

    fn steps_as_rows<const BF16: bool>() {
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32
        };
        for (width, scale) in [(16, 1.0), (48, 0.125), (256, 0.3), (240, 1.7)] {
            let mut s = vec![0.0f32; BAND * BC];
            for (r, row) in s.chunks_exact_mut(BC).enumerate() {
                for x in &mut row[..width] {
                    *x = match r {
                        0 | 1 => f32::NEG_INFINITY,
                        _ if next() < 0.05 => f32::NEG_INFINITY,
                        _ => (next() - 0.5) * 20.0,
                    };
                }
                // garbage past the row, which the weights' zeros must cover
                row[width..].fill(7.0);
            }
            s[2 * BC + width / 2] = f32::NAN;
            let scores = s.clone();
            // rows 0 and 2 have seen nothing yet; row 1 has; the others have a
            // maximum some above, some below the block's
            let mut max: [f32; BAND] = std::array::from_fn(|r| match r {
                0 | 2 => f32::NEG_INFINITY,
                _ => (next() - 0.5) * 25.0,
            });
            let mut sum: [f32; BAND] = std::array::from_fn(|r| {
                if max[r].is_finite() {
                    1.0 + next()
                } else {
                    0.0
                }
            });
            let mut alpha = [f32::NAN; BAND];
            let (old_max, old_sum) = (max, sum);
            let state = BandState {
                max: &mut max,
                sum: &mut sum,
                alpha: &mut alpha,
            };
            // SAFETY: checked above; the scale is positive.
            unsafe {
                softmax_band::<BF16>(s.as_mut_slice().try_into().unwrap(), width, scale, state)
            };

            for r in 0..BAND {
                let raw = &scores[r * BC..r * BC + width];
                let block = raw
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
                let expect_max = old_max[r].max(block * scale);
                assert_eq!(max[r], expect_max, "row {r}");
                let shift = if expect_max == f32::NEG_INFINITY {
                    0.0
                } else {
                    f64::from(expect_max)
                };
                let expect_alpha = (f64::from(old_max[r]) - shift).exp();
                assert!((f64::from(alpha[r]) - expect_alpha).abs() <= 1e-6 * expect_alpha);
                let row = &s[r * BC..];
                let weights: &[u16] =
                    // SAFETY: a row of f32 read as twice as many 16-bit words.
                    unsafe { std::slice::from_raw_parts(row.as_ptr().cast(), 2 * BC) };
                let mut total = 0.0f64;
                for (j, &x) in raw.iter().enumerate() {
                    let exact = if x.is_nan() {
                        0.0
                    } else {
                        (f64::from(x) * f64::from(scale) - shift).exp()
                    };
                    total += exact;
                    if BF16 {
                        let w = f64::from(f32::from_bits(u32::from(weights[j]) << 16));
                        assert!(
                            (w - exact).abs() <= exact / 256.0 + 1e-30,
                            "row {r} key {j}"
                        );
                    } else {
                        // 2 ulp of exp16, and the argument's one rounding
                        let argument = f64::from(x) * f64::from(scale) - shift;
                        let rounding = match argument.is_finite() {
                            true => exact * (2.5e-7 + argument.abs() * 6e-8),
                            false => 0.0,
                        };
                        let allowed = rounding + 1e-37;
                        let w = f64::from(row[j]);
                        assert!((w - exact).abs() <= allowed, "row {r} key {j}");
                    }
                }
                if BF16 {
                    assert!(
                        weights[width..width.next_multiple_of(32)]
                            .iter()
                            .all(|&w| w == 0)
                    );
                }
                let expect_sum = f64::from(old_sum[r]) * expect_alpha + total;
                assert!((f64::from(sum[r]) - expect_sum).abs() <= 1e-5 * expect_sum.max(1e-30));
            }
        }
    }
}
