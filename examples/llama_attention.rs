//! A real model's attention from its files: the first attention block of a tiny
//! Llama checkpoint (grouped-query heads, rotary embeddings, causal), as Hugging
//! Face `transformers` saved it (`config.json` + `model.safetensors`, in
//! `tests/golden/hf/llama/`).
//!
//! A batch of two prompts, the second left-padded as generation pads, fills the
//! layer's key/value cache; then new tokens are decoded one or two at a time.
//! The tokens are the ones transformers fed when it recorded this block (attn
//! has no language-model head to choose them). The block's input is what the
//! model gives it: the token embeddings, RMS-normalised, read from the same file.
//! Every step is checked against transformers' own float64 recording, and each
//! step's attention weights of the padded row are drawn, one row per head.
//!
//! `cargo run --release --example llama_attention [OUTPUT_DIR]`

mod common;

use attn::plot::{Figure, Heatmap};
use attn::{HfModel, StateDict};
use ndarray::{Array1, Array2, Array3, Axis, Ix2, Ix3, s};

const CHECKPOINT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/hf/llama");
const MODULE: &str = "model.layers.0.self_attn";

/// The prompts (token ids; row 1 starts with two padding tokens) and the tokens
/// decoded after them, in steps of 1, 2 and 1.
const PROMPT: [[usize; 5]; 2] = [[6, 29, 39, 31, 54], [0, 0, 36, 50, 41]];
const PADDING: usize = 2;
const STEPS: [&[[usize; 2]]; 3] = [&[[9, 39]], &[[7, 28], [26, 28]], &[[38, 36]]];

/// A tensor of the checkpoint as f32 (as stored).
fn tensor<D: ndarray::Dimension>(
    model: &HfModel,
    name: &str,
) -> attn::Result<ndarray::Array<f32, D>> {
    let t =
        StateDict::<f32>::tensor(model.tensors(), name)?.ok_or_else(|| attn::Error::Tensor {
            name: name.to_string(),
            reason: "not in the checkpoint".to_string(),
        })?;
    t.into_dimensionality().map_err(|_| attn::Error::Tensor {
        name: name.to_string(),
        reason: "unexpected rank".to_string(),
    })
}

/// The block's input for `ids: (B, T)`: `RMSNorm(embedding)`, in f32 as the
/// float32 checkpoint computes it (`x / √(mean(x²) + ε) · weight`).
fn hidden_states(
    embed: &Array2<f32>,
    norm: &Array1<f32>,
    eps: f32,
    ids: &Array2<usize>,
) -> Array3<f64> {
    let (b, t) = ids.dim();
    let d = embed.ncols();
    let mut x = Array3::zeros((b, t, d));
    for ((i, j), &id) in ids.indexed_iter() {
        let row = embed.row(id);
        // PyTorch accumulates an f32 mean in f64 on the CPU
        let mean = row.iter().map(|&v| f64::from(v * v)).sum::<f64>() / d as f64;
        let scale = 1.0 / (mean as f32 + eps).sqrt();
        let normed = row.mapv(|v| v * scale) * norm;
        x.slice_mut(s![i, j, ..]).assign(&normed.mapv(f64::from));
    }
    x
}

/// transformers' recording of this block's decode steps, if the file is there.
fn recording() -> Option<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(format!("{CHECKPOINT}/attention_io.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["records"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "decode")?["steps"]
        .as_array()
        .cloned()
}

/// A recorded nested list as an array.
fn recorded<D: ndarray::Dimension>(v: &serde_json::Value) -> ndarray::Array<f64, D> {
    fn walk(v: &serde_json::Value, shape: &mut Vec<usize>, flat: &mut Vec<f64>, depth: usize) {
        match v {
            serde_json::Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                items.iter().for_each(|x| walk(x, shape, flat, depth + 1));
            }
            x => flat.push(x.as_f64().unwrap_or(f64::NAN)),
        }
    }
    let (mut shape, mut flat) = (Vec::new(), Vec::new());
    walk(v, &mut shape, &mut flat, 0);
    ndarray::ArrayD::from_shape_vec(shape, flat)
        .expect("a rectangular list")
        .into_dimensionality()
        .expect("the recorded rank")
}

/// What the run found.
pub struct Run {
    /// The padded row's (batch row 1's) weights: of the prompt's last token, then of
    /// every token each step decodes, one panel each.
    pub panels: Vec<Heatmap>,
    /// Each row's position after the last step (real tokens seen).
    pub positions: Vec<usize>,
    /// Largest differences from transformers' recording over real tokens: the
    /// block's input, its output from that input, its output from the recorded
    /// input (`None` without the recording).
    pub gaps: Option<(f64, f64, f64)>,
    /// Largest weight any head put on a padding key.
    pub weight_on_padding: f64,
}

/// Loads the checkpoint and runs the prompts and the decoding steps.
pub fn run() -> attn::Result<Run> {
    let model = HfModel::open(CHECKPOINT)?;
    let layer = model.attention::<f64>(MODULE)?;
    let c = layer.config();
    println!(
        "{}: d_model {}, {} query heads sharing {} key/value heads of width {}, {}, {}",
        model.model_type(),
        c.d_model(),
        c.n_heads(),
        c.n_kv_heads(),
        c.head_dim(),
        c.causality(),
        c.positions()
    );
    let embed: Array2<f32> = tensor(&model, "model.embed_tokens.weight")?;
    let norm: Array1<f32> = tensor(&model, "model.layers.0.input_layernorm.weight")?;
    let eps = 1e-6; // config.json: rms_norm_eps

    let mut ids = Array2::from_shape_fn((2, 5), |(b, t)| PROMPT[b][t]);
    let mut real = Array2::from_shape_fn((2, 5), |(b, t)| b == 0 || t >= PADDING);
    let steps: Vec<(Array2<usize>, Array2<bool>)> = std::iter::once((ids.clone(), real.clone()))
        .chain(STEPS.iter().map(|step| {
            let new = Array2::from_shape_fn((2, step.len()), |(b, t)| step[t][b]);
            (new, Array2::from_elem((2, step.len()), true))
        }))
        .collect();

    let recording = recording();
    let mut cache = layer.new_cache(2);
    // the same steps on transformers' recorded inputs, to compare the block alone
    let mut replay = layer.new_cache(2);
    let (mut input_gap, mut replay_gap) = (0.0_f64, 0.0_f64);
    let mut panels = Vec::new();
    let mut worst = 0.0_f64;
    let mut weight_on_padding = 0.0_f64;
    for (n, (new_ids, new_real)) in steps.iter().enumerate() {
        if n > 0 {
            ids = ndarray::concatenate(Axis(1), &[ids.view(), new_ids.view()]).expect("two rows");
            real =
                ndarray::concatenate(Axis(1), &[real.view(), new_real.view()]).expect("two rows");
        }
        let x = hidden_states(&embed, &norm, eps, new_ids);
        let step = layer.forward_cached_padded_with_weights(&x, new_real, &mut cache)?;
        if let Some(steps) = &recording {
            let gap = |a: &Array3<f64>, b: &Array3<f64>| {
                (a - b)
                    .indexed_iter()
                    .filter(|&((b, t, _), _)| new_real[[b, t]])
                    .fold(0.0_f64, |m, (_, d)| m.max(d.abs()))
            };
            let input: Array3<f64> = recorded::<Ix3>(&steps[n]["hidden_states"]);
            let want: Array3<f64> = recorded::<Ix3>(&steps[n]["output"]);
            let again = layer.forward_cached_padded(&input, new_real, &mut replay)?;
            input_gap = input_gap.max(gap(&x, &input));
            worst = worst.max(gap(&step.output, &want));
            replay_gap = replay_gap.max(gap(&again, &want));
        }
        for ((b, _, _, j), &w) in step.head_weights.indexed_iter() {
            if !real[[b, j]] {
                weight_on_padding = weight_on_padding.max(w);
            }
        }
        // the padded row's new tokens (the prompt's last one), one row of weights
        // per head; keys labelled by their position in the row (padding takes none)
        let slots = real.ncols();
        let position = |j: usize| real.slice(s![1, ..j]).iter().filter(|&&r| r).count();
        let keys: Vec<String> = (0..slots)
            .map(|j| match real[[1, j]] {
                true => format!("{}:{}", position(j), ids[[1, j]]),
                false => "pad".to_string(),
            })
            .collect();
        let t = new_ids.ncols();
        let shown = if n == 0 { t - 1..t } else { 0..t };
        for q in shown {
            let slot = slots - t + q;
            let weights: Array2<f64> = step
                .head_weights
                .slice(s![1, .., q, ..])
                .to_owned()
                .into_dimensionality::<Ix2>()
                .expect("(heads, keys)");
            let title = format!(
                "row 1, step {n}: token {} at position {}",
                ids[[1, slot]],
                position(slot)
            );
            let map = Heatmap::new(&title, &weights)
                .with_row_labels((0..c.n_heads()).map(|h| format!("head {h}")))
                .with_col_labels(keys.clone())
                .with_decimals(2)
                .with_range(0.0, 1.0)
                .with_axis_titles("head", "key (position:token)");
            common::show(&map);
            panels.push(map);
        }
    }
    Ok(Run {
        panels,
        positions: cache.positions().to_vec(),
        gaps: recording.map(|_| (input_gap, worst, replay_gap)),
        weight_on_padding,
    })
}

fn main() -> attn::Result<()> {
    common::help(include_str!("llama_attention.rs"), &[]);
    let run = run()?;
    println!(
        "after {} steps the rows sit at positions {:?} (row 1 is left-padded); largest weight on a padding key: {}",
        STEPS.len() + 1,
        run.positions,
        run.weight_on_padding
    );
    match run.gaps {
        Some((input, output, replay)) => println!(
            "vs transformers' float64 recording of this block, max |difference| over real tokens:\n  \
             the block's input (our f32 RMSNorm of the embeddings): {input:.1e} (f32 rounding)\n  \
             the block's output from that input:                    {output:.1e}\n  \
             the block's output from the recorded input:            {replay:.1e}"
        ),
        None => println!("(no recording found next to the checkpoint to compare with)"),
    }
    common::save(&Figure::new(run.panels), "llama_attention");
    Ok(())
}
