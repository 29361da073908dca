//! Each batch row's tokens reordered, its padding before its real tokens, and
//! back: what makes a row with padding between its real tokens give the
//! numbers of its sequence alone where a mask reads distances in slots (ALiBi,
//! sliding windows). In the reordered row every distance between real tokens
//! counts real tokens only.

use ndarray::{Array, Array2, ArrayRef, ArrayView2, Axis, CowArray, Ix4, IxDyn, RemoveAxis};

use super::mask::Mask;

/// A permutation of the slots of every batch row.
#[derive(Debug, Clone)]
pub(crate) struct Reorder {
    /// `order[[b, k]]`: the slot of row `b` that goes to place `k`.
    order: Array2<usize>,
    /// `place[[b, i]]`: the place slot `i` of row `b` goes to.
    place: Array2<usize>,
}

impl Reorder {
    /// Each row of `real` (`(B, L)`, `true` = a real token) with its padding
    /// first, then its real tokens, both in their order; `moved` says which rows
    /// move at all (the others keep their order).
    pub(crate) fn padding_first(real: ArrayView2<'_, bool>, moved: &[bool]) -> Self {
        let (b, l) = real.dim();
        let mut order = Array2::zeros((b, l));
        let mut place = Array2::zeros((b, l));
        for (row, flags) in real.rows().into_iter().enumerate() {
            let slots: Vec<usize> = if moved[row] {
                let padding = (0..l).filter(|&i| !flags[i]);
                padding.chain((0..l).filter(|&i| flags[i])).collect()
            } else {
                (0..l).collect()
            };
            for (k, slot) in slots.into_iter().enumerate() {
                order[[row, k]] = slot;
                place[[row, slot]] = k;
            }
        }
        Reorder { order, place }
    }

    /// `a` (batch first) with every row's slots along `axis` reordered.
    pub(crate) fn apply<T: Clone, D>(&self, a: &ArrayRef<T, D>, axis: Axis) -> Array<T, D>
    where
        D: RemoveAxis,
        D::Smaller: RemoveAxis,
    {
        along(a, axis, &self.order)
    }

    /// `a` (batch first, reordered along `axis`) back in the rows' own order.
    pub(crate) fn undo<T: Clone, D>(&self, a: &ArrayRef<T, D>, axis: Axis) -> Array<T, D>
    where
        D: RemoveAxis,
        D::Smaller: RemoveAxis,
    {
        along(a, axis, &self.place)
    }

    /// `(B, H, L, S)` scores' weights, reordered along their queries by
    /// `queries` and their keys by `keys`, back in the rows' own order.
    pub(crate) fn undo_weights<T: Clone>(
        queries: &Self,
        keys: &Self,
        weights: &ArrayRef<T, Ix4>,
    ) -> Array<T, Ix4> {
        keys.undo(&queries.undo(weights, Axis(2)), Axis(3))
    }

    /// A mask of the call over the reordered slots: a `Keep` or `Bias` array
    /// (broadcasting to `(B, H, L, S)`) reordered along its query axis by
    /// `queries` and its key axis by `keys`, where that axis is not broadcast;
    /// the other masks read no slot's content. An array that does not broadcast
    /// stays as it is, for attention to report.
    pub(crate) fn mask<'m, A: Clone>(
        queries: &Self,
        keys: &Self,
        mask: &'m Mask<'_, A>,
    ) -> Mask<'m, A> {
        let reordered = match mask {
            Mask::Keep(keep) => pairs(queries, keys, keep).map(|k| Mask::Keep(k.into())),
            Mask::Bias(bias) => pairs(queries, keys, bias).map(|b| Mask::Bias(b.into())),
            _ => None,
        };
        reordered.unwrap_or_else(|| mask.reborrow())
    }
}

/// `a` with row `b`'s slots along `axis` taken in the order `slots.row(b)`:
/// one copy of `a`, then the slots that move.
fn along<T: Clone, D>(a: &ArrayRef<T, D>, axis: Axis, slots: &Array2<usize>) -> Array<T, D>
where
    D: RemoveAxis,
    D::Smaller: RemoveAxis,
{
    // the axis within one batch row
    let within = Axis(axis.index() - 1);
    let mut out = a.to_owned();
    for ((mut row, from), order) in (out.axis_iter_mut(Axis(0)))
        .zip(a.axis_iter(Axis(0)))
        .zip(slots.rows())
    {
        for (k, &slot) in order.iter().enumerate().filter(|&(k, &slot)| k != slot) {
            row.index_axis_mut(within, k)
                .assign(&from.index_axis(within, slot));
        }
    }
    out
}

/// A mask array (fewer than four axes broadcast from the left) reordered
/// along its query and key axes, for every batch row: `None` when it does not
/// broadcast to the rows' `(B, _, L, S)`.
fn pairs<T: Clone>(
    queries: &Reorder,
    keys: &Reorder,
    array: &CowArray<'_, T, IxDyn>,
) -> Option<Array<T, IxDyn>> {
    let ((b, l), s) = (queries.order.dim(), keys.order.ncols());
    let mut view = array.view();
    while view.ndim() < 4 {
        view.insert_axis_inplace(Axis(0));
    }
    let view = view.into_dimensionality::<Ix4>().ok()?;
    let (rows, heads, lq, lk) = view.dim();
    if !(rows == 1 || rows == b) || !(lq == 1 || lq == l) || !(lk == 1 || lk == s) {
        return None;
    }
    let mut full = view.broadcast((b, heads, lq, lk))?.to_owned();
    if lq == l && l > 1 {
        full = queries.apply(&full, Axis(2));
    }
    if lk == s && s > 1 {
        full = keys.apply(&full, Axis(3));
    }
    Some(full.into_dyn())
}
