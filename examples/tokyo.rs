//! "Tokyo is beautiful": self-attention over three tokens, step by step,
//! with `W_Q, W_K, W_V` drawn exactly as the notebook draws them
//! (`torch.manual_seed(42)`, then `torch.randn(4, 4)` three times).
//!
//! `cargo run --release --example tokyo [OUTPUT_DIR]`
//!
//! The notebook's exercises are flags: `--tokens N` (1 to 10 words of "Tokyo is
//! beautiful in the spring and at night too") or `--tokens "your own words"`,
//! `--d-model D`, `--heads H`
//! (multi-head: each head attends on its `D/H` columns of Q, K and V, the weights are
//! averaged and the outputs set side by side) and `--seed S`. With other sizes than
//! the notebook's 3 tokens of 4 dimensions, the embeddings are `torch.randn(N, D)`,
//! drawn after the three weights. For example:
//!
//! `cargo run --release --example tokyo -- --tokens 6 --d-model 8 --heads 2 --seed 7`
//!
//! `cargo run --release --example tokyo -- --tokens "I love transformers so much"`

mod common;

use attn::plot::{Colormap, Figure, Heatmap};
use attn::rng::TorchGenerator;
use attn::{AttentionTrace, QkvProjection, ScaledDotProduct};
use ndarray::{Array2, Axis, array, concatenate, s};

/// The notebook's sentence: `--tokens N` takes its first `N` words.
const SENTENCE: [&str; 10] = [
    "Tokyo",
    "is",
    "beautiful",
    "in",
    "the",
    "spring",
    "and",
    "at",
    "night",
    "too",
];

/// The demo's tokens and sizes: the notebook's by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The words attended over, one token each.
    pub tokens: Vec<String>,
    pub d_model: usize,
    pub heads: usize,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tokens: words(3),
            d_model: 4,
            heads: 1,
            seed: 42,
        }
    }
}

impl Options {
    /// Reads `--tokens N|WORDS --d-model D --heads H --seed S` (any order, any
    /// subset); the other arguments are returned as they came (the output
    /// directory).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<(Options, Vec<String>), String> {
        let mut options = Options::default();
        let mut rest = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let slot = match arg.as_str() {
                "--tokens" => {
                    let value = args.next().ok_or("--tokens needs a count or some words")?;
                    options.tokens = match value.trim().parse::<usize>() {
                        Ok(n) if (1..=SENTENCE.len()).contains(&n) => words(n),
                        Ok(n) => {
                            return Err(format!(
                                "--tokens takes 1 to {} words of the sentence, or your own words; got {n}",
                                SENTENCE.len()
                            ));
                        }
                        Err(_) => value.split_whitespace().map(String::from).collect(),
                    };
                    if options.tokens.is_empty() {
                        return Err("--tokens needs at least one word".to_string());
                    }
                    continue;
                }
                "--d-model" => &mut options.d_model,
                "--heads" => &mut options.heads,
                "--seed" => {
                    let value = args.next().ok_or("--seed needs a value")?;
                    options.seed = value
                        .parse()
                        .map_err(|_| format!("--seed takes a whole number, got {value:?}"))?;
                    continue;
                }
                flag if flag.starts_with("--") => {
                    return Err(format!(
                        "unknown flag {flag}: use --tokens, --d-model, --heads, --seed (see --help)"
                    ));
                }
                _ => {
                    rest.push(arg);
                    continue;
                }
            };
            let value = args.next().ok_or(format!("{arg} needs a value"))?;
            *slot = value
                .parse()
                .map_err(|_| format!("{arg} takes a whole number, got {value:?}"))?;
        }
        if options.heads == 0 || options.d_model == 0 || options.d_model % options.heads != 0 {
            return Err(format!(
                "--heads ({}) must divide --d-model ({}), both positive",
                options.heads, options.d_model
            ));
        }
        Ok((options, rest))
    }
}

/// The first `n` words of the notebook's sentence.
fn words(n: usize) -> Vec<String> {
    SENTENCE[..n].iter().map(|w| w.to_string()).collect()
}

/// The tokens and every number of the demo.
pub struct Tokyo {
    pub tokens: Vec<String>,
    pub x: Array2<f32>,
    pub projection: QkvProjection<f32>,
    /// Every step of each head's attention, on its columns of Q, K and V.
    pub heads: Vec<AttentionTrace<f32>>,
    /// The heads' weights averaged.
    pub mean_weights: Array2<f32>,
    /// The heads' outputs side by side, `(tokens, d_model)`.
    pub output: Array2<f32>,
}

/// The notebook's demo: `Q = xW_Q`, `K = xW_K`, `V = xW_V`, then attention.
pub fn tokyo() -> attn::Result<Tokyo> {
    run(Options::default())
}

/// The demo at other sizes.
pub fn run(options: Options) -> attn::Result<Tokyo> {
    let Options {
        tokens,
        d_model: d,
        heads,
        seed,
    } = options;
    let n = tokens.len();
    let mut torch = TorchGenerator::manual_seed(seed);
    let (w_q, w_k, w_v) = (
        torch.randn((d, d)),
        torch.randn((d, d)),
        torch.randn((d, d)),
    );
    let x = if (n, d) == (3, 4) {
        array![
            [1.0, 0.5, 0.3, 0.2],
            [0.2, 0.1, 0.9, 0.7],
            [0.8, 0.3, 0.2, 0.4]
        ]
    } else {
        torch.randn((n, d))
    };
    let projection = QkvProjection::new(w_q, w_k, w_v)?;
    let (q, k, v) = (
        projection.query(&x)?,
        projection.key(&x)?,
        projection.value(&x)?,
    );
    let width = d / heads;
    let heads: Vec<AttentionTrace<f32>> = (0..heads)
        .map(|h| {
            let cols = s![.., h * width..(h + 1) * width];
            ScaledDotProduct::new().trace(&q.slice(cols), &k.slice(cols), &v.slice(cols))
        })
        .collect::<attn::Result<_>>()?;
    let mean_weights = heads
        .iter()
        .fold(Array2::zeros((n, n)), |sum, head| sum + &head.weights)
        / heads.len() as f32;
    let outputs: Vec<_> = heads.iter().map(|head| head.output.view()).collect();
    let output = concatenate(Axis(1), &outputs).expect("every head has n rows");
    Ok(Tokyo {
        tokens,
        x,
        projection,
        heads,
        mean_weights,
        output,
    })
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(
        include_str!("tokyo.rs"),
        &["--tokens", "--d-model", "--heads", "--seed"],
    );
    let (options, _) = match Options::parse(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(why) => {
            eprintln!("tokyo: {why}");
            std::process::exit(2);
        }
    };
    let (d, seed) = (options.d_model, options.seed);
    let demo = run(options)?;
    let dims: Vec<String> = (0..d).map(|j| format!("d{j}")).collect();
    let by_token = |title: &str, m: &Array2<f32>, cols: &[String]| {
        Heatmap::new(title, m)
            .with_row_labels(demo.tokens.iter())
            .with_col_labels(cols.iter())
            .with_decimals(4)
    };
    let weight = |title: &str, m: &Array2<f32>| {
        Heatmap::new(title, m)
            .with_row_labels((0..d).map(|i| format!("in{i}")))
            .with_col_labels(dims.iter())
            .with_decimals(4)
    };
    println!("torch.manual_seed({seed}); W_Q, W_K, W_V = torch.randn({d}, {d}) three times\n");
    common::show(&weight("W_Q", demo.projection.w_q()));
    common::show(&weight("W_K", demo.projection.w_k()));
    common::show(&weight("W_V", demo.projection.w_v()));
    // the notebook's seaborn colour scales: YlGnBu, OrRd, Blues (weights on one
    // scale, [0, 1], so that panels compare), Greens
    let weights = |title: &str, m: &Array2<f32>| {
        by_token(title, m, &demo.tokens)
            .with_range(0.0, 1.0)
            .with_colormap(Colormap::Blues)
            .with_axis_titles("query", "key")
    };
    let mut panels =
        vec![by_token("input embeddings x", &demo.x, &dims).with_colormap(Colormap::YlGnBu)];
    if demo.heads.len() == 1 {
        let head = &demo.heads[0];
        let scores = by_token("scores QKᵀ/√d_k", &head.scaled, &demo.tokens)
            .with_axis_titles("query", "key");
        panels.push(scores.with_colormap(Colormap::OrRd));
        panels.push(weights("attention weights", &head.weights));
    } else {
        for (h, head) in demo.heads.iter().enumerate() {
            panels.push(weights(&format!("head {h} weights"), &head.weights));
        }
        let title = format!("mean of {} heads", demo.heads.len());
        panels.push(weights(&title, &demo.mean_weights));
    }
    let output = by_token("output weights·V", &demo.output, &dims);
    panels.push(output.with_colormap(Colormap::Greens));
    for panel in &panels {
        common::show(panel);
    }
    common::show_in_colour(&panels[panels.len() - 2]);
    common::save(&Figure::new(panels), "tokyo");
    Ok(())
}
