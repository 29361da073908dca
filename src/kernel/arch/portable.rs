//! The micro-kernels as plain loops over fixed-size arrays, for any CPU: the
//! autovectoriser turns them into whatever the build's target allows.

use super::Token;
use crate::kernel::direct::{Dots, HalfDots, Narrow, sum_lanes};
use crate::kernel::float::{KernelFloat, MulAdd, Separate};
use crate::kernel::pack::PackPanel;
use crate::kernel::params::{BC, LANES, MR, TILE_BLOCKS};
use crate::kernel::tiled::Tiles;

/// The portable micro-kernels (`a·b + c` as a multiply and an add: without FMA
/// in the target, `mul_add` would call a slow library function).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

/// Tile widths: 32 bytes of a tile row, what the autovectoriser fills with one
/// 256-bit or two 128-bit registers; it needs no trampoline (nothing to enable).
impl Portable {
    /// Columns of an f32 tile.
    pub(crate) const F32_TILE: usize = 8;
    /// Columns of an f64 tile.
    pub(crate) const F64_TILE: usize = 4;
}

impl<A: KernelFloat, const NR: usize> Token<A, NR> for Portable {
    type MulAdd = Separate;
}

impl<A: KernelFloat, const NR: usize> PackPanel<A, NR> for Portable {}

impl<A: KernelFloat, const NR: usize> Tiles<A, NR> for Portable {
    #[inline(always)]
    /// All `MR` rows of the product tile, however few are asked for: loops of
    /// fixed length are what the compiler vectorises.
    fn score_tile(self, q: &[[A; MR]], k: &[[A; NR]], _rows: usize) -> [[A; NR]; MR] {
        let mut out = [[A::zero(); NR]; MR];
        self.product_tile::<1, MR>(q.as_flattened(), k, MR, out.as_flattened_mut(), NR, false);
        out
    }

    #[inline(always)]
    fn product_tile<const LINE: usize, const STEP: usize>(
        self,
        a: &[A],
        b: &[[A; NR]],
        rows: usize,
        c: &mut [A],
        stride: usize,
        add: bool,
    ) {
        assert!(rows <= MR, "at most MR rows");
        let mut acc = [[A::zero(); NR]; MR];
        for (p, bp) in b.iter().enumerate() {
            for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                let x = a[i * LINE + p * STEP];
                for j in 0..NR {
                    acc[j] = Separate::mul_add(x, bp[j], acc[j]);
                }
            }
        }
        for (row, acc) in c.chunks_mut(stride).zip(&acc).take(rows) {
            for (x, &y) in row[..NR].iter_mut().zip(acc) {
                *x = if add { *x + y } else { y };
            }
        }
    }

    #[inline(always)]
    fn value_tile(self, p: &[&[A; BC]; MR], v: &[[A; NR]], alpha: &[A; MR], o: &mut [[A; NR]; MR]) {
        let mut acc = [[A::zero(); NR]; MR];
        for (j, v) in v.iter().enumerate().take(BC) {
            for i in 0..MR {
                let pij = p[i][j];
                for c in 0..NR {
                    acc[i][c] = Separate::mul_add(pij, v[c], acc[i][c]);
                }
            }
        }
        for i in 0..MR {
            for c in 0..NR {
                o[i][c] = Separate::mul_add(o[i][c], alpha[i], acc[i][c]);
            }
        }
    }
}

impl<A: KernelFloat> Dots<A> for Portable {
    #[inline(always)]
    fn dot4(self, q: &[[A; LANES]], k: &[&[[A; LANES]]; 4]) -> [A; 4] {
        let mut acc = [[A::zero(); LANES]; 4];
        for (acc, k) in acc.iter_mut().zip(k) {
            for (x, y) in q.iter().zip(*k) {
                for c in 0..LANES {
                    acc[c] = Separate::mul_add(x[c], y[c], acc[c]);
                }
            }
        }
        acc.map(|acc| sum_lanes(&acc))
    }

    #[inline(always)]
    fn value_rows(self, p: &[&[A]; 4], values: &[A], d_v: usize, c0: usize) -> [[A; LANES]; 4] {
        let mut acc = [[A::zero(); LANES]; 4];
        for (j, value) in values.chunks_exact(d_v).enumerate() {
            let v = &value[c0..c0 + LANES];
            for (acc, p) in acc.iter_mut().zip(p) {
                for c in 0..LANES {
                    acc[c] = Separate::mul_add(p[j], v[c], acc[c]);
                }
            }
        }
        acc
    }
}

impl HalfDots for Portable {
    #[inline(always)]
    fn dot4_half<H: Narrow>(self, q: &[[f32; LANES]], k: &[&[[H; LANES]]; 4]) -> [f32; 4] {
        let mut acc = [[0.0; LANES]; 4];
        for (acc, k) in acc.iter_mut().zip(k) {
            for (x, y) in q.iter().zip(*k) {
                let mut y32 = [0.0; LANES];
                H::widen(y, &mut y32);
                for c in 0..LANES {
                    acc[c] = Separate::mul_add(x[c], y32[c], acc[c]);
                }
            }
        }
        acc.map(|acc| sum_lanes(&acc))
    }

    #[inline(always)]
    fn value_row_half<H: Narrow>(
        self,
        p: &[f32],
        values: &[H],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; TILE_BLOCKS] {
        let mut acc = [[0.0; LANES]; TILE_BLOCKS];
        for (value, &p) in values.chunks_exact(d_v).zip(p) {
            let mut v32 = [0.0; TILE_BLOCKS * LANES];
            H::widen(&value[c0..c0 + TILE_BLOCKS * LANES], &mut v32);
            for (acc, v) in acc.iter_mut().zip(v32.as_chunks::<LANES>().0) {
                for c in 0..LANES {
                    acc[c] = Separate::mul_add(p, v[c], acc[c]);
                }
            }
        }
        acc
    }
}
