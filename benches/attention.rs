//! End-to-end attention timings.

use attn::scaled_dot_product;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array2;

fn plain(c: &mut Criterion) {
    let mut group = c.benchmark_group("sdpa_plain_f32_d64");
    for n in [3usize, 128, 512] {
        let x = Array2::from_shape_fn((n, 64), |(i, j)| ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.5);
        group.throughput(Throughput::Elements((4 * n * n * 64) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &x, |b, x| {
            b.iter(|| scaled_dot_product(x, x, x).expect("shapes agree"))
        });
    }
    group.finish();
}

criterion_group!(benches, plain);
criterion_main!(benches);
