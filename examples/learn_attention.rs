//! One attention layer learns associative recall: it sees six (key, value) pairs
//! and a query key, and must return the value paired with that key. Only
//! attention can do it: the answer's position changes from example to example.
//!
//! Tokens are fixed random embeddings (16 key symbols, 16 value symbols, 16 wide).
//! The layer projects the query token, the key tokens and the value tokens with
//! learned `W_Q`, `W_K`, `W_V` (`attn::Linear`), attends, and is trained to put out
//! the target value's embedding (mean squared error) with a plain Adam, from
//! seeded random weights. Gradients come from `ScaledDotProduct::backward_batched`
//! and `Linear::backward_batched`. It prints the loss as it falls and draws each
//! evaluation example's attention over the six pairs before and after training,
//! and the loss curve: attention goes from uniform to sharp on the right pair.
//!
//! `cargo run --release --example learn_attention [OUTPUT_DIR]`

mod common;

use attn::plot::{Curve, Figure, Heatmap};
use attn::{Linear, ScaledDotProduct};
use ndarray::{Array2, Array3, Array4, Axis, s};
use ndarray_rand::rand_distr::StandardNormal;
use rand::Rng;
use rand::seq::index::sample;

/// Embedding width, symbols per vocabulary, pairs per example.
const WIDTH: usize = 16;
const SYMBOLS: usize = 16;
const PAIRS: usize = 6;
/// Examples per training step.
const BATCH: usize = 64;

/// A batch of examples: the query token `(B, 1, w)`, the key and value tokens
/// `(B, PAIRS, w)`, the target value `(B, 1, w)`, and which pair holds it.
pub struct Examples {
    pub query: Array3<f64>,
    pub keys: Array3<f64>,
    pub values: Array3<f64>,
    pub target: Array3<f64>,
    pub answer: Vec<usize>,
}

/// The two vocabularies' embeddings, `(SYMBOLS, WIDTH)` each, unit length on average.
pub struct Vocabulary {
    keys: Array2<f64>,
    values: Array2<f64>,
}

impl Vocabulary {
    pub fn random(rng: &mut impl Rng) -> Self {
        let mut draw = || {
            Array2::from_shape_simple_fn((SYMBOLS, WIDTH), || {
                rng.sample::<f64, _>(StandardNormal) / (WIDTH as f64).sqrt()
            })
        };
        Vocabulary {
            keys: draw(),
            values: draw(),
        }
    }

    /// `n` examples; the answer of example `i` is pair `answer(i)`.
    pub fn examples(
        &self,
        n: usize,
        rng: &mut impl Rng,
        answer: impl Fn(usize) -> usize,
    ) -> Examples {
        let mut ex = Examples {
            query: Array3::zeros((n, 1, WIDTH)),
            keys: Array3::zeros((n, PAIRS, WIDTH)),
            values: Array3::zeros((n, PAIRS, WIDTH)),
            target: Array3::zeros((n, 1, WIDTH)),
            answer: (0..n).map(answer).collect(),
        };
        for i in 0..n {
            let keys = sample(rng, SYMBOLS, PAIRS); // distinct keys
            for (p, key) in keys.iter().enumerate() {
                let value = rng.random_range(0..SYMBOLS);
                ex.keys.slice_mut(s![i, p, ..]).assign(&self.keys.row(key));
                ex.values
                    .slice_mut(s![i, p, ..])
                    .assign(&self.values.row(value));
            }
            let j = ex.answer[i];
            let (query, target) = (
                ex.keys.slice(s![i, j, ..]).to_owned(),
                ex.values.slice(s![i, j, ..]).to_owned(),
            );
            ex.query.slice_mut(s![i, 0, ..]).assign(&query);
            ex.target.slice_mut(s![i, 0, ..]).assign(&target);
        }
        ex
    }
}

/// The layer: `W_Q`, `W_K`, `W_V`.
pub struct Model {
    layers: [Linear<f64>; 3],
}

/// One forward pass: each example's attention weights over its pairs
/// `(B, PAIRS)`, its output `(B, 1, w)` and the mean squared error.
pub struct Pass {
    pub weights: Array2<f64>,
    pub output: Array3<f64>,
    pub loss: f64,
}

impl Model {
    /// Small random projections: attention starts out nearly uniform.
    pub fn random(rng: &mut impl Rng) -> Self {
        let mut draw = |std: f64| {
            Linear::new(Array2::from_shape_simple_fn((WIDTH, WIDTH), || {
                std * rng.sample::<f64, _>(StandardNormal)
            }))
        };
        Model {
            layers: [draw(0.1), draw(0.1), draw(0.3)],
        }
    }

    /// Projected queries `(B, 1, 1, w)`, keys and values `(B, 1, PAIRS, w)`: one head.
    fn project(&self, ex: &Examples) -> attn::Result<[Array4<f64>; 3]> {
        let [w_q, w_k, w_v] = &self.layers;
        let head = |x: Array3<f64>| x.insert_axis(Axis(1));
        Ok([
            head(w_q.forward_batched(&ex.query)?),
            head(w_k.forward_batched(&ex.keys)?),
            head(w_v.forward_batched(&ex.values)?),
        ])
    }

    pub fn pass(&self, ex: &Examples) -> attn::Result<Pass> {
        let [q, k, v] = self.project(ex)?;
        let out = ScaledDotProduct::new().forward_batched_with_weights(&q, &k, &v)?;
        let output = out.output.index_axis_move(Axis(1), 0);
        let weights = out.weights.slice(s![.., 0, 0, ..]).to_owned();
        let loss = (&output - &ex.target).mapv(|e| e * e).mean().unwrap_or(0.0);
        Ok(Pass {
            weights,
            output,
            loss,
        })
    }

    /// The gradients of the mean squared error by `W_Q`, `W_K`, `W_V`.
    pub fn gradients(&self, ex: &Examples, pass: &Pass) -> attn::Result<[Array2<f64>; 3]> {
        let [q, k, v] = self.project(ex)?;
        let d_out = (&pass.output - &ex.target) * (2.0 / pass.output.len() as f64);
        let g =
            ScaledDotProduct::new().backward_batched(&q, &k, &v, &d_out.insert_axis(Axis(1)))?;
        let [w_q, w_k, w_v] = &self.layers;
        let flat = |x: Array4<f64>| x.index_axis_move(Axis(1), 0);
        Ok([
            w_q.backward_batched(&ex.query, &flat(g.q))?.weight,
            w_k.backward_batched(&ex.keys, &flat(g.k))?.weight,
            w_v.backward_batched(&ex.values, &flat(g.v))?.weight,
        ])
    }
}

/// Adam (Kingma & Ba, 2015), written out: per weight, running means of the
/// gradient and of its square, bias-corrected.
pub struct Adam {
    rate: f64,
    step: i32,
    moments: Vec<(Array2<f64>, Array2<f64>)>,
}

impl Adam {
    pub fn new(rate: f64) -> Self {
        Adam {
            rate,
            step: 0,
            moments: (0..3)
                .map(|_| (Array2::zeros((WIDTH, WIDTH)), Array2::zeros((WIDTH, WIDTH))))
                .collect(),
        }
    }

    pub fn update(&mut self, model: &mut Model, grads: &[Array2<f64>; 3]) {
        let (b1, b2, eps): (f64, f64, f64) = (0.9, 0.999, 1e-8);
        self.step += 1;
        let (c1, c2) = (1.0 - b1.powi(self.step), 1.0 - b2.powi(self.step));
        for ((layer, g), (m, v)) in model.layers.iter_mut().zip(grads).zip(&mut self.moments) {
            m.zip_mut_with(g, |m, &g| *m = b1 * *m + (1.0 - b1) * g);
            v.zip_mut_with(g, |v, &g| *v = b2 * *v + (1.0 - b2) * g * g);
            let mut w = layer.weight_mut();
            ndarray::Zip::from(&mut w)
                .and(&*m)
                .and(&*v)
                .for_each(|w, &m, &v| {
                    *w -= self.rate * (m / c1) / ((v / c2).sqrt() + eps);
                });
        }
    }
}

/// What a training run gives: the loss of every step, and the evaluation
/// examples' attention before and after.
pub struct Training {
    pub losses: Vec<f64>,
    pub before: Pass,
    pub after: Pass,
    pub eval: Examples,
}

/// Trains for `steps` steps from `seed`.
pub fn train(steps: usize, seed: u64) -> attn::Result<Training> {
    let mut rng = attn::rng::seeded(seed);
    let vocabulary = Vocabulary::random(&mut rng);
    let mut model = Model::random(&mut rng);
    // twelve evaluation examples, the answer at pair i % 6: a diagonal when learnt
    let eval = vocabulary.examples(2 * PAIRS, &mut rng, |i| i % PAIRS);
    let before = model.pass(&eval)?;
    let mut adam = Adam::new(0.02);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let batch = vocabulary.examples(BATCH, &mut rng, |_| 0);
        let batch = shuffle_answers(batch, &mut rng);
        let pass = model.pass(&batch)?;
        losses.push(pass.loss);
        let grads = model.gradients(&batch, &pass)?;
        adam.update(&mut model, &grads);
    }
    let after = model.pass(&eval)?;
    Ok(Training {
        losses,
        before,
        after,
        eval,
    })
}

/// Moves each example's answer pair to a random position (keys and values alike).
fn shuffle_answers(mut ex: Examples, rng: &mut impl Rng) -> Examples {
    for i in 0..ex.answer.len() {
        let j = rng.random_range(0..PAIRS);
        for x in [&mut ex.keys, &mut ex.values] {
            let (a, b) = (
                x.slice(s![i, 0, ..]).to_owned(),
                x.slice(s![i, j, ..]).to_owned(),
            );
            x.slice_mut(s![i, 0, ..]).assign(&b);
            x.slice_mut(s![i, j, ..]).assign(&a);
        }
        ex.answer[i] = j;
    }
    ex
}

/// The weight each evaluation example puts on its right pair, on average.
pub fn mean_weight_on_answer(pass: &Pass, eval: &Examples) -> f64 {
    let total: f64 = eval
        .answer
        .iter()
        .enumerate()
        .map(|(i, &j)| pass.weights[[i, j]])
        .sum();
    total / eval.answer.len() as f64
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(include_str!("learn_attention.rs"), &[]);
    let steps = 600;
    let run = train(steps, 7)?;
    println!(
        "associative recall: {PAIRS} (key, value) pairs, {SYMBOLS} symbols each, width {WIDTH}; batch {BATCH}, Adam, {steps} steps\n"
    );
    println!("step   loss");
    for (step, loss) in run.losses.iter().enumerate() {
        if step % 50 == 0 || step + 1 == steps {
            println!("{step:>4}   {loss:.5}");
        }
    }
    let (first, last) = (run.losses[0], run.losses[steps - 1]);
    println!("\nloss fell {:.0}× ({first:.4} → {last:.5})", first / last);
    println!(
        "weight on the right pair, averaged over the evaluation examples: {:.3} before, {:.3} after",
        mean_weight_on_answer(&run.before, &run.eval),
        mean_weight_on_answer(&run.after, &run.eval)
    );
    let rows: Vec<String> = run
        .eval
        .answer
        .iter()
        .enumerate()
        .map(|(i, j)| format!("{}: pair {}", i + 1, j + 1))
        .collect();
    let cols: Vec<String> = (1..=PAIRS).map(|p| format!("pair {p}")).collect();
    let panel = |title: &str, pass: &Pass| {
        Heatmap::new(title, &pass.weights)
            .with_row_labels(rows.clone())
            .with_col_labels(cols.clone())
            .with_decimals(2)
            .with_range(0.0, 1.0)
            .with_axis_titles("evaluation example: its answer", "key")
    };
    let before = panel("attention before training", &run.before);
    let after = panel("after training", &run.after);
    common::show(&after);
    common::save(&Figure::new(vec![before, after]), "learn_attention");
    let dir = common::output_dir();
    let log_losses: Vec<f64> = run.losses.iter().map(|l| l.log10()).collect();
    let curve =
        Curve::new("training loss", &log_losses).with_axes("step", "log₁₀ mean squared error");
    for path in [
        dir.join("learn_attention_loss.svg"),
        dir.join("learn_attention_loss.png"),
    ] {
        let saved = if path.extension().is_some_and(|e| e == "png") {
            curve.save_png(&path)
        } else {
            curve.save_svg(&path)
        };
        match saved {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("{e}"),
        }
    }
    Ok(())
}
