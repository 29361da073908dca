//! Padded batches through a layer: every token at its position in its own
//! sequence, and a row with padding between its real tokens moved together
//! first where a distance is read.

use ndarray::{Array2, Array3, Array4, ArrayRef2, ArrayRef3, Axis, CowArray, Ix3, Ix4, IxDyn};

use super::{MultiHeadAttention, MultiHeadOutput};
use crate::core::mask::Mask;
use crate::decode::position::Run;
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
        match Compaction::of(real).filter(|_| reads_distance) {
            None => self.padded_runs(x, real, masks, weights),
            Some(compaction) => {
                let masks: Vec<_> = masks.iter().map(|m| compaction.mask(m)).collect();
                let x = compaction.gather(x);
                let real = compaction.gather(&real.view().insert_axis(Axis(2)));
                let out = self.padded_runs(&x, &real.remove_axis(Axis(2)), &masks, weights)?;
                Ok(compaction.restore(out))
            }
        }
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

/// The slots of each batch row reordered: its real tokens first, in their
/// order, then its padding. Attention over the reordered rows, which are
/// right-padded, gives each row's real tokens the numbers of their sequence
/// alone, distances included; [`restore`](Self::restore) puts the results back
/// in the caller's slots.
struct Compaction {
    /// `order[[b, k]]`: the slot of row `b` that goes to place `k`.
    order: Array2<usize>,
    /// `place[[b, i]]`: where slot `i` of row `b` went.
    place: Array2<usize>,
}

impl Compaction {
    /// The reordering of `real`'s rows (`(B, L)`), `None` when each row's real
    /// tokens are already one run.
    fn of(real: &ArrayRef2<bool>) -> Option<Self> {
        let broken = |flags: ndarray::ArrayView1<'_, bool>| {
            flags.iter().fold(Run::Before, |run, &flag| run.then(flag)) == Run::Broken
        };
        if !real.rows().into_iter().any(broken) {
            return None;
        }
        let l = real.ncols();
        let mut order = Array2::zeros(real.dim());
        let mut place = Array2::zeros(real.dim());
        for (b, flags) in real.rows().into_iter().enumerate() {
            let real_first = (0..l)
                .filter(|&i| flags[i])
                .chain((0..l).filter(|&i| !flags[i]));
            for (k, slot) in real_first.enumerate() {
                order[[b, k]] = slot;
                place[[b, slot]] = k;
            }
        }
        Some(Self { order, place })
    }

    /// `(B, L, C)` rows of tokens, reordered.
    fn gather<T: Clone>(&self, x: &ArrayRef3<T>) -> Array3<T> {
        Array3::from_shape_fn(x.dim(), |(b, k, c)| x[[b, self.order[[b, k]], c]].clone())
    }

    /// A mask of the call, over the reordered slots: a `Keep` or `Bias` array
    /// gathered along its query and key axes (where they are `L` long, not
    /// broadcast) for every batch row; the other masks read no slot's content.
    /// An array that does not broadcast to `(B, heads, L, L)` stays as it is, for
    /// attention to report.
    fn mask<'m, A: Clone>(&self, mask: &'m Mask<'_, A>) -> Mask<'m, A> {
        let gathered = match mask {
            Mask::Keep(keep) => self
                .gather_pairs(keep)
                .map(|k| Mask::Keep(k.into_dyn().into())),
            Mask::Bias(bias) => self
                .gather_pairs(bias)
                .map(|b| Mask::Bias(b.into_dyn().into())),
            _ => None,
        };
        gathered.unwrap_or_else(|| mask.reborrow())
    }

    /// A `(B', H, L', S')` array (fewer axes broadcast from the left), gathered
    /// into `(B, H, L', S')` where `L'` and `S'` are 1 or `L`.
    fn gather_pairs<T: Clone>(&self, array: &CowArray<'_, T, IxDyn>) -> Option<Array4<T>> {
        let (b, l) = self.order.dim();
        let mut view = array.view();
        while view.ndim() < 4 {
            view.insert_axis_inplace(Axis(0));
        }
        let view = view.into_dimensionality::<Ix4>().ok()?;
        let (rows, heads, queries, keys) = view.dim();
        let fits = |n| n == 1 || n == l;
        if !(rows == 1 || rows == b) || !fits(queries) || !fits(keys) {
            return None;
        }
        let slot = |n: usize, b: usize, i: usize| if n == 1 { 0 } else { self.order[[b, i]] };
        Some(Array4::from_shape_fn(
            (b, heads, queries, keys),
            |(row, h, i, j)| {
                let from = if rows == 1 { 0 } else { row };
                view[[from, h, slot(queries, row, i), slot(keys, row, j)]].clone()
            },
        ))
    }

    /// The output and weights of the reordered rows, back in the caller's
    /// slots (the weights along both their query and key axes).
    fn restore<A: Element>(&self, out: MultiHeadOutput<A, Ix3>) -> MultiHeadOutput<A, Ix3> {
        let place = &self.place;
        let output = Array3::from_shape_fn(out.output.dim(), |(b, i, c)| {
            out.output[[b, place[[b, i]], c]]
        });
        let head_weights = if out.head_weights.is_empty() {
            out.head_weights
        } else {
            let w = &out.head_weights;
            Array4::from_shape_fn(w.dim(), |(b, h, i, j)| {
                w[[b, h, place[[b, i]], place[[b, j]]]]
            })
        };
        let mean_weights = if out.mean_weights.is_empty() {
            out.mean_weights
        } else {
            let w = &out.mean_weights;
            Array3::from_shape_fn(w.dim(), |(b, i, j)| w[[b, place[[b, i]], place[[b, j]]]])
        };
        MultiHeadOutput {
            output,
            head_weights,
            mean_weights,
        }
    }
}
