//! What users write: a score modification ([`ScoreMod`]) and a keep predicate
//! ([`KeepMod`]), both called with the position of one score ([`At`]).

use std::ops::Range;

use ndarray::NdFloat;

use crate::error::Result;

/// The position of one score: batch row, query head, query row and key, all
/// counted from 0 among the call's own (query `i` of `L`, key `j` of `S`).
///
/// # Examples
///
/// ```
/// use attn::flex::At;
///
/// let at = At { batch: 0, head: 1, query: 5, key: 3 };
/// assert_eq!(at.key as i64 - at.query as i64, -2); // the key is two before the query
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct At {
    /// Batch row.
    pub batch: usize,
    /// Query head (under grouped-query attention, the query head, not its
    /// key/value head).
    pub head: usize,
    /// Query row, `0 .. L`.
    pub query: usize,
    /// Key, `0 .. S`.
    pub key: usize,
}

/// A score modification: a function of one scaled score `s = q·k·scale` and its
/// position, applied inside the fused kernels before the softmax (FlexAttention's
/// `score_mod`), with its derivative for the backward pass.
///
/// The kernels call [`score`](Self::score) once per score they compute,
/// monomorphised for the implementing type (no boxing, no call through a
/// pointer), before any [`Mask::Bias`](crate::Mask::Bias) or ALiBi is added and
/// before masks apply. Return `−∞` to mask a position out; a NaN or `+∞` makes
/// the output row NaN, as the reference path does.
///
/// A modification may have learnable parameters: it says how many
/// ([`parameters`](Self::parameters)) and adds `∂loss/∂θ` through
/// [`add_gradients`](Self::add_gradients); the backward pass returns them in
/// [`FlexGradients::score`](crate::flex::FlexGradients::score).
///
/// Closures: [`score_mod`] makes one from a function and its derivative.
///
/// # Examples
///
/// A relative bias of `−0.1` per position between query and key:
///
/// ```
/// use attn::flex::{At, ScoreMod};
///
/// struct Distance(f64);
///
/// impl ScoreMod<f64> for Distance {
///     fn score(&self, s: f64, at: At) -> f64 {
///         s - self.0 * at.query.abs_diff(at.key) as f64
///     }
///     fn derivative(&self, _: f64, _: At) -> f64 {
///         1.0
///     }
/// }
/// let at = At { batch: 0, head: 0, query: 4, key: 1 };
/// assert!((Distance(0.1).score(1.0, at) - 0.7).abs() < 1e-15);
/// ```
pub trait ScoreMod<A>: Sync {
    /// The modified score of `score` at `at`.
    fn score(&self, score: A, at: At) -> A;

    /// `∂ score(s, at) / ∂s`, at the unmodified score `s`.
    fn derivative(&self, score: A, at: At) -> A;

    /// How many learnable scalars the modification has (0 unless it says).
    fn parameters(&self) -> usize {
        0
    }

    /// Adds `upstream · ∂ score(s, at) / ∂θᵢ` to `gradients[i]` for each
    /// parameter `θᵢ`, where `upstream = ∂loss/∂score(s, at)`. Called once per
    /// attended position in the backward pass; `gradients` holds
    /// [`parameters`](Self::parameters) entries.
    fn add_gradients(&self, upstream: A, score: A, at: At, gradients: &mut [A]) {
        let _ = (upstream, score, at, gradients);
    }

    /// The backward through the modification over one row of scores: the
    /// score `scores[j]` sits at `first` with its key moved on by `j`;
    /// `upstream[j] = ∂loss/∂score(sⱼ)` becomes `∂loss/∂sⱼ`, and each
    /// parameter's `Σⱼ upstream[j]·∂score(sⱼ)/∂θᵢ` is added to `gradients[i]`.
    /// An `upstream` of 0 (a position not attended) must stay 0.
    ///
    /// By default, per score, [`derivative`](Self::derivative) and
    /// [`add_gradients`](Self::add_gradients); a modification whose backward
    /// vectorises over a row (with its own lanes of partial sums) overrides it.
    fn backward_row(&self, first: At, scores: &[A], upstream: &mut [A], gradients: &mut [A])
    where
        A: NdFloat,
    {
        for (j, (d, &s)) in upstream.iter_mut().zip(scores).enumerate() {
            if *d == A::zero() {
                continue;
            }
            let at = At {
                key: first.key + j,
                ..first
            };
            if !gradients.is_empty() {
                self.add_gradients(*d, s, at, gradients);
            }
            *d *= self.derivative(s, at);
        }
    }

    /// Checks that the modification serves scores of shape
    /// `[batch, heads, L, S]` (a table long enough, one entry per head), so
    /// that no call can index out of range: called before every call.
    ///
    /// # Errors
    ///
    /// Whatever the modification finds wrong (the built-ins: [`Error::Shape`](crate::Error::Shape)).
    fn check(&self, scores: [usize; 4]) -> Result<()> {
        let _ = scores;
        Ok(())
    }

    /// Whether this is the identity (the kernels then skip the calls).
    #[doc(hidden)]
    const IDENTITY: bool = false;

    /// [`score`](Self::score) over a row of scores whose first is at `first`
    /// (the keys after it follow): the kernels call this, so a modification
    /// may do once per row what it would otherwise decide per score.
    #[doc(hidden)]
    #[inline(always)]
    fn score_row(&self, first: At, row: &mut [A])
    where
        A: Copy,
    {
        for (j, x) in row.iter_mut().enumerate() {
            let at = At {
                key: first.key + j,
                ..first
            };
            *x = self.score(*x, at);
        }
    }

    /// Whether this leaves every score as it is, as known when a call is
    /// made (the call then runs the plain kernels).
    #[doc(hidden)]
    fn is_identity(&self) -> bool {
        Self::IDENTITY
    }
}

/// A keep predicate: whether the query at `at` may attend to its key
/// (FlexAttention's `mask_mod`). It applies with every other mask; a
/// [`BlockMask`](crate::flex::BlockMask) classifies it once per block so that
/// the kernels skip the blocks it empties and call it only where blocks are
/// partly kept.
///
/// Any `Fn(At) -> bool + Sync` closure is one.
///
/// # Examples
///
/// ```
/// use attn::flex::{At, KeepMod};
///
/// let causal = |at: At| at.key <= at.query;
/// assert!(causal.keep(At { batch: 0, head: 0, query: 2, key: 1 }));
/// assert!(!causal.keep(At { batch: 0, head: 0, query: 1, key: 2 }));
/// ```
pub trait KeepMod: Sync {
    /// Whether the query at `at` may attend to its key.
    fn keep(&self, at: At) -> bool;

    /// Checks that the predicate serves scores of shape `[batch, heads, L, S]`,
    /// so that no call can index out of range: called by
    /// [`BlockMask::new`](crate::flex::BlockMask::new) before any other.
    ///
    /// # Errors
    ///
    /// Whatever the predicate finds wrong (the built-ins: [`Error::Shape`](crate::Error::Shape)).
    fn check(&self, scores: [usize; 4]) -> Result<()> {
        let _ = scores;
        Ok(())
    }

    /// Whether every position is kept (the kernels then skip the calls).
    /// The class of the block of `queries` × `keys` (of batch row `batch`
    /// and head `head`) where the predicate tells it without visiting every
    /// position; `None`, the default, has [`BlockMask::new`](super::BlockMask::new)
    /// call [`keep`](Self::keep) at each. It must agree with `keep`: `Full`
    /// only where every position is kept, `Empty` only where none is
    /// (`Partial` is always right: the kernels then ask `keep`).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::flex::{BlockClass, Documents, KeepMod};
    ///
    /// let docs = Documents::from_lengths(&[100, 100])?;
    /// assert_eq!(docs.block(0, 0, 0..16, 128..192), Some(BlockClass::Empty));
    /// assert_eq!(docs.block(0, 0, 0..16, 0..64), Some(BlockClass::Full));
    /// assert_eq!(docs.block(0, 0, 96..112, 64..128), Some(BlockClass::Partial));
    /// # Ok::<(), attn::Error>(())
    /// ```
    fn block(
        &self,
        batch: usize,
        head: usize,
        queries: Range<usize>,
        keys: Range<usize>,
    ) -> Option<BlockClass> {
        let _ = (batch, head, queries, keys);
        None
    }

    #[doc(hidden)]
    const ALL: bool = false;
}

/// What a keep predicate leaves of one block of [`BLOCK_QUERIES`](super::BLOCK_QUERIES)
/// queries by [`BLOCK_KEYS`](super::BLOCK_KEYS) keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockClass {
    /// Nothing kept: the kernels skip the block.
    Empty,
    /// Some positions kept: the kernels call the predicate per score.
    Partial,
    /// Everything kept: the kernels compute the block without the predicate.
    Full,
}

impl BlockClass {
    /// The class of the union of two blocks' positions.
    pub(crate) fn join(self, other: BlockClass) -> BlockClass {
        if self == other {
            self
        } else {
            BlockClass::Partial
        }
    }
}

impl<F: Fn(At) -> bool + Sync> KeepMod for F {
    #[inline(always)]
    fn keep(&self, at: At) -> bool {
        self(at)
    }
}

/// The unmodified score: what [`FlexAttention`](crate::flex::FlexAttention)
/// uses until [`with_score_mod`](crate::flex::FlexAttention::with_score_mod).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity;

impl<A> ScoreMod<A> for Identity {
    #[inline(always)]
    fn score(&self, score: A, _: At) -> A {
        score
    }

    #[inline(always)]
    fn derivative(&self, score: A, _: At) -> A {
        // never called: the kernels skip an identity
        score
    }

    const IDENTITY: bool = true;
}

/// Every position kept: the predicate of attention without a
/// [`BlockMask`](crate::flex::BlockMask).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAll;

impl KeepMod for KeepAll {
    #[inline(always)]
    fn keep(&self, _: At) -> bool {
        true
    }

    const ALL: bool = true;
}

/// A [`ScoreMod`] made of two closures: the modification and its derivative by
/// the score (see [`score_mod`]).
#[derive(Debug, Clone, Copy)]
pub struct ScoreFn<F, D> {
    score: F,
    derivative: D,
}

/// A [`ScoreMod`] from a closure `score(s, at)` and its derivative
/// `∂score/∂s (s, at)`, without learnable parameters.
///
/// # Examples
///
/// A bias of `0.5` on the first key (an attention sink written as a score):
///
/// ```
/// use attn::flex::{At, ScoreMod, score_mod};
///
/// let first = score_mod(
///     |s: f32, at: At| if at.key == 0 { s + 0.5 } else { s },
///     |_, _| 1.0,
/// );
/// assert_eq!(first.score(1.0, At { batch: 0, head: 0, query: 3, key: 0 }), 1.5);
/// ```
pub fn score_mod<A, F, D>(score: F, derivative: D) -> ScoreFn<F, D>
where
    F: Fn(A, At) -> A + Sync,
    D: Fn(A, At) -> A + Sync,
{
    ScoreFn { score, derivative }
}

impl<A, F, D> ScoreMod<A> for ScoreFn<F, D>
where
    F: Fn(A, At) -> A + Sync,
    D: Fn(A, At) -> A + Sync,
{
    #[inline(always)]
    fn score(&self, score: A, at: At) -> A {
        (self.score)(score, at)
    }

    #[inline(always)]
    fn derivative(&self, score: A, at: At) -> A {
        (self.derivative)(score, at)
    }
}
