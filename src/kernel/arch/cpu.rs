//! What the CPU is, beyond its instruction sets: the one place that reads CPUID
//! for a tuning choice (the instruction sets themselves are detected with
//! `is_x86_feature_detected!` in this folder's `mod.rs`).

use std::sync::OnceLock;

/// Whether this CPU's vendor is Intel (CPUID leaf 0: "GenuineIntel"), read once.
pub(crate) fn is_intel() -> bool {
    static INTEL: OnceLock<bool> = OnceLock::new();
    *INTEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
            #[allow(unused_unsafe)]
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}
