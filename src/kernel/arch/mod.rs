//! The instruction sets the kernels are compiled for, chosen once per call.
//!
//! Each kernel body is written once, generic over its micro-kernels
//! ([`Tiles`](super::tiled::Tiles), [`Dots`](super::direct::Dots)), and compiled
//! here twice: with AVX2, FMA and F16C intrinsics ([`avx2`]), and as plain loops for
//! any CPU ([`portable`]). [`Arch::detect`] chooses at the start of a call.
//!
//! Soundness is carried by a type: the AVX2 micro-kernels are methods of the
//! token [`Avx2`](avx2::Avx2), which only run-time detection can construct, so no
//! safe function can execute an AVX2 instruction on a CPU that lacks it.
//!
//! `ATTN_KERNEL_ARCH` caps the instruction set, for tests and diagnostics:
//! `portable`, `avx2` or `avx512` (the default: the best the CPU has). A cap above
//! what the CPU has runs the best the CPU has; a cap above what the kernels are
//! written for runs the best they have (there are no AVX-512 kernels yet, so
//! `avx512` runs AVX2). Any other value is an [`Error::InvalidConfig`] from every
//! call that would use the fused kernels.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;

use std::ops::Range;
use std::sync::OnceLock;

use ndarray::ArrayViewMut2;

pub(crate) use portable::Portable;

use ndarray::{Array1, Array2};

use super::backward::{self, HeadGradients, HeadInputs, Upstream};
use super::direct::{self, Group, Partial, Rows};
use super::float::{KernelFloat, Separate};
use super::tiled::{self, Block, Scratch};
use crate::element::Element;
use crate::error::{Error, Result};

/// The instruction set the fused kernels ran with (see [`kernel_paths`](crate::kernel_paths)).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelArch {
    /// Plain loops, for any CPU.
    Portable,
    /// AVX2, FMA and F16C intrinsics (x86-64).
    Avx2,
}

/// The instruction set of one call, detected at its start; the AVX2 variant
/// holds the token that proves the CPU has it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arch {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Avx2),
}

/// What `ATTN_KERNEL_ARCH` allows, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cap {
    Portable,
    Avx2,
    Avx512,
}

impl Arch {
    /// The best instruction set that both the CPU and `ATTN_KERNEL_ARCH` allow.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `ATTN_KERNEL_ARCH` is set to an unknown value.
    pub(crate) fn detect() -> Result<Arch> {
        let cap = cap().map_err(|reason| Error::InvalidConfig { reason })?;
        #[cfg(target_arch = "x86_64")]
        if cap >= Cap::Avx2 {
            if let Some(token) = avx2::Avx2::detect() {
                return Ok(Arch::Avx2(token));
            }
        }
        let _ = cap; // only the x86-64 build has a level above portable
        Ok(Arch::Portable)
    }

    /// Which instruction set this is.
    pub(crate) fn kind(self) -> KernelArch {
        match self {
            Arch::Portable => KernelArch::Portable,
            #[cfg(target_arch = "x86_64")]
            Arch::Avx2(_) => KernelArch::Avx2,
        }
    }
}

/// `ATTN_KERNEL_ARCH`, read once per process.
fn cap() -> std::result::Result<Cap, String> {
    static CAP: OnceLock<std::result::Result<Cap, String>> = OnceLock::new();
    CAP.get_or_init(|| parse_cap(&std::env::var("ATTN_KERNEL_ARCH").unwrap_or_default()))
        .clone()
}

/// What a value of `ATTN_KERNEL_ARCH` allows (empty: everything).
fn parse_cap(value: &str) -> std::result::Result<Cap, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "avx512" => Ok(Cap::Avx512),
        "avx2" => Ok(Cap::Avx2),
        "portable" => Ok(Cap::Portable),
        _ => Err(format!(
            "ATTN_KERNEL_ARCH={value:?} is not an instruction set the kernels know: \
             use portable, avx2 or avx512, or leave it unset"
        )),
    }
}

/// An element type with compiled kernels: what the kernel bodies need of it, and
/// its entry points for each instruction set.
pub(crate) trait KernelElement: Element + KernelFloat {
    /// Columns of a register tile (keys in `S`, value columns in `O`) under `arch`.
    fn tile_width(arch: Arch) -> usize;

    /// [`tiled::attend_block`] compiled for `arch`.
    fn attend_block(
        arch: Arch,
        block: &Block<'_, Self>,
        scratch: &mut Scratch<Self>,
        out: ArrayViewMut2<'_, Self>,
    );

    /// [`direct::attend_part`] compiled for `arch`.
    fn attend_part<R: Rows<Self>>(
        arch: Arch,
        group: &Group<'_, '_, Self, R>,
        part: Range<usize>,
    ) -> Partial<Self>;

    /// [`backward::head`] compiled for `arch`.
    fn backward_head(
        arch: Arch,
        inputs: &HeadInputs<'_, '_, Self>,
        upstream: Upstream<'_, Self>,
    ) -> HeadGradients<Self>;

    /// [`backward::forward_head`] compiled for `arch`.
    fn forward_head(arch: Arch, inputs: &HeadInputs<'_, '_, Self>) -> (Array2<Self>, Array1<Self>);
}

/// [`KernelElement`] for one element type: its AVX2 entry points and tile widths.
macro_rules! kernel_element {
    ($ty:ty, $avx2_block:ident, $avx2_part:ident, $avx2_backward:ident, $avx2_forward:ident, $avx2_width:literal, $portable_width:literal) => {
        impl KernelElement for $ty {
            fn tile_width(arch: Arch) -> usize {
                match arch {
                    Arch::Portable => $portable_width,
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx2(_) => $avx2_width,
                }
            }

            fn attend_block(
                arch: Arch,
                block: &Block<'_, $ty>,
                scratch: &mut Scratch<$ty>,
                out: ArrayViewMut2<'_, $ty>,
            ) {
                match arch {
                    Arch::Portable => {
                        tiled::attend_block::<$ty, Separate, Portable, $portable_width>(
                            Portable, block, scratch, out,
                        )
                    }
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx2(token) => token.$avx2_block(block, scratch, out),
                }
            }

            fn attend_part<R: Rows<$ty>>(
                arch: Arch,
                group: &Group<'_, '_, $ty, R>,
                part: Range<usize>,
            ) -> Partial<$ty> {
                match arch {
                    Arch::Portable => {
                        direct::attend_part::<$ty, Separate, Portable, R>(Portable, group, part)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx2(token) => token.$avx2_part(group, part),
                }
            }

            fn backward_head(
                arch: Arch,
                inputs: &HeadInputs<'_, '_, $ty>,
                upstream: Upstream<'_, $ty>,
            ) -> HeadGradients<$ty> {
                match arch {
                    Arch::Portable => backward::head::<$ty, Separate>(inputs, upstream),
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx2(token) => token.$avx2_backward(inputs, upstream),
                }
            }

            fn forward_head(
                arch: Arch,
                inputs: &HeadInputs<'_, '_, $ty>,
            ) -> (Array2<$ty>, Array1<$ty>) {
                match arch {
                    Arch::Portable => backward::forward_head::<$ty, Separate>(inputs),
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx2(token) => token.$avx2_forward(inputs),
                }
            }
        }
    };
}

kernel_element!(
    f32,
    attend_block_f32,
    attend_part_f32,
    backward_f32,
    forward_lse_f32,
    16,
    8
);
kernel_element!(
    f64,
    attend_block_f64,
    attend_part_f64,
    backward_f64,
    forward_lse_f64,
    8,
    4
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_read_from_its_name() {
        assert_eq!(parse_cap(""), Ok(Cap::Avx512));
        assert_eq!(parse_cap("portable"), Ok(Cap::Portable));
        assert_eq!(parse_cap(" AVX2 "), Ok(Cap::Avx2));
        assert_eq!(parse_cap("avx512"), Ok(Cap::Avx512));
        let err = parse_cap("sse9").unwrap_err();
        assert!(
            err.contains("\"sse9\"") && err.contains("portable, avx2 or avx512"),
            "{err}"
        );
    }

    #[test]
    fn detection_honours_the_cap() {
        let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
        let cap = cap().expect("valid");
        if cap == Cap::Portable {
            assert_eq!(arch.kind(), KernelArch::Portable);
        }
        #[cfg(target_arch = "x86_64")]
        if cap >= Cap::Avx2
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            assert_eq!(arch.kind(), KernelArch::Avx2);
        }
    }
}
