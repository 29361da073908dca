//! Keys and values of a paged cache: int8 rows with one scale each, and rows in
//! fixed-size blocks reached through a block table.

use super::rows::{Rows, accumulate_over_rows, scores_over_rows};
use super::steps::{Chunk, Dots, HalfDots, Scratch, fold_in};
use crate::kernel::float::MulAdd;
use crate::kernel::params::{DIRECT_BATCH_ROWS as ROWS, LANES, TILE_BLOCKS};

/// Rows of int8 values, each with its own scale: row `r` stands for
/// `data[r·width ..][..width] · scales[r]`. The scores take the scale of their
/// key after the dot product, the value sums fold it into the weights, so the
/// rows are widened in registers and never multiplied out.
#[derive(Clone, Copy)]
pub(crate) struct Quantized<'s> {
    pub(crate) data: &'s [i8],
    pub(crate) scales: &'s [f32],
    pub(crate) width: usize,
}

impl Rows<f32> for Quantized<'_> {
    const WIDENS: bool = true;

    /// Dequantised into `buffer`.
    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut [f32]) -> &'b [f32]
    where
        Self: 'b,
    {
        let out = &mut buffer[..to - from];
        let first = from / self.width;
        for (row, (out, data)) in out
            .chunks_exact_mut(self.width)
            .zip(self.data[from..to].chunks_exact(self.width))
            .enumerate()
        {
            let scale = self.scales[first + row];
            for (o, &x) in out.iter_mut().zip(data) {
                *o = f32::from(x) * scale;
            }
        }
        out
    }

    /// `(q · k_int8) · scale_k`, the bytes widened as the dot products load them.
    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<f32> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        buffer: &mut [f32],
    ) {
        let (keys, d) = (&chunk.keys, chunk.width);
        if !d.is_multiple_of(LANES) {
            return scores_over_rows::<f32, M, D, Self>(self, dots, scratch, chunk, buffer);
        }
        let n = keys.len();
        let stored = &self.data[keys.start * d..keys.end * d];
        let scales = &self.scales[keys.clone()];
        for j in (0..n).step_by(4) {
            // past the last key, repeat it and ignore the result
            let k: [&[[i8; LANES]]; 4] = std::array::from_fn(|u| {
                let key = (j + u).min(n - 1);
                stored[key * d..(key + 1) * d].as_chunks().0
            });
            let used = (n - j).min(4);
            for r in 0..chunk.rows {
                let q: &[[f32; LANES]] = scratch.q[r * d..(r + 1) * d].as_chunks().0;
                let sums = dots.dot4_half(q, &k);
                let row = &mut scratch.s[r * chunk.stride + j..][..used];
                for ((s, &sum), &scale) in row.iter_mut().zip(&sums).zip(&scales[j..]) {
                    *s = sum * scale;
                }
            }
        }
    }

    /// One to three query rows: each value row's scale joins its weight, the
    /// bytes are widened as they are loaded; four or more rows share chunks
    /// dequantised once.
    #[inline(always)]
    fn accumulate<M: MulAdd, D: Dots<f32> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        alpha: &[f32; ROWS],
        buffer: &mut [f32],
    ) {
        let (keys, d_v, rows) = (&chunk.keys, chunk.width, chunk.rows);
        let block = TILE_BLOCKS * LANES;
        if rows >= 4 || !d_v.is_multiple_of(block) {
            return accumulate_over_rows::<f32, M, D, Self>(
                self, dots, scratch, chunk, alpha, buffer,
            );
        }
        let stored = &self.data[keys.start * d_v..keys.end * d_v];
        let scales = &self.scales[keys.clone()];
        let weights = &mut buffer[..keys.len()];
        for r in 0..rows {
            let p = &scratch.s[r * chunk.stride..][..keys.len()];
            for ((w, &p), &scale) in weights.iter_mut().zip(p).zip(scales) {
                *w = p * scale;
            }
            for c0 in (0..d_v).step_by(block) {
                let tile = dots.value_row_half(weights, stored, d_v, c0);
                scratch.acc[r * d_v + c0..][..block].copy_from_slice(tile.as_flattened());
            }
        }
        fold_in::<f32, M>(scratch, d_v, rows, alpha);
    }
}

/// Rows kept in blocks of `size` rows, `blocks[i]` holding rows
/// `i·size .. (i + 1)·size` (a block table resolved to its blocks). The direct
/// path cuts its chunks at block ends ([`Rows::run_end`]), so each chunk is
/// read from one block, by that block's own kernels.
#[derive(Clone, Copy)]
pub(crate) struct Paged<'s, R> {
    pub(crate) blocks: &'s [R],
    pub(crate) size: usize,
    pub(crate) width: usize,
}

impl<R> Paged<'_, R> {
    /// The block holding `keys` and their range within it.
    #[inline(always)]
    fn locate(&self, keys: &std::ops::Range<usize>) -> (usize, std::ops::Range<usize>) {
        let block = keys.start / self.size;
        let first = block * self.size;
        debug_assert!(keys.end <= first + self.size, "a chunk within one block");
        (block, keys.start - first..keys.end - first)
    }

    /// The same chunk in the coordinates of its block.
    #[inline(always)]
    fn within(&self, chunk: &Chunk) -> (usize, Chunk) {
        let (block, keys) = self.locate(&chunk.keys);
        let local = Chunk {
            keys,
            width: chunk.width,
            rows: chunk.rows,
            stride: chunk.stride,
        };
        (block, local)
    }
}

impl<A: crate::kernel::float::KernelFloat, R: Rows<A>> Rows<A> for Paged<'_, R> {
    const WIDENS: bool = R::WIDENS;

    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut [A]) -> &'b [A]
    where
        Self: 'b,
    {
        let (block, keys) = self.locate(&(from / self.width..to.div_ceil(self.width)));
        let (from, to) = (keys.start * self.width, keys.end * self.width);
        self.blocks[block].rows(from, to, buffer)
    }

    #[inline(always)]
    fn run_end(self, key: usize) -> usize {
        (key / self.size + 1) * self.size
    }

    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        buffer: &mut [A],
    ) {
        let (block, local) = self.within(chunk);
        self.blocks[block].scores::<M, D>(dots, scratch, &local, buffer);
    }

    #[inline(always)]
    fn accumulate<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        alpha: &[A; ROWS],
        buffer: &mut [A],
    ) {
        let (block, local) = self.within(chunk);
        self.blocks[block].accumulate::<M, D>(dots, scratch, &local, alpha, buffer);
    }
}
