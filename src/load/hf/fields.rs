//! Reading `config.json`'s fields: sizes, numbers, flags, the family's
//! defaults for absent keys, and each layer's kind from `layer_types`.

use serde_json::Value;

use super::HfModel;
use crate::error::{Error, Result};
use crate::load::families::{Default, Family, family, known};

impl HfModel {
    /// The first of `keys` that is present, as a size.
    pub(super) fn size(&self, keys: &[&str]) -> Result<usize> {
        for key in keys {
            if let Some(n) = self.optional_size(key)? {
                return Ok(n);
            }
        }
        Err(Error::InvalidConfig {
            reason: format!(
                "{} ({}): none of {keys:?} is given",
                self.config_path, self.model_type
            ),
        })
    }

    /// `key` as a size, `None` when absent or null.
    pub(super) fn optional_size(&self, key: &str) -> Result<Option<usize>> {
        match &self.value(key) {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| Error::InvalidConfig {
                    reason: format!(
                        "{}: {key} must be a non-negative integer, got {v}",
                        self.config_path
                    ),
                }),
        }
    }

    /// The window of the layer `module` names (`…layers.{i}…`) where
    /// `layer_types[i]` is `"sliding_attention"`; none where it is
    /// `"full_attention"`.
    pub(super) fn layer_window(&self, module: &str) -> Result<Option<usize>> {
        let invalid = |reason: String| Error::InvalidConfig {
            reason: format!("{}: {reason}", self.config_path),
        };
        let types = match self.config.get("layer_types") {
            Some(Value::Array(types)) => Some(types),
            // transformers' default: even layers slide, odd ones attend to all
            None | Some(Value::Null) => None,
            Some(other) => {
                return Err(invalid(format!(
                    "layer_types must be a list of \"sliding_attention\" / \"full_attention\", got {other}"
                )));
            }
        };
        let mut parts = module.split('.');
        let layer = parts
            .by_ref()
            .find(|&part| part == "layers")
            .and(parts.next())
            .and_then(|index| index.parse::<usize>().ok())
            .ok_or_else(|| {
                invalid(format!(
                    "the module {module:?} names no layer (…layers.N…), so its kind in layer_types is unknown"
                ))
            })?;
        let kind = match types {
            Some(types) => types.get(layer).and_then(Value::as_str).ok_or_else(|| {
                invalid(format!(
                    "layer_types has no kind (a string) for layer {layer} of its {}",
                    types.len()
                ))
            })?,
            None if layer % 2 == 0 => "sliding_attention",
            None => "full_attention",
        };
        match kind {
            "sliding_attention" => self.optional_size("sliding_window"),
            "full_attention" => Ok(None),
            other => Err(invalid(format!(
                "layer_types[{layer}] is {other:?}: \"sliding_attention\" and \"full_attention\" are mapped"
            ))),
        }
    }

    /// The value of `key`: the file's, or where the file leaves it out, the
    /// default of the family's config class (null where it has none).
    pub(super) fn value(&self, key: &str) -> Value {
        if let Some(value) = self.config.get(key) {
            return value.clone();
        }
        let default = self.family().ok().and_then(|family| {
            family
                .defaults
                .iter()
                .find(|(name, _)| *name == key)
                .map(|&(_, default)| default)
        });
        match default {
            Some(Default::Size(n)) => Value::from(n),
            Some(Default::Number(x)) => Value::from(x),
            None => Value::Null,
        }
    }

    /// `key` as a number, `None` when null (or absent without a default).
    pub(super) fn optional_number(&self, key: &str) -> Result<Option<f64>> {
        match &self.value(key) {
            Value::Null => Ok(None),
            v => v.as_f64().map(Some).ok_or_else(|| Error::InvalidConfig {
                reason: format!("{}: {key} must be a number, got {v}", self.config_path),
            }),
        }
    }

    /// `key` as a finite positive number, which must be there.
    pub(super) fn positive_number(&self, key: &str) -> Result<f64> {
        match self.optional_number(key)? {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            found => Err(Error::InvalidConfig {
                reason: format!(
                    "{} ({}): {key} must be a finite positive number, got {found:?}",
                    self.config_path, self.model_type
                ),
            }),
        }
    }

    /// The family of the model's type.
    pub(super) fn family(&self) -> Result<&'static Family> {
        family(&self.model_type).ok_or_else(|| Error::InvalidConfig {
            reason: format!(
                "model_type {:?} is not mapped (attn maps {}); build a MultiHeadConfig and call MultiHeadConfig::load with a Layout",
                self.model_type,
                known()
            ),
        })
    }

    /// The flag `key`, `default` when absent or null.
    pub(super) fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match &self.config[key] {
            Value::Null => Ok(default),
            Value::Bool(flag) => Ok(*flag),
            other => Err(Error::InvalidConfig {
                reason: format!(
                    "{}: {key} must be true or false, got {other}",
                    self.config_path
                ),
            }),
        }
    }
}
