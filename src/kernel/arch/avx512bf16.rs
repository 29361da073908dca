//! The tiled kernel for keys and values stored in bf16 on CPUs with
//! AVX512_BF16: `S = Q·Kᵀ` and `P·V` by `vdpbf16ps`, which multiplies two bf16
//! pairs per f32 lane and adds both products to the lane, so a tile takes half
//! the instructions of the f32 one. The softmax and the output stay f32.
//!
//! The products of two bf16 values are exact in f32, and each is added to the
//! f32 lane with one rounding: the scores are as accurate as the f32 kernel's,
//! summed in another order. The softmax's weights are rounded to bf16 for
//! `P·V`, as on the AMX tiles (and in PyTorch's CPU kernels for bf16): each by
//! at most 2⁻⁹ of itself, so an output row moves by at most 2⁻⁸ of the largest
//! value, within one bf16 spacing of it (the row sums stay those of the f32
//! weights). Like every AVX512_BF16 instruction, `vdpbf16ps` treats subnormal
//! inputs (below 1.2·10⁻³⁸) as zero and flushes subnormal results to zero,
//! which moves a score by less than 10⁻³⁷. Rounding the weights and taking
//! `P·V` in pairs made a bf16 call at N = 512 (Zen 5, one thread) a third
//! faster: `P·V` 2 680 → 1 270 kcycles of a call of 5 670 → 3 860.

use std::arch::x86_64::*;

use half::bf16;
use ndarray::ArrayView2;

use super::avx512::Avx512;
use super::band::{BAND, softmax_bands};
use super::transpose::{QueryStep, pack_pair_panel, pack_query_tile};
use super::{Dispatch, KernelArch, Op, Token};
use crate::kernel::float::{Fused, MulAdd};
use crate::kernel::pack::{Bf16Pair, PackPanel, PackedValues};
use crate::kernel::params::{BC, MR};
use crate::kernel::tiled::{KeyTiles, RowStates, Tiles, ValueTiles, Weights, accumulate};

/// Tile width: two 512-bit registers of f32 scores, as the f32 AVX-512 tiles
/// (the direct path's micro-kernels are [`Avx512`]'s).
const NR: usize = Avx512::F32_TILE;

/// Proof that the CPU has AVX512_BF16 as well as everything [`Avx512`] proves:
/// [`detect`](Self::detect) is the only way to make one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512Bf16 {
    /// The f32 kernels that the bf16 dot products leave as they are (the value
    /// products).
    avx512: Avx512,
}

impl Avx512Bf16 {
    /// The token, if this CPU has AVX512_BF16 beside what `avx512` proves.
    pub(crate) fn detect(avx512: Avx512) -> Option<Self> {
        is_x86_feature_detected!("avx512bf16").then_some(Avx512Bf16 { avx512 })
    }

    /// The AVX-512 token this one extends.
    pub(crate) fn avx512(self) -> Avx512 {
        self.avx512
    }
}

impl PackPanel<f32, NR> for Avx512Bf16 {
    #[inline(always)]
    fn pack_panel(self, src: &[f32], stride: usize, lines: usize, out: &mut [[f32; NR]]) {
        self.avx512.pack_panel(src, stride, lines, out)
    }
}

impl Tiles<f32, NR> for Avx512Bf16 {
    #[inline(always)]
    fn score_tile(self, q: &[[f32; MR]], k: &[[f32; NR]], rows: usize) -> [[f32; NR]; MR] {
        self.avx512.score_tile(q, k, rows)
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
        self.avx512
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
        self.avx512.value_tile(p, v, alpha, o)
    }

    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [f32], shift: f32) -> f32 {
        Tiles::<f32, NR>::exp_and_sum::<M>(self.avx512, row, shift)
    }

    /// The queries are rounded to bf16 without the scale: the bands take it.
    const SCALE_IN_SOFTMAX: bool = true;

    /// Sixteen rows at a time ([`softmax_bands`]), every band of the block's
    /// rows (a band past them computes rows no output reads), the weights
    /// rounded to bf16 as on the AMX tiles: the operand of
    /// [`KeyTiles::block_values`]. The scale is taken in the argument of their
    /// `exp` (a pass of its own over the scores took 7 % of a call, N = 512,
    /// Zen 5).
    #[inline(always)]
    fn block_softmax<M: MulAdd>(
        self,
        s: &mut [f32],
        width: usize,
        rows: usize,
        scale: Option<f32>,
        state: RowStates<'_, f32>,
    ) {
        let mut state = state;
        // SAFETY: `self` proves AVX-512 F and AVX512_BF16; a scale given here
        // is positive (`SCALE_IN_SOFTMAX`).
        unsafe {
            softmax_bands::<true>(
                s,
                width,
                rows.div_ceil(BAND),
                scale.unwrap_or(1.0),
                &mut state,
            )
        };
    }
}

impl KeyTiles<f32, Bf16Pair, NR> for Avx512Bf16 {
    /// Sixteen keys by sixteen pairs at a time, transposed in registers
    /// ([`pack_pair_panel`]), where one pair at a time the keys took a
    /// fifteenth of a bf16 call at N = 128.
    #[inline(always)]
    fn pack_pair_panel(self, keys: &[bf16], d: usize, lines: usize, out: &mut [[Bf16Pair; NR]]) {
        // SAFETY: `self` is the token: AVX-512 F.
        unsafe { pack_pair_panel(keys, d, lines, out) }
    }

    /// Each step of the sum is a pair of components: one `vdpbf16ps` per tile
    /// register, the query's pair broadcast to every lane.
    #[inline(always)]
    fn key_tile(self, q: &[[Bf16Pair; MR]], k: &[[Bf16Pair; NR]]) -> [[f32; NR]; MR] {
        // SAFETY: `self` is the token, so the CPU has AVX-512 F and AVX512_BF16;
        // each load reads sixteen of the `NR` pairs of one step of `k`, each store
        // writes sixteen of the `NR` floats of one row of `out`. `__m512i` and
        // `__m512bh` are both 64 bytes of lanes, so the transmutes only rename.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for (qp, kp) in q.iter().zip(k) {
                let k0: __m512bh = std::mem::transmute(_mm512_loadu_si512(kp.as_ptr().cast()));
                let k1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(kp.as_ptr().add(16).cast()));
                for i in 0..MR {
                    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(qp[i].0 as i32));
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, k0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, k1);
                }
            }
            let mut out = [[0.0; NR]; MR];
            for i in 0..MR {
                _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i][0]);
                _mm512_storeu_ps(out[i].as_mut_ptr().add(16), acc[i][1]);
            }
            out
        }
    }

    /// Sixteen pairs of each row at a time, the tile's rows transposed in
    /// registers, where one pair at a time the packing took a tenth of a call
    /// at N = 512 (Zen 5).
    #[inline(always)]
    fn pack_query_tile(self, rows: ArrayView2<'_, bf16>, scale: f32, out: &mut [[Bf16Pair; MR]]) {
        // SAFETY: `self` is the token: AVX-512 F.
        unsafe { pack_query_tile(rows, scale, out) }
    }

    /// `O = α·O + P·V` by `vdpbf16ps` ([`ValueTiles`]): the weights are bf16
    /// (the bands'), the values pairs of keys, so each instruction adds two
    /// keys' products to a lane, half the f32 tiles' instructions.
    #[inline(always)]
    fn block_values(
        self,
        weights: Weights<'_, f32>,
        values: &PackedValues<Bf16Pair>,
        j0: usize,
        o: &mut [f32],
    ) {
        accumulate(self, weights, values, j0, o);
    }
}

impl QueryStep for Bf16Pair {
    const COMPONENTS: usize = 2;

    /// Sixteen pairs as they are stored, one a lane; the queries carry no
    /// scale (it would be rounded).
    #[inline(always)]
    unsafe fn load16(at: *const bf16, _: __m512) -> __m512 {
        // SAFETY: the caller upholds the contract: 64 bytes from `at`.
        unsafe { _mm512_loadu_ps(at.cast()) }
    }
}

impl ValueTiles<f32, Bf16Pair, NR> for Avx512Bf16 {
    const KEYS: usize = 2;

    /// `w` holds `MR` rows of bf16 weights from each row's first byte (pair
    /// `r` of a row is its weights `2r`, `2r + 1`), `v` one step of `NR` pairs
    /// of values per pair of keys; the block's product summed on its own,
    /// then added to the rescaled total.
    #[inline(always)]
    fn values_tile(
        self,
        w: &[&[f32; BC]; MR],
        v: &[[Bf16Pair; NR]],
        alpha: &[f32; MR],
        o: &mut [[f32; NR]; MR],
    ) {
        assert!(v.len() <= BC, "a block's keys fit a row of weights");
        // the rows' first bytes as pairs of bf16: `f32` and `u32` have one size
        // and alignment
        let pairs: [&[u32; BC]; MR] = w.map(|row| {
            // SAFETY: a row of `BC` f32 is `BC` u32 of the same bytes.
            unsafe { &*row.as_ptr().cast::<[u32; BC]>() }
        });
        // SAFETY: `self` proves AVX-512 F and AVX512_BF16; each load reads 16
        // of the `NR` pairs of one step of `v`, each load and store of `o` 16
        // of the `NR` floats of one row; `__m512i` and `__m512bh` are both 64
        // bytes.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for (r, step) in v.iter().enumerate() {
                let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(step.as_ptr().cast()));
                let v1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(step.as_ptr().add(16).cast()));
                for i in 0..MR {
                    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pairs[i][r] as i32));
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, v0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, v1);
                }
            }
            for i in 0..MR {
                let a = _mm512_set1_ps(alpha[i]);
                let row = o[i].as_mut_ptr();
                _mm512_storeu_ps(row, _mm512_fmadd_ps(_mm512_loadu_ps(row), a, acc[i][0]));
                let high = row.add(16);
                _mm512_storeu_ps(high, _mm512_fmadd_ps(_mm512_loadu_ps(high), a, acc[i][1]));
            }
        }
    }
}

inner_dots!(Avx512Bf16, avx512);

impl Token<f32, NR> for Avx512Bf16 {
    type MulAdd = Fused;
}

trampoline!(
    Avx512Bf16,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
);

impl Dispatch<f32, Bf16Pair> for Avx512Bf16 {
    fn kind(self) -> KernelArch {
        KernelArch::Avx512Bf16
    }

    #[inline]
    fn dispatch<O: Op<f32, Bf16Pair>>(self, op: O) -> O::Output {
        self.vectorize::<f32, Bf16Pair, O, NR>(op)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::s;

    use super::*;
    use crate::kernel::pack::Entry;
    use crate::kernel::tiled::scatter_queries;

    /// Whole tiles (with and without pairs past the last sixteen, an odd
    /// width), a short tile and rows that are not contiguous (scattered): the
    /// pairs `scatter_queries` makes one by one, zero in the lanes past the
    /// rows.
    #[test]
    fn the_transposed_pair_tile_is_the_scattered_one() {
        let Some(token) = Avx512::detect().and_then(Avx512Bf16::detect) else {
            return; // nothing to compare on this CPU
        };
        for (rows, d, strided) in [
            (MR, 64, false),
            (MR, 70, false),
            (MR, 33, false),
            (MR, 7, false),
            (5, 64, false),
            (5, 35, false),
            (MR, 64, true),
        ] {
            // every pair different, subnormals among them
            let x = ndarray::Array2::from_shape_fn((rows, 2 * d), |(i, p)| {
                let x = (i * 1000 + p) as f32 * 0.312_7 - 7.0;
                half::bf16::from_f32(if p % 5 == 0 { x * 1e-39 } else { x })
            });
            let view = if strided {
                x.slice(s![.., ..;2])
            } else {
                x.slice(s![.., ..d])
            };
            let depth = Bf16Pair::depth(d);
            let mut fast = vec![[Bf16Pair(u32::MAX); MR]; depth];
            let mut scalar = vec![[Bf16Pair(7); MR]; depth];
            KeyTiles::<f32, Bf16Pair, NR>::pack_query_tile(token, view, 0.125, &mut fast);
            scatter_queries(view, 0.125, &mut scalar);
            assert_eq!(fast, scalar, "{rows} rows, d = {d}, strided {strided}");
            let first = view[(rows - 1, 0)].to_bits();
            assert_eq!(fast[0][rows - 1].0 & 0xffff, u32::from(first));
            assert!(
                fast.iter()
                    .all(|step| step[rows..].iter().all(|p| p.0 == 0))
            );
        }
    }
}
