//! What the fused kernel needs of an element type: a fast `exp`, and the
//! instruction set it runs with.

use ndarray::NdFloat;

use super::fusable::Magnitude;
use crate::element::Element;

/// How `a·b + c` is evaluated: one fused instruction, or a multiply and an add.
///
/// The kernels are generic over this so that one body compiles both for CPUs
/// with FMA (under `#[target_feature]`) and for the portable fallback, where
/// `mul_add` would call a slow library function.
pub(crate) trait MulAdd {
    fn mul_add<A: NdFloat>(a: A, b: A, c: A) -> A;
}

/// `a·b + c` in one rounding (`vfmadd` where the caller enables FMA).
pub(crate) struct Fused;

/// `a·b + c` as a multiply and an add.
pub(crate) struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add<A: NdFloat>(a: A, b: A, c: A) -> A {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add<A: NdFloat>(a: A, b: A, c: A) -> A {
        a * b + c
    }
}

/// An element type the fused kernels are written for.
pub(crate) trait KernelFloat: Element + Magnitude<Float = Self> + Default {
    /// `eˣ` for `x ≤ 0` (and `x = −∞`), written so that a loop over it vectorises:
    /// no branches, no calls. Accurate to about one unit in the last place;
    /// results below the smallest normal number are 0.
    fn exp_nonpositive<M: MulAdd>(x: Self) -> Self;
}

impl KernelFloat for f32 {
    #[inline(always)]
    fn exp_nonpositive<M: MulAdd>(x: f32) -> f32 {
        // eˣ = 2ⁿ·eʳ with n = round(x/ln 2), r = x − n·ln 2 (Cody–Waite: ln 2 = C1 + C2)
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        const C1: f32 = 0.693_359_4;
        const C2: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
        const LOWEST: f32 = -87.0; // e⁻⁸⁷ is just above the smallest normal f32
        let xc = if x < LOWEST { LOWEST } else { x };
        // t = 1.5·2²³ + n: its low mantissa bits hold the integer n
        let t = M::mul_add(xc, LOG2_E, ROUND);
        let n = t - ROUND;
        let r = M::mul_add(n, -C2, M::mul_add(n, -C1, xc));
        // Taylor series of eʳ to degree 7: error below 6e-9 for |r| ≤ ln 2 / 2
        let mut p: f32 = 1.0 / 5040.0;
        p = M::mul_add(p, r, 1.0 / 720.0);
        p = M::mul_add(p, r, 1.0 / 120.0);
        p = M::mul_add(p, r, 1.0 / 24.0);
        p = M::mul_add(p, r, 1.0 / 6.0);
        p = M::mul_add(p, r, 0.5);
        p = M::mul_add(p, r, 1.0);
        p = M::mul_add(p, r, 1.0);
        // 2ⁿ from the bits of t, with integer adds and shifts only (no float-to-int
        // conversion): the shift keeps the low 9 bits, (n + 127) mod 2⁹
        let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
        if x < LOWEST { 0.0 } else { p * two_n }
    }
}

impl KernelFloat for f64 {
    #[inline(always)]
    fn exp_nonpositive<M: MulAdd>(x: f64) -> f64 {
        const LOG2_E: f64 = std::f64::consts::LOG2_E;
        const C1: f64 = 0.693_145_751_953_125;
        const C2: f64 = 1.428_606_820_309_417_3e-6;
        const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
        const LOWEST: f64 = -708.0; // e⁻⁷⁰⁸ is just above the smallest normal f64
        let xc = if x < LOWEST { LOWEST } else { x };
        let t = M::mul_add(xc, LOG2_E, ROUND);
        let n = t - ROUND;
        let r = M::mul_add(n, -C2, M::mul_add(n, -C1, xc));
        // Taylor series of eʳ to degree 13: error below 5e-18 for |r| ≤ ln 2 / 2
        const INV_FACTORIALS: [f64; 12] = [
            1.6059043836821613e-10,
            2.08767569878681e-09,
            2.505210838544172e-08,
            2.755731922398589e-07,
            2.7557319223985893e-06,
            2.48015873015873e-05,
            1.984126984126984e-04,
            1.388888888888889e-03,
            8.333333333333333e-03,
            4.1666666666666664e-02,
            1.6666666666666666e-01,
            0.5,
        ];
        let mut p = INV_FACTORIALS[0];
        for c in &INV_FACTORIALS[1..] {
            p = M::mul_add(p, r, *c);
        }
        p = M::mul_add(p, r, 1.0);
        p = M::mul_add(p, r, 1.0);
        let two_n = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
        if x < LOWEST { 0.0 } else { p * two_n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worst error in units of the last place over `xs ≥ lowest`; below
    /// `lowest` the result must be exactly 0.
    fn max_ulps<A: KernelFloat>(
        reference: impl Fn(A) -> A,
        lowest: A,
        xs: impl Iterator<Item = A>,
    ) -> f64 {
        let mut worst = 0.0_f64;
        for x in xs {
            for got in [
                A::exp_nonpositive::<Separate>(x),
                A::exp_nonpositive::<Fused>(x),
            ] {
                if x < lowest {
                    assert_eq!(got, A::zero(), "x = {x}");
                    continue;
                }
                let want = reference(x);
                let ulp = want * A::epsilon();
                let err = ((got - want).abs() / ulp).to_f64().unwrap_or(f64::INFINITY);
                worst = worst.max(err);
            }
        }
        worst
    }

    #[test]
    fn f32_exp_is_within_two_ulps_of_std() {
        let xs = (0..=200_000).map(|i| -(i as f32) * 0.0005); // [-100, 0]
        let worst = max_ulps::<f32>(|x| (x as f64).exp() as f32, -87.0, xs);
        assert!(worst <= 2.0, "worst error {worst} ulps");
    }

    #[test]
    fn f64_exp_is_within_two_ulps_of_std() {
        let xs = (0..=200_000).map(|i| -(i as f64) * 0.00371); // [-742, 0]
        let worst = max_ulps::<f64>(f64::exp, -708.0, xs);
        assert!(worst <= 2.0, "worst error {worst} ulps");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(f32::exp_nonpositive::<Separate>(0.0), 1.0);
        assert_eq!(f64::exp_nonpositive::<Separate>(0.0), 1.0);
        assert_eq!(f32::exp_nonpositive::<Separate>(f32::NEG_INFINITY), 0.0);
        assert_eq!(f64::exp_nonpositive::<Fused>(f64::NEG_INFINITY), 0.0);
        assert_eq!(f32::exp_nonpositive::<Separate>(f32::MIN), 0.0);
        assert_eq!(f32::exp_nonpositive::<Separate>(-1000.0), 0.0);
    }
}
