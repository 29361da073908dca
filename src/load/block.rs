//! Loading a [`MultiHeadAttention`] from a state dict in a [`Layout`].

use std::marker::PhantomData;

use ndarray::{Array1, Array2, ArrayD, Axis, Ix1, Ix2, s};

use super::StateDict;
use super::layout::Layout;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layers::multi_head::{
    MultiHeadAttention, MultiHeadConfig, MultiHeadWeights, Projection,
};

impl MultiHeadConfig {
    /// Builds the layer from the weights of the attention block at `prefix` in
    /// `dict` (a [`SafeTensors`](crate::SafeTensors) file or arrays), stored as
    /// `layout` says. Every tensor must have the shape this configuration needs,
    /// and the biases in the file must be those the configuration has.
    ///
    /// # Errors
    ///
    /// The configuration errors of [`random`](Self::random);
    /// [`Error::Tensor`] naming a tensor that is missing (with the names the
    /// file has under `prefix`), a bias or sinks the configuration does not
    /// have (sinks are `{prefix}.sinks`, one per query head), or a
    /// dtype that cannot be read; [`Error::TensorShape`] naming a tensor and both
    /// shapes; [`Error::InvalidConfig`] when a fused layout cannot hold the
    /// configuration (grouped-query heads in a per-head fused tensor, biases on
    /// some but not all of a fused projection).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use attn::{Layout, MultiHeadConfig};
    /// use ndarray::{ArrayD, IxDyn};
    ///
    /// // a torch.nn.MultiheadAttention(4, 2) state dict
    /// let mut dict = HashMap::new();
    /// dict.insert("attn.in_proj_weight".to_string(), ArrayD::<f64>::zeros(IxDyn(&[12, 4])));
    /// dict.insert("attn.in_proj_bias".to_string(), ArrayD::zeros(IxDyn(&[12])));
    /// dict.insert("attn.out_proj.weight".to_string(), ArrayD::zeros(IxDyn(&[4, 4])));
    /// dict.insert("attn.out_proj.bias".to_string(), ArrayD::zeros(IxDyn(&[4])));
    /// let mha = MultiHeadConfig::new(4, 2).load(&dict, "attn", &Layout::TorchMultihead)?;
    /// assert_eq!(mha.weights().w_q.dim(), (4, 4));
    ///
    /// dict.insert("attn.out_proj.weight".to_string(), ArrayD::zeros(IxDyn(&[4, 3])));
    /// let err = MultiHeadConfig::new(4, 2).load(&dict, "attn", &Layout::TorchMultihead).unwrap_err();
    /// assert!(err.to_string().contains("attn.out_proj.weight"));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn load<A: Element>(
        self,
        dict: &impl StateDict<A>,
        prefix: &str,
        layout: &Layout,
    ) -> Result<MultiHeadAttention<A>> {
        self.check()?;
        let block = Block {
            dict,
            prefix,
            config: &self,
            element: PhantomData,
        };
        let mut weights = match layout {
            Layout::Separate {
                query,
                key,
                value,
                output,
            } => {
                let [(w_q, b_q), (w_k, b_k), (w_v, b_v), (w_o, b_o)] = [
                    (query, Projection::Query),
                    (key, Projection::Key),
                    (value, Projection::Value),
                    (output, Projection::Output),
                ]
                .map(|(module, which)| block.linear(module, which));
                MultiHeadWeights {
                    w_q: w_q?,
                    w_k: w_k?,
                    w_v: w_v?,
                    w_o: w_o?,
                    b_q: b_q?,
                    b_k: b_k?,
                    b_v: b_v?,
                    b_o: b_o?,
                    sinks: None,
                }
            }
            Layout::TorchMultihead => block.torch_multihead()?,
            Layout::Conv1d { qkv, output } => block.conv1d(qkv, output)?,
            Layout::FusedPerHead { qkv, output } => block.fused_per_head(qkv, output)?,
        };
        weights.sinks = block.sinks()?;
        self.with_weights(weights)
    }
}

/// One attention block's tensors in a state dict.
struct Block<'a, A, D> {
    dict: &'a D,
    prefix: &'a str,
    config: &'a MultiHeadConfig,
    element: PhantomData<A>,
}

/// A weight `(in, out)` and its bias, each or its error.
type Pair<A> = (Result<Array2<A>>, Result<Option<Array1<A>>>);

impl<A: Element, D: StateDict<A>> Block<'_, A, D> {
    fn name(&self, suffix: &str) -> String {
        if self.prefix.is_empty() {
            suffix.to_string()
        } else {
            format!("{}.{suffix}", self.prefix)
        }
    }

    /// The tensor `suffix`, or `None`; its shape checked before it is decoded
    /// (from a file's header) and again after.
    fn optional(&self, suffix: &str, shape: &[usize]) -> Result<Option<ArrayD<A>>> {
        let name = self.name(suffix);
        let mismatch = |found: &[usize]| Error::TensorShape {
            name: name.clone(),
            expected: shape.to_vec(),
            found: found.to_vec(),
        };
        match self.dict.shape(&name)? {
            None => return Ok(None),
            Some(found) if found != shape => return Err(mismatch(&found)),
            Some(_) => {}
        }
        match self.dict.tensor(&name)? {
            Some(t) if t.shape() != shape => Err(mismatch(t.shape())),
            found => Ok(found),
        }
    }

    /// The tensor `suffix`, which must be there with this shape.
    fn required(&self, suffix: &str, shape: &[usize]) -> Result<ArrayD<A>> {
        self.optional(suffix, shape)?.ok_or_else(|| Error::Tensor {
            name: self.name(suffix),
            reason: format!(
                "not in the weights; {}",
                nearest_names(&self.dict.names(), self.prefix)
            ),
        })
    }

    /// A bias of `len` for projections `which`: required where the
    /// configuration has one, an error where the file has one it does not.
    fn bias(&self, suffix: &str, which: &[Projection], len: usize) -> Result<Option<Array1<A>>> {
        let wanted: Vec<bool> = which.iter().map(|&p| self.config.has_bias_on(p)).collect();
        if wanted.iter().any(|&w| w != wanted[0]) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "{} holds the biases of {which:?} together: configure a bias on all of them or none",
                    self.name(suffix)
                ),
            });
        }
        let found = self.optional(suffix, &[len])?;
        match (found, wanted[0]) {
            (Some(b), true) => Ok(Some(vector(b))),
            (None, false) => Ok(None),
            (None, true) => self.required(suffix, &[len]).map(|_| None),
            (Some(_), false) => Err(Error::Tensor {
                name: self.name(suffix),
                reason: format!(
                    "the weights have this bias but the configuration has none on {which:?} (see MultiHeadConfig::with_bias_on)"
                ),
            }),
        }
    }

    /// The sink logits `{prefix}.sinks`, `(n_heads,)` (gpt-oss's name):
    /// required where the configuration has sinks, an error where the file
    /// has them and it does not.
    fn sinks(&self) -> Result<Option<Array1<A>>> {
        let heads = self.config.n_heads();
        match (self.optional("sinks", &[heads])?, self.config.has_sinks()) {
            (Some(sinks), true) => Ok(Some(vector(sinks))),
            (None, false) => Ok(None),
            (None, true) => self.required("sinks", &[heads]).map(|_| None),
            (Some(_), false) => Err(Error::Tensor {
                name: self.name("sinks"),
                reason: "the weights have attention sinks but the configuration has none (see MultiHeadConfig::with_sinks)".to_string(),
            }),
        }
    }

    /// One PyTorch `Linear`, `(out, in)`, as `(in, out)` and its bias.
    fn linear(&self, module: &str, which: Projection) -> Pair<A> {
        let (rows, cols) = which.shape(self.config);
        let weight = self
            .required(&format!("{module}.weight"), &[cols, rows])
            .map(|w| transposed(matrix(w)));
        (weight, self.bias(&format!("{module}.bias"), &[which], cols))
    }

    fn torch_multihead(&self) -> Result<MultiHeadWeights<A>> {
        let c = self.config;
        let (d, inner, kv) = (c.d_model(), c.inner_dim(), c.kv_width());
        let [q, k, v] = if c.kdim() == d && c.vdim() == d {
            let packed = matrix(self.required("in_proj_weight", &[fused_width(c), d])?);
            rows_split(&packed, &[inner, kv, kv])
        } else {
            [
                ("q_proj_weight", Projection::Query),
                ("k_proj_weight", Projection::Key),
                ("v_proj_weight", Projection::Value),
            ]
            .map(|(name, which)| {
                let (rows, cols) = which.shape(c);
                self.required(name, &[cols, rows]).map(matrix)
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .try_into()
            .expect("three projections")
        };
        let qkv = [Projection::Query, Projection::Key, Projection::Value];
        let biases = self.bias("in_proj_bias", &qkv, fused_width(c))?;
        let [b_q, b_k, b_v] = split_bias(biases, &[inner, kv, kv]);
        let (w_o, b_o) = self.linear("out_proj", Projection::Output);
        Ok(MultiHeadWeights {
            w_q: transposed(q),
            w_k: transposed(k),
            w_v: transposed(v),
            w_o: w_o?,
            b_q,
            b_k,
            b_v,
            b_o: b_o?,
            sinks: None,
        })
    }

    fn conv1d(&self, qkv: &str, output: &str) -> Result<MultiHeadWeights<A>> {
        let c = self.config;
        let (d, inner, kv) = (c.d_model(), c.inner_dim(), c.kv_width());
        if c.kdim() != d || c.vdim() != d {
            return Err(Error::InvalidConfig {
                reason: "a fused qkv projection reads one input: kdim and vdim must equal d_model"
                    .to_string(),
            });
        }
        let fused = matrix(self.required(&format!("{qkv}.weight"), &[d, fused_width(c)])?);
        let [w_q, w_k, w_v] = rows_split(&fused.reversed_axes(), &[inner, kv, kv]).map(transposed);
        let all = [Projection::Query, Projection::Key, Projection::Value];
        let biases = self.bias(&format!("{qkv}.bias"), &all, fused_width(c))?;
        let [b_q, b_k, b_v] = split_bias(biases, &[inner, kv, kv]);
        let w_o = matrix(self.required(&format!("{output}.weight"), &[inner, d])?);
        let b_o = self.bias(&format!("{output}.bias"), &[Projection::Output], d)?;
        Ok(MultiHeadWeights {
            w_q,
            w_k,
            w_v,
            w_o,
            b_q,
            b_k,
            b_v,
            b_o,
            sinks: None,
        })
    }

    fn fused_per_head(&self, qkv: &str, output: &str) -> Result<MultiHeadWeights<A>> {
        let c = self.config;
        let (d, h, hd) = (c.d_model(), c.n_heads(), c.head_dim());
        if c.n_kv_heads() != h || c.kdim() != d || c.vdim() != d {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a per-head fused qkv holds one key and value head per query head of one input: n_kv_heads ({}) must equal n_heads ({h}), kdim and vdim d_model",
                    c.n_kv_heads()
                ),
            });
        }
        // one key and value head per query head: the fused width is 3·h·hd
        let fused = matrix(self.required(&format!("{qkv}.weight"), &[fused_width(c), d])?);
        // rows (head, role, feature) → one (h·hd, d) block per role
        let per_role = |role: usize| {
            let mut w = Array2::zeros((h * hd, d));
            for head in 0..h {
                let from = (3 * head + role) * hd;
                w.slice_mut(s![head * hd..(head + 1) * hd, ..])
                    .assign(&fused.slice(s![from..from + hd, ..]));
            }
            transposed(w)
        };
        let all = [Projection::Query, Projection::Key, Projection::Value];
        let bias = self.bias(&format!("{qkv}.bias"), &all, fused_width(c))?;
        let bias_of = |role: usize| {
            bias.as_ref()
                .map(|b| Array1::from_shape_fn(h * hd, |i| b[(3 * (i / hd) + role) * hd + i % hd]))
        };
        let (w_o, b_o) = self.linear(output, Projection::Output);
        Ok(MultiHeadWeights {
            w_q: per_role(0),
            w_k: per_role(1),
            w_v: per_role(2),
            w_o: w_o?,
            b_q: bias_of(0),
            b_k: bias_of(1),
            b_v: bias_of(2),
            b_o: b_o?,
            sinks: None,
        })
    }
}

/// The width of the fused query, key and value projections,
/// `inner_dim + 2 · kv_width` (its sum checked by the configuration's check).
fn fused_width(c: &MultiHeadConfig) -> usize {
    c.inner_dim().saturating_add(c.kv_width().saturating_mul(2))
}

/// What a file has under `prefix` (up to 12 names), or where `prefix` is
/// nothing's, the module paths nearest to it.
fn nearest_names(names: &[String], prefix: &str) -> String {
    let under: Vec<&str> = names
        .iter()
        .filter(|n| prefix.is_empty() || is_under(n, prefix))
        .take(12)
        .map(String::as_str)
        .collect();
    if !under.is_empty() {
        return format!("under {prefix:?} there are: {}", under.join(", "));
    }
    // every module path: a name without its last part
    let modules = names
        .iter()
        .filter_map(|n| n.rsplit_once('.').map(|(module, _)| module));
    format!(
        "nothing is under {prefix:?}; {}",
        nearest(modules, prefix, "modules")
    )
}

/// Whether tensor `name` belongs to module `prefix`.
pub(crate) fn is_under(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// The five of `candidates` nearest to `target` by edit distance, in words:
/// "the nearest {what} are …".
pub(crate) fn nearest<'a>(
    candidates: impl Iterator<Item = &'a str>,
    target: &str,
    what: &str,
) -> String {
    let mut all: Vec<&str> = candidates.collect();
    all.sort_unstable();
    all.dedup();
    all.sort_by_cached_key(|c| (edit_distance(c, target), c.len()));
    if all.is_empty() {
        return format!("the file holds no {what}");
    }
    let near: Vec<String> = all.iter().take(5).map(|c| format!("{c:?}")).collect();
    format!("the nearest {what} are {}", near.join(", "))
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// A checked 2-D tensor.
fn matrix<A>(t: ArrayD<A>) -> Array2<A> {
    t.into_dimensionality::<Ix2>().expect("shape checked: 2-D")
}

/// A checked 1-D tensor.
fn vector<A>(t: ArrayD<A>) -> Array1<A> {
    t.into_dimensionality::<Ix1>().expect("shape checked: 1-D")
}

/// `(out, in)` → `(in, out)`, the same buffer (column-major).
fn transposed<A: Element>(w: Array2<A>) -> Array2<A> {
    // the same buffer read column-major: no second copy of a large weight
    w.reversed_axes()
}

/// Consecutive row blocks of these heights.
fn rows_split<A: Element>(w: &Array2<A>, heights: &[usize; 3]) -> [Array2<A>; 3] {
    let mut start = 0;
    heights.map(|n| {
        let block = w.slice_axis(Axis(0), (start..start + n).into()).to_owned();
        start += n;
        block
    })
}

/// Consecutive pieces of a fused bias.
fn split_bias<A: Element>(bias: Option<Array1<A>>, lengths: &[usize; 3]) -> [Option<Array1<A>>; 3] {
    let mut start = 0;
    lengths.map(|n| {
        let piece = bias
            .as_ref()
            .map(|b| b.slice(s![start..start + n]).to_owned());
        start += n;
        piece
    })
}
