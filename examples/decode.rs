//! Step-by-step decoding with a key/value cache. A toy prompt of five tokens fills
//! the cache in one call; then each new token is one step: its keys and values are
//! appended and its query attends to every cached position, itself included. For
//! every step the example prints each head's attention weights over the cached
//! positions, and checks the steps against causal attention recomputed over the
//! whole sequence.
//!
//! Two heads of width 4; queries and keys carry rotary position embeddings (RoPE)
//! applied at their absolute positions, so cached keys keep where they were. The
//! embeddings and weights are `torch.manual_seed(0)` draws (the
//! weights divided by √d_model).
//!
//! `cargo run --release --example decode [OUTPUT_DIR]`

mod common;

use attn::plot::{Figure, Heatmap};
use attn::rng::TorchGenerator;
use attn::{KvCache, Mask, QkvProjection, RopeLayout, ScaledDotProduct, rope};
use ndarray::{Array2, Array4, ArrayRef2, Axis, s};

pub const TOKENS: [&str; 8] = ["the", "cat", "sat", "on", "the", "mat", "and", "slept"];
pub const PROMPT: usize = 5;
pub const HEADS: usize = 2;
pub const HEAD_DIM: usize = 4;
const D_MODEL: usize = HEADS * HEAD_DIM;

/// One decoding step.
pub struct Step {
    /// The new token.
    pub token: &'static str,
    /// Its weights over the cached positions, `(heads, positions so far)`.
    pub weights: Array2<f32>,
    /// Its output per head, `(1, heads, 1, head_dim)`.
    pub output: Array4<f32>,
}

/// The whole run.
pub struct Decode {
    /// The prompt's outputs from the call that filled the cache, `(1, heads, 5, head_dim)`.
    pub prompt: Array4<f32>,
    pub steps: Vec<Step>,
    /// Causal attention over all eight tokens at once, `(1, heads, 8, head_dim)`.
    pub recomputed: Array4<f32>,
    /// The cache after the last step.
    pub cache: KvCache<f32>,
}

/// `(n, heads·head_dim)` rows → `(1, heads, n, head_dim)`.
fn split_heads(x: &ArrayRef2<f32>) -> Array4<f32> {
    Array4::from_shape_fn((1, HEADS, x.nrows(), HEAD_DIM), |(_, h, i, j)| {
        x[[i, h * HEAD_DIM + j]]
    })
}

/// RoPE on every head of `x: (n, heads·head_dim)`, row `r` at position `first + r`.
fn rotated(x: &ArrayRef2<f32>, first: usize) -> attn::Result<Array2<f32>> {
    let positions: Vec<usize> = (first..first + x.nrows()).collect();
    let mut out = x.to_owned();
    for h in 0..HEADS {
        let columns = s![.., h * HEAD_DIM..(h + 1) * HEAD_DIM];
        let head = rope(
            &x.slice(columns),
            &positions,
            10_000.0,
            RopeLayout::HalfSplit,
        )?;
        out.slice_mut(columns).assign(&head);
    }
    Ok(out)
}

/// Runs the prompt and the steps.
pub fn decode() -> attn::Result<Decode> {
    let mut torch = TorchGenerator::manual_seed(0);
    let x = torch.randn((TOKENS.len(), D_MODEL));
    // weights of variance 1/d_model, so scores stay of order 1
    let mut weight = || torch.randn((D_MODEL, D_MODEL)) / (D_MODEL as f32).sqrt();
    let projection = QkvProjection::new(weight(), weight(), weight())?;
    // q, k, v of the tokens `range`, heads split, RoPE at their positions
    let qkv = |from: usize, to: usize| -> attn::Result<[Array4<f32>; 3]> {
        let rows = x.slice(s![from..to, ..]);
        Ok([
            split_heads(&rotated(&projection.query(&rows)?, from)?),
            split_heads(&rotated(&projection.key(&rows)?, from)?),
            split_heads(&projection.value(&rows)?),
        ])
    };

    let mut cache = KvCache::new(1, HEADS, HEAD_DIM, HEAD_DIM);
    let [q, k, v] = qkv(0, PROMPT)?;
    let prompt = cache.attend(&q, &k, &v)?;
    let mut steps = Vec::new();
    for (position, &token) in TOKENS.iter().enumerate().skip(PROMPT) {
        let [q, k, v] = qkv(position, position + 1)?;
        let output = cache.attend(&q, &k, &v)?;
        // the same step's weights, over the cache it attended to
        let weights = ScaledDotProduct::new()
            .with_mask(Mask::CausalBottomRight)
            .forward_batched_with_weights(&q, &cache.keys(), &cache.values())?
            .weights
            .index_axis_move(Axis(0), 0)
            .index_axis_move(Axis(1), 0);
        steps.push(Step {
            token,
            weights,
            output,
        });
    }

    let [q, k, v] = qkv(0, TOKENS.len())?;
    let recomputed = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .forward_batched(&q, &k, &v)?;
    Ok(Decode {
        prompt,
        steps,
        recomputed,
        cache,
    })
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(include_str!("decode.rs"), &[]);
    let run = decode()?;
    println!(
        "prompt {:?} fills the cache: {} positions\n",
        &TOKENS[..PROMPT],
        PROMPT
    );
    let heads: Vec<String> = (0..HEADS).map(|h| format!("head {h}")).collect();
    let mut panels = Vec::new();
    for (n, step) in run.steps.iter().enumerate() {
        let seen = PROMPT + n + 1;
        let map = Heatmap::new(
            &format!(
                "step {}: \"{}\" attends to {seen} cached positions",
                n + 1,
                step.token
            ),
            &step.weights,
        )
        .with_row_labels(&heads)
        .with_col_labels(
            TOKENS[..seen]
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i}:{t}")),
        )
        .with_decimals(3)
        .with_range(0.0, 1.0)
        .with_axis_titles("head", "cached position: token");
        common::show(&map);
        panels.push(map);
    }

    // every output is the row the whole-sequence causal pass computes
    let outputs = std::iter::once((0, run.prompt.view())).chain(
        run.steps
            .iter()
            .enumerate()
            .map(|(n, s)| (PROMPT + n, s.output.view())),
    );
    let gap = outputs.fold(0.0_f32, |m, (first, out)| {
        let rows = run
            .recomputed
            .slice(s![.., .., first..first + out.dim().2, ..]);
        (&out - &rows).iter().fold(m, |m, d| m.max(d.abs()))
    });
    println!(
        "cache: {} positions after {} steps; prompt + steps vs causal attention over all {} tokens: max |difference| = {gap:.1e}",
        run.cache.len(),
        run.steps.len(),
        TOKENS.len()
    );
    common::save(&Figure::new(panels), "decode");
    Ok(())
}
