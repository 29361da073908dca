//! The packers' transpositions with AVX-512: a 16 × 16 block of f32 in sixteen
//! registers, transposed by four rounds of shuffles, for the keys' panels
//! ([`PackPanel`](crate::kernel::pack::PackPanel)) and the queries' tiles
//! ([`Tiles::pack_query_tile`](crate::kernel::tiled::Tiles::pack_query_tile)),
//! where the scalar packers store each value on its own. The three packers are
//! functions of their own (`#[target_feature]`, not inlined into the token's
//! code): inlined, they made an f32 call at N = 128 1.8 % slower on Zen 4 (as
//! the AVX2 ones, `transpose8.rs`, made the backward slower on Zen 3).

use std::arch::x86_64::*;

use half::bf16;
use ndarray::{ArrayView1, ArrayView2};

use crate::kernel::pack::{Entry, Pair, scatter_key_pairs, scatter_lines};
use crate::kernel::params::MR;
use crate::kernel::tiled::scatter_queries;

/// [`PackPanel::pack_panel`](crate::kernel::pack::PackPanel::pack_panel) for f32
/// panels of 32 lines: sixteen lines by sixteen steps at a time, transposed in
/// registers (64 shuffles for 256 values, where the scalar scatter stores each
/// one); the lines and steps past the last whole sixteen by the scatter.
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_panel_f32(
    src: &[f32],
    stride: usize,
    lines: usize,
    out: &mut [[f32; 32]],
) {
    let depth = out.len();
    let whole_steps = depth / 16 * 16;
    let whole_lines = lines / 16 * 16;
    for first in (0..whole_lines).step_by(16) {
        for p0 in (0..whole_steps).step_by(16) {
            // SAFETY: the caller upholds this function's contract (AVX-512 F).
            unsafe { transpose_block(src, (stride, p0), (p0, first), out) };
        }
        // this group's steps past the last whole sixteen
        scatter_lines(src, stride, first..first + 16, whole_steps, out);
    }
    // the lines past the last whole sixteen
    scatter_lines(src, stride, whole_lines..lines, 0, out);
}

/// [`KeyTiles::pack_pair_panel`](crate::kernel::tiled::KeyTiles::pack_pair_panel):
/// keys stored in bf16 as pairs `K`, panels of `W` (16 or 32) keys, key `i` at
/// `keys[i·d ..][.. d]`. A pair is the 32 bits of two components as they lie
/// (the first in the low half), so sixteen keys by sixteen pairs at a time are
/// loaded and transposed in registers as [`pack_panel_f32`] does f32; the keys
/// and pairs past the last whole sixteen (and the last component of an odd
/// `d`, paired with zero) one at a time. (Its own function: one generic over
/// both kinds of lines compiled the f32 loops worse, the packing of f32 keys
/// and values a fifth slower at N = 128 on Zen 5.)
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_pair_panel<K: Pair, const W: usize>(
    keys: &[bf16],
    d: usize,
    lines: usize,
    out: &mut [[K; W]],
) {
    const { assert!(W.is_multiple_of(16), "whole groups of sixteen keys") };
    let whole_steps = out.len().min(d / 2) / 16 * 16;
    let whole_lines = lines / 16 * 16;
    for first in (0..whole_lines).step_by(16) {
        for p0 in (0..whole_steps).step_by(16) {
            // SAFETY: the caller upholds this function's contract (AVX-512 F).
            unsafe { transpose_block(keys, (d, 2 * p0), (p0, first), out) };
        }
        // this group's pairs past the last whole sixteen
        if whole_steps < out.len() {
            for i in first..first + 16 {
                scatter_key_pairs(&keys[i * d..][..d], (i, whole_steps), out);
            }
        }
    }
    // the keys past the last whole sixteen
    for i in whole_lines..lines {
        scatter_key_pairs(&keys[i * d..][..d], (i, 0), out);
    }
}

/// One block of sixteen lines by sixteen steps: the 64 bytes from
/// `src[(first + i)·stride + at ..]` for each line `i` (sixteen 32-bit
/// entries: f32, or pairs of bf16), transposed in registers into lanes
/// `first .. first + 16` of steps `p0 .. p0 + 16` of `out`.
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn transpose_block<T, E, const W: usize>(
    src: &[T],
    (stride, at): (usize, usize),
    (p0, first): (usize, usize),
    out: &mut [[E; W]],
) {
    const { assert!(size_of::<E>() == 4, "an entry is one lane") };
    let per_line = 64 / size_of::<T>();
    // the bounds checked once for the block (a check at every load and store
    // spilled the addresses to the stack)
    let lines = &src[first * stride + at..][..15 * stride + per_line];
    let steps = &mut out[p0..p0 + 16];
    assert!(first + 16 <= W, "sixteen lanes from `first`");
    // SAFETY: the caller upholds the contract; load `i` reads the 64 bytes
    // at `lines[i·stride ..]`, inside `lines` (checked above), store `j`
    // writes lanes `first .. first + 16` of `steps[j]` (checked above).
    unsafe {
        let mut rows = [_mm512_setzero_ps(); 16];
        for (i, row) in rows.iter_mut().enumerate() {
            *row = _mm512_loadu_ps(lines.as_ptr().add(i * stride).cast());
        }
        let at = steps.as_mut_ptr().cast::<E>().add(first);
        for (j, column) in transpose16(rows).into_iter().enumerate() {
            _mm512_storeu_ps(at.add(j * W).cast(), column);
        }
    }
}

/// An entry of a query tile that [`pack_query_tile`] writes sixteen steps of a
/// row at a time, as one register of sixteen 32-bit lanes: an f32 component
/// times the scale, or a pair of bf16 components as they are stored.
pub(super) trait QueryStep: Entry<f32> {
    /// A row's components in one step.
    const COMPONENTS: usize;

    /// Steps `0 .. 16` of the row from `at` (its `16 · COMPONENTS` stored
    /// components, 64 bytes), one a lane; `scale` is the call's in every lane.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512 F; the 64 bytes from `at` are readable.
    unsafe fn load16(at: *const Self::Query, scale: __m512) -> __m512;
}

impl QueryStep for f32 {
    const COMPONENTS: usize = 1;

    #[inline(always)]
    unsafe fn load16(at: *const f32, scale: __m512) -> __m512 {
        // SAFETY: the caller upholds the contract.
        unsafe { _mm512_mul_ps(_mm512_loadu_ps(at), scale) }
    }
}

/// [`Tiles::pack_query_tile`](crate::kernel::tiled::Tiles::pack_query_tile)
/// for entries of 32 bits: a tile of contiguous rows sixteen steps at a time,
/// its rows (by [`QueryStep::load16`]) and zeros for the rows past a short
/// tile transposed in registers, each step stored under a mask of `MR`
/// lanes; the steps past the last whole sixteen one entry at a time
/// ([`Entry::pack_query`]), and rows that are not contiguous by the scatter.
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_query_tile<K: QueryStep>(
    rows: ArrayView2<'_, K::Query>,
    scale: f32,
    out: &mut [[K; MR]],
) {
    const {
        assert!(MR <= 16, "a tile's rows fit one transposition");
        assert!(size_of::<K>() == 4, "an entry is one lane");
        assert!(
            16 * K::COMPONENTS * size_of::<K::Query>() == 64,
            "a step is a register"
        );
    }
    let mut lines: [&[K::Query]; MR] = [&[]; MR];
    for (line, row) in lines.iter_mut().zip(rows.outer_iter()) {
        match row.to_slice() {
            Some(row) => *line = row,
            None => return scatter_queries(rows, scale, out),
        }
    }
    let (n, depth) = (rows.nrows(), out.len());
    let whole_steps = depth.min(rows.ncols() / K::COMPONENTS) / 16 * 16;
    if n < MR {
        out[whole_steps..].fill([K::zero(); MR]);
    }
    let tile_rows: __mmask16 = (1 << MR) - 1;
    let width = 16 * K::COMPONENTS;
    // SAFETY: the caller upholds this function's contract; each load reads the
    // `width` components (64 bytes) of a line's first `whole_steps ·
    // COMPONENTS`, each store writes the `MR` entries (32 bits each) of one
    // step.
    unsafe {
        let scale16 = _mm512_set1_ps(scale);
        for p0 in (0..whole_steps).step_by(16) {
            // the tile's rows, zero past a short tile's
            let mut regs = [_mm512_setzero_ps(); 16];
            for (i, (reg, line)) in regs.iter_mut().zip(&lines).enumerate() {
                if i < n {
                    *reg = K::load16(line[p0 * K::COMPONENTS..][..width].as_ptr(), scale16);
                }
            }
            for (j, column) in transpose16(regs).into_iter().enumerate() {
                _mm512_mask_storeu_ps(out[p0 + j].as_mut_ptr().cast(), tile_rows, column);
            }
        }
    }
    // from the lines' slices: `slice_move` on each row is a call out of line,
    // which cost a bf16 call at N = 128 a tenth of its time
    if whole_steps < depth {
        for (i, line) in lines[..n].iter().enumerate() {
            let rest = ArrayView1::from(&line[whole_steps * K::COMPONENTS..]);
            K::pack_query(rest, scale, |p, x| out[whole_steps + p][i] = x);
        }
    }
}

/// The transpose of the 16 × 16 matrix whose rows are `rows`: four rounds of
/// sixteen shuffles (pairs of f32, pairs of f64, then 128-bit lanes twice).
///
/// # Safety
///
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn transpose16(rows: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        // t[2g], t[2g + 1]: rows 2g and 2g + 1 interleaved (low, high pairs of
        // each 128-bit lane)
        let mut t = [_mm512_setzero_ps(); 16];
        for g in 0..8 {
            t[2 * g] = _mm512_unpacklo_ps(rows[2 * g], rows[2 * g + 1]);
            t[2 * g + 1] = _mm512_unpackhi_ps(rows[2 * g], rows[2 * g + 1]);
        }
        // u[4q + c], lane L: column 4L + c of rows 4q .. 4q + 4
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let pd = |x: __m512| _mm512_castps_pd(x);
            let ps = |x: __m512d| _mm512_castpd_ps(x);
            let (a, b, c, d) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
            u[4 * q] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
            u[4 * q + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
            u[4 * q + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
            u[4 * q + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        }
        // column 4L + c: lane q of it is lane L of u[4q + c]
        let mut columns = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            // lanes 0, 1 (low) or 2, 3 (high) of the first two, then the last two
            let low01 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
            let high01 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
            let low23 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
            let high23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
            columns[c] = _mm512_shuffle_f32x4::<0x88>(low01, low23);
            columns[4 + c] = _mm512_shuffle_f32x4::<0xDD>(low01, low23);
            columns[8 + c] = _mm512_shuffle_f32x4::<0x88>(high01, high23);
            columns[12 + c] = _mm512_shuffle_f32x4::<0xDD>(high01, high23);
        }
        columns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::pack::{Bf16Pair, scatter_pairs, scatter_panel};

    #[test]
    fn the_transposed_panel_is_the_scattered_one() {
        if !is_x86_feature_detected!("avx512f") {
            return; // nothing to compare on this CPU
        }
        // whole and partial groups of sixteen lines and steps, lines wider
        // than the depth read
        for (lines, depth, stride) in [
            (32, 64, 64),
            (32, 16, 20),
            (17, 33, 40),
            (16, 70, 70),
            (31, 5, 5),
            (1, 1, 3),
        ] {
            let src: Vec<f32> = (0..lines * stride)
                .map(|x| x as f32 * 0.5 - 100.0)
                .collect();
            // guard values in the lanes past the lines: neither writes them
            let mut fast = vec![[-7.0; 32]; depth];
            let mut scalar = fast.clone();
            // SAFETY: the CPU has AVX-512 F (checked above)
            unsafe { pack_panel_f32(&src, stride, lines, &mut fast) };
            scatter_panel(&src, stride, lines, &mut scalar);
            assert_eq!(
                fast, scalar,
                "{lines} lines, depth {depth}, stride {stride}"
            );
            for (p, step) in fast.iter().enumerate() {
                assert_eq!(step[0], src[p], "step {p}");
                assert!(step[lines..].iter().all(|&x| x == -7.0), "past the lines");
            }
        }
    }

    /// Keys stored in bf16 packed as pairs: whole and partial groups of
    /// sixteen keys and of sixteen pairs, odd widths (the last component paired
    /// with zero), panels of 16 and 32; lanes past the keys untouched.
    #[test]
    fn the_transposed_pair_panel_is_the_scattered_one() {
        if !is_x86_feature_detected!("avx512f") {
            return; // nothing to compare on this CPU
        }
        fn check<const W: usize>(lines: usize, d: usize) {
            let keys: Vec<bf16> = (0..lines * d)
                .map(|x| bf16::from_f32(x as f32 * 0.75 - 300.0))
                .collect();
            let depth = d.div_ceil(2);
            let guard = Bf16Pair(0xdead_beef);
            let mut fast = vec![[guard; W]; depth];
            let mut scalar = fast.clone();
            // SAFETY: the CPU has AVX-512 F (checked above)
            unsafe { pack_pair_panel(&keys, d, lines, &mut fast) };
            scatter_pairs(&keys, d, lines, &mut scalar);
            assert_eq!(fast, scalar, "{lines} keys of {d}, panel {W}");
            let last = Bf16Pair::new(keys[(lines - 1) * d], keys[(lines - 1) * d + 1]);
            assert_eq!(fast[0][lines - 1], last, "{lines} keys of {d}");
            assert!(
                fast.iter()
                    .all(|step| step[lines..].iter().all(|&p| p == guard))
            );
        }
        for (lines, d) in [(32, 64), (32, 65), (17, 96), (31, 30), (5, 64), (16, 34)] {
            check::<32>(lines, d);
        }
        for (lines, d) in [(16, 64), (16, 33), (9, 128)] {
            check::<16>(lines, d);
        }
    }

    #[test]
    fn the_transposed_query_tile_is_the_scattered_one() {
        if !is_x86_feature_detected!("avx512f") {
            return; // nothing to compare on this CPU
        }
        // a whole tile (transposed) with and without steps past sixteen, a short
        // tile and rows that are not contiguous (scattered); lanes past the
        // rows zero
        for (rows, depth, strided) in [
            (MR, 64, false),
            (MR, 70, false),
            (MR, 7, false),
            (5, 64, false),
            (MR, 64, true),
        ] {
            let x = ndarray::Array2::from_shape_fn((rows, 2 * depth), |(i, p)| {
                (i * 1000 + p) as f32 * 0.25 - 7.0
            });
            let view = if strided {
                x.slice(ndarray::s![.., ..;2])
            } else {
                x.slice(ndarray::s![.., ..depth])
            };
            let mut fast = vec![[f32::NAN; MR]; depth];
            let mut scalar = vec![[-1.0; MR]; depth];
            // SAFETY: the CPU has AVX-512 F (checked above)
            unsafe { pack_query_tile(view, 0.125, &mut fast) };
            scatter_queries(view, 0.125, &mut scalar);
            assert_eq!(
                fast, scalar,
                "{rows} rows, depth {depth}, strided {strided}"
            );
            for (p, step) in fast.iter().enumerate() {
                assert_eq!(step[rows - 1], view[(rows - 1, p)] * 0.125, "step {p}");
                assert!(step[rows..].iter().all(|&x| x == 0.0), "past the rows");
            }
        }
    }
}
