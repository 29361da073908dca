//! The packers' transpositions with AVX2: an 8 × 8 block of f32 in eight
//! registers, transposed by three rounds of shuffles, for the keys' panels
//! ([`PackPanel`](crate::kernel::pack::PackPanel)) and the queries' tiles
//! ([`Tiles::pack_query_tile`](crate::kernel::tiled::Tiles::pack_query_tile)),
//! where the scalar packers store each value on its own (their scatter was a
//! seventh of an f32 call's time at N = 128 on Zen 3). AVX-512's sixteen-wide
//! ones are in `transpose.rs`.

use std::arch::x86_64::*;

use ndarray::{ArrayView1, ArrayView2};

use crate::kernel::pack::{Entry, scatter_lines};
use crate::kernel::params::MR;
use crate::kernel::tiled::scatter_queries;

/// [`PackPanel::pack_panel`](crate::kernel::pack::PackPanel::pack_panel) for f32
/// panels of `W` lines: eight lines by eight steps at a time, transposed in
/// registers (24 shuffles for 64 values, where the scalar scatter stores each
/// one); the lines and steps past the last whole eight by the scatter.
///
/// Out of line, compiled for AVX2 on its own: inlined into the kernels'
/// trampoline it made the backward's micro-kernels compile worse (the
/// products' left operands went through the stack: the f32 backward 8 %
/// slower on Zen 3); a call per panel costs nothing measurable.
///
/// # Safety
///
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_panel_f32<const W: usize>(
    src: &[f32],
    stride: usize,
    lines: usize,
    out: &mut [[f32; W]],
) {
    let depth = out.len();
    let whole_steps = depth / 8 * 8;
    let whole_lines = lines / 8 * 8;
    for first in (0..whole_lines).step_by(8) {
        for p0 in (0..whole_steps).step_by(8) {
            // SAFETY: the caller upholds this function's contract; each load
            // reads eight values of one line's slice, each store writes lanes
            // `first .. first + 8` of one step.
            unsafe {
                // (loops, not closures: a closure does not inherit the caller's
                // target features, and its intrinsics are calls)
                let mut rows = [_mm256_setzero_ps(); 8];
                for (i, row) in rows.iter_mut().enumerate() {
                    *row = _mm256_loadu_ps(src[(first + i) * stride + p0..][..8].as_ptr());
                }
                for (j, column) in transpose8(rows).into_iter().enumerate() {
                    _mm256_storeu_ps(out[p0 + j][first..first + 8].as_mut_ptr(), column);
                }
            }
        }
        // this group's steps past the last whole eight
        scatter_lines(src, stride, first..first + 8, whole_steps, out);
    }
    // the lines past the last whole eight
    scatter_lines(src, stride, whole_lines..lines, 0, out);
}

/// [`Tiles::pack_query_tile`](crate::kernel::tiled::Tiles::pack_query_tile)
/// for f32: a tile of contiguous rows (times the scale) eight steps at a
/// time, its first eight rows transposed as one block and its last four as
/// another (zeros for the rows past a short tile); the steps past the last
/// whole eight one entry at a time ([`Entry::pack_query`]), and rows that are
/// not contiguous by the scatter.
///
/// Out of line, as [`pack_panel_f32`].
///
/// # Safety
///
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_query_tile_f32(
    rows: ArrayView2<'_, f32>,
    scale: f32,
    out: &mut [[f32; MR]],
) {
    const {
        assert!(
            MR == 12,
            "a tile's rows are a block of eight and one of four"
        )
    };
    let mut lines: [&[f32]; MR] = [&[]; MR];
    for (line, row) in lines.iter_mut().zip(rows.outer_iter()) {
        match row.to_slice() {
            Some(row) => *line = row,
            None => return scatter_queries(rows, scale, out),
        }
    }
    let (n, depth) = (rows.nrows(), out.len());
    let whole_steps = depth.min(rows.ncols()) / 8 * 8;
    if n < MR {
        out[whole_steps..].fill([0.0; MR]);
    }
    // SAFETY: the caller upholds this function's contract; each load reads
    // eight values of a line's first `whole_steps`, each store writes eight
    // (or four) of the `MR` entries of one step.
    unsafe {
        let scale8 = _mm256_set1_ps(scale);
        for p0 in (0..whole_steps).step_by(8) {
            // the tile's rows times the scale, zero past a short tile's (loops,
            // as in `pack_panel_f32`)
            let mut regs = [_mm256_setzero_ps(); MR];
            for (reg, line) in regs.iter_mut().zip(&lines[..n]) {
                *reg = _mm256_mul_ps(_mm256_loadu_ps(line[p0..][..8].as_ptr()), scale8);
            }
            let (first, last) = regs.split_at(8);
            let first: [__m256; 8] = first.try_into().expect("eight rows");
            for (j, column) in transpose8(first).into_iter().enumerate() {
                _mm256_storeu_ps(out[p0 + j][..8].as_mut_ptr(), column);
            }
            let last: [__m256; 4] = last.try_into().expect("four rows");
            for (j, columns) in transpose4x8(last).into_iter().enumerate() {
                // steps j (low half) and j + 4 (high half) of rows 8 .. 12
                _mm_storeu_ps(
                    out[p0 + j][8..].as_mut_ptr(),
                    _mm256_castps256_ps128(columns),
                );
                _mm_storeu_ps(
                    out[p0 + j + 4][8..].as_mut_ptr(),
                    _mm256_extractf128_ps::<1>(columns),
                );
            }
        }
    }
    if whole_steps < depth {
        for (i, line) in lines[..n].iter().enumerate() {
            let rest = ArrayView1::from(&line[whole_steps..]);
            <f32 as Entry<f32>>::pack_query(rest, scale, |p, x| out[whole_steps + p][i] = x);
        }
    }
}

/// The transpose of the 8 × 8 matrix whose rows are `rows`: pairs of rows
/// interleaved, pairs of pairs shuffled, then the 128-bit halves exchanged
/// (24 shuffles).
///
/// # Safety
///
/// The CPU must support AVX.
#[inline(always)]
unsafe fn transpose8(rows: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let low = transpose4x8([rows[0], rows[1], rows[2], rows[3]]);
        let high = transpose4x8([rows[4], rows[5], rows[6], rows[7]]);
        // column c of rows 0 .. 4 is half c / 4 of low[c % 4]
        let mut columns = [_mm256_setzero_ps(); 8];
        for c in 0..4 {
            columns[c] = _mm256_permute2f128_ps::<0x20>(low[c], high[c]);
            columns[c + 4] = _mm256_permute2f128_ps::<0x31>(low[c], high[c]);
        }
        columns
    }
}

/// Four rows of eight, transposed within each 128-bit half: register `c` holds
/// column `c` of the four rows in its low half and column `c + 4` in its high
/// half (eight shuffles).
///
/// # Safety
///
/// The CPU must support AVX.
#[inline(always)]
unsafe fn transpose4x8(rows: [__m256; 4]) -> [__m256; 4] {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        // rows 0, 1 and 2, 3 interleaved: (a0 b0 a1 b1 | a4 b4 a5 b5), (a2 b2 a3 b3 | …)
        let t0 = _mm256_unpacklo_ps(rows[0], rows[1]);
        let t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
        let t2 = _mm256_unpacklo_ps(rows[2], rows[3]);
        let t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
        [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::pack::scatter_panel;
    use ndarray::{Array2, s};

    fn values(rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| (i * 1000 + j) as f32 + 0.25)
    }

    #[test]
    fn the_transposed_panel_is_the_scattered_one() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        for (lines, depth, stride) in [(16, 64, 64), (13, 20, 24), (8, 8, 8), (5, 3, 7), (16, 7, 9)]
        {
            let src = values(lines, stride);
            let src = src.as_slice().expect("standard layout");
            let mut ours = vec![[-1.0f32; 16]; depth];
            let mut scattered = ours.clone();
            // SAFETY: AVX2 was detected above.
            unsafe { pack_panel_f32(src, stride, lines, &mut ours) };
            scatter_panel(src, stride, lines, &mut scattered);
            assert_eq!(
                ours, scattered,
                "{lines} lines of {depth} steps, stride {stride}"
            );
        }
    }

    #[test]
    fn the_transposed_query_tile_is_the_scattered_one() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        for (n, d) in [(12, 64), (12, 20), (7, 64), (1, 8), (11, 13), (12, 5)] {
            let q = values(n, d);
            let mut ours = vec![[-1.0f32; MR]; d];
            let mut scattered = ours.clone();
            // SAFETY: AVX2 was detected above.
            unsafe { pack_query_tile_f32(q.view(), 0.125, &mut ours) };
            scatter_queries(q.view(), 0.125, &mut scattered);
            assert_eq!(ours, scattered, "{n} rows of {d}");
        }
        // rows that are not contiguous: the scatter's own result
        let wide = values(12, 40);
        let strided = wide.slice(s![.., ..;2]);
        let mut ours = vec![[0.0f32; MR]; 20];
        let mut scattered = ours.clone();
        // SAFETY: AVX2 was detected above.
        unsafe { pack_query_tile_f32(strided, 0.5, &mut ours) };
        scatter_queries(strided, 0.5, &mut scattered);
        assert_eq!(ours, scattered);
    }
}
