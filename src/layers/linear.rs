//! A learned affine map `y = x·W + b`, the building block of every projection.

use ndarray::{
    Array, Array1, Array2, Array3, ArrayRef2, ArrayRef3, ArrayViewMut1, ArrayViewMut2, Axis,
    Dimension, Ix2, Ix3,
};

use super::product::{Packed, product};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernel::weight_product;

/// A linear layer `y = x·W + b` with the weight stored `(in, out)`, optional bias.
///
/// Row vectors throughout, as in the rest of the crate. PyTorch's `nn.Linear`
/// stores its weight `(out, in)`: pass `weight.t()` of it.
///
/// The first forward product packs a copy of the weight for the CPU kernels'
/// register tiles (as many values again as the weight), kept for every later
/// product until the weight is changed through [`weight_mut`](Self::weight_mut):
/// decoding steps then read `W` without packing it each time, whatever its
/// layout (a loaded checkpoint's weight is a transposed view). Each output is
/// one sum over the input's entries in order, so a row's bits are the same
/// alone or among other rows (a sequence decoded alone or in a padded batch),
/// on any number of threads.
///
/// # Shapes
///
/// `weight: (in, out)`, `bias: (out,)`; `x: (n, in)` → `(n, out)`, batched
/// `(B, n, in)` → `(B, n, out)`.
///
/// # Examples
///
/// ```
/// use attn::Linear;
/// use ndarray::array;
///
/// let layer = Linear::new(array![[1.0_f64, 0.0, 2.0], [0.0, 1.0, 0.0]]) // 2 → 3
///     .with_bias(array![0.5, 0.5, 0.5])?;
/// assert_eq!(layer.forward(&array![[1.0, 2.0]])?, array![[1.5, 2.5, 2.5]]);
/// assert!(layer.forward(&array![[1.0, 2.0, 3.0]]).is_err()); // 3 wide, not 2
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Linear<A> {
    weight: Array2<A>,
    bias: Option<Array1<A>>,
    packed: Packed<A>,
}

/// The gradients of a loss through a [`Linear`] layer, given the gradient by its
/// output.
///
/// # Shapes
///
/// `input` like the layer's input (`(n, in)`, or `(B, n, in)` for `D = Ix3`),
/// `weight: (in, out)`, `bias: (out,)` (present when the layer has a bias).
///
/// # Examples
///
/// ```
/// use attn::Linear;
/// use ndarray::array;
///
/// let layer = Linear::new(array![[2.0_f64], [3.0]]).with_bias(array![1.0])?; // y = 2a + 3b + 1
/// let g = layer.backward(&array![[1.0, -1.0]], &array![[1.0]])?;
/// assert_eq!(g.input, array![[2.0, 3.0]]);
/// assert_eq!(g.weight, array![[1.0], [-1.0]]);
/// assert_eq!(g.bias, Some(array![1.0]));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGradients<A, D: Dimension> {
    /// `∂loss/∂x = dY·Wᵀ`.
    pub input: Array<A, D>,
    /// `∂loss/∂W = xᵀ·dY`, summed over every row (and batch).
    pub weight: Array2<A>,
    /// `∂loss/∂b = Σ dY` over rows (and batch); `None` for a layer without bias.
    pub bias: Option<Array1<A>>,
}

impl<A: Element> Linear<A> {
    /// A layer without bias from its weight `(in, out)`.
    ///
    /// # Examples
    ///
    /// ```
    /// let layer = attn::Linear::new(ndarray::Array2::<f32>::eye(4));
    /// assert_eq!((layer.in_features(), layer.out_features()), (4, 4));
    /// assert!(layer.bias().is_none());
    /// ```
    pub fn new(weight: Array2<A>) -> Self {
        Linear {
            weight,
            bias: None,
            packed: Packed::empty(),
        }
    }

    /// Adds a bias `(out,)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the bias is not `out` long.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::Linear;
    /// use ndarray::{Array1, Array2};
    ///
    /// let w = Array2::<f64>::zeros((3, 2));
    /// assert!(Linear::new(w.clone()).with_bias(Array1::ones(2)).is_ok());
    /// assert!(Linear::new(w).with_bias(Array1::ones(3)).is_err());
    /// ```
    pub fn with_bias(self, bias: Array1<A>) -> Result<Self> {
        self.with_bias_named("bias must be as long as the weight has columns", bias)
    }

    /// [`with_bias`](Self::with_bias), naming the bias in the error.
    pub(crate) fn with_bias_named(mut self, what: &'static str, bias: Array1<A>) -> Result<Self> {
        if bias.len() != self.out_features() {
            return Err(Error::Shape {
                what,
                expected: vec![self.out_features()],
                found: vec![bias.len()],
            });
        }
        self.bias = Some(bias);
        Ok(self)
    }

    /// The weight, `(in, out)`.
    ///
    /// # Examples
    ///
    /// ```
    /// let layer = attn::Linear::new(ndarray::Array2::<f64>::zeros((5, 2)));
    /// assert_eq!(layer.weight().dim(), (5, 2));
    /// ```
    pub fn weight(&self) -> &Array2<A> {
        &self.weight
    }

    /// The bias, `(out,)`, if there is one.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let layer = attn::Linear::new(Array2::<f64>::eye(2)).with_bias(array![1.0, 2.0])?;
    /// assert_eq!(layer.bias(), Some(&array![1.0, 2.0]));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn bias(&self) -> Option<&Array1<A>> {
        self.bias.as_ref()
    }

    /// The weight, to change in place (a training step); its shape stays.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let mut layer = attn::Linear::new(Array2::<f64>::zeros((1, 1)));
    /// layer.weight_mut().fill(2.0);
    /// assert_eq!(layer.forward(&array![[3.0]])?, array![[6.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn weight_mut(&mut self) -> ArrayViewMut2<'_, A> {
        self.packed = Packed::empty();
        self.weight.view_mut()
    }

    /// The bias, to change in place, if there is one; its shape stays.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let mut layer = attn::Linear::new(Array2::<f64>::eye(1)).with_bias(array![0.0])?;
    /// if let Some(mut b) = layer.bias_mut() {
    ///     b[0] = 1.0;
    /// }
    /// assert_eq!(layer.forward(&array![[3.0]])?, array![[4.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn bias_mut(&mut self) -> Option<ArrayViewMut1<'_, A>> {
        self.bias.as_mut().map(|b| b.view_mut())
    }

    /// The width of the inputs (rows of the weight).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Linear::new(ndarray::Array2::<f32>::zeros((7, 3))).in_features(), 7);
    /// ```
    pub fn in_features(&self) -> usize {
        self.weight.nrows()
    }

    /// The width of the outputs (columns of the weight).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Linear::new(ndarray::Array2::<f32>::zeros((7, 3))).out_features(), 3);
    /// ```
    pub fn out_features(&self) -> usize {
        self.weight.ncols()
    }

    /// `x·W + b`.
    ///
    /// # Shapes
    ///
    /// `x: (n, in)` → `(n, out)`; any strides.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `in` wide.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let double = attn::Linear::new(Array2::<f64>::eye(2) * 2.0);
    /// assert_eq!(double.forward(&array![[1.0, -1.0]])?, array![[2.0, -2.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward(&self, x: &ArrayRef2<A>) -> Result<Array2<A>> {
        self.forward_named("input width must equal the weight's rows (in_features)", x)
    }

    /// [`forward`](Self::forward) on a batch.
    ///
    /// # Shapes
    ///
    /// `x: (B, n, in)` → `(B, n, out)`; any strides.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `in` wide.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{Array2, Array3};
    ///
    /// let layer = attn::Linear::new(Array2::<f32>::ones((4, 2)));
    /// let y = layer.forward_batched(&Array3::ones((3, 5, 4)))?;
    /// assert_eq!(y, Array3::from_elem((3, 5, 2), 4.0));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_batched(&self, x: &ArrayRef3<A>) -> Result<Array3<A>> {
        self.forward_batched_named("input width must equal the weight's rows (in_features)", x)
    }

    /// [`forward`](Self::forward), naming the input in the error.
    pub(crate) fn forward_named(&self, what: &'static str, x: &ArrayRef2<A>) -> Result<Array2<A>> {
        let mut out = Array2::zeros((x.nrows(), self.out_features()));
        self.forward_into(what, x, out.view_mut())?;
        Ok(out)
    }

    /// [`forward_named`](Self::forward_named) into `out: (n, out)`, rows of a
    /// larger array (the packed layer's output, a group of sequences at a time).
    pub(crate) fn forward_into(
        &self,
        what: &'static str,
        x: &ArrayRef2<A>,
        mut out: ArrayViewMut2<'_, A>,
    ) -> Result<()> {
        self.check_width(what, x.shape())?;
        debug_assert_eq!(out.dim(), (x.nrows(), self.out_features()));
        let packed = self.packed.get_or_pack(&self.weight.view())?;
        weight_product(&x.view(), packed, out.view_mut());
        if let Some(b) = &self.bias {
            out += b;
        }
        Ok(())
    }

    /// [`forward_batched`](Self::forward_batched), naming the input in the error.
    pub(crate) fn forward_batched_named(
        &self,
        what: &'static str,
        x: &ArrayRef3<A>,
    ) -> Result<Array3<A>> {
        self.check_width(what, x.shape())?;
        // every position alike: one product over the (B·n, in) rows
        let (batch, n, width) = x.dim();
        let rows = x
            .to_shape((batch * n, width))
            .expect("(B, n, in) holds B·n rows of in");
        let out = self.forward_named(what, &rows)?;
        Ok(out
            .into_shape_with_order((batch, n, self.out_features()))
            .expect("(B·n, out) holds B rows of n × out"))
    }

    /// The gradients of a loss by `x`, the weight and the bias, given
    /// `d_y = ∂loss/∂y` at the output `y = x·W + b`.
    ///
    /// # Shapes
    ///
    /// `x: (n, in)`, `d_y: (n, out)` → see [`LinearGradients`].
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `in` wide or `d_y` is not `(n, out)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let layer = attn::Linear::new(Array2::<f64>::eye(2));
    /// let g = layer.backward(&array![[1.0, 2.0], [3.0, 4.0]], &array![[1.0, 0.0], [0.0, 1.0]])?;
    /// assert_eq!(g.weight, array![[1.0, 3.0], [2.0, 4.0]]); // xᵀ·dY
    /// assert!(g.bias.is_none());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward(
        &self,
        x: &ArrayRef2<A>,
        d_y: &ArrayRef2<A>,
    ) -> Result<LinearGradients<A, Ix2>> {
        self.check_width(
            "input width must equal the weight's rows (in_features)",
            x.shape(),
        )?;
        let expected = [x.nrows(), self.out_features()];
        if d_y.shape() != expected {
            return Err(Error::Shape {
                what: "d_y (the gradient of the loss by the output) must be (n, out_features)",
                expected: expected.to_vec(),
                found: d_y.shape().to_vec(),
            });
        }
        Ok(LinearGradients {
            input: product(&d_y.view(), &self.weight.t()),
            weight: product(&x.t(), &d_y.view()),
            bias: self.bias.as_ref().map(|_| d_y.sum_axis(Axis(0))),
        })
    }

    /// [`backward`](Self::backward) on a batch: the weight's and bias's gradients
    /// are summed over the batch.
    ///
    /// # Shapes
    ///
    /// `x: (B, n, in)`, `d_y: (B, n, out)` → `input: (B, n, in)`, `weight: (in, out)`,
    /// `bias: (out,)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `in` wide or `d_y` is not `(B, n, out)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{Array2, Array3};
    ///
    /// let layer = attn::Linear::new(Array2::<f32>::ones((4, 2)));
    /// let g = layer.backward_batched(&Array3::ones((3, 5, 4)), &Array3::ones((3, 5, 2)))?;
    /// assert_eq!(g.weight, Array2::from_elem((4, 2), 15.0)); // 3 × 5 rows of ones
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn backward_batched(
        &self,
        x: &ArrayRef3<A>,
        d_y: &ArrayRef3<A>,
    ) -> Result<LinearGradients<A, Ix3>> {
        let (batch, n, width) = x.dim();
        let expected = [batch, n, self.out_features()];
        if width == self.in_features() && d_y.shape() != expected {
            return Err(Error::Shape {
                what: "d_y (the gradient of the loss by the output) must be (B, n, out_features)",
                expected: expected.to_vec(),
                found: d_y.shape().to_vec(),
            });
        }
        self.check_width(
            "input width must equal the weight's rows (in_features)",
            x.shape(),
        )?;
        // every position alike: one product over the (B·n) rows
        let rows = |a: &ArrayRef3<A>, cols: usize| {
            a.to_shape((batch * n, cols))
                .expect("(B, n, c) holds B·n rows of c")
                .into_owned()
        };
        let g = self.backward(&rows(x, width), &rows(d_y, self.out_features()))?;
        Ok(LinearGradients {
            input: g
                .input
                .into_shape_with_order((batch, n, width))
                .expect("(B·n, in) holds B rows of n × in"),
            weight: g.weight,
            bias: g.bias,
        })
    }

    fn check_width(&self, what: &'static str, shape: &[usize]) -> Result<()> {
        let width = shape[shape.len() - 1];
        if width == self.in_features() {
            return Ok(());
        }
        let mut expected = shape.to_vec();
        expected[shape.len() - 1] = self.in_features();
        Err(Error::Shape {
            what,
            expected,
            found: shape.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Array2};

    use super::Linear;
    use crate::layers::product::rows_per_part;
    use crate::on_threads;

    /// A product shared between two threads is bit for bit the product on one.
    #[test]
    fn a_shared_product_has_the_bits_of_one_thread() {
        fn check<A: crate::Element>() {
            let (n, width, out) = (300, 96, 80);
            let x = Array2::from_shape_fn((n, width), |(i, j)| {
                A::from_f64(((i * 31 + j * 17) % 101) as f64 / 37.0 - 1.3)
            });
            let w = Array2::from_shape_fn((width, out), |(i, j)| {
                A::from_f64(((i * 7 + j * 29) % 89) as f64 / 41.0 - 1.1)
            });
            let bias = Array1::from_shape_fn(out, |j| A::from_f64(j as f64 / 10.0));
            let layer = Linear::new(w.clone())
                .with_bias(bias.clone())
                .expect("valid");
            let shared = on_threads(2, || layer.forward(&x)).expect("valid");
            let alone = on_threads(1, || layer.forward(&x)).expect("valid");
            assert_eq!(shared, alone);
            let e = (&shared - &(x.dot(&w) + &bias))
                .iter()
                .fold(0.0, |m, d| d.to_f64().expect("finite").abs().max(m));
            assert!(e < 1e-4, "{e:e}");
            let d_y = shared.mapv(|y| y * A::from_f64(0.5));
            let grads = on_threads(2, || layer.backward(&x, &d_y)).expect("valid");
            assert_eq!(grads.input, d_y.dot(&w.t()));
            assert_eq!(grads.weight, x.t().dot(&d_y));
        }
        // x·W and d_y·Wᵀ share 300 rows, xᵀ·d_y 96
        assert!(rows_per_part(300, 96 * 80, 2).is_some());
        assert!(rows_per_part(96, 300 * 80, 2).is_some());
        check::<f32>();
        check::<f64>();
    }
}
