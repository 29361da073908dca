//! Attention from scratch with four words: `W` drawn as the script draws
//! it (`numpy.random.seed(42)`, `randint(3, size=(4, 3))` three times), every step
//! printed, and the difference between the script's whole-matrix softmax and the
//! row-wise softmax of real attention.
//!
//! `cargo run --release --example four_words [OUTPUT_DIR]`

mod common;

use attn::plot::{Figure, Heatmap};
use attn::rng::NumpyRandom;
use attn::{QkvProjection, ScaledDotProduct, softmax_rows};
use ndarray::{Array2, array};

/// Every number of the demo.
pub struct FourWords {
    pub words: Array2<f64>,
    pub projection: QkvProjection<f64>,
    pub q: Array2<f64>,
    pub k: Array2<f64>,
    pub v: Array2<f64>,
    /// `QKᵀ`, unscaled, as the script prints it.
    pub scores: Array2<f64>,
    /// `softmax(scores/√3)` over all 16 entries at once (the script's `softmax` without an axis).
    pub probs_whole_matrix: Array2<f64>,
    pub attention_whole_matrix: Array2<f64>,
    /// `softmax(scores/√3)` row by row: real attention weights.
    pub probs_rows: Array2<f64>,
    pub attention_rows: Array2<f64>,
}

/// Computes the demo.
pub fn four_words() -> attn::Result<FourWords> {
    let words = array![
        [1.0, 0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, 1.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0]
    ];
    let mut np = NumpyRandom::seed(42);
    let mut draw = || np.randint(3, (4, 3)).map(|w| w.mapv(|x| x as f64));
    let (w_q, w_k, w_v) = (draw()?, draw()?, draw()?);
    let projection = QkvProjection::new(w_q, w_k, w_v)?;
    let (q, k, v) = (
        projection.query(&words)?,
        projection.key(&words)?,
        projection.value(&words)?,
    );
    let attention = ScaledDotProduct::new().trace(&q, &k, &v)?;
    // the script's softmax without an axis: one softmax over the flattened matrix
    let flat = attention
        .scaled
        .to_shape((1, 16))
        .map_err(|_| shape_error())?;
    let probs_whole_matrix = softmax_rows(&flat)
        .into_shape_with_order((4, 4))
        .map_err(|_| shape_error())?;
    let attention_whole_matrix = probs_whole_matrix.dot(&v);
    Ok(FourWords {
        words,
        projection,
        scores: attention.scores,
        probs_whole_matrix,
        attention_whole_matrix,
        probs_rows: attention.weights,
        attention_rows: attention.output,
        q,
        k,
        v,
    })
}

fn shape_error() -> attn::Error {
    attn::Error::InvalidConfig {
        reason: "a 4 × 4 matrix has 16 entries".to_string(),
    }
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(include_str!("four_words.rs"), &[]);
    let demo = four_words()?;
    let names = ["word_1", "word_2", "word_3", "word_4"];
    let features = ["f0", "f1", "f2"];
    let table = |title: &str, m: &Array2<f64>, decimals, cols: &[&str]| {
        Heatmap::new(title, m)
            .with_row_labels(names)
            .with_col_labels(cols.iter().copied())
            .with_decimals(decimals)
    };
    println!("numpy.random.seed(42); W_Q, W_K, W_V = randint(3, size=(4, 3)) three times\n");
    for (title, m) in [
        ("W_Q", demo.projection.w_q()),
        ("W_K", demo.projection.w_k()),
        ("W_V", demo.projection.w_v()),
    ] {
        common::show(&Heatmap::new(title, m).with_decimals(0));
    }
    common::show(&table("Q = words·W_Q", &demo.q, 0, &features));
    common::show(&table("K = words·W_K", &demo.k, 0, &features));
    common::show(&table("V = words·W_V", &demo.v, 0, &features));
    common::show(&table("scores QKᵀ", &demo.scores, 0, &names));
    let whole = table(
        "probs: softmax over the whole matrix (as the script printed)",
        &demo.probs_whole_matrix,
        7,
        &names,
    );
    let rows = table(
        "weights: softmax row by row (attention)",
        &demo.probs_rows,
        7,
        &names,
    );
    common::show(&whole);
    common::show(&table(
        "attention from whole-matrix probs (as printed: 0.8510426 …)",
        &demo.attention_whole_matrix,
        7,
        &features,
    ));
    common::show(&rows);
    common::show(&table(
        "attention = weights·V",
        &demo.attention_rows,
        7,
        &features,
    ));
    println!(
        "The script called scipy.special.softmax without axis=1, so its 16 probabilities sum to 1 together;"
    );
    println!(
        "attention normalises each query's row on its own, so every row of weights sums to 1.\n"
    );
    common::show_in_colour(&rows);
    // the picture: both on one scale, [0, 1], titles that fit their panels
    let picture = |map: Heatmap, title: &str| {
        let values = map.values().clone();
        Heatmap::new(title, &values)
            .with_row_labels(names)
            .with_col_labels(names)
            .with_decimals(7)
            .with_range(0.0, 1.0)
            .with_axis_titles("query", "key")
    };
    let panels = vec![
        picture(whole, "whole-matrix softmax (the script)"),
        picture(rows, "row-wise softmax (attention)"),
    ];
    common::save(&Figure::new(panels), "four_words");
    Ok(())
}
