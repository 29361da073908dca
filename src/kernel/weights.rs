//! A layer's weight packed once for the micro-kernels, and products `x·W` on it.
//!
//! A general matrix product packs both operands on every call: for the few rows
//! of a batch of decoding steps, packing all of `W` costs more than the
//! arithmetic (16 rows through 512 × 512 ran at 46 GFLOP/s on Zen 4). Packed
//! once into panels of the token's tile width, `W` serves every later product;
//! only the rows of `x` are packed per call, [`CHUNK_ROWS`] at a time.
//!
//! Each entry of the result is one register tile's sum over the whole depth, in
//! the same order however the rows and columns are shared among threads: the
//! bits do not depend on the thread count, nor on the other rows of `x`.

use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use super::arch::{Arch, Dispatch, KernelElement, Op, Token};
use super::float::KernelFloat;
use super::gemm::{RowTiles, Target, product};
use super::pack::Panels;
use super::params::{MR, PRODUCT_PARALLEL_MIN_WORK};
use super::report::{self, Path};
use super::tiled::KeyTiles;
use crate::element::{Element, PerElement};
use crate::error::Result;
use crate::flex::program::Plain;

/// Rows of `x` packed and multiplied at a time (a multiple of [`MR`]): 48 rows of
/// a 2 048-wide input are 384 KiB, in L2 beside a panel of `W` while every
/// panel of `W` passes them.
const CHUNK_ROWS: usize = 4 * MR;

/// `W: (in, out)` in panels of the tile width of the instruction set that packed
/// it, over its columns, with that instruction set.
#[derive(Clone)]
pub(crate) struct PackedWeight<A> {
    panels: Panels<A>,
    arch: Arch,
}

impl<A> std::fmt::Debug for PackedWeight<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (depth, lines) = self.dim();
        write!(f, "PackedWeight({depth} × {lines}, {:?})", self.arch.kind())
    }
}

impl<A> PackedWeight<A> {
    /// `(in, out)`.
    pub(crate) fn dim(&self) -> (usize, usize) {
        (self.panels.depth, self.panels.lines)
    }
}

/// `w: (in, out)` packed for the instruction set of this machine (and
/// `ATTN_KERNEL_ARCH`).
///
/// # Errors
///
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when `ATTN_KERNEL_ARCH`
/// names no instruction set.
pub(crate) fn pack_weight<A: Element>(w: &ArrayView2<'_, A>) -> Result<PackedWeight<A>> {
    let arch = Arch::detect()?;
    Ok((A::select::<Plain, _>(Entries).pack)(w, arch))
}

/// `out = x·W` for `x: (n, in)`, `out: (n, out)`, on the pool's threads where
/// the product is large enough: parts of whole rows, or of `W`'s column panels
/// when the rows make fewer register tiles than there are threads.
pub(crate) fn weight_product<A: Element>(
    x: &ArrayView2<'_, A>,
    w: &PackedWeight<A>,
    out: ArrayViewMut2<'_, A>,
) {
    debug_assert_eq!((x.ncols(), out.dim()), (w.dim().0, (x.nrows(), w.dim().1)));
    report::count(Path::WeightProduct, 1);
    (A::select::<Plain, _>(Entries).product)(x, w, out);
}

/// The entry points compiled for one element type.
struct EntryPoints<A> {
    pack: fn(&ArrayView2<'_, A>, Arch) -> PackedWeight<A>,
    product: fn(&ArrayView2<'_, A>, &PackedWeight<A>, ArrayViewMut2<'_, A>),
}

/// Picks the entry points for the element type.
struct Entries;

impl PerElement<Plain> for Entries {
    type Output<A: Element> = EntryPoints<A>;

    fn f32(self) -> EntryPoints<f32> {
        EntryPoints {
            pack: pack_for::<f32>,
            product: product_for::<f32>,
        }
    }

    fn f64(self) -> EntryPoints<f64> {
        EntryPoints {
            pack: pack_for::<f64>,
            product: product_for::<f64>,
        }
    }
}

fn pack_for<A: KernelElement>(w: &ArrayView2<'_, A>, arch: Arch) -> PackedWeight<A> {
    let (depth, lines) = w.dim();
    // a loaded weight is often column-major (a view of the file's `(out, in)`
    // transposed): its columns are the panels' lines, packed without a copy
    let transposed = w.t();
    let (src, by_lines) = match (w.as_slice(), transposed.as_slice()) {
        (Some(rows), _) => (std::borrow::Cow::Borrowed(rows), false),
        (None, Some(columns)) => (std::borrow::Cow::Borrowed(columns), true),
        (None, None) => (std::borrow::Cow::Owned(w.iter().copied().collect()), false),
    };
    let op = PackColumns {
        src: &src,
        lines,
        depth,
        by_lines,
    };
    let panels = Dispatch::<A>::dispatch(arch, op);
    PackedWeight { panels, arch }
}

fn product_for<A: KernelElement>(
    x: &ArrayView2<'_, A>,
    w: &PackedWeight<A>,
    mut out: ArrayViewMut2<'_, A>,
) {
    let x = x.as_standard_layout();
    let (rows, depth) = x.dim();
    let cols = w.dim().1;
    if rows == 0 || cols == 0 {
        // nothing to write (and no chunk of zero width to cut)
        return;
    }
    if depth == 0 {
        out.fill(A::zero());
        return;
    }
    let threads = rayon::current_num_threads();
    let tiles = rows.div_ceil(MR);
    // a tile's last rows are summed in a block of four (or eight) rows
    let work = rows
        .next_multiple_of(4)
        .saturating_mul(depth)
        .saturating_mul(cols);
    let shared = threads > 1 && work >= PRODUCT_PARALLEL_MIN_WORK;
    if shared && tiles < threads {
        // a few rows (a batch of decoding steps): each thread a part of W's
        // column panels, into a part of its own
        let per_part = cols.div_ceil(w.panels.width).div_ceil(threads) * w.panels.width;
        let parts: Vec<_> = (0..cols)
            .step_by(per_part)
            .map(|start| start..(start + per_part).min(cols))
            .collect();
        let sums: Vec<_> = parts
            .par_iter()
            .map(|part| {
                let mut sum = vec![A::zero(); rows * part.len()];
                multiply(&x.view(), w, part.clone(), &mut sum);
                sum
            })
            .collect();
        for (part, sum) in parts.iter().zip(&sums) {
            let sum = ArrayView2::from_shape((rows, part.len()), sum).expect("rows × part");
            out.slice_mut(s![.., part.clone()]).assign(&sum);
        }
        return;
    }
    let mut buffer = match out.as_slice_mut() {
        Some(_) => Vec::new(),
        None => vec![A::zero(); rows * cols],
    };
    let target = match out.as_slice_mut() {
        Some(slice) => slice,
        None => &mut buffer[..],
    };
    if shared {
        // one part of rows per thread, in whole blocks of the micro-kernel's
        // rows (a tile's last rows are summed in a block of four or eight)
        let chunk = rows.div_ceil(threads).next_multiple_of(4);
        let parts: Vec<_> = x.axis_chunks_iter(Axis(0), chunk).collect();
        parts
            .into_par_iter()
            .zip(target.par_chunks_mut(chunk * cols))
            .for_each(|(x, c)| multiply(&x, w, 0..cols, c));
    } else {
        multiply(&x.view(), w, 0..cols, target);
    }
    if !buffer.is_empty() {
        out.assign(&ArrayView2::from_shape((rows, cols), &buffer).expect("rows × cols"));
    }
}

/// `c = x·W[.., cols]` (`c` row-major, `cols.len()` wide), `x` packed here in
/// chunks of [`CHUNK_ROWS`].
fn multiply<A: KernelElement>(
    x: &ArrayView2<'_, A>,
    w: &PackedWeight<A>,
    cols: Range<usize>,
    c: &mut [A],
) {
    let mut panels = Panels::new(MR);
    let width = cols.len();
    let chunks = x.axis_chunks_iter(Axis(0), CHUNK_ROWS);
    for (x, c) in chunks.zip(c.chunks_mut(CHUNK_ROWS * width)) {
        let op = Multiply {
            x: x.as_slice().expect("rows of a standard-layout array"),
            rows: x.nrows(),
            depth: x.ncols(),
            panels: &mut panels,
            w: &w.panels,
            cols: cols.clone(),
            c,
        };
        Dispatch::<A>::dispatch(w.arch, op);
    }
}

/// `W: (depth, lines)` into panels of the token's tile width: from its rows
/// ([`Panels::pack_steps`], row-major in `src`) or, `by_lines`, from its
/// columns ([`Panels::pack_lines`], column-major).
struct PackColumns<'s, A> {
    src: &'s [A],
    lines: usize,
    depth: usize,
    by_lines: bool,
}

impl<A: KernelFloat> Op<A> for PackColumns<'_, A> {
    type Output = Panels<A>;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, _: T) -> Panels<A> {
        let Self {
            src,
            lines,
            depth,
            by_lines,
        } = self;
        let mut panels = Panels::new(NR);
        if by_lines {
            panels.pack_lines::<NR>(src, depth, lines, depth);
        } else {
            panels.pack_steps::<NR>(src, lines, lines, depth);
        }
        panels
    }
}

/// `c = x·W[.., cols]` for `rows` rows `x` (row-major, `depth` wide), packed into
/// `panels`.
struct Multiply<'a, A> {
    x: &'a [A],
    rows: usize,
    depth: usize,
    panels: &'a mut Panels<A>,
    w: &'a Panels<A>,
    cols: Range<usize>,
    c: &'a mut [A],
}

impl<A: KernelFloat> Op<A> for Multiply<'_, A> {
    type Output = ();

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, token: T) {
        let Self {
            x,
            rows,
            depth,
            panels,
            w,
            cols,
            c,
        } = self;
        assert_eq!(
            w.width, NR,
            "a weight is multiplied by the instruction set that packed it"
        );
        panels.pack_lines_by::<MR>(RowTiles::<T, NR>(token), x, depth, rows, depth);
        let target = Target {
            c,
            stride: cols.len(),
            add: false,
        };
        product(token, panels, w, 0..depth, cols, target);
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, s};

    use super::{pack_weight, weight_product};
    use crate::on_threads as on;

    /// Against the plain product at sizes off the tile widths (rows, depth and
    /// columns), into a contiguous output and into columns of a larger one, with
    /// the same bits on one thread and two (parts of rows, or of columns).
    #[test]
    fn products_on_a_packed_weight_equal_the_plain_product() {
        for (rows, depth, cols) in [
            (1, 1, 1),
            (3, 7, 5),
            (7, 33, 40),
            (13, 64, 33),
            (12, 300, 70),
            (23, 65, 70),
            (50, 129, 40),
            (5, 2048, 600), // a few rows, large enough to share columns
            (300, 96, 80),  // to share rows: 152 and 148, blocks of 8 and 4 last
            (101, 200, 64), // 52 and 49
        ] {
            let x = Array2::from_shape_fn((rows, depth), |(i, j)| {
                ((i * 31 + j * 17) % 101) as f64 / 37.0 - 1.3
            });
            let w = Array2::from_shape_fn((depth, cols), |(i, j)| {
                ((i * 7 + j * 29) % 89) as f64 / 41.0 - 1.1
            });
            let want = x.dot(&w);
            let product = |threads| {
                on(threads, || {
                    let packed = pack_weight(&w.view()).expect("valid");
                    let mut out = Array2::from_elem((rows, cols), f64::NAN);
                    weight_product(&x.view(), &packed, out.view_mut());
                    // the same into every other column of a wider array
                    let mut wide = Array2::from_elem((rows, 2 * cols), f64::NAN);
                    weight_product(&x.view(), &packed, wide.slice_mut(s![.., ..;2]));
                    assert_eq!(wide.slice(s![.., ..;2]), out);
                    out
                })
            };
            let one = product(1);
            assert_eq!(product(2), one, "{rows} × {depth} × {cols}");
            let e = (&one - &want).iter().fold(0.0_f64, |m, d| m.max(d.abs()));
            assert!(e < 1e-12, "{rows} × {depth} × {cols}: {e:e}");
        }
    }

    /// A weight of no rows gives zeros; no rows give nothing.
    #[test]
    fn empty_products() {
        let packed = pack_weight(&Array2::<f32>::zeros((0, 3)).view()).expect("valid");
        let mut out = Array2::from_elem((4, 3), f32::NAN);
        weight_product(&Array2::zeros((4, 0)).view(), &packed, out.view_mut());
        assert_eq!(out, Array2::<f32>::zeros((4, 3)));
        let packed = pack_weight(&Array2::<f32>::ones((2, 3)).view()).expect("valid");
        let mut none = Array2::zeros((0, 3));
        weight_product(&Array2::zeros((0, 2)).view(), &packed, none.view_mut());
    }
}
