//! Every tuning constant of the kernels, with the measurement that chose it.
//!
//! Changing one changes speed only, never results beyond rounding: the tests run
//! sizes on both sides of each. Numbers are from the project's 2-core AMD EPYC
//! (Zen 3, AVX2) machine, f32, head_dim 64, unless said otherwise.

// ---- which path serves a head (`super::forward`) ----

/// Heads with at most this many `L·S·(d_k + d_v + 16)` go row by row
/// ([`super::rowwise`]): packing costs more than it saves. A 3-token, 4-wide call
/// takes 0.27 µs row by row; through the direct path it took 0.55 µs. The 16
/// counts a score's `exp` (the standard library's, one at a time) as sixteen
/// multiply-adds: without it (2026-12-05, Zen 4, f32, µs) 32 × 32 × 8 took 7.3
/// row by row against 4.9 tiled, 8 × 64 × 16 5.0 against 2.5 direct, 4 × 128 ×
/// 16 5.3 against 2.3; with it 16 × 16 × 32 leaves the rows (3.9 → 4.2) and
/// 32 × 8 × 32, whose 8 keys the tiled kernel packs for little, 4.3 → 5.2.
pub(crate) const ROWWISE_MAX_WORK: usize = 1 << 14;

/// The same bound for heads of at most [`DIRECT_MAX_ROWS`] query rows, whose
/// alternative is the direct path (no packing: about 0.65 µs a call and 0.4 µs
/// a head besides the arithmetic), not the tiled kernel. Row by row a score
/// costs its `exp` from the standard library and an unvectorised dot product:
/// one row of d = 64 against S = 8 / 16 / 32 / 64 / 112 keys took 0.52 / 0.83
/// / 1.48 / 2.79 / 4.78 µs there against 0.83–0.92 / 0.82–0.90 / 0.96–1.04 /
/// 1.17–1.27 / 1.56–1.69 direct; eight such heads at S = 64 21.7 against 6.8
/// (2026-12-05, Zen 4, f32, one thread; it was [`ROWWISE_MAX_WORK`] before).
/// The crossover is near 2 000 for one head (S ≈ 14 at d = 64, S ≈ 64 at d =
/// 16, L = 4 × S ≈ 20 at d = 16) and lower for many; the 3 × 4 call (216)
/// stays on the rows.
pub(crate) const ROWWISE_MAX_WORK_FEW_ROWS: usize = 1 << 11;

/// Heads with at most this many query rows take the direct path
/// ([`super::direct`]), which reads keys and values where they lie instead of
/// packing them. At S = 4096 (8 heads, 2 threads) the tiled kernel took
/// 4.6 / 4.6 / 5.0 / 5.2 ms for 1 / 4 / 8 / 12 query rows, the direct path
/// 0.32 / 1.0 / 2.1 ms for 1 / 4 / 8: the crossover is near 10.
pub(crate) const DIRECT_MAX_ROWS: usize = 8;

// ---- the layers' products (`super::weights`, `crate::layers::product`) ----

/// Products of at least this many multiply-adds share their rows (or, for a few
/// rows, their columns) among the pool's threads: about 20 µs of work on one
/// core, well above the cost of handing a part to another thread.
pub(crate) const PRODUCT_PARALLEL_MIN_WORK: usize = 1 << 20;

// ---- the tiled kernel (`super::tiled`) ----

/// Rows of a register tile (queries in `S = Q·Kᵀ`, output rows in `O += P·V`):
/// 12 rows × two 512-bit registers = 24 accumulators of AVX-512's 32 registers
/// (AVX2, with 16, sums them as two halves of 6). 12 rows against 6 on the Intel
/// Xeon host of 2026-12-03: f32 prefill +3-8 % at N = 128-2048, f64 +12 %.
pub(crate) const MR: usize = 12;

// Columns of a register tile (`NR`) belong to each instruction set's token, with
// the measurement that chose them: `F32_TILE` and `F64_TILE` in `arch/avx512.rs`
// (32 and 16), `arch/avx2.rs` (16 and 8) and `arch/portable.rs` (8 and 4).

/// Query rows per block, a multiple of [`MR`]: one block is one parallel task.
pub(crate) const BR: usize = 48;

/// Keys per block, a multiple of every tile width: long enough to amortise the
/// rescale of the output (`O = α·O + P·V`) over many keys, short enough that a
/// block's scores (`BR × BC`) stay in L1/L2. 256 was faster than 128 at every
/// N ≥ 512; the last block computes only the key panels it needs, so N = 128
/// does not pay for 256. On an Intel Xeon (Emerald Rapids, 48 KiB L1d, where a
/// block's 48 KiB of scores no longer fit beside anything) 256 still won, in
/// alternating runs of both builds: 102–109 against 74–98 GFLOP/s at
/// N = 512–2048 (f32, one thread, AVX-512).
pub(crate) const BC: usize = 256;

/// Packed keys and values held at once: key/value heads are packed in waves of
/// this many bytes (but at least one per thread), so a wave stays in L2. 8 MiB
/// waves were slower than 1 MiB ones.
pub(crate) const PACKED_BYTES: usize = 1 << 20;

// ---- the direct (decoding) path (`super::direct`) ----

/// Query rows attended together in one pass over the keys and values: every
/// query head of a grouped-query group reads a key row once. Matches
/// [`DIRECT_MAX_ROWS`], so one decoding step of one group is one pass.
pub(crate) const DIRECT_BATCH_ROWS: usize = 8;

/// Keys per step of the direct path's online softmax: a chunk's scores stay in L1.
pub(crate) const DIRECT_CHUNK: usize = 256;

/// Keys per step when keys and values are stored in half precision and widened
/// to f32 for the step: the widened rows (`WIDEN_CHUNK × d` floats each for keys
/// and values, 16 KiB each at d = 64) stay in L1 until they are used.
pub(crate) const WIDEN_CHUNK: usize = 64;

/// Keys per part, at most: a long cache is cut into even parts that may run
/// on different threads and are merged afterwards (split-key decoding), so a
/// single key/value head uses every thread. The cut does not depend on the
/// number of threads, so neither does the result. With 1 key/value head and
/// 4096 cached positions one step took 0.22 ms on 2 threads.
pub(crate) const DIRECT_PART: usize = 2048;

/// Direct-path calls of less work than this (`Σ rows · S · (d_k + d_v)` over
/// the key/value heads) run on the calling thread, not the pool: handing work
/// to rayon from outside its pool and waiting for it costs ~6 µs. A decoding
/// step of 8 heads of d = 64 over 17 / 65 cached positions, called from the
/// main thread with a pool of two: f32 10.7 → 4.6 / 12.6 → 7.0 µs, int8 paged
/// 20.2 → 12.2 / 20.8 → 13.7 µs; over 257 (263 000) the pool is still faster
/// (19.0–19.4 against 21.0 µs on the calling thread). 2026-12-05, Zen 4.
pub(crate) const DIRECT_PARALLEL_MIN_WORK: usize = 1 << 17;

/// Bytes at the start of a paged cache's next block that the direct path asks
/// the CPU to prefetch as it begins a block: where a sequence's blocks are not
/// adjacent, the hardware prefetchers lose the stream at each block's end.
pub(crate) const PREFETCH_START: usize = 2048;

/// Lanes of the direct path's vectorised dot products (one AVX2 register of f32,
/// two of f64).
pub(crate) const LANES: usize = 8;

/// Column blocks of [`LANES`] that the direct path's value products sum together
/// in registers for a single row (64 f32 columns: one head of 64 in one pass).
pub(crate) const TILE_BLOCKS: usize = 8;

/// How many rows ahead of the one being read the half-precision direct path
/// asks for keys and values, on the CPUs where that helps (Intel: see
/// `direct::Prefetch`). On the Intel Xeon host of 2026-12-03, 8, 16, 32 and 64
/// rows ahead measured alike (a bf16/f16 step 355-432 -> 310-336 µs).
pub(crate) const PREFETCH_ROWS: usize = 16;

/// Lanes of the softmax passes (maximum, `exp` and sum) over a row of scores in
/// the direct path and the backward pass. With 8, the compiler left the `exp`
/// polynomial scalar in the direct path; with 16 it vectorises: a bf16 decoding
/// step (8 heads, 4096 cached, Zen 4) went from 320 to 255 µs, f32 from 450 to
/// 370 µs.
pub(crate) const SOFTMAX_LANES: usize = 16;

// ---- the fused backward pass (`super::backward`) ----

/// Query rows per block of the backward pass: the block's `dQ`, scaled queries and
/// `dO` stay in L1 across a key block. 72 and 96 were no faster (Zen 4, f32,
/// 8 heads, N = 512 and 2048).
pub(crate) const BACKWARD_QUERIES: usize = 64;

/// Keys per block of the backward pass: a block's `P` and `dS` (`64 × 128` each,
/// 32 KiB in f32) stay in L2, and each key panel of a product
/// ([`super::gemm`]) is used by every query panel of the block. Must be a
/// multiple of every tile width, so that each key block starts a panel.
pub(crate) const BACKWARD_KEYS: usize = 128;

/// Parts the query blocks of a call of one head (the 2-D call) are cut into,
/// each a task of its own with its own `dK` and `dV`, summed in part order: a
/// single head's backward runs on every thread, and its bits depend on the
/// shapes only, never on the number of threads. Four parts keep two threads
/// busy under a causal mask (whose later query blocks cost more).
pub(crate) const BACKWARD_PARTS: usize = 2;
