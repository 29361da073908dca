//! The direct path: a few query rows at a time, streaming over the keys and values
//! where they lie, with no packing and no scan of the inputs beforehand. It serves
//! decoding: one or a few new queries against a long cache, where packing the keys
//! and scanning them would cost as much as attending to them.
//!
//! The query heads sharing one key/value head are cut into batches of
//! [`DIRECT_BATCH_ROWS`](super::params::DIRECT_BATCH_ROWS) rows; each batch makes one pass over the keys the masks
//! leave in reach, in chunks of [`DIRECT_CHUNK`] keys with an online softmax, so a
//! key or value row is read from memory once per batch and no `L × S` buffer
//! exists. Long caches are cut into parts of
//! [`DIRECT_PART`](super::params::DIRECT_PART) keys that run on
//! different threads, each ending with
//! its rows' maxima, sums and unscaled outputs, merged in order by [`finish`]
//! (split-key decoding): a single key/value head still uses every thread.
//!
//! Instead of scanning the inputs first, the path checks what it computed: a NaN
//! or `+∞` score after masking, or an output that is not finite, means the inputs
//! were not finite or overflowed, and the head is left to the reference path.
//!
//! Keys and values stored in half precision are read as they lie and widened to
//! `f32` one chunk at a time ([`Rows`]), so a decoding step reads half the bytes.

use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut2};

use std::marker::PhantomData;

use super::float::{KernelFloat, MulAdd, Separate};
use super::online::{fold_max, inverse_total, part_weight, shift_of, softmax_update};
use super::params::{DIRECT_BATCH_ROWS as ROWS, DIRECT_CHUNK, LANES, WIDEN_CHUNK};
use crate::core::mask::{apply_row, keys_in_reach, Mask2};
use crate::element::Half;

/// Rows of keys or values as the kernel's float `A`: the stored slice itself, or
/// half-precision rows widened to `f32` as they are read.
pub(crate) trait Rows<A: KernelFloat>: Copy + Send + Sync {
    /// Whether [`rows`](Self::rows) needs its buffer.
    const WIDENS: bool;

    /// Elements `from..to` of the row-major rows, as `A`.
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut [A]) -> &'b [A]
    where
        Self: 'b;

    /// The scores of the batch's scaled queries against the keys of `chunk`,
    /// into `scratch.s`: the micro-kernels over [`rows`](Self::rows).
    #[inline(always)]
    fn scores<M: MulAdd, D: Dots<A> + HalfDots>(
        self,
        dots: D,
        scratch: &mut Scratch<A>,
        chunk: &Chunk,
        buffer: &mut [A],
    ) {
        let (keys, d) = (&chunk.keys, chunk.width);
        let stored = self.rows(keys.start * d, keys.end * d, buffer);
        scores::<A, M, D>(
            dots,
            scratch.q,
            stored,
            d,
            chunk.rows,
            chunk.stride,
            scratch.s,
        );
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
        buffer: &mut [A],
    ) {
        let (keys, d_v) = (&chunk.keys, chunk.width);
        let stored = self.rows(keys.start * d_v, keys.end * d_v, buffer);
        accumulate::<A, M, D>(dots, scratch, stored, d_v, chunk.rows, chunk.stride, alpha);
    }
}

/// The keys (or value rows) of one step of a batch of query rows.
pub(crate) struct Chunk {
    keys: Range<usize>,
    /// Elements per key or value row.
    width: usize,
    /// Query rows in the batch.
    rows: usize,
    /// Distance between the batch's rows of scores.
    stride: usize,
}

/// Micro-kernels over half-precision rows, widened to f32 in registers as they
/// are loaded; implemented in [`super::arch`].
pub(crate) trait HalfDots: Copy {
    /// `Σₚ q[p] ⊙ k[u][p]` lane by lane, for each of four keys `u`, as [`Dots::dot4`].
    fn dot4_half<H: Half>(self, q: &[[f32; LANES]], k: &[&[[H; LANES]]; 4]) -> [[f32; LANES]; 4];

    /// `Σⱼ p[j] · values[j][c0 .. c0 + TILE_BLOCKS·LANES]` for one row of
    /// weights `p` (`values` row-major, `d_v` wide, one row per weight).
    fn value_row_half<H: Half>(
        self,
        p: &[f32],
        values: &[H],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; TILE_BLOCKS];
}

impl<A: KernelFloat + Sync> Rows<A> for &[A] {
    const WIDENS: bool = false;

    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, _: &'b mut [A]) -> &'b [A]
    where
        Self: 'b,
    {
        &self[from..to]
    }
}

/// Half-precision rows, widened to `f32` as they are read.
#[derive(Clone, Copy)]
pub(crate) struct Widen<'s, H>(pub(crate) &'s [H]);

impl<H: Half> Rows<f32> for Widen<'_, H> {
    const WIDENS: bool = true;

    #[inline(always)]
    fn rows<'b>(self, from: usize, to: usize, buffer: &'b mut [f32]) -> &'b [f32]
    where
        Self: 'b,
    {
        let out = &mut buffer[..to - from];
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
        buffer: &mut [f32],
    ) {
        let (keys, d) = (&chunk.keys, chunk.width);
        if !d.is_multiple_of(LANES) {
            let stored = self.rows(keys.start * d, keys.end * d, buffer);
            return scores::<f32, M, D>(
                dots,
                scratch.q,
                stored,
                d,
                chunk.rows,
                chunk.stride,
                scratch.s,
            );
        }
        let n = keys.len();
        let stored = &self.0[keys.start * d..keys.end * d];
        for j in (0..n).step_by(4) {
            // past the last key, repeat it and ignore the result
            let k: [&[[H; LANES]]; 4] = std::array::from_fn(|u| {
                let key = (j + u).min(n - 1);
                stored[key * d..(key + 1) * d].as_chunks().0
            });
            let used = (n - j).min(4);
            for r in 0..chunk.rows {
                let q: &[[f32; LANES]] = scratch.q[r * d..(r + 1) * d].as_chunks().0;
                let acc = dots.dot4_half(q, &k);
                let row = &mut scratch.s[r * chunk.stride + j..][..used];
                for (x, acc) in row.iter_mut().zip(&acc) {
                    *x = sum_lanes(acc);
                }
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
        buffer: &mut [f32],
    ) {
        let (keys, d_v, rows) = (&chunk.keys, chunk.width, chunk.rows);
        let block = TILE_BLOCKS * LANES;
        if rows >= 4 || !d_v.is_multiple_of(block) {
            let stored = self.rows(keys.start * d_v, keys.end * d_v, buffer);
            return accumulate::<f32, M, D>(dots, scratch, stored, d_v, rows, chunk.stride, alpha);
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

/// The query heads that share one key/value head, with everything they attend over.
pub(crate) struct Group<'g, 'p, A, R> {
    /// Each query head's rows, `(l, d)`.
    pub(crate) queries: &'g [ArrayView2<'p, A>],
    /// Each query head's masks.
    pub(crate) masks: &'g [Vec<Mask2<'p, A>>],
    /// The keys `(s, d)` in row-major order.
    pub(crate) keys: R,
    /// The values `(s, d_v)` in row-major order.
    pub(crate) values: R,
    /// Number of keys `s` (at least one) and value columns `d_v`.
    pub(crate) s: usize,
    pub(crate) d_v: usize,
    pub(crate) scale: A,
}

/// Per-batch working memory.
pub(crate) struct Scratch<'s, A> {
    /// Scaled queries, `rows × d`.
    q: &'s mut [A],
    /// Scores, then weights, of one chunk: `rows × chunk`.
    s: &'s mut [A],
    /// Running outputs and one chunk's products, `rows × d_v` each.
    o: &'s mut [A],
    acc: &'s mut [A],
    max: [A; ROWS],
    sum: [A; ROWS],
}

/// What one part of the keys contributes to every query row of a group: each
/// row's running maximum and sum and its output before division by the sum.
pub(crate) struct Partial<A> {
    /// `rows × d_v`, rows ordered head by head.
    o: Vec<A>,
    max: Vec<A>,
    sum: Vec<A>,
    /// Whether the row's scores were all free of NaN and `+∞` after masking.
    finite: Vec<bool>,
}

/// Attends every query row of `group` to the keys `part` (of those in each row's
/// reach).
#[inline(always)]
pub(crate) fn attend_part<A: KernelFloat, M: MulAdd, D: Dots<A> + HalfDots, R: Rows<A>>(
    dots: D,
    group: &Group<'_, '_, A, R>,
    part: Range<usize>,
) -> Partial<A> {
    let (l, d) = group.queries.first().map_or((0, 0), |q| q.dim());
    let d_v = group.d_v;
    let rows = group.queries.len() * l;
    let batch = rows.min(ROWS);
    let longest = if R::WIDENS { WIDEN_CHUNK } else { DIRECT_CHUNK };
    let chunk = group.s.next_multiple_of(LANES).min(longest);
    let mut memory = vec![A::zero(); batch * (d + chunk + 2 * d_v)];
    let (q, rest) = memory.split_at_mut(batch * d);
    let (s, rest) = rest.split_at_mut(batch * chunk);
    let (o, acc) = rest.split_at_mut(batch * d_v);
    let mut scratch = Scratch {
        q,
        s,
        o,
        acc,
        max: [A::neg_infinity(); ROWS],
        sum: [A::zero(); ROWS],
    };
    // widened chunks of keys and values (none when they are read where they lie)
    let widened = |width: usize| vec![A::zero(); if R::WIDENS { chunk * width } else { 0 }];
    let (mut key_rows, mut value_rows) = (widened(d), widened(d_v));
    let mut partial = Partial {
        o: Vec::with_capacity(rows * d_v),
        max: Vec::with_capacity(rows),
        sum: Vec::with_capacity(rows),
        finite: Vec::with_capacity(rows),
    };
    for first_row in (0..rows).step_by(ROWS) {
        // row r of the batch is query row `i` of head `h`
        let batch = rows.min(first_row + ROWS) - first_row;
        let members: [(usize, usize); ROWS] =
            std::array::from_fn(|r| ((first_row + r) / l, (first_row + r) % l));
        let members = &members[..batch];
        let buffers = (&mut key_rows[..], &mut value_rows[..]);
        let finite = attend_batch::<A, M, D, R>(
            dots,
            group,
            members,
            part.clone(),
            chunk,
            &mut scratch,
            buffers,
        );
        partial.o.extend_from_slice(&scratch.o[..batch * d_v]);
        partial.max.extend_from_slice(&scratch.max[..batch]);
        partial.sum.extend_from_slice(&scratch.sum[..batch]);
        partial.finite.extend(std::iter::repeat_n(finite, batch));
    }
    partial
}

/// Merges the parts of a group, in order, into `outs` (one `(l, d_v)` array per
/// query head) and returns the heads whose inputs need the reference path.
pub(crate) fn finish<A: KernelFloat>(
    parts: &[Partial<A>],
    outs: &mut [ArrayViewMut2<'_, A>],
) -> Vec<usize> {
    let mut bad = Vec::new();
    let Some(d_v) = outs.first().map(|o| o.ncols()) else {
        return bad;
    };
    let mut row = vec![A::zero(); d_v];
    let mut r = 0;
    for (h, out) in outs.iter_mut().enumerate() {
        for mut out in out.outer_iter_mut() {
            let max = parts
                .iter()
                .fold(A::neg_infinity(), |m, p| fold_max(m, p.max[r]));
            let shift = shift_of(max);
            let (mut total, mut finite) = (A::zero(), true);
            row.fill(A::zero());
            for p in parts {
                let weight = part_weight::<A, Separate>(p.max[r], shift);
                total += weight * p.sum[r];
                for (x, &o) in row.iter_mut().zip(&p.o[r * d_v..(r + 1) * d_v]) {
                    *x += weight * o;
                }
                finite &= p.finite[r];
            }
            let inverse = inverse_total(total);
            for (x, &o) in out.iter_mut().zip(&row) {
                *x = o * inverse;
                finite &= x.is_finite();
            }
            if !finite && bad.last() != Some(&h) {
                bad.push(h);
            }
            r += 1;
        }
    }
    bad
}

/// One batch of query rows over the keys of `part` in their reach; `false` when a
/// score was NaN or `+∞` after masking.
#[inline(always)]
fn attend_batch<A: KernelFloat, M: MulAdd, D: Dots<A> + HalfDots, R: Rows<A>>(
    dots: D,
    group: &Group<'_, '_, A, R>,
    members: &[(usize, usize)],
    part: Range<usize>,
    chunk: usize,
    scratch: &mut Scratch<A>,
    (key_rows, value_rows): (&mut [A], &mut [A]),
) -> bool {
    let (l, d) = group.queries[0].dim();
    let (s, d_v) = (group.s, group.d_v);
    let mut reach = s..0;
    for (r, &(h, i)) in members.iter().enumerate() {
        for (x, &y) in scratch.q[r * d..(r + 1) * d]
            .iter_mut()
            .zip(group.queries[h].row(i))
        {
            *x = y * group.scale;
        }
        let keys = keys_in_reach(&group.masks[h], i, l, s);
        reach = reach.start.min(keys.start)..reach.end.max(keys.end);
    }
    let reach = reach.start.max(part.start)..reach.end.min(part.end);
    scratch.o.fill(A::zero());
    scratch.max.fill(A::neg_infinity());
    scratch.sum.fill(A::zero());
    let mut finite = true;
    for j0 in (reach.start..reach.end).step_by(chunk) {
        let n = chunk.min(reach.end - j0);
        let at = |width| Chunk {
            keys: j0..j0 + n,
            width,
            rows: members.len(),
            stride: chunk,
        };
        group.keys.scores::<M, D>(dots, scratch, &at(d), key_rows);
        let mut alpha = [A::zero(); ROWS];
        for (r, &(h, i)) in members.iter().enumerate() {
            let row = &mut scratch.s[r * chunk..(r + 1) * chunk];
            apply_row(&group.masks[h], i, l, s, j0, &mut row[..n]);
            row[n..].fill(A::neg_infinity());
            // NaN or +∞ after masking: inputs the fused arithmetic cannot stand for
            finite &= row.iter().all(|&x| x < A::infinity());
            alpha[r] = softmax_update::<A, M, LANES>(row, &mut scratch.max[r], &mut scratch.sum[r]);
        }
        group
            .values
            .accumulate::<M, D>(dots, scratch, &at(d_v), &alpha, value_rows);
    }
    finite
}

/// Scores of `rows` scaled queries against `keys` (row-major, `d` wide) into the
/// rows of `s` (`chunk` apart), four keys at a time.
#[inline(always)]
fn scores<A: KernelFloat, M: MulAdd, D: Dots<A>>(
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
        let k: [&[A]; 4] = std::array::from_fn(|u| {
            let key = (j + u).min(n - 1);
            &keys[key * d..(key + 1) * d]
        });
        let used = (n - j).min(4);
        for r in 0..rows {
            let sums = dot4::<A, M, D>(dots, &q[r * d..(r + 1) * d], &k);
            s[r * chunk + j..r * chunk + j + used].copy_from_slice(&sums[..used]);
        }
    }
}

/// `q · k[u]` for four keys.
#[inline(always)]
fn dot4<A: KernelFloat, M: MulAdd, D: Dots<A>>(dots: D, q: &[A], k: &[&[A]; 4]) -> [A; 4] {
    let (q_lanes, q_rest) = q.as_chunks::<LANES>();
    let k_lanes: [&[[A; LANES]]; 4] =
        std::array::from_fn(|u| &k[u].as_chunks::<LANES>().0[..q_lanes.len()]);
    let acc = dots.dot4(q_lanes, &k_lanes);
    let tail = q_lanes.len() * LANES;
    std::array::from_fn(|u| {
        q_rest
            .iter()
            .zip(&k[u][tail..])
            .fold(sum_lanes(&acc[u]), |t, (&x, &y)| M::mul_add(x, y, t))
    })
}

/// The register-blocked sums of the direct path; implemented in [`super::arch`]
/// by a value that proves its instructions run.
pub(crate) trait Dots<A>: Copy {
    /// `Σₚ q[p] ⊙ k[u][p]` lane by lane, for each of the four keys `u` (the lanes
    /// are summed afterwards); every `k[u]` is as long as `q`.
    fn dot4(self, q: &[[A; LANES]], k: &[&[[A; LANES]]; 4]) -> [[A; LANES]; 4];

    /// `Σⱼ p[u][j] · values[j][c0 .. c0 + LANES]` for four rows of weights `p[u]`
    /// over the keys `j` (`values` holds them row-major, `d_v` wide; every `p[u]`
    /// has one weight per key).
    fn value_rows(self, p: &[&[A]; 4], values: &[A], d_v: usize, c0: usize) -> [[A; LANES]; 4];
}

/// The sum of the lanes, pairwise.
#[inline(always)]
fn sum_lanes<A: KernelFloat>(x: &[A; LANES]) -> A {
    let half: [A; 4] = std::array::from_fn(|c| x[c] + x[c + 4]);
    (half[0] + half[2]) + (half[1] + half[3])
}

/// Column blocks of [`LANES`] summed together in registers for a single row.
pub(crate) const TILE_BLOCKS: usize = 8;

/// `O = α·O + P·V` for one chunk: the chunk's product is summed on its own before
/// it is added to the rescaled total (blocked summation, as in the tiled kernel).
#[inline(always)]
fn accumulate<A: KernelFloat, M: MulAdd, D: Dots<A>>(
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
        let p: [&[A]; 4] = std::array::from_fn(|u| &scratch.s[(r0 + u) * chunk..][..n]);
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
fn fold_in<A: KernelFloat, M: MulAdd>(
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
