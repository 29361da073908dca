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
//! its rows' maxima, sums and unscaled outputs, merged in order by [`Partials::finish`]
//! (split-key decoding): a single key/value head still uses every thread.
//!
//! Instead of scanning the inputs first, the path checks what it computed: a NaN
//! or `+∞` score after masking, or an output that is not finite, means the inputs
//! were not finite or overflowed, and the head is left to the reference path.
//!
//! Keys and values stored in half precision are read as they lie and widened to
//! `f32` as they are loaded ([`Rows`], in `rows.rs`), so a decoding step reads half
//! the bytes. The steps of one chunk (scores, value sums) are in `steps.rs`.

mod int8;
mod narrow;
mod pages;
mod parts;
mod rows;
mod steps;

use std::ops::Range;

use ndarray::ArrayView2;

pub(crate) use int8::{round_to_i8, scores_i8, values_i8};
pub(crate) use narrow::{Narrow, NarrowKind};
pub(crate) use pages::{Paged, Quantized, integer_fits};
pub(crate) use parts::{Memory, PartialMut, Partials};
use rows::grown;
pub(crate) use rows::{Native, Prefetch, Rows, Source, Widening};
pub(crate) use steps::{Dots, HalfDots, sum_lanes};

use super::float::{KernelFloat, MulAdd};
use super::online::{fold_step, rescale, row_max};
use super::params::{DIRECT_BATCH_ROWS as ROWS, LANES, SOFTMAX_LANES};
use crate::core::mask::Mask2;
use crate::core::scoring::Scoring;
use crate::flex::blocks::BlockClass;
use crate::flex::program::Program;
use steps::{Chunk, Scratch};

/// The query heads that share one key/value head, with everything they attend over.
pub(crate) struct Group<'g, 'p, A, R, P> {
    /// The call's program, the group's batch row and its first query head.
    pub(crate) program: &'g P,
    pub(crate) b: usize,
    pub(crate) first_head: usize,
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

impl<'g, A, R, P> Group<'g, '_, A, R, P> {
    /// The program of the group's query head `h` (counted from its first).
    fn scoring(&self, h: usize) -> Scoring<'g, P> {
        Scoring {
            program: self.program,
            b: self.b,
            h: self.first_head + h,
        }
    }
}

/// Attends every query row of `group` to the keys `part` (of those in each row's
/// reach), into `out`, with `memory` as working memory.
#[inline(always)]
pub(crate) fn attend_part<A, M, D, R, P>(
    dots: D,
    group: &Group<'_, '_, A, R, P>,
    part: Range<usize>,
    memory: &mut Memory<A>,
    out: PartialMut<'_, A>,
) where
    A: KernelFloat,
    M: MulAdd,
    D: Dots<A> + HalfDots,
    R: Rows<A>,
    P: Program<A>,
{
    let (l, d) = group.queries.first().map_or((0, 0), |q| q.dim());
    let d_v = group.d_v;
    let rows = group.queries.len() * l;
    let batch = rows.min(ROWS);
    let chunk = group.s.next_multiple_of(LANES).min(R::CHUNK);
    let floats = grown(&mut memory.floats, batch * (d + chunk + 2 * d_v));
    let (q, rest) = floats.split_at_mut(batch * d);
    let (s, rest) = rest.split_at_mut(batch * chunk);
    let (o, acc) = rest.split_at_mut(batch * d_v);
    // integer queries, weights and sums (an int8 cache's integer dot products)
    let (shorts, ints) = match R::INTEGER {
        true => (batch * d + chunk, batch * chunk + d_v),
        false => (0, 0),
    };
    let mut scratch = Scratch {
        q,
        s,
        o,
        acc,
        shorts: grown(&mut memory.shorts, shorts),
        ints: grown(&mut memory.ints, ints),
        q_scales: &mut None,
        max: [A::neg_infinity(); ROWS],
        sum: [A::zero(); ROWS],
    };
    for first_row in (0..rows).step_by(ROWS) {
        // row r of the batch is query row `i` of head `h`
        let batch = rows.min(first_row + ROWS) - first_row;
        let members: [(usize, usize); ROWS] =
            std::array::from_fn(|r| ((first_row + r) / l, (first_row + r) % l));
        let members = &members[..batch];
        let buffers = (&mut memory.key_rows, &mut memory.value_rows);
        let finite = attend_batch::<A, M, D, R, P>(
            dots,
            group,
            members,
            part.clone(),
            chunk,
            &mut scratch,
            buffers,
        );
        let batch_rows = first_row..first_row + batch;
        out.o[first_row * d_v..][..batch * d_v].copy_from_slice(&scratch.o[..batch * d_v]);
        out.max[batch_rows.clone()].copy_from_slice(&scratch.max[..batch]);
        out.sum[batch_rows.clone()].copy_from_slice(&scratch.sum[..batch]);
        out.finite[batch_rows].fill(finite);
    }
}

/// Whether every value of `row` is below `+∞` (not NaN either), in lanes
/// that vectorise: no early exit.
#[inline(always)]
fn below_infinity<A: KernelFloat>(row: &[A]) -> bool {
    // per lane 1 while every value was below +∞, else 0: a compare and a blend
    let mut ok = [A::one(); SOFTMAX_LANES];
    let (parts, rest) = row.as_chunks::<SOFTMAX_LANES>();
    for part in parts {
        for (ok, &x) in ok.iter_mut().zip(part) {
            *ok = if x < A::infinity() { *ok } else { A::zero() };
        }
    }
    ok.iter().all(|&ok| ok == A::one()) && rest.iter().all(|&x| x < A::infinity())
}

/// One batch of query rows over the keys of `part` in their reach; `false` when a
/// score was NaN or `+∞` after masking.
#[inline(always)]
fn attend_batch<A, M, D, R, P>(
    dots: D,
    group: &Group<'_, '_, A, R, P>,
    members: &[(usize, usize)],
    part: Range<usize>,
    chunk: usize,
    scratch: &mut Scratch<A>,
    (key_rows, value_rows): (&mut Vec<A>, &mut Vec<A>),
) -> bool
where
    A: KernelFloat,
    M: MulAdd,
    D: Dots<A> + HalfDots,
    R: Rows<A>,
    P: Program<A>,
{
    let (l, d) = group.queries[0].dim();
    let (s, d_v) = (group.s, group.d_v);
    // new queries: an int8 cache rounds them again, at the batch's first chunk
    *scratch.q_scales = None;
    let mut reach = s..0;
    for (r, &(h, i)) in members.iter().enumerate() {
        for (x, &y) in scratch.q[r * d..(r + 1) * d]
            .iter_mut()
            .zip(group.queries[h].row(i))
        {
            *x = y * group.scale;
        }
        let keys = group.scoring(h).reach(&group.masks[h], i..i + 1, l, s);
        if !keys.is_empty() {
            reach = reach.start.min(keys.start)..reach.end.max(keys.end);
        }
    }
    let reach = reach.start.max(part.start)..reach.end.min(part.end);
    scratch.o.fill(A::zero());
    scratch.max.fill(A::neg_infinity());
    scratch.sum.fill(A::zero());
    let mut finite = true;
    for j0 in (reach.start..reach.end).step_by(chunk) {
        let n = chunk.min(reach.end - j0);
        let classes: [BlockClass; ROWS] = std::array::from_fn(|r| match members.get(r) {
            Some(&(h, i)) => {
                group
                    .program
                    .class(group.b, group.first_head + h, i..i + 1, j0..j0 + n)
            }
            None => BlockClass::Empty,
        });
        if classes.iter().all(|&c| c == BlockClass::Empty) {
            continue; // no row keeps a key of the chunk
        }
        let at = |width| Chunk {
            keys: j0..j0 + n,
            width,
            rows: members.len(),
            stride: chunk,
        };
        group.keys.scores::<M, D>(dots, scratch, &at(d), key_rows);
        let mut alpha = [A::zero(); ROWS];
        let width = n.next_multiple_of(SOFTMAX_LANES).min(chunk);
        for (r, &(h, i)) in members.iter().enumerate() {
            // the chunk's scores to whole registers (the last chunk of a cache is
            // often short: the softmax over all of `chunk` cost a chunk's time)
            let row = &mut scratch.s[r * chunk..][..width];
            group
                .scoring(h)
                .prepare_row(&group.masks[h], i, l, s, j0, &mut row[..n], classes[r]);
            row[n..].fill(A::neg_infinity());
            // NaN or +∞ after masking: inputs the fused arithmetic cannot stand for
            finite &= below_infinity(row);
            // the online softmax's step with the token's own exp
            let step = rescale::<A, M>(scratch.max[r], row_max::<A, SOFTMAX_LANES>(row));
            let block_sum = dots.exp_and_sum::<M>(row, step.shift);
            alpha[r] = fold_step(step, block_sum, &mut scratch.max[r], &mut scratch.sum[r]);
        }
        group
            .values
            .accumulate::<M, D>(dots, scratch, &at(d_v), &alpha, value_rows);
    }
    finite
}
