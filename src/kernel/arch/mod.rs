//! The instruction sets the kernels are compiled for, chosen once per call.
//!
//! Each kernel body is written once, generic over its micro-kernels
//! ([`Tiles`](super::tiled::Tiles), [`Dots`](super::direct::Dots)), and compiled
//! here three times: with AVX-512 intrinsics ([`avx512`]: 512-bit registers, twice
//! as wide tiles), with AVX2, FMA and F16C intrinsics ([`avx2`]), and as plain
//! loops for any CPU ([`portable`]). [`Arch::detect`] chooses the best the CPU has
//! at the start of a call.
//!
//! Soundness is carried by types: the micro-kernels of an instruction set are
//! methods of its token ([`Avx2`](avx2::Avx2), [`Avx512`](avx512::Avx512)),
//! which only run-time detection can construct, so no safe function can execute
//! an instruction the CPU lacks.
//!
//! Keys stored in bf16 have one more level where the CPU has AVX512_BF16
//! ([`avx512bf16`]): the tiled kernel's scores by bf16 dot products.
//!
//! `ATTN_KERNEL_ARCH` caps the instruction set, for tests and diagnostics:
//! `portable`, `avx2`, `avx512` or `avx512bf16` (the default: the best the CPU
//! has). A cap above what the CPU has runs the best the CPU has. Any other value
//! is an [`Error::InvalidConfig`] from every call that would use the fused
//! kernels.

#[cfg(target_arch = "x86_64")]
#[macro_use]
mod compiled;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
pub(crate) mod cpu;
mod portable;

use std::ops::Range;
use std::sync::OnceLock;

use ndarray::{ArrayView2, ArrayViewMut2};

pub(crate) use portable::Portable;

use ndarray::{Array1, Array2};

use super::backward::{self, HeadGradients, HeadInputs, Upstream};
use super::direct::{self, Group, Partial, Rows};
use super::float::{KernelFloat, Separate};
use super::pack::{self, Entry, PackedHead};
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
    /// AVX-512 (F, BW, VL, DQ) intrinsics, with AVX2, FMA and F16C (x86-64).
    Avx512,
    /// AVX-512 with AVX512_BF16: the tiled kernel's scores of bf16 keys by bf16
    /// dot products (x86-64; only calls whose keys are bf16 run it).
    Avx512Bf16,
}

/// The instruction set of one call, detected at its start; each x86-64 variant
/// holds the token that proves the CPU has it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arch {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(avx512::Avx512),
}

/// What `ATTN_KERNEL_ARCH` allows, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cap {
    Portable,
    Avx2,
    Avx512,
    Avx512Bf16,
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
        if cap >= Cap::Avx512 {
            if let Some(token) = avx512::Avx512::detect() {
                return Ok(Arch::Avx512(token));
            }
        }
        #[cfg(target_arch = "x86_64")]
        if cap >= Cap::Avx2 {
            if let Some(token) = avx2::Avx2::detect() {
                return Ok(Arch::Avx2(token));
            }
        }
        let _ = cap; // only the x86-64 build has a level above portable
        Ok(Arch::Portable)
    }

    /// The tiled kernel with bf16 dot products, where the CPU has AVX512_BF16
    /// and `ATTN_KERNEL_ARCH` allows it.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn bf16_dots(self) -> Option<avx512bf16::Avx512Bf16> {
        match self {
            Arch::Avx512(token) if cap().is_ok_and(|cap| cap >= Cap::Avx512Bf16) => {
                avx512bf16::Avx512Bf16::detect(token)
            }
            _ => None,
        }
    }

    /// Which instruction set this is.
    pub(crate) fn kind(self) -> KernelArch {
        match self {
            Arch::Portable => KernelArch::Portable,
            #[cfg(target_arch = "x86_64")]
            Arch::Avx2(_) => KernelArch::Avx2,
            #[cfg(target_arch = "x86_64")]
            Arch::Avx512(_) => KernelArch::Avx512,
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
        "" | "avx512bf16" => Ok(Cap::Avx512Bf16),
        "avx512" => Ok(Cap::Avx512),
        "avx2" => Ok(Cap::Avx2),
        "portable" => Ok(Cap::Portable),
        _ => Err(format!(
            "ATTN_KERNEL_ARCH={value:?} is not an instruction set the kernels know: \
             use portable, avx2, avx512 or avx512bf16, or leave it unset"
        )),
    }
}

/// What the tiled kernel runs with over keys and values stored as `KV`: how a
/// key/value head is packed, and the block body, compiled for one instruction
/// set. [`Arch`] is one for keys in the compute type; [`Avx512Bf16`] one for
/// bf16 keys.
///
/// [`Avx512Bf16`]: avx512bf16::Avx512Bf16
pub(crate) trait TiledKernel<A, KV>: Copy + Send + Sync {
    /// How queries and keys are packed for the score micro-kernel.
    type Entry: Entry<A>;

    /// The instruction set, as [`kernel_paths`](crate::kernel_paths) reports it.
    fn kind(self) -> KernelArch;

    /// Columns of a register tile (keys in `S`, value columns in `O`).
    fn tile_width(self) -> usize;

    /// [`pack::pack_head`] (or its bf16 form) for this kernel's tiles.
    fn pack_head(
        self,
        k: &ArrayView2<'_, KV>,
        v: &ArrayView2<'_, KV>,
    ) -> PackedHead<A, Self::Entry>;

    /// [`tiled::attend_block`] for this kernel.
    fn attend_block(
        self,
        block: &Block<'_, A, Self::Entry>,
        scratch: &mut Scratch<A, Self::Entry>,
        out: ArrayViewMut2<'_, A>,
    );
}

impl<A: KernelElement> TiledKernel<A, A> for Arch {
    type Entry = A;

    fn kind(self) -> KernelArch {
        Arch::kind(self)
    }

    fn tile_width(self) -> usize {
        A::tile_width(self)
    }

    fn pack_head(self, k: &ArrayView2<'_, A>, v: &ArrayView2<'_, A>) -> PackedHead<A> {
        A::pack_head(self, k, v)
    }

    fn attend_block(
        self,
        block: &Block<'_, A>,
        scratch: &mut Scratch<A>,
        out: ArrayViewMut2<'_, A>,
    ) {
        A::attend_block(self, block, scratch, out)
    }
}

/// The kernel bodies compiled for one instruction set (`Self`, a token proving
/// the CPU has it) and one element type.
pub(crate) trait Compiled<A: KernelFloat>: Copy {
    /// Columns of a register tile (keys in `S`, value columns in `O`).
    const TILE_WIDTH: usize;

    /// [`tiled::attend_block`] with `TILE_WIDTH`-wide tiles.
    fn attend_block(
        self,
        block: &Block<'_, A>,
        scratch: &mut Scratch<A>,
        out: ArrayViewMut2<'_, A>,
    );

    /// [`direct::attend_part`].
    fn attend_part<R: Rows<A>>(self, group: &Group<'_, '_, A, R>, part: Range<usize>)
        -> Partial<A>;

    /// [`pack::pack_head`] for `TILE_WIDTH`-wide tiles.
    fn pack_head(self, k: &ArrayView2<'_, A>, v: &ArrayView2<'_, A>) -> PackedHead<A>;

    /// [`backward::head`].
    fn backward_head(
        self,
        inputs: &HeadInputs<'_, '_, A>,
        upstream: Upstream<'_, A>,
    ) -> HeadGradients<A>;

    /// [`backward::forward_head`].
    fn forward_head(self, inputs: &HeadInputs<'_, '_, A>) -> (Array2<A>, Array1<A>);
}

/// The portable bodies, for any CPU (`a·b + c` as a multiply and an add).
macro_rules! portable {
    ($ty:ty, $nr:literal) => {
        impl Compiled<$ty> for Portable {
            const TILE_WIDTH: usize = $nr;

            fn attend_block(
                self,
                block: &Block<'_, $ty>,
                scratch: &mut Scratch<$ty>,
                out: ArrayViewMut2<'_, $ty>,
            ) {
                tiled::attend_block::<$ty, Separate, Portable, $ty, $nr>(self, block, scratch, out)
            }

            fn attend_part<R: Rows<$ty>>(
                self,
                group: &Group<'_, '_, $ty, R>,
                part: Range<usize>,
            ) -> Partial<$ty> {
                direct::attend_part::<$ty, Separate, Portable, R>(self, group, part)
            }

            fn pack_head(
                self,
                k: &ArrayView2<'_, $ty>,
                v: &ArrayView2<'_, $ty>,
            ) -> PackedHead<$ty> {
                pack::pack_head::<$ty, $nr>(k, v)
            }

            fn backward_head(
                self,
                inputs: &HeadInputs<'_, '_, $ty>,
                upstream: Upstream<'_, $ty>,
            ) -> HeadGradients<$ty> {
                backward::head::<$ty, Separate, Portable, $nr>(self, inputs, upstream)
            }

            fn forward_head(self, inputs: &HeadInputs<'_, '_, $ty>) -> (Array2<$ty>, Array1<$ty>) {
                backward::forward_head::<$ty, Separate, Portable, $nr>(self, inputs)
            }
        }
    };
}

portable!(f32, 8);
portable!(f64, 4);

/// An element type with compiled kernels for every instruction set: each call
/// runs the bodies compiled for `arch`.
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

    /// [`pack::pack_head`] compiled for `arch`.
    fn pack_head(
        arch: Arch,
        k: &ArrayView2<'_, Self>,
        v: &ArrayView2<'_, Self>,
    ) -> PackedHead<Self>;

    /// [`backward::head`] compiled for `arch`.
    fn backward_head(
        arch: Arch,
        inputs: &HeadInputs<'_, '_, Self>,
        upstream: Upstream<'_, Self>,
    ) -> HeadGradients<Self>;

    /// [`backward::forward_head`] compiled for `arch`.
    fn forward_head(arch: Arch, inputs: &HeadInputs<'_, '_, Self>) -> (Array2<Self>, Array1<Self>);
}

/// Runs `$call` with `$token` bound to the token of `$arch`.
macro_rules! on_arch {
    ($arch:expr, $token:ident => $call:expr) => {
        match $arch {
            Arch::Portable => {
                let $token = Portable;
                $call
            }
            #[cfg(target_arch = "x86_64")]
            Arch::Avx2($token) => $call,
            #[cfg(target_arch = "x86_64")]
            Arch::Avx512($token) => $call,
        }
    };
}

/// [`KernelElement`] for an element type that every token compiles.
macro_rules! kernel_element {
    ($ty:ty) => {
        impl KernelElement for $ty {
            fn tile_width(arch: Arch) -> usize {
                fn width<T: Compiled<$ty>>(_: T) -> usize {
                    T::TILE_WIDTH
                }
                on_arch!(arch, token => width(token))
            }

            fn attend_block(
                arch: Arch,
                block: &Block<'_, $ty>,
                scratch: &mut Scratch<$ty>,
                out: ArrayViewMut2<'_, $ty>,
            ) {
                on_arch!(arch, token => token.attend_block(block, scratch, out))
            }

            fn attend_part<R: Rows<$ty>>(
                arch: Arch,
                group: &Group<'_, '_, $ty, R>,
                part: Range<usize>,
            ) -> Partial<$ty> {
                on_arch!(arch, token => token.attend_part(group, part))
            }

            fn pack_head(
                arch: Arch,
                k: &ArrayView2<'_, $ty>,
                v: &ArrayView2<'_, $ty>,
            ) -> PackedHead<$ty> {
                on_arch!(arch, token => token.pack_head(k, v))
            }

            fn backward_head(
                arch: Arch,
                inputs: &HeadInputs<'_, '_, $ty>,
                upstream: Upstream<'_, $ty>,
            ) -> HeadGradients<$ty> {
                on_arch!(arch, token => token.backward_head(inputs, upstream))
            }

            fn forward_head(
                arch: Arch,
                inputs: &HeadInputs<'_, '_, $ty>,
            ) -> (Array2<$ty>, Array1<$ty>) {
                on_arch!(arch, token => token.forward_head(inputs))
            }
        }
    };
}

kernel_element!(f32);
kernel_element!(f64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_read_from_its_name() {
        assert_eq!(parse_cap(""), Ok(Cap::Avx512Bf16));
        assert_eq!(parse_cap("avx512bf16"), Ok(Cap::Avx512Bf16));
        assert_eq!(parse_cap("portable"), Ok(Cap::Portable));
        assert_eq!(parse_cap(" AVX2 "), Ok(Cap::Avx2));
        assert_eq!(parse_cap("avx512"), Ok(Cap::Avx512));
        let err = parse_cap("sse9").unwrap_err();
        assert!(
            err.contains("\"sse9\"") && err.contains("portable, avx2, avx512 or avx512bf16"),
            "{err}"
        );
    }

    #[test]
    fn detection_honours_the_cap() {
        let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
        let cap = cap().expect("valid");
        let mut best = Cap::Portable;
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::Avx2::detect().is_some() {
                best = Cap::Avx2;
            }
            if avx512::Avx512::detect().is_some() {
                best = Cap::Avx512;
            }
        }
        let expected = match cap.min(best) {
            Cap::Portable => KernelArch::Portable,
            Cap::Avx2 => KernelArch::Avx2,
            // the bf16 dot products serve only bf16 keys: `bf16_dots`
            Cap::Avx512 | Cap::Avx512Bf16 => KernelArch::Avx512,
        };
        assert_eq!(arch.kind(), expected);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_dot_products_need_the_cpu_and_the_cap() {
        let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
        let allowed = cap().expect("valid") >= Cap::Avx512Bf16
            && avx512::Avx512::detect().is_some()
            && is_x86_feature_detected!("avx512bf16");
        assert_eq!(arch.bf16_dots().is_some(), allowed);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_token_needs_its_instruction_sets() {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        assert_eq!(avx2::Avx2::detect().is_some(), avx2);
        assert_eq!(avx512::Avx512::detect().is_some(), avx2 && avx512);
    }
}
