//! Keys and values packed for the tiled kernel's micro-kernels, once per
//! key/value head.

use ndarray::ArrayView2;

use super::fusable::{row_slice, Extent, Scan};
use super::params::BC;
use crate::element::Element;

/// Keys packed for the micro-kernel: panels of `NR` keys, each stored `d × NR`
/// (the `p`-th components of `NR` consecutive keys side by side), zero-padded to a
/// multiple of `BC` keys.
#[derive(Debug)]
pub(crate) struct PackedKeys<A> {
    pub(crate) data: Vec<A>,
    pub(crate) d: usize,
}

/// Values packed for the micro-kernel: for each group of `NR` value columns, all
/// keys' `NR` values in key order, zero-padded to a multiple of `BC` keys.
#[derive(Debug)]
pub(crate) struct PackedValues<A> {
    pub(crate) data: Vec<A>,
    pub(crate) s_pad: usize,
    pub(crate) col_tiles: usize,
}

impl<A: Element> PackedKeys<A> {
    /// Packs `k: (S, d)` in panels of `nr` keys, and finds the keys' extent on
    /// the way.
    pub(crate) fn pack(k: &ArrayView2<'_, A>, nr: usize) -> (Self, Extent<A>) {
        let (s, d) = k.dim();
        // the kernel reads whole panels of the keys it needs, never past the last
        let mut data = vec![A::zero(); s.next_multiple_of(nr) * d];
        let mut scan = Scan::new();
        for (j, key) in k.outer_iter().enumerate() {
            let (panel, lane) = (j / nr, j % nr);
            let base = panel * d * nr + lane;
            let key = row_slice(key);
            scan.add(&key);
            for (p, &x) in key.iter().enumerate() {
                data[base + p * nr] = x;
            }
        }
        (PackedKeys { data, d }, scan.extent(s))
    }
}

impl<A: Element> PackedValues<A> {
    /// Packs `v: (S, d_v)` in column groups of `nr`, and finds the values' extent
    /// on the way.
    pub(crate) fn pack(v: &ArrayView2<'_, A>, nr: usize) -> (Self, Extent<A>) {
        let (s, dv) = v.dim();
        let s_pad = s.next_multiple_of(BC);
        let col_tiles = dv.div_ceil(nr);
        let mut data = vec![A::zero(); col_tiles * s_pad * nr];
        let mut scan = Scan::new();
        for (j, value) in v.outer_iter().enumerate() {
            let value = row_slice(value);
            scan.add(&value);
            for (ct, columns) in value.chunks(nr).enumerate() {
                let start = (ct * s_pad + j) * nr;
                data[start..start + columns.len()].copy_from_slice(columns);
            }
        }
        let packed = PackedValues {
            data,
            s_pad,
            col_tiles,
        };
        (packed, scan.extent(s))
    }
}
