//! The rotary settings of a Hugging Face `config.json`.

use serde_json::Value;

use crate::decode::rope::{Rope, RopeScaling};
use crate::error::{Error, Result};

/// The rotary settings of `config` (read from `path`) for heads `head_dim`
/// wide: transformers 5's `rope_parameters`, or 4's top-level `rope_theta` /
/// `rope_scaling` / `partial_rotary_factor` (GPT-NeoX: `rotary_pct`,
/// `rotary_emb_base`). Rope types: default, linear, llama3, yarn.
pub(super) fn rope(config: &Value, path: &str, head_dim: usize) -> Result<Rope> {
    let invalid = |reason: String| Error::InvalidConfig {
        reason: format!("{path}: {reason}"),
    };
    let params = config.get("rope_parameters").filter(|p| p.is_object());
    let scaling = config.get("rope_scaling").filter(|p| p.is_object());
    let field = |key: &str| {
        params
            .and_then(|p| p.get(key))
            .or_else(|| scaling.and_then(|p| p.get(key)))
            .or_else(|| config.get(key))
            .filter(|v| !v.is_null())
    };
    let number = |key: &str| -> Result<Option<f64>> {
        field(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| invalid(format!("{key} must be a number, got {v}")))
            })
            .transpose()
    };
    let theta = match number("rope_theta")? {
        Some(theta) => theta,
        None => number("rotary_emb_base")?.unwrap_or(10_000.0),
    };
    let mut rope = Rope::new(theta);
    if let Some(fraction) = number("partial_rotary_factor")?.or(number("rotary_pct")?) {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(invalid(format!(
                "the rotary fraction must be in (0, 1], got {fraction}"
            )));
        }
        rope = rope.with_rotary_dim((head_dim as f64 * fraction) as usize);
    }
    let kind = field("rope_type")
        .or_else(|| field("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let required = |key: &str| -> Result<f64> {
        number(key)?.ok_or_else(|| invalid(format!("rope_type {kind:?} needs {key}")))
    };
    let original = || -> Result<usize> {
        field("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "rope_type {kind:?} needs original_max_position_embeddings, a positive integer"
                ))
            })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: required("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: required("factor")?,
            low_freq_factor: required("low_freq_factor")?,
            high_freq_factor: required("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        },
        "yarn" => {
            let factor = required("factor")?;
            // transformers' yarn_get_mscale
            let mscale = |m: f64| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m * factor.ln() + 1.0
                }
            };
            let attention_factor = match (
                number("attention_factor")?,
                number("mscale")?.filter(|&m| m != 0.0),
                number("mscale_all_dim")?.filter(|&m| m != 0.0),
            ) {
                (Some(given), _, _) => given,
                (None, Some(m), Some(all)) => mscale(m) / mscale(all),
                (None, _, _) => mscale(1.0),
            };
            let truncate = match field("truncate") {
                None => true,
                Some(Value::Bool(flag)) => *flag,
                Some(other) => {
                    return Err(invalid(format!(
                        "truncate must be true or false, got {other}"
                    )));
                }
            };
            // transformers: `beta_fast or 32`, so 0 means the default too
            let or_default =
                |value: Option<f64>, default: f64| value.filter(|&x| x != 0.0).unwrap_or(default);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original()?,
                beta_fast: or_default(number("beta_fast")?, 32.0),
                beta_slow: or_default(number("beta_slow")?, 1.0),
                truncate,
                attention_factor,
            }
        }
        other => {
            return Err(invalid(format!(
                "rope_type {other:?} is not supported (default, linear, llama3, yarn are)"
            )));
        }
    };
    Ok(rope.with_scaling(scaling))
}
