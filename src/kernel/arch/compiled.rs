//! The macros the x86-64 tokens share: the kernel bodies compiled for a token,
//! and the register tiles.

/// [`Compiled`] for a token whose instruction sets are `$features`: each body is
/// compiled inside a `#[target_feature]` function so that it inlines the token's
/// intrinsic micro-kernels, and called only through the token, which proves the
/// CPU has those instruction sets.
macro_rules! compiled {
    ($token:ty, $features:literal, $ty:ty, $nr:literal) => {
        impl $crate::kernel::arch::Compiled<$ty> for $token {
            const TILE_WIDTH: usize = $nr;

            fn attend_block(
                self,
                block: &$crate::kernel::tiled::Block<'_, $ty>,
                scratch: &mut $crate::kernel::tiled::Scratch<$ty>,
                out: ndarray::ArrayViewMut2<'_, $ty>,
            ) {
                /// # Safety
                ///
                #[doc = concat!("The CPU must support ", $features, ".")]
                #[target_feature(enable = $features)]
                unsafe fn compiled(
                    token: $token,
                    block: &$crate::kernel::tiled::Block<'_, $ty>,
                    scratch: &mut $crate::kernel::tiled::Scratch<$ty>,
                    out: ndarray::ArrayViewMut2<'_, $ty>,
                ) {
                    $crate::kernel::tiled::attend_block::<
                        $ty,
                        $crate::kernel::float::Fused,
                        $token,
                        $ty,
                        $nr,
                    >(token, block, scratch, out);
                }
                // SAFETY: `self` exists, so the CPU has the instruction sets.
                unsafe { compiled(self, block, scratch, out) }
            }

            fn attend_part<R: $crate::kernel::direct::Rows<$ty>>(
                self,
                group: &$crate::kernel::direct::Group<'_, '_, $ty, R>,
                part: std::ops::Range<usize>,
            ) -> $crate::kernel::direct::Partial<$ty> {
                /// # Safety
                ///
                #[doc = concat!("The CPU must support ", $features, ".")]
                #[target_feature(enable = $features)]
                unsafe fn compiled<R: $crate::kernel::direct::Rows<$ty>>(
                    token: $token,
                    group: &$crate::kernel::direct::Group<'_, '_, $ty, R>,
                    part: std::ops::Range<usize>,
                ) -> $crate::kernel::direct::Partial<$ty> {
                    $crate::kernel::direct::attend_part::<
                        $ty,
                        $crate::kernel::float::Fused,
                        $token,
                        R,
                    >(token, group, part)
                }
                // SAFETY: `self` exists, so the CPU has the instruction sets.
                unsafe { compiled(self, group, part) }
            }

            fn pack_head(
                self,
                k: &ndarray::ArrayView2<'_, $ty>,
                v: &ndarray::ArrayView2<'_, $ty>,
            ) -> $crate::kernel::pack::PackedHead<$ty> {
                /// # Safety
                ///
                #[doc = concat!("The CPU must support ", $features, ".")]
                #[target_feature(enable = $features)]
                unsafe fn compiled(
                    k: &ndarray::ArrayView2<'_, $ty>,
                    v: &ndarray::ArrayView2<'_, $ty>,
                ) -> $crate::kernel::pack::PackedHead<$ty> {
                    $crate::kernel::pack::pack_head::<$ty, $nr>(k, v)
                }
                // SAFETY: `self` exists, so the CPU has the instruction sets.
                unsafe { compiled(k, v) }
            }

            fn backward_head(
                self,
                inputs: &$crate::kernel::backward::HeadInputs<'_, '_, $ty>,
                upstream: $crate::kernel::backward::Upstream<'_, $ty>,
            ) -> $crate::kernel::backward::HeadGradients<$ty> {
                /// # Safety
                ///
                #[doc = concat!("The CPU must support ", $features, ".")]
                #[target_feature(enable = $features)]
                unsafe fn compiled(
                    token: $token,
                    inputs: &$crate::kernel::backward::HeadInputs<'_, '_, $ty>,
                    upstream: $crate::kernel::backward::Upstream<'_, $ty>,
                ) -> $crate::kernel::backward::HeadGradients<$ty> {
                    use $crate::kernel::{backward::head, float::Fused};
                    head::<$ty, Fused, $token, $nr>(token, inputs, upstream)
                }
                // SAFETY: `self` exists, so the CPU has the instruction sets.
                unsafe { compiled(self, inputs, upstream) }
            }

            fn forward_head(
                self,
                inputs: &$crate::kernel::backward::HeadInputs<'_, '_, $ty>,
            ) -> (ndarray::Array2<$ty>, ndarray::Array1<$ty>) {
                /// # Safety
                ///
                #[doc = concat!("The CPU must support ", $features, ".")]
                #[target_feature(enable = $features)]
                unsafe fn compiled(
                    token: $token,
                    inputs: &$crate::kernel::backward::HeadInputs<'_, '_, $ty>,
                ) -> (ndarray::Array2<$ty>, ndarray::Array1<$ty>) {
                    use $crate::kernel::{backward::forward_head, float::Fused};
                    forward_head::<$ty, Fused, $token, $nr>(token, inputs)
                }
                // SAFETY: `self` exists, so the CPU has the instruction sets.
                unsafe { compiled(self, inputs) }
            }
        }
    };
}

/// The tile micro-kernels of an x86-64 token for one element type, written once:
/// a tile row is two registers of `$lanes` lanes (`$nr = 2 · $lanes` columns), and
/// the `MR` rows of a tile are summed `$rows` at a time (`2·$rows` accumulators:
/// all of `MR` with AVX-512's 32 registers, half of it with AVX2's 16, which then
/// reads each step of the keys or values twice); `$features` names what the token
/// proves.
macro_rules! two_register_tiles {
    ($token:ty, $features:literal, $module:ident, $ty:ty, $nr:literal, $lanes:literal, $rows:literal, $reg:ident, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        mod $module {
            use super::*;
            use $crate::kernel::params::{BC, MR};
            use $crate::kernel::tiled::Tiles;

            /// Rows summed in registers at a time.
            const ROWS: usize = $rows;
            const _: () = assert!(MR % ROWS == 0);

            /// One rank-1 update of `ROWS` rows of the tile: `acc[i] += a[i] · row`.
            ///
            /// # Safety
            ///
            #[doc = concat!("The CPU must support ", $features, ".")]
            #[inline(always)]
            unsafe fn rank1(acc: &mut [[$reg; 2]; ROWS], a: &[$ty; ROWS], row: &[$ty; $nr]) {
                let r0 = $load(row.as_ptr());
                let r1 = $load(row.as_ptr().add($lanes));
                for i in 0..ROWS {
                    let s = $splat(a[i]);
                    acc[i][0] = $fma(s, r0, acc[i][0]);
                    acc[i][1] = $fma(s, r1, acc[i][1]);
                }
            }

            /// Rows `first .. first + ROWS` of a step of `MR` values.
            #[inline(always)]
            fn part(step: &[$ty; MR], first: usize) -> &[$ty; ROWS] {
                step[first..first + ROWS].try_into().expect("ROWS values")
            }

            impl Tiles<$ty, $nr> for $token {
                #[inline(always)]
                fn score_tile(self, q: &[[$ty; MR]], k: &[[$ty; $nr]]) -> [[$ty; $nr]; MR] {
                    let mut out = [[0.0; $nr]; MR];
                    // SAFETY: `self` is the token, so the CPU has the instruction
                    // sets; every load reads, every store writes, one half of a
                    // `[$ty; $nr]`.
                    unsafe {
                        for first in (0..MR).step_by(ROWS) {
                            let mut acc = [[$zero(); 2]; ROWS];
                            // two steps of the sum per trip: half the loop overhead
                            let (q2, q_rest) = q.as_chunks::<2>();
                            let (k2, k_rest) = k.as_chunks::<2>();
                            for (qp, kp) in q2.iter().zip(k2) {
                                rank1(&mut acc, part(&qp[0], first), &kp[0]);
                                rank1(&mut acc, part(&qp[1], first), &kp[1]);
                            }
                            for (qp, kp) in q_rest.iter().zip(k_rest) {
                                rank1(&mut acc, part(qp, first), kp);
                            }
                            for i in 0..ROWS {
                                let row = out[first + i].as_mut_ptr();
                                $store(row, acc[i][0]);
                                $store(row.add($lanes), acc[i][1]);
                            }
                        }
                    }
                    out
                }

                #[inline(always)]
                fn value_tile(
                    self,
                    p: &[&[$ty; BC]; MR],
                    v: &[[$ty; $nr]],
                    alpha: &[$ty; MR],
                    o: &mut [[$ty; $nr]; MR],
                ) {
                    let v = &v[..v.len().min(BC)];
                    // SAFETY: as in `score_tile`.
                    unsafe {
                        for first in (0..MR).step_by(ROWS) {
                            let weights = |j: usize| std::array::from_fn(|i| p[first + i][j]);
                            let mut acc = [[$zero(); 2]; ROWS];
                            // two keys per trip: half the loop overhead
                            let (pairs, last) = v.as_chunks::<2>();
                            for (pair, rows) in pairs.iter().enumerate() {
                                let j = 2 * pair;
                                rank1(&mut acc, &weights(j), &rows[0]);
                                rank1(&mut acc, &weights(j + 1), &rows[1]);
                            }
                            if let [row] = last {
                                rank1(&mut acc, &weights(v.len() - 1), row);
                            }
                            for i in 0..ROWS {
                                let a = $splat(alpha[first + i]);
                                let row = o[first + i].as_mut_ptr();
                                $store(row, $fma($load(row), a, acc[i][0]));
                                $store(row.add($lanes), $fma($load(row.add($lanes)), a, acc[i][1]));
                            }
                        }
                    }
                }
            }
        }
    };
}
