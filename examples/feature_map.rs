//! Self-attention over an image feature map (SAGAN): a 2×2 map with 2
//! channels, `S = XᵀX`, `A = softmax(S)` row by row, `o = X·Aᵀ`. It shows which
//! input pixels each output pixel mixes, with real values instead of symbols.
//!
//! `cargo run --release --example feature_map [OUTPUT_DIR]`

mod common;

use attn::parameter_free::{FeatureMapAttention, FeatureMapOutput};
use attn::plot::{Figure, Heatmap};
use ndarray::{Array3, Ix3, array};

/// The pixel names, in the order of the flattened map: `p(w,h)`.
pub const PIXELS: [&str; 4] = ["p(0,0)", "p(0,1)", "p(1,0)", "p(1,1)"];

/// The map `x[c][w][h]` and what attention makes of it.
pub fn feature_map() -> attn::Result<(Array3<f64>, FeatureMapOutput<f64, Ix3>)> {
    let x = array![[[1.0, 0.5], [0.0, -0.5]], [[0.2, 0.8], [1.0, 0.4]]];
    let out = FeatureMapAttention::new().forward(&x)?;
    Ok((x, out))
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(include_str!("feature_map.rs"), &[]);
    let (x, out) = feature_map()?;
    let channels = ["c0", "c1"];
    let flat = |m: &Array3<f64>| m.to_shape((2, 4)).map(|v| v.to_owned());
    let as_table = |title: &str, m: &Array3<f64>| -> attn::Result<Heatmap> {
        let m = flat(m).map_err(|_| attn::Error::InvalidConfig {
            reason: "a 2×2×2 map has 8 values".into(),
        })?;
        Ok(Heatmap::new(title, &m)
            .with_row_labels(channels)
            .with_col_labels(PIXELS)
            .with_decimals(3))
    };
    println!("X: 2 channels × 4 pixels (a 2×2 map, read pixel by pixel)\n");
    let input = as_table("input x", &x)?;
    common::show(&input);
    let weights = Heatmap::new(
        "A = softmax(XᵀX), row n: how pixel n mixes the pixels",
        &out.weights,
    )
    .with_row_labels(PIXELS)
    .with_col_labels(PIXELS)
    .with_decimals(3)
    .with_range(0.0, 1.0)
    .with_axis_titles("output pixel", "input pixel");
    common::show(&weights);
    println!("each output pixel is a weighted mix of all input pixels:");
    for (n, row) in out.weights.rows().into_iter().enumerate() {
        let terms: Vec<String> = row
            .iter()
            .zip(PIXELS)
            .map(|(w, p)| format!("{w:.3}·x[{p}]"))
            .collect();
        println!("  o[{}] = {}", PIXELS[n], terms.join(" + "));
    }
    println!();
    let output = as_table("output o = X·Aᵀ", &out.output)?;
    common::show(&output);
    common::show_in_colour(&weights);
    common::save(
        &Figure::new(vec![input, weights.with_decimals(2), output]),
        "feature_map",
    );
    Ok(())
}
