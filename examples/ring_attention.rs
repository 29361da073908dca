//! Context-parallel attention across processes: one long causal sequence dealt
//! to the ranks of an MPI job (the zig-zag split), its forward and backward pass
//! computed with the keys and values travelling around the ring.
//!
//! ```text
//! mpirun -np 2 cargo run --release --features mpi --example ring_attention [-- N]
//! ```
//!
//! Each rank prints its share of the sequence, the time it spent computing and
//! the time it waited on messages once its computation was done (the
//! communication that did not hide), and the bytes it sent; rank 0 then checks
//! the gathered output against one process's attention over the whole sequence.

use std::time::Instant;

use attn::ring::{RingAttention, Traffic};
use attn::{Mask, ScaledDotProduct};
use mpi::traits::{Communicator, CommunicatorCollectives};
use ndarray::Array4;
use ndarray_rand::RandomExt;
use ndarray_rand::rand_distr::Uniform;

const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const DIM: usize = 64;

/// Reproducible inputs in [−1, 1): the same whole sequence on every rank.
fn random(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
    let uniform = Uniform::new(-1.0, 1.0).expect("a valid range");
    Array4::random_using(shape, uniform, &mut attn::rng::seeded(seed))
}

/// What one pass cost one rank: seconds in all, computing and waiting, bytes
/// and messages sent.
type Cost = [f64; 5];

fn cost(before: Traffic, after: Traffic, seconds: f64) -> Cost {
    [
        seconds,
        (after.compute - before.compute).as_secs_f64(),
        (after.waiting - before.waiting).as_secs_f64(),
        (after.bytes_sent - before.bytes_sent) as f64,
        (after.messages - before.messages) as f64,
    ]
}

fn line([seconds, compute, waiting, bytes, messages]: Cost) -> String {
    format!(
        "{:6.1} ms (computing {:6.1} ms, waiting {:5.1} ms = {:4.1} %), sent {:6.2} MB in {messages} messages",
        seconds * 1e3,
        compute * 1e3,
        waiting * 1e3,
        100.0 * waiting / seconds,
        bytes / 1e6,
    )
}

fn main() -> Result<(), attn::Error> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("the sequence length, a number"))
        .unwrap_or(8192);
    let universe = mpi::initialize().expect("MPI starts (run under mpirun)");
    let world = universe.world();
    let (rank, ranks) = (world.rank(), world.size());
    let q = random((1, HEADS, n, DIM), 1);
    let k = random((1, KV_HEADS, n, DIM), 2);
    let v = random((1, KV_HEADS, n, DIM), 3);
    let d_out = random((1, HEADS, n, DIM), 4);

    let ring = RingAttention::new(&world).with_causal(true);
    let [q_s, k_s, v_s, d_s] = [&q, &k, &v, &d_out].map(|x| ring.shard(x));
    // each pass timed from a common start, with what it sent and spent
    let timed = |pass: &mut dyn FnMut() -> Result<(), attn::Error>| {
        world.barrier();
        let (before, start) = (ring.traffic(), Instant::now());
        pass().map(|()| cost(before, ring.traffic(), start.elapsed().as_secs_f64()))
    };
    let mut out = None;
    let forward = timed(&mut || {
        out = Some(ring.forward(&q_s, &k_s, &v_s)?);
        Ok(())
    })?;
    let out = out.expect("the forward ran");
    let backward = timed(&mut || ring.backward(&q_s, &k_s, &v_s, &out, &d_s).map(drop))?;
    // every rank's costs to every rank; rank 0 prints them
    let mine: Vec<f64> = [&[q_s.dim().2 as f64][..], &forward, &backward].concat();
    let mut all = vec![0.0; mine.len() * ranks as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    if rank == 0 {
        println!(
            "causal attention over N = {n} positions, {HEADS} query heads sharing {KV_HEADS} key/value heads of {DIM}, f32, {ranks} ranks"
        );
        for (r, row) in all.chunks_exact(mine.len()).enumerate() {
            let cost = |at: usize| -> Cost { row[at..at + 5].try_into().expect("five numbers") };
            println!("rank {r}: {} positions", row[0]);
            println!("  forward  {}", line(cost(1)));
            println!("  backward {}", line(cost(6)));
        }
    }
    let whole = ring.gather(&out.output)?;
    if rank == 0 {
        let single = ScaledDotProduct::new()
            .with_mask(Mask::CausalTopLeft)
            .forward_batched(&q, &k, &v)?;
        let diff = (&whole - &single)
            .iter()
            .fold(0.0_f32, |m, &x| m.max(x.abs()));
        println!("one process over the whole sequence: output differs by at most {diff:.1e}");
    }
    Ok(())
}
