//! Criterion benchmark of step-by-step decoding: one new token per step against a
//! key/value cache of 4096 positions, 8 heads, head_dim 64, in f32 and in the half
//! types (a bf16 or f16 cache), against recomputing full causal attention over all
//! 4096 tokens each step.
//!
//! A layer's step with eight sequences decoding together (1024 cached positions
//! each), whose projections take eight rows at a time.
//!
//! Then the paged cache (`PagedKvCache`) at the same length: f32, bf16 and
//! int8 pools, blocks of 256, 64 and 16 positions; each step forks the
//! sequence (sharing every block), attends with one new token and frees the
//! fork, so each step attends over 4097 positions.
//!
//! Then split-key decoding (one sequence, 32 768 cached positions, 1 and 2
//! threads) and variable-length prefill (8 sequences packed in one call against
//! one call each).
//!
//! `cargo bench --bench decode`; throughput is reported in tokens per second
//! (one token per call). The cache is a sliding one with a window of 4096, filled
//! before timing, so every step attends over exactly 4096 positions.

use std::time::Duration;

use attn::half::{bf16, f16};
use attn::{
    CacheElement, Element, Init, KvCache, Mask, MultiHeadConfig, PagedKvCache, ScaledDotProduct,
    Storage,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array3, Array4};

const CACHED: usize = 4096;
const HEADS: usize = 8;
const DIM: usize = 64;
/// Sequences decoding together in the batched layer step, and their cached positions.
const BATCH: usize = 8;
const BATCH_CACHED: usize = 1024;

fn filled<A: Storage>(shape: (usize, usize, usize, usize), seed: usize) -> Array4<A> {
    Array4::from_shape_fn(shape, |(_, h, i, j)| {
        let x = ((h * 13 + i * 31 + j * 17 + seed) % 97) as f64 / 97.0 - 0.5;
        A::from_compute(<A::Compute as Element>::from_f64(x))
    })
}

/// A sliding cache of `CACHED` positions with `kv_heads` heads, full.
fn full_cache<A: Storage>(kv_heads: usize) -> KvCache<A> {
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
        let mut cache = full_cache::<f32>(kv_heads);
        let q = filled::<f32>((1, HEADS, 1, DIM), 2);
        let kv = filled::<f32>((1, kv_heads, 1, DIM), 3);
        group.bench_function(BenchmarkId::new("cache_step_kv_heads", kv_heads), |b| {
            b.iter(|| cache.attend(&q, &kv, &kv).expect("shapes fit the cache"))
        });
    }
    half_steps::<bf16>(&mut group, "bf16_cache_step_kv_heads");
    half_steps::<f16>(&mut group, "f16_cache_step_kv_heads");

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

    // eight sequences decoding together: each step projects 8 rows
    let mut cache = KvCache::sliding(BATCH, HEADS, DIM, DIM, BATCH_CACHED).expect("valid window");
    let prompts = Array3::from_shape_fn((BATCH, BATCH_CACHED, d_model), |(b, i, j)| {
        ((b * 5 + i * 7 + j * 3) % 89) as f32 / 89.0 - 0.5
    });
    mha.forward_cached(&prompts, &mut cache)
        .expect("the prompts fit the layer");
    let tokens = prompts.slice(ndarray::s![.., ..1, ..]).to_owned();
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("mha_layer_step_batch_8_cache_1024_d_model_512", |b| {
        b.iter(|| mha.forward_cached(&tokens, &mut cache).expect("fits"))
    });
    group.throughput(Throughput::Elements(1));

    let x = filled::<f32>((1, HEADS, CACHED, DIM), 4);
    let causal = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("recompute_full_causal", |b| {
        b.iter(|| causal.forward_batched(&x, &x, &x).expect("shapes agree"))
    });
    group.finish();
}

/// One step over a half-precision cache, 8 and 2 key/value heads.
fn half_steps<H: Storage>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
) {
    for kv_heads in [HEADS, 2] {
        let mut cache = full_cache::<H>(kv_heads);
        let q = filled::<H>((1, HEADS, 1, DIM), 2);
        let kv = filled::<H>((1, kv_heads, 1, DIM), 3);
        group.bench_function(BenchmarkId::new(name, kv_heads), |b| {
            b.iter(|| cache.attend(&q, &kv, &kv).expect("shapes fit the cache"))
        });
    }
}

/// One decoding step over a paged cache of `CACHED` positions in blocks of
/// `block`, stored as `E`: fork, attend, free.
fn paged_step<E: CacheElement<Compute = f32>>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    block: usize,
) {
    let mut cache =
        PagedKvCache::<E>::new(CACHED / block + 2, block, HEADS, DIM, DIM).expect("a valid pool");
    let sequence = cache.add_sequence();
    let past = filled::<f32>((1, HEADS, CACHED, DIM), 1).index_axis_move(ndarray::Axis(0), 0);
    cache
        .append(sequence, &past, &past)
        .expect("the pool holds the sequence");
    let q = filled::<f32>((1, HEADS, 1, DIM), 2).index_axis_move(ndarray::Axis(0), 0);
    let kv = filled::<f32>((1, HEADS, 1, DIM), 3).index_axis_move(ndarray::Axis(0), 0);
    group.bench_function(BenchmarkId::new(name, block), |b| {
        b.iter(|| {
            let step = cache.fork(sequence).expect("a live sequence");
            let out = cache
                .attend(step, &q, &kv, &kv)
                .expect("room for one block");
            cache.free(step).expect("a live sequence");
            out
        })
    });
}

fn paged(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_paged_cache4096_8heads_d64");
    group.throughput(Throughput::Elements(1));
    for block in [256, 64] {
        paged_step::<f32>(&mut group, "f32_block", block);
        paged_step::<bf16>(&mut group, "bf16_block", block);
    }
    for block in [256, 64, 16] {
        paged_step::<i8>(&mut group, "int8_block", block);
    }
    group.finish();
}

/// Split-key decoding: one sequence's step over 32 768 cached positions on 1
/// and on 2 threads (its keys cut into parts that run in parallel and merge by
/// their log-sum-exp), 8 query heads over 8 or 1 key/value heads.
fn split_keys(c: &mut Criterion) {
    const LONG: usize = 32_768;
    let mut group = c.benchmark_group("decode_f32_cache32768_8heads_d64_split_keys");
    group.throughput(Throughput::Elements(1));
    for kv_heads in [HEADS, 1] {
        let mut cache = KvCache::<f32>::sliding(1, kv_heads, DIM, DIM, LONG).expect("valid");
        let past = filled::<f32>((1, kv_heads, LONG, DIM), 1);
        cache.append(&past, &past).expect("shapes fit the cache");
        let q = filled::<f32>((1, HEADS, 1, DIM), 2);
        let kv = filled::<f32>((1, kv_heads, 1, DIM), 3);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let id = format!("kv_heads_{kv_heads}_threads_{threads}");
            group.bench_function(id, |b| {
                b.iter(|| pool.install(|| cache.attend(&q, &kv, &kv).expect("fits")))
            });
        }
    }
    group.finish();
}

/// Variable-length prefill: 8 sequences of 64 to 4096 tokens through a causal
/// layer (d_model 512, 8 heads), packed in one call against one call each.
fn varlen_prefill(c: &mut Criterion) {
    const LENGTHS: [usize; 8] = [64, 256, 512, 1024, 1536, 2048, 3072, 4096];
    let mut group = c.benchmark_group("prefill_f32_8_sequences_64_to_4096_d_model_512");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    let d_model = HEADS * DIM;
    let mha = MultiHeadConfig::new(d_model, HEADS)
        .with_causality(attn::Causality::Causal)
        .random::<f32>(Init::XavierUniform, 0)
        .expect("a valid layer");
    let total: usize = LENGTHS.iter().sum();
    let x = ndarray::Array2::from_shape_fn((total, d_model), |(i, j)| {
        ((i * 7 + j * 3) % 89) as f32 / 89.0 - 0.5
    });
    let mut offsets = vec![0];
    for length in LENGTHS {
        offsets.push(offsets[offsets.len() - 1] + length);
    }
    group.bench_function("packed", |b| {
        b.iter(|| mha.forward_packed(&x, &offsets).expect("valid"))
    });
    group.bench_function("each_alone", |b| {
        b.iter(|| {
            for w in offsets.windows(2) {
                let one = x.slice(ndarray::s![w[0]..w[1], ..]);
                mha.forward(&one, &one, &one, &[]).expect("valid");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, decode_step, paged, split_keys, varlen_prefill);
criterion_main!(benches);
