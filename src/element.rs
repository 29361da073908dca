//! The element types attention works on.

use ndarray::NdFloat;

use crate::kernel::Dispatch;

/// A floating-point element that attention is computed in: `f32` or `f64`.
///
/// Every function of the crate is generic over this one bound. It is sealed:
/// the fast kernels are written for exactly these two types.
///
/// # Examples
///
/// ```
/// use attn::Element;
///
/// fn default_scale<A: Element>(d_k: usize) -> A {
///     A::from_f64(1.0 / (d_k as f64).sqrt())
/// }
/// assert_eq!(default_scale::<f32>(4), 0.5);
/// assert_eq!(default_scale::<f64>(16), 0.25);
/// ```
pub trait Element: NdFloat + Dispatch + sealed::Sealed {
    /// The nearest value of this type to `x`.
    fn from_f64(x: f64) -> Self;
}

impl Element for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
