//! The weights of a multi-head attention layer.

use ndarray::{Array1, Array2};

use super::config::{MultiHeadConfig, Projection};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layers::linear::Linear;
use crate::sdpa::flex::check_sinks;

/// The weights of a [`MultiHeadAttention`](crate::MultiHeadAttention), in the `(in, out)` layout:
/// `Q = query·w_q + b_q`, `output = concat(heads)·w_o + b_o`.
///
/// # Shapes
///
/// `w_q: (d_model, inner_dim)`, `w_k: (kdim, kv_width)`, `w_v: (vdim, kv_width)`,
/// `w_o: (inner_dim, d_model)`, where `inner_dim = n_heads · head_dim` (`d_model`
/// unless the head width is set) and `kv_width = n_kv_heads · head_dim`; biases are
/// as long as their weight's columns; `sinks: (n_heads,)`. PyTorch stores `(out, in)`: transpose its
/// `q_proj_weight` (or the slices of `in_proj_weight`) and `out_proj.weight`.
///
/// # Examples
///
/// ```
/// use attn::{MultiHeadConfig, MultiHeadWeights};
/// use ndarray::Array2;
///
/// let eye = Array2::<f64>::eye(4);
/// let weights = MultiHeadWeights {
///     w_q: eye.clone(), w_k: eye.clone(), w_v: eye.clone(), w_o: eye,
///     b_q: None, b_k: None, b_v: None, b_o: None, sinks: None,
/// };
/// let mha = MultiHeadConfig::new(4, 2).without_bias().with_weights(weights)?;
/// assert_eq!(mha.weights().w_o.dim(), (4, 4));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MultiHeadWeights<A> {
    /// Query projection `(d_model, inner_dim)`.
    pub w_q: Array2<A>,
    /// Key projection `(kdim, kv_width)`.
    pub w_k: Array2<A>,
    /// Value projection `(vdim, kv_width)`.
    pub w_v: Array2<A>,
    /// Output projection `(inner_dim, d_model)`.
    pub w_o: Array2<A>,
    /// Query bias `(inner_dim,)`.
    pub b_q: Option<Array1<A>>,
    /// Key bias `(kv_width,)`.
    pub b_k: Option<Array1<A>>,
    /// Value bias `(kv_width,)`.
    pub b_v: Option<Array1<A>>,
    /// Output bias `(d_model,)`.
    pub b_o: Option<Array1<A>>,
    /// One sink logit per query head, `(n_heads,)`, for a layer configured
    /// [`with_sinks`](MultiHeadConfig::with_sinks).
    pub sinks: Option<Array1<A>>,
}

/// A layer's four projections and its sinks.
pub(crate) type Parts<A> = ([Linear<A>; 4], Option<Array1<A>>);

impl Projection {
    /// How a wrong weight is named in an error.
    fn weight_role(self) -> &'static str {
        match self {
            Projection::Query => "w_q must be (d_model, n_heads·head_dim)",
            Projection::Key => "w_k must be (kdim, n_kv_heads·head_dim)",
            Projection::Value => "w_v must be (vdim, n_kv_heads·head_dim)",
            Projection::Output => "w_o must be (n_heads·head_dim, d_model)",
        }
    }

    /// How a wrong or missing bias is named in an error.
    fn bias_role(self) -> &'static str {
        match self {
            Projection::Query => "b_q (shape [] means: no bias in this configuration)",
            Projection::Key => "b_k (shape [] means: no bias in this configuration)",
            Projection::Value => "b_v (shape [] means: no bias in this configuration)",
            Projection::Output => "b_o (shape [] means: no bias in this configuration)",
        }
    }
}

impl<A: Element> MultiHeadWeights<A> {
    /// The weight and bias of one projection.
    fn take(&mut self, which: Projection) -> (Array2<A>, Option<Array1<A>>) {
        let (w, b) = match which {
            Projection::Query => (&mut self.w_q, &mut self.b_q),
            Projection::Key => (&mut self.w_k, &mut self.b_k),
            Projection::Value => (&mut self.w_v, &mut self.b_v),
            Projection::Output => (&mut self.w_o, &mut self.b_o),
        };
        (std::mem::replace(w, Array2::zeros((0, 0))), b.take())
    }

    /// Checks every weight and bias against `config` and makes the four layers,
    /// in the order of [`Projection::ALL`].
    pub(crate) fn into_parts(mut self, config: &MultiHeadConfig) -> Result<Parts<A>> {
        let linears = [
            self.linear(Projection::Query, config)?,
            self.linear(Projection::Key, config)?,
            self.linear(Projection::Value, config)?,
            self.linear(Projection::Output, config)?,
        ];
        let heads = config.n_heads();
        match (self.sinks, config.has_sinks()) {
            (None, false) => Ok((linears, None)),
            (Some(sinks), true) => {
                check_sinks(sinks.view(), heads)?;
                Ok((linears, Some(sinks)))
            }
            (sinks, has_sinks) => Err(Error::Shape {
                what: "sinks: one logit per query head where the configuration has sinks (MultiHeadConfig::with_sinks), none where not",
                expected: if has_sinks { vec![heads] } else { vec![] },
                found: sinks.map(|s| vec![s.len()]).unwrap_or_default(),
            }),
        }
    }

    /// One projection's layer, its weight and bias checked against `config`.
    fn linear(&mut self, which: Projection, config: &MultiHeadConfig) -> Result<Linear<A>> {
        let (w, b) = self.take(which);
        let (rows, cols) = which.shape(config);
        if w.dim() != (rows, cols) {
            return Err(Error::Shape {
                what: which.weight_role(),
                expected: vec![rows, cols],
                found: w.shape().to_vec(),
            });
        }
        let linear = Linear::new(w);
        match (b, config.has_bias_on(which)) {
            (Some(b), true) => linear.with_bias_named(which.bias_role(), b),
            (None, false) => Ok(linear),
            (b, has_bias) => Err(Error::Shape {
                what: which.bias_role(),
                expected: if has_bias { vec![cols] } else { vec![] },
                found: b.map(|b| vec![b.len()]).unwrap_or_default(),
            }),
        }
    }

    /// The weights of four layers, in the order of [`Projection::ALL`].
    pub(crate) fn from_parts(linears: &[Linear<A>; 4], sinks: Option<&Array1<A>>) -> Self {
        let [q, k, v, o] = linears;
        MultiHeadWeights {
            w_q: q.weight().clone(),
            w_k: k.weight().clone(),
            w_v: v.weight().clone(),
            w_o: o.weight().clone(),
            b_q: q.bias().cloned(),
            b_k: k.bias().cloned(),
            b_v: v.bias().cloned(),
            b_o: o.bias().cloned(),
            sinks: sinks.cloned(),
        }
    }
}
