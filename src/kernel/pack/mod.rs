//! Operands packed for the micro-kernels: keys and values once per key/value head
//! for the tiled kernel, and [`Panels`], the packing of any operand of the
//! backward's block products (`gemm.rs`).

mod pairs;

use std::ops::Range;

use ndarray::{ArrayView1, ArrayView2};

use super::float::KernelFloat;
use super::fusable::{Extent, Scan};
use super::params::PACKED_BYTES;
use crate::element::Element;
use crate::kept::Kept;

pub(crate) use pairs::{
    Bf16Pair, PackPairPanel, Pair, TILE_PAIRS, TilePair, narrow_pairs, pack_head_pairs,
    scatter_key_pairs, scatter_pairs,
};

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
pub(crate) trait Entry<A>: Copy + Send + Sync + 'static {
    /// What the values of a head packed with these keys are stored as (the
    /// element, or pairs of keys' values for the AMX tiles).
    type Value: Copy + Send + Sync + 'static;

    /// Keys whose values one [`Value`](Self::Value) holds, a column's (two
    /// for the AMX tiles' pairs): a packed value is `size_of::<Value>() /
    /// VALUE_KEYS` bytes.
    const VALUE_KEYS: usize = 1;

    /// The entry of zero components: the padding.
    fn zero() -> Self;

    /// Entries per query or key of `d` components.
    fn depth(d: usize) -> usize;

    /// What the queries packed as these entries are stored as: the element,
    /// or bf16 for pairs (read as they are stored, never widened).
    type Query: Copy + Send + Sync + 'static;

    /// The entries of one query, `write(p, entry)` for each `p < depth(d)`; the
    /// scale is multiplied in where the entry can hold it.
    fn pack_query(row: ArrayView1<'_, Self::Query>, scale: A, write: impl FnMut(usize, Self));

    /// The factor the scores of queries packed with `scale` still need: `None`
    /// where the packed queries carry it.
    fn scale_after(scale: A) -> Option<A>;
}

impl<A: Element> Entry<A> for A {
    type Value = A;
    type Query = A;

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

/// The memory of one packed key/value head, for the next head packed into it
/// (its values written over): a thread keeps a wave's from call to call.
pub(crate) struct HeadMemory<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
}

impl<K, V> Default for HeadMemory<K, V> {
    fn default() -> Self {
        HeadMemory {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<K: 'static, V: 'static> Kept for Vec<HeadMemory<K, V>> {
    /// Two waves' worth: the memory of shorter sequences' heads, whose
    /// packing weighs most beside their arithmetic (f32, head_dim 64: up to
    /// N = 2048 on two threads, 4096 on one); a thread keeps at most this much
    /// for each type of packed keys.
    const MOST_BYTES: usize = 2 * PACKED_BYTES;

    fn bytes(&self) -> usize {
        let head = |m: &HeadMemory<K, V>| {
            m.keys.capacity() * size_of::<K>() + m.values.capacity() * size_of::<V>()
        };
        self.iter().map(head).sum()
    }
}

impl<A, K: Entry<A>> PackedHead<A, K> {
    /// Its memory, for another head.
    pub(crate) fn into_memory(self) -> HeadMemory<K, K::Value> {
        HeadMemory {
            keys: self.keys.data,
            values: self.values.data,
        }
    }
}

/// The bytes of one key/value head of `s` keys of `d` and values of `d_v`
/// components packed with keys as entries `K`, but for the padding (whole
/// panels and steps; the AMX tiles' values run 16 keys past the last step).
pub(crate) fn head_bytes<A, K: Entry<A>>(s: usize, d: usize, d_v: usize) -> usize {
    let key = K::depth(d) * size_of::<K>();
    let value = d_v * size_of::<K::Value>() / K::VALUE_KEYS;
    s * (key + value)
}

/// Packs one key/value head for tiles `NR` wide into `memory`, the keys'
/// panels by `packer` (the token); [`super::arch`] compiles it per instruction
/// set, so the transposition of the keys runs with its vectors.
#[inline(always)]
pub(crate) fn pack_head<A: KernelFloat, const NR: usize>(
    k: &ArrayView2<'_, A>,
    v: &ArrayView2<'_, A>,
    packer: impl PackPanel<A, NR>,
    memory: HeadMemory<A, A>,
) -> PackedHead<A> {
    let (keys, key_extent) = PackedKeys::pack::<NR>(k, packer, memory.keys);
    let (values, value_extent) = PackedValues::pack::<NR>(v, memory.values);
    PackedHead {
        keys,
        values,
        key_extent,
        value_extent,
    }
}

impl<A: KernelFloat> PackedKeys<A> {
    /// Packs `k: (S, d)` in panels of `NR` keys into `memory`, each by
    /// `packer`, and finds the keys' extent on the way.
    #[inline(always)]
    pub(crate) fn pack<const NR: usize>(
        k: &ArrayView2<'_, A>,
        packer: impl PackPanel<A, NR>,
        memory: Vec<A>,
    ) -> (Self, Extent<A>) {
        let (s, d) = k.dim();
        let k = k.as_standard_layout();
        let k = k.as_slice().expect("standard layout");
        let extent = Scan::whole(k, s);
        // the kernel reads whole panels of the keys it needs, never past the last
        let mut panels = Panels::in_memory(memory, NR);
        panels.pack_lines_by::<NR>(packer, k, d, s, d);
        let data = panels.into_data();
        (PackedKeys { data, depth: d }, extent)
    }
}

impl<A: KernelFloat> PackedValues<A> {
    /// Packs `v: (S, d_v)` in column groups of `NR` (panels of `NR` value
    /// columns, each `S` steps deep) into `memory`, and finds the values'
    /// extent on the way.
    #[inline(always)]
    pub(crate) fn pack<const NR: usize>(
        v: &ArrayView2<'_, A>,
        memory: Vec<A>,
    ) -> (Self, Extent<A>) {
        let (s, d_v) = v.dim();
        let v = v.as_standard_layout();
        let v = v.as_slice().expect("standard layout");
        let extent = Scan::whole(v, s);
        let mut panels = Panels::in_memory(memory, NR);
        panels.pack_steps::<NR>(v, d_v, d_v, s);
        let packed = PackedValues {
            data: panels.into_data(),
            s,
            col_tiles: d_v.div_ceil(NR),
        };
        (packed, extent)
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
    scatter_lines(src, stride, 0..lines, 0, out);
}

/// [`scatter_panel`] for the lines `lines` from step `from` on: what a packer
/// that transposes whole blocks in registers leaves past them.
#[inline(always)]
pub(crate) fn scatter_lines<A: Copy, const W: usize>(
    src: &[A],
    stride: usize,
    lines: std::ops::Range<usize>,
    from: usize,
    out: &mut [[A; W]],
) {
    let rest = &mut out[from..];
    for i in lines {
        let line = &src[i * stride + from..][..rest.len()];
        for (step, &x) in rest.iter_mut().zip(line) {
            step[i] = x;
        }
    }
}

/// Sizes `data` for panels of `width` lines holding `lines × depth` values,
/// with the lanes past the last line `zero`: a packer writes every other value,
/// so memory used before is written over, not zeroed first.
#[inline(always)]
fn size_panels<T: Copy>(data: &mut Vec<T>, width: usize, (lines, depth): (usize, usize), zero: T) {
    let panels = lines.div_ceil(width);
    data.resize(panels * width * depth, zero);
    let used = lines - (panels.max(1) - 1) * width;
    if panels > 0 && used < width {
        let last = &mut data[(panels - 1) * width * depth..];
        for step in last.chunks_exact_mut(width) {
            step[used..].fill(zero);
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
        Self::in_memory(Vec::new(), width)
    }

    /// Panels of `width` lines packed into `data` (its values written over).
    pub(crate) fn in_memory(data: Vec<A>, width: usize) -> Self {
        Panels {
            data,
            lines: 0,
            depth: 0,
            width,
        }
    }

    /// The packed values: panel after panel, each `depth` steps of `width`.
    pub(crate) fn into_data(self) -> Vec<A> {
        self.data
    }

    /// Sizes the panels for `lines × depth` ([`size_panels`]: the backward
    /// packs into the same panels for every block, the forward into those of
    /// the head before). Inlined into the packing, so that the zeros of a new buffer are written
    /// with the token's vectors (out of line: 16 bytes a store, 2.6 % of an
    /// f32 call at N = 128).
    #[inline(always)]
    fn reset(&mut self, lines: usize, depth: usize) {
        self.lines = lines;
        self.depth = depth;
        size_panels(&mut self.data, self.width, (lines, depth), A::zero());
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
