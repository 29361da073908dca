//! Learned projections `Q = X·W_Q + b_q`, `K = X·W_K + b_k`, `V = X·W_V + b_v`,
//! and the self- and cross-attention built on them (`attend.rs`).

use ndarray::{Array1, Array2, ArrayRef2};
use rand::Rng;

mod attend;
mod backward;

pub use backward::QkvGradients;

use super::init::Init;
use super::linear::Linear;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::rng;

/// The widths of a [`QkvProjection`]: what goes in and what comes out.
///
/// Row vectors throughout, as in the rest of the crate: `W_Q: (query_in, d_k)`,
/// `W_K: (key_in, d_k)`, `W_V: (value_in, d_v)`.
///
/// # Examples
///
/// ```
/// use attn::ProjectionShape;
///
/// let self_attn = ProjectionShape::new(4, 3, 3); // 4-wide words → 3-wide queries, keys, values
/// let cross = ProjectionShape::new(8, 16, 16).with_context(5, 7); // keys 5 wide, values 7
/// assert_eq!(cross.key_in, 5);
/// assert_eq!(self_attn.value_in, 4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionShape {
    /// Width of the query inputs (rows of `W_Q`).
    pub query_in: usize,
    /// Width of the key inputs (rows of `W_K`).
    pub key_in: usize,
    /// Width of the value inputs (rows of `W_V`).
    pub value_in: usize,
    /// Width of queries and keys (columns of `W_Q` and `W_K`).
    pub d_k: usize,
    /// Width of values (columns of `W_V`).
    pub d_v: usize,
}

impl ProjectionShape {
    /// Every input `d_in` wide; queries and keys `d_k` wide, values `d_v` wide.
    ///
    /// # Examples
    ///
    /// ```
    /// let shape = attn::ProjectionShape::new(4, 3, 2);
    /// assert_eq!((shape.query_in, shape.key_in, shape.d_k, shape.d_v), (4, 4, 3, 2));
    /// ```
    pub fn new(d_in: usize, d_k: usize, d_v: usize) -> Self {
        ProjectionShape {
            query_in: d_in,
            key_in: d_in,
            value_in: d_in,
            d_k,
            d_v,
        }
    }

    /// Keys come from inputs `key_in` wide and values from inputs `value_in` wide
    /// (PyTorch's `kdim` and `vdim`).
    ///
    /// # Examples
    ///
    /// ```
    /// let shape = attn::ProjectionShape::new(8, 8, 8).with_context(5, 7);
    /// assert_eq!((shape.key_in, shape.value_in), (5, 7));
    /// ```
    pub fn with_context(mut self, key_in: usize, value_in: usize) -> Self {
        self.key_in = key_in;
        self.value_in = value_in;
        self
    }
}

/// The projections `W_Q, W_K, W_V` with optional biases, and attention through them.
///
/// `Q = X_q·W_Q + b_q`, `K = X_k·W_K + b_k`, `V = X_v·W_V + b_v`, then
/// `softmax(QKᵀ/√d_k)·V`. Self-attention takes all three from one sequence;
/// cross-attention takes queries from one and keys and values from another.
///
/// # Shapes
///
/// `W_Q: (query_in, d_k)`, `W_K: (key_in, d_k)`, `W_V: (value_in, d_v)`;
/// biases `(d_k,)`, `(d_k,)`, `(d_v,)`. Non-square weights are fine.
///
/// # Examples
///
/// ```
/// use attn::{Init, ProjectionShape, QkvProjection, ScaledDotProduct};
/// use ndarray::array;
///
/// let words = array![[1.0_f64, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]];
/// let proj = QkvProjection::random(ProjectionShape::new(4, 3, 3), Init::XavierUniform, 42)?;
/// let out = proj.self_attention(&words, &ScaledDotProduct::new())?;
/// assert_eq!(out.dim(), (2, 3));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QkvProjection<A> {
    q: Linear<A>,
    k: Linear<A>,
    v: Linear<A>,
}

impl<A: Element> QkvProjection<A> {
    /// Projections from given weights, without biases.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `W_K` has not as many columns as `W_Q` (both are `d_k`),
    /// and [`Error::ZeroWidth`] when `d_k = 0`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::QkvProjection;
    /// use ndarray::Array2;
    ///
    /// let proj = QkvProjection::new(Array2::<f32>::eye(4), Array2::eye(4), Array2::zeros((4, 2)))?;
    /// assert_eq!(proj.shape().d_v, 2);
    /// assert!(QkvProjection::new(Array2::<f32>::eye(4), Array2::zeros((4, 3)), Array2::eye(4)).is_err());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn new(w_q: Array2<A>, w_k: Array2<A>, w_v: Array2<A>) -> Result<Self> {
        if w_k.ncols() != w_q.ncols() {
            return Err(Error::Shape {
                what: "W_K must have as many columns (d_k) as W_Q",
                expected: vec![w_k.nrows(), w_q.ncols()],
                found: w_k.shape().to_vec(),
            });
        }
        if w_q.ncols() == 0 {
            return Err(Error::ZeroWidth {
                what: "d_k (columns of W_Q)",
                shape: w_q.shape().to_vec(),
            });
        }
        Ok(QkvProjection {
            q: Linear::new(w_q),
            k: Linear::new(w_k),
            v: Linear::new(w_v),
        })
    }

    /// Adds biases `b_q: (d_k,)`, `b_k: (d_k,)`, `b_v: (d_v,)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when a bias length does not match its weight's columns.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::QkvProjection;
    /// use ndarray::{array, Array1, Array2};
    ///
    /// let proj = QkvProjection::new(Array2::<f64>::eye(2), Array2::eye(2), Array2::eye(2))?
    ///     .with_biases(array![1.0, 0.0], Array1::zeros(2), Array1::zeros(2))?;
    /// assert_eq!(proj.query(&array![[0.0, 0.0]])?, array![[1.0, 0.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn with_biases(self, b_q: Array1<A>, b_k: Array1<A>, b_v: Array1<A>) -> Result<Self> {
        Ok(QkvProjection {
            q: self.q.with_bias_named("b_q must be d_k long", b_q)?,
            k: self.k.with_bias_named("b_k must be d_k long", b_k)?,
            v: self.v.with_bias_named("b_v must be d_v long", b_v)?,
        })
    }

    /// Random weights, reproducible from `seed` on every platform (see
    /// [`rng::seeded`](crate::rng::seeded)); no biases. `W_Q`, `W_K`, `W_V` are
    /// drawn in that order.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroWidth`] when `d_k = 0`; [`Error::InvalidConfig`] for an invalid `init`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, ProjectionShape, QkvProjection};
    ///
    /// let shape = ProjectionShape::new(4, 3, 3);
    /// let a = QkvProjection::<f64>::random(shape, Init::Normal { std: 1.0 }, 7)?;
    /// let b = QkvProjection::<f64>::random(shape, Init::Normal { std: 1.0 }, 7)?;
    /// assert_eq!(a, b);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn random(shape: ProjectionShape, init: Init, seed: u64) -> Result<Self> {
        Self::random_using(shape, init, &mut rng::seeded(seed))
    }

    /// [`random`](Self::random) with the caller's generator.
    ///
    /// # Errors
    ///
    /// As [`random`](Self::random).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, ProjectionShape, QkvProjection};
    ///
    /// let mut rng = attn::rng::seeded(3);
    /// let proj = QkvProjection::<f32>::random_using(ProjectionShape::new(6, 4, 2), Init::XavierNormal, &mut rng)?;
    /// assert_eq!(proj.w_v().dim(), (6, 2));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn random_using<R: Rng + ?Sized>(
        shape: ProjectionShape,
        init: Init,
        rng: &mut R,
    ) -> Result<Self> {
        let ProjectionShape {
            query_in,
            key_in,
            value_in,
            d_k,
            d_v,
        } = shape;
        let packed = init == Init::TorchMultihead && query_in == key_in && key_in == value_in;
        let fans = |rows: usize, cols: usize| {
            if packed {
                (rows, 2 * d_k + d_v)
            } else {
                (rows, cols)
            }
        };
        let w_q = init.sample_with_fans((query_in, d_k), fans(query_in, d_k), rng)?;
        let w_k = init.sample_with_fans((key_in, d_k), fans(key_in, d_k), rng)?;
        let w_v = init.sample_with_fans((value_in, d_v), fans(value_in, d_v), rng)?;
        Self::new(w_q, w_k, w_v)
    }

    /// The widths of these projections.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Init, ProjectionShape, QkvProjection};
    ///
    /// let shape = ProjectionShape::new(5, 3, 2).with_context(4, 6);
    /// assert_eq!(QkvProjection::<f64>::random(shape, Init::XavierUniform, 0)?.shape(), shape);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn shape(&self) -> ProjectionShape {
        ProjectionShape {
            query_in: self.q.in_features(),
            key_in: self.k.in_features(),
            value_in: self.v.in_features(),
            d_k: self.q.out_features(),
            d_v: self.v.out_features(),
        }
    }

    /// `W_Q`, of shape `(query_in, d_k)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array2;
    ///
    /// let proj = attn::QkvProjection::new(Array2::<f64>::eye(3), Array2::eye(3), Array2::eye(3))?;
    /// assert_eq!(proj.w_q(), &Array2::<f64>::eye(3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn w_q(&self) -> &Array2<A> {
        self.q.weight()
    }

    /// `W_K`, of shape `(key_in, d_k)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array2;
    ///
    /// let proj = attn::QkvProjection::new(Array2::<f64>::eye(3), Array2::ones((2, 3)), Array2::eye(3))?;
    /// assert_eq!(proj.w_k().dim(), (2, 3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn w_k(&self) -> &Array2<A> {
        self.k.weight()
    }

    /// `W_V`, of shape `(value_in, d_v)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array2;
    ///
    /// let proj = attn::QkvProjection::new(Array2::<f64>::eye(3), Array2::eye(3), Array2::ones((3, 1)))?;
    /// assert_eq!(proj.w_v().dim(), (3, 1));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn w_v(&self) -> &Array2<A> {
        self.v.weight()
    }

    /// `Q = X·W_Q + b_q`.
    ///
    /// # Shapes
    ///
    /// `x: (L, query_in)` → `(L, d_k)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `query_in` wide.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let proj = attn::QkvProjection::new(array![[2.0_f64], [1.0]], array![[1.0], [1.0]], Array2::eye(2))?;
    /// assert_eq!(proj.query(&array![[1.0, 1.0]])?, array![[3.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn query(&self, x: &ArrayRef2<A>) -> Result<Array2<A>> {
        self.q
            .forward_named("query input width must equal the rows of W_Q", x)
    }

    /// `K = X·W_K + b_k`.
    ///
    /// # Shapes
    ///
    /// `x: (S, key_in)` → `(S, d_k)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `key_in` wide.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let proj = attn::QkvProjection::new(array![[2.0_f64], [1.0]], array![[1.0], [1.0]], Array2::eye(2))?;
    /// assert_eq!(proj.key(&array![[1.0, 2.0]])?, array![[3.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn key(&self, x: &ArrayRef2<A>) -> Result<Array2<A>> {
        self.k
            .forward_named("key input width must equal the rows of W_K", x)
    }

    /// `V = X·W_V + b_v`.
    ///
    /// # Shapes
    ///
    /// `x: (S, value_in)` → `(S, d_v)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `x` is not `value_in` wide.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    ///
    /// let proj = attn::QkvProjection::new(array![[2.0_f64], [1.0]], array![[1.0], [1.0]], Array2::eye(2))?;
    /// assert_eq!(proj.value(&array![[1.0, 2.0]])?, array![[1.0, 2.0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn value(&self, x: &ArrayRef2<A>) -> Result<Array2<A>> {
        self.v
            .forward_named("value input width must equal the rows of W_V", x)
    }
}
