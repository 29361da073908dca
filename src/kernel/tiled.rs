//! The fused, tiled kernel: for a block of `BR` queries, stream the keys in blocks
//! of `BC`, computing `S = Q·Kᵀ` with a register-blocked micro-kernel, updating a
//! running maximum and sum per row (online softmax) and accumulating `P·V`, so the
//! `L × S` scores never exist in memory.
//!
//! Everything here is safe Rust written for the autovectoriser: fixed-size arrays
//! as register tiles, `as_chunks` views instead of indexing. The entry points are
//! generic over the element, the tile width `NR` and how `a·b + c` is computed;
//! [`super::dispatch`] compiles them once with AVX2+FMA enabled and once portably.

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use super::float::MulAdd;
use crate::mask::{apply_row, keys_in_reach, Mask2};
use crate::Element;

/// Rows of a register tile (queries in `S = Q·Kᵀ`, output rows in `O += P·V`).
pub(crate) const MR: usize = 6;
/// Query rows per block: a multiple of `MR`.
pub(crate) const BR: usize = 48;
/// Keys per block: a multiple of every `NR`.
pub(crate) const BC: usize = 256;

/// Keys packed for the micro-kernel: panels of `NR` keys, each stored `d × NR`
/// (the `p`-th components of `NR` consecutive keys side by side), zero-padded to a
/// multiple of `BC` keys.
#[derive(Debug)]
pub(crate) struct PackedKeys<A> {
    data: Vec<A>,
    d: usize,
}

/// Values packed for the micro-kernel: for each group of `NR` value columns, all
/// keys' `NR` values in key order, zero-padded to a multiple of `BC` keys.
#[derive(Debug)]
pub(crate) struct PackedValues<A> {
    data: Vec<A>,
    s_pad: usize,
    col_tiles: usize,
}

/// What is known of one head's keys and values while packing them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent<A> {
    /// Every entry is finite.
    pub(crate) finite: bool,
    /// The largest absolute entry.
    pub(crate) max_abs: A,
    /// The number of rows.
    pub(crate) rows: usize,
}

fn padded(n: usize, multiple: usize) -> usize {
    n.div_ceil(multiple) * multiple
}

/// Whether `x` is finite, its largest absolute entry, and its number of rows.
pub(crate) fn extent_of<A: Element>(x: &ArrayView2<'_, A>) -> Extent<A> {
    // `0·x` is 0 for finite x and NaN otherwise: summing it finds any
    // non-finite entry with plain, vectorisable arithmetic
    let mut lanes = [A::zero(); 8];
    let mut poison = [A::zero(); 8];
    let mut scan = |values: &[A]| {
        let (chunks, rest) = values.as_chunks::<8>();
        for chunk in chunks {
            for ((m, p), &v) in lanes.iter_mut().zip(poison.iter_mut()).zip(chunk) {
                *p += v * A::zero();
                *m = if v.abs() > *m { v.abs() } else { *m };
            }
        }
        for &v in rest {
            poison[0] += v * A::zero();
            lanes[0] = if v.abs() > lanes[0] {
                v.abs()
            } else {
                lanes[0]
            };
        }
    };
    match x.as_slice() {
        Some(all) => scan(all),
        None => x.rows().into_iter().for_each(|row| match row.as_slice() {
            Some(row) => scan(row),
            None => scan(&row.to_vec()),
        }),
    }
    let max_abs = lanes
        .iter()
        .fold(A::zero(), |m, &a| if a > m { a } else { m });
    Extent {
        finite: poison.iter().all(|&p| p == A::zero()) && max_abs.is_finite(),
        max_abs,
        rows: x.nrows(),
    }
}

impl<A: Element> PackedKeys<A> {
    /// Packs `k: (S, d)` in panels of `nr` keys.
    pub(crate) fn pack(k: &ArrayView2<'_, A>, nr: usize) -> (Self, Extent<A>) {
        let (s, d) = k.dim();
        let s_pad = padded(s, BC);
        let mut data = vec![A::zero(); s_pad * d];
        for (j, key) in k.outer_iter().enumerate() {
            let (panel, lane) = (j / nr, j % nr);
            let base = panel * d * nr + lane;
            for (p, &x) in key.iter().enumerate() {
                data[base + p * nr] = x;
            }
        }
        (PackedKeys { data, d }, extent_of(k))
    }
}

impl<A: Element> PackedValues<A> {
    /// Packs `v: (S, d_v)` in column groups of `nr`.
    pub(crate) fn pack(v: &ArrayView2<'_, A>, nr: usize) -> (Self, Extent<A>) {
        let (s, dv) = v.dim();
        let s_pad = padded(s, BC);
        let col_tiles = dv.div_ceil(nr);
        let mut data = vec![A::zero(); col_tiles * s_pad * nr];
        for (j, value) in v.outer_iter().enumerate() {
            for (ct, columns) in value.axis_chunks_iter(Axis(0), nr).enumerate() {
                let start = (ct * s_pad + j) * nr;
                for (slot, &x) in data[start..start + columns.len()].iter_mut().zip(columns) {
                    *slot = x;
                }
            }
        }
        (
            PackedValues {
                data,
                s_pad,
                col_tiles,
            },
            extent_of(v),
        )
    }
}

/// One block of query rows of one head, with everything it attends over.
pub struct Block<'a, A> {
    /// The block's query rows, `(rows ≤ BR, d)`.
    pub(crate) q: ArrayView2<'a, A>,
    /// Index of the block's first row among the head's `l` queries.
    pub(crate) first_row: usize,
    /// Number of queries `L` of the head.
    pub(crate) l: usize,
    /// Number of keys `S`.
    pub(crate) s: usize,
    pub(crate) keys: &'a PackedKeys<A>,
    pub(crate) values: &'a PackedValues<A>,
    pub(crate) masks: &'a [Mask2<'a, A>],
    pub(crate) scale: A,
}

/// Per-thread working memory of the kernel, sized for one block.
pub struct Scratch<A> {
    q: Vec<A>,
    s: Vec<A>,
    o: Vec<A>,
    max: Vec<A>,
    sum: Vec<A>,
    alpha: Vec<A>,
}

impl<A: Element> Scratch<A> {
    pub(crate) fn new(d: usize, col_tiles: usize, nr: usize) -> Self {
        Scratch {
            q: vec![A::zero(); BR * d],
            s: vec![A::zero(); BR * BC],
            o: vec![A::zero(); BR * col_tiles * nr],
            max: vec![A::zero(); BR],
            sum: vec![A::zero(); BR],
            alpha: vec![A::zero(); BR],
        }
    }
}

/// The running-maximum update of the online softmax for one row.
///
/// Given the row's maximum so far and the maximum of a new block of scores,
/// returns the new maximum, the shift to subtract from the block's scores before
/// `exp`, and the factor `α = exp(m_old − shift)` that rescales what was summed
/// so far. While the row has seen only `−∞` the shift is 0, so `−∞ − (−∞)` never
/// reaches `exp`.
#[inline(always)]
pub(crate) fn rescale<A: Element, M: MulAdd>(m_old: A, m_block: A) -> (A, A, A) {
    let m_new = if m_block > m_old { m_block } else { m_old };
    let shift = if m_new == A::neg_infinity() {
        A::zero()
    } else {
        m_new
    };
    (m_new, shift, A::exp_nonpositive::<M>(m_old - shift))
}

/// Computes one block of output rows into `out: (rows, d_v)`.
#[inline(always)]
pub(crate) fn attend_block<A: Element, M: MulAdd, T: Tiles<A, NR>, const NR: usize>(
    block: &Block<'_, A>,
    scratch: &mut Scratch<A>,
    mut out: ArrayViewMut2<'_, A>,
) {
    let rows = block.q.nrows();
    let tiles = rows.div_ceil(MR);
    pack_queries::<A, NR>(block, &mut scratch.q);
    scratch.o.fill(A::zero());
    scratch.max.fill(A::neg_infinity());
    scratch.sum.fill(A::zero());

    let key_end = keys_needed(block);
    for j0 in (first_key_needed(block)..key_end).step_by(BC) {
        // the last block may be short: work on whole panels of its keys only
        let keys = (key_end - j0).min(BC);
        let width = keys.div_ceil(NR) * NR;
        scores::<A, T, NR>(&scratch.q, block.keys, j0, width, tiles, &mut scratch.s);
        mask_scores(block, j0, keys, width, &mut scratch.s);
        for i in 0..tiles * MR {
            let row = &mut scratch.s[i * BC..i * BC + width];
            scratch.alpha[i] =
                softmax_update::<A, M, NR>(row, &mut scratch.max[i], &mut scratch.sum[i]);
        }
        let p = Weights {
            p: &scratch.s,
            alpha: &scratch.alpha,
            keys,
            tiles,
        };
        accumulate::<A, M, T, NR>(&p, block.values, j0, &mut scratch.o);
    }

    let o_tiles = scratch.o.as_chunks::<NR>().0;
    for (i, mut row) in out.axis_iter_mut(Axis(0)).enumerate() {
        let total = scratch.sum[i];
        let inverse = if total > A::zero() {
            A::one() / total
        } else {
            A::zero()
        };
        for (ct, columns) in row.axis_chunks_iter_mut(Axis(0), NR).enumerate() {
            for (x, &o) in columns.into_iter().zip(&o_tiles[ct * BR + i]) {
                *x = o * inverse;
            }
        }
    }
}

/// How many keys (the first ones) any row of the block may attend to.
fn keys_needed<A>(block: &Block<'_, A>) -> usize {
    let last_row = block.first_row + block.q.nrows() - 1;
    keys_in_reach(block.masks, last_row, block.l, block.s).end
}

/// The first key any row of the block may attend to, rounded down to a key block.
fn first_key_needed<A>(block: &Block<'_, A>) -> usize {
    keys_in_reach(block.masks, block.first_row, block.l, block.s).start / BC * BC
}

/// Packs the block's queries, times the scale, as `tiles × d × MR`.
fn pack_queries<A: Element, const NR: usize>(block: &Block<'_, A>, q: &mut [A]) {
    let d = block.keys.d;
    q.fill(A::zero());
    for (i, row) in block.q.outer_iter().enumerate() {
        let base = (i / MR) * d * MR + i % MR;
        for (p, &x) in row.iter().enumerate() {
            q[base + p * MR] = x * block.scale;
        }
    }
}

/// `S = Q·Kᵀ` for keys `j0 .. j0 + width`, into the rows of `s: (tiles·MR) × BC`.
#[inline(always)]
fn scores<A: Element, T: Tiles<A, NR>, const NR: usize>(
    q: &[A],
    keys: &PackedKeys<A>,
    j0: usize,
    width: usize,
    tiles: usize,
    s: &mut [A],
) {
    let d = keys.d;
    let q_rows = q.as_chunks::<MR>().0;
    let k_rows = keys.data.as_chunks::<NR>().0;
    let s_rows = s.as_chunks_mut::<BC>().0;
    for panel in 0..width / NR {
        let first = (j0 / NR + panel) * d;
        let k_panel = &k_rows[first..first + d];
        for t in 0..tiles {
            let tile = T::score_tile(&q_rows[t * d..(t + 1) * d], k_panel);
            for (i, tile_row) in tile.iter().enumerate() {
                s_rows[t * MR + i][panel * NR..(panel + 1) * NR].copy_from_slice(tile_row);
            }
        }
    }
}

/// Applies padding, bias, keep and causal masks to the scores of keys `j0 ..`.
fn mask_scores<A: Element>(
    block: &Block<'_, A>,
    j0: usize,
    keys: usize,
    width: usize,
    s: &mut [A],
) {
    let s_rows = s.as_chunks_mut::<BC>().0;
    let valid = block.s.saturating_sub(j0).min(keys);
    for (i, row) in s_rows.iter_mut().enumerate() {
        row[valid..width].fill(A::neg_infinity());
        if i < block.q.nrows() {
            apply_row(
                block.masks,
                block.first_row + i,
                block.l,
                block.s,
                j0,
                &mut row[..valid],
            );
        }
    }
}

/// Turns one row of scores into `exp(s − shift)` and updates the row's running
/// maximum and sum; returns the factor that rescales the row's output so far.
#[inline(always)]
pub(crate) fn softmax_update<A: Element, M: MulAdd, const NR: usize>(
    row: &mut [A],
    max: &mut A,
    sum: &mut A,
) -> A {
    let chunks = row.as_chunks_mut::<NR>().0;
    let mut lane_max = [A::neg_infinity(); NR];
    for chunk in chunks.iter() {
        for c in 0..NR {
            lane_max[c] = if chunk[c] > lane_max[c] {
                chunk[c]
            } else {
                lane_max[c]
            };
        }
    }
    let block_max = lane_max
        .iter()
        .fold(A::neg_infinity(), |m, &x| if x > m { x } else { m });
    let (m_new, shift, alpha) = rescale::<A, M>(*max, block_max);
    let mut lane_sum = [A::zero(); NR];
    for chunk in chunks.iter_mut() {
        for c in 0..NR {
            let p = A::exp_nonpositive::<M>(chunk[c] - shift);
            chunk[c] = p;
            lane_sum[c] += p;
        }
    }
    *max = m_new;
    *sum = *sum * alpha + lane_sum.iter().fold(A::zero(), |a, &b| a + b);
    alpha
}

/// One block's weights `P = exp(S − shift)`, row by row, and the factors `α` that
/// rescale each row's output so far.
struct Weights<'a, A> {
    /// `(tiles·MR) × BC`, of which the first `keys` columns are in use.
    p: &'a [A],
    alpha: &'a [A],
    keys: usize,
    tiles: usize,
}

/// `O = α·O + P·V` for keys `j0 .. j0 + keys`.
#[inline(always)]
fn accumulate<A: Element, M: MulAdd, T: Tiles<A, NR>, const NR: usize>(
    weights: &Weights<'_, A>,
    values: &PackedValues<A>,
    j0: usize,
    o: &mut [A],
) {
    let Weights {
        p,
        alpha,
        keys,
        tiles,
    } = *weights;
    let p_rows = p.as_chunks::<BC>().0;
    let v_rows = values.data.as_chunks::<NR>().0;
    // O is stored column tile by column tile: `(col_tiles × BR) × NR`
    let o_tiles = o.as_chunks_mut::<NR>().0;
    let col_tiles = values.col_tiles;
    for ct in 0..col_tiles {
        let first = ct * values.s_pad + j0;
        let v_block: &[[A; NR]; BC] = v_rows[first..first + BC]
            .try_into()
            .expect("a packed value block holds BC keys");
        for t in 0..tiles {
            let rows: [&[A; BC]; MR] = std::array::from_fn(|i| &p_rows[t * MR + i]);
            let first = ct * BR + t * MR;
            let o_tile: &mut [[A; NR]; MR] = (&mut o_tiles[first..first + MR])
                .try_into()
                .expect("an output tile holds MR rows");
            let alpha: &[A; MR] = alpha[t * MR..(t + 1) * MR]
                .try_into()
                .expect("MR factors per tile");
            T::value_tile(&rows, v_block, keys, alpha, o_tile);
        }
    }
}

/// The two register-blocked micro-kernels, `MR × NR` tiles kept in registers.
pub trait Tiles<A, const NR: usize> {
    /// A tile of `S = Q·Kᵀ`: `q` holds the `d` columns of `MR` queries, `k` the `d`
    /// components of `NR` keys.
    fn score_tile(q: &[[A; MR]], k: &[[A; NR]]) -> [[A; NR]; MR];
    /// `O = α·O + P·V` on one tile, over the first `keys` (at most `BC`) keys of a
    /// block: `p` holds `MR` rows of weights, `v` `BC` rows of `NR` values. The
    /// block's product is summed on its own before it is added to the rescaled
    /// total: blocked summation keeps long rows accurate.
    fn value_tile(
        p: &[&[A; BC]; MR],
        v: &[[A; NR]; BC],
        keys: usize,
        alpha: &[A; MR],
        o: &mut [[A; NR]; MR],
    );
}

/// The micro-kernels as plain loops over arrays, for the autovectoriser.
pub struct Portable<M>(std::marker::PhantomData<M>);

impl<A: Element, M: MulAdd, const NR: usize> Tiles<A, NR> for Portable<M> {
    #[inline(always)]
    fn score_tile(q: &[[A; MR]], k: &[[A; NR]]) -> [[A; NR]; MR] {
        let mut acc = [[A::zero(); NR]; MR];
        for (qp, kp) in q.iter().zip(k) {
            for i in 0..MR {
                for j in 0..NR {
                    acc[i][j] = M::mul_add(qp[i], kp[j], acc[i][j]);
                }
            }
        }
        acc
    }

    #[inline(always)]
    fn value_tile(
        p: &[&[A; BC]; MR],
        v: &[[A; NR]; BC],
        keys: usize,
        alpha: &[A; MR],
        o: &mut [[A; NR]; MR],
    ) {
        let mut acc = [[A::zero(); NR]; MR];
        for j in 0..keys.min(BC) {
            for i in 0..MR {
                let pij = p[i][j];
                for c in 0..NR {
                    acc[i][c] = M::mul_add(pij, v[j][c], acc[i][c]);
                }
            }
        }
        for i in 0..MR {
            for c in 0..NR {
                o[i][c] = M::mul_add(o[i][c], alpha[i], acc[i][c]);
            }
        }
    }
}
