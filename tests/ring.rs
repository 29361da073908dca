//! Ring attention across MPI processes equals one process's attention over the
//! whole sequence: outputs, log-sum-exps and gradients to 1e-12 in f64, causal
//! (the zig-zag split) and not, grouped-query heads, lengths that do not divide
//! evenly among the ranks. Run under `mpirun -np 2` or `-np 3` (`.ci/run` does
//! both); alone it is a ring of one.

mod common;

use attn::ring::RingAttention;
use attn::{Mask, ScaledDotProduct};
use common::{max_abs_diff, random4};
use mpi::traits::Communicator;
use ndarray::Axis;

fn main() {
    let universe = mpi::initialize().expect("MPI starts");
    let world = universe.world();
    let (rank, ranks) = (world.rank(), world.size());
    let mut checks = 0;
    for causal in [false, true] {
        for (n, heads, kv_heads, d_k, d_v) in [
            (37, 4, 2, 8, 5),
            (64, 2, 2, 16, 16),
            (5, 3, 1, 4, 3),
            (2, 2, 1, 4, 3), // a rank of three with no position
        ] {
            let what =
                format!("rank {rank}/{ranks}, causal {causal}, N = {n}, {heads}/{kv_heads} heads");
            let (batch, seed) = (2, n as u64);
            let q = random4((batch, heads, n, d_k), seed);
            let k = random4((batch, kv_heads, n, d_k), seed + 1);
            let v = random4((batch, kv_heads, n, d_v), seed + 2);
            let d_out = random4((batch, heads, n, d_v), seed + 3);
            // one process, the whole sequence
            let mut single = ScaledDotProduct::new();
            if causal {
                single = single.with_mask(Mask::CausalTopLeft);
            }
            let whole = single.forward_with_lse(&q, &k, &v).expect("valid");
            let grads = single
                .backward_with_lse(&q, &k, &v, &whole, &d_out)
                .expect("valid");
            // the ring, each rank its shard
            let ring = RingAttention::new(&world).with_causal(causal);
            let [q_s, k_s, v_s, d_s] = [&q, &k, &v, &d_out].map(|x| ring.shard(x));
            let out = ring.forward(&q_s, &k_s, &v_s).expect("valid");
            let lse_whole = whole.lse.clone().insert_axis(Axis(3));
            let lse_mine = out.lse.clone().insert_axis(Axis(3));
            let e_out = max_abs_diff(&out.output, &ring.shard(&whole.output));
            let e_lse = max_abs_diff(&lse_mine, &ring.shard(&lse_whole));
            assert!(
                e_out < 1e-12 && e_lse < 1e-12,
                "{what}: output {e_out:e}, lse {e_lse:e}"
            );
            let gathered = ring.gather(&out.output).expect("shards of one sequence");
            assert!(
                max_abs_diff(&gathered, &whole.output) < 1e-12,
                "{what}: gathered"
            );
            let after_forward = ring.traffic();
            let g = ring.backward(&q_s, &k_s, &v_s, &out, &d_s).expect("valid");
            // the forward passes keys and values on R − 1 times; the backward
            // again, and their gradients R times (the last home)
            let r = ranks as u64;
            let sends = (after_forward.messages, ring.traffic().messages);
            assert_eq!(sends, (r - 1, 3 * r - 2 - u64::from(r == 1)), "{what}");
            for (name, mine, all) in [
                ("dQ", &g.q, &grads.q),
                ("dK", &g.k, &grads.k),
                ("dV", &g.v, &grads.v),
            ] {
                let e = max_abs_diff(mine, &ring.shard(all));
                assert!(e < 1e-12, "{what}: {name} {e:e}");
            }
            checks += 1;
        }
    }
    // a shard that is not its rank's share: every rank gets the same error
    let ring = RingAttention::new(&world);
    let x = random4((1, 1, 4 + 2 * rank as usize, 4), 9);
    match ring.forward(&x, &x, &x) {
        Err(attn::Error::InvalidConfig { .. }) => assert!(ranks > 1),
        other => assert!(ranks == 1 && other.is_ok(), "rank {rank}: {other:?}"),
    }
    // ranks whose shapes differ beyond the length: every rank gets the same error
    let y = random4((1, 1 + rank as usize % 2, 4, 4), 10);
    let agreed = ring.forward(&y, &y, &y);
    assert_eq!(agreed.is_err(), ranks > 1, "rank {rank}: {agreed:?}");
    println!("ring attention: rank {rank} of {ranks}: {checks} cases equal one process's");
}
