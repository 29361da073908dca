//! The element types attention works on: those it computes in, and those its
//! inputs and outputs may be stored in.

mod half;

use std::fmt::Debug;

use ::half::bf16;
use ndarray::{Array, ArrayView, CowArray, Dimension, NdFloat};

use crate::flex::program::Program;
use crate::kernel::Parallelism;
use half::filled;

/// A floating-point element that attention is computed in: `f32` or `f64`.
///
/// The layers, gradients and rotary embeddings are generic over this bound;
/// scaled dot-product attention and the key/value cache take any [`Storage`]
/// type, half precision included. It is sealed: the fast kernels are written
/// for exactly these two types.
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
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a type attn computes in: layers, gradients and loaded weights are f32 or f64",
    note = "for half-precision weights, load the layer as f32 (bf16 and f16 widen exactly); attention itself, `scaled_dot_product` and `KvCache<bf16>`, takes bf16 and f16 storage"
)]
pub trait Element: NdFloat + Storage<Compute = Self> + sealed::Sealed {
    /// The nearest value of this type to `x`.
    fn from_f64(x: f64) -> Self;

    /// `tanh(x)`, vectorisable where it is inlined into a loop: for `f32` a
    /// rational approximation within 5e-7 of `tanh` (soft-capping's inner
    /// loop), for `f64` the standard library's.
    #[doc(hidden)]
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        self.tanh()
    }

    /// Calls the arm of `switch` written for this type (how code generic over the
    /// element reaches code written for each type, such as the SIMD kernels).
    #[doc(hidden)]
    fn select<P: Program<Self>, S: PerElement<P>>(switch: S) -> S::Output<Self>;
}

/// Something written once per element type; [`Element::select`] picks the arm.
///
/// The kernel implements it to choose its compiled entry points, so that this
/// file, below the kernel, never names the kernel's types. The call's program
/// `P` travels with it: an arm may use `P` as a program of its own element type
/// (generic code over `A` could not show that a `P: Program<A>` is one of `f32`).
#[doc(hidden)]
pub trait PerElement<P> {
    /// What each arm gives, for element `A`.
    type Output<A: Element>;
    /// The `f32` arm.
    fn f32(self) -> Self::Output<f32>
    where
        P: Program<f32>;
    /// The `f64` arm.
    fn f64(self) -> Self::Output<f64>
    where
        P: Program<f64>;
}

impl Element for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }

    #[inline(always)]
    fn tanh_fast(self) -> f32 {
        // Eigen's float tanh: an odd rational function of degree 13/6 on
        // |x| ≤ 7.9988 (tanh is ±1 in f32 beyond), branch-free
        const CLAMP: f32 = 7.998_811_7;
        const ALPHA: [f32; 7] = [
            -2.760_768_5e-16,
            2.000_188e-13,
            -8.604_672e-11,
            5.122_297e-8,
            1.485_722_4e-5,
            6.372_619_3e-4,
            4.893_524_6e-3,
        ];
        const BETA: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3];
        let x = self.clamp(-CLAMP, CLAMP);
        let x2 = x * x;
        let p = ALPHA[1..].iter().fold(ALPHA[0], |p, &a| p * x2 + a) * x;
        let q = BETA[1..].iter().fold(BETA[0], |q, &b| q * x2 + b);
        // below 4e-4, tanh(x) = x to f32's precision
        if self.abs() < 4e-4 { self } else { p / q }
    }

    fn select<P: Program<f32>, S: PerElement<P>>(switch: S) -> S::Output<f32> {
        switch.f32()
    }
}

impl Element for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }

    fn select<P: Program<f64>, S: PerElement<P>>(switch: S) -> S::Output<f64> {
        switch.f64()
    }
}

/// A type attention's inputs and outputs may be stored in: `f32` and `f64`
/// (computed in themselves), and `half::bf16` and `half::f16` (computed in
/// `f32`: scores, softmax and accumulation, with the output rounded once to the
/// half type, as PyTorch does).
///
/// [`ScaledDotProduct`](crate::ScaledDotProduct)'s forward calls,
/// [`scaled_dot_product`](crate::scaled_dot_product),
/// [`attention_weights`](crate::attention_weights) and
/// [`KvCache`](crate::KvCache) take any of them (a half cache holds half the bytes
/// of an `f32` one). Layers, gradients, traces and RoPE take [`Element`]s:
/// convert half weights to `f32` for those.
///
/// A half-precision call works on `f32` copies of its queries (and, where the
/// kernel reads `f32`, keys and values) and an `f32` output; the thread that
/// calls keeps up to four of those buffers of up to 8 MiB each for its next
/// call, so that repeated calls write over memory they already have instead
/// of faulting in fresh pages.
///
/// # Examples
///
/// ```
/// use attn::Storage;
/// use half::bf16;
///
/// assert_eq!(bf16::from_f32(1.5).to_compute(), 1.5_f32);
/// assert_eq!(<bf16 as Storage>::from_compute(1.0 / 3.0), bf16::from_f32(1.0 / 3.0));
/// ```
pub trait Storage: Copy + Send + Sync + Debug + PartialEq + 'static + sealed::Sealed {
    /// What attention on this type is computed in.
    type Compute: Element;

    /// The value in the compute type (exact).
    fn to_compute(self) -> Self::Compute;

    /// The nearest value of this type (round to nearest even).
    fn from_compute(x: Self::Compute) -> Self;

    /// An array in the compute type: the same array for `f32` and `f64`, a
    /// converted copy for the half types (a large one converted on the rayon
    /// pool where `parallelism` allows).
    #[doc(hidden)]
    fn compute<D: Dimension>(
        x: ArrayView<'_, Self, D>,
        parallelism: Parallelism,
    ) -> CowArray<'_, Self::Compute, D>;

    /// An array of the compute type in this type: the same array for `f32` and
    /// `f64`, rounded for the half types (as [`compute`](Self::compute)).
    #[doc(hidden)]
    fn store<D: Dimension>(x: Array<Self::Compute, D>, parallelism: Parallelism) -> Array<Self, D>;

    /// `len` zeros in the compute type for a call's result, which
    /// [`store`](Self::store) then takes (for the half types, memory the
    /// thread kept from its calls before).
    #[doc(hidden)]
    fn zeros(len: usize, parallelism: Parallelism) -> Vec<Self::Compute>;

    /// Done with what [`compute`](Self::compute) gave (a copy of the half
    /// types is kept for the thread's next call).
    #[doc(hidden)]
    fn done<D: Dimension>(x: CowArray<'_, Self::Compute, D>);

    /// Calls the arm of `switch` written for this kind of type: computed in
    /// itself, or half precision (how generic code reaches the kernels that read
    /// half-precision keys and values where they lie).
    #[doc(hidden)]
    fn select_storage<P: Program<Self::Compute>, S: PerStorage<P>>(switch: S) -> S::Output<Self>;
}

/// Half-precision storage: `bf16` and `f16`, computed in `f32`.
#[doc(hidden)]
pub trait Half: Storage<Compute = f32> {
    /// `bf16` (the upper half of an f32's bits) rather than `f16` (IEEE binary16).
    const BF16: bool;

    /// `dst[i] = src[i]` in f32 (exact); the slices are equally long.
    fn widen(src: &[Self], dst: &mut [f32]);

    /// `dst[i]` = `src[i]` rounded to the nearest value, ties to even, as
    /// `from_f32` does; the slices are equally long.
    fn narrow(src: &[f32], dst: &mut [Self]);

    /// `len` zeros of this type for a call's output that a kernel writes in
    /// this type, set on the rayon pool where `parallelism` allows.
    fn zeroed(len: usize, parallelism: Parallelism) -> Vec<Self> {
        filled(len, Self::from_compute(0.0), parallelism, |_, _| ())
    }

    /// `x` as `bf16` values when this type is `bf16`, `None` for `f16`: how the
    /// kernels with bf16 dot products reach bf16 inputs from code generic over
    /// the half type.
    fn as_bf16<D: Dimension>(x: ArrayView<'_, Self, D>) -> Option<ArrayView<'_, bf16, D>>;
}

/// Something written once for the types computed in themselves and once for the
/// half types; [`Storage::select_storage`] picks the arm. The call's program
/// `P` travels with it, as with [`PerElement`].
#[doc(hidden)]
pub trait PerStorage<P> {
    /// What each arm gives, for storage type `A`.
    type Output<A: Storage>;
    /// The `f32` and `f64` arm.
    fn native<A: Element>(self) -> Self::Output<A>
    where
        P: Program<A>;
    /// The `bf16` and `f16` arm.
    fn half<H: Half>(self) -> Self::Output<H>
    where
        P: Program<f32>;
}

/// `f32` and `f64` are stored as they are computed.
macro_rules! native {
    ($t:ty) => {
        impl Storage for $t {
            type Compute = $t;

            fn to_compute(self) -> $t {
                self
            }

            fn from_compute(x: $t) -> $t {
                x
            }

            fn compute<D: Dimension>(
                x: ArrayView<'_, $t, D>,
                _: Parallelism,
            ) -> CowArray<'_, $t, D> {
                x.into()
            }

            fn store<D: Dimension>(x: Array<$t, D>, _: Parallelism) -> Array<$t, D> {
                x
            }

            fn zeros(len: usize, parallelism: Parallelism) -> Vec<$t> {
                filled(len, 0.0, parallelism, |_, _| ())
            }

            fn done<D: Dimension>(_: CowArray<'_, $t, D>) {}

            fn select_storage<P: Program<Self::Compute>, S: PerStorage<P>>(
                switch: S,
            ) -> S::Output<$t> {
                switch.native::<$t>()
            }
        }
    };
}

native!(f32);
native!(f64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_f32_tanh_is_within_5e7_of_tanh() {
        let mut worst = 0.0_f64;
        for n in -200_000..=200_000 {
            let x = n as f32 * 6e-5; // −12 .. 12, every region
            let want = f64::from(x).tanh();
            let got = f64::from(<f32 as Element>::tanh_fast(x));
            worst = worst.max((got - want).abs());
        }
        assert!(worst < 5e-7, "{worst:e}");
        assert!((<f32 as Element>::tanh_fast(f32::INFINITY) - 1.0).abs() < 5e-7);
        assert!((<f32 as Element>::tanh_fast(f32::NEG_INFINITY) + 1.0).abs() < 5e-7);
        assert!(<f32 as Element>::tanh_fast(f32::NAN).is_nan());
        assert_eq!(<f32 as Element>::tanh_fast(1e-30_f32), 1e-30);
    }
}

/// The crate's closed sets of types: the element and storage types, and the
/// paged cache's stored types (these and `i8`).
pub(crate) mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for i8 {}
}
