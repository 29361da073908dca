//! The direct path over a paged cache: each key/value head's rows read block
//! by block through the sequence's block table, in the type the cache stores
//! (widened or dequantised in registers).

use ndarray::{ArrayViewMut2, ArrayViewMut4};

use super::arch::{Arch, KernelElement};
use super::direct::{Native, Paged, Quantized, Rows, Source, Widening, integer_fits};
use super::native::{kv_groups, per_head};
use super::options::Parallelism;
use super::params::DIRECT_BATCH_ROWS;
use super::report::{self, Path};
use super::run_direct;
use crate::core::problem::Problem;
use crate::decode::paged::{CacheElement, PerCache};
use crate::element::{Element, Half, PerElement};
use crate::error::Result;
use crate::flex::program::{Plain, Program};

/// A sequence's keys and values in a paged cache's pool: for each key/value
/// head, `blocks` blocks of `size` rows of keys (`d_k` wide) and of values
/// (`d_v` wide), and for int8 one scale per row.
pub(crate) struct Pages<'p, E> {
    pub(crate) keys: &'p [E],
    pub(crate) values: &'p [E],
    pub(crate) key_scales: &'p [f32],
    pub(crate) value_scales: &'p [f32],
    /// The sequence's blocks, in order.
    pub(crate) table: &'p [usize],
    pub(crate) size: usize,
    pub(crate) blocks: usize,
    pub(crate) kv_heads: usize,
    pub(crate) d_k: usize,
    pub(crate) d_v: usize,
}

impl<E> Pages<'_, E> {
    /// Where head `kv`'s rows of block `block` begin, counted in rows.
    fn first_row(&self, block: usize, kv: usize) -> usize {
        (kv * self.blocks + block) * self.size
    }
}

/// Attention's output for every query head of `problem` (a batch of one
/// sequence, its keys and values only shapes) over `pages`, into `out`; a head
/// whose inputs the fused arithmetic cannot stand for goes to `fallback(h, out)`.
///
/// # Errors
///
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when `ATTN_KERNEL_ARCH`
/// holds an unknown value.
pub(crate) fn forward_pages<E: CacheElement>(
    problem: &Problem<'_, E::Compute, ()>,
    pages: &Pages<'_, E>,
    out: ArrayViewMut4<'_, E::Compute>,
    parallelism: Parallelism,
    fallback: &dyn Fn(usize, ArrayViewMut2<'_, E::Compute>),
) -> Result<()> {
    (E::select_cache(PagedForwards))(problem, pages, out, parallelism, fallback)
}

/// Whether the fused kernel can run (`ATTN_KERNEL_ARCH` names a level this
/// CPU has, or is unset): a step checks it before it writes.
///
/// # Errors
///
/// As [`forward_pages`].
pub(crate) fn ready() -> Result<()> {
    Arch::detect().map(|_| ())
}

/// [`forward_pages`] for one stored type `E` computing in `C`.
type PagedFn<C, E> = for<'p, 'g, 'o, 'f> fn(
    &Problem<'p, C, ()>,
    &Pages<'g, E>,
    ArrayViewMut4<'o, C>,
    Parallelism,
    &'f dyn Fn(usize, ArrayViewMut2<'_, C>),
) -> Result<()>;

/// Picks [`forward_pages`]' body for the stored type.
struct PagedForwards;

impl PerCache for PagedForwards {
    type Output<E: CacheElement> = PagedFn<E::Compute, E>;

    fn native<A: Element + CacheElement<Compute = A>>(self) -> PagedFn<A, A> {
        A::select::<Plain, _>(NativePages)
    }

    fn half<H: Half + CacheElement<Compute = f32>>(self) -> PagedFn<f32, H> {
        |problem, pages, out, parallelism, fallback| {
            let arch = Arch::detect()?;
            run_pages(
                problem,
                pages,
                arch,
                out,
                parallelism,
                fallback,
                |data, _, _| Widening::<H>::rows(data),
            )
        }
    }

    fn int8(self) -> PagedFn<f32, i8> {
        |problem, pages, out, parallelism, fallback| {
            let arch = Arch::detect()?;
            let integer = arch.int8_dots();
            // one batch per group: its query heads' rows (up to the direct
            // path's batch)
            let (_, heads, l, _) = problem.q.dim();
            let rows = (heads / pages.kv_heads * l).min(DIRECT_BATCH_ROWS);
            if integer && integer_fits(rows, pages.d_k) && integer_fits(rows, pages.d_v) {
                report::count(Path::Int8Dots, heads);
            }
            run_pages(
                problem,
                pages,
                arch,
                out,
                parallelism,
                fallback,
                |data, scales, width| Quantized {
                    data,
                    scales,
                    width,
                    integer,
                },
            )
        }
    }
}

/// The `f32` and `f64` bodies, through the element switch that knows them as
/// kernel types.
struct NativePages;

impl PerElement<Plain> for NativePages {
    type Output<T: Element> = PagedFn<T, T>;

    fn f32(self) -> PagedFn<f32, f32> {
        native_pages::<f32>
    }

    fn f64(self) -> PagedFn<f64, f64> {
        native_pages::<f64>
    }
}

/// [`forward_pages`] over rows stored as computed.
fn native_pages<A: KernelElement>(
    problem: &Problem<'_, A, ()>,
    pages: &Pages<'_, A>,
    out: ArrayViewMut4<'_, A>,
    parallelism: Parallelism,
    fallback: &dyn Fn(usize, ArrayViewMut2<'_, A>),
) -> Result<()>
where
    Plain: Program<A>,
{
    let arch = Arch::detect()?;
    run_pages(
        problem,
        pages,
        arch,
        out,
        parallelism,
        fallback,
        |data, _, _| Native::<A>::rows(data),
    )
}

/// The direct path over the blocks of `pages`, `rows(data, scales, width)`
/// reading one head's rows of one block (`scales` empty where rows have none).
fn run_pages<'g, A, E, R>(
    problem: &Problem<'_, A, ()>,
    pages: &Pages<'g, E>,
    arch: Arch,
    out: ArrayViewMut4<'_, A>,
    parallelism: Parallelism,
    fallback: &dyn Fn(usize, ArrayViewMut2<'_, A>),
    rows: impl Fn(&'g [E], &'g [f32], usize) -> R,
) -> Result<()>
where
    A: KernelElement,
    Plain: Program<A>,
    R: Rows<A>,
{
    let mut outs: Vec<_> = per_head(out).collect();
    let mut groups = kv_groups(problem, &mut outs, None);
    let blocks: Vec<(Vec<R>, Vec<R>)> = (0..pages.kv_heads)
        .map(|kv| {
            let head = |data: &'g [E], scales: &'g [f32], width: usize| {
                pages
                    .table
                    .iter()
                    .map(|&b| {
                        let (first, size) = (pages.first_row(b, kv), pages.size);
                        let data = &data[first * width..][..size * width];
                        rows(data, scales.get(first..first + size).unwrap_or(&[]), width)
                    })
                    .collect()
            };
            (
                head(pages.keys, pages.key_scales, pages.d_k),
                head(pages.values, pages.value_scales, pages.d_v),
            )
        })
        .collect();
    let paged: Vec<_> = groups
        .iter()
        .map(|g| {
            let (keys, values) = &blocks[g.kv];
            let over = |blocks, width| Paged {
                blocks,
                size: pages.size,
                width,
            };
            (over(&keys[..], pages.d_k), over(&values[..], pages.d_v))
        })
        .collect();
    run_direct::direct_over(
        problem,
        arch,
        &mut groups,
        parallelism,
        &paged,
        |_, h, out| fallback(h, out),
    );
    Ok(())
}
