//! How random weights are drawn.

use ndarray::Array2;
use ndarray_rand::RandomExt;
use ndarray_rand::rand_distr::{Normal, Uniform};
use rand::Rng;

use crate::element::Element;
use crate::error::{Error, Result};

/// A distribution for random weight matrices of shape `(fan_in, fan_out)`.
///
/// Values are drawn in `f64` and rounded to the element type, so `f32` and `f64`
/// weights from the same seed agree to `f32` precision.
///
/// # Examples
///
/// ```
/// use attn::Init;
///
/// let w = Init::XavierUniform.sample::<f32, _>((64, 16), &mut attn::rng::seeded(1))?;
/// let bound = (6.0_f32 / (64.0 + 16.0)).sqrt();
/// assert!(w.iter().all(|x| x.abs() <= bound));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and standard deviation `std`.
    Normal {
        /// Standard deviation, finite and ≥ 0.
        std: f64,
    },
    /// Uniform on `[low, high)`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Upper bound, greater than `low`.
        high: f64,
    },
    /// Xavier/Glorot uniform: `U(−a, a)`, `a = √(6 / (fan_in + fan_out))`
    /// (PyTorch `xavier_uniform_`).
    XavierUniform,
    /// Xavier/Glorot normal: `N(0, σ²)`, `σ = √(2 / (fan_in + fan_out))`
    /// (PyTorch `xavier_normal_`).
    XavierNormal,
    /// PyTorch `nn.MultiheadAttention`'s default: `xavier_uniform_` over the packed
    /// in-projection `[W_Q W_K W_V]` when the three input widths are equal (so
    /// `fan_out = 2·d_k + d_v`), over each matrix alone otherwise; `W_O` uniform on
    /// `±1/√d_model`; biases 0. On a single matrix it is [`Init::XavierUniform`].
    TorchMultihead,
}

impl Init {
    /// Draws a `(fan_in, fan_out)` matrix.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a negative or non-finite `std`, or bounds that
    /// are not finite with `low < high`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::Init;
    ///
    /// let w = Init::Uniform { low: 0.0, high: 1.0 }.sample::<f64, _>((3, 2), &mut attn::rng::seeded(5))?;
    /// assert!(w.iter().all(|&x| (0.0..1.0).contains(&x)));
    /// assert!(Init::Normal { std: -1.0 }.sample::<f64, _>((3, 2), &mut attn::rng::seeded(5)).is_err());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn sample<A: Element, R: Rng + ?Sized>(
        self,
        shape: (usize, usize),
        rng: &mut R,
    ) -> Result<Array2<A>> {
        self.sample_with_fans(shape, shape, rng)
    }

    /// Draws a matrix of `shape` whose Xavier bounds come from `fans`
    /// (PyTorch initialises packed matrices this way).
    pub(crate) fn sample_with_fans<A: Element, R: Rng + ?Sized>(
        self,
        shape: (usize, usize),
        fans: (usize, usize),
        rng: &mut R,
    ) -> Result<Array2<A>> {
        let glorot = |numerator: f64| (numerator / (fans.0 + fans.1).max(1) as f64).sqrt();
        let drawn = match self {
            Init::Normal { std } => normal(std, shape, rng)?,
            Init::Uniform { low, high } => uniform(low, high, shape, rng)?,
            Init::XavierUniform | Init::TorchMultihead => {
                let a = glorot(6.0);
                uniform(-a, a, shape, rng)?
            }
            Init::XavierNormal => normal(glorot(2.0), shape, rng)?,
        };
        Ok(drawn.mapv(A::from_f64))
    }
}

fn normal<R: Rng + ?Sized>(std: f64, shape: (usize, usize), rng: &mut R) -> Result<Array2<f64>> {
    let valid = std.is_finite() && std >= 0.0;
    let dist = Normal::new(0.0, std)
        .ok()
        .filter(|_| valid)
        .ok_or_else(|| Error::InvalidConfig {
            reason: format!("normal init needs a finite std ≥ 0, got {std}"),
        })?;
    Ok(Array2::random_using(shape, dist, rng))
}

fn uniform<R: Rng + ?Sized>(
    low: f64,
    high: f64,
    shape: (usize, usize),
    rng: &mut R,
) -> Result<Array2<f64>> {
    let dist = Uniform::new(low, high)
        .ok()
        .filter(|_| (high - low).is_finite())
        .ok_or_else(|| Error::InvalidConfig {
            reason: format!(
                "uniform init needs finite bounds with low < high, got [{low}, {high})"
            ),
        })?;
    Ok(Array2::random_using(shape, dist, rng))
}
