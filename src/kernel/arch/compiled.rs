//! The macro that compiles the kernel bodies for one x86-64 token.

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
