//! PyTorch's CPU generator, `torch.manual_seed(s)` and `torch.randn`.

use ndarray::{Array, Dimension, ShapeBuilder};
use rand_mt::Mt;

use super::numpy::dim_of;

/// PyTorch's default CPU generator: MT19937 seeded by `torch.manual_seed`, and
/// `torch.randn` for `float32` tensors as PyTorch computes it.
///
/// PyTorch fills a tensor of 16 or more elements with uniforms and turns each
/// group of 16 into normals by Box–Muller (redrawing the last 16 when the count is
/// not a multiple of 16); smaller tensors draw one normal at a time in double
/// precision, keeping the second value of each pair for the next draw. Both are
/// reproduced here, bit for bit with PyTorch's AVX2 build (which evaluates `log`,
/// `sin` and `cos` with Cephes' single-precision polynomials and fused
/// multiply-adds). A PyTorch built without AVX2 uses the C library's functions
/// there and can differ in the last bit.
///
/// # Examples
///
/// ```
/// use attn::rng::TorchGenerator;
///
/// // torch.manual_seed(42); torch.randn(4, 4)
/// let w = TorchGenerator::manual_seed(42).randn((4, 4));
/// assert!((w[[0, 0]] - 1.9269153).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct TorchGenerator {
    mt: Mt,
    spare_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.manual_seed(seed)` (PyTorch seeds MT19937 with the low 32 bits).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::rng::TorchGenerator;
    ///
    /// let a = TorchGenerator::manual_seed(0).randn(5);
    /// let b = TorchGenerator::manual_seed(0).randn(5);
    /// assert_eq!(a, b);
    /// ```
    pub fn manual_seed(seed: u64) -> Self {
        TorchGenerator {
            mt: Mt::new(seed as u32),
            spare_normal: None,
        }
    }

    /// `torch.randn(*shape)` in `float32`; the generator moves on as PyTorch's does,
    /// so consecutive calls give PyTorch's consecutive tensors.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::rng::TorchGenerator;
    ///
    /// let mut g = TorchGenerator::manual_seed(42);
    /// let (w_q, w_k) = (g.randn((4, 4)), g.randn((4, 4)));
    /// assert!((w_k[[0, 0]] - 1.6423169).abs() < 1e-6);
    /// assert_ne!(w_q, w_k);
    /// ```
    pub fn randn<Sh: ShapeBuilder>(&mut self, shape: Sh) -> Array<f32, Sh::Dim> {
        let dim = dim_of(shape);
        let n = dim.size();
        let values = if n >= 16 {
            self.normal_fill(n)
        } else {
            (0..n).map(|_| self.normal_f64() as f32).collect()
        };
        Array::from_shape_vec(dim, values).expect("as many values as the shape holds")
    }

    /// A uniform `f32` on `[0, 1)` from 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 / 16_777_216.0
    }

    /// A uniform `f64` on `[0, 1)` from 53 of 64 random bits.
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.mt.next_u32());
        let bits = hi << 32 | u64::from(self.mt.next_u32());
        (bits & ((1 << 53) - 1)) as f64 / 9_007_199_254_740_992.0
    }

    /// One standard normal by PyTorch's scalar Box–Muller in `f64`.
    fn normal_f64(&mut self) -> f64 {
        if let Some(spare) = self.spare_normal.take() {
            return spare;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// PyTorch's `normal_fill` for `n ≥ 16` elements.
    fn normal_fill(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for start in (0..n - 15).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for x in tail.iter_mut() {
                *x = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// Turns 16 uniforms into 16 normals: pairs `(j, j + 8)`, with PyTorch's `f32`
/// steps. PyTorch's AVX2 build evaluates `log`, `sin` and `cos` with Cephes'
/// single-precision polynomials, reproduced in [`cephes_logf`] and [`cephes_sincosf`].
fn box_muller_16(data: &mut [f32]) {
    const TWO_PI: f32 = 2.0 * std::f32::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_logf(u1)).sqrt();
        let (sin, cos) = cephes_sincosf(TWO_PI * u2);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// Natural logarithm of a positive `f32` by Cephes' `logf` algorithm: split off the
/// exponent, fold the mantissa into `[√½, √2)`, and a degree-8 polynomial.
fn cephes_logf(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461_1e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5_f32.to_bits());
    let below = m < SQRT_HALF;
    let tmp = if below { m } else { 0.0 };
    m -= 1.0;
    if below {
        e -= 1.0;
    }
    m += tmp;
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y = y * m * z;
    y = e.mul_add(-2.121_944_4e-4, y);
    y = (-z).mul_add(0.5, y);
    e.mul_add(0.693_359_4, m + y)
}

/// Sine and cosine of an `f32` by Cephes' `sinf`/`cosf` algorithm: reduce by
/// multiples of π/4 in three parts, then one of two polynomials.
fn cephes_sincosf(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    let sign_sin = x.is_sign_negative();
    let x = x.abs();
    let mut octant = (x * FOUR_OVER_PI) as i32;
    octant = (octant + 1) & !1;
    let y = octant as f32;
    let swap_sin = octant & 4 != 0;
    let sine_first = octant & 2 == 0;
    let x = y.mul_add(
        -3.774_895e-8,
        y.mul_add(-2.418_756_5e-4, y.mul_add(-0.785_156_25, x)),
    );
    let cos_negative = (!(octant - 2)) & 4 != 0;
    let z = x * x;
    let mut c: f32 = 2.443_315_7e-5;
    c = c.mul_add(z, -1.388_731_6e-3);
    c = c.mul_add(z, 4.166_664_6e-2);
    c = c * z * z;
    c = (-z).mul_add(0.5, c) + 1.0;
    let mut s: f32 = -1.951_529_6e-4;
    s = s.mul_add(z, 8.332_161e-3);
    s = s.mul_add(z, -1.666_665_5e-1);
    s = (s * z).mul_add(x, x);
    let (sin, cos) = if sine_first { (s, c) } else { (c, s) };
    let sin = if sign_sin != swap_sin { -sin } else { sin };
    let cos = if cos_negative { -cos } else { cos };
    (sin, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cephes_functions_are_close_to_std() {
        for i in 1..10_000 {
            let x = i as f32 / 10_000.0;
            assert!(
                (cephes_logf(x) - x.ln()).abs() <= 2.0 * f32::EPSILON * x.ln().abs().max(1.0),
                "log {x}"
            );
            let t = x * 2.0 * std::f32::consts::PI;
            let (s, c) = cephes_sincosf(t);
            assert!(
                (s - t.sin()).abs() < 4e-7 && (c - t.cos()).abs() < 4e-7,
                "sincos {t}: {s} {c}"
            );
        }
    }
}
