//! Where tokens are: ALiBi slopes, T5's relative position buckets, and masks
//! built from sequence lengths.

use ndarray::{Array3, Array4, ArrayRef2};

use crate::element::Storage;
use crate::error::{Error, Result};

/// ALiBi's per-head slopes (Press et al., 2022): for `n` a power of two, the
/// geometric sequence `2^(−8/n), 2^(−16/n), …, 2^(−8)`; otherwise the slopes of
/// the power of two `m` below `n`, then every other slope of `2m`, as the paper's
/// reference code does. Use them with [`Mask::Alibi`](crate::Mask::Alibi).
///
/// # Examples
///
/// ```
/// let slopes = attn::alibi_slopes(8);
/// assert_eq!(slopes, vec![0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
/// assert_eq!(attn::alibi_slopes(6).len(), 6);
/// ```
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    let power_of_two = |m: usize| -> Vec<f64> {
        let start = 2f64.powf(-8.0 / m as f64);
        (1..=m).map(|i| start.powi(i as i32)).collect()
    };
    if n == 0 {
        return Vec::new();
    }
    let m = 1 << (usize::BITS - 1 - n.leading_zeros());
    let mut slopes = power_of_two(m);
    slopes.extend(power_of_two(2 * m).into_iter().step_by(2).take(n - m));
    slopes
}

/// A key-padding keep-mask from sequence lengths: batch `b` may attend to its
/// first `lengths[b]` keys of `s`. Shaped `(batch, 1, 1, S)` so it broadcasts over
/// heads and queries in [`ScaledDotProduct::forward_batched`](crate::ScaledDotProduct::forward_batched)
/// and multi-head attention.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when a length exceeds `s`.
///
/// # Examples
///
/// ```
/// let mask = attn::key_padding(&[3, 1], 3)?;
/// assert_eq!(mask.shape(), &[2, 1, 1, 3]);
/// assert_eq!(mask[[1, 0, 0, 1]], false);
/// # Ok::<(), attn::Error>(())
/// ```
pub fn key_padding(lengths: &[usize], s: usize) -> Result<Array4<bool>> {
    if let Some(&too_long) = lengths.iter().find(|&&n| n > s) {
        return Err(Error::InvalidConfig {
            reason: format!("a sequence of length {too_long} does not fit {s} keys"),
        });
    }
    Ok(Array4::from_shape_fn(
        (lengths.len(), 1, 1, s),
        |(b, _, _, j)| j < lengths[b],
    ))
}

/// Where a batch row stands in its one run of real tokens, slot by slot.
/// Positions count real tokens, and slots all tokens: distances in slots equal
/// distances in positions while a row's real tokens are one run (padding only
/// before and after them), so masks that read distances (ALiBi, sliding
/// windows) see what the sequence alone gives. A row no longer one run has its
/// padding moved before its real tokens ([`Reorder`](crate::core::reorder::Reorder)),
/// except in a sliding cache's ring, whose slots are its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// No real token yet.
    Before,
    /// Real tokens, the last slot one of them.
    Within,
    /// Padding after the real tokens.
    After,
    /// A real token after padding that followed real tokens.
    Broken,
}

impl Run {
    /// The run once a slot more, real or padding, is written.
    pub(crate) fn then(self, real: bool) -> Run {
        match (self, real) {
            (Run::Before, false) => Run::Before,
            (Run::Before | Run::Within, true) => Run::Within,
            (Run::Within | Run::After, false) => Run::After,
            (Run::After | Run::Broken, true) | (Run::Broken, false) => Run::Broken,
        }
    }
}

/// Per row, whether its real tokens are no longer one run once `real`'s flags
/// (`(batch, T)`) follow the row's `runs`.
pub(crate) fn broken_runs(runs: &[Run], real: &ArrayRef2<bool>) -> Vec<bool> {
    (real.rows().into_iter().zip(runs))
        .map(|(flags, &run)| flags.iter().fold(run, |run, &flag| run.then(flag)) == Run::Broken)
        .collect()
}

/// Checks that each row's real tokens are still one run once `real`'s flags
/// (`(batch, T)`) follow the row's `runs`.
///
/// # Errors
///
/// [`Error::InvalidConfig`] naming the first row they are not: in a sliding
/// cache's ring the padding between its tokens would take slots of its window.
pub(crate) fn check_runs(runs: &[Run], real: &ArrayRef2<bool>) -> Result<()> {
    match broken_runs(runs, real).iter().position(|&broken| broken) {
        None => Ok(()),
        Some(row) => Err(Error::InvalidConfig {
            reason: format!(
                "batch row {row} has padding between its real tokens: a sliding cache \
                 keeps a window of slots, and that padding would take some of them from \
                 its real tokens, so it would not give its numbers alone (pad on the \
                 left or the right, use a cache that keeps every position, or give \
                 each sequence its own tokens in a PagedKvCache)"
            ),
        }),
    }
}

/// T5's relative position buckets: the distance `j − i` from query `i` to key `j`
/// falls in one of `num_buckets` buckets, exact for short distances and
/// logarithmic up to `max_distance` (beyond, the last bucket); bidirectional
/// (encoder) buckets give the sign half of them. A learned table of one bias per
/// bucket and head becomes the additive bias of every head's scores
/// ([`bias`](Self::bias)), given to attention as a [`Mask::Bias`](crate::Mask::Bias).
///
/// # Examples
///
/// ```
/// use attn::RelativeBuckets;
///
/// let encoder = RelativeBuckets { num_buckets: 32, max_distance: 128, bidirectional: true };
/// assert_eq!(encoder.bucket(0)?, 0);
/// assert_eq!(encoder.bucket(3)?, 16 + 3); // keys after the query use the upper half
/// assert_eq!(encoder.bucket(-1000)?, 15); // far away: the last bucket of its half
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativeBuckets {
    /// The number of buckets (the table's rows): `relative_attention_num_buckets`.
    pub num_buckets: usize,
    /// Distances from here on share the last bucket: `relative_attention_max_distance`.
    pub max_distance: usize,
    /// Encoder self-attention (`true`): keys before and after the query have
    /// their own buckets. Decoder (`false`): only keys before the query count.
    pub bidirectional: bool,
}

impl RelativeBuckets {
    /// The bucket of the distance `key − query` (Hugging Face's
    /// `_relative_position_bucket`, its logarithm in f32 as there).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `num_buckets` is below 2 (4 when
    /// bidirectional) or `max_distance` not above the exact range.
    ///
    /// # Examples
    ///
    /// ```
    /// let decoder = attn::RelativeBuckets { num_buckets: 8, max_distance: 20, bidirectional: false };
    /// assert_eq!(decoder.bucket(5)?, 0); // later keys: bucket 0 (the causal mask hides them)
    /// assert_eq!(decoder.bucket(-2)?, 2);
    /// assert!(attn::RelativeBuckets { num_buckets: 0, ..decoder }.bucket(-2).is_err());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn bucket(&self, relative: i64) -> Result<usize> {
        self.check()?;
        Ok(self.checked_bucket(relative))
    }

    /// Whether the buckets can be computed: at least one exact bucket per half,
    /// and `max_distance` beyond them.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the sizes.
    ///
    /// # Examples
    ///
    /// ```
    /// let t5 = attn::RelativeBuckets { num_buckets: 32, max_distance: 128, bidirectional: true };
    /// assert!(t5.check().is_ok());
    /// assert!(attn::RelativeBuckets { max_distance: 8, ..t5 }.check().is_err());
    /// ```
    pub fn check(&self) -> Result<()> {
        let half = if self.bidirectional { 2 } else { 1 };
        let exact = self.num_buckets / half / 2;
        if exact == 0 || self.max_distance <= exact {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "relative buckets need at least {} buckets and max_distance above the {exact} exact ones, got {} buckets and max_distance {}",
                    2 * half,
                    self.num_buckets,
                    self.max_distance
                ),
            });
        }
        Ok(())
    }

    /// [`bucket`](Self::bucket) of checked buckets.
    fn checked_bucket(&self, relative: i64) -> usize {
        let mut buckets = self.num_buckets;
        let mut offset = 0;
        let distance = if self.bidirectional {
            buckets /= 2;
            if relative > 0 {
                offset = buckets;
            }
            relative.unsigned_abs()
        } else {
            (-relative.min(0)) as u64
        };
        let max_exact = (buckets / 2) as u64;
        if distance < max_exact {
            return offset + distance as usize;
        }
        let log_ratio = (distance as f32 / max_exact as f32).ln()
            / (self.max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact as usize + (log_ratio * (buckets as u64 - max_exact) as f32) as usize;
        offset + large.min(buckets - 1)
    }

    /// The bias of every head, `bias[h, i, j] = table[bucket(j − pᵢ), h]` for
    /// queries at positions `pᵢ = first_query + i` and keys at `0..keys`.
    ///
    /// # Shapes
    ///
    /// `table: (num_buckets, heads)` (T5's `relative_attention_bias.weight`) →
    /// `(heads, queries, keys)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the table has not `num_buckets` rows;
    /// [`Error::InvalidConfig`] when `num_buckets` is below 2 (4 when
    /// bidirectional) or `max_distance` not above the exact range.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{Mask, RelativeBuckets, ScaledDotProduct};
    /// use ndarray::{Array2, Array4};
    ///
    /// let buckets = RelativeBuckets { num_buckets: 8, max_distance: 20, bidirectional: true };
    /// let table = Array2::from_shape_fn((8, 2), |(b, h)| (b * 2 + h) as f64 / 10.0);
    /// let bias = buckets.bias(&table, 0, 5, 5)?;
    /// assert_eq!(bias.dim(), (2, 5, 5));
    /// let x = Array4::<f64>::ones((1, 2, 5, 4));
    /// let out = ScaledDotProduct::new().with_scale(1.0).with_mask(Mask::bias(&bias)).forward_batched(&x, &x, &x)?;
    /// assert_eq!(out.dim(), (1, 2, 5, 4));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn bias<A: Storage>(
        &self,
        table: &ArrayRef2<A>,
        first_query: usize,
        queries: usize,
        keys: usize,
    ) -> Result<Array3<A>> {
        self.check()?;
        let (rows, heads) = table.dim();
        if rows != self.num_buckets {
            return Err(Error::Shape {
                what: "relative position table: (num_buckets, heads)",
                expected: vec![self.num_buckets, heads],
                found: vec![rows, heads],
            });
        }
        let last_query = first_query.checked_add(queries);
        let count = [heads, queries, keys]
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .filter(|&n| n <= isize::MAX as usize / std::mem::size_of::<A>().max(1));
        let in_range = |n: Option<usize>| n.is_some_and(|n| i64::try_from(n).is_ok());
        if !in_range(last_query) || !in_range(Some(keys)) || count.is_none() {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a relative bias of {heads} heads for {queries} queries from position {first_query} over {keys} keys does not fit in memory"
                ),
            });
        }
        Ok(Array3::from_shape_fn(
            (heads, queries, keys),
            |(h, i, j)| table[[self.checked_bucket(j as i64 - (first_query + i) as i64), h]],
        ))
    }
}
