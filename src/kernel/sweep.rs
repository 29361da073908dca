//! Passes over memory outside the kernels (the half types' conversions, the
//! pre-check's scan), compiled with the widest vectors the CPU has. Code
//! outside a `#[target_feature]` function is compiled for x86-64's baseline,
//! SSE2: the bf16 rounding of an output took 5 % of a bf16 call at N = 512,
//! the scans of queries and the widening of them as much again.
//!
//! A sweep's result does not depend on the instructions that ran it, so
//! `ATTN_KERNEL_ARCH`, which picks the kernels' paths, does not apply here:
//! the CPU alone decides, as for the `half` crate's own conversions. This
//! module depends on nothing else of the crate.

/// A pass over memory with nothing to choose but its instructions:
/// [`vectorized`] compiles `run`, which is `#[inline(always)]` in every
/// implementation, for the CPU's vectors. Its results do not depend on them.
pub(crate) trait Sweep {
    /// What the pass gives.
    type Output;

    /// The pass, in plain Rust the compiler vectorises.
    fn run(self) -> Self::Output;
}

/// Runs `sweep` compiled for AVX-512 (F, BW, VL, DQ) or AVX2 where the CPU
/// has it, as it is otherwise.
#[inline]
pub(crate) fn vectorized<S: Sweep>(sweep: S) -> S::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        fn avx512<S: Sweep>(sweep: S) -> S::Output {
            sweep.run()
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        fn avx2<S: Sweep>(sweep: S) -> S::Output {
            sweep.run()
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has every instruction set `avx512` is compiled for.
            return unsafe { avx512(sweep) };
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has every instruction set `avx2` is compiled for.
            return unsafe { avx2(sweep) };
        }
    }
    sweep.run()
}
