//! The steps of one chunk of keys for a batch of query rows: the scores against
//! the keys, and the weighted sums of the values, on the micro-kernels.

use std::ops::Range;

use super::int8;
use super::narrow::Narrow;
use crate::kernel::float::{KernelFloat, MulAdd};
use crate::kernel::online::exp_and_sum;
use crate::kernel::params::{DIRECT_BATCH_ROWS as ROWS, LANES, SOFTMAX_LANES, TILE_BLOCKS};

/// Per-batch working memory.
pub(crate) struct Scratch<'s, A> {
    /// Scaled queries, `rows × d`.
    pub(super) q: &'s mut [A],
    /// Scores, then weights, of one chunk: `rows × chunk`.
    pub(super) s: &'s mut [A],
    /// Running outputs and one chunk's products, `rows × d_v` each.
    pub(super) o: &'s mut [A],
    pub(super) acc: &'s mut [A],
    /// Integer weights then queries, `chunk + rows × d`, and integer sums,
    /// `rows × chunk + d_v` (empty unless the rows are int8).
    pub(super) shorts: &'s mut [i16],
    pub(super) ints: &'s mut [i32],
    /// The integer queries' scales once they are rounded: a batch's queries
    /// are rounded for its first chunk and kept for the others.
    pub(super) q_scales: &'s mut Option<[f32; ROWS]>,
    pub(super) max: [A; ROWS],
    pub(super) sum: [A; ROWS],
}

/// The keys (or value rows) of one step of a batch of query rows.
pub(crate) struct Chunk {
    pub(super) keys: Range<usize>,
    /// Elements per key or value row.
    pub(super) width: usize,
    /// Query rows in the batch.
    pub(super) rows: usize,
    /// Distance between the batch's rows of scores.
    pub(super) stride: usize,
}

/// Scores of `rows` scaled queries against `keys` (row-major, `d` wide) into the
/// rows of `s` (`chunk` apart), four keys at a time.
#[inline(always)]
pub(super) fn scores<A: KernelFloat, M: MulAdd, D: Dots<A>>(
    dots: D,
    q: &[A],
    keys: &[A],
    d: usize,
    rows: usize,
    chunk: usize,
    s: &mut [A],
) {
    let n = keys.len() / d;
    for j in (0..n).step_by(4) {
        // past the last key, repeat it and ignore the result
        let k = four(|u| {
            let key = (j + u).min(n - 1);
            &keys[key * d..(key + 1) * d]
        });
        let used = (n - j).min(4);
        for r in 0..rows {
            let sums = dot4::<A, M, D>(dots, &q[r * d..(r + 1) * d], &k);
            store_used(&mut s[r * chunk + j..], &sums, used);
        }
    }
}

/// `[f(0), f(1), f(2), f(3)]`, spelled out: `std::array::from_fn` over a
/// closure was left as a call in the score loops (6 % of a bf16 step).
#[inline(always)]
pub(super) fn four<T>(f: impl Fn(usize) -> T) -> [T; 4] {
    [f(0), f(1), f(2), f(3)]
}

/// The first `used` of four sums into `out`: all four in one move when all are
/// used, the last few of a part by a call out of the way (written as one
/// copy of `used`, both were a call to `memcpy`: 7 % of a bf16 step).
#[inline(always)]
pub(super) fn store_used<A: Copy>(out: &mut [A], sums: &[A; 4], used: usize) {
    match out.first_chunk_mut::<4>() {
        Some(out) if used == 4 => *out = *sums,
        _ => store_few(out, sums, used),
    }
}

#[cold]
#[inline(never)]
fn store_few<A: Copy>(out: &mut [A], sums: &[A; 4], used: usize) {
    out[..used].copy_from_slice(&sums[..used]);
}

/// `q · k[u]` for four keys.
#[inline(always)]
fn dot4<A: KernelFloat, M: MulAdd, D: Dots<A>>(dots: D, q: &[A], k: &[&[A]; 4]) -> [A; 4] {
    let (q_lanes, q_rest) = q.as_chunks::<LANES>();
    let k_lanes: [&[[A; LANES]]; 4] =
        std::array::from_fn(|u| &k[u].as_chunks::<LANES>().0[..q_lanes.len()]);
    let sums = dots.dot4(q_lanes, &k_lanes);
    let tail = q_lanes.len() * LANES;
    std::array::from_fn(|u| {
        q_rest
            .iter()
            .zip(&k[u][tail..])
            .fold(sums[u], |t, (&x, &y)| M::mul_add(x, y, t))
    })
}

/// The register-blocked sums of the direct path; implemented in [`crate::kernel::arch`]
/// by a value that proves its instructions run.
pub(crate) trait Dots<A>: Copy {
    /// `Σₚ q[p] · k[u][p]` (every lane of every block) for each of the four keys
    /// `u`; every `k[u]` is as long as `q`. The sums are reduced in registers:
    /// lanes stored and read back one by one would stall on store forwarding.
    fn dot4(self, q: &[[A; LANES]], k: &[&[[A; LANES]]; 4]) -> [A; 4];

    /// `Σⱼ p[u][j] · values[j][c0 .. c0 + LANES]` for four rows of weights `p[u]`
    /// over the keys `j` (`values` holds them row-major, `d_v` wide; every `p[u]`
    /// has one weight per key).
    fn value_rows(self, p: &[&[A]; 4], values: &[A], d_v: usize, c0: usize) -> [[A; LANES]; 4];

    /// Replaces each score `x` of `row` by `exp(x − shift)` and returns their
    /// sum ([`exp_and_sum`]) unless the token has a faster way.
    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [A], shift: A) -> A
    where
        A: KernelFloat,
    {
        exp_and_sum::<A, M, SOFTMAX_LANES>(row, shift)
    }
}

/// Micro-kernels over half-precision rows, widened to f32 in registers as they
/// are loaded; implemented in [`crate::kernel::arch`].
pub(crate) trait HalfDots: Copy {
    /// `Σₚ q[p] · k[u][p]` for each of four keys `u`, as [`Dots::dot4`].
    fn dot4_half<H: Narrow>(self, q: &[[f32; LANES]], k: &[&[[H; LANES]]; 4]) -> [f32; 4];

    /// `Σⱼ p[j] · values[j][c0 .. c0 + TILE_BLOCKS·LANES]` for one row of
    /// weights `p` (`values` row-major, `d_v` wide, one row per weight).
    fn value_row_half<H: Narrow>(
        self,
        p: &[f32],
        values: &[H],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; TILE_BLOCKS];

    /// [`int8::scores_i8`]: 16-bit queries against int8 keys, exact in `i32`
    /// (the scalar loops unless the token has integer dot products).
    #[inline(always)]
    fn scores_i8(self, q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
        int8::scores_i8(q, keys, d, out);
    }

    /// [`int8::values_i8`]: 16-bit weights over int8 value rows, exact in `i32`.
    #[inline(always)]
    fn values_i8(self, w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
        int8::values_i8(w, values, d_v, out);
    }
}

/// The sum of the lanes, pairwise.
#[inline(always)]
pub(crate) fn sum_lanes<A: KernelFloat>(x: &[A; LANES]) -> A {
    let half: [A; 4] = std::array::from_fn(|c| x[c] + x[c + 4]);
    (half[0] + half[2]) + (half[1] + half[3])
}

/// `O = α·O + P·V` for one chunk: the chunk's product is summed on its own before
/// it is added to the rescaled total (blocked summation, as in the tiled kernel).
#[inline(always)]
pub(super) fn accumulate<A: KernelFloat, M: MulAdd, D: Dots<A>>(
    dots: D,
    scratch: &mut Scratch<A>,
    values: &[A],
    d_v: usize,
    rows: usize,
    chunk: usize,
    alpha: &[A; ROWS],
) {
    let acc = &mut scratch.acc[..rows * d_v];
    let n = values.len() / d_v;
    // four rows by LANES columns at a time in registers, the rest one by one
    let (tiled_rows, tiled_cols) = (rows / 4 * 4, d_v / LANES * LANES);
    for r0 in (0..tiled_rows).step_by(4) {
        let p: [&[A]; 4] = four(|u| &scratch.s[(r0 + u) * chunk..][..n]);
        for c0 in (0..tiled_cols).step_by(LANES) {
            let tile = dots.value_rows(&p, values, d_v, c0);
            for (u, tile) in tile.iter().enumerate() {
                acc[(r0 + u) * d_v + c0..][..LANES].copy_from_slice(tile);
            }
        }
    }
    // the rows left (all of them for one or two query heads of a key/value head,
    // as in decoding without grouped queries): each row's sums in registers,
    // TILE_BLOCKS × LANES columns at a time, so no sum waits on the last one's store
    for r in tiled_rows..rows {
        let p = &scratch.s[r * chunk..][..n];
        let acc = &mut acc[r * d_v..(r + 1) * d_v];
        let mut c0 = 0;
        while c0 + TILE_BLOCKS * LANES <= tiled_cols {
            let mut tile = [[A::zero(); LANES]; TILE_BLOCKS];
            for (value, &p) in values.chunks_exact(d_v).zip(p) {
                let value: &[[A; LANES]] = value[c0..c0 + TILE_BLOCKS * LANES].as_chunks().0;
                for (t, v) in tile.iter_mut().zip(value) {
                    for (t, &v) in t.iter_mut().zip(v) {
                        *t = M::mul_add(p, v, *t);
                    }
                }
            }
            acc[c0..c0 + TILE_BLOCKS * LANES].copy_from_slice(tile.as_flattened());
            c0 += TILE_BLOCKS * LANES;
        }
        if c0 < d_v {
            let acc = &mut acc[c0..];
            acc.fill(A::zero());
            for (value, &p) in values.chunks_exact(d_v).zip(p) {
                for (a, &x) in acc.iter_mut().zip(&value[c0..]) {
                    *a = M::mul_add(p, x, *a);
                }
            }
        }
    }
    // the columns past the 4-row tiles
    for (r, acc) in acc.chunks_exact_mut(d_v).enumerate().take(tiled_rows) {
        let acc = &mut acc[tiled_cols..];
        acc.fill(A::zero());
        for (value, &p) in values.chunks_exact(d_v).zip(&scratch.s[r * chunk..][..n]) {
            for (a, &x) in acc.iter_mut().zip(&value[tiled_cols..]) {
                *a = M::mul_add(p, x, *a);
            }
        }
    }
    fold_in::<A, M>(scratch, d_v, rows, alpha);
}

/// `O = α·O + acc` for the batch's rows: a chunk's products join the total.
#[inline(always)]
pub(super) fn fold_in<A: KernelFloat, M: MulAdd>(
    scratch: &mut Scratch<A>,
    d_v: usize,
    rows: usize,
    alpha: &[A; ROWS],
) {
    for (r, (o, acc)) in scratch
        .o
        .chunks_exact_mut(d_v)
        .zip(scratch.acc[..rows * d_v].chunks_exact(d_v))
        .enumerate()
    {
        for (o, &a) in o.iter_mut().zip(acc) {
            *o = M::mul_add(*o, alpha[r], a);
        }
    }
}
