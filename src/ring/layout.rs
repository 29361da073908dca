//! How one sequence is dealt to the ranks of a ring, and what a chunk of
//! queries sees of a chunk of keys.

use std::ops::Range;

use ndarray::Array2;

use crate::error::{Error, Result};

/// A sequence of `n` positions dealt to `ranks` ranks: contiguous shards, or,
/// under causal masking, the zig-zag split: the sequence in `2·ranks` chunks,
/// rank `r` holding chunks `r` and `2·ranks − 1 − r`, so that every rank's
/// queries see as many keys as any other's (equal work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) n: usize,
    pub(crate) ranks: usize,
    pub(crate) causal: bool,
}

impl Layout {
    /// The positions of rank `rank`'s chunks, in the order its shard holds them.
    pub(crate) fn chunks(&self, rank: usize) -> Vec<Range<usize>> {
        // i·n/parts without overflow: i ≤ parts, so the quotient fits
        let cut = |parts: usize, i: usize| (i as u128 * self.n as u128 / parts as u128) as usize;
        if self.causal {
            let parts = 2 * self.ranks;
            let mirror = parts - 1 - rank;
            vec![
                cut(parts, rank)..cut(parts, rank + 1),
                cut(parts, mirror)..cut(parts, mirror + 1),
            ]
        } else {
            let shard = cut(self.ranks, rank)..cut(self.ranks, rank + 1);
            vec![shard]
        }
    }

    /// How many positions rank `rank` holds.
    pub(crate) fn len(&self, rank: usize) -> usize {
        self.chunks(rank).iter().map(ExactSizeIterator::len).sum()
    }

    /// Rank `rank`'s chunks as ranges of its own shard, with their positions in
    /// the sequence.
    pub(crate) fn local_chunks(&self, rank: usize) -> Vec<(Range<usize>, Range<usize>)> {
        let mut start = 0;
        self.chunks(rank)
            .into_iter()
            .map(|global| {
                let local = start..start + global.len();
                start = local.end;
                (local, global)
            })
            .collect()
    }
}

/// What queries at the positions `queries` see of keys at the positions `keys`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Sight {
    /// Every key.
    All,
    /// The same positions, query `i` seeing keys `j ≤ i`.
    Causal,
    /// No key (or no query, or no key at all).
    Nothing,
    /// Some keys of some queries: `true` where query `i` may see key `j`.
    Some(Array2<bool>),
}

/// What `queries` see of `keys`: everything, or under causal masking the keys
/// at positions up to the query's own.
pub(crate) fn sight(queries: &Range<usize>, keys: &Range<usize>, causal: bool) -> Sight {
    if queries.is_empty() || keys.is_empty() {
        Sight::Nothing
    } else if !causal || keys.end <= queries.start + 1 {
        Sight::All
    } else if keys.start > queries.end - 1 {
        Sight::Nothing
    } else if keys == queries {
        Sight::Causal
    } else {
        Sight::Some(Array2::from_shape_fn(
            (queries.len(), keys.len()),
            |(i, j)| keys.start + j <= queries.start + i,
        ))
    }
}

/// The sequence's length from every rank's shard length, checked against the
/// layout each would have.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when a rank's shard is not its share.
pub(crate) fn layout_of(lengths: &[usize], causal: bool) -> Result<Layout> {
    let n = lengths.iter().try_fold(0usize, |n, &l| n.checked_add(l));
    let n = n.ok_or_else(|| Error::InvalidConfig {
        reason: "ring attention: the shards' lengths overflow usize".to_string(),
    })?;
    let layout = Layout {
        n,
        ranks: lengths.len(),
        causal,
    };
    for (rank, &len) in lengths.iter().enumerate() {
        let want = layout.len(rank);
        if len != want {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "ring attention: rank {rank} holds {len} positions of a sequence of {n}; its share is {want} (split the sequence with RingAttention::shard)"
                ),
            });
        }
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_sequence_once() {
        for (n, ranks, causal) in [(10, 3, false), (10, 3, true), (7, 4, true), (2, 3, true)] {
            let layout = Layout { n, ranks, causal };
            let mut seen = vec![0; n];
            for rank in 0..ranks {
                for chunk in layout.chunks(rank) {
                    chunk.for_each(|p| seen[p] += 1);
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{layout:?}: {seen:?}");
        }
        // zig-zag: rank 0 holds the first and the last chunk
        let layout = Layout {
            n: 8,
            ranks: 2,
            causal: true,
        };
        assert_eq!(layout.chunks(0), vec![0..2, 6..8]);
        assert_eq!(layout.local_chunks(1), vec![(0..2, 2..4), (2..4, 4..6)]);
    }

    #[test]
    fn sight_follows_causality() {
        assert_eq!(sight(&(4..8), &(0..4), true), Sight::All);
        assert_eq!(sight(&(4..8), &(8..12), true), Sight::Nothing);
        assert_eq!(sight(&(4..8), &(4..8), true), Sight::Causal);
        assert_eq!(sight(&(4..8), &(8..12), false), Sight::All);
        assert_eq!(sight(&(4..4), &(0..4), false), Sight::Nothing);
        let Sight::Some(keep) = sight(&(4..6), &(3..7), true) else {
            panic!("a partial overlap")
        };
        assert_eq!(keep.row(0).to_vec(), [true, true, false, false]);
        assert_eq!(keep.row(1).to_vec(), [true, true, true, false]);
    }

    #[test]
    fn shard_lengths_must_be_each_ranks_share() {
        assert_eq!(layout_of(&[3, 3, 4], false).expect("shares").n, 10);
        assert!(layout_of(&[4, 3, 3], false).is_err());
        assert_eq!(layout_of(&[4, 4], true).expect("shares").n, 8);
    }
}
