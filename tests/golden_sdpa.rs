//! Every case of `golden/sdpa.json` (real PyTorch `scaled_dot_product_attention`,
//! float64), in f64 to 1e-12 and in f32 to PyTorch's f32 tolerance.

use crate::common;

use attn::{AttentionOutput, Element, Mask, ScaledDotProduct};
use common::{array_bool, array_f64, golden, max_abs_diff};
use ndarray::{ArrayD, Ix2, Ix4};
use serde_json::Value;

/// One golden case, run in element type `A`; returns (output, weights) as f64.
fn run<A: Element>(case: &Value) -> (ArrayD<f64>, ArrayD<f64>) {
    let to_a = |v: &Value| array_f64(v).mapv(A::from_f64);
    let (q, k, v) = (to_a(&case["q"]), to_a(&case["k"]), to_a(&case["v"]));
    let keep = match case["mask_kind"].as_str() {
        Some("keep") => Some(array_bool(&case["mask"])),
        _ => None,
    };
    let bias = match case["mask_kind"].as_str() {
        Some("additive") => Some(to_a(&case["mask"])),
        _ => None,
    };
    let mut attn = ScaledDotProduct::new();
    if let Some(scale) = case["scale"].as_f64() {
        attn = attn.with_scale(A::from_f64(scale));
    }
    attn = match case["mask_kind"].as_str().expect("mask_kind") {
        "none" => attn,
        "keep" => attn.with_mask(Mask::keep(keep.as_ref().expect("keep mask"))),
        "additive" => attn.with_mask(Mask::bias(bias.as_ref().expect("bias"))),
        "causal_top_left" => attn.with_mask(Mask::CausalTopLeft),
        "causal_bottom_right" => attn.with_mask(Mask::CausalBottomRight),
        other => panic!("unknown mask kind {other}"),
    };
    let to_f64 = |x: &ArrayD<A>| x.mapv(|a| a.to_f64().expect("finite conversion"));
    match q.ndim() {
        2 => {
            let dims = |x| view::<A, Ix2>(x);
            let AttentionOutput { output, weights } = attn
                .forward_with_weights(&dims(&q), &dims(&k), &dims(&v))
                .expect("valid case");
            (to_f64(&output.into_dyn()), to_f64(&weights.into_dyn()))
        }
        4 => {
            let dims = |x| view::<A, Ix4>(x);
            let AttentionOutput { output, weights } = attn
                .forward_batched_with_weights(&dims(&q), &dims(&k), &dims(&v))
                .expect("valid case");
            (to_f64(&output.into_dyn()), to_f64(&weights.into_dyn()))
        }
        n => panic!("unexpected rank {n}"),
    }
}

fn view<A, D: ndarray::Dimension>(x: &ArrayD<A>) -> ndarray::ArrayView<'_, A, D> {
    x.view()
        .into_dimensionality()
        .expect("rank as the case says")
}

fn cases() -> Vec<Value> {
    let file = golden("sdpa.json");
    let cases = file["cases"].as_array().expect("cases").clone();
    assert_eq!(cases.len(), 11, "every golden case is exercised");
    cases
}

#[test]
fn every_golden_case_in_f64_to_1e_12() {
    for case in cases() {
        let name = case["name"].as_str().expect("name");
        let (output, weights) = run::<f64>(&case);
        let (want_out, want_w) = (array_f64(&case["output"]), array_f64(&case["weights"]));
        let (e_out, e_w) = (
            max_abs_diff(&output, &want_out),
            max_abs_diff(&weights, &want_w),
        );
        assert!(e_out <= 1e-12, "{name}: output differs by {e_out:e}");
        assert!(e_w <= 1e-12, "{name}: weights differ by {e_w:e}");
    }
}

/// PyTorch's `assert_close` tolerance for float32: |got − want| ≤ atol + rtol·|want|.
fn close_f32(got: &ArrayD<f64>, want: &ArrayD<f64>) -> Result<(), String> {
    assert_eq!(got.shape(), want.shape());
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        if (g - w).abs() > 1e-5 + 1.3e-6 * w.abs() || g.is_nan() {
            return Err(format!("at {idx:?}: got {g}, want {w}"));
        }
    }
    Ok(())
}

#[test]
fn every_golden_case_in_f32_within_pytorch_tolerance() {
    for case in cases() {
        let name = case["name"].as_str().expect("name");
        let (output, weights) = run::<f32>(&case);
        close_f32(&output, &array_f64(&case["output"]))
            .unwrap_or_else(|e| panic!("{name} output {e}"));
        close_f32(&weights, &array_f64(&case["weights"]))
            .unwrap_or_else(|e| panic!("{name} weights {e}"));
    }
}

#[test]
fn fully_masked_golden_row_is_exactly_zero() {
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "keep_mask_with_empty_row")
        .expect("case present");
    let (output, weights) = run::<f64>(&case);
    let mask = array_bool(&case["mask"]);
    let empty_row = (0..mask.shape()[0])
        .find(|&i| mask.index_axis(ndarray::Axis(0), i).iter().all(|&m| !m))
        .expect("the case has a fully masked row");
    assert!(
        output
            .index_axis(ndarray::Axis(0), empty_row)
            .iter()
            .all(|&x| x == 0.0)
    );
    assert!(
        weights
            .index_axis(ndarray::Axis(0), empty_row)
            .iter()
            .all(|&x| x == 0.0)
    );
}
