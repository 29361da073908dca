//! The host the benchmarks run on: its name from `/proc/cpuinfo`, and its f32
//! fused-multiply-add peak on one core, measured (the hosts of this machine kind
//! vary between sessions: AMD Zen 3 with AVX2, Zen 4 and Intel Xeons with
//! AVX-512, whose peaks differ by 2× and more).

use std::time::Instant;

/// The CPU's model name, family/model and the instruction sets that the kernels
/// choose between, as one line for the head of a table.
pub fn host() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".to_string())
    };
    let flags = field("flags");
    let has: Vec<&str> = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|g| g == *f))
    .collect();
    format!(
        "{} ({}, family {} model {}), {} cores; {}",
        field("model name"),
        field("vendor_id"),
        field("cpu family"),
        field("model"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        has.join(" ")
    )
}

/// The best f32 FMA rate of one core in GFLOP/s (2 flops per lane), over the
/// widest vectors the CPU has; f64 is half of it. Best of several timed runs of
/// independent FMA chains, enough of them to cover latency × ports and few enough
/// to stay in registers with the two constants (16 of AVX-512's 32 registers, 12
/// of AVX2's 16: with 16 chains there, one spills and its store-to-load round
/// trip halves the measured rate, as it did on Zen 3).
pub fn f32_fma_peak_gflops() -> f64 {
    let (lanes, chains, run): (usize, usize, fn(u64) -> f32) = widest();
    let iterations = 20_000_000u64;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(run(iterations));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (iterations as f64 * chains as f64 * lanes as f64 * 2.0) / best / 1e9
}

/// Independent chains per width: see [`f32_fma_peak_gflops`].
const CHAINS_512: usize = 16;
const CHAINS_256: usize = 12;
const CHAINS_SCALAR: usize = 12;

#[cfg(target_arch = "x86_64")]
fn widest() -> (usize, usize, fn(u64) -> f32) {
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected just above.
        (16, CHAINS_512, |n| unsafe { x86::chains_512(n) })
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected just above.
        (8, CHAINS_256, |n| unsafe { x86::chains_256(n) })
    } else {
        (1, CHAINS_SCALAR, scalar_chains)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn widest() -> (usize, usize, fn(u64) -> f32) {
    (1, CHAINS_SCALAR, scalar_chains)
}

fn scalar_chains(n: u64) -> f32 {
    let mut acc = [1.0f32; CHAINS_SCALAR];
    for _ in 0..n {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS_256, CHAINS_512};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_512(n: u64) -> f32 {
        let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS_512];
        for _ in 0..n {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_256(n: u64) -> f32 {
        unsafe {
            let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(1.0); CHAINS_256];
            for _ in 0..n {
                for a in &mut acc {
                    *a = _mm256_fmadd_ps(*a, m, c);
                }
            }
            let mut lanes = [0.0f32; 8];
            acc.iter()
                .map(|&a| {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                    lanes.iter().sum::<f32>()
                })
                .sum()
        }
    }
}
