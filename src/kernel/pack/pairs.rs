//! Keys and values stored in bf16, packed as pairs of components: the
//! operands of the bf16 dot products (`vdpbf16ps`) and of the AMX tiles
//! (`tdpbf16ps`), which add the products of a pair to one f32 sum.

use half::bf16;
use ndarray::{ArrayView1, ArrayView2};

use super::{Entry, HeadMemory, PackedHead, PackedKeys, PackedValues, Scatter, size_panels};
use crate::kernel::fusable::{Extent, Scan};

/// Two consecutive components of a query or key in bf16, the first in the low 16
/// bits: the operand of `vdpbf16ps`, which adds both products to an f32 lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Bf16Pair(pub(crate) u32);

impl Bf16Pair {
    pub(crate) fn new(first: bf16, second: bf16) -> Self {
        Bf16Pair(u32::from(first.to_bits()) | (u32::from(second.to_bits()) << 16))
    }
}

/// Queries are read as they are stored, in bf16: a pair is two consecutive
/// components. The scale cannot ride in a bf16 query without rounding it, so
/// the scores are scaled in f32. The values are pairs of keys' values, as the
/// AMX tiles' ([`PackedValues::pack_key_pairs`]).
impl Entry<f32> for Bf16Pair {
    type Value = Bf16Pair;
    type Query = bf16;

    const VALUE_KEYS: usize = 2;

    fn zero() -> Self {
        Bf16Pair(0)
    }

    fn depth(d: usize) -> usize {
        d.div_ceil(2)
    }

    #[inline(always)]
    fn pack_query(row: ArrayView1<'_, bf16>, _: f32, write: impl FnMut(usize, Self)) {
        pairs_of(row, Self::depth(row.len()), write);
    }

    fn scale_after(scale: f32) -> Option<f32> {
        Some(scale)
    }
}

/// The first `depth` pairs of `row` (zero past its end).
#[inline(always)]
fn pairs_of(row: ArrayView1<'_, bf16>, depth: usize, write: impl FnMut(usize, Bf16Pair)) {
    pairs_by(row, depth, |x| x, write);
}

/// The first `depth` pairs of the f32 `row` rounded to bf16 (zero past its
/// end): the backward's operands, computed in f32, as the AMX tiles take them.
#[inline(always)]
pub(crate) fn narrow_pairs(
    row: ArrayView1<'_, f32>,
    depth: usize,
    write: impl FnMut(usize, Bf16Pair),
) {
    pairs_by(row, depth, bf16::from_f32, write);
}

/// The first `depth` pairs of `row`, each component by `to_bf16` (zero past
/// its end): a contiguous row two components at a time from its slice (the
/// AMX queries' rows, the tails of the query tiles), any other one by index.
#[inline(always)]
fn pairs_by<T: Copy>(
    row: ArrayView1<'_, T>,
    depth: usize,
    to_bf16: impl Fn(T) -> bf16,
    mut write: impl FnMut(usize, Bf16Pair),
) {
    let Some(slice) = row.as_slice() else {
        let at = |i: usize| row.get(i).map_or(bf16::ZERO, |&x| to_bf16(x));
        for p in 0..depth {
            write(p, Bf16Pair::new(at(2 * p), at(2 * p + 1)));
        }
        return;
    };
    let (pairs, last) = slice.as_chunks::<2>();
    let whole = pairs.len().min(depth);
    for (p, &[first, second]) in pairs[..whole].iter().enumerate() {
        write(p, Bf16Pair::new(to_bf16(first), to_bf16(second)));
    }
    let mut rest = whole..depth;
    if let [first] = last
        && let Some(p) = rest.next()
    {
        write(p, Bf16Pair::new(to_bf16(*first), bf16::ZERO));
    }
    rest.for_each(|p| write(p, Bf16Pair(0)));
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
    type Query = bf16;

    const VALUE_KEYS: usize = 2;

    fn zero() -> Self {
        TilePair(Bf16Pair(0))
    }

    fn depth(d: usize) -> usize {
        d.div_ceil(2 * TILE_PAIRS) * TILE_PAIRS
    }

    #[inline(always)]
    fn pack_query(row: ArrayView1<'_, bf16>, _: f32, mut write: impl FnMut(usize, Self)) {
        pairs_of(row, Self::depth(row.len()), |p, pair| {
            write(p, TilePair(pair))
        });
    }

    fn scale_after(scale: f32) -> Option<f32> {
        Some(scale)
    }
}

/// Packs one key/value head stored in bf16 for tiles `NR` wide: the keys as
/// pairs `K`, panel by panel by `packer`, the values as the blocks over those
/// keys read them ([`Pair::pack_values`]).
#[inline(always)]
pub(crate) fn pack_head_pairs<K: Pair, const NR: usize>(
    k: &ArrayView2<'_, bf16>,
    v: &ArrayView2<'_, bf16>,
    packer: impl PackPairPanel<K, NR>,
    memory: HeadMemory<K, K::Value>,
) -> PackedHead<f32, K> {
    let (keys, key_extent) = PackedKeys::pack_pairs::<NR>(k, packer, memory.keys);
    let (values, value_extent) = K::pack_values::<NR>(v, memory.values);
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

    /// Packs `v: (S, d_v)` for the blocks over keys packed as `Self` into
    /// `memory`, and finds the values' extent (in f32) on the way.
    fn pack_values<const NR: usize>(
        v: &ArrayView2<'_, bf16>,
        memory: Vec<Self::Value>,
    ) -> (PackedValues<Self::Value>, Extent<f32>);
}

/// The `vdpbf16ps` tiles' values are pairs of keys too, `NR` columns a group.
impl Pair for Bf16Pair {
    fn of(pair: Bf16Pair) -> Self {
        pair
    }

    #[inline(always)]
    fn pack_values<const NR: usize>(
        v: &ArrayView2<'_, bf16>,
        memory: Vec<Bf16Pair>,
    ) -> (PackedValues<Bf16Pair>, Extent<f32>) {
        PackedValues::pack_key_pairs::<NR>(v, memory)
    }
}

/// The AMX tiles' values are pairs of keys ([`PackedValues::pack_key_pairs`]).
impl Pair for TilePair {
    fn of(pair: Bf16Pair) -> Self {
        TilePair(pair)
    }

    #[inline(always)]
    fn pack_values<const NR: usize>(
        v: &ArrayView2<'_, bf16>,
        memory: Vec<Bf16Pair>,
    ) -> (PackedValues<Bf16Pair>, Extent<f32>) {
        PackedValues::pack_key_pairs::<NR>(v, memory)
    }
}

impl<K: Pair> PackedKeys<K> {
    /// Packs `k: (S, d)` in panels of `NR` keys into `memory`, each step a
    /// pair of components (`K::depth(d)` of them, zero past the key's end),
    /// panel by panel by `packer`, and finds the keys' extent (in f32) on the
    /// way.
    #[inline(always)]
    pub(crate) fn pack_pairs<const NR: usize>(
        k: &ArrayView2<'_, bf16>,
        packer: impl PackPairPanel<K, NR>,
        memory: Vec<K>,
    ) -> (Self, Extent<f32>) {
        let (s, d) = k.dim();
        let k = k.as_standard_layout();
        let k = k.as_slice().expect("standard layout");
        let depth = K::depth(d);
        let mut data = memory;
        size_panels(&mut data, NR, (s, depth), K::zero());
        let panels = data.as_chunks_mut::<NR>().0;
        for (panel, steps) in panels.chunks_exact_mut(depth.max(1)).enumerate() {
            // the steps past the keys' pairs (the AMX tiles' depth is padded)
            steps[d.div_ceil(2).min(depth)..].fill([K::zero(); NR]);
            let first = panel * NR;
            packer.pack_pair_panel(&k[first * d..], d, NR.min(s - first), steps);
        }
        (PackedKeys { data, depth }, Scan::whole(k, s))
    }
}

/// How one panel of keys stored in bf16 is packed as pairs `K`: `out[p][i]` =
/// pair `p` of key `i < lines` (key `i` at `keys[i·d ..][.. d]`, the last
/// component of an odd `d` paired with zero), the lanes past `lines` left as
/// they are. One pair at a time by [`Scatter`]; a token with AVX-512
/// transposes sixteen keys at a time.
pub(crate) trait PackPairPanel<K: Pair, const W: usize>: Copy {
    fn pack_pair_panel(self, keys: &[bf16], d: usize, lines: usize, out: &mut [[K; W]]);
}

impl<K: Pair, const W: usize> PackPairPanel<K, W> for Scatter {
    #[inline(always)]
    fn pack_pair_panel(self, keys: &[bf16], d: usize, lines: usize, out: &mut [[K; W]]) {
        scatter_pairs(keys, d, lines, out);
    }
}

/// [`PackPairPanel::pack_pair_panel`] key by key, each pair stored on its own.
#[inline(always)]
pub(crate) fn scatter_pairs<K: Pair, const W: usize>(
    keys: &[bf16],
    d: usize,
    lines: usize,
    out: &mut [[K; W]],
) {
    for (i, key) in keys.chunks_exact(d.max(1)).take(lines).enumerate() {
        scatter_key_pairs(key, (i, 0), out);
    }
}

/// The pairs of `key` from pair `from` on (at most its whole pairs) into lane
/// `lane` of `out[from ..]`, each stored on its own (the last component of an
/// odd width paired with zero).
#[inline(always)]
pub(crate) fn scatter_key_pairs<K: Pair, const W: usize>(
    key: &[bf16],
    (lane, from): (usize, usize),
    out: &mut [[K; W]],
) {
    let (pairs, last) = key.as_chunks::<2>();
    // slices, not `skip` (a call out of line)
    for (step, &[first, second]) in out[from..].iter_mut().zip(&pairs[from..]) {
        step[lane] = K::of(Bf16Pair::new(first, second));
    }
    if let [first] = *last {
        out[pairs.len()][lane] = K::of(Bf16Pair::new(first, bf16::ZERO));
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
    pub(crate) fn pack_key_pairs<const NR: usize>(
        v: &ArrayView2<'_, bf16>,
        memory: Vec<Bf16Pair>,
    ) -> (Self, Extent<f32>) {
        let (s, d_v) = v.dim();
        let v = v.as_standard_layout();
        let v = v.as_slice().expect("standard layout");
        let steps = s.div_ceil(2 * TILE_PAIRS) * TILE_PAIRS + TILE_PAIRS / 2;
        let col_tiles = d_v.div_ceil(NR);
        let mut packed = memory;
        size_panels(&mut packed, NR, (d_v, steps), Bf16Pair(0));
        // the steps past the last key zero (the loop below writes the others)
        let written = s.div_ceil(2) * NR;
        for group in packed.chunks_exact_mut(steps * NR) {
            group[written..].fill(Bf16Pair(0));
        }
        let data = packed.as_chunks_mut::<NR>().0;
        let zeros = vec![bf16::ZERO; d_v];
        for (r, keys) in v.chunks(2 * d_v.max(1)).enumerate() {
            let (first, second) = keys.split_at(d_v.min(keys.len()));
            let second = if second.is_empty() {
                &zeros[..]
            } else {
                second
            };
            // column group by column group: `NR` pairs of one step at a time
            // (whole groups at a known width, so that they vectorise)
            let ((a_whole, a_rest), (b_whole, b_rest)) =
                (first.as_chunks::<NR>(), second.as_chunks::<NR>());
            let mut groups = data.chunks_exact_mut(steps);
            // (the whole groups first: a zip stops at them without taking the last)
            for ((a, b), group) in a_whole.iter().zip(b_whole).zip(groups.by_ref()) {
                group[r] = std::array::from_fn(|c| Bf16Pair::new(a[c], b[c]));
            }
            if let Some(group) = groups.next() {
                for (pair, (&a, &b)) in group[r].iter_mut().zip(a_rest.iter().zip(b_rest)) {
                    *pair = Bf16Pair::new(a, b);
                }
            }
        }
        let packed = PackedValues {
            data: packed,
            s: steps,
            col_tiles,
        };
        (packed, Scan::whole(v, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A contiguous row of every length to 70 gives the pairs a strided one
    /// (taken by index) gives, stored in bf16 or rounded from f32, for both
    /// entries' depths: its components in order, zero past its end.
    #[test]
    fn contiguous_rows_pair_as_strided_ones() {
        use ndarray::{Array1, s};
        /// The `depth` pairs `pack` writes.
        fn collect(
            depth: usize,
            pack: impl FnOnce(&mut dyn FnMut(usize, Bf16Pair)),
        ) -> Vec<Bf16Pair> {
            let mut out = vec![Bf16Pair(u32::MAX); depth];
            pack(&mut |p, pair| out[p] = pair);
            out
        }
        for len in 1..=70 {
            // values with bits below bf16's, ties among them
            let x =
                Array1::from_shape_fn(len, |i| f32::from_bits(0x3f80_8000 + (i as u32) * 0x1_0001));
            // the same values every other entry, NaN between
            let spread =
                Array1::from_shape_fn(2 * len, |i| if i % 2 == 0 { x[i / 2] } else { f32::NAN });
            let (stored, spread_stored) = (x.mapv(bf16::from_f32), spread.mapv(bf16::from_f32));
            for depth in [Bf16Pair::depth(len), TilePair::depth(len)] {
                let want: Vec<Bf16Pair> = (0..depth)
                    .map(|p| {
                        let at = |i: usize| stored.get(i).copied().unwrap_or(bf16::ZERO);
                        Bf16Pair::new(at(2 * p), at(2 * p + 1))
                    })
                    .collect();
                let every_other = s![..;2];
                let runs = [
                    collect(depth, |w| pairs_of(stored.view(), depth, w)),
                    collect(depth, |w| {
                        pairs_of(spread_stored.slice(every_other), depth, w)
                    }),
                    collect(depth, |w| narrow_pairs(x.view(), depth, w)),
                    collect(depth, |w| narrow_pairs(spread.slice(every_other), depth, w)),
                ];
                for (run, got) in runs.iter().enumerate() {
                    assert_eq!(*got, want, "length {len}, depth {depth}, run {run}");
                }
            }
        }
    }

    /// A packed head holds the bytes [`head_bytes`] counts, but for at most
    /// 32 keys' padding, with either pairing and the f32 and f64 elements
    /// (the tiled kernel's waves are sized by the count).
    #[test]
    fn packed_heads_are_as_large_as_counted() {
        use crate::kernel::pack::{PackedHead, head_bytes, pack_head};

        fn check<A, K: Entry<A>>(head: &PackedHead<A, K>, (s, d, d_v): (usize, usize, usize)) {
            let keys = head.keys.data.len() * size_of::<K>();
            let bytes = keys + head.values.data.len() * size_of::<K::Value>();
            let counted = head_bytes::<A, K>(s, d, d_v);
            let padded = head_bytes::<A, K>(s + 32, d, d_v);
            assert!(
                (counted..=padded).contains(&bytes),
                "{bytes} bytes, {counted} counted ({s}, {d}, {d_v})"
            );
        }
        for (s, d, d_v) in [(32, 32, 32), (64, 64, 64), (96, 128, 64), (512, 64, 128)] {
            let x = |cols: usize| {
                ndarray::Array2::from_shape_fn((s, cols), |(i, j)| (i * 7 + j) as f32 / 100.0)
            };
            let (k, v) = (x(d), x(d_v));
            let (kh, vh) = (k.mapv(bf16::from_f32), v.mapv(bf16::from_f32));
            let (kh, vh, shape) = (kh.view(), vh.view(), (s, d, d_v));
            check(
                &pack_head_pairs::<TilePair, 16>(&kh, &vh, Scatter, HeadMemory::default()),
                shape,
            );
            check(
                &pack_head_pairs::<Bf16Pair, 16>(&kh, &vh, Scatter, HeadMemory::default()),
                shape,
            );
            check(
                &pack_head::<f32, 16>(&k.view(), &v.view(), Scatter, HeadMemory::default()),
                shape,
            );
            let (k, v) = (k.mapv(f64::from), v.mapv(f64::from));
            check(
                &pack_head::<f64, 8>(&k.view(), &v.view(), Scatter, HeadMemory::default()),
                shape,
            );
        }
    }

    /// A head packed into the memory of another (more keys, wider, other
    /// values) is the head packed into new memory, by every packer: no value
    /// of the other head is left in its padding.
    #[test]
    fn packing_into_used_memory_writes_every_value() {
        use crate::kernel::pack::{PackedHead, pack_head};
        use ndarray::Array2;

        /// Packs `(k, v)` by `pack` into new memory and into that of `used`.
        fn check<X, A, K>(
            pack: impl Fn(&Array2<X>, &Array2<X>, HeadMemory<K, K::Value>) -> PackedHead<A, K>,
            used: (&Array2<X>, &Array2<X>),
            (k, v): (&Array2<X>, &Array2<X>),
        ) where
            K: Entry<A> + PartialEq,
            K::Value: PartialEq,
        {
            let used = pack(used.0, used.1, HeadMemory::default()).into_memory();
            let (fresh, again) = (pack(k, v, HeadMemory::default()), pack(k, v, used));
            fn first_difference<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
                (a.len() != b.len())
                    .then_some(a.len().min(b.len()))
                    .or_else(|| a.iter().zip(b).position(|(a, b)| a != b))
            }
            let keys = first_difference(&fresh.keys.data, &again.keys.data);
            let values = first_difference(&fresh.values.data, &again.values.data);
            assert_eq!(
                (keys, values),
                (None, None),
                "where the keys and values differ"
            );
            assert_eq!(fresh.values.s, again.values.s);
        }
        let x = |(rows, cols): (usize, usize), at: f32| {
            Array2::from_shape_fn((rows, cols), |(i, j)| at + (i * 7 + j) as f32 / 100.0)
        };
        // odd widths, a part panel of keys and of value columns
        let used = (&x((100, 70), 9.0), &x((100, 50), 9.0));
        let head = (&x((37, 33), -1.0), &x((37, 17), -1.0));
        check(
            |k, v, m| pack_head::<f32, 16>(&k.view(), &v.view(), Scatter, m),
            used,
            head,
        );
        let wide = |(k, v): (&Array2<f32>, &Array2<f32>)| (k.mapv(f64::from), v.mapv(f64::from));
        let (used, head) = (wide(used), wide(head));
        check(
            |k, v, m| pack_head::<f64, 8>(&k.view(), &v.view(), Scatter, m),
            (&used.0, &used.1),
            (&head.0, &head.1),
        );
        let half = |(k, v): (Array2<f64>, Array2<f64>)| {
            let half = |x: Array2<f64>| x.mapv(bf16::from_f64);
            (half(k), half(v))
        };
        let (used, head) = (half(used), half(head));
        let (used, head) = ((&used.0, &used.1), (&head.0, &head.1));
        check(
            |k, v, m| pack_head_pairs::<TilePair, 16>(&k.view(), &v.view(), Scatter, m),
            used,
            head,
        );
        check(
            |k, v, m| pack_head_pairs::<Bf16Pair, 16>(&k.view(), &v.view(), Scatter, m),
            used,
            head,
        );
    }
}
