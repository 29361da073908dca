//! Criterion benchmarks of programmable attention (`attn::flex`): what a score
//! modification and a keep predicate cost against the plain fused kernel, and
//! what block skipping saves on a packed batch of documents.
//!
//! `cargo bench --bench flex`; throughput in FLOP/s of the dense call
//! (`4·N²·d·heads` forward, `10·N²·d·heads` backward), so a row that skips
//! blocks shows above the machine's peak.

use std::time::Duration;

use attn::flex::{At, BlockMask, Documents, SoftCap};
use attn::{Mask, ScaledDotProduct};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::Array4;

const HEADS: usize = 8;
const DIM: usize = 64;

fn filled(n: usize, seed: usize) -> Array4<f32> {
    Array4::from_shape_fn((1, HEADS, n, DIM), |(_, h, i, j)| {
        ((h * 7 + i * 31 + j * 17 + seed) % 97) as f32 / 97.0 - 0.5
    })
}

/// The forward of each program against the plain kernel and the built-in mask
/// it stands for.
fn programs(c: &mut Criterion) {
    let mut group = c.benchmark_group("flex_f32_8heads_d64");
    for n in [512usize, 2048] {
        let x = filled(n, 1);
        if n >= 2048 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(6));
        }
        group.throughput(Throughput::Elements((4 * n * n * DIM * HEADS) as u64));
        let every = BlockMask::new(|_: At| true, [1, 1, n, n]).expect("a small mask");
        let causal =
            BlockMask::new(|at: At| at.key <= at.query, [1, 1, n, n]).expect("a small mask");
        let plain = ScaledDotProduct::new();
        let run = |name: &str,
                   f: &dyn Fn() -> Array4<f32>,
                   group: &mut criterion::BenchmarkGroup<'_, _>| {
            group.bench_function(BenchmarkId::new(name, n), |b| b.iter(f));
        };
        run(
            "plain",
            &|| plain.forward_batched(&x, &x, &x).expect("shapes agree"),
            &mut group,
        );
        let identity = plain.clone().with_block_mask(&every);
        run(
            "keep_all_predicate",
            &|| identity.forward(&x, &x, &x).expect("shapes agree"),
            &mut group,
        );
        let built_in = plain.clone().with_mask(Mask::CausalTopLeft);
        run(
            "causal_mask",
            &|| built_in.forward_batched(&x, &x, &x).expect("shapes agree"),
            &mut group,
        );
        let predicate = plain.clone().with_block_mask(&causal);
        run(
            "causal_predicate",
            &|| predicate.forward(&x, &x, &x).expect("shapes agree"),
            &mut group,
        );
        let softcap = plain.clone().with_score_mod(SoftCap::new(20.0_f32));
        run(
            "softcap",
            &|| softcap.forward(&x, &x, &x).expect("shapes agree"),
            &mut group,
        );
    }
    group.finish();
}

/// 8 documents of 512 tokens packed in N = 4096 against the dense N = 4096
/// call, without and with causal masking (the built-in causal mask with the
/// documents' predicate), forward and backward.
fn documents(c: &mut Criterion) {
    let mut group = c.benchmark_group("flex_documents_f32_8heads_d64");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let n = 4096;
    let (x, d_out) = (filled(n, 2), filled(n, 3));
    let docs = Documents::from_lengths(&[512; 8]).expect("lengths add up");
    let blocks = BlockMask::new(docs, [1, 1, n, n]).expect("a small mask");
    for causal in [false, true] {
        let mut dense = ScaledDotProduct::new();
        if causal {
            dense = dense.with_mask(Mask::CausalTopLeft);
        }
        let packed = dense.clone().with_block_mask(&blocks);
        let suffix = if causal { "_causal" } else { "" };
        group.throughput(Throughput::Elements((4 * n * n * DIM * HEADS) as u64));
        group.bench_function(format!("dense{suffix}_forward"), |b| {
            b.iter(|| dense.forward_batched(&x, &x, &x).expect("shapes agree"))
        });
        group.bench_function(format!("documents{suffix}_forward"), |b| {
            b.iter(|| packed.forward(&x, &x, &x).expect("shapes agree"))
        });
        group.throughput(Throughput::Elements((10 * n * n * DIM * HEADS) as u64));
        group.bench_function(format!("dense{suffix}_backward"), |b| {
            b.iter(|| {
                dense
                    .backward_batched(&x, &x, &x, &d_out)
                    .expect("shapes agree")
            })
        });
        group.bench_function(format!("documents{suffix}_backward"), |b| {
            b.iter(|| packed.backward(&x, &x, &x, &d_out).expect("shapes agree"))
        });
    }
    group.finish();
}

criterion_group!(benches, programs, documents);
criterion_main!(benches);
