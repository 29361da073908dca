//! The ring's forward and backward passes.

use std::ops::Range;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::point_to_point::send_receive_into_with_tags;
use mpi::traits::{Communicator, Destination, Source};
use ndarray::{Array3, Array4, ArrayRef4, Axis, Ix4, concatenate, s};

use super::layout::{Layout, layout_of, sight};
use super::{RingAttention, attention, count, pack, unpack, unpack_mut};
use crate::core::problem::check_shapes;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::sdpa::backward::{check_d_out, check_forward};
use crate::{AttentionGradients, AttentionLse, merge_attention};

/// Message tags: the keys and values, and their gradients on the way back.
const KEYS_VALUES: i32 = 0;
const GRADIENTS: i32 = 1;

/// What every step of a pass needs of the call.
struct Call {
    layout: Layout,
    /// `(batch, key/value heads)`.
    kv: (usize, usize),
    d_k: usize,
    d_v: usize,
}

impl Call {
    /// The numbers in rank `rank`'s keys-and-values message.
    fn message_len(&self, rank: usize) -> usize {
        self.kv.0 * self.kv.1 * self.layout.len(rank) * (self.d_k + self.d_v)
    }
}

impl<C: Communicator> RingAttention<'_, C> {
    /// Attention of this rank's queries to the whole sequence's keys and values,
    /// with each query row's log-sum-exp (what [`backward`](Self::backward) takes).
    /// Every rank calls it with its shards (from [`shard`](Self::shard)).
    ///
    /// # Shapes
    ///
    /// `q: (batch, heads, n, d_k)`, `k: (batch, kv_heads, n, d_k)`,
    /// `v: (batch, kv_heads, n, d_v)` with `n` this rank's share of the
    /// sequence → output `(batch, heads, n, d_v)`, lse `(batch, heads, n)`.
    ///
    /// # Errors
    ///
    /// On every rank alike: [`Error::InvalidConfig`] when a rank's shard is not
    /// its share of the sequence or the ranks' shapes differ; when `q`, `k` and
    /// `v` do not fit each other, the errors of
    /// [`forward_batched`](crate::ScaledDotProduct::forward_batched).
    pub fn forward<A: Element + Equivalence>(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
    ) -> Result<AttentionLse<A, Ix4>> {
        let call = self.check(q, k, v, Ok(()))?;
        let queries = call.layout.local_chunks(self.rank());
        let mut parts: Vec<Option<AttentionLse<A, Ix4>>> = vec![None; queries.len()];
        let mut failed = None;
        self.circulate(&call, pack(&[k, v]), |src, message| {
            if failed.is_none()
                && let Err(e) = self.attend(&call, q, &queries, src, message, &mut parts)
            {
                failed = Some(e);
            }
            Duration::ZERO
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let (batch, heads, _, _) = q.dim();
        let parts: Vec<AttentionLse<A, Ix4>> = (parts.into_iter().zip(&queries))
            .map(|(part, (local, _))| {
                part.unwrap_or_else(|| AttentionLse {
                    output: Array4::zeros((batch, heads, local.len(), call.d_v)),
                    lse: Array3::from_elem((batch, heads, local.len()), A::neg_infinity()),
                })
            })
            .collect();
        let outputs: Vec<_> = parts.iter().map(|p| p.output.view()).collect();
        let lses: Vec<_> = parts.iter().map(|p| p.lse.view()).collect();
        Ok(AttentionLse {
            output: concatenate(Axis(2), &outputs).expect("chunks of one shard"),
            lse: concatenate(Axis(2), &lses).expect("chunks of one shard"),
        })
    }

    /// One step of the forward: this rank's queries against rank `src`'s keys
    /// and values, merged into `parts` (one per query chunk).
    fn attend<A: Element>(
        &self,
        call: &Call,
        q: &ArrayRef4<A>,
        queries: &[(Range<usize>, Range<usize>)],
        src: usize,
        message: &[A],
        parts: &mut [Option<AttentionLse<A, Ix4>>],
    ) -> Result<()> {
        let shard = (call.kv.0, call.kv.1, call.layout.len(src));
        let [k, v] = unpack(message, shard, (call.d_k, call.d_v));
        for ((local_q, global_q), part) in queries.iter().zip(parts) {
            let q = q.slice(s![.., .., local_q.clone(), ..]);
            for (local_k, global_k) in call.layout.local_chunks(src) {
                let Some(attn) = attention(sight(global_q, &global_k, call.layout.causal)) else {
                    continue;
                };
                let keys = s![.., .., local_k, ..];
                let new = attn.forward_with_lse(&q, &k.slice(keys), &v.slice(keys))?;
                *part = Some(match part.take() {
                    None => new,
                    Some(old) => merge_attention(&[old, new])?,
                });
            }
        }
        Ok(())
    }

    /// The gradients of this rank's shards given `d_out = ∂loss/∂output` of its
    /// queries and what [`forward`](Self::forward) returned here. Every rank
    /// calls it with its shards.
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward); `forward.output` and `d_out`
    /// `(batch, heads, n, d_v)`, `forward.lse` `(batch, heads, n)` → gradients
    /// shaped like `q`, `k` and `v`.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward), and [`Error::Shape`] when `forward` or
    /// `d_out` do not have the output's shape (as in
    /// [`backward_with_lse`](crate::ScaledDotProduct::backward_with_lse)).
    pub fn backward<A: Element + Equivalence>(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        forward: &AttentionLse<A, Ix4>,
        d_out: &ArrayRef4<A>,
    ) -> Result<AttentionGradients<A, Ix4>> {
        let (batch, heads, n, _) = q.dim();
        let output = [batch, heads, n, v.dim().3];
        let fits = check_d_out(d_out.shape(), &output)
            .and_then(|()| check_forward(forward.output.shape(), forward.lse.shape(), &output));
        let call = self.check(q, k, v, fits)?;
        let (rank, ranks) = (self.rank(), self.ranks());
        let [next, prev] = self.neighbours();
        let queries = call.layout.local_chunks(rank);
        let kept: Vec<AttentionLse<A, Ix4>> = (queries.iter())
            .map(|(local, _)| AttentionLse {
                output: forward
                    .output
                    .slice(s![.., .., local.clone(), ..])
                    .to_owned(),
                lse: forward.lse.slice(s![.., .., local.clone()]).to_owned(),
            })
            .collect();
        let mut d_q = Array4::zeros(q.raw_dim());
        // the gradients of the keys and values this rank holds, travelling with them
        let mut d_kv = vec![A::zero(); call.message_len(rank)];
        let mut failed = None;
        self.circulate(&call, pack(&[k, v]), |src, message| {
            if failed.is_none() {
                let step = Step {
                    call: &call,
                    src,
                    message,
                };
                if let Err(e) = step.gradients(q, &queries, &kept, d_out, &mut d_q, &mut d_kv) {
                    failed = Some(e);
                }
            }
            if ranks == 1 {
                return Duration::ZERO;
            }
            // on to the next rank; after the last step, home to the owner
            let start = Instant::now();
            let mut incoming = vec![A::zero(); call.message_len((src + ranks - 1) % ranks)];
            send_receive_into_with_tags(
                &d_kv[..],
                &self.comm.process_at_rank(next),
                GRADIENTS,
                &mut incoming[..],
                &self.comm.process_at_rank(prev),
                GRADIENTS,
            );
            self.note(Some(size_of_val(&d_kv[..])), Duration::ZERO, Duration::ZERO);
            d_kv = incoming;
            start.elapsed()
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let [d_k, d_v] = unpack(&d_kv, (call.kv.0, call.kv.1, n), (call.d_k, call.d_v));
        Ok(AttentionGradients {
            q: d_q,
            k: d_k.to_owned(),
            v: d_v.to_owned(),
            bias: Vec::new(),
        })
    }

    /// Checks the call on every rank at once (each rank sees every rank's shapes,
    /// so all reach the same verdict and none waits on a rank that gave up):
    /// shapes that fit, alike on every rank but for the shard length, each
    /// shard its rank's share, every message within MPI's count, and `fits`,
    /// what the caller found of its other inputs, on every rank.
    fn check<A>(
        &self,
        q: &ArrayRef4<A>,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        fits: Result<()>,
    ) -> Result<Call> {
        let (lengths, [q, k, v]) = (
            [q.dim().2, k.dim().2, v.dim().2],
            [q.shape(), k.shape(), v.shape()],
        );
        let same = [q[0], q[1], q[3], k[0], k[1], k[3], v[0], v[1], v[3]];
        let shape = [&same[..], &lengths[..], &[usize::from(fits.is_ok())]].concat();
        let table = self.agree(&shape, same.len())?;
        fits?;
        if let Some(rank) = table.iter().position(|row| row[row.len() - 1] == 0) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "ring attention: rank {rank}'s forward or d_out do not fit its shards"
                ),
            });
        }
        let mut shards = Vec::with_capacity(table.len());
        for (rank, row) in table.iter().enumerate() {
            let [n_q, n_k, n_v, _] = row[row.len() - 4..] else {
                unreachable!("three lengths and a verdict per rank")
            };
            if n_k != n_q || n_v != n_q {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "ring attention: rank {rank} holds {n_q} query, {n_k} key and {n_v} value positions; a shard of one sequence has as many of each"
                    ),
                });
            }
            shards.push(n_q);
        }
        // every rank's shapes agree but for lengths, now equal: the same verdict
        check_shapes(q, k, v)?;
        let (batch, d_k, kv_heads, d_v) = (q[0], q[3], k[1], v[3]);
        let call = Call {
            layout: layout_of(&shards, self.causal)?,
            kv: (batch, kv_heads),
            d_k,
            d_v,
        };
        for rank in 0..table.len() {
            count(call.message_len(rank))?;
        }
        Ok(call)
    }

    /// Passes every rank's keys-and-values message around the ring: at step `t`
    /// this rank holds rank `(rank − t) mod R`'s and calls `step(src, message)`
    /// while it travels on to the next rank and the previous rank's arrives.
    fn circulate<A: Element + Equivalence>(
        &self,
        call: &Call,
        mine: Vec<A>,
        mut step: impl FnMut(usize, &[A]) -> Duration,
    ) {
        let (rank, ranks) = (self.rank(), self.ranks());
        let [next, prev] = self.neighbours();
        // a step's own communication (the backward's gradients) is waiting, not computing
        let mut timed_step = |src: usize, message: &[A]| {
            let start = Instant::now();
            let talking = step(src, message);
            self.note(None, start.elapsed().saturating_sub(talking), talking);
        };
        let mut current = mine;
        for t in 0..ranks {
            let src = (rank + ranks - t) % ranks;
            if t + 1 == ranks {
                timed_step(src, &current);
                break;
            }
            let mut incoming = vec![A::zero(); call.message_len((src + ranks - 1) % ranks)];
            mpi::request::scope(|scope| {
                let sent = (self.comm.process_at_rank(next)).immediate_send_with_tag(
                    scope,
                    &current[..],
                    KEYS_VALUES,
                );
                let received = (self.comm.process_at_rank(prev)).immediate_receive_into_with_tag(
                    scope,
                    &mut incoming[..],
                    KEYS_VALUES,
                );
                timed_step(src, &current);
                let start = Instant::now();
                received.wait();
                sent.wait();
                self.note(
                    Some(size_of_val(&current[..])),
                    Duration::ZERO,
                    start.elapsed(),
                );
            });
            current = incoming;
        }
    }

    /// Adds to [`traffic`](Self::traffic): a message of `sent` bytes, if one was.
    fn note(&self, sent: Option<usize>, compute: Duration, waiting: Duration) {
        let mut traffic = self.traffic.get();
        if let Some(bytes) = sent {
            traffic.bytes_sent += bytes as u64;
            traffic.messages += 1;
        }
        traffic.compute += compute;
        traffic.waiting += waiting;
        self.traffic.set(traffic);
    }
}

/// One step of the backward: rank `src`'s keys and values in `message`.
struct Step<'s, A> {
    call: &'s Call,
    src: usize,
    message: &'s [A],
}

impl<A: Element> Step<'_, A> {
    /// Adds this rank's queries' gradients through rank `src`'s keys and values:
    /// to `d_q`, and to `d_kv`, the gradients travelling with those keys and
    /// values.
    fn gradients(
        &self,
        q: &ArrayRef4<A>,
        queries: &[(Range<usize>, Range<usize>)],
        kept: &[AttentionLse<A, Ix4>],
        d_out: &ArrayRef4<A>,
        d_q: &mut Array4<A>,
        d_kv: &mut [A],
    ) -> Result<()> {
        let call = self.call;
        let shard = (call.kv.0, call.kv.1, call.layout.len(self.src));
        let [k, v] = unpack(self.message, shard, (call.d_k, call.d_v));
        let [mut d_k, mut d_v] = unpack_mut(d_kv, shard, (call.d_k, call.d_v));
        for ((local_q, global_q), kept) in queries.iter().zip(kept) {
            let rows = s![.., .., local_q.clone(), ..];
            for (local_k, global_k) in call.layout.local_chunks(self.src) {
                let Some(attn) = attention(sight(global_q, &global_k, call.layout.causal)) else {
                    continue;
                };
                let keys = s![.., .., local_k, ..];
                let g = attn.backward_with_lse(
                    &q.slice(rows),
                    &k.slice(keys),
                    &v.slice(keys),
                    kept,
                    &d_out.slice(rows),
                )?;
                let add = |sum: &mut A, &x: &A| *sum += x;
                d_q.slice_mut(rows).zip_mut_with(&g.q, add);
                d_k.slice_mut(keys).zip_mut_with(&g.k, add);
                d_v.slice_mut(keys).zip_mut_with(&g.v, add);
            }
        }
        Ok(())
    }
}
