//! The scaled variants of rotary frequencies: linear, Llama 3, YaRN.

use std::f64::consts::PI;
use std::fmt;

use crate::error::{Error, Result};

/// How a model stretches its rotary frequencies to reach longer contexts
/// (Hugging Face's `rope_scaling` / `rope_parameters.rope_type`).
///
/// # Examples
///
/// ```
/// use attn::{Rope, RopeScaling};
///
/// let rope = Rope::new(10_000.0).with_scaling(RopeScaling::Linear { factor: 4.0 });
/// let plain = Rope::new(10_000.0);
/// // linear scaling divides every frequency (equivalently every position) by the factor
/// let (f, g) = (rope.frequencies(8)?, plain.frequencies(8)?);
/// assert!((f[1] * 4.0 - g[1]).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// The frequencies `θ^(−2i/r)` as they are (`rope_type: "default"`).
    None,
    /// Every frequency divided by `factor` (`"linear"`, position interpolation).
    Linear {
        /// The divisor, `> 0`.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling (`"llama3"`): wavelengths shorter
    /// than `original_max_position_embeddings / high_freq_factor` stay, longer
    /// than `original_max_position_embeddings / low_freq_factor` are divided by
    /// `factor`, and those between are blended smoothly.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Where the divided band begins.
        low_freq_factor: f64,
        /// Where the kept band ends; above `low_freq_factor`.
        high_freq_factor: f64,
        /// The context length the model was trained on.
        original_max_position_embeddings: usize,
    },
    /// YaRN (`"yarn"`: gpt-oss, Qwen's long contexts, DeepSeek): pairs that
    /// turn more than `beta_fast` times over the original context keep their
    /// frequency, those turning fewer than `beta_slow` times are divided by
    /// `factor`, a linear ramp over the pairs between (ends rounded outwards
    /// with `truncate`); cos and sin are multiplied by `attention_factor`, so
    /// scores by its square. Hugging Face's defaults: `beta_fast` 32,
    /// `beta_slow` 1, `truncate` true, `attention_factor` `0.1·ln(factor) + 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Rope, RopeScaling};
    ///
    /// let yarn = RopeScaling::Yarn {
    ///     factor: 32.0,
    ///     original_max_position_embeddings: 4096,
    ///     beta_fast: 32.0,
    ///     beta_slow: 1.0,
    ///     truncate: false,
    ///     attention_factor: 0.1 * 32f64.ln() + 1.0,
    /// };
    /// let (rope, plain) = (Rope::new(150_000.0).with_scaling(yarn), Rope::new(150_000.0));
    /// let (f, g) = (rope.frequencies(64)?, plain.frequencies(64)?);
    /// assert_eq!(f[0], g[0]); // the fastest pair keeps its frequency
    /// assert!((f[31] * 32.0 - g[31]).abs() < 1e-18); // the slowest is divided
    /// assert!((rope.amplitude() - 1.3466).abs() < 1e-4);
    /// # Ok::<(), attn::Error>(())
    /// ```
    Yarn {
        /// The divisor of the slow frequencies, `> 0`.
        factor: f64,
        /// The context length the model was trained on.
        original_max_position_embeddings: usize,
        /// Rotations over the original context above which a pair keeps its frequency.
        beta_fast: f64,
        /// Rotations below which a pair is divided; below `beta_fast`.
        beta_slow: f64,
        /// Whether the ramp's ends are rounded to whole pairs.
        truncate: bool,
        /// The factor on cos and sin, `> 0`.
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// Checks the factors.
    pub(super) fn check(&self) -> Result<()> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let valid = match *self {
            RopeScaling::None => true,
            RopeScaling::Linear { factor } => positive(factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive(factor)
                    && positive(low_freq_factor)
                    && high_freq_factor.is_finite()
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate: _,
                attention_factor,
            } => {
                positive(factor)
                    && positive(beta_slow)
                    && beta_fast.is_finite()
                    && beta_fast > beta_slow
                    && original_max_position_embeddings > 0
                    && positive(attention_factor)
            }
        };
        if valid {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                reason: format!(
                    "rope scaling needs finite positive factors (llama3: high_freq_factor above low_freq_factor; \
                     yarn: beta_fast above beta_slow; both a positive original length), got {self:?}"
                ),
            })
        }
    }

    /// The scaled frequencies of the plain ones `plain[i] = θ^(−2i/r)`, `r`
    /// rotated features (Hugging Face's `inv_freq`, in f64).
    pub(super) fn frequencies(&self, plain: Vec<f64>, theta: f64, r: usize) -> Vec<f64> {
        match *self {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => plain.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                plain
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor: _,
            } => {
                // the pair index that turns `rotations` times over the original context
                let pair = |rotations: f64| {
                    r as f64
                        * (original_max_position_embeddings as f64 / (rotations * 2.0 * PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (pair(beta_fast), pair(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(r as f64 - 1.0));
                if low == high {
                    high += 0.001; // as Hugging Face, against a division by zero
                }
                plain
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let divided = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * divided + f * (1.0 - divided)
                    })
                    .collect()
            }
        }
    }

    /// The factor on cos and sin: YaRN's `attention_factor`, else 1.
    pub(super) fn amplitude(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            RopeScaling::None | RopeScaling::Linear { .. } | RopeScaling::Llama3 { .. } => 1.0,
        }
    }
}

impl fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => write!(f, ", positions divided by {factor}"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => write!(
                f,
                ", Llama 3 scaling (factor {factor}, low/high frequency factors \
                 {low_freq_factor}/{high_freq_factor}, trained on {original_max_position_embeddings} positions)"
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => write!(
                f,
                ", YaRN (factor {factor}, β {beta_fast}/{beta_slow}{}, trained on \
                 {original_max_position_embeddings} positions, cos and sin × {attention_factor})",
                if truncate { ", whole pairs" } else { "" }
            ),
        }
    }
}
