//! Rotary position embeddings (RoPE): the rotation, its frequencies and their
//! scaled variants, at one position per row or per batch row and token.

mod scaling;

use std::fmt;

use ndarray::{Array2, ArrayRef2, ArrayRef4, Axis};

use crate::element::Element;
use crate::error::{Error, Result};

pub use scaling::RopeScaling;

/// How rotary embeddings pair up the features of a head.
///
/// # Examples
///
/// ```
/// use attn::RopeLayout;
///
/// assert_ne!(RopeLayout::Interleaved, RopeLayout::HalfSplit);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Features `(2i, 2i + 1)` rotate together (RoFormer's formula, GPT-J).
    Interleaved,
    /// Features `(i, i + r/2)` rotate together, `r` the rotary width (GPT-NeoX,
    /// Llama, Mistral, Qwen2 as Hugging Face stores them: `rotate_half`).
    HalfSplit,
}

/// Rotary position embeddings: pair `i` of a head's first `rotary_dim` features
/// rotates by the angle `position · fᵢ`, with `fᵢ = θ^(−2i/rotary_dim)` (then
/// scaled, see [`RopeScaling`]); the other features pass unchanged (partial
/// rotary, GPT-NeoX's `rotary_pct`). Apply it to queries and keys, not values.
///
/// # Examples
///
/// ```
/// use attn::{Rope, RopeLayout};
/// use ndarray::{array, Array4};
///
/// let rope = Rope::new(10_000.0).with_layout(RopeLayout::Interleaved);
/// let mut x = Array4::<f64>::zeros((1, 1, 2, 2)); // (batch, heads, tokens, head_dim)
/// x.fill(1.0);
/// rope.apply(&mut x, &array![[0, 1]])?;
/// assert_eq!(x[[0, 0, 0, 0]], 1.0); // position 0: no rotation
/// assert!((x[[0, 0, 1, 0]] - (1f64.cos() - 1f64.sin())).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    theta: f64,
    layout: RopeLayout,
    rotary_dim: Option<usize>,
    scaling: RopeScaling,
}

impl Rope {
    /// Rotary embeddings with base `theta` (10 000 in most models, 500 000 in
    /// Llama 3), half-split pairs over the whole head, no scaling.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(500_000.0).theta(), 500_000.0);
    /// ```
    pub fn new(theta: f64) -> Self {
        Rope {
            theta,
            layout: RopeLayout::HalfSplit,
            rotary_dim: None,
            scaling: RopeScaling::None,
        }
    }

    /// How features pair up.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Rope, RopeLayout};
    /// assert_eq!(Rope::new(1e4).with_layout(RopeLayout::Interleaved).layout(), RopeLayout::Interleaved);
    /// ```
    pub fn with_layout(mut self, layout: RopeLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Rotate only the first `rotary_dim` features of each head (even, at most the
    /// head width); the rest pass unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(1e4).with_rotary_dim(16).rotary_dim(64), 16);
    /// ```
    pub fn with_rotary_dim(mut self, rotary_dim: usize) -> Self {
        self.rotary_dim = Some(rotary_dim);
        self
    }

    /// Scaled frequencies (see [`RopeScaling`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Rope, RopeScaling};
    /// let rope = Rope::new(1e4).with_scaling(RopeScaling::Linear { factor: 2.0 });
    /// assert_eq!(rope.scaling(), RopeScaling::Linear { factor: 2.0 });
    /// ```
    pub fn with_scaling(mut self, scaling: RopeScaling) -> Self {
        self.scaling = scaling;
        self
    }

    /// The base `θ`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(1e4).theta(), 1e4);
    /// ```
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// How features pair up.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(1e4).layout(), attn::RopeLayout::HalfSplit);
    /// ```
    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    /// The frequency scaling.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(1e4).scaling(), attn::RopeScaling::None);
    /// ```
    pub fn scaling(&self) -> RopeScaling {
        self.scaling
    }

    /// The number of rotated features of a head `head_dim` wide (all unless
    /// [`with_rotary_dim`](Self::with_rotary_dim)).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(1e4).rotary_dim(64), 64);
    /// ```
    pub fn rotary_dim(&self, head_dim: usize) -> usize {
        self.rotary_dim.unwrap_or(head_dim)
    }

    /// Checks the settings against a head `head_dim` wide.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the setting: `θ` not finite or not above 1,
    /// a rotary width that is 0, odd or wider than the head, a scaling factor not
    /// finite and positive, Llama 3 bands out of order.
    ///
    /// # Examples
    ///
    /// ```
    /// let rope = attn::Rope::new(1e4).with_rotary_dim(6);
    /// assert!(rope.check(8).is_ok());
    /// assert!(rope.check(4).is_err()); // 6 rotated features in a head of 4
    /// ```
    pub fn check(&self, head_dim: usize) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        let r = self.rotary_dim(head_dim);
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return invalid(format!(
                "rope theta must be finite and above 1, got {}",
                self.theta
            ));
        }
        if r == 0 || !r.is_multiple_of(2) || r > head_dim {
            return invalid(format!(
                "rope rotates pairs of features: rotary_dim ({r}) must be even, positive and at most head_dim ({head_dim})"
            ));
        }
        self.scaling.check()
    }

    /// The angle per position of each rotated pair, `rotary_dim / 2` of them,
    /// after scaling (Hugging Face's `inv_freq`, computed in f64).
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    ///
    /// # Examples
    ///
    /// ```
    /// let f = attn::Rope::new(10_000.0).frequencies(4)?;
    /// assert_eq!(f, vec![1.0, 0.01]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn frequencies(&self, head_dim: usize) -> Result<Vec<f64>> {
        self.check(head_dim)?;
        let r = self.rotary_dim(head_dim);
        let plain = (0..r / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / r as f64))
            .collect();
        Ok(self.scaling.frequencies(plain, self.theta, r))
    }

    /// The factor on cos and sin: 1, except YaRN's `attention_factor` (see
    /// [`RopeScaling::Yarn`]).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::Rope::new(1e4).amplitude(), 1.0);
    /// ```
    pub fn amplitude(&self) -> f64 {
        self.scaling.amplitude()
    }

    /// Rotates `x` in place, token `t` of batch row `b` at `positions[[b, t]]`
    /// (every head alike; the rotated features times the
    /// [`amplitude`](Self::amplitude) under YaRN).
    ///
    /// # Shapes
    ///
    /// `x: (batch, heads, tokens, head_dim)`, `positions: (batch, tokens)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when `positions` is not `(batch, tokens)`; the errors of
    /// [`check`](Self::check) for this head width.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::Rope;
    /// use ndarray::{array, Array4};
    ///
    /// // a left-padded row: its first real token is at position 0 wherever it sits
    /// let mut x = Array4::<f32>::ones((2, 1, 3, 4));
    /// Rope::new(1e4).apply(&mut x, &array![[0, 1, 2], [0, 0, 1]])?;
    /// assert_eq!(x[[0, 0, 1, 0]], x[[1, 0, 2, 0]]);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn apply<A: Element>(
        &self,
        x: &mut ArrayRef4<A>,
        positions: &ArrayRef2<usize>,
    ) -> Result<()> {
        self.rotate(x, positions, 1.0)
    }

    /// The transpose of [`apply`](Self::apply): rotates back by the same angles
    /// (with the same amplitude).
    /// Gradients flow back through rotary embeddings this way.
    pub(crate) fn apply_transpose<A: Element>(
        &self,
        x: &mut ArrayRef4<A>,
        positions: &ArrayRef2<usize>,
    ) -> Result<()> {
        self.rotate(x, positions, -1.0)
    }

    /// Rotates by `direction · position · fᵢ` (and scales by the amplitude).
    fn rotate<A: Element>(
        &self,
        x: &mut ArrayRef4<A>,
        positions: &ArrayRef2<usize>,
        direction: f64,
    ) -> Result<()> {
        let (b, _, t, d) = x.dim();
        if positions.dim() != (b, t) {
            return Err(Error::Shape {
                what: "rope positions: one per batch row and token",
                expected: vec![b, t],
                found: positions.shape().to_vec(),
            });
        }
        let frequencies = self.frequencies(d)?;
        let amplitude = self.amplitude();
        let half = self.rotary_dim(d) / 2;
        let pairs: Vec<(usize, usize)> = (0..half)
            .map(|i| match self.layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::HalfSplit => (i, i + half),
            })
            .collect();
        for (mut batch_row, row_positions) in x.outer_iter_mut().zip(positions.outer_iter()) {
            // cos and sin of every (token, pair), shared by the heads
            let angles = Array2::from_shape_fn((t, half), |(token, i)| {
                direction * row_positions[token] as f64 * frequencies[i]
            });
            let (cos, sin) = (
                angles.mapv(|a| A::from_f64(amplitude * a.cos())),
                angles.mapv(|a| A::from_f64(amplitude * a.sin())),
            );
            for mut head in batch_row.outer_iter_mut() {
                for (token, mut features) in head.axis_iter_mut(Axis(0)).enumerate() {
                    for (i, &(a, b)) in pairs.iter().enumerate() {
                        let (c, s) = (cos[[token, i]], sin[[token, i]]);
                        let (x0, x1) = (features[a], features[b]);
                        features[a] = x0 * c - x1 * s;
                        features[b] = x0 * s + x1 * c;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Rotary position embeddings on one 2-D array, one position per row: rotates
/// each pair of features of row `r` by the angle `positions[r] · base^(−2i/d)`
/// for pair `i` (for partial rotary, per-batch positions and scaled frequencies,
/// see [`Rope`]).
///
/// Apply it to queries and keys (not values) with their absolute positions, so
/// keys in a [`KvCache`](crate::KvCache) keep the rotation of where they were.
///
/// # Shapes
///
/// `x: (n, d)` with `d` even, `positions.len() == n` → `(n, d)`.
///
/// # Errors
///
/// [`Error::Shape`] when `positions` has not one entry per row,
/// [`Error::InvalidConfig`] when `d` is odd or `base` is not finite and above 1.
///
/// # Examples
///
/// ```
/// use attn::{rope, RopeLayout};
/// use ndarray::array;
///
/// let x = array![[1.0_f64, 0.0], [1.0, 0.0]];
/// let r = rope(&x, &[0, 1], 10_000.0, RopeLayout::Interleaved)?;
/// assert_eq!(r.row(0), x.row(0)); // position 0: no rotation
/// assert!((r[[1, 0]] - 1f64.cos()).abs() < 1e-15 && (r[[1, 1]] - 1f64.sin()).abs() < 1e-15);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn rope<A: Element>(
    x: &ArrayRef2<A>,
    positions: &[usize],
    base: f64,
    layout: RopeLayout,
) -> Result<Array2<A>> {
    let (n, d) = x.dim();
    if positions.len() != n {
        return Err(Error::Shape {
            what: "rope positions: one per row",
            expected: vec![n],
            found: vec![positions.len()],
        });
    }
    // every row a batch row of one token
    let mut out = x
        .to_owned()
        .into_shape_with_order((n, 1, 1, d))
        .expect("n rows of d");
    let positions = Array2::from_shape_vec((n, 1), positions.to_vec()).expect("n positions");
    Rope::new(base)
        .with_layout(layout)
        .apply(&mut out, &positions)?;
    Ok(out.into_shape_with_order((n, d)).expect("n rows of d"))
}

/// The base, the pairing of dimensions, a partial rotation and the scaling, as
/// far as they differ from plain rotary embeddings.
///
/// # Examples
///
/// ```
/// use attn::{Rope, RopeLayout, RopeScaling};
///
/// let rope = Rope::new(500_000.0)
///     .with_layout(RopeLayout::Interleaved)
///     .with_scaling(RopeScaling::Linear { factor: 4.0 });
/// assert_eq!(rope.to_string(), "θ = 500000, interleaved pairs, positions divided by 4");
/// ```
impl fmt::Display for Rope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = match self.layout() {
            RopeLayout::HalfSplit => "half-split pairs",
            RopeLayout::Interleaved => "interleaved pairs",
        };
        write!(f, "θ = {}, {layout}", self.theta())?;
        if let Some(dims) = self.rotary_dim {
            write!(f, ", the first {dims} dimensions of each head")?;
        }
        write!(f, "{}", self.scaling)
    }
}
