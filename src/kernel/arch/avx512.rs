//! The micro-kernels written with AVX-512 intrinsics, as methods of a token that
//! only run-time detection constructs: a tile row is two 512-bit registers, so a
//! 12 × 32 (f32) or 12 × 16 (f64) tile is 24 accumulators of the 32 registers, in
//! one pass (AVX2 needs two for half the columns); each query's broadcast is
//! folded into its FMA (`{1to16}`). Half-precision rows are widened sixteen
//! values at a time.

use std::arch::x86_64::*;

use super::avx2::{Avx2, sum4_pd, sum4_ps, widen8};
use super::band::{BAND, softmax_bands};
use super::{exp, transpose};
use crate::kernel::direct::{Dots, HalfDots, Narrow, NarrowKind, Prefetch, scores_i8, values_i8};
use crate::kernel::float::MulAdd;
use crate::kernel::params::{LANES, TILE_BLOCKS};
use crate::kernel::tiled::{RowStates, softmax_rows};

/// Proof that the CPU has AVX-512 F, BW, VL and DQ as well as AVX2, FMA and F16C:
/// [`detect`](Self::detect) is the only way to make one, so the safe methods
/// below may run their intrinsics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512 {
    /// Every AVX-512 CPU has AVX2, FMA and F16C: the kernels this token does not
    /// widen run on those.
    avx2: Avx2,
}

impl Avx512 {
    /// The token, if this CPU has AVX-512 F, BW, VL and DQ, AVX2, FMA and F16C.
    pub(crate) fn detect() -> Option<Self> {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        let avx2 = Avx2::detect()?;
        avx512.then_some(Avx512 { avx2 })
    }

    /// The AVX2 token this one extends.
    pub(crate) fn avx2(self) -> Avx2 {
        self.avx2
    }
}

/// Tile widths: two 512-bit registers per tile row, so a 12-row tile is 24
/// accumulators of AVX-512's 32 registers, in one pass. Chosen on Zen 4
/// (2026-11-25, `benches/log/2026-11-25-zen4-avx512-kernels.md`): f32 prefill
/// at N = 2048 ran 94 GFLOP/s with these tiles, 89 with AVX2's 16 columns and
/// 83 with four registers per row (64 columns); f64 46 against AVX2's 29.
impl Avx512 {
    /// Columns of an f32 tile.
    pub(crate) const F32_TILE: usize = 32;
    /// Columns of an f64 tile.
    pub(crate) const F64_TILE: usize = 16;
}

trampoline!(Avx512, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");

two_register_tiles!(
    Avx512,
    "AVX-512 F",
    f32s,
    f32,
    Avx512::F32_TILE,
    16,
    12,
    __m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    pack_panel = pack_panel_f32,
    pack_query_tile = pack_query_tile_f32,
    exp_and_sum = exp_and_sum_f32,
    block_softmax = block_softmax_f32
);
two_register_tiles!(
    Avx512,
    "AVX-512 F",
    f64s,
    f64,
    Avx512::F64_TILE,
    8,
    12,
    __m512d,
    _mm512_setzero_pd,
    _mm512_loadu_pd,
    _mm512_storeu_pd,
    _mm512_set1_pd,
    _mm512_fmadd_pd,
    exp_and_sum = exp_and_sum_f64
);

/// [`transpose::pack_panel_f32`] under this token.
#[inline(always)]
fn pack_panel_f32(_: Avx512, src: &[f32], stride: usize, lines: usize, out: &mut [[f32; 32]]) {
    // SAFETY: `Avx512` exists, so the CPU has AVX-512 F.
    unsafe { transpose::pack_panel_f32(src, stride, lines, out) }
}

/// [`exp::exp_and_sum_f32`] under this token.
#[inline(always)]
fn exp_and_sum_f32(_: Avx512, row: &mut [f32], shift: f32) -> f32 {
    // SAFETY: `Avx512` exists, so the CPU has AVX-512 F.
    unsafe { exp::exp_and_sum_f32(row, shift) }
}

/// The online softmax's step for a block of f32 scores sixteen rows at a time
/// ([`softmax_band`]: the sixteen rows' maxima, sums and factors `α` reduced
/// together, where row by row each pays two reductions across a register and
/// a scalar `exp`), the rows past the last whole sixteen, and a block whose
/// scores still need their scale, row by row. The weights are `exp_and_sum`'s
/// bits; their sums are added in another order.
#[inline(always)]
fn block_softmax_f32<M: MulAdd>(
    token: Avx512,
    s: &mut [f32],
    width: usize,
    rows: usize,
    scale: Option<f32>,
    state: RowStates<'_, f32>,
) {
    let bands = if scale.is_none() { rows / BAND } else { 0 };
    let mut state = state;
    // SAFETY: `Avx512` exists, so the CPU has AVX-512 F; the scale is 1.
    unsafe { softmax_bands::<false>(s, width, bands, 1.0, &mut state) };
    softmax_rows::<f32, M, Avx512, { Avx512::F32_TILE }>(
        token,
        s,
        width,
        bands * BAND..rows,
        scale,
        state,
    );
}

/// [`exp::exp_and_sum_f64`] under this token.
#[inline(always)]
fn exp_and_sum_f64(_: Avx512, row: &mut [f64], shift: f64) -> f64 {
    // SAFETY: `Avx512` exists, so the CPU has AVX-512 F.
    unsafe { exp::exp_and_sum_f64(row, shift) }
}

/// [`transpose::pack_query_tile`] under this token.
#[inline(always)]
fn pack_query_tile_f32(
    _: Avx512,
    rows: ndarray::ArrayView2<'_, f32>,
    scale: f32,
    out: &mut [[f32; crate::kernel::params::MR]],
) {
    // SAFETY: `Avx512` exists, so the CPU has AVX-512 F.
    unsafe { transpose::pack_query_tile(rows, scale, out) }
}

impl Dots<f32> for Avx512 {
    /// Two blocks of [`LANES`] in one register, folded to one block at the end.
    #[inline(always)]
    fn dot4(self, q: &[[f32; LANES]], k: &[&[[f32; LANES]]; 4]) -> [f32; 4] {
        // SAFETY: `self` is an `Avx512` token, so the CPU has AVX-512 F, BW and
        // DQ and AVX2/FMA/F16C.
        unsafe { dot4_pairs(q, k) }
    }

    #[inline(always)]
    fn value_rows(
        self,
        p: &[&[f32]; 4],
        values: &[f32],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; 4] {
        self.avx2.value_rows(p, values, d_v, c0)
    }

    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [f32], shift: f32) -> f32 {
        exp_and_sum_f32(self, row, shift)
    }
}

impl Dots<f64> for Avx512 {
    /// One block of [`LANES`] per register (the AVX2 kernel needs two).
    #[inline(always)]
    fn dot4(self, q: &[[f64; LANES]], k: &[&[[f64; LANES]]; 4]) -> [f64; 4] {
        // SAFETY: `self` is an `Avx512` token, so the CPU has AVX-512 F; every
        // load reads, every store writes, one `[f64; LANES]`.
        unsafe {
            let mut acc = [_mm512_setzero_pd(); 4];
            for (p, x) in q.iter().enumerate() {
                let x = _mm512_loadu_pd(x.as_ptr());
                for u in 0..4 {
                    acc[u] = _mm512_fmadd_pd(x, _mm512_loadu_pd(k[u][p].as_ptr()), acc[u]);
                }
            }
            let mut sums = [_mm256_setzero_pd(); 4];
            for u in 0..4 {
                let x = acc[u];
                sums[u] = _mm256_add_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd::<1>(x));
            }
            sum4_pd(sums)
        }
    }

    #[inline(always)]
    fn value_rows(
        self,
        p: &[&[f64]; 4],
        values: &[f64],
        d_v: usize,
        c0: usize,
    ) -> [[f64; LANES]; 4] {
        // SAFETY: as in `dot4`; each value load reads one `[f64; LANES]` taken from
        // `values` with bounds checks.
        unsafe {
            let mut acc = [_mm512_setzero_pd(); 4];
            for (j, value) in values.chunks_exact(d_v).enumerate() {
                let v: &[f64; LANES] = value[c0..c0 + LANES]
                    .try_into()
                    .expect("LANES value columns");
                let v = _mm512_loadu_pd(v.as_ptr());
                for u in 0..4 {
                    acc[u] = _mm512_fmadd_pd(_mm512_set1_pd(p[u][j]), v, acc[u]);
                }
            }
            let mut out = [[0.0; LANES]; 4];
            for u in 0..4 {
                _mm512_storeu_pd(out[u].as_mut_ptr(), acc[u]);
            }
            out
        }
    }

    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [f64], shift: f64) -> f64 {
        exp_and_sum_f64(self, row, shift)
    }
}

/// The two 8-lane halves of `x` added lane by lane.
///
/// # Safety
///
/// The CPU must support AVX-512 F and DQ.
#[inline(always)]
unsafe fn fold_halves(x: __m512) -> __m256 {
    // SAFETY: the caller upholds this function's contract (its `# Safety`).
    unsafe { _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps::<1>(x)) }
}

/// An element the direct path's dot products load, as f32: sixteen values into a
/// 512-bit register, or eight into a 256-bit one.
trait Widens: Copy {
    /// # Safety
    ///
    /// The CPU must support AVX-512 F and BW and F16C, and `src` must point to
    /// sixteen readable values.
    unsafe fn load16(src: *const Self) -> __m512;

    /// # Safety
    ///
    /// The CPU must support AVX2 and F16C, and `src` must point to eight
    /// readable values.
    unsafe fn load8(src: *const Self) -> __m256;
}

impl Widens for f32 {
    #[inline(always)]
    unsafe fn load16(src: *const f32) -> __m512 {
        // SAFETY: the caller upholds this function's contract (its `# Safety`).
        unsafe { _mm512_loadu_ps(src) }
    }

    #[inline(always)]
    unsafe fn load8(src: *const f32) -> __m256 {
        // SAFETY: the caller upholds this function's contract (its `# Safety`).
        unsafe { _mm256_loadu_ps(src) }
    }
}

impl<H: Narrow> Widens for H {
    #[inline(always)]
    unsafe fn load16(src: *const H) -> __m512 {
        // SAFETY: the caller upholds this function's contract (its `# Safety`).
        unsafe { widen16(src) }
    }

    #[inline(always)]
    unsafe fn load8(src: *const H) -> __m256 {
        // SAFETY: the caller upholds this function's contract (its `# Safety`).
        unsafe { widen8(src) }
    }
}

/// `Σₚ q[p] · k[u][p]` for four keys, two blocks of [`LANES`] per 512-bit
/// register, the halves folded and the lanes summed at the end: the same order
/// for f32 keys and for half-precision keys widened as they are loaded, so both
/// give the same bits.
///
/// # Safety
///
/// The CPU must support AVX-512 F, BW and DQ, AVX2, FMA and F16C. Every `k[u]`
/// is as long as `q`: each 512-bit load reads blocks `2p` and `2p + 1` of a
/// slice with at least `2p + 2` blocks, each 256-bit load the last block.
#[inline(always)]
unsafe fn dot4_pairs<E: Widens>(q: &[[f32; LANES]], k: &[&[[E; LANES]]; 4]) -> [f32; 4] {
    // SAFETY: the caller upholds this function's contract (its `# Safety`).
    unsafe {
        debug_assert!(
            k.iter().all(|k| k.len() >= q.len()),
            "dot4_pairs: every key holds at least the query's {} blocks",
            q.len()
        );
        let mut acc = [_mm512_setzero_ps(); 4];
        let pairs = q.len() / 2;
        for p in 0..pairs {
            let x = _mm512_loadu_ps(q.as_ptr().add(2 * p).cast());
            for u in 0..4 {
                let y = E::load16(k[u].as_ptr().add(2 * p).cast::<E>());
                acc[u] = _mm512_fmadd_ps(x, y, acc[u]);
            }
        }
        // (loops, not closures: a closure does not inherit the caller's target
        // features, and its intrinsics would be calls)
        let mut sums = [_mm256_setzero_ps(); 4];
        for u in 0..4 {
            sums[u] = fold_halves(acc[u]);
            if q.len() % 2 == 1 {
                let last = q.len() - 1;
                let x = _mm256_loadu_ps(q[last].as_ptr());
                sums[u] = _mm256_fmadd_ps(x, E::load8(k[u][last].as_ptr()), sums[u]);
            }
        }
        sum4_ps(sums)
    }
}

/// Sixteen narrow values at `src` widened to f32 in one register.
///
/// # Safety
///
/// The CPU must support AVX-512 F and BW, and `src` must point to sixteen
/// readable values.
#[inline(always)]
unsafe fn widen16<H: Narrow>(src: *const H) -> __m512 {
    // SAFETY: the caller upholds this function's contract (its `# Safety`).
    unsafe {
        match H::KIND {
            // bf16 is the upper half of an f32's bits
            NarrowKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(src.cast())),
            )),
            NarrowKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(src.cast())),
            // sixteen bytes, sign-extended
            NarrowKind::I8 => _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src.cast()))),
        }
    }
}

/// Rows are widened sixteen values at a time, except the f16 value rows: those go
/// through the AVX2 kernel, eight at a time (the same sums in the same order): on
/// Zen 4 the 512-bit `vcvtph2ps` there made an f16 decoding step slower.
///
/// The dot products sum in the order of [`Dots::dot4`] for f32 (pairs of blocks,
/// then the halves), so that half-precision keys give the bits their f32
/// widening gives.
impl HalfDots for Avx512 {
    /// By `vpdpwssd` where the CPU has AVX512_VNNI.
    #[inline(always)]
    fn scores_i8(self, q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
        if d.is_multiple_of(32) && super::vnni::detect() {
            // SAFETY: the token proves AVX-512 F and BW, `detect` VNNI; the
            // slices are whole rows, as `scores_i8` takes them
            unsafe { super::vnni::scores(q, keys, d, out) }
        } else {
            scores_i8(q, keys, d, out);
        }
    }

    /// By `vpdpwssd` where the CPU has AVX512_VNNI.
    #[inline(always)]
    fn values_i8(self, w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
        if d_v.is_multiple_of(32) && super::vnni::detect() {
            // SAFETY: as in `scores_i8`
            unsafe { super::vnni::values(w, values, d_v, out) }
        } else {
            values_i8(w, values, d_v, out);
        }
    }

    /// Two blocks of [`LANES`] per register, folded to one block at the end.
    #[inline(always)]
    fn dot4_half<H: Narrow>(self, q: &[[f32; LANES]], k: &[&[[H; LANES]]; 4]) -> [f32; 4] {
        // SAFETY: as in `dot4`.
        unsafe { dot4_pairs(q, k) }
    }

    #[inline(always)]
    fn value_row_half<H: Narrow>(
        self,
        p: &[f32],
        values: &[H],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; TILE_BLOCKS] {
        if H::KIND == NarrowKind::F16 {
            return self.avx2.value_row_half(p, values, d_v, c0);
        }
        const REGS: usize = TILE_BLOCKS * LANES / 16;
        const { assert!((TILE_BLOCKS * LANES).is_multiple_of(16)) };
        // SAFETY: as in `dot4_half`; each widening reads sixteen values of a slice
        // of `TILE_BLOCKS · LANES` taken from `values` with bounds checks, each
        // store writes sixteen of the `TILE_BLOCKS · LANES` floats of `out`.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); REGS];
            let prefetch = Prefetch::for_this_cpu();
            for (value, &p) in values.chunks_exact(d_v).zip(p) {
                let v = &value[c0..c0 + TILE_BLOCKS * LANES];
                prefetch.ahead(v.as_ptr(), v.len(), d_v);
                let a = _mm512_set1_ps(p);
                for (b, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(a, widen16(v.as_ptr().add(b * 16)), *acc);
                }
            }
            let mut out = [[0.0; LANES]; TILE_BLOCKS];
            let flat = out.as_flattened_mut();
            for (b, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(flat.as_mut_ptr().add(b * 16), *acc);
            }
            out
        }
    }
}
