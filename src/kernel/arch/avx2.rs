//! The micro-kernels written with AVX2/FMA intrinsics, as methods of a token that
//! only run-time detection constructs: a tile row is two 256-bit registers, and a
//! 12 × 16 (f32) or 12 × 8 (f64) tile is summed as two halves of 6 rows, 12
//! accumulators each (the tiles' body is `two_register_tiles!`, shared with the
//! AVX-512 kernels). Keys' panels and queries' tiles are transposed in
//! registers (`transpose8.rs`), and the softmax's `exp` is a table and a short
//! polynomial (`exp8.rs`).

use std::arch::x86_64::*;

use ndarray::ArrayView2;

use super::{exp8, transpose8};
use crate::kernel::direct::{Dots, HalfDots, Narrow, NarrowKind, Prefetch};
use crate::kernel::float::MulAdd;
use crate::kernel::params::{LANES, MR, TILE_BLOCKS};

/// Proof that the CPU has AVX2, FMA and F16C: [`detect`](Self::detect) is the only way
/// to make one, so the safe methods below may run their intrinsics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2 {
    _detected: (),
}

impl Avx2 {
    /// The token, if this CPU has AVX2, FMA and F16C (every AVX2 CPU of AMD's
    /// and Intel's has F16C).
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2 { _detected: () })
    }
}

/// Tile widths: two 256-bit registers per tile row, the AVX-512 tiles' shape, so
/// a 12-row tile sums as two halves of 6 rows in 12 accumulators of AVX2's 16
/// registers (the other four hold a key row and a broadcast query). The width
/// follows from the register count; no other was measured on an AVX2 host.
impl Avx2 {
    /// Columns of an f32 tile.
    pub(crate) const F32_TILE: usize = 16;
    /// Columns of an f64 tile.
    pub(crate) const F64_TILE: usize = 8;
}

trampoline!(Avx2, "avx2,fma,f16c");

/// [`Dots`] for one element type: `$regs` registers of `$half` lanes hold `LANES`.
macro_rules! avx2_dots {
    ($ty:ty, $regs:literal, $half:literal, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident, $add:ident, $sum4:ident, $exp:ident) => {
        impl Dots<$ty> for Avx2 {
            #[inline(always)]
            fn dot4(self, q: &[[$ty; LANES]], k: &[&[[$ty; LANES]]; 4]) -> [$ty; 4] {
                // SAFETY: `self` is an `Avx2` token, so the CPU has AVX2 and FMA;
                // every load reads, every store writes, one register's lanes of a
                // `[$ty; LANES]`.
                unsafe {
                    let mut acc = [[$zero(); $regs]; 4];
                    for (p, x) in q.iter().enumerate() {
                        for r in 0..$regs {
                            let x = $load(x.as_ptr().add(r * $half));
                            for u in 0..4 {
                                let y = $load(k[u][p].as_ptr().add(r * $half));
                                acc[u][r] = $fma(x, y, acc[u][r]);
                            }
                        }
                    }
                    // (loops, not closures: a closure does not inherit the
                    // caller's target features, and its intrinsics are calls)
                    let mut folded = [$zero(); 4];
                    for u in 0..4 {
                        for r in 0..$regs {
                            folded[u] = $add(folded[u], acc[u][r]);
                        }
                    }
                    $sum4(folded)
                }
            }

            #[inline(always)]
            fn value_rows(
                self,
                p: &[&[$ty]; 4],
                values: &[$ty],
                d_v: usize,
                c0: usize,
            ) -> [[$ty; LANES]; 4] {
                // SAFETY: as in `dot4`; each value load reads one register's lanes
                // of a `[$ty; LANES]` taken from `values` with bounds checks.
                unsafe {
                    let mut acc = [[$zero(); $regs]; 4];
                    for (j, value) in values.chunks_exact(d_v).enumerate() {
                        let v: &[$ty; LANES] = value[c0..c0 + LANES]
                            .try_into()
                            .expect("LANES value columns");
                        let mut loaded = [$zero(); $regs];
                        for r in 0..$regs {
                            loaded[r] = $load(v.as_ptr().add(r * $half));
                        }
                        let v = loaded;
                        for u in 0..4 {
                            let a = $splat(p[u][j]);
                            for r in 0..$regs {
                                acc[u][r] = $fma(a, v[r], acc[u][r]);
                            }
                        }
                    }
                    let mut out = [[0.0; LANES]; 4];
                    for u in 0..4 {
                        for r in 0..$regs {
                            $store(out[u].as_mut_ptr().add(r * $half), acc[u][r]);
                        }
                    }
                    out
                }
            }

            #[inline(always)]
            fn exp_and_sum<M: MulAdd>(self, row: &mut [$ty], shift: $ty) -> $ty {
                $exp(self, row, shift)
            }
        }
    };
}

two_register_tiles!(
    Avx2,
    "AVX2 and FMA",
    f32s,
    f32,
    Avx2::F32_TILE,
    8,
    6,
    __m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    pack_panel = pack_panel_f32,
    pack_query_tile = pack_query_tile_f32,
    exp_and_sum = exp_and_sum_f32
);
two_register_tiles!(
    Avx2,
    "AVX2 and FMA",
    f64s,
    f64,
    Avx2::F64_TILE,
    4,
    6,
    __m256d,
    _mm256_setzero_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_set1_pd,
    _mm256_fmadd_pd,
    exp_and_sum = exp_and_sum_f64
);
/// [`transpose8::pack_panel_f32`] under this token.
#[inline(always)]
fn pack_panel_f32(
    _: Avx2,
    src: &[f32],
    stride: usize,
    lines: usize,
    out: &mut [[f32; Avx2::F32_TILE]],
) {
    // SAFETY: `Avx2` exists, so the CPU has AVX2.
    unsafe { transpose8::pack_panel_f32(src, stride, lines, out) }
}

/// [`exp8::exp_and_sum_f32`] under this token.
#[inline(always)]
fn exp_and_sum_f32(_: Avx2, row: &mut [f32], shift: f32) -> f32 {
    // SAFETY: `Avx2` exists, so the CPU has AVX2 and FMA.
    unsafe { exp8::exp_and_sum_f32(row, shift) }
}

/// [`exp8::exp_and_sum_f64`] under this token.
#[inline(always)]
fn exp_and_sum_f64(_: Avx2, row: &mut [f64], shift: f64) -> f64 {
    // SAFETY: `Avx2` exists, so the CPU has AVX2 and FMA.
    unsafe { exp8::exp_and_sum_f64(row, shift) }
}

/// [`transpose8::pack_query_tile_f32`] under this token.
#[inline(always)]
fn pack_query_tile_f32(_: Avx2, rows: ArrayView2<'_, f32>, scale: f32, out: &mut [[f32; MR]]) {
    // SAFETY: `Avx2` exists, so the CPU has AVX2.
    unsafe { transpose8::pack_query_tile_f32(rows, scale, out) }
}

avx2_dots!(
    f32,
    1,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps,
    sum4_ps,
    exp_and_sum_f32
);
avx2_dots!(
    f64,
    2,
    4,
    _mm256_setzero_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_set1_pd,
    _mm256_fmadd_pd,
    _mm256_add_pd,
    sum4_pd,
    exp_and_sum_f64
);

/// The sums of the lanes of four registers: `[Σ a[0], Σ a[1], Σ a[2], Σ a[3]]`.
///
/// # Safety
///
/// The CPU must support AVX.
#[inline(always)]
pub(super) unsafe fn sum4_ps(a: [__m256; 4]) -> [f32; 4] {
    // SAFETY: the caller upholds this function's contract (its `# Safety`).
    unsafe {
        // pairs, then fours, within each 128-bit half; then the halves
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut out = [0.0; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    }
}

/// [`sum4_ps`] for f64.
///
/// # Safety
///
/// The CPU must support AVX.
#[inline(always)]
pub(super) unsafe fn sum4_pd(a: [__m256d; 4]) -> [f64; 4] {
    // SAFETY: the caller upholds this function's contract (its `# Safety`).
    unsafe {
        let (h01, h23) = (_mm256_hadd_pd(a[0], a[1]), _mm256_hadd_pd(a[2], a[3]));
        let low = _mm256_permute2f128_pd::<0x20>(h01, h23);
        let high = _mm256_permute2f128_pd::<0x31>(h01, h23);
        let mut out = [0.0; 4];
        _mm256_storeu_pd(out.as_mut_ptr(), _mm256_add_pd(low, high));
        out
    }
}

/// Eight narrow values at `src` widened to f32 in one register.
///
/// # Safety
///
/// The CPU must support AVX2 and F16C, and `src` must point to eight readable
/// values.
#[inline(always)]
pub(super) unsafe fn widen8<H: Narrow>(src: *const H) -> __m256 {
    // SAFETY: the caller upholds this function's contract (its `# Safety`).
    unsafe {
        match H::KIND {
            // bf16 is the upper half of an f32's bits
            NarrowKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(src.cast())),
            )),
            NarrowKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(src.cast())),
            // eight bytes, sign-extended
            NarrowKind::I8 => _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(src.cast()))),
        }
    }
}

impl HalfDots for Avx2 {
    #[inline(always)]
    fn dot4_half<H: Narrow>(self, q: &[[f32; LANES]], k: &[&[[H; LANES]]; 4]) -> [f32; 4] {
        // SAFETY: `self` is an `Avx2` token, so the CPU has AVX2, FMA and F16C;
        // every load reads eight values of a `[_; LANES]` (LANES = 8).
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (p, x) in q.iter().enumerate() {
                let x = _mm256_loadu_ps(x.as_ptr());
                for u in 0..4 {
                    acc[u] = _mm256_fmadd_ps(x, widen8(k[u][p].as_ptr()), acc[u]);
                }
            }
            sum4_ps(acc)
        }
    }

    #[inline(always)]
    fn value_row_half<H: Narrow>(
        self,
        p: &[f32],
        values: &[H],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; TILE_BLOCKS] {
        // SAFETY: as in `dot4_half`; each load reads eight values of a slice of
        // `TILE_BLOCKS · LANES` taken from `values` with bounds checks.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); TILE_BLOCKS];
            let prefetch = Prefetch::for_this_cpu();
            for (value, &p) in values.chunks_exact(d_v).zip(p) {
                let v = &value[c0..c0 + TILE_BLOCKS * LANES];
                prefetch.ahead(v.as_ptr(), v.len(), d_v);
                let a = _mm256_set1_ps(p);
                for (b, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(a, widen8(v.as_ptr().add(b * LANES)), *acc);
                }
            }
            let mut out = [[0.0; LANES]; TILE_BLOCKS];
            for (out, acc) in out.iter_mut().zip(&acc) {
                _mm256_storeu_ps(out.as_mut_ptr(), *acc);
            }
            out
        }
    }
}
