//! Picks the instruction set at run time: the tiled kernel compiled with AVX2 and
//! FMA where the CPU has them, the portable build of the same code elsewhere.

use ndarray::ArrayViewMut2;

use super::float::{KernelFloat, Separate};
use super::tiled::{self, Block, Scratch};

/// An element type with a compiled tiled kernel (public only to bound
/// [`crate::Element`]; the module is private).
pub trait Dispatch: KernelFloat {
    /// Columns of a register tile on this CPU (keys in `S`, value columns in `O`).
    fn tile_width() -> usize;
    /// [`tiled::attend_block`] with the best instruction set this CPU has.
    fn attend_block(
        block: &Block<'_, Self>,
        scratch: &mut Scratch<Self>,
        out: ArrayViewMut2<'_, Self>,
    );
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

impl Dispatch for f32 {
    fn tile_width() -> usize {
        if has_avx2_fma() {
            16
        } else {
            8
        }
    }

    fn attend_block(
        block: &Block<'_, f32>,
        scratch: &mut Scratch<f32>,
        out: ArrayViewMut2<'_, f32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { avx2::attend_block_f32(block, scratch, out) };
            return;
        }
        tiled::attend_block::<f32, Separate, 8>(block, scratch, out);
    }
}

impl Dispatch for f64 {
    fn tile_width() -> usize {
        if has_avx2_fma() {
            8
        } else {
            4
        }
    }

    fn attend_block(
        block: &Block<'_, f64>,
        scratch: &mut Scratch<f64>,
        out: ArrayViewMut2<'_, f64>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { avx2::attend_block_f64(block, scratch, out) };
            return;
        }
        tiled::attend_block::<f64, Separate, 4>(block, scratch, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use ndarray::ArrayViewMut2;

    use super::super::float::Fused;
    use super::super::tiled::{attend_block, Block, Scratch};

    /// The tiled kernel for `f32`, 16-wide tiles, compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_block_f32(
        block: &Block<'_, f32>,
        scratch: &mut Scratch<f32>,
        out: ArrayViewMut2<'_, f32>,
    ) {
        attend_block::<f32, Fused, 16>(block, scratch, out);
    }

    /// The tiled kernel for `f64`, 8-wide tiles, compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_block_f64(
        block: &Block<'_, f64>,
        scratch: &mut Scratch<f64>,
        out: ArrayViewMut2<'_, f64>,
    ) {
        attend_block::<f64, Fused, 8>(block, scratch, out);
    }
}
