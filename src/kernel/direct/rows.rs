//! Where the direct path reads keys and values from: the stored slice itself, or
//! half-precision rows widened to `f32` as they are loaded.

use std::marker::PhantomData;

use super::narrow::Narrow;
use super::steps::{Chunk, Dots, HalfDots, Scratch, accumulate, fold_in, four, scores, store_used};
use crate::element::Half;
use crate::kernel::arch::cpu::is_intel;
use crate::kernel::float::{KernelFloat, MulAdd};
use crate::kernel::params::{
    DIRECT_BATCH_ROWS as ROWS, DIRECT_CHUNK, LANES, PREFETCH_ROWS, PREFETCH_START, TILE_BLOCKS,
    WIDEN_CHUNK,
};

/// Software prefetching of the half-precision keys and values of a decoding
/// step, on Intel CPUs only: on the Intel Xeon host of 2026-12-03 (AMX,
/// AVX512_FP16) the hardware prefetchers alone left a bf16 or f16 step 12-20 %
/// slower (8, 16, 32 and 64 rows ahead measured alike; the f32 step was slower
/// with the hint, so it has none); on AMD Zen 4, prefetching 1-4 KiB ahead made
/// an earlier version of the half step slower.
#[derive(Clone, Copy)]
pub(crate) struct Prefetch(bool);

impl Prefetch {
    /// Whether this CPU prefetches: its vendor is Intel.
    pub(crate) fn for_this_cpu() -> Self {
        Prefetch(is_intel())
    }

    /// Asks the CPU to bring the cache lines holding `len` values from `start`
    /// into its caches, `PREFETCH_ROWS` rows of `width` values ahead; a hint,
    /// which never faults, so rows past the end of the slice are harmless.
    #[inline(always)]
    pub(crate) fn ahead<H: Narrow>(self, start: *const H, len: usize, width: usize) {
        if !self.0 {
            return;
        }
        let ahead = start.wrapping_add(PREFETCH_ROWS * width);
        for offset in (0..len).step_by(64 / std::mem::size_of::<H>()) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch reads nothing the program can observe and never
            // faults; SSE is part of every x86-64 CPU.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(offset).cast());
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (ahead, offset);
        }
    }
}

/// Rows of keys or values as the kernel's float `A`: the stored slice itself, or
/// half-precision rows widened to `f32` as they are read.
pub(crate) trait Rows<A: KernelFloat>: Copy + Send + Sync {
    /// Whether [`rows`](Self::rows) needs its buffer.
    const WIDENS: bool;

    /// Keys per chunk of the direct path's online softmax: longer where the
    /// rows are read where they lie, shorter where they are widened into a
    /// buffer first.
    const CHUNK: usize = if Self::WIDENS {
        WIDEN_CHUNK
    } else {
        DIRECT_CHUNK
    };

    /// Whether the kernels need integer scratch ([`Scratch::shorts`],
    /// [`Scratch::ints`]).
    const INTEGER: bool = false;

    /// Elements `from..to` of the row-major rows, as `A`.
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut Vec<A>) -> &'b [A]
    where
        Self: 'b;

    /// Asks the CPU to bring the first rows into its caches: the start of a block the direct path reads next, where the
    /// hardware prefetchers lose the stream.
    #[inline(always)]
    fn prefetch_start(self) {}

    /// The scores of the batch's scaled queries against the keys of `chunk`,
    /// into `scratch.s`: the micro-kernels over [`rows`](Self::rows).
    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        buffer: &mut Vec<A>,
    ) {
        scores_over_rows::<A, M, D, Self>(self, dots, scratch, chunk, buffer);
    }

    /// `O = α·O + P·V` over the value rows of `chunk`: the micro-kernels over
    /// [`rows`](Self::rows).
    #[inline(always)]
    fn accumulate<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        alpha: &[A; ROWS],
        buffer: &mut Vec<A>,
    ) {
        accumulate_over_rows::<A, M, D, Self>(self, dots, scratch, chunk, alpha, buffer);
    }
}

/// [`Rows::scores`] by the micro-kernels over the rows as `A` (borrowed, or
/// widened into `buffer`).
#[inline(always)]
fn scores_over_rows<A: KernelFloat, M: MulAdd, D: Dots<A>, R: Rows<A>>(
    rows: R,
    dots: D,
    scratch: &mut Scratch<A>,
    chunk: &Chunk,
    buffer: &mut Vec<A>,
) {
    let (keys, d) = (&chunk.keys, chunk.width);
    let stored = rows.rows(keys.start * d, keys.end * d, buffer);
    let (batch, stride) = (chunk.rows, chunk.stride);
    scores::<A, M, D>(dots, scratch.q, stored, d, batch, stride, scratch.s);
}

/// [`Rows::accumulate`] by the micro-kernels over the rows as `A`.
#[inline(always)]
fn accumulate_over_rows<A: KernelFloat, M: MulAdd, D: Dots<A>, R: Rows<A>>(
    rows: R,
    dots: D,
    scratch: &mut Scratch<A>,
    chunk: &Chunk,
    alpha: &[A; ROWS],
    buffer: &mut Vec<A>,
) {
    let (keys, d_v) = (&chunk.keys, chunk.width);
    let stored = rows.rows(keys.start * d_v, keys.end * d_v, buffer);
    accumulate::<A, M, D>(dots, scratch, stored, d_v, chunk.rows, chunk.stride, alpha);
}

impl<A: KernelFloat + Sync> Rows<A> for &[A] {
    const WIDENS: bool = false;

    #[inline(always)]
    fn prefetch_start(self) {
        prefetch_bytes(self);
    }

    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, _: &'b mut Vec<A>) -> &'b [A]
    where
        Self: 'b,
    {
        &self[from..to]
    }
}

/// Rows of a narrow type (half precision, or the bytes of an int8 cache
/// before their scales), widened to `f32` as they are read.
#[derive(Clone, Copy)]
pub(crate) struct Widen<'s, H>(pub(crate) &'s [H]);

impl<H: Narrow> Rows<f32> for Widen<'_, H> {
    const WIDENS: bool = true;

    #[inline(always)]
    fn prefetch_start(self) {
        prefetch_bytes(self.0);
    }

    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        Self: 'b,
    {
        let out = grown(buffer, to - from);
        H::widen(&self.0[from..to], out);
        out
    }

    /// Widened in registers as the dot products load them, four keys at a time.
    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<f32> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        buffer: &mut Vec<f32>,
    ) {
        let (keys, d) = (&chunk.keys, chunk.width);
        if !d.is_multiple_of(LANES) {
            return scores_over_rows::<f32, M, D, Self>(self, dots, scratch, chunk, buffer);
        }
        let n = keys.len();
        let stored = &self.0[keys.start * d..keys.end * d];
        let prefetch = Prefetch::for_this_cpu();
        for j in (0..n).step_by(4) {
            prefetch.ahead(stored[j * d..].as_ptr(), 4 * d, d);
            // past the last key, repeat it and ignore the result
            let k: [&[[H; LANES]]; 4] = four(|u| {
                let key = (j + u).min(n - 1);
                stored[key * d..(key + 1) * d].as_chunks().0
            });
            let used = (n - j).min(4);
            for r in 0..chunk.rows {
                let q: &[[f32; LANES]] = scratch.q[r * d..(r + 1) * d].as_chunks().0;
                let sums = dots.dot4_half(q, &k);
                store_used(&mut scratch.s[r * chunk.stride + j..], &sums, used);
            }
        }
    }

    /// One to three query rows (decoding without grouped queries): each row's
    /// sums in registers, the values widened as they are loaded; four or more
    /// rows share chunks widened once.
    #[inline(always)]
    fn accumulate<M: MulAdd, D: Dots<f32> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        alpha: &[f32; ROWS],
        buffer: &mut Vec<f32>,
    ) {
        let (keys, d_v, rows) = (&chunk.keys, chunk.width, chunk.rows);
        let block = TILE_BLOCKS * LANES;
        if rows >= 4 || !d_v.is_multiple_of(block) {
            return accumulate_over_rows::<f32, M, D, Self>(
                self, dots, scratch, chunk, alpha, buffer,
            );
        }
        let stored = &self.0[keys.start * d_v..keys.end * d_v];
        for r in 0..rows {
            let p = &scratch.s[r * chunk.stride..][..keys.len()];
            for c0 in (0..d_v).step_by(block) {
                let tile = dots.value_row_half(p, stored, d_v, c0);
                scratch.acc[r * d_v + c0..][..block].copy_from_slice(tile.as_flattened());
            }
        }
        fold_in::<f32, M>(scratch, d_v, rows, alpha);
    }
}

/// The first `len` elements of `buffer`, grown to hold them where it is
/// shorter (with `T::default()`, zero): working memory costs nothing until a
/// path that uses it runs (most decoding steps widen in registers), and what a
/// path finds in it is an earlier part's (it writes before it reads).
#[inline(always)]
pub(super) fn grown<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// The first [`PREFETCH_START`] bytes of `x` brought towards the core (a hint:
/// it never faults).
#[inline(always)]
pub(super) fn prefetch_bytes<T>(x: &[T]) {
    let bytes = std::mem::size_of_val(x).min(PREFETCH_START);
    for offset in (0..bytes).step_by(64) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch reads nothing the program can observe and never
        // faults; SSE is part of every x86-64 CPU.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().cast::<i8>().wrapping_add(offset));
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = offset;
    }
}

/// How keys and values stored as [`Elem`](Self::Elem) are read by a kernel
/// computing in `A`: [`Native`] or [`Widening`].
pub(crate) trait Source<A: KernelFloat> {
    /// The stored element.
    type Elem: Copy + Send + Sync;
    /// The rows of a slice of it.
    type Rows<'s>: Rows<A>;

    fn rows(slice: &[Self::Elem]) -> Self::Rows<'_>;
}

/// Keys and values stored as the kernel computes.
pub(crate) struct Native<A>(PhantomData<A>);

impl<A: KernelFloat + Sync> Source<A> for Native<A> {
    type Elem = A;
    type Rows<'s> = &'s [A];

    fn rows(slice: &[A]) -> &[A] {
        slice
    }
}

/// Keys and values stored in half precision, for a kernel computing in `f32`.
pub(crate) struct Widening<H>(PhantomData<H>);

impl<H: Half> Source<f32> for Widening<H> {
    type Elem = H;
    type Rows<'s> = Widen<'s, H>;

    fn rows(slice: &[H]) -> Widen<'_, H> {
        Widen(slice)
    }
}
