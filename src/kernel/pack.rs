//! Keys and values packed for the tiled kernel's micro-kernels, once per
//! key/value head.

use ndarray::ArrayView2;

use super::fusable::{row_slice, Extent, Scan};
use super::gemm::Panels;
use crate::element::Element;

/// Keys packed for the micro-kernel: panels of `NR` keys, each stored `d × NR`
/// (the `p`-th components of `NR` consecutive keys side by side), zero-padded to a
/// whole panel.
#[derive(Debug)]
pub(crate) struct PackedKeys<A> {
    pub(crate) data: Vec<A>,
    pub(crate) d: usize,
}

/// Values packed for the micro-kernel: for each group of `NR` value columns, all
/// keys' `NR` values in key order (the columns past `d_v` zero).
#[derive(Debug)]
pub(crate) struct PackedValues<A> {
    pub(crate) data: Vec<A>,
    /// Keys per column group.
    pub(crate) s: usize,
    pub(crate) col_tiles: usize,
}

/// One key/value head packed for the tiled kernel, with the extents of its keys
/// and values that the pre-check needs.
pub(crate) struct PackedHead<A> {
    pub(crate) keys: PackedKeys<A>,
    pub(crate) values: PackedValues<A>,
    pub(crate) key_extent: Extent<A>,
    pub(crate) value_extent: Extent<A>,
}

/// Packs one key/value head for tiles `NR` wide; [`super::arch`] compiles it per
/// instruction set, so the transposition of the keys runs with its vectors.
#[inline(always)]
pub(crate) fn pack_head<A: Element, const NR: usize>(
    k: &ArrayView2<'_, A>,
    v: &ArrayView2<'_, A>,
) -> PackedHead<A> {
    let (keys, key_extent) = PackedKeys::pack::<NR>(k);
    let (values, value_extent) = PackedValues::pack(v, NR);
    PackedHead {
        keys,
        values,
        key_extent,
        value_extent,
    }
}

impl<A: Element> PackedKeys<A> {
    /// Packs `k: (S, d)` in panels of `nr` keys, and finds the keys' extent on
    /// the way.
    #[inline(always)]
    pub(crate) fn pack<const NR: usize>(k: &ArrayView2<'_, A>) -> (Self, Extent<A>) {
        let (s, d) = k.dim();
        let k = k.as_standard_layout();
        let k = k.as_slice().expect("standard layout");
        let mut scan = Scan::new();
        scan.add(k);
        // the kernel reads whole panels of the keys it needs, never past the last
        let mut panels = Panels::new(NR);
        panels.pack_lines::<NR>(k, d, s, d);
        let data = panels.into_data();
        (PackedKeys { data, d }, scan.extent(s))
    }
}

impl<A: Element> PackedValues<A> {
    /// Packs `v: (S, d_v)` in column groups of `nr`, and finds the values' extent
    /// on the way.
    #[inline(always)]
    pub(crate) fn pack(v: &ArrayView2<'_, A>, nr: usize) -> (Self, Extent<A>) {
        let (s, dv) = v.dim();
        let col_tiles = dv.div_ceil(nr);
        let mut data = vec![A::zero(); col_tiles * s * nr];
        let mut scan = Scan::new();
        for (j, value) in v.outer_iter().enumerate() {
            let value = row_slice(value);
            scan.add(&value);
            for (ct, columns) in value.chunks(nr).enumerate() {
                let start = (ct * s + j) * nr;
                data[start..start + columns.len()].copy_from_slice(columns);
            }
        }
        let packed = PackedValues { data, s, col_tiles };
        (packed, scan.extent(s))
    }
}
