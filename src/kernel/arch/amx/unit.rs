//! The tile unit: detection, the tile configuration, and the block products of
//! 2 × 2 tiles of sums, in inline `asm!` (Rust has no stable AMX intrinsics or
//! target features).

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22)
/// and Linux granted this process the tile data; asked once per process.
pub(super) fn usable() -> bool {
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
pub(super) struct TileUnit;

impl TileUnit {
    /// Configures the tiles.
    ///
    /// # Safety
    ///
    /// The CPU has AMX and this process the tile data (an [`Amx`](super::Amx) exists).
    #[inline(always)]
    pub(super) unsafe fn configure() -> TileUnit {
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

/// The tiles of one block product: `rows × columns` tiles of sums, each over
/// `steps` steps.
#[derive(Clone, Copy)]
pub(super) struct Grid {
    pub(super) rows: usize,
    pub(super) columns: usize,
    pub(super) steps: usize,
}

impl Grid {
    /// The grid's tiles in groups of at most two rows and two columns of
    /// tiles, row after row.
    pub(super) fn groups(self) -> impl Iterator<Item = Group> {
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
pub(super) struct Group {
    t: usize,
    p: usize,
    rows: usize,
    columns: usize,
}

impl Group {
    /// Each tile of the group: `(register, t, p)`.
    pub(super) fn tiles(self) -> impl Iterator<Item = (u8, usize, usize)> {
        (0..self.rows).flat_map(move |r| {
            (0..self.columns).map(move |c| ((2 * r + c) as u8, self.t + r, self.p + c))
        })
    }
}

impl TileUnit {
    /// The tiles of `group`, each `Σ_c A(t, c)·B(p, c)` over `steps` steps:
    /// sums in tile registers 0–3, `A` in 4–5, `B` in 6–7. `a(t, c)` and
    /// `b(p, c)` are the address and row stride of `A`'s and `B`'s tiles.
    ///
    /// # Safety
    ///
    /// Every tile `a` and `b` give is readable.
    #[inline(always)]
    pub(super) unsafe fn sum_group(
        &self,
        group: Group,
        steps: usize,
        a: impl Fn(usize, usize) -> (*const u8, usize),
        b: impl Fn(usize, usize) -> (*const u8, usize),
    ) {
        let zero = |tile: u8, _: usize, _: usize| self.zero_to(tile);
        // SAFETY: the caller upholds the contract.
        unsafe { self.group_with(group, steps, &a, &b, &zero) }
    }

    /// The tiles of `group` of f32 sums at `c(t, p)` (address and row
    /// stride), each added `Σ_c A(t, c)·B(p, c)` over `steps` steps, as
    /// [`sum_group`](Self::sum_group) sums them, and stored back.
    ///
    /// # Safety
    ///
    /// Every tile `a` and `b` give is readable, and every tile `c` gives
    /// readable and writable.
    #[inline(always)]
    pub(super) unsafe fn add_group(
        &self,
        group: Group,
        steps: usize,
        a: impl Fn(usize, usize) -> (*const u8, usize),
        b: impl Fn(usize, usize) -> (*const u8, usize),
        c: impl Fn(usize, usize) -> (*mut u8, usize),
    ) {
        // SAFETY: the caller upholds the contract.
        unsafe {
            let load = |tile: u8, t: usize, p: usize| {
                let (at, stride) = c(t, p);
                self.load_to(tile, at, stride)
            };
            self.group_with(group, steps, &a, &b, &load);
            for (tile, t, p) in group.tiles() {
                let (at, stride) = c(t, p);
                self.store_to(tile, at, stride);
            }
        }
    }

    /// [`two_by_two`](Self::two_by_two) for the group's shape, each sum
    /// started by `start(register, t, p)`.
    ///
    /// # Safety
    ///
    /// As [`sum_group`](Self::sum_group), and `start` only reads readable tiles.
    #[inline(always)]
    unsafe fn group_with(
        &self,
        group: Group,
        steps: usize,
        a: &impl Fn(usize, usize) -> (*const u8, usize),
        b: &impl Fn(usize, usize) -> (*const u8, usize),
        start: &impl Fn(u8, usize, usize),
    ) {
        let Group { t, p, .. } = group;
        // SAFETY: the caller upholds the contract.
        unsafe {
            match (group.rows, group.columns) {
                (2, 2) => self.two_by_two::<2, 2>(t, p, steps, a, b, start),
                (2, _) => self.two_by_two::<2, 1>(t, p, steps, a, b, start),
                (_, 2) => self.two_by_two::<1, 2>(t, p, steps, a, b, start),
                _ => self.two_by_two::<1, 1>(t, p, steps, a, b, start),
            }
        }
    }

    /// Tiles `(t + r, p + c)` for `r < R`, `c < C` (each at most 2) into tile
    /// registers `2r + c`, each started by `start`.
    ///
    /// # Safety
    ///
    /// As [`group_with`](Self::group_with).
    #[inline(always)]
    unsafe fn two_by_two<const R: usize, const C: usize>(
        &self,
        t: usize,
        p: usize,
        steps: usize,
        a: &impl Fn(usize, usize) -> (*const u8, usize),
        b: &impl Fn(usize, usize) -> (*const u8, usize),
        start: &impl Fn(u8, usize, usize),
    ) {
        start(0, t, p);
        if C > 1 {
            start(1, t, p + 1);
        }
        if R > 1 {
            start(2, t + 1, p);
            if C > 1 {
                start(3, t + 1, p + 1);
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
                let (first, stride) = b(p, c);
                self.load::<6>(first, stride);
                if C > 1 {
                    let (second, stride) = b(p + 1, c);
                    self.load::<7>(second, stride);
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

    /// `tmm{tile} = 0` for tile register `tile` (0–3).
    #[inline(always)]
    fn zero_to(&self, tile: u8) {
        match tile {
            0 => self.zero::<0>(),
            1 => self.zero::<1>(),
            2 => self.zero::<2>(),
            _ => self.zero::<3>(),
        }
    }

    /// Loads tile register `tile` (0–3): 16 rows of 64 bytes at `from + i·stride`.
    ///
    /// # Safety
    ///
    /// The 16 rows are readable.
    #[inline(always)]
    unsafe fn load_to(&self, tile: u8, from: *const u8, stride: usize) {
        // SAFETY: the caller upholds the contract.
        unsafe {
            match tile {
                0 => self.load::<0>(from, stride),
                1 => self.load::<1>(from, stride),
                2 => self.load::<2>(from, stride),
                _ => self.load::<3>(from, stride),
            }
        }
    }

    /// Stores tile register `tile` (0–3): 16 rows of 16 f32 at `to + i·stride`.
    ///
    /// # Safety
    ///
    /// The 16 rows are writable.
    #[inline(always)]
    pub(super) unsafe fn store_to(&self, tile: u8, to: *mut u8, stride: usize) {
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
