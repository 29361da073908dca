//! The tiled kernel for keys and values stored in bf16 on CPUs with AMX (Intel
//! Sapphire Rapids and later): both products of a block, `S = Q·Kᵀ` and `P·V`,
//! on the tile unit (`tdpbf16ps`: a 16 × 16 tile of f32 sums, each step adding
//! the products of 32 bf16 pairs), the online softmax between them with
//! AVX-512. Rust has no stable AMX intrinsics or target features, so the tile
//! instructions are inline `asm!`, and detection reads CPUID and asks Linux for
//! the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`) itself.
//!
//! Accuracy: the queries are rounded to bf16 (as by [`Avx512Bf16`]), and so are
//! the weights `P = exp(S − max)` before `P·V` (each by at most 2⁻⁸ of itself;
//! the row's sum, which divides, is of the f32 weights), as PyTorch's CPU
//! kernel does: an output moves by at most 2⁻⁸ of the largest value, the size
//! of the values' own bf16 rounding (`tests/half.rs` allows one bf16 spacing of
//! the largest value where AMX ran).
//! Products of bf16 pairs are exact in f32; the tile unit adds them in an order
//! of its own, and treats subnormal inputs as zero.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use ndarray::ArrayView2;

use super::avx2::Avx2;
use super::avx512::Avx512;
use super::avx512bf16::Avx512Bf16;
use super::{Dispatch, KernelArch, Op, Token};
use crate::kernel::direct::{Dots, HalfDots, Narrow};
use crate::kernel::float::{Fused, MulAdd};
use crate::kernel::pack::{
    Bf16Pair, Entry, PackPanel, PackedKeys, PackedValues, TILE_PAIRS, TilePair,
};
use crate::kernel::params::{BC, BR, LANES, MR, TILE_BLOCKS};
use crate::kernel::tiled::{KeyTiles, Panels, Tiles, Weights};

/// Keys per panel, and value columns per group: the 16 f32 columns of a tile.
const NR: usize = 16;

/// Rows of a tile: query rows of a score tile, output rows of a value tile.
const TILE_ROWS: usize = 16;

/// Keys per step of `P·V`: a tile row of 32 bf16 weights.
const KEY_STEP: usize = 2 * TILE_PAIRS;

const _: () = assert!(BR.is_multiple_of(TILE_ROWS) && BC.is_multiple_of(KEY_STEP));

/// Proof that the CPU has AMX-TILE and AMX-BF16, that Linux lets this process
/// use the tile data, and everything [`Avx512Bf16`] proves: [`detect`](Self::detect)
/// is the only way to make one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Amx {
    bf16: Avx512Bf16,
    avx512: Avx512,
    avx2: Avx2,
}

impl Amx {
    /// The token, if this CPU and OS give AMX beside what `bf16` proves.
    pub(crate) fn detect(bf16: Avx512Bf16) -> Option<Self> {
        let avx512 = bf16.avx512();
        usable().then_some(Amx {
            bf16,
            avx512,
            avx2: avx512.avx2(),
        })
    }
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22)
/// and Linux granted this process the tile data; asked once per process.
fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU, and leaf 7 where
        // leaf 0 says so.
        #[allow(unused_unsafe)]
        let has = unsafe {
            __cpuid(0).eax >= 7 && {
                let edx = __cpuid_count(7, 0).edx;
                edx & (1 << 24) != 0 && edx & (1 << 22) != 0
            }
        };
        has && request_tile_data()
    })
}

/// Asks Linux for the tile data's state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, Linux 5.16 and later): without it the first tile
/// instruction faults. `true` when granted.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let result: i64;
    // SAFETY: the system call only changes which state the kernel saves for
    // this process; it reads and writes no memory of ours. `syscall` clobbers
    // rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") ARCH_PRCTL => result,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The tile configuration (`ldtilecfg`'s 64 bytes): palette 1, the eight tiles
/// all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tile registers, configured for one block's product and released after
/// it: no tile state outlives a call (a thread with tile state in use costs
/// the OS 8 KiB more at every switch).
struct TileUnit;

impl TileUnit {
    /// Configures the tiles.
    ///
    /// # Safety
    ///
    /// The CPU has AMX and this process the tile data (an [`Amx`] exists).
    #[inline(always)]
    unsafe fn configure() -> TileUnit {
        // SAFETY: the caller upholds the contract; `CONFIG` is 64 bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        TileUnit
    }

    /// `tmm{T} = 0`.
    #[inline(always)]
    fn zero<const T: u8>(&self) {
        // SAFETY: `self` proves the tiles are configured.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) };
    }

    /// Loads `tmm{T}`: 16 rows of 64 bytes, row `i` at `from + i·stride`.
    ///
    /// # Safety
    ///
    /// The 16 rows are readable.
    #[inline(always)]
    unsafe fn load<const T: u8>(&self, from: *const u8, stride: usize) {
        // SAFETY: the caller upholds the contract; `self` proves the configuration.
        unsafe {
            asm!(
                "tileloadd tmm{t}, [{p} + {s}*1]",
                t = const T, p = in(reg) from, s = in(reg) stride,
                options(nostack, readonly),
            )
        };
    }

    /// Stores `tmm{T}`: 16 rows of 16 f32, row `i` at `to + i·stride`.
    ///
    /// # Safety
    ///
    /// The 16 rows are writable.
    #[inline(always)]
    unsafe fn store<const T: u8>(&self, to: *mut u8, stride: usize) {
        // SAFETY: the caller upholds the contract; `self` proves the configuration.
        unsafe {
            asm!(
                "tilestored [{p} + {s}*1], tmm{t}",
                t = const T, p = in(reg) to, s = in(reg) stride,
                options(nostack),
            )
        };
    }

    /// `tmm{C} += tmm{A} · tmm{B}`: `A` 16 rows of 16 bf16 pairs, `B` 16 rows
    /// (steps) of 16 columns' pairs, `C` 16 × 16 f32.
    #[inline(always)]
    fn dot<const C: u8, const A: u8, const B: u8>(&self) {
        // SAFETY: `self` proves the tiles are configured; registers only.
        unsafe {
            asm!(
                "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
                c = const C, a = const A, b = const B,
                options(nostack, nomem),
            )
        };
    }
}

impl Drop for TileUnit {
    fn drop(&mut self) {
        // SAFETY: a `TileUnit` exists only where the CPU has AMX.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

impl PackPanel<f32, NR> for Amx {
    #[inline(always)]
    fn pack_panel(self, src: &[f32], stride: usize, lines: usize, out: &mut [[f32; NR]]) {
        self.avx2.pack_panel(src, stride, lines, out)
    }
}

/// The register tiles of f32 (never used by the AMX blocks, but every token
/// has them) are AVX2's 16 columns; the softmax's `exp` is AVX-512's.
impl Tiles<f32, NR> for Amx {
    #[inline(always)]
    fn score_tile(self, q: &[[f32; MR]], k: &[[f32; NR]], rows: usize) -> [[f32; NR]; MR] {
        self.avx2.score_tile(q, k, rows)
    }

    #[inline(always)]
    fn value_tile(
        self,
        p: &[&[f32; BC]; MR],
        v: &[[f32; NR]],
        alpha: &[f32; MR],
        o: &mut [[f32; NR]; MR],
    ) {
        self.avx2.value_tile(p, v, alpha, o)
    }

    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [f32], shift: f32) -> f32 {
        Tiles::<f32, { Avx512::F32_TILE }>::exp_and_sum::<M>(self.avx512, row, shift)
    }

    /// Four registers of maxima in flight (one waits on its last `vmaxps`),
    /// then one for the panels left; NaN is passed over, as by `fold_max`.
    #[inline(always)]
    fn row_max(self, row: &[f32]) -> f32 {
        let (fours, rest) = row.as_chunks::<{ 4 * NR }>();
        let (panels, tail) = rest.as_chunks::<NR>();
        // SAFETY: `self` proves AVX-512 F; each load reads 16 f32 of a chunk.
        // `vmaxps x, m` is `x > m ? x : m`: a NaN `x` leaves `m`.
        unsafe {
            let mut lanes = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
            for chunk in fours {
                for (i, lane) in lanes.iter_mut().enumerate() {
                    *lane = _mm512_max_ps(_mm512_loadu_ps(chunk[i * NR..].as_ptr()), *lane);
                }
            }
            let mut one = _mm512_max_ps(
                _mm512_max_ps(lanes[0], lanes[1]),
                _mm512_max_ps(lanes[2], lanes[3]),
            );
            for panel in panels {
                one = _mm512_max_ps(_mm512_loadu_ps(panel.as_ptr()), one);
            }
            let max = _mm512_reduce_max_ps(one);
            tail.iter().fold(max, |m, &x| if x > m { x } else { m })
        }
    }
}

impl KeyTiles<f32, TilePair, NR> for Amx {
    const ROW_TILE: usize = TILE_ROWS;

    fn key_tile(self, _: &[[TilePair; MR]], _: &[[TilePair; NR]]) -> [[f32; NR]; MR] {
        unreachable!("the AMX blocks compute their scores in tiles of 16 rows")
    }

    /// Row-major: query `i`'s pairs at `out[i·depth ..]`, so that a tile loads
    /// 16 rows of 16 pairs; the rows past the block's zero.
    #[inline(always)]
    fn pack_block_queries(
        self,
        q: ArrayView2<'_, f32>,
        scale: f32,
        depth: usize,
        out: &mut [TilePair],
    ) {
        let rows = q.nrows();
        for (row, packed) in q.outer_iter().zip(out.chunks_exact_mut(depth)) {
            TilePair::pack_query(row, scale, |p, pair| packed[p] = pair);
        }
        let computed = rows.next_multiple_of(TILE_ROWS);
        out[rows * depth..computed * depth].fill(TilePair::zero());
    }

    /// Two panels of 16 keys against 32 query rows at a time (four tiles of
    /// sums in flight: one tile's sum waits on its last step), each summed over
    /// the depth's rows of 16 pairs and stored into the scores' rows; then the
    /// scale.
    #[inline(always)]
    fn block_scores(
        self,
        q: &[TilePair],
        keys: &PackedKeys<TilePair>,
        panels: Panels,
        scale: Option<f32>,
        s: &mut [f32],
    ) {
        let depth = keys.depth;
        let Panels { j0, width, rows } = panels;
        let first = j0 / NR * NR * depth;
        assert!(
            depth.is_multiple_of(TILE_PAIRS)
                && rows.is_multiple_of(TILE_ROWS)
                && rows <= BR
                && width.is_multiple_of(NR)
                && width <= BC
                && q.len() >= rows * depth
                && keys.data.len() >= first + width * depth
                && s.len() >= BR * BC,
            "an AMX block's tiles lie within its operands"
        );
        let (q, k, out) = (q.as_ptr(), keys.data[first..].as_ptr(), s.as_mut_ptr());
        let grid = Grid {
            rows: rows / TILE_ROWS,
            columns: width / NR,
            steps: depth / TILE_PAIRS,
        };
        // SAFETY: `self` proves AMX. By the assertion, a tile of query rows `t`
        // and pairs `c·16 ..` lies within `q` (`t·16 + 16 ≤ rows` rows of `depth`
        // pairs), a tile of panel `p` and steps `c·16 ..` within the keys
        // (`first + width·depth`), and a tile of scores within `s`.
        unsafe {
            let tiles = TileUnit::configure();
            let query_bytes = depth * size_of::<TilePair>();
            for group in grid.groups() {
                tiles.sum_group(
                    group,
                    grid.steps,
                    |t, c| {
                        (
                            q.add(t * TILE_ROWS * depth + c * TILE_PAIRS).cast(),
                            query_bytes,
                        )
                    },
                    |p, c| k.add((p * depth + c * TILE_PAIRS) * NR).cast(),
                );
                for (tile, t, p) in group.tiles() {
                    let at = out.add(t * TILE_ROWS * BC + p * NR);
                    tiles.store_to(tile, at.cast(), BC * size_of::<f32>());
                }
            }
        }
        if let Some(scale) = scale {
            for row in s.chunks_exact_mut(BC).take(rows) {
                for x in &mut row[..width] {
                    *x *= scale;
                }
            }
        }
    }

    /// The weights are rounded to bf16 in place (each row's first `2·width`
    /// bytes, zero to a whole step of 32 keys); 32 output rows and 32 value
    /// columns at a time, each tile summing `P·V` over the block's keys, 32 at
    /// a time, then added to the rescaled output with AVX-512.
    #[inline(always)]
    fn block_values(
        self,
        weights: Weights<'_, f32>,
        values: &PackedValues<Bf16Pair>,
        j0: usize,
        o: &mut [f32],
    ) {
        let Weights {
            p,
            alpha,
            width,
            rows,
            ..
        } = weights;
        let steps = width.next_multiple_of(KEY_STEP);
        let first_step = j0 / 2;
        assert!(
            j0.is_multiple_of(2)
                && rows.is_multiple_of(TILE_ROWS)
                && rows <= BR
                && steps <= BC
                && p.len() >= BR * BC
                && alpha.len() >= rows
                && first_step + steps / 2 <= values.s
                && values.data.len() >= values.col_tiles * values.s * NR
                && o.len() >= values.col_tiles * BR * NR,
            "an AMX block's tiles lie within its operands"
        );
        for row in p.chunks_exact_mut(BC).take(rows) {
            self.round_in_place(row, width, steps);
        }
        let grid = Grid {
            rows: rows / TILE_ROWS,
            columns: values.col_tiles,
            steps: steps / KEY_STEP,
        };
        let (weights, pairs) = (p.as_ptr().cast::<u8>(), values.data.as_ptr());
        let row_bytes = BC * size_of::<f32>();
        let mut sums = [[0.0f32; NR]; TILE_ROWS];
        // SAFETY: `self` proves AMX. By the assertion, a tile of weight rows
        // `t·16 ..` and bytes `c·64 ..` lies within `p` (rows of `BC·4` bytes,
        // `c·64 + 64 ≤ 2·steps`), a tile of column group `ct` and steps
        // `j0/2 + c·16 ..` within the values; every store writes `sums`.
        unsafe {
            let tiles = TileUnit::configure();
            for group in grid.groups() {
                tiles.sum_group(
                    group,
                    grid.steps,
                    |t, c| (weights.add(t * TILE_ROWS * row_bytes + c * 64), row_bytes),
                    |ct, c| {
                        pairs
                            .add((ct * values.s + first_step + c * TILE_PAIRS) * NR)
                            .cast()
                    },
                );
                for (tile, t, ct) in group.tiles() {
                    tiles.store_to(tile, sums.as_mut_ptr().cast(), 64);
                    let out = &mut o[(ct * BR + t * TILE_ROWS) * NR..][..TILE_ROWS * NR];
                    self.add_scaled(out, &alpha[t * TILE_ROWS..][..TILE_ROWS], &sums);
                }
            }
        }
    }
}

/// The tiles of one block product: `rows × columns` tiles of sums, each over
/// `steps` steps.
#[derive(Clone, Copy)]
struct Grid {
    rows: usize,
    columns: usize,
    steps: usize,
}

impl Grid {
    /// The grid's tiles in groups of at most two rows and two columns of
    /// tiles, row after row.
    fn groups(self) -> impl Iterator<Item = Group> {
        (0..self.rows).step_by(2).flat_map(move |t| {
            (0..self.columns).step_by(2).map(move |p| Group {
                t,
                p,
                rows: (self.rows - t).min(2),
                columns: (self.columns - p).min(2),
            })
        })
    }
}

/// Tiles `(t + r, p + c)` for `r < rows ≤ 2`, `c < columns ≤ 2` of a [`Grid`],
/// summed in tile registers `2r + c`.
#[derive(Clone, Copy)]
struct Group {
    t: usize,
    p: usize,
    rows: usize,
    columns: usize,
}

impl Group {
    /// Each tile of the group: `(register, t, p)`.
    fn tiles(self) -> impl Iterator<Item = (u8, usize, usize)> {
        (0..self.rows).flat_map(move |r| {
            (0..self.columns).map(move |c| ((2 * r + c) as u8, self.t + r, self.p + c))
        })
    }
}

impl TileUnit {
    /// The tiles of `group`, each `Σ_c A(t, c)·B(p, c)` over `steps` steps:
    /// sums in tile registers 0–3, `A` in 4–5, `B` in 6–7. `a(t, c)` is the
    /// address and row stride of `A`'s tile, `b(p, c)` the address of `B`'s
    /// (rows of 64 bytes).
    ///
    /// # Safety
    ///
    /// Every tile `a` and `b` give is readable.
    #[inline(always)]
    unsafe fn sum_group(
        &self,
        group: Group,
        steps: usize,
        a: impl Fn(usize, usize) -> (*const u8, usize),
        b: impl Fn(usize, usize) -> *const u8,
    ) {
        let Group { t, p, .. } = group;
        // SAFETY: the caller upholds the contract.
        unsafe {
            match (group.rows, group.columns) {
                (2, 2) => self.two_by_two::<2, 2>(t, p, steps, &a, &b),
                (2, _) => self.two_by_two::<2, 1>(t, p, steps, &a, &b),
                (_, 2) => self.two_by_two::<1, 2>(t, p, steps, &a, &b),
                _ => self.two_by_two::<1, 1>(t, p, steps, &a, &b),
            }
        }
    }

    /// Tiles `(t + r, p + c)` for `r < R`, `c < C` (each at most 2) into tile
    /// registers `2r + c`.
    ///
    /// # Safety
    ///
    /// As [`sum_group`](Self::sum_group).
    #[inline(always)]
    unsafe fn two_by_two<const R: usize, const C: usize>(
        &self,
        t: usize,
        p: usize,
        steps: usize,
        a: &impl Fn(usize, usize) -> (*const u8, usize),
        b: &impl Fn(usize, usize) -> *const u8,
    ) {
        self.zero::<0>();
        if C > 1 {
            self.zero::<1>();
        }
        if R > 1 {
            self.zero::<2>();
            if C > 1 {
                self.zero::<3>();
            }
        }
        for c in 0..steps {
            // SAFETY: the caller upholds the contract.
            unsafe {
                let (first, stride) = a(t, c);
                self.load::<4>(first, stride);
                if R > 1 {
                    let (second, stride) = a(t + 1, c);
                    self.load::<5>(second, stride);
                }
                self.load::<6>(b(p, c), 64);
                if C > 1 {
                    self.load::<7>(b(p + 1, c), 64);
                }
            }
            self.dot::<0, 4, 6>();
            if C > 1 {
                self.dot::<1, 4, 7>();
            }
            if R > 1 {
                self.dot::<2, 5, 6>();
                if C > 1 {
                    self.dot::<3, 5, 7>();
                }
            }
        }
    }

    /// Stores tile register `tile` (0–3): 16 rows of 16 f32 at `to + i·stride`.
    ///
    /// # Safety
    ///
    /// The 16 rows are writable.
    #[inline(always)]
    unsafe fn store_to(&self, tile: u8, to: *mut u8, stride: usize) {
        // SAFETY: the caller upholds the contract.
        unsafe {
            match tile {
                0 => self.store::<0>(to, stride),
                1 => self.store::<1>(to, stride),
                2 => self.store::<2>(to, stride),
                _ => self.store::<3>(to, stride),
            }
        }
    }
}

impl Amx {
    /// `out[i] = α[i]·out[i] + sums[i]` for the 16 rows of one output tile.
    #[inline(always)]
    fn add_scaled(self, out: &mut [f32], alpha: &[f32], sums: &[[f32; NR]; TILE_ROWS]) {
        for ((row, &a), sum) in out.chunks_exact_mut(NR).zip(alpha).zip(sums) {
            // SAFETY: `self` proves AVX-512 F; each access is one row of 16 f32.
            unsafe {
                let o = _mm512_loadu_ps(row.as_ptr());
                let s = _mm512_loadu_ps(sum.as_ptr());
                _mm512_storeu_ps(row.as_mut_ptr(), _mm512_fmadd_ps(_mm512_set1_ps(a), o, s));
            }
        }
    }

    /// Rounds the first `width` weights of `row` to bf16, written as bf16 from
    /// the row's first byte, followed by zeros up to `steps` weights (`steps ≤
    /// row.len()`, a multiple of 32). The bf16 of weight `j` lands at byte `2j`,
    /// never past a weight not yet read (at byte `4j`).
    #[inline(always)]
    fn round_in_place(self, row: &mut [f32], width: usize, steps: usize) {
        assert!(steps <= row.len() && steps.is_multiple_of(KEY_STEP));
        let at = row.as_mut_ptr();
        for j in (0..steps).step_by(KEY_STEP) {
            let lanes = |from: usize| match width.saturating_sub(j + from) {
                n if n >= 16 => 0xffff,
                n => (1u16 << n) - 1,
            };
            // SAFETY: `self` proves AVX-512 F and AVX512_BF16; the masked loads
            // read only weights below `min(width, j + 32) ≤ steps ≤ row.len()`,
            // the store writes bytes `2j .. 2j + 64 ≤ 4·steps`, after the loads
            // of the weights there.
            unsafe {
                let low = _mm512_maskz_loadu_ps(lanes(0), at.add(j));
                let high = _mm512_maskz_loadu_ps(lanes(16), at.add(j + 16));
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(at.cast::<u16>().add(j).cast(), pairs);
            }
        }
    }
}

impl Dots<f32> for Amx {
    #[inline(always)]
    fn dot4(self, q: &[[f32; LANES]], k: &[&[[f32; LANES]]; 4]) -> [f32; 4] {
        self.bf16.dot4(q, k)
    }

    #[inline(always)]
    fn value_rows(
        self,
        p: &[&[f32]; 4],
        values: &[f32],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; 4] {
        self.bf16.value_rows(p, values, d_v, c0)
    }

    #[inline(always)]
    fn exp_and_sum<M: MulAdd>(self, row: &mut [f32], shift: f32) -> f32 {
        Dots::<f32>::exp_and_sum::<M>(self.bf16, row, shift)
    }
}

impl HalfDots for Amx {
    #[inline(always)]
    fn scores_i8(self, q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
        self.bf16.scores_i8(q, keys, d, out);
    }

    #[inline(always)]
    fn values_i8(self, w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
        self.bf16.values_i8(w, values, d_v, out);
    }

    #[inline(always)]
    fn dot4_half<H: Narrow>(self, q: &[[f32; LANES]], k: &[&[[H; LANES]]; 4]) -> [f32; 4] {
        self.bf16.dot4_half(q, k)
    }

    #[inline(always)]
    fn value_row_half<H: Narrow>(
        self,
        p: &[f32],
        values: &[H],
        d_v: usize,
        c0: usize,
    ) -> [[f32; LANES]; TILE_BLOCKS] {
        self.bf16.value_row_half(p, values, d_v, c0)
    }
}

impl Token<f32, NR> for Amx {
    type MulAdd = Fused;
}

trampoline!(
    Amx,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
);

impl Dispatch<f32, TilePair> for Amx {
    fn kind(self) -> KernelArch {
        KernelArch::Amx
    }

    #[inline]
    fn dispatch<O: Op<f32, TilePair>>(self, op: O) -> O::Output {
        self.vectorize::<f32, TilePair, O, NR>(op)
    }
}
