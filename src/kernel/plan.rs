//! How a forward call runs ([`Plan`]): decided once per call, from its shape,
//! the kernel choice and, for the fused paths, the instruction set detected
//! once.

use super::arch::Arch;
#[cfg(target_arch = "x86_64")]
use super::arch::{Amx, Avx512Bf16};
use super::options::Kernel;
use super::params::{DIRECT_MAX_ROWS, ROWWISE_MAX_WORK, ROWWISE_MAX_WORK_FEW_ROWS};
use crate::core::problem::Problem;
use crate::element::Half;
use crate::error::Result;

/// How a forward call runs, decided once: the route, and for the fused paths
/// the instruction set, detected once.
#[derive(Debug, Clone, Copy)]
pub(super) enum Plan {
    /// [`Kernel::Plain`]: the reference path.
    Reference,
    /// No output to compute.
    Nothing,
    /// Small enough to go row by row.
    Rowwise,
    /// A few query rows against many keys: the direct path.
    Direct(Arch),
    /// Everything else: the tiled kernel.
    Tiled(Arch),
    /// The tiled kernel over bf16 keys packed as pairs, scored by bf16 dot
    /// products (AVX512_BF16).
    #[cfg(target_arch = "x86_64")]
    TiledBf16Pairs(Avx512Bf16),
    /// The tiled kernel over bf16 keys and values on AMX tiles.
    #[cfg(target_arch = "x86_64")]
    TiledAmx(Amx),
}

impl Plan {
    /// The plan of `problem` under `kernel`.
    ///
    /// # Errors
    ///
    /// As [`forward`](super::forward), for the fused paths.
    pub(super) fn of<A, KV, P, Q>(
        problem: &Problem<'_, A, KV, P, Q>,
        kernel: Kernel,
    ) -> Result<Self> {
        let (batch, heads, l, d) = problem.q.dim();
        let (s, d_v) = (problem.k.dim().2, problem.v.dim().3);
        Ok(match kernel {
            Kernel::Plain => Plan::Reference,
            _ if batch * heads * l * d_v == 0 => Plan::Nothing,
            Kernel::Auto if l * s * (d + d_v + 16) <= rowwise_max_work(l) => Plan::Rowwise,
            Kernel::Auto if l <= DIRECT_MAX_ROWS => Plan::Direct(Arch::detect()?),
            _ => Plan::Tiled(Arch::detect()?),
        })
    }

    /// This plan for keys and values stored as `H`: the tiled kernel takes bf16
    /// keys and values to AMX tiles where the CPU (and `ATTN_KERNEL_ARCH`) has
    /// AMX, or bf16 keys as pairs where it has AVX512_BF16.
    pub(super) fn for_half<H: Half>(self) -> Self {
        match self {
            #[cfg(target_arch = "x86_64")]
            Plan::Tiled(arch) if H::BF16 => match (arch.amx_tiles(), arch.bf16_dots()) {
                (Some(tiles), _) => Plan::TiledAmx(tiles),
                (None, Some(dots)) => Plan::TiledBf16Pairs(dots),
                (None, None) => self,
            },
            _ => self,
        }
    }
}

/// The most work (`L·S·(d_k + d_v + 16)`) a head of `l` query rows goes row by
/// row with: less where the direct path is the alternative.
fn rowwise_max_work(l: usize) -> usize {
    match l <= DIRECT_MAX_ROWS {
        true => ROWWISE_MAX_WORK_FEW_ROWS,
        false => ROWWISE_MAX_WORK,
    }
}
