//! Which keys each query may attend to.

use ndarray::{
    Array, Array2, ArrayRef, ArrayView, ArrayView1, ArrayView4, Axis, CowArray, Dimension, Ix1,
    Ix2, Ix4, IxDyn,
};

use crate::element::{Element, Storage};
use crate::error::{Error, Result};
use crate::kernel::Parallelism;

/// A restriction on which keys each query attends to, or a bias on its scores.
///
/// Masks are given to [`ScaledDotProduct::with_mask`](crate::ScaledDotProduct::with_mask),
/// which may be called several times: **all masks apply together**. A position is
/// attended to only if every `Keep` mask and every causal mask allows it, and every
/// `Bias` is added to its scaled score. So `CausalTopLeft` with a `Keep` padding
/// mask attends to the keys that are both in the past and not padding.
///
/// A query row with no allowed key gets weights 0 and output 0, never NaN (as in
/// PyTorch's `scaled_dot_product_attention`). Masked positions are never read: a NaN
/// or a huge value there, in the keys, values or bias, changes nothing.
///
/// Explicit masks broadcast (NumPy rules, aligned on the right) to the scores' shape:
/// `(L, S)` for 2-D inputs, `(batch, heads, L, S)` for batched ones. A mask of shape
/// `(S,)` therefore applies one key-padding row to every query.
///
/// # Examples
///
/// ```
/// use attn::{Mask, ScaledDotProduct};
/// use ndarray::{array, Array2};
///
/// let q = Array2::<f64>::ones((3, 2));
/// let v = array![[1.0], [2.0], [3.0]];
/// let not_padding = array![true, true, false]; // key 2 is padding
/// let out = ScaledDotProduct::new()
///     .with_mask(Mask::CausalTopLeft)
///     .with_mask(Mask::keep(&not_padding))
///     .forward(&q, &q, &v)?;
/// assert_eq!(out, array![[1.0], [1.5], [1.5]]);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub enum Mask<'a, A> {
    /// Boolean keep-mask: **`true` means the query may attend to the key** (PyTorch
    /// SDPA's meaning, and Hugging Face's `attention_mask`); `false` positions get
    /// weight 0. **PyTorch's `nn.MultiheadAttention` means the opposite** with its
    /// `key_padding_mask` and boolean `attn_mask` (`true` = may not attend):
    /// negate those. Borrowed ([`keep`](Self::keep)) or owned
    /// ([`keep_owned`](Self::keep_owned)).
    Keep(CowArray<'a, bool, IxDyn>),
    /// Additive bias, added to the scaled scores `QKᵀ·scale` before the softmax
    /// (ALiBi, relative positions). `−∞` masks a position out. Borrowed
    /// ([`bias`](Self::bias)) or owned ([`bias_owned`](Self::bias_owned)).
    Bias(CowArray<'a, A, IxDyn>),
    /// Causal, aligned top-left: query `i` attends to keys `j ≤ i` (PyTorch `is_causal`).
    CausalTopLeft,
    /// Causal, aligned bottom-right: query `i` attends to keys `j ≤ i + S − L`, so the
    /// last query sees every key (what a KV cache needs when `L < S`). When `L > S`
    /// the first `L − S` queries see no key and give output 0.
    CausalBottomRight,
    /// Local causal attention over a window of `size` positions, aligned
    /// bottom-right: query `i` sits at position `p = i + S − L` and sees keys
    /// `p − size < j ≤ p` (itself and the `size − 1` before it). Computed on the
    /// fly; the fused kernel skips key blocks outside every window. `size = 0` is
    /// an [`Error::InvalidConfig`].
    SlidingWindow(usize),
    /// ALiBi (Press et al., 2022): adds `−slope·|p − j|` to the score of query `i`
    /// (at position `p = i + S − L`) and key `j`, one slope per head (see
    /// [`alibi_slopes`](crate::alibi_slopes)); a single slope serves every head.
    /// Computed on the fly: no `L × S` bias is built. A layer that owns its slopes:
    /// [`PositionEncoding::Alibi`](crate::PositionEncoding::Alibi).
    Alibi(ndarray::ArrayView1<'a, A>),
}

impl<'a, A> Mask<'a, A> {
    /// A [`Mask::Keep`] from a boolean array of any dimension: `true` = may attend.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::Mask;
    /// use ndarray::array;
    ///
    /// let allowed = array![[true, false], [true, true]];
    /// let mask: Mask<'_, f32> = Mask::keep(&allowed);
    /// assert!(matches!(mask, Mask::Keep(_)));
    /// ```
    pub fn keep<D: Dimension>(allowed: &'a ArrayRef<bool, D>) -> Self {
        Mask::Keep(allowed.view().into_dyn().into())
    }

    /// A key-padding [`Mask::Keep`] from a `(B, S)` array, **`true` = a real
    /// token** (Hugging Face's `attention_mask`), applied as `(B, 1, 1, S)`:
    /// batch row `b`'s queries, in every head, attend to its real keys only.
    /// PyTorch's `key_padding_mask` means the opposite (`True` = padding): pass
    /// its negation, `Mask::key_padding(&m.mapv(|pad| !pad))`. (A `(B, S)` array
    /// given to [`keep`](Self::keep) would broadcast as `(L, S)`, rows of
    /// queries, not of the batch.) No copy: a view with two axes inserted.
    ///
    /// # Shapes
    ///
    /// `real: (B, S)` for batched scores `(B, heads, L, S)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, ScaledDotProduct};
    /// use ndarray::{array, Array4};
    ///
    /// // two sequences of two keys; the second key of batch row 0 is padding
    /// let real = array![[true, false], [true, true]];
    /// let x = Array4::<f64>::from_shape_fn((2, 1, 2, 2), |(b, _, i, j)| (b + i + j) as f64);
    /// let attention = ScaledDotProduct::new().with_mask(Mask::key_padding(&real));
    /// let w = attention.forward_batched_with_weights(&x, &x, &x)?.weights;
    /// assert_eq!(w[[0, 0, 1, 0]], 1.0); // batch 0, query 1: only its real key
    ///
    /// // the same as the (B, 1, 1, S) keep-mask
    /// let expanded = real.clone().into_shape_with_order((2, 1, 1, 2))?;
    /// let same = ScaledDotProduct::new().with_mask(Mask::keep(&expanded));
    /// assert_eq!(same.forward_batched_with_weights(&x, &x, &x)?.weights, w);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn key_padding(real: &'a ndarray::ArrayRef2<bool>) -> Self {
        Mask::Keep(
            real.view()
                .insert_axis(Axis(1))
                .insert_axis(Axis(1))
                .into_dyn()
                .into(),
        )
    }

    /// A [`Mask::Keep`] that owns its array, so the mask (and a
    /// [`ScaledDotProduct`](crate::ScaledDotProduct) holding it) borrows nothing
    /// and can be stored in a struct.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, ScaledDotProduct};
    /// use ndarray::{array, Array2};
    ///
    /// struct Model {
    ///     attention: ScaledDotProduct<'static, f64>,
    /// }
    /// let model = Model {
    ///     attention: ScaledDotProduct::new().with_mask(Mask::keep_owned(array![true, true, false])),
    /// };
    /// let x = Array2::<f64>::eye(3);
    /// let w = model.attention.forward_with_weights(&x, &x, &x)?.weights;
    /// assert_eq!(w.column(2).sum(), 0.0);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn keep_owned<D: Dimension>(allowed: Array<bool, D>) -> Mask<'static, A> {
        Mask::Keep(allowed.into_dyn().into())
    }

    /// A [`Mask::Bias`] that owns its array (see [`keep_owned`](Self::keep_owned)).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::Mask;
    /// use ndarray::array;
    ///
    /// let mask = Mask::bias_owned(array![[0.0_f32, -1.0]]);
    /// assert!(matches!(mask, Mask::Bias(_)));
    /// ```
    pub fn bias_owned<D: Dimension>(bias: Array<A, D>) -> Mask<'static, A> {
        Mask::Bias(bias.into_dyn().into())
    }

    /// A [`Mask::Bias`] from a float array of any dimension, added to the scaled scores.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::Mask;
    /// use ndarray::array;
    ///
    /// let bias = array![[0.0_f64, -1.0], [-1.0, 0.0]];
    /// assert!(matches!(Mask::bias(&bias), Mask::Bias(_)));
    /// ```
    pub fn bias<D: Dimension>(bias: &'a ArrayRef<A, D>) -> Self {
        Mask::Bias(bias.view().into_dyn().into())
    }

    /// The same mask borrowing its arrays for a shorter time (array views do
    /// not shorten their lifetime by themselves), so it can join masks of a
    /// narrower scope. Nothing is copied.
    pub(crate) fn reborrow(&self) -> Mask<'_, A> {
        match self {
            Mask::Keep(m) => Mask::Keep(m.view().into()),
            Mask::Bias(m) => Mask::Bias(m.view().into()),
            Mask::CausalTopLeft => Mask::CausalTopLeft,
            Mask::CausalBottomRight => Mask::CausalBottomRight,
            Mask::SlidingWindow(size) => Mask::SlidingWindow(*size),
            Mask::Alibi(slopes) => Mask::Alibi((*slopes).reborrow()),
        }
    }

    /// Whether the mask reads the distance between a query and a key (ALiBi, a
    /// sliding window): padding between real tokens would change it, so such a
    /// row is reordered first.
    pub(crate) fn reads_distance(&self) -> bool {
        matches!(self, Mask::SlidingWindow(_) | Mask::Alibi(_))
    }

    /// The shape of a [`Mask::Bias`]'s array, `None` for other masks.
    pub(crate) fn bias_shape(&self) -> Option<&[usize]> {
        match self {
            Mask::Bias(bias) => Some(bias.shape()),
            _ => None,
        }
    }
}

/// The slopes of every ALiBi mask of `masks`, in the compute type (borrowed for
/// `f32` and `f64`): what [`in_compute`] borrows.
pub(crate) fn slopes_in_compute<'s, A: Storage>(
    masks: &'s [Mask<'_, A>],
) -> Vec<CowArray<'s, A::Compute, Ix1>> {
    masks
        .iter()
        .filter_map(|mask| match mask {
            Mask::Alibi(slopes) => Some(A::compute(slopes.view(), Parallelism::Sequential)),
            _ => None,
        })
        .collect()
}

/// `masks` in the compute type: biases converted (borrowed for `f32` and `f64`),
/// ALiBi masks borrowing their [`slopes_in_compute`], in order.
pub(crate) fn in_compute<'s, A: Storage>(
    masks: &'s [Mask<'_, A>],
    slopes: &'s [CowArray<'s, A::Compute, Ix1>],
) -> Vec<Mask<'s, A::Compute>> {
    let mut alibi = slopes.iter();
    masks
        .iter()
        .map(|mask| match mask {
            Mask::Keep(keep) => Mask::Keep(keep.view().into()),
            Mask::Bias(bias) => Mask::Bias(A::compute(bias.view(), Parallelism::Sequential)),
            Mask::CausalTopLeft => Mask::CausalTopLeft,
            Mask::CausalBottomRight => Mask::CausalBottomRight,
            Mask::SlidingWindow(size) => Mask::SlidingWindow(*size),
            Mask::Alibi(_) => Mask::Alibi(
                alibi
                    .next()
                    .expect("slopes_in_compute gives one slope array per ALiBi mask")
                    .view(),
            ),
        })
        .collect()
}

/// A [`Mask`] as the kernel reads it: its arrays broadcast to `D`, the scores of
/// a whole call ([`Mask4`]) or of one head ([`Mask2`]). Borrowed, never copied.
#[derive(Debug, Clone)]
pub(crate) enum Shaped<'a, A, D: Dimension> {
    Keep(ArrayView<'a, bool, D>),
    Bias(ArrayView<'a, A, D>),
    CausalTopLeft,
    CausalBottomRight,
    SlidingWindow(usize),
    /// One slope per head (length `heads`) or one for all (length 1); one
    /// head's block holds its own slope (length 1).
    Alibi(ArrayView1<'a, A>),
}

/// A mask broadcast to the 4-D scores shape `(batch, heads, L, S)`.
pub(crate) type Mask4<'a, A> = Shaped<'a, A, Ix4>;

/// A mask for one `(L, S)` block of scores.
pub(crate) type Mask2<'a, A> = Shaped<'a, A, Ix2>;

/// Broadcasts every mask to `scores` (the user's scores shape, 2-D or 4-D) and
/// lifts it to 4-D.
pub(crate) fn broadcast_all<'m, A>(
    masks: &'m [Mask<'_, A>],
    scores: &[usize],
) -> Result<Vec<Mask4<'m, A>>> {
    masks.iter().map(|m| broadcast(m, scores)).collect()
}

fn broadcast<'m, A>(mask: &'m Mask<'_, A>, scores: &[usize]) -> Result<Mask4<'m, A>> {
    Ok(match mask {
        Mask::Keep(m) => Shaped::Keep(broadcast_view(m, scores)?),
        Mask::Bias(m) => Shaped::Bias(broadcast_view(m, scores)?),
        Mask::CausalTopLeft => Shaped::CausalTopLeft,
        Mask::CausalBottomRight => Shaped::CausalBottomRight,
        Mask::SlidingWindow(0) => {
            return Err(Error::InvalidConfig {
                reason: "a sliding window needs a size of at least 1".to_string(),
            });
        }
        Mask::SlidingWindow(size) => Shaped::SlidingWindow(*size),
        Mask::Alibi(slopes) => {
            let heads = if scores.len() == 4 { scores[1] } else { 1 };
            if slopes.len() != 1 && slopes.len() != heads {
                return Err(Error::MaskShape {
                    mask: slopes.shape().to_vec(),
                    scores: scores.to_vec(),
                });
            }
            Shaped::Alibi(slopes.view())
        }
    })
}

fn broadcast_view<'m, T>(
    m: &'m CowArray<'_, T, IxDyn>,
    scores: &[usize],
) -> Result<ArrayView4<'m, T>> {
    let shape_error = || Error::MaskShape {
        mask: m.shape().to_vec(),
        scores: scores.to_vec(),
    };
    let mut view = m.broadcast(IxDyn(scores)).ok_or_else(shape_error)?;
    while view.ndim() < 4 {
        view.insert_axis_inplace(Axis(0));
    }
    view.into_dimensionality().map_err(|_| shape_error())
}

impl<A, D: Dimension> Shaped<'_, A, D> {
    /// The same mask, borrowing for a shorter time.
    pub(crate) fn reborrow(&self) -> Shaped<'_, A, D> {
        match self {
            Shaped::Keep(m) => Shaped::Keep(m.view()),
            Shaped::Bias(m) => Shaped::Bias(m.view()),
            Shaped::CausalTopLeft => Shaped::CausalTopLeft,
            Shaped::CausalBottomRight => Shaped::CausalBottomRight,
            Shaped::SlidingWindow(size) => Shaped::SlidingWindow(*size),
            Shaped::Alibi(slopes) => Shaped::Alibi(slopes.view()),
        }
    }
}

impl<'a, A: Copy> Mask4<'a, A> {
    /// The mask of the `(L, S)` block of batch `b`, head `h`.
    pub(crate) fn block(&self, b: usize, h: usize) -> Mask2<'_, A> {
        match self {
            Shaped::Keep(m) => Shaped::Keep(m.index_axis(Axis(0), b).index_axis_move(Axis(0), h)),
            Shaped::Bias(m) => Shaped::Bias(m.index_axis(Axis(0), b).index_axis_move(Axis(0), h)),
            Shaped::CausalTopLeft => Shaped::CausalTopLeft,
            Shaped::CausalBottomRight => Shaped::CausalBottomRight,
            Shaped::SlidingWindow(size) => Shaped::SlidingWindow(*size),
            Shaped::Alibi(slopes) => {
                let h = if slopes.len() == 1 { 0 } else { h };
                Shaped::Alibi(slopes.slice(ndarray::s![h..h + 1]))
            }
        }
    }
}

impl<A: Element> Mask2<'_, A> {
    /// How far this mask can raise a score of a head with `rows` queries or keys
    /// (the larger), or `None` when it holds a NaN or `+∞` (the fused kernels
    /// then leave the head to the reference path).
    pub(crate) fn bias_bound(&self, rows: usize) -> Option<f64> {
        let f = |x: A| x.to_f64().unwrap_or(f64::INFINITY);
        match self {
            Shaped::Bias(bias) => bias.iter().try_fold(0.0_f64, |bound, &x| {
                if x.is_nan() || x == A::infinity() {
                    None
                } else if x.is_finite() {
                    Some(bound.max(f(x.abs())))
                } else {
                    Some(bound)
                }
            }),
            Shaped::Alibi(slope) => {
                let slope = slope[0];
                slope.is_finite().then(|| f(slope.abs()) * rows as f64)
            }
            Shaped::Keep(_)
            | Shaped::CausalTopLeft
            | Shaped::CausalBottomRight
            | Shaped::SlidingWindow(_) => Some(0.0),
        }
    }
}

/// The first key a sliding window of `size` lets query `i` of `l` see, of `s`.
pub(crate) fn window_start(size: usize, i: usize, l: usize, s: usize) -> usize {
    causal_keys_seen(true, i, l, s).saturating_sub(size)
}

/// How many keys (the first ones) causal masking lets query `i` of `l` see, of `s`.
pub(crate) fn causal_keys_seen(bottom_right: bool, i: usize, l: usize, s: usize) -> usize {
    let seen = if bottom_right {
        (i + 1 + s).saturating_sub(l)
    } else {
        i + 1
    };
    seen.min(s)
}

/// The keys causal and sliding-window masks leave query `i` (of `l`) in reach,
/// of `s`: the others are masked whatever the rest of the masks say.
pub(crate) fn keys_in_reach<A>(
    masks: &[Mask2<'_, A>],
    i: usize,
    l: usize,
    s: usize,
) -> std::ops::Range<usize> {
    masks.iter().fold(0..s, |reach, mask| match mask {
        Mask2::CausalTopLeft => reach.start..reach.end.min(causal_keys_seen(false, i, l, s)),
        Mask2::CausalBottomRight => reach.start..reach.end.min(causal_keys_seen(true, i, l, s)),
        Mask2::SlidingWindow(size) => {
            reach.start.max(window_start(*size, i, l, s))
                ..reach.end.min(causal_keys_seen(true, i, l, s))
        }
        _ => reach,
    })
}

/// Applies masks to scaled scores: biases are added first, then every position
/// some mask excludes is set to `−∞` (so nothing at a masked position survives).
pub(crate) fn apply<A: Element>(masks: &[Mask2<'_, A>], scores: &mut Array2<A>) {
    let (l, s) = scores.dim();
    for (i, mut row) in scores.rows_mut().into_iter().enumerate() {
        match row.as_slice_mut() {
            Some(row) => apply_row(masks, i, l, s, 0, row),
            None => {
                // a strided row (the product of transposed inputs): mask a copy
                let mut copy = row.to_vec();
                apply_row(masks, i, l, s, 0, &mut copy);
                row.iter_mut().zip(copy).for_each(|(x, y)| *x = y);
            }
        }
    }
}

/// [`apply`] to the scores of query `i` (of `l`) against keys `j0 .. j0 + row.len()` (of `s`).
pub(crate) fn apply_row<A: Element>(
    masks: &[Mask2<'_, A>],
    i: usize,
    l: usize,
    s: usize,
    j0: usize,
    row: &mut [A],
) {
    let keys = j0..j0 + row.len();
    // position of query i among the keys (bottom-right alignment), may be negative
    let position = i as i64 + s as i64 - l as i64;
    for mask in masks {
        match mask {
            Mask2::Bias(bias) => {
                for (x, &b) in row.iter_mut().zip(bias.slice(ndarray::s![i, keys.clone()])) {
                    *x += b;
                }
            }
            Mask2::Alibi(slope) => {
                let slope = slope[0];
                for (x, j) in row.iter_mut().zip(keys.clone()) {
                    let distance = A::from_f64((position - j as i64).unsigned_abs() as f64);
                    *x -= slope * distance;
                }
            }
            _ => {}
        }
    }
    for mask in masks {
        match mask {
            Mask2::Bias(_) | Mask2::Alibi(_) => {}
            Mask2::Keep(keep) => {
                for (x, &k) in row.iter_mut().zip(keep.slice(ndarray::s![i, keys.clone()])) {
                    if !k {
                        *x = A::neg_infinity();
                    }
                }
            }
            Mask2::CausalTopLeft | Mask2::CausalBottomRight => {
                let seen = causal_keys_seen(matches!(mask, Mask2::CausalBottomRight), i, l, s);
                let from = seen.saturating_sub(j0).min(row.len());
                row[from..].fill(A::neg_infinity());
            }
            Mask2::SlidingWindow(size) => {
                let seen = causal_keys_seen(true, i, l, s);
                let from = seen.saturating_sub(j0).min(row.len());
                row[from..].fill(A::neg_infinity());
                let until = window_start(*size, i, l, s)
                    .saturating_sub(j0)
                    .min(row.len());
                row[..until].fill(A::neg_infinity());
            }
        }
    }
}
