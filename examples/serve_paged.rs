//! Serving a batch through a paged int8 key/value cache: six prompts of
//! different lengths go through a Llama-like attention layer in one call (no
//! padding), then every sequence decodes 32 tokens in one call per step, and
//! one sequence is forked into a second sample that shares its prompt's
//! blocks. The same run through an f32 paged cache gives the reference: the
//! int8 outputs stay within the cache's stated bound of it, in about a quarter
//! of the memory.
//!
//! The layer's weights are a seeded draw, the token embeddings a fixed
//! pseudo-random pattern (the same tokens for both caches, so their outputs
//! differ only by what the cache stores).
//!
//! `cargo run --release --example serve_paged`

use std::time::Instant;

use attn::{
    CacheElement, Causality, Init, MultiHeadAttention, MultiHeadConfig, PagedKvCache,
    PositionEncoding, Rope, SequenceId,
};
use ndarray::Array2;

const PROMPTS: [usize; 6] = [37, 5, 300, 64, 9, 120];
const STEPS: usize = 32;
const D_MODEL: usize = 512;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const BLOCK: usize = 64;

/// What one run through a cache gives: every output row, in call order, and
/// the seconds the decoding steps took.
struct Run {
    outputs: Vec<Array2<f32>>,
    /// Blocks prompt 2 and its fork still share after decoding.
    shared: usize,
    decode_seconds: f64,
    lengths: Vec<usize>,
    bytes_in_use: usize,
    blocks_in_use: usize,
}

fn main() -> attn::Result<()> {
    let layer = MultiHeadConfig::new(D_MODEL, HEADS)
        .with_kv_heads(KV_HEADS)
        .with_causality(Causality::Causal)
        .with_positions(PositionEncoding::Rope(Rope::new(500_000.0)))
        .random::<f32>(Init::XavierUniform, 0)?;
    let total: usize = PROMPTS.iter().sum();
    let prompts = tokens(total, 0);

    let int8 = run::<i8>(&layer, &prompts)?;
    let exact = run::<f32>(&layer, &prompts)?;

    println!(
        "{} prompts of lengths {PROMPTS:?}, then {STEPS} decoding steps each, one call per step;",
        PROMPTS.len()
    );
    println!("a fork of the longest prompt decodes beside them (sharing its prompt's blocks)\n");
    println!("| sequence | positions |");
    println!("|---|---|");
    for (i, len) in int8.lengths.iter().enumerate() {
        let name = if i < PROMPTS.len() {
            format!("prompt {i}")
        } else {
            "fork of prompt 2".into()
        };
        println!("| {name} | {len} |");
    }
    println!(
        "\nthe fork and prompt 2 still share {} blocks (the prompt's full ones); each wrote its own copy of the last",
        int8.shared
    );
    let positions: usize = int8.lengths.iter().sum();
    let f32_contiguous = positions * KV_HEADS * 2 * (D_MODEL / HEADS) * 4;
    println!(
        "\nmemory: int8 pool in use {:.2} MiB ({} blocks of {BLOCK}), f32 pool in use {:.2} MiB; \
         an f32 cache of exactly these {positions} positions {:.2} MiB: int8 holds them in {:.0} %",
        mib(int8.bytes_in_use),
        int8.blocks_in_use,
        mib(exact.bytes_in_use),
        mib(f32_contiguous),
        100.0 * int8.bytes_in_use as f64 / f32_contiguous as f64,
    );
    let worst = int8
        .outputs
        .iter()
        .zip(&exact.outputs)
        .map(|(a, b)| (a - b).iter().fold(0.0_f32, |m, e| m.max(e.abs())))
        .fold(0.0_f32, f32::max);
    let largest = exact
        .outputs
        .iter()
        .flatten()
        .fold(0.0_f32, |m, x| m.max(x.abs()));
    println!(
        "int8 against f32, same tokens: largest difference {worst:.1e} (outputs up to {largest:.2})"
    );
    println!(
        "decoding, {} sequences per call: int8 {:.0} µs per step, f32 {:.0} µs per step",
        int8.lengths.len(),
        int8.decode_seconds / STEPS as f64 * 1e6,
        exact.decode_seconds / STEPS as f64 * 1e6,
    );
    Ok(())
}

/// `n` token embeddings, a fixed pattern in [-1, 1) for each `seed`.
fn tokens(n: usize, seed: usize) -> Array2<f32> {
    Array2::from_shape_fn((n, D_MODEL), |(i, j)| {
        (((i * 7919 + j * 104_729 + seed * 31) % 1000) as f32 / 1000.0 - 0.5) * 2.0
    })
}

/// The prompts, a fork, and the decoding steps through a paged cache of `E`.
fn run<E: CacheElement<Compute = f32>>(
    layer: &MultiHeadAttention<f32>,
    prompts: &Array2<f32>,
) -> attn::Result<Run> {
    let head_dim = D_MODEL / HEADS;
    let mut cache = PagedKvCache::<E>::new(64, BLOCK, KV_HEADS, head_dim, head_dim)?;
    let mut sequences: Vec<SequenceId> = PROMPTS.iter().map(|_| cache.add_sequence()).collect();
    let mut offsets = vec![0];
    for len in PROMPTS {
        offsets.push(offsets.last().copied().unwrap_or(0) + len);
    }
    // every prompt in one call
    let prefilled = layer.forward_paged(prompts, &offsets, &mut cache, &sequences)?;
    let mut outputs = vec![prefilled];
    // a second sample of prompt 2, sharing its blocks
    sequences.push(cache.fork(sequences[2])?);
    let fork = sequences[PROMPTS.len()];
    assert_eq!(cache.block_table(fork)?, cache.block_table(sequences[2])?);
    let start = Instant::now();
    for step in 0..STEPS {
        // one new token for every sequence
        let each: Vec<usize> = (0..=sequences.len()).collect();
        let out = layer.forward_paged(
            &tokens(sequences.len(), step + 1),
            &each,
            &mut cache,
            &sequences,
        )?;
        outputs.push(out);
    }
    let decode_seconds = start.elapsed().as_secs_f64();
    let lengths = sequences
        .iter()
        .map(|&s| cache.len(s))
        .collect::<attn::Result<Vec<_>>>()?;
    let (parent, child) = (cache.block_table(sequences[2])?, cache.block_table(fork)?);
    let shared = parent.iter().zip(child).filter(|(a, b)| a == b).count();
    Ok(Run {
        outputs,
        shared,
        decode_seconds,
        lengths,
        bytes_in_use: cache.bytes_in_use(),
        blocks_in_use: 64 - cache.free_blocks(),
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1048576.0
}
