//! Block products on the tiles, by the layout of their operands, and the
//! roundings of f32 rows into those operands: what the forward's scores and
//! the backward's five products are made of.

use std::arch::x86_64::*;

use half::bf16;

use super::unit::{Grid, TileUnit};
use super::{Amx, NR, TILE_ROWS};
use crate::kernel::pack::{Bf16Pair, PackedKeys, PackedValues, TILE_PAIRS, TilePair};
use crate::kernel::params::{BACKWARD_KEYS as BK, BACKWARD_QUERIES as BQ};

/// Entries of one step of a tile's rows: 32 bf16 (16 pairs).
pub(super) const STEP: usize = 2 * TILE_PAIRS;

/// Where an operand's tiles lie in its slice: tile `(i, s)` (the `i`-th
/// along the product's rows or columns, at step `s`; for the sums, tile row
/// `i` and column `s`) starts at entry `first + i·across + s·down`, its 16
/// rows `stride` entries apart.
#[derive(Clone, Copy)]
pub(super) struct Layout {
    pub(super) first: usize,
    pub(super) across: usize,
    pub(super) down: usize,
    pub(super) stride: usize,
}

impl Layout {
    /// Tiles of 16 rows of `stride` entries: tile row `t` from row `16t`,
    /// step (or tile column) `s` from entry `s·step` of each row.
    pub(super) fn rows(stride: usize, step: usize) -> Self {
        Layout {
            first: 0,
            across: TILE_ROWS * stride,
            down: step,
            stride,
        }
    }

    /// [`PackedKeys`]' panels of 16 keys, `depth` pairs deep, from panel `first`.
    pub(super) fn panels(depth: usize, first: usize) -> Self {
        Layout {
            first: first * NR * depth,
            across: NR * depth,
            down: TILE_PAIRS * NR,
            stride: NR,
        }
    }

    /// [`PackedValues::pack_key_pairs`]' column groups of 16, from key `first`
    /// for `steps` steps of 32 keys.
    pub(super) fn key_pairs(values: &PackedValues<Bf16Pair>, first: usize, steps: usize) -> Self {
        assert!(
            first.is_multiple_of(2) && first / 2 + steps * TILE_PAIRS <= values.s,
            "the steps lie within each column group"
        );
        Layout {
            first: first / 2 * NR,
            across: values.s * NR,
            down: TILE_PAIRS * NR,
            stride: NR,
        }
    }

    /// Rows of `stride` pairs, each a pair of rows ([`Amx::pair_rows`]):
    /// columns `16p ..`, pairs of rows `16s ..`.
    pub(super) fn row_pairs(stride: usize) -> Self {
        Layout {
            first: 0,
            across: NR,
            down: TILE_PAIRS * stride,
            stride,
        }
    }

    /// The same tiles, from entry `first` on.
    pub(super) fn offset(self, first: usize) -> Self {
        Layout {
            first: self.first + first,
            ..self
        }
    }

    /// The entry tile `(i, s)` starts at.
    #[inline(always)]
    fn at(self, i: usize, s: usize) -> usize {
        self.first + i * self.across + s * self.down
    }

    /// Whether tiles `(i < count, s < steps)`, rows of `width` entries, lie
    /// within `len` entries.
    #[inline(always)]
    fn within(self, (count, steps): (usize, usize), width: usize, len: usize) -> bool {
        count == 0
            || steps == 0
            || self.at(count - 1, steps - 1) + (TILE_ROWS - 1) * self.stride + width <= len
    }
}

/// An operand of a tile product: its entries and where its tiles lie.
pub(super) struct Operand<'x, E>(pub(super) &'x [E], pub(super) Layout);

impl Amx {
    /// `C = A·B` (or `C += A·B` where `add`) over the tiles of `grid`: `A`'s
    /// tiles of 16 rows of 64 bytes, `B`'s of 16 steps of 64 bytes, `C`'s of
    /// 16 rows of 16 f32.
    #[inline(always)]
    pub(super) fn product<A, B>(
        self,
        grid: Grid,
        Operand(a, la): Operand<'_, A>,
        Operand(b, lb): Operand<'_, B>,
        (c, lc): (&mut [f32], Layout),
        add: bool,
    ) {
        let width = |size: usize| 64 / size;
        assert!(
            la.within((grid.rows, grid.steps), width(size_of::<A>()), a.len())
                && lb.within((grid.columns, grid.steps), width(size_of::<B>()), b.len())
                && lc.within((grid.rows, grid.columns), NR, c.len()),
            "the tiles lie within their operands"
        );
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let bytes = |layout: Layout, size: usize| layout.stride * size;
        let a = |t, s| -> (*const u8, usize) {
            let at = a.wrapping_add(la.at(t, s));
            (at.cast(), bytes(la, size_of::<A>()))
        };
        let b = |p, s| -> (*const u8, usize) {
            let at = b.wrapping_add(lb.at(p, s));
            (at.cast(), bytes(lb, size_of::<B>()))
        };
        let c = |t, p| -> (*mut u8, usize) {
            let at = c.wrapping_add(lc.at(t, p));
            (at.cast(), bytes(lc, size_of::<f32>()))
        };
        // SAFETY: `self` proves AMX; by the assertion every tile of `A`, `B`
        // and `C` the grid reads or writes lies within its slice.
        unsafe {
            let tiles = TileUnit::configure();
            for group in grid.groups() {
                match add {
                    true => tiles.add_group(group, grid.steps, a, b, c),
                    false => {
                        tiles.sum_group(group, grid.steps, a, b);
                        for (tile, t, p) in group.tiles() {
                            let (at, stride) = c(t, p);
                            tiles.store_to(tile, at, stride);
                        }
                    }
                }
            }
        }
    }

    /// `C = A·B` for `rows` rows and `n` columns (both to whole tiles) into
    /// rows of `stride` of `c`: `A` in rows of pairs as deep as `b`'s panels of
    /// 16 keys, from panel `first` (the scores, and `dP`).
    #[inline(always)]
    pub(super) fn panel_product(
        self,
        (a, rows): (&[TilePair], usize),
        (b, first, n): (&PackedKeys<TilePair>, usize, usize),
        (c, stride): (&mut [f32], usize),
    ) {
        let depth = b.depth;
        let grid = Grid {
            rows: rows.div_ceil(TILE_ROWS),
            columns: n.div_ceil(NR),
            steps: depth / TILE_PAIRS,
        };
        assert!(
            depth.is_multiple_of(TILE_PAIRS) && grid.columns * NR <= stride,
            "whole steps, and the sums' tiles within their rows"
        );
        let a = Operand(a, Layout::rows(depth, TILE_PAIRS));
        let b = Operand(&b.data[..], Layout::panels(depth, first));
        self.product(grid, a, b, (c, Layout::rows(stride, NR)), false);
    }

    /// `C += A·B` for `rows` rows (to a whole tile) and every column group of
    /// `b`, into `c` in rows of whole groups: `A` a key block's rows of `BK`
    /// bf16 over its `n` keys, `B` the pairs of keys of `b` from key `first`
    /// (`dQ += dS·K`, and `O += P·V` when the backward runs the forward again).
    #[inline(always)]
    pub(super) fn key_pair_product(
        self,
        (a, rows): (&[bf16], usize),
        (b, first, n): (&PackedValues<Bf16Pair>, usize, usize),
        c: &mut [f32],
    ) {
        let grid = Grid {
            rows: rows.div_ceil(TILE_ROWS),
            columns: b.col_tiles,
            steps: n.div_ceil(STEP),
        };
        let a = Operand(a, Layout::rows(BK, STEP));
        let layout = Layout::key_pairs(b, first, grid.steps);
        let c = (c, Layout::rows(b.col_tiles * NR, NR));
        self.product(grid, a, Operand(&b.data[..], layout), c, true);
    }

    /// `Cᵀ += A·B` into a transposed gradient (`dKᵀ`, `dVᵀ`: `c` in rows of
    /// `keys`, the key block's columns from `first`): `A` `a_tiles` tiles of
    /// rows of `BQ` bf16 over the block's `rows` queries, `B` pairs of those
    /// rows over the key block's `n` keys, in rows of `BK` pairs.
    #[inline(always)]
    pub(super) fn transposed_product(
        self,
        (a, a_tiles): (&[bf16], usize),
        (b, rows, n): (&[Bf16Pair], usize, usize),
        (c, keys, first): (&mut [f32], usize, usize),
    ) {
        let grid = Grid {
            rows: a_tiles,
            columns: n.div_ceil(NR),
            steps: rows.div_ceil(STEP),
        };
        let a = Operand(a, Layout::rows(BQ, STEP));
        let b = Operand(b, Layout::row_pairs(BK));
        let c = (c, Layout::rows(keys, NR).offset(first));
        self.product(grid, a, b, c, true);
    }

    /// The first `n` entries of the `rows` rows of `x` (rows of `stride`) in
    /// bf16, into the same rows of `out`, zero to a whole step of 32 and in
    /// the rows to a whole tile.
    #[inline(always)]
    pub(super) fn narrow_rows(
        self,
        (x, stride): (&[f32], usize),
        rows: usize,
        n: usize,
        out: &mut [bf16],
    ) {
        let (steps, tile_rows) = (n.div_ceil(STEP), rows.next_multiple_of(TILE_ROWS));
        assert!(
            steps * STEP <= stride && x.len() >= rows * stride && out.len() >= tile_rows * stride,
            "the rows lie within the blocks"
        );
        for i in 0..tile_rows {
            let from = x.as_ptr().wrapping_add(i * stride);
            for s in 0..steps {
                let j = s * STEP;
                let (low, high) = match i < rows {
                    true => (lanes(n, j), lanes(n, j + 16)),
                    false => (0, 0),
                };
                // SAFETY: `self` proves AVX-512 F, BW and AVX512_BF16; the
                // masked loads read entries below `n` of a row below `rows`,
                // the store writes 32 bf16 of row `i` below `stride`.
                unsafe {
                    let a = _mm512_maskz_loadu_ps(low, from.wrapping_add(j));
                    let b = _mm512_maskz_loadu_ps(high, from.wrapping_add(j + 16));
                    let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    _mm512_storeu_si512(out[i * stride + j..].as_mut_ptr().cast(), pairs);
                }
            }
        }
    }

    /// The first `n` entries of the `rows` rows of `x` (rows of `stride`) in
    /// bf16, rows `2r` and `2r + 1` as pairs in row `r` of `out` (rows of
    /// `stride` pairs), zero to a whole panel of 16 and in the rows to a whole
    /// step of 32.
    #[inline(always)]
    pub(super) fn pair_rows(
        self,
        (x, stride): (&[f32], usize),
        rows: usize,
        n: usize,
        out: &mut [Bf16Pair],
    ) {
        let (panels, pair_rows) = (n.div_ceil(NR), rows.next_multiple_of(STEP) / 2);
        assert!(
            panels * NR <= stride && x.len() >= rows * stride && out.len() >= pair_rows * stride,
            "the rows lie within the blocks"
        );
        // (a0, b0, a1, b1, …) from (a0 … a15, b0 … b15)
        let interleave: [i16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as i16);
        for r in 0..pair_rows {
            for p in 0..panels {
                let j = p * NR;
                let mask = |i: usize| if i < rows { lanes(n, j) } else { 0 };
                let row = |i: usize| x.as_ptr().wrapping_add(i * stride + j);
                // SAFETY: `self` proves AVX-512 F, BW and AVX512_BF16; the
                // masked loads read entries below `n` of rows below `rows`,
                // the store writes 16 pairs of row `r` below `stride`.
                unsafe {
                    let index = _mm512_loadu_si512(interleave.as_ptr().cast());
                    let a = _mm512_maskz_loadu_ps(mask(2 * r), row(2 * r));
                    let b = _mm512_maskz_loadu_ps(mask(2 * r + 1), row(2 * r + 1));
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    let pairs = _mm512_permutexvar_epi16(index, both);
                    _mm512_storeu_si512(out[r * stride + j..].as_mut_ptr().cast(), pairs);
                }
            }
        }
    }
}

/// The lanes of 16 entries from `j` below `n`.
#[inline(always)]
pub(super) fn lanes(n: usize, j: usize) -> u16 {
    match n.saturating_sub(j) {
        m if m >= 16 => 0xffff,
        m => (1u16 << m) - 1,
    }
}
