//! The demos' own code paths against the golden numbers of the seeds.

mod common;

#[allow(dead_code)]
#[path = "../examples/tokyo.rs"]
mod tokyo;

use common::{array2, golden};
use ndarray::Array2;

/// Agreement to `digits` significant digits, entry by entry.
fn assert_digits(name: &str, got: &Array2<f64>, want: &Array2<f64>, digits: i32) {
    assert_eq!(got.dim(), want.dim(), "{name}: shapes");
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        let tolerance = 10f64.powi(-digits) * w.abs().max(1e-3);
        assert!((g - w).abs() <= tolerance, "{name} {idx:?}: {g} vs {w}");
    }
}

#[test]
fn tokyo_matches_the_notebook() {
    let file = golden("tokyo.json");
    let demo = tokyo::tokyo().expect("the demo runs");
    let f = |m: &Array2<f32>| m.mapv(f64::from);
    // the weights are the notebook's torch.randn draws, bit for bit
    assert_eq!(f(demo.projection.w_q()), array2(&file["w_q"]));
    assert_eq!(f(demo.projection.w_k()), array2(&file["w_k"]));
    assert_eq!(f(demo.projection.w_v()), array2(&file["w_v"]));
    assert_eq!(f(&demo.x), array2(&file["x"]));
    assert_digits(
        "scores",
        &f(&demo.trace.scaled),
        &array2(&file["scores"]),
        6,
    );
    assert_digits(
        "weights",
        &f(&demo.trace.weights),
        &array2(&file["weights"]),
        6,
    );
    assert_digits(
        "output",
        &f(&demo.trace.output),
        &array2(&file["output"]),
        6,
    );
    let tokens: Vec<String> = file["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("a token").to_string())
        .collect();
    assert_eq!(tokens, demo.tokens);
}
