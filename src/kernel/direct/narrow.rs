//! Values stored narrower than `f32` that the direct path widens in registers.

use crate::element::Half;

/// The narrow types the direct path widens to `f32` in registers as it loads
/// them: the half types, and the int8 of a quantized cache (whose scale the
/// caller applies).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NarrowKind {
    Bf16,
    F16,
    I8,
}

/// A value stored narrower than `f32`, widened (exactly) as it is loaded.
pub(crate) trait Narrow: Copy + Send + Sync + 'static {
    const KIND: NarrowKind;

    /// `dst[i] = src[i]` in f32; the slices are equally long.
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl<H: Half> Narrow for H {
    const KIND: NarrowKind = if H::BF16 {
        NarrowKind::Bf16
    } else {
        NarrowKind::F16
    };

    #[inline(always)]
    fn widen(src: &[H], dst: &mut [f32]) {
        H::widen(src, dst);
    }
}

impl Narrow for i8 {
    const KIND: NarrowKind = NarrowKind::I8;

    #[inline(always)]
    fn widen(src: &[i8], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from(s);
        }
    }
}
