//! Built-in score modifications: logit soft-capping and a relative bias from a
//! table, each with its parameters' gradients.

use ndarray::{Array1, Array2, ArrayView2};

use super::function::{At, ScoreMod};
use crate::element::Element;
use crate::error::{Error, Result};

/// Logit soft-capping, `c·tanh(s/c)` (Gemma 2, Grok): scores squashed into
/// `(−c, c)`, with a learnable cap `c` (its gradient is the one entry of
/// [`FlexGradients::score`](crate::flex::FlexGradients::score)).
///
/// # Examples
///
/// ```
/// use attn::flex::{At, ScoreMod, SoftCap};
///
/// let cap = SoftCap::new(50.0_f64);
/// let at = At { batch: 0, head: 0, query: 0, key: 0 };
/// assert!((cap.score(1000.0, at) - 50.0).abs() < 1e-9);
/// assert!((cap.score(0.5, at) - 0.5).abs() < 1e-4); // near 0 it changes little
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftCap<A> {
    cap: A,
}

impl<A: Element> SoftCap<A> {
    /// Soft-capping at `cap` (`> 0`, finite: [`FlexAttention`](crate::flex::FlexAttention)
    /// checks it before every call).
    pub fn new(cap: A) -> Self {
        SoftCap { cap }
    }

    /// The cap `c`.
    pub fn cap(&self) -> A {
        self.cap
    }
}

impl<A: Element> SoftCap<A> {
    /// The backward at one score `s` with upstream `d`: `d·(1 − t²)` and the
    /// cap's running gradient `cap + d·(t − x·(1 − t²))`, `x = s/c`, `t = tanh x`.
    #[inline(always)]
    fn backward_one(&self, d: A, s: A, cap: A) -> (A, A) {
        let x = s / self.cap;
        let t = x.tanh_fast();
        let slope = A::one() - t * t;
        (d * slope, cap + d * (t - x * slope))
    }
}

impl<A: Element> ScoreMod<A> for SoftCap<A> {
    #[inline(always)]
    fn score(&self, score: A, _: At) -> A {
        self.cap * (score / self.cap).tanh_fast()
    }

    #[inline(always)]
    fn derivative(&self, score: A, _: At) -> A {
        let t = (score / self.cap).tanh_fast();
        A::one() - t * t
    }

    fn parameters(&self) -> usize {
        1
    }

    #[inline(always)]
    fn add_gradients(&self, upstream: A, score: A, _: At, gradients: &mut [A]) {
        // ∂(c·tanh(s/c))/∂c = tanh(s/c) − (s/c)·(1 − tanh²(s/c))
        let x = score / self.cap;
        let t = x.tanh_fast();
        gradients[0] += upstream * (t - x * (A::one() - t * t));
    }

    #[inline(always)]
    fn backward_row(&self, _: At, scores: &[A], upstream: &mut [A], gradients: &mut [A]) {
        // in lanes, the cap's gradient summed per lane: vectorises
        const LANES: usize = 8;
        let mut cap = [A::zero(); LANES];
        let (chunks, rest) = upstream.as_chunks_mut::<LANES>();
        let (score_chunks, score_rest) = scores.as_chunks::<LANES>();
        for (d, s) in chunks.iter_mut().zip(score_chunks) {
            for lane in 0..LANES {
                (d[lane], cap[lane]) = self.backward_one(d[lane], s[lane], cap[lane]);
            }
        }
        let mut tail = A::zero();
        for (d, &s) in rest.iter_mut().zip(score_rest) {
            (*d, tail) = self.backward_one(*d, s, tail);
        }
        gradients[0] += cap.iter().fold(tail, |t, &x| t + x);
    }

    fn check(&self, _: [usize; 4]) -> Result<()> {
        if self.cap.is_finite() && self.cap > A::zero() {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                reason: format!("a soft-cap must be positive and finite, got {:?}", self.cap),
            })
        }
    }
}

/// A learnable bias by relative position: `s + table[h, clamp(k − q, −R, R) + R]`
/// for query `q`, key `k` and head `h`, from a table `(heads or 1, 2R + 1)`
/// (T5's and Swin's relative biases, without buckets). Its gradients are the
/// table's, flattened in [`FlexGradients::score`](crate::flex::FlexGradients::score).
///
/// # Examples
///
/// ```
/// use attn::flex::{At, RelativeBias, ScoreMod};
/// use ndarray::array;
///
/// // R = 1: offsets −1, 0, 1 (and beyond, clamped)
/// let bias = RelativeBias::new(array![-1.0_f64, 0.0, 0.5]);
/// let at = |query, key| At { batch: 0, head: 0, query, key };
/// assert_eq!(bias.score(0.0, at(4, 3)), -1.0);
/// assert_eq!(bias.score(0.0, at(0, 9)), 0.5); // clamped to +1
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RelativeBias<A> {
    table: Array2<A>,
    reach: i64,
}

impl<A: Element> RelativeBias<A> {
    /// One table of `2R + 1` entries for every head (`R = (len − 1)/2`; an even
    /// length is an error at the call).
    pub fn new(table: Array1<A>) -> Self {
        let n = table.len();
        Self::per_head(
            table
                .into_shape_with_order((1, n))
                .expect("a row of n entries"),
        )
    }

    /// One table row `(2R + 1,)` per head: `(heads, 2R + 1)`.
    pub fn per_head(table: Array2<A>) -> Self {
        // row-major, for the kernels' one index per score
        let table = table.as_standard_layout().into_owned();
        let reach = (table.ncols() as i64 - 1) / 2;
        RelativeBias { table, reach }
    }

    /// The table, `(heads or 1, 2R + 1)`.
    pub fn table(&self) -> ArrayView2<'_, A> {
        self.table.view()
    }

    /// Where the bias of head `h`, query `q`, key `k` sits in the flattened table.
    #[inline(always)]
    fn index(&self, at: At) -> usize {
        let row = if self.table.nrows() == 1 { 0 } else { at.head };
        let offset = (at.key as i64 - at.query as i64).clamp(-self.reach, self.reach);
        row * self.table.ncols() + (offset + self.reach) as usize
    }
}

impl<A: Element> ScoreMod<A> for RelativeBias<A> {
    #[inline(always)]
    fn score(&self, score: A, at: At) -> A {
        let table = self.table.as_slice().expect("built in standard layout");
        score + table[self.index(at)]
    }

    #[inline(always)]
    fn derivative(&self, _: A, _: At) -> A {
        A::one()
    }

    fn parameters(&self) -> usize {
        self.table.len()
    }

    #[inline(always)]
    fn add_gradients(&self, upstream: A, _: A, at: At, gradients: &mut [A]) {
        gradients[self.index(at)] += upstream;
    }

    fn check(&self, scores: [usize; 4]) -> Result<()> {
        let (rows, cols) = self.table.dim();
        let heads = scores[1];
        if cols % 2 == 1 && (rows == 1 || rows == heads) {
            return Ok(());
        }
        Err(Error::Shape {
            what: "a relative-bias table: (heads or 1, 2R + 1), odd width",
            expected: vec![heads, cols | 1],
            found: vec![rows, cols],
        })
    }
}
