//! Keys and values packed for the tiled kernel's micro-kernels, once per
//! key/value head.

use ndarray::{ArrayView2, Axis};

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
    /// Packs `k: (S, d)` in panels of `nr` keys.
    pub(crate) fn pack(k: &ArrayView2<'_, A>, nr: usize) -> Self {
        let (s, d) = k.dim();
        let mut data = vec![A::zero(); s.next_multiple_of(BC) * d];
        for (j, key) in k.outer_iter().enumerate() {
            let (panel, lane) = (j / nr, j % nr);
            let base = panel * d * nr + lane;
            for (p, &x) in key.iter().enumerate() {
                data[base + p * nr] = x;
            }
        }
        PackedKeys { data, d }
    }
}

impl<A: Element> PackedValues<A> {
    /// Packs `v: (S, d_v)` in column groups of `nr`.
    pub(crate) fn pack(v: &ArrayView2<'_, A>, nr: usize) -> Self {
        let (s, dv) = v.dim();
        let s_pad = s.next_multiple_of(BC);
        let col_tiles = dv.div_ceil(nr);
        let mut data = vec![A::zero(); col_tiles * s_pad * nr];
        for (j, value) in v.outer_iter().enumerate() {
            for (ct, columns) in value.axis_chunks_iter(Axis(0), nr).enumerate() {
                let start = (ct * s_pad + j) * nr;
                for (slot, &x) in data[start..start + columns.len()].iter_mut().zip(columns) {
                    *slot = x;
                }
            }
        }
        PackedValues {
            data,
            s_pad,
            col_tiles,
        }
    }
}
