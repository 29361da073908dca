//! What each part of a long cache leaves for its query rows, held for every
//! part of a call in one allocation, and how a group's parts merge (split-key
//! decoding); and the working memory a thread reuses from part to part.

use std::ops::Range;

use ndarray::ArrayViewMut2;

use crate::kernel::float::{KernelFloat, Separate};
use crate::kernel::online::{fold_max, inverse_total, part_weight, shift_of};

/// Every part's contribution to its group's query rows (`rows` of them, the
/// same for every group): each row's running maximum and sum, whether its
/// scores were free of NaN and `+∞` after masking, and its output before
/// division by the sum. Allocated once per call, not once per part.
pub(crate) struct Partials<A> {
    parts: usize,
    rows: usize,
    d_v: usize,
    /// `parts × rows × d_v`, each part's rows ordered head by head.
    o: Vec<A>,
    max: Vec<A>,
    sum: Vec<A>,
    finite: Vec<bool>,
}

/// One part's place in [`Partials`], written by the part's task.
pub(crate) struct PartialMut<'a, A> {
    pub(super) o: &'a mut [A],
    pub(super) max: &'a mut [A],
    pub(super) sum: &'a mut [A],
    pub(super) finite: &'a mut [bool],
}

impl<A: KernelFloat> Partials<A> {
    /// Room for `parts` parts of `rows` rows of `d_v` outputs.
    pub(crate) fn new(parts: usize, rows: usize, d_v: usize) -> Self {
        Self {
            parts,
            rows,
            d_v,
            o: vec![A::zero(); parts * rows * d_v],
            max: vec![A::neg_infinity(); parts * rows],
            sum: vec![A::zero(); parts * rows],
            finite: vec![true; parts * rows],
        }
    }

    /// Each part's place, in part order.
    pub(crate) fn slots(&mut self) -> Vec<PartialMut<'_, A>> {
        let (rows, width) = (self.rows, self.rows * self.d_v);
        let (mut o, mut max) = (&mut self.o[..], &mut self.max[..]);
        let (mut sum, mut finite) = (&mut self.sum[..], &mut self.finite[..]);
        (0..self.parts)
            .map(|_| PartialMut {
                o: front(&mut o, width),
                max: front(&mut max, rows),
                sum: front(&mut sum, rows),
                finite: front(&mut finite, rows),
            })
            .collect()
    }

    /// Merges the parts `parts` of one group, in order, into `outs` (one
    /// `(l, d_v)` array per query head), with each head's sink logit
    /// (`sinks(h)`, if the call has sinks) in the denominator, and returns the
    /// heads whose inputs need the reference path.
    pub(crate) fn finish(
        &self,
        parts: Range<usize>,
        outs: &mut [ArrayViewMut2<'_, A>],
        sinks: impl Fn(usize) -> Option<A>,
    ) -> Vec<usize> {
        let (rows, d_v) = (self.rows, self.d_v);
        let mut bad = Vec::new();
        let mut row = vec![A::zero(); d_v];
        let mut r = 0;
        for (h, out) in outs.iter_mut().enumerate() {
            let sink = sinks(h);
            for mut out in out.outer_iter_mut() {
                let at = |p: usize| p * rows + r;
                let max = parts
                    .clone()
                    .fold(A::neg_infinity(), |m, p| fold_max(m, self.max[at(p)]));
                let max = sink.map_or(max, |sink| fold_max(max, sink));
                let shift = shift_of(max);
                let sink = sink.map_or(A::zero(), |sink| part_weight::<A, Separate>(sink, shift));
                let (mut total, mut finite) = (sink, true);
                row.fill(A::zero());
                for p in parts.clone() {
                    let weight = part_weight::<A, Separate>(self.max[at(p)], shift);
                    total += weight * self.sum[at(p)];
                    for (x, &o) in row.iter_mut().zip(&self.o[at(p) * d_v..][..d_v]) {
                        *x += weight * o;
                    }
                    finite &= self.finite[at(p)];
                }
                let inverse = inverse_total(total);
                for (x, &o) in out.iter_mut().zip(&row) {
                    *x = o * inverse;
                    finite &= x.is_finite();
                }
                if !finite && bad.last() != Some(&h) {
                    bad.push(h);
                }
                r += 1;
            }
        }
        bad
    }
}

/// The first `len` elements of `rest`, taken off it.
fn front<'a, T>(rest: &mut &'a mut [T], len: usize) -> &'a mut [T] {
    rest.split_off_mut(..len)
        .expect("the slab holds every part's rows")
}

/// The working memory of the direct path on one thread, grown to what a part
/// needs and kept for the next part (a decoding step over a long cache runs
/// many parts: allocated per part, with each part's own results, an int8 step
/// over 4 097 positions took 144 µs on one thread instead of 139.5). Empty
/// by default: nothing is allocated until a part asks.
#[derive(Default)]
pub(crate) struct Memory<A> {
    pub(super) floats: Vec<A>,
    pub(super) shorts: Vec<i16>,
    pub(super) ints: Vec<i32>,
    /// Widened chunks of keys and values, for the paths that use them.
    pub(super) key_rows: Vec<A>,
    pub(super) value_rows: Vec<A>,
}
