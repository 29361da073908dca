//! Multi-head attention over a paged cache: many sequences of different
//! lengths in one call, each appended to its own block table.

use ndarray::{Array2, ArrayRef2, Axis, concatenate, s};

use super::{MultiHeadAttention, alibi, in_callers_shapes};
use crate::core::mask::Mask;
use crate::decode::paged::{CacheElement, PagedKvCache, SequenceId, step_masks};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::flex::Documents;

impl<A: Element> MultiHeadAttention<A> {
    /// Self-attention of new tokens of several sequences with a
    /// [`PagedKvCache`]: `x` holds the sequences' new tokens end to end,
    /// `offsets = [0, t₀, t₀ + t₁, …, total]` their cumulative counts, and
    /// `sequences[i]` the cache sequence that tokens `offsets[i]..offsets[i+1]`
    /// continue. Each sequence's keys and values are appended to its blocks and
    /// its tokens attend causally (within the layer's window) over its own
    /// positions only, rotary embeddings at its own positions: prompts of
    /// different lengths (variable-length prefill), one token of each of many
    /// sequences at different lengths (batched decoding), or a prompt in chunks
    /// (chunked prefill), with no padding computed. A sequence gives the
    /// numbers it gives alone (with a contiguous [`KvCache`](crate::KvCache) of
    /// the same stored type, or within the int8 bound of
    /// [`PagedKvCache`]).
    ///
    /// # Shapes
    ///
    /// `x: (total, d_model)` → `(total, d_model)`; the cache holds
    /// `n_kv_heads` heads of `head_dim`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `kdim` or `vdim` differs from `d_model`,
    /// the cache does not fit the layer, or the offsets do not start at 0 or
    /// decrease; [`Error::Shape`] when the offsets do not end at `x`'s rows or
    /// there is not one sequence per span; [`Error::Cache`] when a sequence is
    /// named twice, was freed or belongs to another cache, the pool has too
    /// few free blocks for all of them, or an int8 cache is given a value it
    /// cannot quantise. The cache is then left as it was.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, Init, MultiHeadConfig, PagedKvCache};
    /// use ndarray::{s, Array2};
    ///
    /// let mha = MultiHeadConfig::new(16, 4).with_kv_heads(2)
    ///     .with_causality(Causality::Causal)
    ///     .random::<f32>(Init::XavierUniform, 0)?;
    /// let mut cache = PagedKvCache::<i8>::new(32, 16, 2, 4, 4)?;
    /// let (a, b) = (cache.add_sequence(), cache.add_sequence());
    /// // prompts of 5 and 2 tokens, then one token of each
    /// let prompts = Array2::from_shape_fn((7, 16), |(i, j)| ((i + j) % 7) as f32 / 7.0);
    /// mha.forward_paged(&prompts, &[0, 5, 7], &mut cache, &[a, b])?;
    /// let next = mha.forward_paged(&Array2::ones((2, 16)), &[0, 1, 2], &mut cache, &[a, b])?;
    /// assert_eq!((next.dim(), cache.len(a)?, cache.len(b)?), ((2, 16), 6, 3));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_paged<E: CacheElement<Compute = A>>(
        &self,
        x: &ArrayRef2<A>,
        offsets: &[usize],
        cache: &mut PagedKvCache<E>,
        sequences: &[SequenceId],
    ) -> Result<Array2<A>> {
        let config = &self.config;
        let hd = config.head_dim();
        config.check_cacheable()?;
        if cache.sizes() != (config.n_kv_heads(), hd, hd) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the paged cache holds (kv_heads, d_k, d_v) = {:?}, the layer needs {:?}",
                    cache.sizes(),
                    (config.n_kv_heads(), hd, hd)
                ),
            });
        }
        let end = offsets.last().copied().unwrap_or(0);
        if end != x.nrows() || offsets.len() != sequences.len() + 1 {
            return Err(Error::Shape {
                what: "offsets must be [0, …, x's rows], one span per sequence",
                expected: vec![sequences.len() + 1, x.nrows()],
                found: vec![offsets.len(), end],
            });
        }
        Documents::from_offsets(offsets)?; // starts at 0, never decreases
        for (i, id) in sequences.iter().enumerate() {
            if sequences[..i].contains(id) {
                return Err(Error::Cache {
                    reason: format!("sequence {i} is named twice in one call"),
                });
            }
        }
        // every sequence projected and checked before any is written
        let scale = Some(A::from_f64(config.scale()));
        let slopes = self.slopes();
        let alibi: Vec<Mask<'_, A>> = alibi(&slopes).into_iter().collect();
        let mut steps = Vec::with_capacity(sequences.len());
        let mut needed = 0_usize;
        for (span, &id) in offsets.windows(2).zip(sequences) {
            let start = cache.len(id)?;
            let x = x.slice(s![span[0]..span[1], ..]).insert_axis(Axis(0));
            let t = span[1] - span[0];
            let positions = Array2::from_shape_fn((1, t), |(_, i)| start + i);
            let heads = self
                .project_at(&x, &x, &x, &positions, &positions)
                .map_err(in_callers_shapes)?;
            let (q, k, v) = (
                heads.q.index_axis_move(Axis(0), 0),
                heads.k.index_axis_move(Axis(0), 0),
                heads.v.index_axis_move(Axis(0), 0),
            );
            let rows = cache.prepare(id, scale, &q, &k, &v, &alibi)?;
            needed = needed.saturating_add(rows.blocks);
            steps.push((id, q, rows));
        }
        if needed > cache.free_blocks() {
            return Err(Error::Cache {
                reason: format!(
                    "the pool has {} free blocks, the call needs {needed}",
                    cache.free_blocks()
                ),
            });
        }
        crate::kernel::paged::ready()?;
        for (id, _, rows) in &steps {
            cache.commit(*id, rows);
        }
        let window = config.causality().window();
        let outputs = steps
            .iter()
            .map(|(id, q, _)| {
                if config.softcap().is_some() || self.sinks.is_some() {
                    return self.attend_gathered(cache, *id, q, &slopes);
                }
                cache.attend_held(*id, scale, q, &step_masks(window, &alibi))
            })
            .collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = outputs.iter().map(|o| o.view()).collect();
        let heads = concatenate(Axis(1), &views).map_err(|_| Error::Shape {
            what: "the sequences' outputs must share their heads and widths",
            expected: vec![config.n_heads(), x.nrows(), hd],
            found: vec![views.len()],
        })?;
        let out = self.merge_heads(heads.view().insert_axis(Axis(0)))?;
        Ok(out.index_axis_move(Axis(0), 0))
    }

    /// A layer with a soft-cap or sinks: its own attention over the
    /// sequence's keys and values, gathered.
    fn attend_gathered<E: CacheElement<Compute = A>>(
        &self,
        cache: &PagedKvCache<E>,
        id: SequenceId,
        q: &ndarray::Array3<A>,
        slopes: &ndarray::Array1<A>,
    ) -> Result<ndarray::Array3<A>> {
        let keys = cache.keys(id)?.insert_axis(Axis(0));
        let values = cache.values(id)?.insert_axis(Axis(0));
        let causal = [Mask::CausalBottomRight];
        let attention = self.attention(&causal, slopes);
        let out = attention.forward(&q.view().insert_axis(Axis(0)), &keys, &values)?;
        Ok(out.index_axis_move(Axis(0), 0))
    }
}
