//! Criterion benchmarks: the matrix products and the softmax the plain path is
//! made of, end-to-end attention, plain against fused, in f32 and f64, and the
//! backward pass, fused against plain.
//!
//! `cargo bench --bench attention`; throughput is reported in FLOP/s
//! (`4·N²·d·heads` per attention call, `10·N²·d·heads` per backward pass (causal:
//! half), `2·N²·d` per product, `N²` per softmax).

use std::time::Duration;

use attn::{Element, Kernel, Mask, ScaledDotProduct, softmax_rows};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array2, Array4};

const HEADS: usize = 8;
const DIM: usize = 64;

fn filled<A: Element>(shape: (usize, usize), seed: usize) -> Array2<A> {
    Array2::from_shape_fn(shape, |(i, j)| {
        A::from_f64(((i * 31 + j * 17 + seed) % 97) as f64 / 97.0 - 0.5)
    })
}

fn matmul_core(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_core_f32");
    for n in [128usize, 512, 2048] {
        let q = filled::<f32>((n, DIM), 1);
        let p = filled::<f32>((n, n), 2);
        group.throughput(Throughput::Elements((2 * n * n * DIM) as u64));
        group.bench_with_input(BenchmarkId::new("q_kt", n), &n, |b, _| {
            b.iter(|| q.dot(&q.t()))
        });
        group.bench_with_input(BenchmarkId::new("p_v", n), &n, |b, _| b.iter(|| p.dot(&q)));
    }
    group.finish();
}

fn softmax(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_rows_f32");
    for n in [128usize, 512, 2048] {
        let s = filled::<f32>((n, n), 3);
        group.throughput(Throughput::Elements((n * n) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &s, |b, s| {
            b.iter(|| softmax_rows(s))
        });
    }
    group.finish();
}

fn end_to_end<A: Element>(c: &mut Criterion, name: &str, sizes: &[usize]) {
    let mut group = c.benchmark_group(name);
    for &n in sizes {
        let heads = if n == 3 { 1 } else { HEADS };
        let dim = if n == 3 { 4 } else { DIM };
        let x = filled::<A>((heads * n, dim), 4)
            .into_shape_with_order((1, heads, n, dim))
            .expect("same size");
        let x: Array4<A> = x;
        if n >= 2048 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(8));
        }
        group.throughput(Throughput::Elements((4 * n * n * dim * heads) as u64));
        for (label, kernel) in [("fused", Kernel::Auto), ("plain", Kernel::Plain)] {
            let attn = ScaledDotProduct::new().with_kernel(kernel);
            group.bench_with_input(BenchmarkId::new(label, n), &x, |b, x| {
                b.iter(|| attn.forward_batched(x, x, x).expect("shapes agree"))
            });
        }
    }
    group.finish();
}

fn attention_f32(c: &mut Criterion) {
    end_to_end::<f32>(c, "sdpa_f32_8heads_d64", &[3, 128, 512, 2048, 4096]);
}

fn attention_f64(c: &mut Criterion) {
    end_to_end::<f64>(c, "sdpa_f64_8heads_d64", &[3, 128, 512, 2048]);
}

/// The gradients of q, k and v (the fused pass includes its own forward pass).
fn backward_f32(c: &mut Criterion) {
    let mut group = c.benchmark_group("backward_f32_8heads_d64");
    for n in [512usize, 2048] {
        let x = |seed| -> Array4<f32> {
            filled::<f32>((HEADS * n, DIM), seed)
                .into_shape_with_order((1, HEADS, n, DIM))
                .expect("same size")
        };
        let (q, d_out) = (x(5), x(6));
        if n >= 2048 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(10));
        }
        for causal in [false, true] {
            let flops = 10 * n * n * DIM * HEADS / if causal { 2 } else { 1 };
            group.throughput(Throughput::Elements(flops as u64));
            let mask = if causal { "causal" } else { "none" };
            let kernels: &[_] = if n >= 2048 {
                &[("fused", Kernel::Auto)] // the plain path holds 8 × N² weights
            } else {
                &[("fused", Kernel::Auto), ("plain", Kernel::Plain)]
            };
            for &(label, kernel) in kernels {
                let mut attn = ScaledDotProduct::new().with_kernel(kernel);
                if causal {
                    attn = attn.with_mask(Mask::CausalTopLeft);
                }
                group.bench_with_input(
                    BenchmarkId::new(format!("{label}_{mask}"), n),
                    &q,
                    |b, q| {
                        b.iter(|| {
                            attn.backward_batched(q, q, q, &d_out)
                                .expect("shapes agree")
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    matmul_core,
    softmax,
    attention_f32,
    attention_f64,
    backward_f32
);
criterion_main!(benches);
