//! Matrix products on the forward's micro-kernels, for the backward pass and
//! the layers: each right operand packed once into the panels the micro-kernel
//! reads, and reused by every product that needs it (the keys and values once
//! per head, a query block's rows once per block), where a general matrix
//! product would pack both operands on every call.
//!
//! `C = A·B` with `B: (depth, n)` in panels of `NR` columns ([`Panels`], in
//! `pack/mod.rs`), each panel's `depth` steps one after another
//! (`[[_; NR]; depth]`), as the tiled forward packs its keys; `A: (m, depth)`
//! a [`Left`] operand: packed in panels of [`MR`] rows the same way, or read
//! where it lies ([`Rows`], [`Columns`]: the micro-kernel broadcasts each entry
//! from memory, so the backward's row-major block of weights, or of their
//! gradients, serves as `A` or as `Aᵀ` without a copy). The tiles go straight
//! into `C` ([`Tiles::product_tile`]).

use std::ops::Range;

use ndarray::{ArrayView2, ShapeBuilder};

use super::pack::{PackPanel, Panels};
use super::params::MR;
use super::tiled::Tiles;
use crate::element::Element;

/// Packs panels of [`MR`] lines (a product's left operand) with the token's
/// query tiles ([`Tiles::pack_query_tile`]: AVX-512 transposes a whole tile in
/// registers, where [`Panels::pack_lines`] stores each value on its own).
#[derive(Clone, Copy)]
pub(crate) struct RowTiles<T, const NR: usize>(pub(crate) T);

impl<A: Element, T: Tiles<A, NR>, const NR: usize> PackPanel<A, MR> for RowTiles<T, NR> {
    #[inline(always)]
    fn pack_panel(self, src: &[A], stride: usize, lines: usize, out: &mut [[A; MR]]) {
        let depth = out.len();
        let rows = ArrayView2::from_shape((lines, depth).strides((stride, 1)), src)
            .expect("a panel's lines lie in `src`");
        self.0.pack_query_tile(rows, A::one(), out);
    }
}

/// Where a product goes: a row-major matrix (`stride` apart) whose first
/// `rows × cols` entries it writes, or adds to.
pub(crate) struct Target<'c, A> {
    pub(crate) c: &'c mut [A],
    pub(crate) stride: usize,
    pub(crate) add: bool,
}

/// A product's left operand `A: (lines, steps)` where the micro-kernel reads
/// it, tile of [`MR`] lines by tile ([`Tiles::product_tile`], whose `LINE`
/// and `STEP` say where each entry lies).
pub(crate) trait Left<A: Copy> {
    /// The lines of `A`.
    fn lines(&self) -> usize;
    /// `C (=|+=) A·B` for tile `t` of `A`'s lines ([`Tiles::product_tile`]).
    fn tile_product<T: Tiles<A, NR>, const NR: usize>(
        &self,
        tiles: T,
        t: usize,
        b: &[[A; NR]],
        c: Target<'_, A>,
    );
}

/// Packed in panels of [`MR`] lines, each panel's steps one after another.
impl<A: Element> Left<A> for Panels<A> {
    #[inline(always)]
    fn lines(&self) -> usize {
        self.lines
    }

    #[inline(always)]
    fn tile_product<T: Tiles<A, NR>, const NR: usize>(
        &self,
        tiles: T,
        t: usize,
        b: &[[A; NR]],
        c: Target<'_, A>,
    ) {
        let a = self.panel::<MR>(t, &(0..self.depth)).as_flattened();
        let rows = MR.min(self.lines - t * MR);
        tiles.product_tile::<1, MR>(a, b, rows, c.c, c.stride, c.add);
    }
}

/// `A` where it lies: line `i`, step `p` at `data[i·LINE + p·STEP]` (no
/// packing: the micro-kernel broadcasts each entry from there).
pub(crate) struct Strided<'a, A, const LINE: usize, const STEP: usize> {
    pub(crate) data: &'a [A],
    pub(crate) lines: usize,
}

/// The rows of a row-major matrix `W` wide.
pub(crate) type Rows<'a, A, const W: usize> = Strided<'a, A, W, 1>;

/// The columns of a row-major matrix `W` wide (the rows of its transpose).
pub(crate) type Columns<'a, A, const W: usize> = Strided<'a, A, 1, W>;

impl<A: Element, const LINE: usize, const STEP: usize> Left<A> for Strided<'_, A, LINE, STEP> {
    #[inline(always)]
    fn lines(&self) -> usize {
        self.lines
    }

    #[inline(always)]
    fn tile_product<T: Tiles<A, NR>, const NR: usize>(
        &self,
        tiles: T,
        t: usize,
        b: &[[A; NR]],
        c: Target<'_, A>,
    ) {
        let a = &self.data[t * MR * LINE..];
        let rows = MR.min(self.lines - t * MR);
        tiles.product_tile::<LINE, STEP>(a, b, rows, c.c, c.stride, c.add);
    }
}

/// `C (=|+=) A·B` over the steps `steps` of `b` (the first `steps.len()` of
/// `a`), for the columns of `B` in `cols` (a range of whole `NR` panels at its
/// start): `b` packed in panels of `NR`; `C`'s column 0 is `cols.start`.
#[inline(always)]
pub(crate) fn product<A: Element, T: Tiles<A, NR>, L: Left<A>, const NR: usize>(
    tiles: T,
    a: &L,
    b: &Panels<A>,
    steps: Range<usize>,
    cols: Range<usize>,
    target: Target<'_, A>,
) {
    debug_assert!(cols.start.is_multiple_of(NR) && steps.end <= b.depth);
    let Target { c, stride, add } = target;
    let first_panel = cols.start / NR;
    let lines = a.lines();
    // one panel of B stays in L1 while every panel of A passes it
    for cp in 0..cols.len().div_ceil(NR) {
        let width = NR.min(cols.len() - cp * NR);
        let b_panel = b.panel::<NR>(first_panel + cp, &steps);
        for t in 0..lines.div_ceil(MR) {
            let c_tile = &mut c[t * MR * stride + cp * NR..];
            if width == NR {
                // whole tile rows, straight into C
                let target = Target {
                    c: c_tile,
                    stride,
                    add,
                };
                a.tile_product(tiles, t, b_panel, target);
            } else {
                let mut tile = [[A::zero(); NR]; MR];
                let target = Target {
                    c: tile.as_flattened_mut(),
                    stride: NR,
                    add: false,
                };
                a.tile_product(tiles, t, b_panel, target);
                let rows = MR.min(lines - t * MR);
                for (row, tile_row) in c_tile.chunks_mut(stride).zip(&tile).take(rows) {
                    for (x, &y) in row[..width].iter_mut().zip(tile_row) {
                        *x = if add { *x + y } else { y };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::arch::Portable;
    use ndarray::Array2;

    fn matrix(rows: usize, cols: usize, seed: usize) -> Array2<f64> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            ((i * 31 + j * 17 + seed * 7) % 23) as f64 / 7.0 - 1.5
        })
    }

    /// A panels buffer packed again keeps no value of the earlier pack in the
    /// lanes past its last line.
    #[test]
    fn packing_again_leaves_the_padding_zero() {
        let (big, small) = (matrix(2 * MR, 9, 3), matrix(MR + 1, 5, 4));
        for by_lines in [true, false] {
            let mut panels = Panels::new(MR);
            for x in [&big, &small] {
                let (lines, depth) = x.dim();
                let t = x.t().as_standard_layout().to_owned();
                if by_lines {
                    panels.pack_lines::<MR>(x.as_slice().expect("standard"), depth, lines, depth);
                } else {
                    panels.pack_steps::<MR>(t.as_slice().expect("standard"), lines, lines, depth);
                }
            }
            // MR + 1 lines: the second panel holds one, its other lanes are padding
            for step in panels.panel::<MR>(1, &(0..5)) {
                assert_eq!(step[1..], [0.0; MR - 1], "by lines: {by_lines}");
            }
        }
    }

    /// Every way of packing (and two of not packing `A`), against `a.dot(&b)`,
    /// at sizes off the panel widths.
    #[test]
    fn products_of_packed_panels_equal_the_plain_product() {
        const NR: usize = 8;
        /// The stride of `A` read where it lies: wider than any of its sizes.
        const WIDE: usize = 130;
        /// `1 + A·B` from `a` and each of `right`, against `want = A·B`.
        fn check(a: &impl Left<f64>, right: &[Panels<f64>], want: &Array2<f64>) {
            let ((m, n), depth) = (want.dim(), right[0].depth);
            for b in right {
                let mut c = vec![1.0; m * n];
                let target = Target {
                    c: &mut c,
                    stride: n,
                    add: true,
                };
                product::<f64, Portable, _, NR>(Portable, a, b, 0..depth, 0..n, target);
                for ((i, j), &w) in want.indexed_iter() {
                    let got = c[i * n + j] - 1.0;
                    assert!((got - w).abs() < 1e-12, "{m}×{depth}×{n} at ({i}, {j})");
                }
            }
        }
        // the same panels packed again and again, smaller after larger: values
        // left over from a larger pack must not leak into the padding
        let mut left = [Panels::new(MR), Panels::new(MR)];
        let mut right = [Panels::new(NR), Panels::new(NR)];
        let sizes = [
            (1, 1, 1),
            (5, 3, 7),
            (6, 64, 16),
            (13, 17, 24),
            (64, 128, 40),
            (13, 17, 20),
        ];
        for (m, depth, n) in sizes {
            let (a, b) = (matrix(m, depth, 1), matrix(depth, n, 2));
            let want = a.dot(&b);
            let at = a.t().as_standard_layout().to_owned();
            let bt = b.t().as_standard_layout().to_owned();
            let a_flat = a.as_slice().expect("standard");
            let b_flat = b.as_slice().expect("standard");
            left[0].pack_lines::<MR>(a_flat, depth, m, depth);
            left[1].pack_steps::<MR>(at.as_slice().expect("standard"), m, m, depth);
            right[0].pack_steps::<NR>(b_flat, n, n, depth);
            right[1].pack_lines::<NR>(bt.as_slice().expect("standard"), depth, n, depth);
            for a in &left {
                check(a, &right, &want);
            }
            // unpacked: A's rows, and the columns of Aᵀ, `WIDE` apart
            let mut wide = vec![f64::NAN; m.max(depth) * WIDE];
            for ((i, p), &x) in a.indexed_iter() {
                wide[i * WIDE + p] = x;
            }
            let rows = Rows::<f64, WIDE> {
                data: &wide,
                lines: m,
            };
            check(&rows, &right, &want);
            let mut wide = vec![f64::NAN; m.max(depth) * WIDE];
            for ((i, p), &x) in a.indexed_iter() {
                wide[p * WIDE + i] = x;
            }
            let columns = Columns::<f64, WIDE> {
                data: &wide,
                lines: m,
            };
            check(&columns, &right, &want);
            // a range of steps and of column panels
            if depth > 3 && n > NR {
                let steps = 2..depth - 1;
                let want = a
                    .slice(ndarray::s![.., steps.clone()])
                    .dot(&b.slice(ndarray::s![steps.clone(), NR..]));
                let mut sub = Panels::new(MR);
                let a_part = a.slice(ndarray::s![.., steps.clone()]).to_owned();
                sub.pack_lines::<MR>(
                    a_part.as_slice().expect("standard"),
                    steps.len(),
                    m,
                    steps.len(),
                );
                let mut c = vec![0.0; m * (n - NR)];
                let target = Target {
                    c: &mut c,
                    stride: n - NR,
                    add: false,
                };
                product::<f64, Portable, _, NR>(Portable, &sub, &right[0], steps, NR..n, target);
                for ((i, j), &w) in want.indexed_iter() {
                    assert!((c[i * (n - NR) + j] - w).abs() < 1e-12);
                }
            }
        }
    }
}
