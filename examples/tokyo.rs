//! "Tokyo is beautiful": self-attention over three tokens, step by step,
//! with `W_Q, W_K, W_V` drawn exactly as the notebook draws them
//! (`torch.manual_seed(42)`, then `torch.randn(4, 4)` three times).
//!
//! `cargo run --release --example tokyo [OUTPUT_DIR]`

mod common;

use attn::plot::{Figure, Heatmap};
use attn::rng::TorchGenerator;
use attn::{AttentionTrace, QkvProjection, ScaledDotProduct};
use ndarray::{array, Array2};

/// The tokens and every number of the demo.
pub struct Tokyo {
    pub tokens: [&'static str; 3],
    pub x: Array2<f32>,
    pub projection: QkvProjection<f32>,
    pub trace: AttentionTrace<f32>,
}

/// Computes the demo: `Q = xW_Q`, `K = xW_K`, `V = xW_V`, then attention.
pub fn tokyo() -> attn::Result<Tokyo> {
    let tokens = ["Tokyo", "is", "beautiful"];
    let x = array![
        [1.0, 0.5, 0.3, 0.2],
        [0.2, 0.1, 0.9, 0.7],
        [0.8, 0.3, 0.2, 0.4]
    ];
    let mut torch = TorchGenerator::manual_seed(42);
    let (w_q, w_k, w_v) = (
        torch.randn((4, 4)),
        torch.randn((4, 4)),
        torch.randn((4, 4)),
    );
    let projection = QkvProjection::new(w_q, w_k, w_v)?;
    let (q, k, v) = (
        projection.query(&x)?,
        projection.key(&x)?,
        projection.value(&x)?,
    );
    let trace = ScaledDotProduct::new().trace(&q, &k, &v)?;
    Ok(Tokyo {
        tokens,
        x,
        projection,
        trace,
    })
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    let demo = tokyo()?;
    let dims = ["d0", "d1", "d2", "d3"];
    let by_token = |title: &str, m: &Array2<f32>, cols: &[&str]| {
        Heatmap::new(title, m)
            .with_row_labels(demo.tokens)
            .with_col_labels(cols.iter().copied())
            .with_decimals(4)
    };
    let weight = |title: &str, m: &Array2<f32>| {
        Heatmap::new(title, m)
            .with_row_labels(["in0", "in1", "in2", "in3"])
            .with_col_labels(dims)
            .with_decimals(4)
    };
    println!("torch.manual_seed(42); W_Q, W_K, W_V = torch.randn(4, 4) three times\n");
    common::show(&weight("W_Q", demo.projection.w_q()));
    common::show(&weight("W_K", demo.projection.w_k()));
    common::show(&weight("W_V", demo.projection.w_v()));
    let panels = [
        by_token("input embeddings x", &demo.x, &dims),
        by_token("scores QKᵀ/√d_k", &demo.trace.scaled, &demo.tokens),
        by_token("attention weights", &demo.trace.weights, &demo.tokens),
        by_token("output weights·V", &demo.trace.output, &dims),
    ];
    for panel in &panels {
        common::show(panel);
    }
    common::show_in_colour(&panels[2]);
    common::save(&Figure::new(panels.to_vec()), "tokyo");
    Ok(())
}
