//! The element types attention works on: those it computes in, and those its
//! inputs and outputs may be stored in.

use std::fmt::Debug;
use std::mem::MaybeUninit;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use ndarray::{Array, ArrayView, CowArray, Dimension, NdFloat};
use rayon::prelude::*;

use crate::flex::program::Program;
use crate::kept;
use crate::kernel::Parallelism;
use crate::kernel::sweep::{Sweep, vectorized};

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

/// The half types are computed in `f32`.
macro_rules! half {
    ($t:ty) => {
        impl Storage for $t {
            type Compute = f32;

            fn to_compute(self) -> f32 {
                self.to_f32()
            }

            fn from_compute(x: f32) -> $t {
                <$t>::from_f32(x)
            }

            fn compute<D: Dimension>(
                x: ArrayView<'_, $t, D>,
                parallelism: Parallelism,
            ) -> CowArray<'_, f32, D> {
                // contiguous: vectorised passes, into memory the thread kept
                match x.as_slice() {
                    Some(src) => {
                        let mut dst = kept::take(src.len(), parallelism);
                        chunked(&mut dst, parallelism, |at, dst| {
                            vectorized(Widen(&src[at..at + dst.len()], dst))
                        });
                        Array::from_shape_vec(x.raw_dim(), dst)
                            .expect("one value per element")
                            .into()
                    }
                    None => x.mapv(<$t>::to_f32).into(),
                }
            }

            fn store<D: Dimension>(x: Array<f32, D>, parallelism: Parallelism) -> Array<$t, D> {
                let stored = match x.as_slice() {
                    Some(src) => {
                        let dst = filled(src.len(), <$t>::ZERO, parallelism, |at, dst| {
                            vectorized(Narrow(&src[at..at + dst.len()], dst))
                        });
                        Array::from_shape_vec(x.raw_dim(), dst).expect("one value per element")
                    }
                    None => x.mapv(<$t>::from_f32),
                };
                kept::give(x.into_raw_vec_and_offset().0);
                stored
            }

            fn zeros(len: usize, parallelism: Parallelism) -> Vec<f32> {
                let mut zeros = kept::take(len, parallelism);
                chunked(&mut zeros, parallelism, |_, chunk| chunk.fill(0.0));
                zeros
            }

            fn done<D: Dimension>(x: CowArray<'_, f32, D>) {
                if !x.is_view() {
                    kept::give(x.into_owned().into_raw_vec_and_offset().0);
                }
            }

            fn select_storage<P: Program<Self::Compute>, S: PerStorage<P>>(
                switch: S,
            ) -> S::Output<$t> {
                switch.half::<$t>()
            }
        }
    };
}

half!(bf16);
half!(f16);

/// [`Half::widen`] as a [`Sweep`].
struct Widen<'a, H>(&'a [H], &'a mut [f32]);

impl<H: Half> Sweep for Widen<'_, H> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        H::widen(self.0, self.1)
    }
}

/// [`Half::narrow`] as a [`Sweep`].
struct Narrow<'a, H>(&'a [f32], &'a mut [H]);

impl<H: Half> Sweep for Narrow<'_, H> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        H::narrow(self.0, self.1)
    }
}

/// Values per task of a conversion split over threads.
const CONVERT_CHUNK: usize = 1 << 15;

/// `len` values, chunk by chunk on the rayon pool where `parallelism` allows
/// and there is more than one chunk: each chunk set to `zero`, then written by
/// `fill(offset, chunk)` (a conversion: each value on its own, so the same bits
/// either way). No pass over the whole vector runs on the calling thread alone.
pub(crate) fn filled<T: Send + Sync + Copy>(
    len: usize,
    zero: T,
    parallelism: Parallelism,
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut values = Vec::with_capacity(len);
    let fill_chunk = |(index, chunk): (usize, &mut [MaybeUninit<T>])| {
        for x in chunk.iter_mut() {
            x.write(zero);
        }
        // SAFETY: every entry of `chunk` was written just above, and
        // `MaybeUninit<T>` has `T`'s layout.
        let chunk = unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) };
        fill(index * CONVERT_CHUNK, chunk);
    };
    let spare = &mut values.spare_capacity_mut()[..len];
    if parallelism == Parallelism::Rayon && len > CONVERT_CHUNK {
        spare
            .par_chunks_mut(CONVERT_CHUNK)
            .enumerate()
            .for_each(fill_chunk);
    } else {
        spare
            .chunks_mut(CONVERT_CHUNK)
            .enumerate()
            .for_each(fill_chunk);
    }
    // SAFETY: the first `len` entries were written, chunk by chunk, above.
    unsafe { values.set_len(len) };
    values
}

/// `fill(offset, chunk)` on each chunk of `values`, on the rayon pool where
/// `parallelism` allows and there is more than one chunk.
fn chunked<T: Send>(
    values: &mut [T],
    parallelism: Parallelism,
    fill: impl Fn(usize, &mut [T]) + Sync,
) {
    let fill_chunk = |(index, chunk): (usize, &mut [T])| fill(index * CONVERT_CHUNK, chunk);
    if parallelism == Parallelism::Rayon && values.len() > CONVERT_CHUNK {
        values
            .par_chunks_mut(CONVERT_CHUNK)
            .enumerate()
            .for_each(fill_chunk);
    } else {
        values
            .chunks_mut(CONVERT_CHUNK)
            .enumerate()
            .for_each(fill_chunk);
    }
}

impl Half for bf16 {
    const BF16: bool = true;

    #[inline(always)]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        // the upper half of an f32's bits: a shift (vectorised where inlined)
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }

    /// Without branches, so that the loop vectorises: the upper half of the
    /// bits after adding just under half a unit of the last place and the
    /// lowest kept bit (ties to even); a NaN's upper half with its quiet bit.
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, x) in dst.iter_mut().zip(src) {
            let bits = x.to_bits();
            let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
            let quiet = (bits >> 16) | 0x0040;
            let nan = bits & 0x7fff_ffff > 0x7f80_0000;
            *d = bf16::from_bits(if nan { quiet } else { rounded } as u16);
        }
    }

    fn as_bf16<D: Dimension>(x: ArrayView<'_, bf16, D>) -> Option<ArrayView<'_, bf16, D>> {
        Some(x)
    }
}

impl Half for f16 {
    const BF16: bool = false;

    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        // branch-free, so that it vectorises where it is inlined: the exponent and
        // mantissa moved into an f32's places and scaled by 2^112 (exact for
        // normal and subnormal values alike), infinities and NaNs given the f32
        // exponent, then the sign
        const SCALE: f32 = f32::from_bits(0x7780_0000); // 2^112
        for (d, s) in dst.iter_mut().zip(src) {
            let bits = u32::from(s.to_bits());
            let magnitude = bits & 0x7fff;
            let finite = f32::from_bits(magnitude << 13) * SCALE;
            let special = f32::from_bits((magnitude << 13) | 0x7f80_0000);
            let value = if magnitude >= 0x7c00 { special } else { finite };
            *d = f32::from_bits(value.to_bits() | ((bits & 0x8000) << 16));
        }
    }

    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }

    fn as_bf16<D: Dimension>(_: ArrayView<'_, f16, D>) -> Option<ArrayView<'_, bf16, D>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through [`vectorized`], as the conversions run.
    #[test]
    fn widening_is_exact_for_every_half_value() {
        let every = |to_f32: fn(u16) -> f32, widen: fn(&[u16], &mut [f32])| {
            let bits: Vec<u16> = (0..=u16::MAX).collect();
            let mut got = vec![0.0; bits.len()];
            widen(&bits, &mut got);
            for (&b, &g) in bits.iter().zip(&got) {
                let want = to_f32(b);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{b:#06x}: {g} vs {want}"
                );
            }
        };
        every(
            |b| f16::from_bits(b).to_f32(),
            |src, dst| {
                let src: Vec<f16> = src.iter().map(|&b| f16::from_bits(b)).collect();
                vectorized(Widen(&src, dst))
            },
        );
        every(
            |b| bf16::from_bits(b).to_f32(),
            |src, dst| {
                let src: Vec<bf16> = src.iter().map(|&b| bf16::from_bits(b)).collect();
                vectorized(Widen(&src, dst))
            },
        );
    }

    /// bf16's branch-free rounding gives `bf16::from_f32`'s bits: every f32
    /// whose low half is one of the cases (0, just below, at and just above a
    /// tie, the most) for a sweep of upper halves of both signs, with every
    /// NaN, infinity and the largest finite values among them; through
    /// [`vectorized`], as the conversions run.
    #[test]
    fn narrowing_to_bf16_rounds_as_from_f32() {
        let lows = [0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff];
        let values: Vec<f32> = (0..=u16::MAX)
            .flat_map(|high| lows.map(|low| f32::from_bits((u32::from(high) << 16) | low)))
            .collect();
        let mut narrowed = vec![bf16::ZERO; values.len()];
        vectorized(Narrow(&values, &mut narrowed));
        for (&x, &got) in values.iter().zip(&narrowed) {
            assert_eq!(
                got.to_bits(),
                bf16::from_f32(x).to_bits(),
                "{:#010x}",
                x.to_bits()
            );
        }
    }

    #[test]
    fn filled_writes_every_chunk_at_its_offset() {
        // across the chunk's edges, on one thread and on the pool
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool");
        for len in [
            0,
            1,
            CONVERT_CHUNK,
            CONVERT_CHUNK + 1,
            3 * CONVERT_CHUNK + 5,
        ] {
            for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
                let values = pool.install(|| {
                    filled(len, u32::MAX, parallelism, |at, chunk| {
                        // the chunk starts as `zero`, then holds its positions
                        assert!(chunk.iter().all(|&x| x == u32::MAX));
                        for (i, x) in chunk.iter_mut().enumerate() {
                            *x = (at + i) as u32;
                        }
                    })
                });
                assert_eq!(
                    values,
                    (0..len as u32).collect::<Vec<_>>(),
                    "{len} {parallelism:?}"
                );
            }
        }
        let zeros = filled(CONVERT_CHUNK + 3, 0.5_f32, Parallelism::Rayon, |_, _| ());
        assert!(zeros.iter().all(|&x| x == 0.5));
    }

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
