//! Several sequences packed end to end in one call: variable-length prefill,
//! with nothing computed for padding or between sequences.

use ndarray::{Array2, ArrayRef2, Axis};

use super::{MultiHeadAttention, batch_of_one, in_callers_shapes};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::flex::{BlockMask, Documents};

impl<A: Element> MultiHeadAttention<A> {
    /// Self-attention over sequences packed end to end, `offsets = [0, l₀,
    /// l₀ + l₁, …, total]` their cumulative lengths (FlashAttention's
    /// `cu_seqlens`, vLLM's `query_start_loc`): variable-length prefill without
    /// padding. Each sequence attends only within itself (causally and within
    /// the window, as the layer does), and rotary embeddings see each token at
    /// its position in its own sequence, so every sequence gives the numbers it
    /// gives alone. The blocks between sequences are skipped
    /// ([`Documents`] in a [`BlockMask`]), so the call costs about what the
    /// sequences cost one by one.
    ///
    /// # Shapes
    ///
    /// `x: (total, d_model)` → `(total, d_model)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the offsets do not end at `x`'s rows,
    /// [`Error::InvalidConfig`] when they do not start at 0 or decrease, and
    /// the input errors of [`forward`](Self::forward).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Causality, Init, MultiHeadConfig};
    /// use ndarray::{s, Array2};
    ///
    /// let mha = MultiHeadConfig::new(8, 2)
    ///     .with_causality(Causality::Causal)
    ///     .random::<f64>(Init::XavierUniform, 0)?;
    /// let x = Array2::from_shape_fn((7, 8), |(i, j)| (i * 8 + j) as f64 / 50.0);
    /// let packed = mha.forward_packed(&x, &[0, 3, 7])?; // sequences of 3 and 4 tokens
    /// let second = x.slice(s![3.., ..]);
    /// let alone = mha.forward(&second, &second, &second, &[])?;
    /// let e = (&packed.slice(s![3.., ..]) - &alone).iter().fold(0.0_f64, |m, d| m.max(d.abs()));
    /// assert!(e < 1e-14);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn forward_packed(&self, x: &ArrayRef2<A>, offsets: &[usize]) -> Result<Array2<A>> {
        let total = x.nrows();
        let end = offsets.last().copied().unwrap_or(0);
        if end != total {
            return Err(Error::Shape {
                what: "the packed sequences' offsets must end at x's rows",
                expected: vec![total],
                found: vec![end],
            });
        }
        // the layer's own causal mask and window act within each sequence (its
        // positions' differences are the packed ones'); the documents only cut
        // the sequences apart
        let documents = Documents::from_offsets(offsets)?;
        // each token at its place in its own sequence
        let mut positions = Array2::zeros((1, total));
        for w in offsets.windows(2) {
            for (p, t) in (w[0]..w[1]).enumerate() {
                positions[[0, t]] = p;
            }
        }
        let x = batch_of_one(x);
        let heads = self
            .project_at(&x, &x, &x, &positions, &positions)
            .map_err(in_callers_shapes)?;
        let blocks = BlockMask::new(documents, [1, 1, total, total])?;
        let slopes = self.slopes();
        let attention = self.attention(&[], &slopes).with_block_mask(&blocks);
        let out = attention.forward(&heads.q, &heads.k, &heads.v)?;
        Ok(self.merge_heads(out)?.index_axis_move(Axis(0), 0))
    }
}
