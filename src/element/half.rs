//! Half-precision storage, `bf16` and `f16`: their [`Storage`] and [`Half`]
//! implementations, and the conversions to and from `f32` that every call on
//! them runs (vectorised, split over the pool when large, into memory the
//! thread kept from its calls before).

use std::mem::MaybeUninit;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use ndarray::{Array, ArrayView, CowArray, Dimension};
use rayon::prelude::*;

use super::{Half, PerStorage, Storage};
use crate::flex::program::Program;
use crate::kept;
use crate::kernel::Parallelism;
use crate::kernel::sweep::{Sweep, vectorized};

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
                        let mut dst = kept(src.len(), parallelism);
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
                match kept::take(len) {
                    Some(mut zeros) => {
                        chunked(&mut zeros, parallelism, |_, chunk| chunk.fill(0.0));
                        zeros
                    }
                    // new memory is zeroed as it is filled
                    None => filled(len, 0.0, parallelism, |_, _| ()),
                }
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
pub(super) fn filled<T: Send + Sync + Copy>(
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

/// `len` values to write over: memory this thread kept ([`kept::take`]), or
/// new values set to 0 on the pool where `parallelism` allows.
fn kept(len: usize, parallelism: Parallelism) -> Vec<f32> {
    kept::take(len).unwrap_or_else(|| filled(len, 0.0, parallelism, |_, _| ()))
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
}
