//! The tiled kernel for keys and values stored in bf16 on CPUs with AMX (Intel
//! Sapphire Rapids and later): both products of a block, `S = Q·Kᵀ` and `P·V`,
//! on the tile unit (`tdpbf16ps`: a 16 × 16 tile of f32 sums, each step adding
//! the products of 32 bf16 pairs), the online softmax between them with
//! AVX-512, sixteen rows at a time ([`super::band`]). Rust has no stable AMX
//! intrinsics or target features, so the tile instructions are inline `asm!`,
//! and detection reads CPUID and asks Linux for the tile data
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`) itself.
//!
//! Accuracy: the queries, keys and values are bf16 as stored; the weights
//! `P = exp(S − max)` are rounded to bf16 before `P·V` (each by at most 2⁻⁸
//! of itself, after an `exp` within 4·10⁻⁶; the row's sum, which divides, is
//! of the f32 weights), as PyTorch's CPU kernel does: an output moves by at
//! most 2⁻⁸ of the largest value, the size of the values' own bf16 rounding
//! (`tests/half.rs` allows one bf16 spacing of the largest value where AMX
//! ran).
//! Products of bf16 pairs are exact in f32; the tile unit adds them in an order
//! of its own, and treats subnormal inputs as zero.

mod backward;
mod block;
mod unit;

use std::arch::x86_64::*;

use block::lanes;
use half::bf16;
use ndarray::ArrayView2;
use unit::{Grid, TileUnit, usable};

use super::avx2::Avx2;
use super::avx512bf16::Avx512Bf16;
use super::band::{BAND, softmax_bands};
use super::transpose::pack_pair_panel;
use super::{Dispatch, KernelArch, Op, Token};
use crate::kernel::float::{Fused, MulAdd};
use crate::kernel::pack::{
    Bf16Pair, Entry, PackPanel, PackedKeys, PackedValues, TILE_PAIRS, TilePair, narrow_pairs,
};
use crate::kernel::params::{BC, BR, MR};
use crate::kernel::tiled::{KeyTiles, Panels, RowStates, Tiles, Weights};

/// Keys per panel, and value columns per group: the 16 f32 columns of a tile.
const NR: usize = 16;

/// Rows of a tile: query rows of a score tile, output rows of a value tile.
const TILE_ROWS: usize = 16;

/// Keys per step of `P·V`: a tile row of 32 bf16 weights.
const KEY_STEP: usize = 2 * TILE_PAIRS;

const _: () = assert!(BR.is_multiple_of(TILE_ROWS) && BC.is_multiple_of(KEY_STEP));

/// Proof that the CPU has AMX-TILE and AMX-BF16, that Linux lets this process
/// use the tile data, and everything [`Avx512Bf16`] proves: [`detect`](Self::detect)
/// is the only way to make one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Amx {
    bf16: Avx512Bf16,
    avx2: Avx2,
}

impl Amx {
    /// The token, if this CPU and OS give AMX beside what `bf16` proves.
    pub(crate) fn detect(bf16: Avx512Bf16) -> Option<Self> {
        usable().then_some(Amx {
            bf16,
            avx2: bf16.avx512().avx2(),
        })
    }
}

impl PackPanel<f32, NR> for Amx {
    #[inline(always)]
    fn pack_panel(self, src: &[f32], stride: usize, lines: usize, out: &mut [[f32; NR]]) {
        self.avx2.pack_panel(src, stride, lines, out)
    }
}

/// The register tiles of f32 (never used by the AMX blocks, but every token
/// has them) are AVX2's 16 columns; the softmax is AVX-512's, sixteen rows at
/// a time.
impl Tiles<f32, NR> for Amx {
    #[inline(always)]
    fn score_tile(self, q: &[[f32; MR]], k: &[[f32; NR]], rows: usize) -> [[f32; NR]; MR] {
        self.avx2.score_tile(q, k, rows)
    }

    #[inline(always)]
    fn product_tile<const LINE: usize, const STEP: usize>(
        self,
        a: &[f32],
        b: &[[f32; NR]],
        rows: usize,
        c: &mut [f32],
        stride: usize,
        add: bool,
    ) {
        self.avx2
            .product_tile::<LINE, STEP>(a, b, rows, c, stride, add)
    }

    #[inline(always)]
    fn value_tile(
        self,
        p: &[&[f32; BC]; MR],
        v: &[[f32; NR]],
        alpha: &[f32; MR],
        o: &mut [[f32; NR]; MR],
    ) {
        self.avx2.value_tile(p, v, alpha, o)
    }

    const SCALE_IN_SOFTMAX: bool = true;

    /// AVX-512's (the backward's weights, row by row).
    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [f32], shift: f32) -> f32 {
        // SAFETY: `self` proves AVX-512 F.
        unsafe { super::exp::exp_and_sum_f32(row, shift) }
    }

    /// Sixteen rows at a time ([`softmax_band`]), the weights written as bf16
    /// over the scores' first bytes (the operand of [`Amx::block_values`]).
    #[inline(always)]
    fn block_softmax<M: MulAdd>(
        self,
        s: &mut [f32],
        width: usize,
        rows: usize,
        scale: Option<f32>,
        state: RowStates<'_, f32>,
    ) {
        assert!(
            rows.is_multiple_of(BAND),
            "an AMX block computes whole bands"
        );
        let mut state = state;
        // SAFETY: `self` proves AVX-512 F and AVX512_BF16; a scale given here
        // is positive (`SCALE_IN_SOFTMAX`).
        unsafe { softmax_bands::<true>(s, width, rows / BAND, scale.unwrap_or(1.0), &mut state) };
    }
}

impl KeyTiles<f32, TilePair, NR> for Amx {
    const ROW_TILE: usize = TILE_ROWS;

    /// Sixteen keys by sixteen pairs at a time, transposed in registers
    /// ([`pack_pair_panel`]).
    #[inline(always)]
    fn pack_pair_panel(self, keys: &[bf16], d: usize, lines: usize, out: &mut [[TilePair; NR]]) {
        // SAFETY: `self` is the token: AVX-512 F.
        unsafe { pack_pair_panel(keys, d, lines, out) }
    }

    fn key_tile(self, _: &[[TilePair; MR]], _: &[[TilePair; NR]]) -> [[f32; NR]; MR] {
        unreachable!("the AMX blocks compute their scores in tiles of 16 rows")
    }

    /// Row-major: query `i`'s pairs at `out[i·depth ..]`, so that a tile loads
    /// 16 rows of 16 pairs (a contiguous row's are its own bytes); the rows
    /// past the block's zero.
    #[inline(always)]
    fn pack_block_queries(
        self,
        q: ArrayView2<'_, bf16>,
        scale: f32,
        depth: usize,
        out: &mut [TilePair],
    ) {
        row_major(q, depth, out, |row, packed| {
            TilePair::pack_query(row, scale, |p, pair| packed[p] = pair)
        });
    }

    /// Two panels of 16 keys against 32 query rows at a time (four tiles of
    /// sums in flight: one tile's sum waits on its last step), each summed over
    /// the depth's rows of 16 pairs and stored into the scores' rows; then the
    /// scale.
    #[inline(always)]
    fn block_scores(
        self,
        q: &[TilePair],
        keys: &PackedKeys<TilePair>,
        panels: Panels,
        scale: Option<f32>,
        s: &mut [f32],
    ) {
        let Panels { j0, width, rows } = panels;
        assert!(
            rows.is_multiple_of(TILE_ROWS) && rows <= BR && width.is_multiple_of(NR),
            "an AMX block computes whole tiles"
        );
        self.panel_product((q, rows), (keys, j0 / NR, width), (s, BC));
        if let Some(scale) = scale {
            for row in s.chunks_exact_mut(BC).take(rows) {
                for x in &mut row[..width] {
                    *x *= scale;
                }
            }
        }
    }

    /// Over the weights as [`Tiles::block_softmax`] left them (bf16 in each
    /// row's first `2·width` bytes, zero to a whole step of 32 keys): 32 output
    /// rows and 32 value columns at a time, each tile summing `P·V` over the
    /// block's keys, 32 at a time, then added to the rescaled output with
    /// AVX-512.
    #[inline(always)]
    fn block_values(
        self,
        weights: Weights<'_, f32>,
        values: &PackedValues<Bf16Pair>,
        j0: usize,
        o: &mut [f32],
    ) {
        let Weights {
            p,
            alpha,
            width,
            rows,
            ..
        } = weights;
        let steps = width.next_multiple_of(KEY_STEP);
        let first_step = j0 / 2;
        assert!(
            j0.is_multiple_of(2)
                && rows.is_multiple_of(TILE_ROWS)
                && rows <= BR
                && steps <= BC
                && p.len() >= BR * BC
                && alpha.len() >= rows
                && first_step + steps / 2 <= values.s
                && values.data.len() >= values.col_tiles * values.s * NR
                && o.len() >= values.col_tiles * BR * NR,
            "an AMX block's tiles lie within its operands"
        );
        let grid = Grid {
            rows: rows / TILE_ROWS,
            columns: values.col_tiles,
            steps: steps / KEY_STEP,
        };
        let (weights, pairs) = (p.as_ptr().cast::<u8>(), values.data.as_ptr());
        let row_bytes = BC * size_of::<f32>();
        let mut sums = [[0.0f32; NR]; TILE_ROWS];
        // SAFETY: `self` proves AMX. By the assertion, a tile of weight rows
        // `t·16 ..` and bytes `c·64 ..` lies within `p` (rows of `BC·4` bytes,
        // `c·64 + 64 ≤ 2·steps`), a tile of column group `ct` and steps
        // `j0/2 + c·16 ..` within the values; every store writes `sums`.
        unsafe {
            let tiles = TileUnit::configure();
            for group in grid.groups() {
                tiles.sum_group(
                    group,
                    grid.steps,
                    |t, c| (weights.add(t * TILE_ROWS * row_bytes + c * 64), row_bytes),
                    |ct, c| {
                        let at = (ct * values.s + first_step + c * TILE_PAIRS) * NR;
                        (pairs.add(at).cast(), 64)
                    },
                );
                for (tile, t, ct) in group.tiles() {
                    tiles.store_to(tile, sums.as_mut_ptr().cast(), 64);
                    let out = &mut o[(ct * BR + t * TILE_ROWS) * NR..][..TILE_ROWS * NR];
                    self.add_scaled(out, &alpha[t * TILE_ROWS..][..TILE_ROWS], &sums);
                }
            }
        }
    }
}

/// The rows of `q` packed by `pack_row` as `depth` entries each, row-major,
/// and zero rows to the next whole tile.
#[inline(always)]
fn row_major<Q>(
    q: ArrayView2<'_, Q>,
    depth: usize,
    out: &mut [TilePair],
    mut pack_row: impl FnMut(ndarray::ArrayView1<'_, Q>, &mut [TilePair]),
) {
    let rows = q.nrows();
    for (row, packed) in q.outer_iter().zip(out.chunks_exact_mut(depth)) {
        pack_row(row, packed);
    }
    let computed = rows.next_multiple_of(TILE_ROWS);
    out[rows * depth..computed * depth].fill(TilePair::zero());
}

impl Amx {
    /// A block's rows computed in f32 (the backward's queries and output
    /// gradients), rounded to bf16 pairs row-major as
    /// [`KeyTiles::pack_block_queries`] packs stored ones.
    #[inline(always)]
    fn narrow_block(self, q: ArrayView2<'_, f32>, depth: usize, out: &mut [TilePair]) {
        row_major(q, depth, out, |row, packed| match row.as_slice() {
            Some(row) => self.narrow_row(row, packed),
            None => narrow_pairs(row, depth, |p, pair| packed[p] = TilePair(pair)),
        });
    }

    /// A row's components `row` rounded to bf16 as pairs (as
    /// [`narrow_pairs`] does one by one), 32 at a time, zero past the row's
    /// end to the whole steps of `out`.
    #[inline(always)]
    fn narrow_row(self, row: &[f32], out: &mut [TilePair]) {
        assert!(
            row.len() <= 2 * out.len() && out.len().is_multiple_of(TILE_PAIRS),
            "a packed query holds its row in whole steps"
        );
        let lanes = |from: usize| lanes(row.len(), from);
        for (c, step) in out.as_chunks_mut::<TILE_PAIRS>().0.iter_mut().enumerate() {
            let j = c * KEY_STEP;
            // SAFETY: `self` proves AVX-512 F and AVX512_BF16; the masked loads
            // read only components below `row.len()`, the store writes the
            // step's 16 pairs.
            unsafe {
                let low = _mm512_maskz_loadu_ps(lanes(j), row.as_ptr().wrapping_add(j));
                let high = _mm512_maskz_loadu_ps(lanes(j + 16), row.as_ptr().wrapping_add(j + 16));
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(step.as_mut_ptr().cast(), pairs);
            }
        }
    }

    /// `out[i] = α[i]·out[i] + sums[i]` for the 16 rows of one output tile.
    #[inline(always)]
    fn add_scaled(self, out: &mut [f32], alpha: &[f32], sums: &[[f32; NR]; TILE_ROWS]) {
        for ((row, &a), sum) in out.chunks_exact_mut(NR).zip(alpha).zip(sums) {
            // SAFETY: `self` proves AVX-512 F; each access is one row of 16 f32.
            unsafe {
                let o = _mm512_loadu_ps(row.as_ptr());
                let s = _mm512_loadu_ps(sum.as_ptr());
                _mm512_storeu_ps(row.as_mut_ptr(), _mm512_fmadd_ps(_mm512_set1_ps(a), o, s));
            }
        }
    }
}

inner_dots!(Amx, bf16);

impl Token<f32, NR> for Amx {
    type MulAdd = Fused;
}

trampoline!(
    Amx,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
);

impl Dispatch<f32, TilePair> for Amx {
    fn kind(self) -> KernelArch {
        KernelArch::Amx
    }

    #[inline]
    fn dispatch<O: Op<f32, TilePair>>(self, op: O) -> O::Output {
        self.vectorize::<f32, TilePair, O, NR>(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::arch::avx512::Avx512;

    /// A block's stored rows as pairs, row-major; its rows past the last are
    /// zero to the whole tile. (Plain Rust: runs on every CPU.)
    #[test]
    fn stored_queries_pack_row_major() {
        let block = ndarray::Array2::from_elem((3, 40), bf16::ONE);
        let depth = TilePair::depth(40);
        let mut out = vec![TilePair(Bf16Pair(u32::MAX)); BR * depth];
        row_major(block.view(), depth, &mut out, |row, packed| {
            TilePair::pack_query(row, 1.0, |p, pair| packed[p] = pair)
        });
        let ones = TilePair(Bf16Pair::new(bf16::ONE, bf16::ONE));
        assert!(
            out[..3 * depth]
                .chunks(depth)
                .all(|row| row[..20] == [ones; 20])
        );
        assert!(
            out[..3 * depth]
                .chunks(depth)
                .all(|row| row[20..] == [TilePair::zero(); 12])
        );
        assert!(
            out[3 * depth..TILE_ROWS * depth]
                .iter()
                .all(|&p| p == TilePair::zero())
        );
    }

    /// Rows of every length to 70 narrowed 32 at a time give the pairs the
    /// scalar packing gives, ties to even and the padding zero.
    #[test]
    fn queries_narrow_as_one_by_one() {
        let Some(amx) = Avx512::detect()
            .and_then(Avx512Bf16::detect)
            .and_then(Amx::detect)
        else {
            eprintln!("skipped: this CPU or OS gives no AMX");
            return;
        };
        for len in 1..=70 {
            // values with bits below bf16's, ties among them
            let row: Vec<f32> = (0..len)
                .map(|i| {
                    f32::from_bits(0x3f80_8000 + (i as u32) * 0x1_0001)
                        * if i % 3 == 0 { -1.0 } else { 1.0 }
                })
                .collect();
            let depth = TilePair::depth(len);
            let mut fast = vec![TilePair(Bf16Pair(u32::MAX)); depth];
            amx.narrow_row(&row, &mut fast);
            let mut plain = vec![TilePair::zero(); depth];
            narrow_pairs(ndarray::ArrayView1::from(&row), depth, |p, pair| {
                plain[p] = TilePair(pair)
            });
            assert_eq!(fast, plain, "length {len}");
        }
    }
}
