//! Operands packed for the micro-kernels: keys and values once per key/value head
//! for the tiled kernel, and [`Panels`], the packing of any operand of the
//! backward's block products (`gemm.rs`).

use std::ops::Range;

use half::bf16;
use ndarray::{ArrayView1, ArrayView2};

use super::fusable::{Extent, Scan};
use crate::element::Element;

/// Keys packed for the micro-kernel: panels of `NR` keys, each stored
/// `depth × NR` (the `p`-th entries of `NR` consecutive keys side by side),
/// zero-padded to a whole panel. An entry `K` is one component (`K = A`) or a
/// pair of them ([`Bf16Pair`]).
#[derive(Debug)]
pub(crate) struct PackedKeys<K> {
    pub(crate) data: Vec<K>,
    /// Entries per key.
    pub(crate) depth: usize,
}

/// What the score micro-kernel reads of each query and key: one component of the
/// element type itself, or a pair of components ([`Bf16Pair`]) for the kernels
/// whose instructions multiply and add two products at a time.
pub(crate) trait Entry<A>: Copy + Send + Sync {
    /// What the values of a head packed with these keys are stored as (the
    /// element, or pairs of keys' values for the AMX tiles).
    type Value: Copy + Send + Sync;

    /// The entry of zero components: the padding.
    fn zero() -> Self;

    /// Entries per query or key of `d` components.
    fn depth(d: usize) -> usize;

    /// The entries of one query, `write(p, entry)` for each `p < depth(d)`; the
    /// scale is multiplied in where the entry can hold it.
    fn pack_query(row: ArrayView1<'_, A>, scale: A, write: impl FnMut(usize, Self));

    /// The factor the scores of queries packed with `scale` still need: `None`
    /// where the packed queries carry it.
    fn scale_after(scale: A) -> Option<A>;
}

impl<A: Element> Entry<A> for A {
    type Value = A;

    fn zero() -> A {
        A::zero()
    }

    fn depth(d: usize) -> usize {
        d
    }

    #[inline(always)]
    fn pack_query(row: ArrayView1<'_, A>, scale: A, mut write: impl FnMut(usize, A)) {
        for (p, &x) in row.iter().enumerate() {
            write(p, x * scale);
        }
    }

    fn scale_after(_: A) -> Option<A> {
        None
    }
}

/// Two consecutive components of a query or key in bf16, the first in the low 16
/// bits: the operand of `vdpbf16ps`, which adds both products to an f32 lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Bf16Pair(pub(crate) u32);

impl Bf16Pair {
    fn new(first: bf16, second: bf16) -> Self {
        Bf16Pair(u32::from(first.to_bits()) | (u32::from(second.to_bits()) << 16))
    }
}

/// Queries are widened from bf16 to f32 before they reach the kernel (exactly),
/// and narrowed back here (exactly again); the scale cannot ride in a bf16 query
/// without rounding it, so the scores are scaled in f32.
impl Entry<f32> for Bf16Pair {
    type Value = f32;

    fn zero() -> Self {
        Bf16Pair(0)
    }

    fn depth(d: usize) -> usize {
        d.div_ceil(2)
    }

    #[inline(always)]
    fn pack_query(row: ArrayView1<'_, f32>, _: f32, write: impl FnMut(usize, Self)) {
        narrow_pairs(row, Self::depth(row.len()), write);
    }

    fn scale_after(scale: f32) -> Option<f32> {
        Some(scale)
    }
}

/// The first `depth` pairs of `row` rounded to bf16 (zero past its end).
#[inline(always)]
fn narrow_pairs(row: ArrayView1<'_, f32>, depth: usize, mut write: impl FnMut(usize, Bf16Pair)) {
    let narrow = |i: usize| row.get(i).map_or(bf16::ZERO, |&x| bf16::from_f32(x));
    for p in 0..depth {
        write(p, Bf16Pair::new(narrow(2 * p), narrow(2 * p + 1)));
    }
}

/// A [`Bf16Pair`] of a query or key for the AMX tiles, whose rows are 16 pairs:
/// a query or key is padded with zero pairs to whole rows (a 64-wide head is
/// two rows, an 80-wide one three). The values of a head packed with these keys
/// are pairs too, of two keys' values in one column ([`PackedValues::pack_key_pairs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct TilePair(pub(crate) Bf16Pair);

/// Pairs in one row of an AMX tile (64 bytes).
pub(crate) const TILE_PAIRS: usize = 16;

impl Entry<f32> for TilePair {
    type Value = Bf16Pair;

    fn zero() -> Self {
        TilePair(Bf16Pair(0))
    }

    fn depth(d: usize) -> usize {
        d.div_ceil(2 * TILE_PAIRS) * TILE_PAIRS
    }

    #[inline(always)]
    fn pack_query(row: ArrayView1<'_, f32>, _: f32, mut write: impl FnMut(usize, Self)) {
        narrow_pairs(row, Self::depth(row.len()), |p, pair| {
            write(p, TilePair(pair))
        });
    }

    fn scale_after(scale: f32) -> Option<f32> {
        Some(scale)
    }
}

/// Values packed for the micro-kernel: for each group of `NR` value columns, all
/// keys' `NR` values in key order (the columns past `d_v` zero), as the element
/// `V` itself or as pairs of two keys' values ([`PackedValues::pack_key_pairs`]).
#[derive(Debug)]
pub(crate) struct PackedValues<V> {
    pub(crate) data: Vec<V>,
    /// Steps per column group: keys, or pairs of keys.
    pub(crate) s: usize,
    pub(crate) col_tiles: usize,
}

/// One key/value head packed for the tiled kernel, with the extents of its keys
/// and values that the pre-check needs; its keys are packed as entries `K`.
pub(crate) struct PackedHead<A, K: Entry<A> = A> {
    pub(crate) keys: PackedKeys<K>,
    pub(crate) values: PackedValues<K::Value>,
    pub(crate) key_extent: Extent<A>,
    pub(crate) value_extent: Extent<A>,
}

/// Packs one key/value head for tiles `NR` wide, the keys' panels by `packer`
/// (the token); [`super::arch`] compiles it per instruction set, so the
/// transposition of the keys runs with its vectors.
#[inline(always)]
pub(crate) fn pack_head<A: Element, const NR: usize>(
    k: &ArrayView2<'_, A>,
    v: &ArrayView2<'_, A>,
    packer: impl PackPanel<A, NR>,
) -> PackedHead<A> {
    let (keys, key_extent) = PackedKeys::pack::<NR>(k, packer);
    let (values, value_extent) = PackedValues::pack::<NR>(v);
    PackedHead {
        keys,
        values,
        key_extent,
        value_extent,
    }
}

impl<A: Element> PackedKeys<A> {
    /// Packs `k: (S, d)` in panels of `NR` keys, each by `packer`, and finds
    /// the keys' extent on the way.
    #[inline(always)]
    pub(crate) fn pack<const NR: usize>(
        k: &ArrayView2<'_, A>,
        packer: impl PackPanel<A, NR>,
    ) -> (Self, Extent<A>) {
        let (s, d) = k.dim();
        let k = k.as_standard_layout();
        let k = k.as_slice().expect("standard layout");
        let mut scan = Scan::new();
        scan.add(k);
        // the kernel reads whole panels of the keys it needs, never past the last
        let mut panels = Panels::new(NR);
        panels.pack_lines_by::<NR>(packer, k, d, s, d);
        let data = panels.into_data();
        (PackedKeys { data, depth: d }, scan.extent(s))
    }
}

/// Packs one key/value head stored in bf16 for tiles `NR` wide, the keys as
/// [`Bf16Pair`]s and the values widened to f32.
#[inline(always)]
pub(crate) fn pack_head_bf16<const NR: usize>(
    k: &ArrayView2<'_, bf16>,
    v: &ArrayView2<'_, bf16>,
) -> PackedHead<f32, Bf16Pair> {
    let (keys, key_extent) = PackedKeys::pack_pairs::<NR>(k);
    let (values, value_extent) = PackedValues::pack::<NR>(&v.mapv(bf16::to_f32).view());
    PackedHead {
        keys,
        values,
        key_extent,
        value_extent,
    }
}

/// Packs one key/value head stored in bf16 for the AMX tiles, `NR` keys to a
/// panel: the keys as [`TilePair`]s, the values as pairs of keys.
#[inline(always)]
pub(crate) fn pack_head_tiles<const NR: usize>(
    k: &ArrayView2<'_, bf16>,
    v: &ArrayView2<'_, bf16>,
) -> PackedHead<f32, TilePair> {
    let (keys, key_extent) = PackedKeys::pack_pairs::<NR>(k);
    let (values, value_extent) = PackedValues::pack_key_pairs::<NR>(v);
    PackedHead {
        keys,
        values,
        key_extent,
        value_extent,
    }
}

/// A pair of bf16 components, as [`Bf16Pair`] or [`TilePair`].
pub(crate) trait Pair: Entry<f32> {
    fn of(pair: Bf16Pair) -> Self;
}

impl Pair for Bf16Pair {
    fn of(pair: Bf16Pair) -> Self {
        pair
    }
}

impl Pair for TilePair {
    fn of(pair: Bf16Pair) -> Self {
        TilePair(pair)
    }
}

impl<K: Pair> PackedKeys<K> {
    /// Packs `k: (S, d)` in panels of `NR` keys, each step a pair of components
    /// (`K::depth(d)` of them, zero past the key's end), and finds the keys'
    /// extent (in f32) on the way.
    #[inline(always)]
    fn pack_pairs<const NR: usize>(k: &ArrayView2<'_, bf16>) -> (Self, Extent<f32>) {
        let (s, d) = k.dim();
        let k = k.as_standard_layout();
        let k = k.as_slice().expect("standard layout");
        let mut scan = Scan::new();
        let mut wide = vec![0.0; d];
        let depth = K::depth(d);
        let mut data = vec![[K::zero(); NR]; s.div_ceil(NR) * depth];
        for (panel, steps) in data.chunks_exact_mut(depth.max(1)).enumerate() {
            for (i, key) in k
                .chunks_exact(d.max(1))
                .skip(panel * NR)
                .take(NR)
                .enumerate()
            {
                for (w, x) in wide.iter_mut().zip(key) {
                    *w = x.to_f32();
                }
                scan.add(&wide);
                let (pairs, last) = key.as_chunks::<2>();
                for (step, &[first, second]) in steps.iter_mut().zip(pairs) {
                    step[i] = K::of(Bf16Pair::new(first, second));
                }
                if let [first] = *last {
                    steps[pairs.len()][i] = K::of(Bf16Pair::new(first, bf16::ZERO));
                }
            }
        }
        let data = data.into_flattened();
        (PackedKeys { data, depth }, scan.extent(s))
    }
}

impl PackedValues<Bf16Pair> {
    /// Packs `v: (S, d_v)` for the AMX tiles in column groups of `NR`: step `r`
    /// of a group holds, for each of its columns, the values of keys `2r` and
    /// `2r + 1` as one pair. The steps run past the last key, with zeros, to
    /// whole steps of 32 keys and one more half-step of 16 (a block that starts
    /// on a panel of 16 keys reads 32 at a time). Finds the values' extent (in
    /// f32) on the way.
    #[inline(always)]
    pub(crate) fn pack_key_pairs<const NR: usize>(v: &ArrayView2<'_, bf16>) -> (Self, Extent<f32>) {
        let (s, d_v) = v.dim();
        let v = v.as_standard_layout();
        let v = v.as_slice().expect("standard layout");
        let mut scan = Scan::new();
        scan.add(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
        let steps = s.div_ceil(2 * TILE_PAIRS) * TILE_PAIRS + TILE_PAIRS / 2;
        let col_tiles = d_v.div_ceil(NR);
        let mut data = vec![[Bf16Pair(0); NR]; col_tiles * steps];
        let zeros = vec![bf16::ZERO; d_v];
        for (r, keys) in v.chunks(2 * d_v.max(1)).enumerate() {
            let (first, second) = keys.split_at(d_v.min(keys.len()));
            let second = if second.is_empty() {
                &zeros[..]
            } else {
                second
            };
            for (column, (&a, &b)) in first.iter().zip(second).enumerate() {
                data[column / NR * steps + r][column % NR] = Bf16Pair::new(a, b);
            }
        }
        let packed = PackedValues {
            data: data.into_flattened(),
            s: steps,
            col_tiles,
        };
        (packed, scan.extent(s))
    }
}

impl<A: Element> PackedValues<A> {
    /// Packs `v: (S, d_v)` in column groups of `NR` (panels of `NR` value
    /// columns, each `S` steps deep), and finds the values' extent on the way.
    #[inline(always)]
    pub(crate) fn pack<const NR: usize>(v: &ArrayView2<'_, A>) -> (Self, Extent<A>) {
        let (s, d_v) = v.dim();
        let v = v.as_standard_layout();
        let v = v.as_slice().expect("standard layout");
        let mut scan = Scan::new();
        scan.add(v);
        let mut panels = Panels::new(NR);
        panels.pack_steps::<NR>(v, d_v, d_v, s);
        let packed = PackedValues {
            data: panels.into_data(),
            s,
            col_tiles: d_v.div_ceil(NR),
        };
        (packed, scan.extent(s))
    }
}

/// How a token packs one panel of lines: `out[p][i]` = value `p` of line `i`,
/// line `i` at `src[i·stride ..][.. out.len()]`, for `i < lines ≤ W` (lanes
/// past `lines` are left as they are). A transposition: by default one store
/// per value ([`scatter_panel`]); a token with a faster way overrides it.
/// A method of the token, not a closure, so that it compiles with the token's
/// instruction sets wherever the kernel body does.
pub(crate) trait PackPanel<A: Copy, const W: usize>: Copy {
    #[inline(always)]
    fn pack_panel(self, src: &[A], stride: usize, lines: usize, out: &mut [[A; W]]) {
        scatter_panel(src, stride, lines, out);
    }
}

/// The packer of panels of any width by [`scatter_panel`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scatter;

impl<A: Copy, const W: usize> PackPanel<A, W> for Scatter {}

/// Packs one panel line by line, scattering each line's values over the steps
/// (gathering each step from the lines took twice as long).
#[inline(always)]
pub(crate) fn scatter_panel<A: Copy, const W: usize>(
    src: &[A],
    stride: usize,
    lines: usize,
    out: &mut [[A; W]],
) {
    for i in 0..lines {
        let line = &src[i * stride..][..out.len()];
        for (step, &x) in out.iter_mut().zip(line) {
            step[i] = x;
        }
    }
}

/// An operand packed in panels of `width` lines (rows of `A`, columns of `B`),
/// each panel `depth` steps of `width` values, zero-padded to whole panels.
#[derive(Debug, Clone)]
pub(crate) struct Panels<A> {
    data: Vec<A>,
    /// Lines in use, and the depth of each.
    pub(crate) lines: usize,
    pub(crate) depth: usize,
    /// Lines per panel.
    pub(crate) width: usize,
}

impl<A: Element> Panels<A> {
    /// Room for panels of `width` lines.
    pub(crate) fn new(width: usize) -> Self {
        Panels {
            data: Vec::new(),
            lines: 0,
            depth: 0,
            width,
        }
    }

    /// The packed values: panel after panel, each `depth` steps of `width`.
    pub(crate) fn into_data(self) -> Vec<A> {
        self.data
    }

    /// Sizes the panels for `lines × depth`, with the lanes past the last line
    /// zero: the packers write every other value, so a buffer used again (the
    /// backward packs into the same panels for every block) is not zeroed first.
    fn reset(&mut self, lines: usize, depth: usize) {
        self.lines = lines;
        self.depth = depth;
        let w = self.width;
        let panels = lines.div_ceil(w);
        self.data.resize(panels * w * depth, A::zero());
        let used = lines - (panels.max(1) - 1) * w;
        if panels > 0 && used < w {
            let last = &mut self.data[(panels - 1) * w * depth..];
            for step in last.chunks_exact_mut(w) {
                step[used..].fill(A::zero());
            }
        }
    }

    /// Packs `lines` lines of `depth` values each, line `l` at
    /// `src[l·stride ..][.. depth]` (rows of `A`; or columns of `B` stored as
    /// the rows of `Bᵀ`), `W` (the panel width) lines at a time.
    #[inline(always)]
    pub(crate) fn pack_lines<const W: usize>(
        &mut self,
        src: &[A],
        stride: usize,
        lines: usize,
        depth: usize,
    ) {
        self.pack_lines_by::<W>(Scatter, src, stride, lines, depth);
    }

    /// [`pack_lines`](Self::pack_lines), panel after panel by `packer` (a
    /// token, for its transposition).
    #[inline(always)]
    pub(crate) fn pack_lines_by<const W: usize>(
        &mut self,
        packer: impl PackPanel<A, W>,
        src: &[A],
        stride: usize,
        lines: usize,
        depth: usize,
    ) {
        debug_assert_eq!(W, self.width);
        self.reset(lines, depth);
        let panels = self.data.as_chunks_mut::<W>().0.chunks_exact_mut(depth);
        for (panel, out) in panels.enumerate() {
            let first = panel * W;
            packer.pack_panel(&src[first * stride..], stride, W.min(lines - first), out);
        }
    }

    /// Packs `lines` lines of `depth` values each, stored the other way: step
    /// `p` of every line at `src[p·stride ..][.. lines]` (columns of `A` stored
    /// as the rows of `Aᵀ`; or the rows of `B`).
    #[inline(always)]
    pub(crate) fn pack_steps<const W: usize>(
        &mut self,
        src: &[A],
        stride: usize,
        lines: usize,
        depth: usize,
    ) {
        debug_assert_eq!(W, self.width);
        self.reset(lines, depth);
        let steps = self.data.as_chunks_mut::<W>().0;
        for p in 0..depth {
            let (whole, rest) = src[p * stride..][..lines].as_chunks::<W>();
            for (panel, chunk) in whole.iter().enumerate() {
                steps[panel * depth + p] = *chunk;
            }
            if !rest.is_empty() {
                let out = &mut steps[whole.len() * depth + p];
                out[..rest.len()].copy_from_slice(rest);
            }
        }
    }

    /// Panel `panel`'s steps `steps`, as the micro-kernels read them.
    #[inline(always)]
    pub(crate) fn panel<const W: usize>(&self, panel: usize, steps: &Range<usize>) -> &[[A; W]] {
        debug_assert_eq!(W, self.width);
        let all = self.data.as_chunks::<W>().0;
        &all[panel * self.depth + steps.start..panel * self.depth + steps.end]
    }
}
