//! NumPy's legacy global generator, `numpy.random.seed(s)` and its draws.

use ndarray::{Array, Dimension, ShapeBuilder};
use rand_mt::Mt;

use crate::error::{Error, Result};

/// NumPy's legacy `RandomState` (what `numpy.random.seed` and `numpy.random.rand`
/// use): MT19937 seeded as NumPy seeds it, and NumPy's own sampling on top.
///
/// The same seed gives the same numbers as NumPy, bit for bit, so a demo written
/// with `numpy.random.seed(42)` can be reproduced exactly. Arrays are filled in
/// row-major order, as NumPy fills them.
///
/// # Examples
///
/// ```
/// use attn::rng::NumpyRandom;
///
/// // numpy.random.seed(42); numpy.random.randint(3, size=(4, 3))
/// let mut np = NumpyRandom::seed(42);
/// let w = np.randint(3, (4, 3))?;
/// assert_eq!(w.row(0).to_vec(), vec![2, 0, 2]);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct NumpyRandom {
    mt: Mt,
    spare_gauss: Option<f64>,
}

impl NumpyRandom {
    /// `numpy.random.seed(seed)`, for a seed in `0 ..= 2³² − 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut a = attn::rng::NumpyRandom::seed(1);
    /// let mut b = attn::rng::NumpyRandom::seed(1);
    /// assert_eq!(a.rand(3), b.rand(3));
    /// ```
    pub fn seed(seed: u32) -> Self {
        NumpyRandom {
            mt: Mt::new(seed),
            spare_gauss: None,
        }
    }

    /// `numpy.random.randint(high, size=shape)`: integers in `[0, high)`, drawn by
    /// NumPy's masked rejection sampling.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `high ≤ 0` (NumPy raises `ValueError`).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut np = attn::rng::NumpyRandom::seed(1);
    /// let x = np.randint(10, 5)?;
    /// assert_eq!(x.to_vec(), vec![5, 8, 9, 5, 0]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn randint<Sh: ShapeBuilder>(
        &mut self,
        high: i64,
        shape: Sh,
    ) -> Result<Array<i64, Sh::Dim>> {
        if high <= 0 {
            return Err(Error::InvalidConfig {
                reason: format!("randint needs high > 0, got {high}"),
            });
        }
        let range = (high - 1) as u64;
        // the smallest all-ones mask covering the range
        let mask = u64::MAX >> range.leading_zeros().min(63);
        let mut draw = || -> i64 {
            if range == 0 {
                return 0;
            }
            loop {
                let value = if range <= u64::from(u32::MAX) {
                    u64::from(self.mt.next_u32()) & mask
                } else {
                    let hi = u64::from(self.mt.next_u32());
                    (hi << 32 | u64::from(self.mt.next_u32())) & mask
                };
                if value <= range {
                    return value as i64;
                }
            }
        };
        Ok(filled(shape, &mut draw))
    }

    /// `numpy.random.rand(*shape)`: uniform on `[0, 1)` with 53 random bits.
    ///
    /// # Examples
    ///
    /// ```
    /// let x = attn::rng::NumpyRandom::seed(42).rand((3, 4));
    /// assert_eq!(x[[0, 0]], 0.3745401188473625);
    /// ```
    pub fn rand<Sh: ShapeBuilder>(&mut self, shape: Sh) -> Array<f64, Sh::Dim> {
        filled(shape, &mut || self.next_double())
    }

    /// `numpy.random.randn(*shape)`: standard normal, by NumPy's polar Box–Muller
    /// method (which keeps the second value of each pair for the next draw).
    ///
    /// # Examples
    ///
    /// ```
    /// let x = attn::rng::NumpyRandom::seed(42).randn((3, 4));
    /// assert_eq!(x[[0, 0]], 0.4967141530112327);
    /// ```
    pub fn randn<Sh: ShapeBuilder>(&mut self, shape: Sh) -> Array<f64, Sh::Dim> {
        filled(shape, &mut || self.gauss())
    }

    fn next_double(&mut self) -> f64 {
        let a = self.mt.next_u32() >> 5;
        let b = self.mt.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) / 9_007_199_254_740_992.0
    }

    fn gauss(&mut self) -> f64 {
        if let Some(spare) = self.spare_gauss.take() {
            return spare;
        }
        loop {
            let x1 = 2.0 * self.next_double() - 1.0;
            let x2 = 2.0 * self.next_double() - 1.0;
            let r2 = x1 * x1 + x2 * x2;
            if r2 < 1.0 && r2 != 0.0 {
                let f = (-2.0 * r2.ln() / r2).sqrt();
                self.spare_gauss = Some(f * x1);
                return f * x2;
            }
        }
    }
}

/// The dimension of a shape.
pub(crate) fn dim_of<Sh: ShapeBuilder>(shape: Sh) -> Sh::Dim {
    shape.into_shape_with_order().raw_dim().clone()
}

/// An array of `shape` filled in row-major order by `next`.
pub(crate) fn filled<T, Sh: ShapeBuilder>(
    shape: Sh,
    next: &mut impl FnMut() -> T,
) -> Array<T, Sh::Dim> {
    let dim = dim_of(shape);
    let values: Vec<T> = (0..dim.size()).map(|_| next()).collect();
    Array::from_shape_vec(dim, values).expect("as many values as the shape holds")
}
