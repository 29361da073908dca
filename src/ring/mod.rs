//! Context-parallel ("ring") attention across the processes of an MPI
//! communicator: each rank holds a shard of one sequence's queries, keys and
//! values; the key/value shards travel around the ring, each rank attends its
//! queries to every shard as it passes and merges the parts by their
//! log-sum-exp ([`merge_attention`](crate::merge_attention)). The backward sends
//! the key/value shards around again, with their gradients accumulating on the
//! way back to their owners. Under causal masking the sequence is dealt in the
//! zig-zag split (chunks `r` and `2R − 1 − r` of `2R` to rank `r`), so that every
//! rank does the same work. Behind the `mpi` feature.
//!
//! Per ring step a rank of `n` positions computes `2·n²·d·H` flops of causal
//! forward and sends `2·n·d·H_kv·s` bytes, so the transfer hides behind the
//! computation once `n ≥ F·H_kv·s / (B·H)` (flop rate `F`, link bandwidth `B`);
//! the model is in `BENCHMARKS.md`, the measured runs in `benches/log/`, and
//! [`traffic`](RingAttention::traffic) reports what a rank sent and waited.
//!
//! Within a rank, attention runs on its threads as in one process (rayon's
//! pool; `RAYON_NUM_THREADS=1` for a rank per core).
//!
//! Results equal one process's [`forward_with_lse`](crate::ScaledDotProduct::forward_with_lse)
//! and [`backward_with_lse`](crate::ScaledDotProduct::backward_with_lse) on the whole
//! sequence up to rounding (`tests/ring.rs`, run under `mpirun`).

mod layout;
mod passes;

use std::cell::Cell;
use std::time::Duration;

use mpi::datatype::{Equivalence, PartitionMut};
use mpi::traits::{Communicator, CommunicatorCollectives};
use ndarray::{Array4, ArrayRef4, ArrayView4, ArrayViewMut4, Axis, concatenate, s};

use crate::element::Element;
use crate::error::{Error, Result};
use crate::{Mask, ScaledDotProduct};
use layout::{Layout, Sight, layout_of};

/// Attention over one sequence whose queries, keys and values are sharded
/// across the ranks of `comm`, each rank calling with its own shards, all ranks
/// together (a collective call).
///
/// # Examples
///
/// ```
/// use attn::ring::RingAttention;
/// use attn::{Mask, ScaledDotProduct};
/// use ndarray::Array4;
///
/// // under `mpirun -np R` each process is a rank; alone, a ring of one
/// let universe = mpi::initialize().expect("MPI");
/// let world = universe.world();
/// let ring = RingAttention::new(&world).with_causal(true);
/// let x = Array4::from_shape_fn((1, 2, 100, 8), |(_, h, i, j)| ((h + i * j) % 7) as f64 / 7.0);
/// let mine = ring.shard(&x); // this rank's positions of the whole sequence
/// let out = ring.forward(&mine, &mine, &mine)?;
/// let whole = ring.gather(&out.output)?; // every rank's rows, in order
/// let one = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft).forward_batched(&x, &x, &x)?;
/// assert!((&whole - &one).iter().all(|d| d.abs() < 1e-12));
/// # Ok::<(), attn::Error>(())
/// ```
pub struct RingAttention<'c, C> {
    comm: &'c C,
    causal: bool,
    traffic: Cell<Traffic>,
}

/// What one rank of a [`RingAttention`] has sent and spent since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// Bytes sent to the next rank.
    pub bytes_sent: u64,
    /// Messages sent to the next rank.
    pub messages: u64,
    /// Time spent computing attention on the shards held.
    pub compute: Duration,
    /// Time spent waiting on messages once a step's computation was done: the
    /// communication that did not hide behind it.
    pub waiting: Duration,
}

/// Rank `rank`'s share of `x` along the sequence axis.
fn shard_of<A: Clone>(x: &ArrayRef4<A>, layout: &Layout, rank: usize) -> Array4<A> {
    let parts: Vec<_> = (layout.chunks(rank).into_iter())
        .map(|chunk| x.slice(s![.., .., chunk, ..]))
        .collect();
    concatenate(Axis(2), &parts).expect("chunks of one array")
}

/// Keys and values (and their gradients) in one message, in standard order.
fn pack<A: Copy>(arrays: &[&ArrayRef4<A>]) -> Vec<A> {
    arrays.iter().flat_map(|x| x.iter().copied()).collect()
}

/// The keys-then-values message of a shard of `len` positions as views
/// (widths `d_k` and `d_v`).
fn unpack<A>(
    buf: &[A],
    (batch, heads, len): (usize, usize, usize),
    (d_k, d_v): (usize, usize),
) -> [ArrayView4<'_, A>; 2] {
    let (k, v) = buf.split_at(batch * heads * len * d_k);
    [
        ArrayView4::from_shape((batch, heads, len, d_k), k).expect("the message holds the keys"),
        ArrayView4::from_shape((batch, heads, len, d_v), v).expect("and the values"),
    ]
}

/// The same, writable.
fn unpack_mut<A>(
    buf: &mut [A],
    (batch, heads, len): (usize, usize, usize),
    (d_k, d_v): (usize, usize),
) -> [ArrayViewMut4<'_, A>; 2] {
    let (k, v) = buf.split_at_mut(batch * heads * len * d_k);
    [
        ArrayViewMut4::from_shape((batch, heads, len, d_k), k).expect("the message holds the keys"),
        ArrayViewMut4::from_shape((batch, heads, len, d_v), v).expect("and the values"),
    ]
}

/// Attention as `sight` allows, with the default scale.
fn attention<A: Element>(sight: Sight) -> Option<ScaledDotProduct<'static, A>> {
    let plain = ScaledDotProduct::new();
    match sight {
        Sight::Nothing => None,
        Sight::All => Some(plain),
        Sight::Causal => Some(plain.with_mask(Mask::CausalTopLeft)),
        Sight::Some(keep) => Some(plain.with_mask(Mask::keep_owned(keep))),
    }
}

impl<'c, C: Communicator> RingAttention<'c, C> {
    /// Unmasked attention over the ranks of `comm`, each holding a contiguous
    /// shard of the sequence (rank `r` of `R`: positions `r·N/R .. (r+1)·N/R`).
    pub fn new(comm: &'c C) -> Self {
        RingAttention {
            comm,
            causal: false,
            traffic: Cell::default(),
        }
    }

    /// Causal attention (query `i` sees keys `j ≤ i`) when `causal`, with the
    /// sequence in the zig-zag split, which [`shard`](Self::shard) makes.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// What this rank has sent and spent in [`forward`](Self::forward) and
    /// [`backward`](Self::backward) calls so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.comm.size() as usize
    }

    /// The ranks this one sends to and receives from, `[next, previous]`.
    fn neighbours(&self) -> [mpi::Rank; 2] {
        let (rank, ranks) = (self.comm.rank(), self.comm.size());
        [(rank + 1) % ranks, (rank + ranks - 1) % ranks]
    }

    /// This rank's shard of a whole sequence `x` of shape `(batch, heads, N, d)`:
    /// its positions along axis 2, in the layout this attention uses.
    ///
    /// # Shapes
    ///
    /// `(batch, heads, N, d)` → `(batch, heads, n, d)`, `n` this rank's share.
    pub fn shard<A: Clone>(&self, x: &ArrayRef4<A>) -> Array4<A> {
        let layout = Layout {
            n: x.dim().2,
            ranks: self.ranks(),
            causal: self.causal,
        };
        shard_of(x, &layout, self.rank())
    }

    /// Every rank's shard as one sequence again, on every rank (an all-gather):
    /// the inverse of [`shard`](Self::shard).
    ///
    /// # Shapes
    ///
    /// `(batch, heads, n, d)` → `(batch, heads, N, d)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the ranks' shards differ in anything but
    /// their length, or a length is not that rank's share.
    pub fn gather<A: Element + Equivalence>(&self, shard: &ArrayRef4<A>) -> Result<Array4<A>> {
        let (batch, heads, n, d) = shard.dim();
        let table = self.agree(&[batch, heads, d, n], 3)?;
        let layout = layout_of(
            &table.iter().map(|row| row[3]).collect::<Vec<_>>(),
            self.causal,
        )?;
        let counts = (0..self.ranks())
            .map(|r| count(batch * heads * layout.len(r) * d))
            .collect::<Result<Vec<_>>>()?;
        let displs = counts
            .iter()
            .scan(0, |at, &c| Some(std::mem::replace(at, *at + c)))
            .collect::<Vec<_>>();
        let mut all = vec![A::zero(); batch * heads * layout.n * d];
        let mine = pack(&[shard]);
        let mut partition = PartitionMut::new(&mut all[..], counts, displs);
        self.comm
            .all_gather_varcount_into(&mine[..], &mut partition);
        // each rank's block holds its chunks in order; put every chunk in place
        let mut whole = Array4::zeros((batch, heads, layout.n, d));
        let mut at = 0;
        for rank in 0..self.ranks() {
            let len = layout.len(rank);
            let size = batch * heads * len * d;
            let block = ArrayView4::from_shape((batch, heads, len, d), &all[at..at + size])
                .expect("a rank's block is its shard");
            for (local, global) in layout.local_chunks(rank) {
                whole
                    .slice_mut(s![.., .., global, ..])
                    .assign(&block.slice(s![.., .., local, ..]));
            }
            at += size;
        }
        Ok(whole)
    }

    /// Every rank's `shape`, checked to agree with this rank's in all but the
    /// entries from `own` on (which may differ by rank, as shard lengths do).
    fn agree(&self, shape: &[usize], own: usize) -> Result<Vec<Vec<usize>>> {
        let mine: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        let mut all = vec![0u64; mine.len() * self.ranks()];
        self.comm.all_gather_into(&mine[..], &mut all[..]);
        let table: Vec<Vec<usize>> = all
            .chunks_exact(mine.len())
            .map(|row| row.iter().map(|&x| x as usize).collect())
            .collect();
        if let Some((rank, row)) = table
            .iter()
            .enumerate()
            .find(|(_, row)| row[..own] != table[0][..own])
        {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "ring attention: rank {rank}'s shapes {row:?} differ from rank 0's {:?} beyond the shard lengths",
                    table[0]
                ),
            });
        }
        Ok(table)
    }
}

/// `n` as an MPI count.
fn count(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::InvalidConfig {
        reason: format!(
            "ring attention: a message of {n} numbers is past MPI's count limit ({})",
            i32::MAX
        ),
    })
}
