//! Padded batches through a layer: every token at its position in its own
//! sequence, and a row with padding between its real tokens reordered first
//! (its padding before its real tokens) where a distance is read.

use ndarray::{Array2, ArrayRef2, ArrayRef3, Axis, Ix3};

use super::{MultiHeadAttention, MultiHeadOutput};
use crate::core::mask::Mask;
use crate::core::reorder::Reorder;
use crate::decode::position::{Run, broken_runs};
use crate::element::Element;
use crate::error::{Error, Result};

impl<A: Element> MultiHeadAttention<A> {
    /// Padded self-attention, with or without the weights.
    pub(super) fn padded(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        let (b, l, _) = x.dim();
        if real.dim() != (b, l) {
            return Err(Error::Shape {
                what: "real (which tokens are not padding) must be (B, L)",
                expected: vec![b, l],
                found: real.shape().to_vec(),
            });
        }
        // ALiBi and windows count distances in slots, which equal the distances
        // in positions only while a row's real tokens are one run
        let slopes = self.slopes();
        let reads_distance = self.layer_masks(&slopes).iter().any(Mask::reads_distance)
            || masks.iter().any(Mask::reads_distance);
        let broken = broken_runs(&vec![Run::Before; b], real);
        if !reads_distance || !broken.contains(&true) {
            return self.padded_runs(x, real, masks, weights);
        }
        let reorder = Reorder::padding_first(real.view(), &broken);
        let masks: Vec<_> = (masks.iter())
            .map(|mask| Reorder::mask(&reorder, &reorder, mask))
            .collect();
        let (x, real) = (reorder.apply(x, Axis(1)), reorder.apply(real, Axis(1)));
        let out = self.padded_runs(&x, &real, &masks, weights)?;
        // the weights (when asked for) back along their queries and keys
        let mut head_weights = out.head_weights;
        let mut mean_weights = out.mean_weights;
        if !head_weights.is_empty() {
            head_weights = Reorder::undo_weights(&reorder, &reorder, &head_weights);
            mean_weights = reorder.undo(&reorder.undo(&mean_weights, Axis(1)), Axis(2));
        }
        Ok(MultiHeadOutput {
            output: reorder.undo(&out.output, Axis(1)),
            head_weights,
            mean_weights,
        })
    }

    /// Padded self-attention, with no reordering of the slots.
    fn padded_runs(
        &self,
        x: &ArrayRef3<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<MultiHeadOutput<A, Ix3>> {
        let positions = positions_of(real);
        let heads = self.project_at(x, x, x, &positions, &positions)?;
        let keep = real.to_owned().insert_axis(Axis(1)).insert_axis(Axis(1));
        let mut all = vec![Mask::keep(&keep)];
        all.extend(masks.iter().map(Mask::reborrow));
        self.attend(&heads, &all, weights)
    }
}

/// The position of every token in its own sequence: the real tokens before it
/// (padding takes the position of the next real token; nothing attends to it).
pub(super) fn positions_of(real: &ArrayRef2<bool>) -> Array2<usize> {
    let mut positions = Array2::zeros(real.dim());
    for (mut row, flags) in positions.rows_mut().into_iter().zip(real.rows()) {
        let mut count = 0;
        for (p, &r) in row.iter_mut().zip(flags) {
            *p = count;
            count += usize::from(r);
        }
    }
    positions
}
