//! Picks the instruction set at run time: the tiled kernel compiled with AVX2 and
//! FMA where the CPU has them, the portable build of the same code elsewhere.

use ndarray::ArrayViewMut2;

use std::ops::Range;

use super::direct::{self, Group, Partial, PortableDots};
use super::float::{KernelFloat, Separate};
use super::tiled::{self, Block, Portable, Scratch};

/// An element type with a compiled tiled kernel (public only to bound
/// [`crate::Element`]; the module is private).
pub trait Dispatch: KernelFloat {
    /// Columns of a register tile on this CPU (keys in `S`, value columns in `O`).
    fn tile_width() -> usize;
    /// [`tiled::attend_block`] with the best instruction set this CPU has.
    fn attend_block(
        block: &Block<'_, Self>,
        scratch: &mut Scratch<Self>,
        out: ArrayViewMut2<'_, Self>,
    );
    /// [`direct::attend_part`] with the best instruction set this CPU has.
    fn attend_part(group: &Group<'_, '_, Self>, part: Range<usize>) -> Partial<Self>;
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

/// `Dispatch` for one element type: its AVX2 entry point and tile widths.
macro_rules! dispatch {
    ($ty:ty, $avx2:ident, $avx2_group:ident, $avx2_width:literal, $portable_width:literal) => {
        impl Dispatch for $ty {
            fn tile_width() -> usize {
                if has_avx2_fma() {
                    $avx2_width
                } else {
                    $portable_width
                }
            }

            fn attend_block(
                block: &Block<'_, $ty>,
                scratch: &mut Scratch<$ty>,
                out: ArrayViewMut2<'_, $ty>,
            ) {
                #[cfg(target_arch = "x86_64")]
                if has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    unsafe { avx2::$avx2(block, scratch, out) };
                    return;
                }
                tiled::attend_block::<$ty, Separate, Portable<Separate>, $portable_width>(
                    block, scratch, out,
                );
            }

            fn attend_part(group: &Group<'_, '_, $ty>, part: Range<usize>) -> Partial<$ty> {
                #[cfg(target_arch = "x86_64")]
                if has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2::$avx2_group(group, part) };
                }
                direct::attend_part::<$ty, Separate, PortableDots<Separate>>(group, part)
            }
        }
    };
}

dispatch!(f32, attend_block_f32, attend_part_f32, 16, 8);
dispatch!(f64, attend_block_f64, attend_part_f64, 8, 4);

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use ndarray::ArrayViewMut2;

    use std::ops::Range;

    use super::super::direct::{attend_part, Dots, Group, Partial, LANES};
    use super::super::float::Fused;
    use super::super::tiled::{attend_block, Block, Scratch, Tiles, BC, MR};

    /// The tiled kernel for `f32`, 16-wide tiles, compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_block_f32(
        block: &Block<'_, f32>,
        scratch: &mut Scratch<f32>,
        out: ArrayViewMut2<'_, f32>,
    ) {
        attend_block::<f32, Fused, Avx2, 16>(block, scratch, out);
    }

    /// The tiled kernel for `f64`, 8-wide tiles, compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_block_f64(
        block: &Block<'_, f64>,
        scratch: &mut Scratch<f64>,
        out: ArrayViewMut2<'_, f64>,
    ) {
        attend_block::<f64, Fused, Avx2, 8>(block, scratch, out);
    }

    /// The direct path for `f32`, compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_part_f32(
        group: &Group<'_, '_, f32>,
        part: Range<usize>,
    ) -> Partial<f32> {
        attend_part::<f32, Fused, Avx2>(group, part)
    }

    /// The direct path for `f64`, compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_part_f64(
        group: &Group<'_, '_, f64>,
        part: Range<usize>,
    ) -> Partial<f64> {
        attend_part::<f64, Fused, Avx2>(group, part)
    }

    /// Micro-kernels written with AVX2/FMA intrinsics: a tile row is two 256-bit
    /// registers, so a 6 × 16 (f32) or 6 × 8 (f64) tile is 12 accumulators.
    ///
    /// Private to this module: its methods are only reached through the two
    /// `#[target_feature]` functions above, so AVX2 and FMA are available.
    struct Avx2;

    /// One micro-kernel body for both element types: `$ty` is the element,
    /// `$nr` the tile width, `$half` the lanes of one register.
    macro_rules! avx2_tiles {
        ($ty:ty, $nr:literal, $half:literal, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
            impl Tiles<$ty, $nr> for Avx2 {
                #[inline(always)]
                fn score_tile(q: &[[$ty; MR]], k: &[[$ty; $nr]]) -> [[$ty; $nr]; MR] {
                    // SAFETY: AVX2 and FMA are enabled (see `Avx2`); every load
                    // reads, every store writes, one half of a `[$ty; $nr]`.
                    unsafe {
                        let mut acc = [[$zero(); 2]; MR];
                        // two steps of the sum per trip: half the loop overhead
                        let (q2, q_rest) = q.as_chunks::<2>();
                        let (k2, k_rest) = k.as_chunks::<2>();
                        for (qp, kp) in q2.iter().zip(k2) {
                            for u in 0..2 {
                                let k0 = $load(kp[u].as_ptr());
                                let k1 = $load(kp[u].as_ptr().add($half));
                                for i in 0..MR {
                                    let a = $splat(qp[u][i]);
                                    acc[i][0] = $fma(a, k0, acc[i][0]);
                                    acc[i][1] = $fma(a, k1, acc[i][1]);
                                }
                            }
                        }
                        for (qp, kp) in q_rest.iter().zip(k_rest) {
                            let k0 = $load(kp.as_ptr());
                            let k1 = $load(kp.as_ptr().add($half));
                            for i in 0..MR {
                                let a = $splat(qp[i]);
                                acc[i][0] = $fma(a, k0, acc[i][0]);
                                acc[i][1] = $fma(a, k1, acc[i][1]);
                            }
                        }
                        let mut out = [[0.0; $nr]; MR];
                        for i in 0..MR {
                            $store(out[i].as_mut_ptr(), acc[i][0]);
                            $store(out[i].as_mut_ptr().add($half), acc[i][1]);
                        }
                        out
                    }
                }

                #[inline(always)]
                fn value_tile(
                    p: &[&[$ty; BC]; MR],
                    v: &[[$ty; $nr]; BC],
                    keys: usize,
                    alpha: &[$ty; MR],
                    o: &mut [[$ty; $nr]; MR],
                ) {
                    // SAFETY: as in `score_tile`.
                    unsafe {
                        let mut acc = [[$zero(); 2]; MR];
                        let keys = keys.min(BC);
                        // two keys per trip: half the loop overhead
                        for pair in 0..keys / 2 {
                            for j in [2 * pair, 2 * pair + 1] {
                                let v0 = $load(v[j].as_ptr());
                                let v1 = $load(v[j].as_ptr().add($half));
                                for i in 0..MR {
                                    let a = $splat(p[i][j]);
                                    acc[i][0] = $fma(a, v0, acc[i][0]);
                                    acc[i][1] = $fma(a, v1, acc[i][1]);
                                }
                            }
                        }
                        if keys % 2 == 1 {
                            let j = keys - 1;
                            let v0 = $load(v[j].as_ptr());
                            let v1 = $load(v[j].as_ptr().add($half));
                            for i in 0..MR {
                                let a = $splat(p[i][j]);
                                acc[i][0] = $fma(a, v0, acc[i][0]);
                                acc[i][1] = $fma(a, v1, acc[i][1]);
                            }
                        }
                        for i in 0..MR {
                            let a = $splat(alpha[i]);
                            let row = o[i].as_mut_ptr();
                            $store(row, $fma($load(row), a, acc[i][0]));
                            $store(row.add($half), $fma($load(row.add($half)), a, acc[i][1]));
                        }
                    }
                }
            }
        };
    }

    /// [`Dots`] for one element type: `$regs` registers of `$half` lanes hold `LANES`.
    macro_rules! avx2_dots {
        ($ty:ty, $regs:literal, $half:literal, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
            impl Dots<$ty> for Avx2 {
                #[inline(always)]
                fn dot4(q: &[[$ty; LANES]], k: &[&[[$ty; LANES]]; 4]) -> [[$ty; LANES]; 4] {
                    // SAFETY: AVX2 and FMA are enabled (see `Avx2`); every load reads,
                    // every store writes, one register's lanes of a `[$ty; LANES]`.
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
                fn value_rows(
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
                            let v: [_; $regs] =
                                std::array::from_fn(|r| $load(v.as_ptr().add(r * $half)));
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
            }
        };
    }

    /// Both kernels' intrinsics for one element type: `$nr` columns per tile row,
    /// `$half` lanes per register, `$regs` registers per `LANES`.
    macro_rules! avx2_kernels {
        ($ty:ty, $nr:literal, $half:literal, $regs:literal, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
            avx2_tiles!($ty, $nr, $half, $zero, $load, $store, $splat, $fma);
            avx2_dots!($ty, $regs, $half, $zero, $load, $store, $splat, $fma);
        };
    }

    avx2_kernels!(
        f32,
        16,
        8,
        1,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );
    avx2_kernels!(
        f64,
        8,
        4,
        2,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd
    );
}
