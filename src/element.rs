//! The element types attention works on.

use ndarray::NdFloat;

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
pub trait Element: NdFloat + sealed::Sealed {
    /// The nearest value of this type to `x`.
    fn from_f64(x: f64) -> Self;

    /// Calls the arm of `switch` written for this type (how code generic over the
    /// element reaches code written for each type, such as the SIMD kernels).
    #[doc(hidden)]
    fn select<S: PerElement>(switch: S) -> S::Output<Self>;
}

/// Something written once per element type; [`Element::select`] picks the arm.
///
/// The kernel implements it to choose its compiled entry points, so that this
/// file, below the kernel, never names the kernel's types.
#[doc(hidden)]
pub trait PerElement {
    /// What each arm gives, for element `A`.
    type Output<A: Element>;
    /// The `f32` arm.
    fn f32(self) -> Self::Output<f32>;
    /// The `f64` arm.
    fn f64(self) -> Self::Output<f64>;
}

impl Element for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }

    fn select<S: PerElement>(switch: S) -> S::Output<f32> {
        switch.f32()
    }
}

impl Element for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }

    fn select<S: PerElement>(switch: S) -> S::Output<f64> {
        switch.f64()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
