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
mod portable;
#[cfg(target_arch = "x86_64")]
mod transpose;
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
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_read_from_its_name() {
        assert_eq!(parse_cap(""), Ok(Cap::Amx));
        assert_eq!(parse_cap("amx"), Ok(Cap::Amx));
        assert_eq!(parse_cap("avx512bf16"), Ok(Cap::Avx512Bf16));
        assert_eq!(parse_cap("portable"), Ok(Cap::Portable));
        assert_eq!(parse_cap(" AVX2 "), Ok(Cap::Avx2));
        assert_eq!(parse_cap("avx512"), Ok(Cap::Avx512));
        let err = parse_cap("sse9").unwrap_err();
        assert!(
            err.contains("\"sse9\"") && err.contains("portable, avx2, avx512, avx512bf16 or amx"),
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
            // the bf16 dot products and AMX serve only bf16 keys: `bf16_dots`,
            // `amx_tiles`
            Cap::Avx512 | Cap::Avx512Bf16 | Cap::Amx => KernelArch::Avx512,
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

    /// AMX where the CPU says it has AMX-TILE and AMX-BF16 (Linux grants every
    /// process the tile data since 5.16), the cap allows it and AVX512_BF16 is
    /// there too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_tiles_need_the_cpu_and_the_cap() {
        let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = |name: &str| {
            cpu.lines()
                .find(|line| line.starts_with("flags"))
                .is_some_and(|line| line.split_whitespace().any(|flag| flag == name))
        };
        let allowed = cap().expect("valid") == Cap::Amx
            && arch.bf16_dots().is_some()
            && flags("amx_tile")
            && flags("amx_bf16");
        assert_eq!(arch.amx_tiles().is_some(), allowed);
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

    /// Every instruction set this CPU has, whatever `ATTN_KERNEL_ARCH` says.
    fn every_arch() -> Vec<Arch> {
        #[allow(unused_mut)]
        let mut arches = vec![Arch::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            arches.extend(avx2::Avx2::detect().map(Arch::Avx2));
            arches.extend(avx512::Avx512::detect().map(Arch::Avx512));
        }
        arches
    }

    /// The score tile's first `rows` rows, for each `rows`, against the whole tile.
    struct RowsOfTile<A> {
        depth: usize,
        _element: std::marker::PhantomData<A>,
    }

    fn rows_of<A>(depth: usize) -> RowsOfTile<A> {
        RowsOfTile {
            depth,
            _element: std::marker::PhantomData,
        }
    }

    impl<A: KernelFloat> Op<A> for RowsOfTile<A> {
        /// `(rows, row, column)` of each entry whose bits differ.
        type Output = Vec<(usize, usize, usize)>;

        #[inline(always)]
        fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(
            self,
            token: T,
        ) -> Self::Output {
            use crate::kernel::params::MR;
            let value = |x: usize| A::from_f64(((x * 37) % 101) as f64 / 29.0 - 1.7);
            let q: Vec<[A; MR]> = (0..self.depth)
                .map(|p| std::array::from_fn(|i| value(p * MR + i)))
                .collect();
            let k: Vec<[A; NR]> = (0..self.depth)
                .map(|p| std::array::from_fn(|j| value(p * NR + j + 7)))
                .collect();
            let whole = token.score_tile(&q, &k, MR);
            let mut differ = Vec::new();
            for rows in 1..=MR {
                let tile = token.score_tile(&q, &k, rows);
                for (i, (row, want)) in tile.iter().zip(&whole).take(rows).enumerate() {
                    for (j, (x, y)) in row.iter().zip(want).enumerate() {
                        if x != y {
                            differ.push((rows, i, j));
                        }
                    }
                }
            }
            differ
        }
    }

    /// A tile of a few rows (the last of a product's rows, summed in a smaller
    /// block) has the bits those rows have in a whole tile, on every
    /// instruction set this CPU has: a row's value does not depend on the
    /// others.
    #[test]
    fn a_tile_of_a_few_rows_has_the_bits_of_the_whole_tile() {
        for arch in every_arch() {
            for depth in [1, 2, 7, 64] {
                let differ: Vec<_> = Dispatch::<f32>::dispatch(arch, rows_of(depth));
                let first = differ.first();
                assert!(
                    first.is_none(),
                    "{:?} f32 depth {depth}: (rows, row, column) {first:?}",
                    arch.kind()
                );
                let differ: Vec<_> = Dispatch::<f64>::dispatch(arch, rows_of(depth));
                let first = differ.first();
                assert!(
                    first.is_none(),
                    "{:?} f64 depth {depth}: (rows, row, column) {first:?}",
                    arch.kind()
                );
            }
        }
    }

    /// The product tile over lines read where they lie (a matrix's rows or
    /// columns, `W` apart) and over packed lines, against the score tile.
    struct ProductTiles<A> {
        depth: usize,
        _element: std::marker::PhantomData<A>,
    }

    fn products<A>(depth: usize) -> ProductTiles<A> {
        ProductTiles {
            depth,
            _element: std::marker::PhantomData,
        }
    }

    /// Stride of the rows the product tiles read: wider than any depth below.
    const W: usize = 40;

    impl<A: KernelFloat> Op<A> for ProductTiles<A> {
        /// `(form, rows, add, row, column)` of each entry whose bits differ
        /// from the score tile's (plus `c`'s where added), and of each entry
        /// past the tile's rows or columns that was written.
        type Output = Vec<(&'static str, usize, bool, usize, usize)>;

        #[inline(always)]
        fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(
            self,
            token: T,
        ) -> Self::Output {
            use crate::kernel::params::MR;
            let depth = self.depth;
            let value = |x: usize| A::from_f64(((x * 37) % 101) as f64 / 29.0 - 1.7);
            // A: (MR, depth) row-major W wide; its transpose (depth, MR) W wide
            let rows_of_a: Vec<A> = (0..MR * W).map(value).collect();
            let mut cols_of_a = vec![A::nan(); depth * W];
            let mut packed = vec![[A::zero(); MR]; depth];
            for i in 0..MR {
                for p in 0..depth {
                    cols_of_a[p * W + i] = rows_of_a[i * W + p];
                    packed[p][i] = rows_of_a[i * W + p];
                }
            }
            let k: Vec<[A; NR]> = (0..depth)
                .map(|p| std::array::from_fn(|j| value(p * NR + j + 7)))
                .collect();
            let want = token.score_tile(&packed, &k, MR);
            let stride = NR + 3;
            let start = |i: usize, j: usize| A::from_f64((i * 5 + j) as f64 / 8.0);
            let mut differ = Vec::new();
            for rows in 1..=MR {
                for add in [false, true] {
                    for form in ["rows", "columns", "packed"] {
                        let mut c: Vec<A> = (0..MR * stride)
                            .map(|x| start(x / stride, x % stride))
                            .collect();
                        let (a, flat) = (&rows_of_a[..], packed.as_flattened());
                        match form {
                            "rows" => token.product_tile::<W, 1>(a, &k, rows, &mut c, stride, add),
                            "columns" => token
                                .product_tile::<1, W>(&cols_of_a, &k, rows, &mut c, stride, add),
                            _ => token.product_tile::<1, MR>(flat, &k, rows, &mut c, stride, add),
                        }
                        for i in 0..MR {
                            for j in 0..stride {
                                let expect = match (i < rows && j < NR, add) {
                                    (true, true) => start(i, j) + want[i][j],
                                    (true, false) => want[i][j],
                                    (false, _) => start(i, j),
                                };
                                if c[i * stride + j] != expect {
                                    differ.push((form, rows, add, i, j));
                                }
                            }
                        }
                    }
                }
            }
            differ
        }
    }

    /// The backward's products read `P` and `dS` where they lie: their
    /// product tiles have the bits of the score tile on the same lines packed,
    /// for every count of rows, and write nothing past the tile.
    #[test]
    fn product_tiles_read_where_the_operand_lies() {
        for arch in every_arch() {
            for depth in [0, 1, 2, 7, 33] {
                let differ: Vec<_> = Dispatch::<f32>::dispatch(arch, products(depth));
                let first = differ.first();
                assert!(
                    first.is_none(),
                    "{:?} f32 depth {depth}: {first:?}",
                    arch.kind()
                );
                let differ: Vec<_> = Dispatch::<f64>::dispatch(arch, products(depth));
                let first = differ.first();
                assert!(
                    first.is_none(),
                    "{:?} f64 depth {depth}: {first:?}",
                    arch.kind()
                );
            }
        }
    }
}
