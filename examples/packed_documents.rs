//! Programmable attention in a few lines (`attn::flex`): three sentences packed
//! into one sequence, each attending only to its own past (a document mask
//! from their lengths), equal to each sentence alone; ALiBi written as a score
//! function, equal to the built-in mask; and the block mask of a long packed
//! batch, where the kernels skip the empty blocks.
//!
//! The embeddings are `torch.manual_seed(0)` draws; queries, keys and values are
//! the embeddings themselves.
//!
//! `cargo run --release --example packed_documents [OUTPUT_DIR]`

mod common;

use attn::flex::{At, BlockClass, BlockMask, Documents, score_mod};
use attn::plot::{Figure, Heatmap};
use attn::rng::TorchGenerator;
use attn::{Mask, ScaledDotProduct};
use ndarray::{Array1, Array2, Array4, s};

pub const SENTENCES: [&[&str]; 3] = [
    &["the", "cat", "sat"],
    &["on", "a", "warm", "mat"],
    &["dogs", "bark", "loudly", "at", "night"],
];
const WIDTH: usize = 8;

/// Every number of the demo.
pub struct Packed {
    /// Attention over the packed sequence under the document mask, and its weights.
    pub packed: Array2<f32>,
    pub weights: Array2<f32>,
    /// Each sentence attended alone (causal), in packed order.
    pub alone: Array2<f32>,
    /// ALiBi as a score function and as the built-in mask, over 4 heads.
    pub alibi_written: Array4<f32>,
    pub alibi_built_in: Array4<f32>,
    /// The block mask of 8 causal documents of 512 tokens packed in 4096.
    pub long: BlockMask<Documents>,
}

/// Computes the demo.
pub fn packed() -> attn::Result<Packed> {
    let lengths: Vec<usize> = SENTENCES.iter().map(|s| s.len()).collect();
    let n: usize = lengths.iter().sum();
    let x = TorchGenerator::manual_seed(0).randn((n, WIDTH));

    // the document mask: one line from the lengths, one to classify its blocks
    let documents = Documents::from_lengths(&lengths)?.causal();
    let blocks = BlockMask::new(documents, [1, 1, n, n])?;
    let attention = ScaledDotProduct::new().with_block_mask(&blocks);
    let packed = attention.forward(&x, &x, &x)?;
    let weights = attention.weights(&x, &x)?;

    // the same, sentence by sentence
    let mut alone = Array2::zeros((n, WIDTH));
    let causal = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft);
    let mut start = 0;
    for length in &lengths {
        let rows = s![start..start + length, ..];
        let part = x.slice(rows);
        alone
            .slice_mut(rows)
            .assign(&causal.forward(&part, &part, &part)?);
        start += length;
    }

    // ALiBi: −slope·|query − key| per head, as a score function
    let slopes = Array1::from_iter(attn::alibi_slopes(4).into_iter().map(|s| s as f32));
    let heads = TorchGenerator::manual_seed(1).randn((1, 4, n, WIDTH));
    let alibi = {
        let slopes = slopes.clone();
        let distance = |at: At| at.query.abs_diff(at.key) as f32;
        score_mod(
            move |s: f32, at: At| s - slopes[at.head] * distance(at),
            |_, _| 1.0,
        )
    };
    let alibi_written = ScaledDotProduct::new()
        .with_score_mod(alibi)
        .forward(&heads, &heads, &heads)?;
    let built_in = ScaledDotProduct::new().with_mask(Mask::Alibi(slopes.view()));
    let alibi_built_in = built_in.forward_batched(&heads, &heads, &heads)?;

    let long = BlockMask::new(
        Documents::from_lengths(&[512; 8])?.causal(),
        [1, 1, 4096, 4096],
    )?;
    Ok(Packed {
        packed,
        weights,
        alone,
        alibi_written,
        alibi_built_in,
        long,
    })
}

/// The largest absolute difference of two arrays.
pub fn max_diff<D: ndarray::Dimension>(
    a: &ndarray::Array<f32, D>,
    b: &ndarray::Array<f32, D>,
) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(include_str!("packed_documents.rs"), &[]);
    let demo = packed()?;
    let tokens: Vec<&str> = SENTENCES.iter().flat_map(|s| s.iter().copied()).collect();
    let weights = Heatmap::new("weights under the document mask", &demo.weights)
        .with_row_labels(tokens.iter())
        .with_col_labels(tokens.iter())
        .with_decimals(2)
        .with_range(0.0, 1.0)
        .with_axis_titles("query", "key");
    common::show(&weights);
    println!(
        "packed with a document mask vs each sentence alone: largest difference {:.1e}",
        max_diff(&demo.packed, &demo.alone)
    );
    println!(
        "ALiBi written as a score function vs the built-in mask: largest difference {:.1e}",
        max_diff(&demo.alibi_written, &demo.alibi_built_in)
    );
    let [empty, partial, full] = demo.long.counts();
    let total = (empty + partial + full) as f64;
    println!(
        "8 causal documents of 512 tokens in 4096: of {total} blocks of 16 queries × 64 keys, {empty} empty (skipped, {:.0} %), {partial} partial (predicate per score), {full} full",
        100.0 * empty as f64 / total
    );
    // the picture: the small packing's weights, and the blocks of 4 documents
    // of 256 in 1024 tokens, 64 × 64 positions a cell (four mask blocks of 16
    // queries each: empty or full where all four are)
    let four = BlockMask::new(
        Documents::from_lengths(&[256; 4])?.causal(),
        [1, 1, 1024, 1024],
    )?;
    let table = four.classes(0, 0);
    let value = |c: BlockClass| match c {
        BlockClass::Empty => 0.0,
        BlockClass::Partial => 0.5,
        BlockClass::Full => 1.0,
    };
    let cells = Array2::from_shape_fn((table.nrows() / 4, table.ncols()), |(r, c)| {
        let column = table.slice(s![4 * r..4 * r + 4, c]);
        let first = value(column[0]);
        if column.iter().all(|&x| value(x) == first) {
            first
        } else {
            0.5
        }
    });
    let labels = (0..16).map(|b| format!("{}", 64 * b));
    let blocks = Heatmap::new("block mask: 0 empty (skipped), 0.5 partial, 1 full", &cells)
        .with_row_labels(labels.clone())
        .with_col_labels(labels)
        .with_decimals(1)
        .with_range(0.0, 1.0)
        .with_axis_titles("queries from", "keys from");
    common::save(&Figure::new(vec![weights, blocks]), "packed_documents");
    Ok(())
}
