//! Criterion benchmark of step-by-step decoding: one new token per step against a
//! key/value cache of 4096 positions, 8 heads, head_dim 64, f32, against
//! recomputing full causal attention over all 4096 tokens each step.
//!
//! `cargo bench --bench decode`; throughput is reported in tokens per second
//! (one token per call). The cache is a sliding one with a window of 4096, filled
//! before timing, so every step attends over exactly 4096 positions.

use std::time::Duration;

use attn::{Init, KvCache, Mask, MultiHeadConfig, ScaledDotProduct};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array3, Array4};

const CACHED: usize = 4096;
const HEADS: usize = 8;
const DIM: usize = 64;

fn filled(shape: (usize, usize, usize, usize), seed: usize) -> Array4<f32> {
    Array4::from_shape_fn(shape, |(_, h, i, j)| {
        ((h * 13 + i * 31 + j * 17 + seed) % 97) as f32 / 97.0 - 0.5
    })
}

/// A sliding cache of `CACHED` positions with `kv_heads` heads, full.
fn full_cache(kv_heads: usize) -> KvCache<f32> {
    let mut cache =
        KvCache::sliding(1, kv_heads, DIM, DIM, CACHED).expect("a window of 4096 is valid");
    let past = filled((1, kv_heads, CACHED, DIM), 1);
    cache.append(&past, &past).expect("shapes fit the cache");
    cache
}

fn decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_f32_cache4096_8heads_d64");
    group.throughput(Throughput::Elements(1));
    for kv_heads in [HEADS, 2, 1] {
        let mut cache = full_cache(kv_heads);
        let q = filled((1, HEADS, 1, DIM), 2);
        let kv = filled((1, kv_heads, 1, DIM), 3);
        group.bench_function(BenchmarkId::new("cache_step_kv_heads", kv_heads), |b| {
            b.iter(|| cache.attend(&q, &kv, &kv).expect("shapes fit the cache"))
        });
    }

    let d_model = HEADS * DIM;
    let mha = MultiHeadConfig::new(d_model, HEADS)
        .random::<f32>(Init::TorchMultihead, 0)
        .expect("a valid layer");
    let mut cache = KvCache::sliding(1, HEADS, DIM, DIM, CACHED).expect("valid window");
    let prompt = Array3::from_shape_fn((1, CACHED, d_model), |(_, i, j)| {
        ((i * 7 + j * 3) % 89) as f32 / 89.0 - 0.5
    });
    mha.forward_cached(&prompt, &mut cache)
        .expect("the prompt fits the layer");
    let token = prompt.slice(ndarray::s![.., ..1, ..]).to_owned();
    group.bench_function("mha_layer_step_d_model_512", |b| {
        b.iter(|| mha.forward_cached(&token, &mut cache).expect("fits"))
    });

    let x = filled((1, HEADS, CACHED, DIM), 4);
    let causal = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("recompute_full_causal", |b| {
        b.iter(|| causal.forward_batched(&x, &x, &x).expect("shapes agree"))
    });
    group.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
