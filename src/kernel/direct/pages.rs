//! Keys and values of a paged cache: int8 rows with one scale each, and rows in
//! fixed-size blocks reached through a block table.

use std::ops::Range;

use super::int8::{MAX_KEYS, MAX_WIDTH, WIDTH_STEP, round_to_i16};
use super::rows::{Rows, Widen, grown, prefetch_bytes};
use super::steps::{Chunk, Dots, HalfDots, Scratch, fold_in};
use crate::kernel::float::{KernelFloat, MulAdd};
use crate::kernel::params::{DIRECT_BATCH_ROWS as ROWS, DIRECT_CHUNK};

/// Rows of int8 values, each with its own scale: row `r` stands for
/// `data[r·width ..][..width] · scales[r]`. The scores take the scale of their
/// key after the dot product, the value sums fold it into the weights, so the
/// rows are widened in registers and never multiplied out.
///
/// Where `integer` (the CPU has integer dot products) and a batch has at most
/// [`INTEGER_ROWS`] rows, queries and weights are rounded to 16 bits (at one
/// scale per row, within `max / 65534`) and the products summed exactly in
/// `i32` ([`int8`](super::int8)).
#[derive(Clone, Copy)]
pub(crate) struct Quantized<'s> {
    pub(crate) data: &'s [i8],
    pub(crate) scales: &'s [f32],
    pub(crate) width: usize,
    pub(crate) integer: bool,
}

/// The most rows of a batch that the integer path takes: a whole batch of the
/// direct path (decoding with up to 8 query heads per key/value head).
const INTEGER_ROWS: usize = ROWS;

impl Quantized<'_> {
    /// Each row of `scratch.s` over the keys of `chunk` times each key's scale:
    /// the scores of the bytes become the keys' scores, the weights take the
    /// values' scales.
    #[inline(always)]
    fn scale_rows(self, scratch: &mut Scratch<f32>, chunk: &Chunk) {
        let scales = &self.scales[chunk.keys.clone()];
        for r in 0..chunk.rows {
            let row = &mut scratch.s[r * chunk.stride..][..scales.len()];
            for (x, &scale) in row.iter_mut().zip(scales) {
                *x *= scale;
            }
        }
    }

    /// Whether a chunk of `rows` rows of `width` runs on integer dot products.
    #[inline(always)]
    fn integer(&self, rows: usize, width: usize) -> bool {
        self.integer && integer_fits(rows, width)
    }
}

/// Whether batches of `rows` rows of `width` fit the integer path (on a CPU
/// that has it).
#[inline(always)]
pub(crate) fn integer_fits(rows: usize, width: usize) -> bool {
    rows <= INTEGER_ROWS && width.is_multiple_of(WIDTH_STEP) && width <= MAX_WIDTH
}

impl Rows<f32> for Quantized<'_> {
    const WIDENS: bool = true;
    const INTEGER: bool = true;
    /// Chunks as long as for rows read where they lie: the integer path reads
    /// the bytes where they lie (its weights need `chunk` floats of buffer).
    const CHUNK: usize = {
        assert!(
            DIRECT_CHUNK <= MAX_KEYS,
            "a chunk's integer value sums fit in i32"
        );
        DIRECT_CHUNK
    };

    #[inline(always)]
    fn prefetch_start(self) {
        prefetch_bytes(self.data);
        prefetch_bytes(self.scales);
    }

    /// Dequantised into `buffer`.
    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        Self: 'b,
    {
        let out = grown(buffer, to - from);
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

    /// `(q · k_int8) · scale_k`: the bytes' dot products as
    /// [`Widen`]'s, then each key's scale.
    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<f32> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        buffer: &mut Vec<f32>,
    ) {
        if self.integer(chunk.rows, chunk.width) {
            return self.integer_scores(dots, scratch, chunk);
        }
        Widen(self.data).scores::<M, D>(dots, scratch, chunk, buffer);
        self.scale_rows(scratch, chunk);
    }

    /// Each value row's scale joins its weight (in place: the weights are not
    /// read again), then [`Widen`]'s sums over the bytes.
    #[inline(always)]
    fn accumulate<M: MulAdd, D: Dots<f32> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        alpha: &[f32; ROWS],
        buffer: &mut Vec<f32>,
    ) {
        self.scale_rows(scratch, chunk);
        if self.integer(chunk.rows, chunk.width) {
            return self.integer_values::<M, D>(dots, scratch, chunk, alpha);
        }
        Widen(self.data).accumulate::<M, D>(dots, scratch, chunk, alpha, buffer);
    }
}

impl Quantized<'_> {
    /// [`Rows::scores`] on integer dot products: `(q₁₆ · k₈) · scale_q · scale_k`.
    #[inline(always)]
    fn integer_scores<D: HalfDots>(self, dots: D, scratch: &mut Scratch<f32>, chunk: &Chunk) {
        let (keys, d, rows) = (&chunk.keys, chunk.width, chunk.rows);
        let n = keys.len();
        // the queries rounded once per batch, after the chunk's weights
        let rounded = &mut scratch.shorts[chunk.stride..];
        let q_scale = *scratch.q_scales.get_or_insert_with(|| {
            let mut scales = [0.0_f32; INTEGER_ROWS];
            for (r, scale) in scales.iter_mut().enumerate().take(rows) {
                let row = r * d..(r + 1) * d;
                *scale = round_to_i16(&scratch.q[row.clone()], &mut rounded[row]);
            }
            scales
        });
        let q = &rounded[..rows * d];
        let sums = &mut scratch.ints[..rows * n];
        let stored = &self.data[keys.start * d..keys.end * d];
        dots.scores_i8(q, stored, d, sums);
        let scales = &self.scales[keys.clone()];
        for (r, &q_scale) in q_scale.iter().enumerate().take(rows) {
            let row = &mut scratch.s[r * chunk.stride..][..n];
            for ((s, &sum), &k_scale) in row.iter_mut().zip(&sums[r * n..]).zip(scales) {
                *s = sum as f32 * (q_scale * k_scale);
            }
        }
    }

    /// [`Rows::accumulate`] on integer dot products: each row's weights
    /// (their values' scales already in) rounded to 16 bits, summed over the
    /// bytes.
    #[inline(always)]
    fn integer_values<M: MulAdd, D: HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<f32>,
        chunk: &Chunk,
        alpha: &[f32; ROWS],
    ) {
        let (keys, d_v, rows) = (&chunk.keys, chunk.width, chunk.rows);
        let n = keys.len();
        let stored = &self.data[keys.start * d_v..keys.end * d_v];
        for r in 0..rows {
            let weights = &scratch.s[r * chunk.stride..][..n];
            let rounded = &mut scratch.shorts[..n];
            let scale = round_to_i16(weights, rounded);
            let sums = &mut scratch.ints[..d_v];
            dots.values_i8(rounded, stored, d_v, sums);
            for (a, &sum) in scratch.acc[r * d_v..(r + 1) * d_v]
                .iter_mut()
                .zip(sums.iter())
            {
                *a = sum as f32 * scale;
            }
        }
        fold_in::<f32, M>(scratch, d_v, rows, alpha);
    }
}

/// Rows kept in blocks of `size` rows, `blocks[i]` holding rows
/// `i·size .. (i + 1)·size` (a block table resolved to its blocks). A chunk of
/// keys that spans blocks is read block by block, each part by that block's
/// own kernels: its scores land at their place in the chunk's rows, its value
/// sums join the total one part after another.
#[derive(Clone, Copy)]
pub(crate) struct Paged<'s, R> {
    pub(crate) blocks: &'s [R],
    pub(crate) size: usize,
    pub(crate) width: usize,
}

impl<R> Paged<'_, R> {
    /// The parts of `keys` within one block each: `(block, keys within it,
    /// offset of the part in the chunk)`.
    #[inline(always)]
    fn parts(&self, keys: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>, usize)> {
        let size = self.size;
        let start = keys.start;
        (keys.start / size..keys.end.div_ceil(size)).map(move |block| {
            let first = block * size;
            let from = keys.start.max(first);
            let to = keys.end.min(first + size);
            (block, from - first..to - first, from - start)
        })
    }
}

impl<R: Copy> Paged<'_, R> {
    /// As a block is begun, the start of the next one asked for.
    #[inline(always)]
    fn prefetch_next<A: KernelFloat>(&self, block: usize, keys: &Range<usize>)
    where
        R: Rows<A>,
    {
        if keys.start == 0
            && let Some(next) = self.blocks.get(block + 1)
        {
            next.prefetch_start();
        }
    }
}

/// The part of `chunk` at `keys` (counted within its block), for the same
/// batch of rows.
#[inline(always)]
fn part_of(chunk: &Chunk, keys: Range<usize>) -> Chunk {
    Chunk {
        keys,
        width: chunk.width,
        rows: chunk.rows,
        stride: chunk.stride,
    }
}

/// `scratch` with its scores (then weights) from `offset` on: a part's
/// columns of the chunk's rows.
#[inline(always)]
fn shifted<'a, A: Copy>(scratch: &'a mut Scratch<'_, A>, offset: usize) -> Scratch<'a, A> {
    Scratch {
        q: &mut *scratch.q,
        s: &mut scratch.s[offset..],
        o: &mut *scratch.o,
        acc: &mut *scratch.acc,
        shorts: &mut *scratch.shorts,
        q_scales: &mut *scratch.q_scales,
        ints: &mut *scratch.ints,
        max: scratch.max,
        sum: scratch.sum,
    }
}

impl<A: KernelFloat, R: Rows<A>> Rows<A> for Paged<'_, R> {
    const WIDENS: bool = R::WIDENS;
    const INTEGER: bool = R::INTEGER;
    const CHUNK: usize = R::CHUNK;

    /// Rows within one block (a part of a chunk).
    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut Vec<A>) -> &'b [A]
    where
        Self: 'b,
    {
        let block = from / self.width / self.size;
        let first = block * self.size * self.width;
        debug_assert!(
            to <= first + self.size * self.width,
            "rows within one block"
        );
        self.blocks[block].rows(from - first, to - first, buffer)
    }

    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        buffer: &mut Vec<A>,
    ) {
        for (block, keys, offset) in self.parts(chunk.keys.clone()) {
            self.prefetch_next(block, &keys);
            let mut part = shifted(scratch, offset);
            let chunk = part_of(chunk, keys);
            self.blocks[block].scores::<M, D>(dots, &mut part, &chunk, buffer);
        }
    }

    /// The first part folds in with `alpha`, each further one adds to it.
    #[inline(always)]
    fn accumulate<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        alpha: &[A; ROWS],
        buffer: &mut Vec<A>,
    ) {
        let ones = [A::one(); ROWS];
        for (i, (block, keys, offset)) in self.parts(chunk.keys.clone()).enumerate() {
            self.prefetch_next(block, &keys);
            let mut part = shifted(scratch, offset);
            let chunk = part_of(chunk, keys);
            let alpha = if i == 0 { alpha } else { &ones };
            self.blocks[block].accumulate::<M, D>(dots, &mut part, &chunk, alpha, buffer);
        }
    }
}
