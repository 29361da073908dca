//! Checking a [`MultiHeadConfig`] before a layer is built from it: sizes that
//! fit together and in memory, and settings in their ranges.

use super::config::MultiHeadConfig;
use super::settings::{Causality, PositionEncoding};
use crate::error::{Error, Result};

impl MultiHeadConfig {
    /// Every width and weight of the layer fits in memory's addresses (sizes
    /// come from files: no product may wrap).
    fn check_extents(&self) -> Result<()> {
        let (d, hd) = (self.d_model, self.head_dim());
        let widths = (
            self.n_heads.checked_mul(hd),
            self.n_kv_heads().checked_mul(hd),
        );
        let (Some(inner), Some(kv)) = widths else {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "n_heads ({}) or n_kv_heads ({}) × head_dim ({hd}) overflows",
                    self.n_heads,
                    self.n_kv_heads()
                ),
            });
        };
        // the largest element is 8 bytes: every weight's bytes must be addressable
        let limit = isize::MAX as usize / 8;
        let sizes = [
            kv.checked_mul(2).and_then(|two| two.checked_add(inner)),
            inner.checked_mul(3),
            d.checked_mul(inner),
            self.kdim().checked_mul(kv),
            self.vdim().checked_mul(kv),
            d.checked_mul(inner.max(kv).saturating_mul(3)),
        ];
        if sizes.iter().any(|n| n.is_none_or(|n| n > limit)) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the weights of d_model {d}, kdim {}, vdim {}, {} heads and {} key/value heads of {hd} do not fit in memory",
                    self.kdim(),
                    self.vdim(),
                    self.n_heads,
                    self.n_kv_heads()
                ),
            });
        }
        Ok(())
    }

    /// A cache holds self-attention's keys and values: `kdim` and `vdim`
    /// must be `d_model`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the widths.
    pub(crate) fn check_cacheable(&self) -> Result<()> {
        let d = self.d_model;
        if self.kdim() != d || self.vdim() != d {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a key/value cache holds self-attention keys: kdim ({}) and vdim ({}) must equal d_model ({d})",
                    self.kdim(),
                    self.vdim()
                ),
            });
        }
        Ok(())
    }

    /// Checks the sizes.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the sizes that do not fit.
    pub(crate) fn check(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.d_model == 0 || self.n_heads == 0 {
            return invalid(format!(
                "d_model ({}) and n_heads ({}) must be positive",
                self.d_model, self.n_heads
            ));
        }
        match self.head_dim {
            None if !self.d_model.is_multiple_of(self.n_heads) => {
                return invalid(format!(
                    "n_heads ({}) must divide d_model ({}), or set head_dim",
                    self.n_heads, self.d_model
                ));
            }
            Some(0) => return invalid("head_dim must be positive".to_string()),
            _ => {}
        }
        if self.kdim() == 0 || self.vdim() == 0 {
            return invalid(format!(
                "kdim ({}) and vdim ({}) must be positive",
                self.kdim(),
                self.vdim()
            ));
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return invalid(format!(
                "n_kv_heads ({kv}) must be positive and divide n_heads ({})",
                self.n_heads
            ));
        }
        self.check_extents()?;
        if let Some(scale) = self.scale
            && !(scale.is_finite() && scale != 0.0)
        {
            return invalid(format!("scale must be finite and non-zero, got {scale}"));
        }
        if let Some(cap) = self.softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return invalid(format!("a soft-cap must be finite and positive, got {cap}"));
        }
        if self.causality == Causality::SlidingWindow(0) {
            return invalid("a sliding window needs a size of at least 1".to_string());
        }
        match self.positions {
            PositionEncoding::Rope(rope) => rope.check(self.head_dim()),
            PositionEncoding::None | PositionEncoding::Alibi => Ok(()),
        }
    }
}
