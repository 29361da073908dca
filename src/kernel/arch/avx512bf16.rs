//! The tiled kernel for keys stored in bf16 on CPUs with AVX512_BF16: scores by
//! `vdpbf16ps`, which multiplies two bf16 pairs per f32 lane and adds both
//! products to the lane, so a tile of `S = Q·Kᵀ` takes half the instructions of
//! the f32 one. Softmax, the value products and the output stay f32 (the values
//! are widened once, when the head is packed).
//!
//! The products of two bf16 values are exact in f32, and each is added to the
//! f32 lane with one rounding: the scores are as accurate as the f32 kernel's,
//! summed in another order. Like every AVX512_BF16 instruction, `vdpbf16ps`
//! treats subnormal inputs (below 1.2·10⁻³⁸) as zero and flushes subnormal
//! results to zero, which moves a score by less than 10⁻³⁷.

use std::arch::x86_64::*;

use super::avx512::Avx512;
use super::{Dispatch, KernelArch, Op, Token};
use crate::kernel::float::{Fused, MulAdd};
use crate::kernel::pack::{Bf16Pair, PackPanel, PackedValues};
use crate::kernel::params::{BC, MR};
use crate::kernel::tiled::{KeyTiles, RowStates, Tiles, Weights, accumulate};

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

    /// [`Avx512`]'s: sixteen rows at a time, the weights written as f32 (what
    /// [`KeyTiles::block_values`] reads here too).
    #[inline(always)]
    fn block_softmax<M: MulAdd>(
        self,
        s: &mut [f32],
        width: usize,
        rows: usize,
        scale: Option<f32>,
        state: RowStates<'_, f32>,
    ) {
        Tiles::<f32, NR>::block_softmax::<M>(self.avx512, s, width, rows, scale, state)
    }
}

impl KeyTiles<f32, Bf16Pair, NR> for Avx512Bf16 {
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

    /// The values are widened to f32: the f32 tiles' product.
    #[inline(always)]
    fn block_values(
        self,
        weights: Weights<'_, f32>,
        values: &PackedValues<f32>,
        j0: usize,
        o: &mut [f32],
    ) {
        accumulate(self, weights, values, j0, o);
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
