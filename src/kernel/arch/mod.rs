//! The instruction sets the kernels are compiled for, chosen once per call.
//!
//! Each kernel body is written once, generic over a [`Token`]: the micro-kernels
//! of one instruction set ([`Tiles`], [`Dots`], [`HalfDots`]) and its tile width.
//! A body is wrapped as an [`Op`] ([`super::ops`]); [`Dispatch::dispatch`] runs
//! it with the token [`Arch::detect`] chose, through that token's one trampoline
//! (`vectorize`: a `#[target_feature]` function, pulp's shape), so the body is
//! compiled three times: with AVX-512 intrinsics ([`avx512`]: 512-bit registers,
//! twice as wide tiles), with AVX2, FMA and F16C intrinsics ([`avx2`]), and as
//! plain loops for any CPU ([`portable`]). Each token states its tile widths
//! (`F32_TILE`, `F64_TILE`) with the measurement that chose them.
//!
//! Soundness is carried by types: only run-time detection constructs a token,
//! and only a token can call its trampoline, so no safe function can execute an
//! instruction the CPU lacks.
//!
//! A token may also pack its operands its own way: AVX-512 transposes the f32
//! keys' panels and query tiles in registers ([`transpose`]).
//!
//! Keys stored in bf16 have one more level where the CPU has AVX512_BF16
//! ([`avx512bf16`]): the tiled kernel's scores by bf16 dot products, a token
//! that dispatches operations over keys packed as bf16 pairs; and one more
//! where it has AMX ([`amx`]): both of the tiled kernel's products on the tile
//! unit, its block methods ([`KeyTiles`]) in place of the register tiles.
//!
//! `ATTN_KERNEL_ARCH` caps the instruction set, for tests and diagnostics:
//! `portable`, `avx2`, `avx512`, `avx512bf16` or `amx` (the default: the best
//! the CPU has). A cap above what the CPU has runs the best the CPU has. Any other value
//! is an [`Error::InvalidConfig`] from every call that would use the fused
//! kernels.

#[cfg(target_arch = "x86_64")]
#[macro_use]
mod compiled;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
#[cfg(target_arch = "x86_64")]
mod band;
pub(crate) mod cpu;
#[cfg(target_arch = "x86_64")]
mod exp;
#[cfg(target_arch = "x86_64")]
mod exp8;
mod portable;
#[cfg(target_arch = "x86_64")]
mod transpose;
#[cfg(target_arch = "x86_64")]
mod transpose8;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub(crate) use amx::Amx;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512bf16::Avx512Bf16;
pub(crate) use portable::Portable;

use super::direct::{Dots, HalfDots};
use super::float::{KernelFloat, MulAdd};
use super::tiled::{KeyTiles, Tiles};
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
    /// AMX tiles for both products of the tiled kernel over bf16 keys and
    /// values, with AVX-512 and AVX512_BF16 (x86-64).
    Amx,
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
    Amx,
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
        if cap >= Cap::Avx512
            && let Some(token) = avx512::Avx512::detect()
        {
            return Ok(Arch::Avx512(token));
        }
        #[cfg(target_arch = "x86_64")]
        if cap >= Cap::Avx2
            && let Some(token) = avx2::Avx2::detect()
        {
            return Ok(Arch::Avx2(token));
        }
        let _ = cap; // only the x86-64 build has a level above portable
        Ok(Arch::Portable)
    }

    /// The tiled kernel with bf16 dot products, where the CPU has AVX512_BF16
    /// and `ATTN_KERNEL_ARCH` allows it.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn bf16_dots(self) -> Option<Avx512Bf16> {
        match self {
            Arch::Avx512(token) if cap().is_ok_and(|cap| cap >= Cap::Avx512Bf16) => {
                avx512bf16::Avx512Bf16::detect(token)
            }
            _ => None,
        }
    }

    /// The tiled kernel on AMX tiles, where the CPU has AMX (and AVX512_BF16),
    /// Linux grants the tile data and `ATTN_KERNEL_ARCH` allows it.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn amx_tiles(self) -> Option<Amx> {
        let bf16 = self.bf16_dots()?;
        match cap() {
            Ok(Cap::Amx) => Amx::detect(bf16),
            _ => None,
        }
    }

    /// Whether this instruction set scores and sums an int8 cache with
    /// integer dot products (AVX-512 with AVX512_VNNI).
    pub(crate) fn int8_dots(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Arch::Avx512(_) => vnni::detect(),
            _ => false,
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
        "" | "amx" => Ok(Cap::Amx),
        "avx512bf16" => Ok(Cap::Avx512Bf16),
        "avx512" => Ok(Cap::Avx512),
        "avx2" => Ok(Cap::Avx2),
        "portable" => Ok(Cap::Portable),
        _ => Err(format!(
            "ATTN_KERNEL_ARCH={value:?} is not an instruction set the kernels know: \
             use portable, avx2, avx512, avx512bf16 or amx, or leave it unset"
        )),
    }
}

/// The micro-kernels of one instruction set for element `A` in tiles `NR`
/// columns wide: what every kernel body is written against. Each token
/// implements it once per element type, `NR` being the token's tile width for
/// that type (its `F32_TILE` / `F64_TILE`).
pub(crate) trait Token<A: KernelFloat, const NR: usize>:
    Tiles<A, NR> + Dots<A> + HalfDots + Send + Sync
{
    /// How `a·b + c` is computed: one fused instruction where the instruction
    /// set has FMA, a multiply and an add where it may not.
    type MulAdd: MulAdd;
}

/// One operation of the kernels ([`super::ops`]), written once generic over the
/// token: `run` is `#[inline(always)]` in every implementation, so the token's
/// trampoline compiles the whole body with its instruction sets. `K` is how the
/// operation's queries and keys are packed ([`Entry`](super::pack::Entry)): the
/// element itself, or bf16 pairs.
pub(crate) trait Op<A: KernelFloat, K = A> {
    /// What the operation gives.
    type Output;

    /// The operation with `token`'s micro-kernels.
    fn run<T: Token<A, NR> + KeyTiles<A, K, NR>, const NR: usize>(self, token: T) -> Self::Output;
}

/// What runs an [`Op`]: [`Arch`] for queries and keys packed in the element type
/// (every instruction set), [`Avx512Bf16`](avx512bf16::Avx512Bf16) for bf16
/// keys packed as pairs.
pub(crate) trait Dispatch<A: KernelFloat, K = A>: Copy + Send + Sync {
    /// The instruction set, as [`kernel_paths`](crate::kernel_paths) reports it.
    fn kind(self) -> KernelArch;

    /// Runs `op` compiled for this instruction set: inside the token's one
    /// `#[target_feature]` trampoline, with the token's tile width.
    fn dispatch<O: Op<A, K>>(self, op: O) -> O::Output;
}

impl<A: KernelElement> Dispatch<A> for Arch {
    fn kind(self) -> KernelArch {
        Arch::kind(self)
    }

    #[inline]
    fn dispatch<O: Op<A>>(self, op: O) -> O::Output {
        A::dispatch(self, op)
    }
}

/// An element type with a tile width on every token: [`Dispatch`] for [`Arch`].
/// Stable Rust cannot compute a const generic from a type parameter, so each
/// element type writes out its match from instruction set to token and width.
pub(crate) trait KernelElement: KernelFloat {
    /// Runs `op` with the token of `arch` and its tile width for this type.
    fn dispatch<O: Op<Self>>(arch: Arch, op: O) -> O::Output;
}

/// [`KernelElement`] for `$ty`, whose tiles are `$width` wide on each token.
macro_rules! kernel_element {
    ($ty:ty, $width:ident) => {
        impl KernelElement for $ty {
            #[inline]
            fn dispatch<O: Op<$ty>>(arch: Arch, op: O) -> O::Output {
                match arch {
                    Arch::Portable => op.run::<Portable, { Portable::$width }>(Portable),
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx2(token) => token.vectorize::<$ty, $ty, O, { avx2::Avx2::$width }>(op),
                    #[cfg(target_arch = "x86_64")]
                    Arch::Avx512(token) => {
                        token.vectorize::<$ty, $ty, O, { avx512::Avx512::$width }>(op)
                    }
                }
            }
        }
    };
}

kernel_element!(f32, F32_TILE);
kernel_element!(f64, F64_TILE);

#[cfg(test)]
mod tests;
