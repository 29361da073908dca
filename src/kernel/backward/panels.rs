//! The backward pass's block products on the forward's register tiles
//! ([`super::gemm`](crate::kernel::gemm)), in the compute type: one head's keys
//! and values and one query block's operands packed in panels.

use std::ops::Range;

use ndarray::{ArrayView2, CowArray, Ix2};

use super::{Products, RowScratch};
use crate::kernel::float::KernelFloat;
use crate::kernel::gemm::{Columns, RowTiles, Rows, Target, product};
use crate::kernel::pack::Panels;
use crate::kernel::params::{BACKWARD_KEYS as BK, MR};
use crate::kernel::tiled::Tiles;

/// One head's keys and values packed for the products: `Kᵀ` and `Vᵀ` in
/// panels of `NR` keys (for `S = Q·Kᵀ`, `dP = dO·Vᵀ`), and `K` and `V` in
/// panels of `NR` columns (for `dQ = dS·K` and, when the forward runs again,
/// `O = P·V`). Packed once per head, shared by its parts.
pub(crate) struct HeadPanels<A> {
    keys_t: Panels<A>,
    values_t: Panels<A>,
    keys: Panels<A>,
    values: Panels<A>,
}

impl<A: KernelFloat> HeadPanels<A> {
    /// Empty panels, `nr` wide, to [`repack`](Self::repack) head after head.
    pub(crate) fn new(nr: usize) -> Self {
        HeadPanels {
            keys_t: Panels::new(nr),
            values_t: Panels::new(nr),
            keys: Panels::new(nr),
            values: Panels::new(nr),
        }
    }

    /// Packs `k: (S, d)` and `v: (S, d_v)` for `tiles`, `NR` wide (`V` by
    /// columns only when the forward runs again), in the memory of the head
    /// packed before.
    #[inline(always)]
    pub(crate) fn repack<T: Tiles<A, NR>, const NR: usize>(
        &mut self,
        tiles: T,
        k: ArrayView2<'_, A>,
        v: ArrayView2<'_, A>,
        forward: bool,
    ) {
        let ((s, d), d_v) = (k.dim(), v.ncols());
        let (k, v) = (standard(k), standard(v));
        let (k, v) = (
            k.as_slice().expect("standard layout"),
            v.as_slice().expect("standard layout"),
        );
        self.keys_t.pack_lines_by::<NR>(tiles, k, d, s, d);
        self.values_t.pack_lines_by::<NR>(tiles, v, d_v, s, d_v);
        self.keys.pack_steps::<NR>(k, d, d, s);
        if forward {
            self.values.pack_steps::<NR>(v, d_v, d_v, s);
        }
    }
}

/// A thread's working memory for query blocks: their operands in panels, and
/// their rows.
pub(crate) struct BlockScratch<A> {
    pub(crate) panels: BlockPanels<A>,
    pub(crate) rows: RowScratch<A>,
}

impl<A: KernelFloat> BlockScratch<A> {
    pub(crate) fn new(d_v: usize, nr: usize) -> Self {
        BlockScratch {
            panels: BlockPanels::new(nr),
            rows: RowScratch::new(d_v),
        }
    }
}

/// One query block's operands in panels, reused across blocks (a key
/// block's `P` and `dS`, left operands, are read where they lie: [`Rows`],
/// [`Columns`]).
pub(crate) struct BlockPanels<A> {
    /// The block's scaled queries and `dO` as left and right operands.
    q_rows: Panels<A>,
    q_cols: Panels<A>,
    d_out_rows: Panels<A>,
    d_out_cols: Panels<A>,
    /// The block's queries times the scale, row by row.
    q_scaled: Vec<A>,
}

impl<A: KernelFloat> BlockPanels<A> {
    pub(crate) fn new(nr: usize) -> Self {
        BlockPanels {
            q_rows: Panels::new(MR),
            q_cols: Panels::new(nr),
            d_out_rows: Panels::new(MR),
            d_out_cols: Panels::new(nr),
            q_scaled: Vec::new(),
        }
    }
}

/// The block products on `tiles`, over `head` and the block packed into `block`.
pub(crate) struct PanelProducts<'a, A, T, const NR: usize> {
    pub(crate) tiles: T,
    pub(crate) head: &'a HeadPanels<A>,
    pub(crate) block: &'a mut BlockPanels<A>,
    /// The block's rows, and the widths of the queries and values.
    pub(crate) rows: usize,
    pub(crate) d: usize,
    pub(crate) d_v: usize,
}

impl<A: KernelFloat, T: Tiles<A, NR>, const NR: usize> Products<A> for PanelProducts<'_, A, T, NR> {
    /// The queries times the scale, packed as the left operand of `S = Q·Kᵀ`
    /// and the right one of `dK = dSᵀ·Q`.
    #[inline(always)]
    fn block(&mut self, q: ArrayView2<'_, A>, scale: A, d_out: &[A]) {
        let (rows, d, d_v) = (q.nrows(), self.d, self.d_v);
        self.rows = rows;
        // row by row whatever the view's strides (`mapv` would keep a
        // column-major view's order), into memory kept from block to block and
        // in this function's instructions (a collected iterator was a scalar
        // loop out of line and an allocation a block: 2.6 % of an f32
        // backward at N = 512)
        let block = &mut *self.block;
        block.q_scaled.resize(rows * d, A::zero());
        match q.as_slice() {
            Some(q) => {
                for (x, &y) in block.q_scaled.iter_mut().zip(q) {
                    *x = y * scale;
                }
            }
            None => {
                for (x, &y) in block.q_scaled.iter_mut().zip(q.iter()) {
                    *x = y * scale;
                }
            }
        }
        let q = &block.q_scaled[..];
        let rows_by = RowTiles::<T, NR>(self.tiles);
        block.q_rows.pack_lines_by::<MR>(rows_by, q, d, rows, d);
        block.q_cols.pack_steps::<NR>(q, d, d, rows);
        block
            .d_out_rows
            .pack_lines_by::<MR>(rows_by, d_out, d_v, rows, d_v);
        block.d_out_cols.pack_steps::<NR>(d_out, d_v, d_v, rows);
    }

    #[inline(always)]
    fn scores(&mut self, keys: Range<usize>, s: &mut [A]) {
        let target = Target {
            c: s,
            stride: BK,
            add: false,
        };
        let (head, block) = (self.head, &*self.block);
        product(
            self.tiles,
            &block.q_rows,
            &head.keys_t,
            0..self.d,
            keys,
            target,
        );
    }

    #[inline(always)]
    fn weighted_values(&mut self, p: &[A], keys: Range<usize>, o: &mut [A]) {
        let p = Rows::<A, BK> {
            data: p,
            lines: self.rows,
        };
        let target = Target {
            c: o,
            stride: self.d_v,
            add: true,
        };
        let values = &self.head.values;
        product(self.tiles, &p, values, keys, 0..self.d_v, target);
    }

    #[inline(always)]
    fn value_gradient(&mut self, p: &[A], keys: Range<usize>, dv: &mut [A]) {
        let (rows, d_v) = (self.rows, self.d_v);
        let p_t = Columns::<A, BK> {
            data: p,
            lines: keys.len(),
        };
        let target = Target {
            c: &mut dv[keys.start * d_v..],
            stride: d_v,
            add: true,
        };
        let d_out = &self.block.d_out_cols;
        product(self.tiles, &p_t, d_out, 0..rows, 0..d_v, target);
    }

    #[inline(always)]
    fn weight_gradient(&mut self, keys: Range<usize>, dp: &mut [A]) {
        let target = Target {
            c: dp,
            stride: BK,
            add: false,
        };
        let (d_out, values_t) = (&self.block.d_out_rows, &self.head.values_t);
        product(self.tiles, d_out, values_t, 0..self.d_v, keys, target);
    }

    #[inline(always)]
    fn input_gradients(&mut self, ds: &[A], keys: Range<usize>, dq: &mut [A], dk: &mut [A]) {
        let (rows, d, n) = (self.rows, self.d, keys.len());
        let ds_rows = Rows::<A, BK> {
            data: ds,
            lines: rows,
        };
        let target = Target {
            c: dq,
            stride: d,
            add: true,
        };
        product(
            self.tiles,
            &ds_rows,
            &self.head.keys,
            keys.clone(),
            0..d,
            target,
        );
        let ds_t = Columns::<A, BK> { data: ds, lines: n };
        let target = Target {
            c: &mut dk[keys.start * d..],
            stride: d,
            add: true,
        };
        product(self.tiles, &ds_t, &self.block.q_cols, 0..rows, 0..d, target);
    }

    fn end_block(&mut self, _: &mut [A]) {}

    fn end_part(&mut self, _: &mut [A], _: &mut [A]) {}
}

/// A standard-layout copy of `x` where it is not one already.
pub(crate) fn standard<A: Clone>(x: ArrayView2<'_, A>) -> CowArray<'_, A, Ix2> {
    if x.is_standard_layout() {
        CowArray::from(x)
    } else {
        CowArray::from(x.as_standard_layout().into_owned())
    }
}
