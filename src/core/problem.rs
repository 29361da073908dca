//! A checked attention call: shapes validated, inputs lifted to 4-D, masks
//! broadcast, scale resolved.

use ndarray::{
    Array, Array1, Array2, Array3, Array4, ArrayView, ArrayView1, ArrayView2, ArrayView3,
    ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis, Dimension, Ix2, Ix4,
};

use super::mask::{self, Mask, Mask2, Mask4, Shaped};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::flex::program::Plain;

/// A checked call, `(batch, heads, L, d_k)` queries against
/// `(batch, kv_heads, S, ·)` keys and values. The keys and values are stored as
/// `KV`: the compute type `A` itself, or a half type that the direct path widens
/// as it reads; the queries as `Q`, the compute type unless the call's
/// storage is half (the kernel widens them for the plans that need it). Its
/// program `P` (a score modification, a block mask, sinks) is [`Plain`]
/// unless the call has one.
pub(crate) struct Problem<'a, A, KV = A, P = Plain, Q = A> {
    pub(crate) q: ArrayView4<'a, Q>,
    pub(crate) k: ArrayView4<'a, KV>,
    pub(crate) v: ArrayView4<'a, KV>,
    pub(crate) masks: Vec<Mask4<'a, A>>,
    pub(crate) scale: A,
    /// The shape of every [`Mask::Bias`], in order, lifted to 4-D with leading 1s:
    /// where a bias has 1 and the scores more, it is broadcast (and its gradient
    /// summed).
    pub(crate) bias_shapes: Vec<[usize; 4]>,
    pub(crate) program: &'a P,
}

impl<'a, A: Element, KV, Q> Problem<'a, A, KV, Plain, Q> {
    /// Checks a call in its own shape, 2-D (`q: (L, d_k)`, `k: (S, d_k)`,
    /// `v: (S, d_v)`) or batched (`q: (batch, heads, L, d_k)`,
    /// `k: (batch, kv_heads, S, d_k)`, `v: (batch, kv_heads, S, d_v)`), so that
    /// its errors name the shapes it was given; then lifts it to 4-D.
    // Inlined into every caller: left out of line (as `benches/compare`'s crate
    // left it), the checked call (184 bytes) was copied out of its `Result` by a
    // `memcpy` call, and the 3 × 4 call took 0.248 µs there instead of 0.219.
    #[inline(always)]
    pub(crate) fn new<D: AttentionDim>(
        q: ArrayView<'a, Q, D>,
        k: ArrayView<'a, KV, D>,
        v: ArrayView<'a, KV, D>,
        masks: &'a [Mask<'_, A>],
        scale: Option<A>,
    ) -> Result<Self> {
        check_shapes(q.shape(), k.shape(), v.shape())?;
        let (q, k, v) = (D::lift(q), D::lift(k), D::lift(v));
        let (batch, heads, l, d_k) = q.dim();
        // the scores' shape in the call's own dimensions: masks broadcast to it
        let scores = [batch, heads, l, k.dim().2];
        let own = &scores[4 - D::NDIM.unwrap_or(4)..];
        Ok(Problem {
            masks: mask::broadcast_all(masks, own)?,
            bias_shapes: bias_shapes(masks),
            scale: resolve_scale(scale, d_k)?,
            program: &Plain,
            q,
            k,
            v,
        })
    }
}

impl<'a, A, KV, Q> Problem<'a, A, KV, Plain, Q> {
    /// The same call under `program`.
    pub(crate) fn with_program<P>(self, program: &'a P) -> Problem<'a, A, KV, P, Q> {
        Problem {
            q: self.q,
            k: self.k,
            v: self.v,
            masks: self.masks,
            scale: self.scale,
            bias_shapes: self.bias_shapes,
            program,
        }
    }
}

impl<'a, A: Copy, KV, P, Q> Problem<'a, A, KV, P, Q> {
    /// The shape of its scores, `[batch, heads, L, S]`.
    pub(crate) fn scores(&self) -> [usize; 4] {
        let (batch, heads, l, _) = self.q.dim();
        [batch, heads, l, self.k.dim().2]
    }

    /// Query heads per key/value head.
    pub(crate) fn group_size(&self) -> usize {
        // kv_heads divides heads (checked), and is 0 only when heads is
        self.q.dim().1.checked_div(self.k.dim().1).unwrap_or(1)
    }

    /// The key/value head that query head `h` attends with.
    pub(crate) fn kv_head(&self, h: usize) -> usize {
        h / self.group_size()
    }

    /// The query heads that share key/value head `kv`.
    pub(crate) fn query_heads(&self, kv: usize) -> std::ops::Range<usize> {
        let group = self.group_size();
        kv * group..(kv + 1) * group
    }

    /// Query head `h` of batch `b`, `(L, d_k)`.
    pub(crate) fn query(&self, b: usize, h: usize) -> ArrayView2<'_, Q> {
        head(&self.q, b, h)
    }

    /// Key/value head `kv` of batch `b`: keys `(S, d_k)` and values `(S, d_v)`.
    pub(crate) fn keys_values(
        &self,
        b: usize,
        kv: usize,
    ) -> (ArrayView2<'_, KV>, ArrayView2<'_, KV>) {
        (head(&self.k, b, kv), head(&self.v, b, kv))
    }

    /// The same call over keys `k` and values `v` of the same shapes, stored as
    /// `KV2` (the same values seen through another type).
    pub(crate) fn with_keys_values<'b, KV2>(
        &'b self,
        k: ArrayView4<'b, KV2>,
        v: ArrayView4<'b, KV2>,
    ) -> Problem<'b, A, KV2, P, Q> {
        debug_assert_eq!((k.dim(), v.dim()), (self.k.dim(), self.v.dim()));
        self.with_inputs(self.q.view(), k, v)
    }

    /// The same call over queries `q` of the same shape, stored as `Q2` (the
    /// same values seen through another type).
    pub(crate) fn with_queries<'b, Q2>(
        &'b self,
        q: ArrayView4<'b, Q2>,
    ) -> Problem<'b, A, KV, P, Q2> {
        debug_assert_eq!(q.dim(), self.q.dim());
        self.with_inputs(q, self.k.view(), self.v.view())
    }

    /// The same call over other inputs of the same shapes.
    pub(crate) fn with_inputs<'b, KV2, Q2>(
        &'b self,
        q: ArrayView4<'b, Q2>,
        k: ArrayView4<'b, KV2>,
        v: ArrayView4<'b, KV2>,
    ) -> Problem<'b, A, KV2, P, Q2> {
        Problem {
            program: self.program,
            q,
            k,
            v,
            masks: self.masks.iter().map(Shaped::reborrow).collect(),
            scale: self.scale,
            bias_shapes: self.bias_shapes.clone(),
        }
    }

    /// The masks of query head `h` of batch `b`, one `(L, S)` block each.
    pub(crate) fn block_masks(&self, b: usize, h: usize) -> Vec<Mask2<'_, A>> {
        self.masks.iter().map(|m| m.block(b, h)).collect()
    }
}

/// The shape of every bias of `masks`, lifted to 4-D with leading 1s (a mask that
/// broadcasts has at most 4 axes).
fn bias_shapes<A>(masks: &[Mask<'_, A>]) -> Vec<[usize; 4]> {
    masks
        .iter()
        .filter_map(Mask::bias_shape)
        .map(|bias| {
            let mut shape = [1; 4];
            let n = bias.len().min(4);
            shape[4 - n..].copy_from_slice(&bias[bias.len() - n..]);
            shape
        })
        .collect()
}

/// Head `h` of batch `b`.
fn head<'v, A>(x: &'v ArrayView4<'_, A>, b: usize, h: usize) -> ArrayView2<'v, A> {
    x.index_axis(Axis(0), b).index_axis_move(Axis(0), h)
}

/// The given scale, checked, or `1/√d_k`.
fn resolve_scale<A: Element>(scale: Option<A>, d_k: usize) -> Result<A> {
    match scale {
        Some(scale) => check_scale(scale),
        None => Ok(A::from_f64(1.0 / (d_k as f64).sqrt())),
    }
}

/// `scale` if it is finite and non-zero, else [`Error::InvalidScale`].
pub(crate) fn check_scale<A: Element>(scale: A) -> Result<A> {
    if scale.is_finite() && scale != A::zero() {
        Ok(scale)
    } else {
        Err(Error::InvalidScale {
            scale: scale.to_f64().unwrap_or(f64::NAN),
        })
    }
}

/// Checks the shapes of `q`, `k`, `v` (all 2-D, or all 4-D).
pub(crate) fn check_shapes(q: &[usize], k: &[usize], v: &[usize]) -> Result<()> {
    let n = q.len();
    if n == 4 {
        if q[0] != k[0] || k[0] != v[0] || k[1] != v[1] {
            return Err(Error::BatchShape {
                query: q.to_vec(),
                key: k.to_vec(),
                value: v.to_vec(),
            });
        }
        let (heads, kv_heads) = (q[1], k[1]);
        let divides = if kv_heads == 0 {
            heads == 0
        } else {
            heads.is_multiple_of(kv_heads)
        };
        if !divides {
            return Err(Error::HeadGroups {
                query_heads: heads,
                kv_heads,
            });
        }
    }
    if q[n - 1] != k[n - 1] {
        return Err(Error::QueryKeyWidth {
            query: q.to_vec(),
            key: k.to_vec(),
        });
    }
    if k[n - 2] != v[n - 2] {
        return Err(Error::KeyValueLength {
            key: k.to_vec(),
            value: v.to_vec(),
        });
    }
    if q[n - 1] == 0 {
        return Err(Error::ZeroWidth {
            what: "query/key width d_k",
            shape: q.to_vec(),
        });
    }
    Ok(())
}

/// The two shapes attention's calls take: `Ix2`, one head (`q: (L, d_k)`), and
/// `Ix4`, batched heads (`q: (batch, heads, L, d_k)`). The calls generic over it
/// ([`forward_with_lse`], [`backward_with_lse`]) take either; each checks its
/// inputs in their own shape and reports errors in it.
///
/// Sealed: these two are the shapes there are.
///
/// # Examples
///
/// ```
/// use attn::{AttentionDim, ScaledDotProduct};
/// use ndarray::{Array2, Array4};
///
/// fn rows<D: AttentionDim>(x: &ndarray::ArrayRef<f64, D>) -> attn::Result<usize> {
///     Ok(ScaledDotProduct::new().forward_with_lse(x, x, x)?.lse.len())
/// }
/// assert_eq!(rows(&Array2::<f64>::ones((3, 4)))?, 3);
/// assert_eq!(rows(&Array4::<f64>::ones((2, 2, 3, 4)))?, 12);
/// # Ok::<(), attn::Error>(())
/// ```
///
/// [`forward_with_lse`]: crate::ScaledDotProduct::forward_with_lse
/// [`backward_with_lse`]: crate::ScaledDotProduct::backward_with_lse
pub trait AttentionDim: Dimension + sealed::Sealed {
    /// An array of this shape as `(batch, heads, ·, ·)`.
    #[doc(hidden)]
    fn lift<A>(x: ArrayView<'_, A, Self>) -> ArrayView4<'_, A>;

    /// One value per row of this shape (`Self::Smaller`) as `(batch, heads, ·)`.
    #[doc(hidden)]
    fn lift_rows<A>(x: ArrayView<'_, A, Self::Smaller>) -> ArrayView3<'_, A>;

    /// A batched result, `(batch, heads, ·, ·)` (one batch and head for 2-D), in
    /// this shape.
    #[doc(hidden)]
    fn unlift<A>(x: Array4<A>) -> Array<A, Self>;

    /// One value per row, `(batch, heads, ·)`, in this shape's rows.
    #[doc(hidden)]
    fn unlift_rows<A>(x: Array3<A>) -> Array<A, Self::Smaller>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for ndarray::Ix2 {}
    impl Sealed for ndarray::Ix4 {}
}

impl AttentionDim for Ix2 {
    fn lift<A>(x: ArrayView2<'_, A>) -> ArrayView4<'_, A> {
        lift(x)
    }

    fn lift_rows<A>(x: ArrayView1<'_, A>) -> ArrayView3<'_, A> {
        x.insert_axis(Axis(0)).insert_axis(Axis(0))
    }

    fn unlift<A>(x: Array4<A>) -> Array2<A> {
        x.index_axis_move(Axis(0), 0).index_axis_move(Axis(0), 0)
    }

    fn unlift_rows<A>(x: Array3<A>) -> Array1<A> {
        x.index_axis_move(Axis(0), 0).index_axis_move(Axis(0), 0)
    }
}

impl AttentionDim for Ix4 {
    fn lift<A>(x: ArrayView4<'_, A>) -> ArrayView4<'_, A> {
        x
    }

    fn lift_rows<A>(x: ArrayView3<'_, A>) -> ArrayView3<'_, A> {
        x
    }

    fn unlift<A>(x: Array4<A>) -> Array4<A> {
        x
    }

    fn unlift_rows<A>(x: Array3<A>) -> Array3<A> {
        x
    }
}

/// A 2-D view as a `(1, 1, rows, cols)` view.
pub(crate) fn lift<A>(x: ArrayView2<'_, A>) -> ArrayView4<'_, A> {
    x.insert_axis(Axis(0)).insert_axis(Axis(0))
}

/// A mutable 2-D view as a `(1, 1, rows, cols)` view.
pub(crate) fn lift_mut<A>(x: ArrayViewMut2<'_, A>) -> ArrayViewMut4<'_, A> {
    x.insert_axis(Axis(0)).insert_axis(Axis(0))
}
