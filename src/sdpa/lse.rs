//! Attention that keeps each query row's log-sum-exp: for a backward pass that
//! need not run the forward again, and for attention computed over shards of the
//! keys and merged.

use ndarray::{Array, Array2, ArrayRef, ArrayRef4, Dimension, Ix4, Zip};

use super::ScaledDotProduct;
use crate::core::problem::AttentionDim;
use crate::element::{Element, Storage};
use crate::error::{Error, Result};
use crate::flex::program::{Plain, Program};
use crate::kernel;

/// Attention's output with each query row's log-sum-exp of its scaled, masked
/// scores, `lse = ln Σⱼ exp(sⱼ)` (`−∞` for a row that sees no key).
///
/// With it, [`ScaledDotProduct::backward_with_lse`] skips the forward pass the plain
/// backward runs again, and [`merge_attention`] joins attention computed over
/// separate shards of the keys.
///
/// # Shapes
///
/// 2-D (`D = Ix2`): `output: (L, d_v)`, `lse: (L,)`. Batched (`D = Ix4`):
/// `output: (batch, heads, L, d_v)`, `lse: (batch, heads, L)`.
///
/// # Examples
///
/// ```
/// use ndarray::array;
///
/// let q = array![[0.0_f64, 0.0]];
/// let kv = array![[1.0, 2.0], [3.0, 4.0]];
/// let out = attn::ScaledDotProduct::new().forward_with_lse(&q, &kv, &kv)?;
/// assert_eq!(out.output, array![[2.0, 3.0]]);
/// assert!((out.lse[0] - 2f64.ln()).abs() < 1e-15); // two scores of 0
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLse<A: Storage, D: Dimension> {
    /// `softmax(S)·V`.
    pub output: Array<A, D>,
    /// `ln Σⱼ exp(Sᵢⱼ)` for every query row `i`, in the compute type: `f32`
    /// for `bf16` and `f16` (rounded to bf16, an lse of 10 would move by up to
    /// 0.03, and every weight `exp(s − lse)` of the backward by 3 %).
    pub lse: Array<A::Compute, D::Smaller>,
}

impl<A: Storage> ScaledDotProduct<'_, A> {
    /// [`forward`](Self::forward) or [`forward_batched`](Self::forward_batched)
    /// (by the inputs' shape), also returning each row's log-sum-exp.
    ///
    /// In `bf16` and `f16` it runs the kernel [`forward`](Self::forward) runs
    /// (bf16 on AMX tiles where the CPU has them), the output rounded once and
    /// the log-sum-exp kept in `f32` (on AMX tiles within 3·10⁻⁶ of the f32
    /// pass's: the weights' `exp` there is coarser, as they are rounded to
    /// bf16 next).
    ///
    /// # Shapes
    ///
    /// 2-D: `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)` → output `(L, d_v)`, lse
    /// `(L,)`. Batched: `q: (batch, heads, L, d_k)`, `k: (batch, kv_heads, S, d_k)`,
    /// `v: (batch, kv_heads, S, d_v)` → output `(batch, heads, L, d_v)`, lse
    /// `(batch, heads, L)`.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward) and [`forward_batched`](Self::forward_batched).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, ScaledDotProduct};
    /// use ndarray::{array, Array4};
    ///
    /// let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
    /// let out = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft).forward_with_lse(&x, &x, &x)?;
    /// assert_eq!(out.output.row(0), x.row(0)); // the first row sees one key
    /// assert!((out.lse[0] - 1.0 / 2f64.sqrt()).abs() < 1e-15); // ln exp(its one score)
    ///
    /// let q = Array4::<f32>::zeros((2, 4, 3, 8));
    /// let kv = Array4::<f32>::ones((2, 2, 5, 8)); // grouped-query heads
    /// let out = ScaledDotProduct::new().forward_with_lse(&q, &kv, &kv)?;
    /// assert_eq!(out.lse.dim(), (2, 4, 3));
    /// assert!((out.lse[[1, 3, 2]] - 5f32.ln()).abs() < 1e-6);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_with_lse<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
    ) -> Result<AttentionLse<A, D>> {
        self.lse_under([q, k, v], |_| Ok(Plain))
    }

    /// [`forward_with_lse`](Self::forward_with_lse), which takes batched inputs
    /// too.
    ///
    /// # Errors
    ///
    /// As [`forward_batched`](Self::forward_batched).
    #[deprecated(
        since = "0.2.0",
        note = "use `forward_with_lse`, which takes batched inputs too"
    )]
    pub fn forward_batched_with_lse(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
    ) -> Result<AttentionLse<A, Ix4>> {
        self.forward_with_lse(q, k, v)
    }

    /// [`forward_with_lse`](Self::forward_with_lse) under the program
    /// `program` makes, once the call is checked, from the shape of its scores:
    /// the output rounded back once, the log-sum-exp in the compute type.
    pub(super) fn lse_under<D: AttentionDim, P: Program<A::Compute>>(
        &self,
        [q, k, v]: [&ArrayRef<A, D>; 3],
        program: impl FnOnce([usize; 4]) -> Result<P>,
    ) -> Result<AttentionLse<A, D>> {
        self.solve_under(q.view(), k.view(), v.view(), program, |problem| {
            let saved = kernel::forward_lse(problem, self.kernel, self.parallelism)?;
            Ok(AttentionLse {
                output: D::unlift(A::store(saved.output, self.parallelism)),
                lse: D::unlift_rows(saved.lse),
            })
        })
    }
}

/// Joins attention computed over separate shards of the keys (each part holds
/// the same queries against its own keys, with its own output and log-sum-exp)
/// into attention over all the keys: with `m = maxₚ lseₚ`,
/// `output = Σₚ exp(lseₚ − m)·outputₚ / Σₚ exp(lseₚ − m)` and
/// `lse = m + ln Σₚ exp(lseₚ − m)`, row by row. A row that sees no key in any
/// part gets output 0 and `lse = −∞`.
///
/// This is how one attention is split over threads or machines (ring or
/// sequence-parallel attention): each shard of keys and values stays where it is.
///
/// # Shapes
///
/// Every part has the same shapes; the result has them too.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when `parts` is empty, [`Error::Shape`] when the parts'
/// shapes differ or a part's `lse` does not fit its output.
///
/// # Examples
///
/// ```
/// use attn::{merge_attention, ScaledDotProduct};
/// use ndarray::{array, s};
///
/// let q = array![[0.5_f64, -1.0]];
/// let kv = array![[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]];
/// let attn = ScaledDotProduct::new();
/// let first = attn.forward_with_lse(&q, &kv.slice(s![..2, ..]), &kv.slice(s![..2, ..]))?;
/// let rest = attn.forward_with_lse(&q, &kv.slice(s![2.., ..]), &kv.slice(s![2.., ..]))?;
/// let merged = merge_attention(&[first, rest])?;
/// let all = attn.forward_with_lse(&q, &kv, &kv)?;
/// assert!((&merged.output - &all.output).iter().all(|d| d.abs() < 1e-15));
/// assert!((merged.lse[0] - all.lse[0]).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn merge_attention<A: Element, D: Dimension>(
    parts: &[AttentionLse<A, D>],
) -> Result<AttentionLse<A, D>> {
    let first = parts.first().ok_or_else(|| Error::InvalidConfig {
        reason: "merge_attention needs at least one part".to_string(),
    })?;
    if first.output.ndim() == 0 {
        return Err(Error::Shape {
            what: "a merge's outputs must have at least one axis: (…, rows, width)",
            expected: vec![1],
            found: vec![],
        });
    }
    for part in parts {
        if let Some(bad) = part.lse.iter().find(|l| l.is_nan() || **l == A::infinity()) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "merge_attention: a log-sum-exp is {bad:?}; each must be finite or −∞ (a row that saw no key)"
                ),
            });
        }
        if part.output.shape() != first.output.shape()
            || part.lse.shape() != &first.output.shape()[..first.output.ndim() - 1]
        {
            return Err(Error::Shape {
                what: "every part of a merge must have the first part's output shape, and lse its rows",
                expected: [
                    first.output.shape(),
                    &first.output.shape()[..first.output.ndim() - 1],
                ]
                .concat(),
                found: [part.output.shape(), part.lse.shape()].concat(),
            });
        }
    }
    let width = first.output.shape()[first.output.ndim() - 1];
    let rows = first.lse.len();
    // every part as (rows, width) and (rows,)
    let flat = |part: &AttentionLse<A, D>| {
        let output = part
            .output
            .to_shape((rows, width))
            .expect("an output holds its rows of width")
            .into_owned();
        let lse: Vec<A> = part.lse.iter().copied().collect();
        (output, lse)
    };
    let parts: Vec<(Array2<A>, Vec<A>)> = parts.iter().map(flat).collect();
    let mut output = Array2::zeros((rows, width));
    let mut lse = vec![A::neg_infinity(); rows];
    for (r, (mut out, lse)) in output.outer_iter_mut().zip(&mut lse).enumerate() {
        let max = parts
            .iter()
            .fold(A::neg_infinity(), |m, (_, l)| m.max(l[r]));
        if max == A::neg_infinity() {
            continue; // no part saw a key: output 0, lse −∞
        }
        let mut total = A::zero();
        for (part_out, part_lse) in &parts {
            let weight = (part_lse[r] - max).exp();
            total += weight;
            Zip::from(&mut out)
                .and(part_out.row(r))
                .for_each(|o, &x| *o += weight * x);
        }
        out.mapv_inplace(|x| x / total);
        *lse = max + total.ln();
    }
    Ok(AttentionLse {
        output: output
            .into_shape_with_order(first.output.raw_dim())
            .expect("rows × width is the output's shape"),
        lse: Array::from_shape_vec(first.lse.raw_dim(), lse).expect("one lse per row"),
    })
}
