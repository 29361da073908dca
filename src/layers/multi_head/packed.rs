//! Several sequences packed end to end in one call: variable-length prefill,
//! with nothing computed for padding or between sequences.

use ndarray::{Array2, ArrayRef2, ArrayViewMut2, s};

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
    /// sequences cost one by one. It works through consecutive sequences a
    /// group of a few thousand tokens at a time (8 MiB in its widest
    /// intermediate array; a longer sequence on its own), so its intermediate
    /// arrays stay in cache from one step to the next, as a sequence's alone
    /// do, and its memory stays bounded however many tokens it packs.
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
        Documents::check_offsets(offsets)?;
        let config = &self.config;
        let widest = config
            .d_model()
            .max(config.inner_dim())
            .max(config.kv_width());
        let tokens = GROUP_BYTES / (widest * std::mem::size_of::<A>()).max(1);
        self.packed_in_groups(x, offsets, tokens)
    }

    /// [`forward_packed`](Self::forward_packed) of valid offsets, a group of
    /// consecutive sequences of about `tokens` tokens at a time.
    fn packed_in_groups(
        &self,
        x: &ArrayRef2<A>,
        offsets: &[usize],
        tokens: usize,
    ) -> Result<Array2<A>> {
        let mut out = Array2::zeros((x.nrows(), self.config.d_model()));
        for group in groups(offsets, tokens) {
            let rows = group[0]..group[group.len() - 1];
            let local: Vec<usize> = group.iter().map(|o| o - rows.start).collect();
            let x = x.slice(s![rows.clone(), ..]);
            self.packed_group(&x, &local, out.slice_mut(s![rows, ..]))?;
        }
        Ok(out)
    }

    /// One group of packed sequences in one call, into its rows `out` of the
    /// call's output: its offsets are valid and end at `x`'s rows.
    fn packed_group(
        &self,
        x: &ArrayRef2<A>,
        offsets: &[usize],
        out: ArrayViewMut2<'_, A>,
    ) -> Result<()> {
        let total = x.nrows();
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
        let heads = attention.forward(&heads.q, &heads.k, &heads.v)?;
        self.merge_heads_into(heads.view(), out)
    }
}

/// The activations a group of packed sequences may hold in its widest array
/// (4 096 tokens of 512 `f32`s): the layer's intermediate arrays stay in the
/// last-level cache from one step to the next, as they do for a sequence
/// alone, and the call's memory stays bounded however many tokens it packs.
const GROUP_BYTES: usize = 8 << 20;

/// Consecutive sequences gathered up to `tokens` tokens (a longer sequence on
/// its own): each group's offsets, from its first sequence's start to its
/// last's end (one group, `[0]`, when there are no sequences).
fn groups(offsets: &[usize], tokens: usize) -> Vec<&[usize]> {
    let mut groups = Vec::new();
    let mut first = 0;
    for last in 1..offsets.len() {
        if last - 1 > first && offsets[last] - offsets[first] > tokens {
            groups.push(&offsets[first..last]);
            first = last - 1;
        }
    }
    groups.push(&offsets[first..]);
    groups
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::groups;
    use crate::{Causality, Init, MultiHeadConfig};

    #[test]
    fn groups_gather_consecutive_sequences_up_to_the_budget() {
        let offsets = [0, 3, 5, 5, 12, 13, 20];
        let want: [&[usize]; 4] = [&[0, 3, 5, 5], &[5, 12], &[12, 13], &[13, 20]];
        assert_eq!(groups(&offsets, 5), want);
        assert_eq!(groups(&offsets, 100), [&offsets[..]]);
        assert_eq!(groups(&[0], 4), [&[0][..]]);
    }

    /// Sequences cut into groups (an empty one among them) give what the whole
    /// packed call gives.
    #[test]
    fn a_packed_call_in_groups_equals_one_group() {
        let mha = MultiHeadConfig::new(8, 2)
            .with_causality(Causality::SlidingWindow(4))
            .random::<f64>(Init::XavierUniform, 5)
            .expect("valid");
        let x = Array2::from_shape_fn((40, 8), |(i, j)| ((i * 13 + j * 7) % 17) as f64 / 9.0 - 1.0);
        let offsets = [0, 6, 6, 19, 20, 33, 40];
        let whole = mha.packed_in_groups(&x, &offsets, 40).expect("valid");
        for tokens in [1, 7, 14] {
            assert!(groups(&offsets, tokens).len() > 2);
            let grouped = mha.packed_in_groups(&x, &offsets, tokens).expect("valid");
            let e = (&grouped - &whole)
                .iter()
                .fold(0.0_f64, |m, d| m.max(d.abs()));
            assert!(e < 1e-14, "groups of {tokens} tokens: {e:e}");
        }
    }
}
