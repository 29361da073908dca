//! Gradients through scaled dot-product attention: the backward pass.

use ndarray::{
    Array, Array4, ArrayD, ArrayRef, ArrayRef2, ArrayRef4, ArrayView, Dimension, Ix2, Ix4, IxDyn,
};

use super::ScaledDotProduct;
use super::lse::AttentionLse;
use crate::core::backward::Gradients;
use crate::core::mask::Mask;
use crate::core::problem::AttentionDim;
use crate::core::reference::SavedView;
use crate::element::{Element, Storage};
use crate::error::{Error, Result};
use crate::flex::program::{Plain, Program};
use crate::kernel;

/// The gradients of a loss with respect to attention's inputs `q`, `k` and `v`,
/// given its gradient with respect to the output.
///
/// # Shapes
///
/// Each field has the shape of its input. 2-D (`D = Ix2`): `q: (L, d_k)`,
/// `k: (S, d_k)`, `v: (S, d_v)`. Batched (`D = Ix4`): `q: (batch, heads, L, d_k)`,
/// `k: (batch, kv_heads, S, d_k)`, `v: (batch, kv_heads, S, d_v)`; with grouped-query
/// heads, `k` and `v` are summed over the query heads that share each key/value head.
///
/// # Examples
///
/// ```
/// use attn::ScaledDotProduct;
/// use ndarray::{array, Array2};
///
/// let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
/// let d_out = Array2::ones((2, 2)); // loss = sum of the output
/// let g = ScaledDotProduct::new().backward(&x, &x, &x, &d_out)?;
/// // every output row is a convex combination of V's rows: d(sum)/dV counts each key's weight
/// assert!((g.v.sum() - 4.0).abs() < 1e-15);
/// assert_eq!(g.q.dim(), (2, 2));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionGradients<A, D: Dimension> {
    /// `∂loss/∂q`.
    pub q: Array<A, D>,
    /// `∂loss/∂k`.
    pub k: Array<A, D>,
    /// `∂loss/∂v`.
    pub v: Array<A, D>,
    /// `∂loss/∂bias` for every [`Mask::Bias`](crate::Mask::Bias) given, in order, each
    /// shaped like its bias: summed over the axes the bias is broadcast along.
    pub bias: Vec<ArrayD<A>>,
}

impl<A: Storage> ScaledDotProduct<'_, A> {
    /// The gradients of a loss with respect to `q`, `k` and `v`, given
    /// `d_out = ∂loss/∂output` of [`forward`](Self::forward) with the same scale and
    /// masks.
    ///
    /// With `P` the attention weights: `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`,
    /// `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`. A query that sees no key gets a zero
    /// gradient and contributes nothing to `dK` and `dV`; masked positions are never
    /// read.
    ///
    /// Computed by the fused backward pass (FlashAttention-2's: no `L × S` weights in
    /// memory, heads in parallel), or by the readable reference path with
    /// [`Kernel::Plain`](crate::Kernel::Plain), for inputs that are not finite or
    /// could overflow, as the forward does. In `bf16` and `f16` the inputs widen
    /// exactly to `f32`, the pass runs in `f32`, and each gradient is rounded
    /// once to the storage type. Where the CPU has AMX (and
    /// `ATTN_KERNEL_ARCH` allows it), `bf16` inputs run on the tile unit, which
    /// rounds the weights `P` and their gradients `dS` to bf16 for the products
    /// that take them, as PyTorch's CPU kernel does: an entry of `dV`, `dQ` or
    /// `dK` moves by at most 2⁻⁹ of the sum of its products' magnitudes
    /// (`Σ|P|·|dO|`, `scale·Σ|dS|·|K|`, `scale·Σ|dS|·|Q|`).
    ///
    /// # Shapes
    ///
    /// `q: (L, d_k)`, `k: (S, d_k)`, `v: (S, d_v)`, `d_out: (L, d_v)` → gradients
    /// shaped like `q`, `k`, `v`.
    ///
    /// # Errors
    ///
    /// The errors of [`forward`](Self::forward), and [`Error::Shape`] when `d_out`
    /// is not `(L, d_v)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, ScaledDotProduct};
    /// use ndarray::array;
    ///
    /// let q = array![[1.0_f64, 0.5], [0.0, 1.0]];
    /// let kv = array![[1.0, 0.0], [0.0, 2.0]];
    /// let d_out = array![[1.0, 0.0], [0.0, 1.0]];
    /// let g = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft).backward(&q, &kv, &kv, &d_out)?;
    /// // the first query sees only the first key: its weight is 1 whatever q is
    /// assert_eq!(g.q.row(0), array![0.0, 0.0]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward(
        &self,
        q: &ArrayRef2<A>,
        k: &ArrayRef2<A>,
        v: &ArrayRef2<A>,
        d_out: &ArrayRef2<A>,
    ) -> Result<AttentionGradients<A, Ix2>> {
        self.gradients(q, k, v, None, d_out)
    }

    /// [`backward`](Self::backward) for batched, multi-head inputs, with
    /// grouped-query support.
    ///
    /// # Shapes
    ///
    /// `q: (batch, heads, L, d_k)`, `k: (batch, kv_heads, S, d_k)`,
    /// `v: (batch, kv_heads, S, d_v)`, `d_out: (batch, heads, L, d_v)` → gradients
    /// shaped like `q`, `k`, `v`; `k` and `v` summed over the query heads that share
    /// each key/value head.
    ///
    /// # Errors
    ///
    /// The errors of [`forward_batched`](Self::forward_batched), and
    /// [`Error::Shape`] when `d_out` is not `(batch, heads, L, d_v)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array4;
    ///
    /// let q = Array4::<f32>::ones((2, 4, 3, 8)); // 4 query heads
    /// let kv = Array4::<f32>::ones((2, 2, 5, 8)); // share 2 key/value heads
    /// let g = attn::ScaledDotProduct::new().backward_batched(&q, &kv, &kv, &Array4::ones((2, 4, 3, 8)))?;
    /// assert_eq!((g.q.dim(), g.k.dim()), ((2, 4, 3, 8), (2, 2, 5, 8)));
    /// // each of the 2 query heads of a group puts 3 rows × weight 1/5 on each key
    /// assert!((g.v[[0, 0, 0, 0]] - 2.0 * 3.0 / 5.0).abs() < 1e-6);
    ///
    /// // the same call in bf16: computed in f32, each gradient rounded once
    /// use attn::half::bf16;
    /// let half = |x: &Array4<f32>| x.mapv(bf16::from_f32);
    /// let g16 = attn::ScaledDotProduct::new().backward_batched(&half(&q), &half(&kv), &half(&kv), &half(&Array4::ones((2, 4, 3, 8))))?;
    /// assert_eq!(g16.v[[0, 0, 0, 0]], bf16::from_f32(g.v[[0, 0, 0, 0]]));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward_batched(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        d_out: &ArrayRef4<A>,
    ) -> Result<AttentionGradients<A, Ix4>> {
        self.gradients(q, k, v, None, d_out)
    }

    /// [`backward`](Self::backward) from what
    /// [`forward_with_lse`](Self::forward_with_lse) kept: the pass does not run the
    /// forward again (FlashAttention's backward), which saves about a third of its
    /// work. `forward` must come from the same inputs, scale and masks, or be
    /// the [`merge_attention`](crate::merge_attention) of attention over shards
    /// of the keys, of which `k` and `v` are one: the gradients are then this
    /// shard's parts of the whole's (`dQ` is the sum of the shards', `dK` and
    /// `dV` are the shard's rows), as context-parallel attention computes them.
    ///
    /// # Shapes
    ///
    /// 2-D as [`backward`](Self::backward), `forward.output: (L, d_v)`,
    /// `forward.lse: (L,)`; batched as [`backward_batched`](Self::backward_batched),
    /// `forward.output: (batch, heads, L, d_v)`, `forward.lse: (batch, heads, L)`.
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward) and [`backward_batched`](Self::backward_batched),
    /// and [`Error::Shape`] when `forward` does not have the output's shapes.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::ScaledDotProduct;
    /// use ndarray::{array, Array4};
    ///
    /// let (q, kv) = (array![[1.0_f64, 0.5]], array![[1.0, 0.0], [0.0, 2.0]]);
    /// let attn = ScaledDotProduct::new();
    /// let forward = attn.forward_with_lse(&q, &kv, &kv)?;
    /// let d_out = array![[1.0, -1.0]];
    /// let saved = attn.backward_with_lse(&q, &kv, &kv, &forward, &d_out)?;
    /// let again = attn.backward(&q, &kv, &kv, &d_out)?;
    /// assert!((&saved.q - &again.q).iter().all(|d| d.abs() < 1e-15));
    ///
    /// let q = Array4::from_shape_fn((1, 2, 3, 4), |(_, h, i, j)| (h + i * j) as f64 / 10.0);
    /// let forward = attn.forward_with_lse(&q, &q, &q)?;
    /// let g = attn.backward_with_lse(&q, &q, &q, &forward, &Array4::ones((1, 2, 3, 4)))?;
    /// assert_eq!(g.k.dim(), (1, 2, 3, 4));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward_with_lse<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
        forward: &AttentionLse<A, D>,
        d_out: &ArrayRef<A, D>,
    ) -> Result<AttentionGradients<A, D>> {
        self.gradients(q, k, v, Some(forward), d_out)
    }

    /// [`backward_with_lse`](Self::backward_with_lse), which takes batched
    /// inputs too.
    ///
    /// # Errors
    ///
    /// As [`backward_with_lse`](Self::backward_with_lse).
    #[deprecated(
        since = "0.2.0",
        note = "use `backward_with_lse`, which takes batched inputs too"
    )]
    pub fn backward_batched_with_lse(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        forward: &AttentionLse<A, Ix4>,
        d_out: &ArrayRef4<A>,
    ) -> Result<AttentionGradients<A, Ix4>> {
        self.backward_with_lse(q, k, v, forward, d_out)
    }

    /// Every backward call, 2-D or batched, with or without the kept forward, in
    /// any storage type: the inputs (and the kept output) in the compute type, the
    /// gradients rounded back once.
    fn gradients<D: AttentionDim>(
        &self,
        q: &ArrayRef<A, D>,
        k: &ArrayRef<A, D>,
        v: &ArrayRef<A, D>,
        forward: Option<&AttentionLse<A, D>>,
        d_out: &ArrayRef<A, D>,
    ) -> Result<AttentionGradients<A, D>> {
        let grads = self.gradients_in_compute([q, k, v], forward, d_out, |_| Ok(Plain))?;
        Ok(self.stored([grads.dq, grads.dk, grads.dv], grads.bias))
    }

    /// The gradients of `q`, `k`, `v` and of every bias, rounded to the storage
    /// type once, in the call's shapes.
    pub(super) fn stored<D: AttentionDim>(
        &self,
        [dq, dk, dv]: [Array4<A::Compute>; 3],
        bias: Vec<Array4<A::Compute>>,
    ) -> AttentionGradients<A, D> {
        let store = |x| A::store(x, self.parallelism);
        AttentionGradients {
            bias: self.bias_gradients(bias.into_iter().map(store).collect()),
            q: D::unlift(store(dq)),
            k: D::unlift(store(dk)),
            v: D::unlift(store(dv)),
        }
    }

    /// Every backward call in any storage type under the program `program`
    /// makes: the inputs (and the kept output) in the compute type, and the
    /// gradients, in 4-D.
    pub(super) fn gradients_in_compute<D: AttentionDim, P: Program<A::Compute>>(
        &self,
        [q, k, v]: [&ArrayRef<A, D>; 3],
        forward: Option<&AttentionLse<A, D>>,
        d_out: &ArrayRef<A, D>,
        program: impl FnOnce([usize; 4]) -> Result<P>,
    ) -> Result<Gradients<A::Compute>> {
        let parallelism = self.parallelism;
        let [q, k, v, d_out] = [q, k, v, d_out].map(|x| A::compute(x.view(), parallelism));
        let output = forward.map(|f| A::compute(f.output.view(), parallelism));
        let kept = output
            .as_ref()
            .zip(forward)
            .map(|(o, f)| (o.view(), f.lse.view()));
        let slopes = self.slopes_in_compute();
        (self.in_compute(&slopes)).gradients_under::<A, D, P>([&q, &k, &v], kept, &d_out, program)
    }

    /// Each bias's gradient in the shape of that bias.
    fn bias_gradients(&self, grads: Vec<Array4<A>>) -> Vec<ArrayD<A>> {
        let shapes = self.masks.iter().filter_map(Mask::bias_shape);
        grads
            .into_iter()
            .zip(shapes)
            .map(|(g, shape)| {
                g.into_shape_with_order(IxDyn(shape))
                    .expect("a bias's shape lifted to 4-D holds as many entries")
            })
            .collect()
    }
}

/// What the backward pass reads of a kept forward: its output and each row's
/// log-sum-exp, in the compute type.
pub(super) type Kept<'a, A, D> = (
    ArrayView<'a, A, D>,
    ArrayView<'a, A, <D as Dimension>::Smaller>,
);

impl<A: Element> ScaledDotProduct<'_, A> {
    /// Every backward call, 2-D or batched, with or without the kept forward,
    /// under the program `program` makes, once the call is checked, from the
    /// shape of its scores; in 4-D.
    fn gradients_under<S: Storage<Compute = A>, D: AttentionDim, P: Program<A>>(
        &self,
        [q, k, v]: [&ArrayRef<A, D>; 3],
        forward: Option<Kept<'_, A, D>>,
        d_out: &ArrayRef<A, D>,
        program: impl FnOnce([usize; 4]) -> Result<P>,
    ) -> Result<Gradients<A>> {
        let problem = self.check(q, k, v)?;
        let program = program(problem.scores())?;
        let problem = problem.with_program(&program);
        // the output's shape, in the call's own: q's rows, v's width
        let mut output = q.shape().to_vec();
        output[q.ndim() - 1] = v.shape()[v.ndim() - 1];
        check_d_out(d_out.shape(), &output)?;
        let saved = match forward {
            Some((kept, lse)) => {
                check_forward(kept.shape(), lse.shape(), &output)?;
                Some(SavedView {
                    output: D::lift(kept),
                    lse: D::lift_rows(lse),
                })
            }
            None => None,
        };
        let d_out = D::lift(d_out.view());
        kernel::backward::<S, P>(&problem, d_out, saved, self.kernel, self.parallelism)
    }
}

/// Checks that a kept forward has the output's shape and one lse per row.
pub(crate) fn check_forward(output: &[usize], lse: &[usize], expected: &[usize]) -> Result<()> {
    let rows = &expected[..expected.len() - 1];
    if output == expected && lse == rows {
        return Ok(());
    }
    Err(Error::Shape {
        what: "the kept forward's output and lse must have the output's shape and its rows",
        expected: [expected, rows].concat(),
        found: [output, lse].concat(),
    })
}

/// Checks that `d_out` has the output's shape.
pub(crate) fn check_d_out(d_out: &[usize], output: &[usize]) -> Result<()> {
    if d_out == output {
        Ok(())
    } else {
        Err(Error::Shape {
            what: "d_out (the gradient of the loss by the output) must have the output's shape",
            expected: output.to_vec(),
            found: d_out.to_vec(),
        })
    }
}
