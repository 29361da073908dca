//! Gradients through attention: PyTorch's autograd (`tests/golden/grad.json`),
//! finite differences, and what masks do to them.

use crate::common;

use attn::{AttentionGradients, Error, Mask, ScaledDotProduct};
use common::{array_bool, array_f64, golden, max_abs_diff, random2, random4};
use ndarray::{Array1, Array2, Array4, ArrayD, Ix2};
use serde_json::Value;

/// A golden case's masks, as owned arrays that `Mask`s can borrow.
struct Masks {
    keep: Vec<ArrayD<bool>>,
    bias: Vec<ArrayD<f64>>,
    slopes: Vec<Array1<f64>>,
    kinds: Vec<(String, Value)>,
}

impl Masks {
    fn of(case: &Value) -> Self {
        let mut masks = Masks {
            keep: Vec::new(),
            bias: Vec::new(),
            slopes: Vec::new(),
            kinds: Vec::new(),
        };
        for m in case["masks"].as_array().expect("a list of masks") {
            let kind = m["kind"].as_str().expect("a kind").to_string();
            match kind.as_str() {
                "keep" => masks.keep.push(array_bool(&m["data"])),
                "bias" => masks.bias.push(array_f64(&m["data"])),
                "alibi" => masks.slopes.push(
                    array_f64(&m["data"])
                        .into_dimensionality()
                        .expect("1-D slopes"),
                ),
                _ => {}
            }
            masks.kinds.push((kind, m["data"].clone()));
        }
        masks
    }

    /// The attention these masks configure, with the case's scale.
    fn attention(&self, scale: &Value) -> ScaledDotProduct<'_, f64> {
        let mut attn = ScaledDotProduct::new();
        if let Some(scale) = scale.as_f64() {
            attn = attn.with_scale(scale);
        }
        let (mut keep, mut bias, mut slopes) =
            (self.keep.iter(), self.bias.iter(), self.slopes.iter());
        for (kind, data) in &self.kinds {
            attn = attn.with_mask(match kind.as_str() {
                "keep" => Mask::keep(keep.next().expect("a keep mask")),
                "bias" => Mask::bias(bias.next().expect("a bias")),
                "alibi" => Mask::Alibi(slopes.next().expect("slopes").view()),
                "causal_top_left" => Mask::CausalTopLeft,
                "causal_bottom_right" => Mask::CausalBottomRight,
                "sliding_window" => {
                    Mask::SlidingWindow(data.as_u64().expect("a window size") as usize)
                }
                other => panic!("unknown mask kind {other}"),
            });
        }
        attn
    }
}

/// The largest difference relative to the largest reference gradient.
fn relative_error(got: &ArrayD<f64>, want: &ArrayD<f64>) -> f64 {
    let scale = want.iter().fold(1e-300_f64, |m, x| m.max(x.abs()));
    max_abs_diff(got, want) / scale
}

#[test]
fn every_golden_case_in_f64_to_1e_10() {
    let file = golden("grad.json");
    let cases = file["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 17);
    for case in cases {
        let name = case["name"].as_str().expect("a name");
        let masks = Masks::of(case);
        let attn = masks.attention(&case["scale"]);
        let [q, k, v, d_out] = ["q", "k", "v", "d_out"].map(|f| array_f64(&case[f]));
        let grads: [ArrayD<f64>; 3] = if q.ndim() == 2 {
            fn two(x: &ArrayD<f64>) -> ndarray::ArrayView2<'_, f64> {
                x.view().into_dimensionality().expect("2-D")
            }
            let g = attn
                .backward(&two(&q), &two(&k), &two(&v), &two(&d_out))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            [g.q.into_dyn(), g.k.into_dyn(), g.v.into_dyn()]
        } else {
            fn four(x: &ArrayD<f64>) -> ndarray::ArrayView4<'_, f64> {
                x.view().into_dimensionality().expect("4-D")
            }
            let g = attn
                .backward_batched(&four(&q), &four(&k), &four(&v), &four(&d_out))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            [g.q.into_dyn(), g.k.into_dyn(), g.v.into_dyn()]
        };
        for (grad, field) in grads.iter().zip(["dq", "dk", "dv"]) {
            let e = relative_error(grad, &array_f64(&case[field]));
            assert!(e <= 1e-10, "{name} {field}: relative error {e:e}");
        }
    }
}

#[test]
fn f32_gradients_stay_within_float_rounding_of_the_golden_ones() {
    let file = golden("grad.json");
    for case in file["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("a name");
        if case["q"][0][0].is_array() || !case["masks"].as_array().expect("masks").is_empty() {
            continue; // 2-D, unmasked cases: the masks are f64-typed in `Masks`
        }
        let [q, k, v, d_out] = ["q", "k", "v", "d_out"].map(|f| {
            array_f64(&case[f])
                .into_dimensionality::<Ix2>()
                .expect("2-D")
                .mapv(|x| x as f32)
        });
        let mut attn = ScaledDotProduct::new();
        if let Some(scale) = case["scale"].as_f64() {
            attn = attn.with_scale(scale as f32);
        }
        let g = attn.backward(&q, &k, &v, &d_out).expect("valid");
        for (grad, field) in [g.q, g.k, g.v].iter().zip(["dq", "dk", "dv"]) {
            let e = relative_error(&grad.mapv(f64::from).into_dyn(), &array_f64(&case[field]));
            // a few f32 roundings of O(1) numbers through sums of up to 130 terms
            assert!(e <= 2e-5, "{name} {field}: relative error {e:e}");
        }
    }
}

/// `sum(output · d_out)` for the 2-D call.
fn loss(
    attn: &ScaledDotProduct<'_, f64>,
    q: &Array2<f64>,
    k: &Array2<f64>,
    v: &Array2<f64>,
    d_out: &Array2<f64>,
) -> f64 {
    (&attn.forward(q, k, v).expect("valid") * d_out).sum()
}

/// Central differences of the loss by every entry of `x` (one of q, k, v).
pub fn finite_difference(
    x: &Array2<f64>,
    mut loss_at: impl FnMut(&Array2<f64>) -> f64,
) -> Array2<f64> {
    let h = 1e-6;
    let mut grad = Array2::zeros(x.raw_dim());
    for (idx, g) in grad.indexed_iter_mut() {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus[idx] += h;
        minus[idx] -= h;
        *g = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h);
    }
    grad
}

#[test]
fn gradients_equal_finite_differences_with_every_mask() {
    let (l, s, d, d_v) = (4, 6, 5, 3);
    let (q, k, v, d_out) = (
        random2(l, d, 1),
        random2(s, d, 2),
        random2(s, d_v, 3),
        random2(l, d_v, 4),
    );
    let keep = Array2::from_shape_fn((l, s), |(i, j)| (i + 2 * j) % 5 != 1);
    let bias = random2(l, s, 5);
    let slopes = Array1::from(vec![0.3]);
    let configs = [
        ScaledDotProduct::new(),
        ScaledDotProduct::new()
            .with_scale(0.7)
            .with_mask(Mask::CausalTopLeft),
        ScaledDotProduct::new().with_mask(Mask::CausalBottomRight),
        ScaledDotProduct::new()
            .with_mask(Mask::keep(&keep))
            .with_mask(Mask::bias(&bias)),
        ScaledDotProduct::new().with_mask(Mask::SlidingWindow(2)),
        ScaledDotProduct::new().with_mask(Mask::Alibi(slopes.view())),
    ];
    for attn in &configs {
        let g = attn.backward(&q, &k, &v, &d_out).expect("valid");
        let fd_q = finite_difference(&q, |x| loss(attn, x, &k, &v, &d_out));
        let fd_k = finite_difference(&k, |x| loss(attn, &q, x, &v, &d_out));
        let fd_v = finite_difference(&v, |x| loss(attn, &q, &k, x, &d_out));
        for (name, got, want) in [("q", &g.q, &fd_q), ("k", &g.k, &fd_k), ("v", &g.v, &fd_v)] {
            let e = max_abs_diff(got, want);
            assert!(e < 1e-8, "{attn:?} d{name}: {e:e}");
        }
    }
}

#[test]
fn batched_grouped_query_gradients_sum_the_heads_of_a_group() {
    let (q, k, v, d_out) = (
        random4((2, 6, 5, 4), 10),
        random4((2, 3, 7, 4), 11),
        random4((2, 3, 7, 3), 12),
        random4((2, 6, 5, 3), 13),
    );
    let attn = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
    let g = attn.backward_batched(&q, &k, &v, &d_out).expect("valid");
    // the same call with every key/value head repeated for its two query heads
    let repeat = |x: &Array4<f64>| {
        Array4::from_shape_fn((2, 6, x.dim().2, x.dim().3), |(b, h, i, j)| {
            x[[b, h / 2, i, j]]
        })
    };
    let full = attn
        .backward_batched(&q, &repeat(&k), &repeat(&v), &d_out)
        .expect("valid");
    assert!(max_abs_diff(&g.q, &full.q) < 1e-15);
    let summed = |x: &Array4<f64>| {
        Array4::from_shape_fn((2, 3, x.dim().2, x.dim().3), |(b, h, i, j)| {
            x[[b, 2 * h, i, j]] + x[[b, 2 * h + 1, i, j]]
        })
    };
    assert!(max_abs_diff(&g.k, &summed(&full.k)) < 1e-15);
    assert!(max_abs_diff(&g.v, &summed(&full.v)) < 1e-15);
    // and each head alone is the 2-D call
    let head = |x: &Array4<f64>, b: usize, h: usize| x.slice(ndarray::s![b, h, .., ..]).to_owned();
    let one: AttentionGradients<f64, Ix2> = attn
        .backward(
            &head(&q, 1, 3),
            &head(&k, 1, 1),
            &head(&v, 1, 1),
            &head(&d_out, 1, 3),
        )
        .expect("valid");
    assert!(max_abs_diff(&one.q, &head(&g.q, 1, 3)) < 1e-15);
}

#[test]
fn masked_garbage_and_unseen_queries_change_nothing() {
    let (l, s) = (4, 5);
    let (q, k, mut v, d_out) = (
        random2(l, 3, 20),
        random2(s, 3, 21),
        random2(s, 2, 22),
        random2(l, 2, 23),
    );
    let mut keep = Array2::from_elem((l, s), true);
    keep.column_mut(4).fill(false); // key 4 is padding
    keep.row_mut(2).fill(false); // query 2 sees nothing
    let attn = ScaledDotProduct::new().with_mask(Mask::keep(&keep));
    let clean = attn.backward(&q, &k, &v, &d_out).expect("valid");
    let (mut k_bad, mut d_out_other) = (k.clone(), d_out.clone());
    k_bad.row_mut(4).fill(f64::NAN);
    v.row_mut(4).fill(f64::INFINITY);
    d_out_other.row_mut(2).fill(1e6); // the unseen query's d_out reaches nothing
    let dirty = attn.backward(&q, &k_bad, &v, &d_out_other).expect("valid");
    // the garbage sends the head to the reference path (the fused one checks its
    // inputs first): the same numbers, to rounding
    assert!(max_abs_diff(&dirty.q, &clean.q) < 1e-15);
    assert!(max_abs_diff(&dirty.v, &clean.v) < 1e-15);
    assert!(dirty.k.row(4).iter().all(|&x| x == 0.0)); // no query sees key 4
    assert!(
        max_abs_diff(
            &dirty.k.slice(ndarray::s![..4, ..]).to_owned(),
            &clean.k.slice(ndarray::s![..4, ..]).to_owned()
        ) < 1e-15
    );
    assert!(clean.q.row(2).iter().all(|&x| x == 0.0));
}

#[test]
fn d_out_of_the_wrong_shape_is_an_error() {
    let x = Array2::<f64>::ones((3, 4));
    let err = ScaledDotProduct::new()
        .backward(&x, &x, &x, &Array2::ones((3, 5)))
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "d_out (the gradient of the loss by the output) must have the output's shape: expected shape [3, 4], found [3, 5]"
    );
    let q = Array4::<f64>::ones((1, 2, 3, 4));
    let err = ScaledDotProduct::new()
        .backward_batched(&q, &q, &q, &Array4::ones((1, 2, 4, 4)))
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }));
    // the forward's own checks come first
    let err = ScaledDotProduct::new()
        .backward(&x, &Array2::ones((3, 2)), &x, &x)
        .unwrap_err();
    assert!(matches!(err, Error::QueryKeyWidth { .. }));
}

/// A golden array as a 2-D array.
fn array2_of(v: &Value) -> Array2<f64> {
    array_f64(v).into_dimensionality().expect("2-D")
}

#[test]
fn multi_head_gradients_match_torch_multihead_attention() {
    use attn::{MultiHeadConfig, MultiHeadWeights};
    use ndarray::{Array3, Ix1, Ix3};
    let file = golden("grad.json");
    for case in file["mha_cases"].as_array().expect("mha cases") {
        let name = case["name"].as_str().expect("a name");
        let d_model = case["d_model"].as_u64().expect("d_model") as usize;
        let n_heads = case["n_heads"].as_u64().expect("n_heads") as usize;
        let bias = |f: &str| {
            Some(
                array_f64(&case[f])
                    .into_dimensionality::<Ix1>()
                    .expect("1-D"),
            )
        };
        let weights = MultiHeadWeights {
            w_q: array2_of(&case["w_q"]),
            w_k: array2_of(&case["w_k"]),
            w_v: array2_of(&case["w_v"]),
            w_o: array2_of(&case["w_o"]),
            b_q: bias("b_q"),
            b_k: bias("b_k"),
            b_v: bias("b_v"),
            b_o: bias("b_o"),
            sinks: None,
        };
        let mha = MultiHeadConfig::new(d_model, n_heads)
            .with_weights(weights)
            .expect("valid weights");
        let three = |f: &str| -> Array3<f64> {
            array_f64(&case[f])
                .into_dimensionality::<Ix3>()
                .expect("3-D")
        };
        let (x, d_out) = (three("x"), three("d_out"));
        let keep = (!case["keep"].is_null()).then(|| array_bool(&case["keep"]));
        let masks: Vec<Mask<'_, f64>> = keep.iter().map(|k| Mask::keep(k)).collect();
        let out = mha.forward_batched(&x, &x, &x, &masks).expect("valid");
        let e = max_abs_diff(&out.into_dyn(), &array_f64(&case["output"]));
        assert!(e < 1e-12, "{name} output: {e:e}");
        let g = mha
            .backward_batched(&x, &x, &x, &masks, &d_out)
            .expect("valid");
        let grads = &case["grads"];
        let d_x = &g.query + &g.key + &g.value;
        let w = &g.weights;
        let got: [(&str, ArrayD<f64>); 9] = [
            ("x", d_x.into_dyn()),
            ("w_q", w.w_q.clone().into_dyn()),
            ("w_k", w.w_k.clone().into_dyn()),
            ("w_v", w.w_v.clone().into_dyn()),
            ("w_o", w.w_o.clone().into_dyn()),
            ("b_q", w.b_q.clone().expect("bias").into_dyn()),
            ("b_k", w.b_k.clone().expect("bias").into_dyn()),
            ("b_v", w.b_v.clone().expect("bias").into_dyn()),
            ("b_o", w.b_o.clone().expect("bias").into_dyn()),
        ];
        // relative to the largest gradient of the case: d b_k is exactly 0 in exact
        // arithmetic (a shift of every key moves a row's scores alike), and the
        // golden values there are PyTorch's rounding, around 1e-15
        let largest = got
            .iter()
            .map(|(field, _)| array_f64(&grads[*field]).fold(0.0_f64, |m, x| m.max(x.abs())))
            .fold(0.0_f64, f64::max);
        for (field, grad) in &got {
            let e = max_abs_diff(grad, &array_f64(&grads[*field])) / largest;
            assert!(e <= 1e-10, "{name} d{field}: relative error {e:e}");
        }
    }
}

#[test]
fn linear_gradients_equal_finite_differences() {
    use attn::Linear;
    let (x, w, b, d_y) = (
        random2(5, 4, 30),
        random2(4, 3, 31),
        random2(1, 3, 32),
        random2(5, 3, 33),
    );
    let bias = b.row(0).to_owned();
    let layer = Linear::new(w.clone())
        .with_bias(bias.clone())
        .expect("valid");
    let g = layer.backward(&x, &d_y).expect("valid");
    let loss = |x: &Array2<f64>, w: &Array2<f64>, b: &Array1<f64>| {
        let y = Linear::new(w.clone())
            .with_bias(b.clone())
            .expect("valid")
            .forward(x)
            .expect("valid");
        (&y * &d_y).sum()
    };
    let fd_x = finite_difference(&x, |x| loss(x, &w, &bias));
    let fd_w = finite_difference(&w, |w| loss(&x, w, &bias));
    let fd_b = finite_difference(&b, |b| loss(&x, &w, &b.row(0).to_owned()));
    assert!(max_abs_diff(&g.input, &fd_x) < 1e-8);
    assert!(max_abs_diff(&g.weight, &fd_w) < 1e-8);
    let d_b = g.bias.expect("a bias").insert_axis(ndarray::Axis(0));
    assert!(max_abs_diff(&d_b, &fd_b) < 1e-8);
    // batched: the rows of every batch together
    let x3 = x.clone().into_shape_with_order((1, 5, 4)).expect("reshape");
    let d_y3 = d_y
        .clone()
        .into_shape_with_order((1, 5, 3))
        .expect("reshape");
    let g3 = layer.backward_batched(&x3, &d_y3).expect("valid");
    assert_eq!(g3.weight, g.weight);
    assert!(layer.backward(&x, &random2(4, 3, 34)).is_err());
    assert!(
        layer
            .backward_batched(&x3, &d_y3.slice(ndarray::s![.., ..4, ..]))
            .is_err()
    );
}

#[test]
fn multi_head_gradients_with_grouped_query_heads_equal_finite_differences() {
    use attn::{Init, MultiHeadConfig};
    let mha = MultiHeadConfig::new(8, 4)
        .with_kv_heads(2)
        .random::<f64>(Init::XavierUniform, 3)
        .expect("valid");
    let (x, d_out) = (random2(5, 8, 40), random2(5, 8, 41));
    let g = mha
        .backward(&x, &x, &x, &[Mask::CausalTopLeft], &d_out)
        .expect("valid");
    let loss = |x: &Array2<f64>| {
        let out = mha.forward(x, x, x, &[Mask::CausalTopLeft]).expect("valid");
        (&out * &d_out).sum()
    };
    let fd = finite_difference(&x, loss);
    let d_x = &g.query + &g.key + &g.value;
    let e = max_abs_diff(&d_x, &fd);
    assert!(e < 1e-8, "{e:e}");
}

#[test]
fn bias_gradients_equal_finite_differences_and_sum_over_broadcast_axes() {
    let (l, s) = (4, 6);
    let (q, k, v, d_out) = (
        random2(l, 3, 80),
        random2(s, 3, 81),
        random2(s, 2, 82),
        random2(l, 2, 83),
    );
    let full = random2(l, s, 84);
    let per_key = random2(1, s, 85).row(0).to_owned(); // (S,): the same for every query
    let loss_with = |full: &Array2<f64>, per_key: &Array1<f64>| {
        let attn = ScaledDotProduct::new()
            .with_mask(Mask::CausalBottomRight)
            .with_mask(Mask::bias(full))
            .with_mask(Mask::bias(per_key));
        loss(&attn, &q, &k, &v, &d_out)
    };
    let attn = ScaledDotProduct::new()
        .with_mask(Mask::CausalBottomRight)
        .with_mask(Mask::bias(&full))
        .with_mask(Mask::bias(&per_key));
    for kernel in [attn::Kernel::Auto, attn::Kernel::Plain] {
        let g = attn
            .clone()
            .with_kernel(kernel)
            .backward(&q, &k, &v, &d_out)
            .expect("valid");
        assert_eq!(g.bias.len(), 2);
        assert_eq!(
            (g.bias[0].shape(), g.bias[1].shape()),
            (&[l, s][..], &[s][..])
        );
        let fd_full = finite_difference(&full, |b| loss_with(b, &per_key));
        let per_key2 = per_key.clone().insert_axis(ndarray::Axis(0));
        let fd_key = finite_difference(&per_key2, |b| loss_with(&full, &b.row(0).to_owned()));
        let got_full: Array2<f64> = g.bias[0].clone().into_dimensionality().expect("2-D");
        let got_key = g.bias[1]
            .clone()
            .insert_axis(ndarray::Axis(0))
            .into_dimensionality::<Ix2>()
            .expect("2-D");
        assert!(max_abs_diff(&got_full, &fd_full) < 1e-8, "{kernel:?}");
        assert!(max_abs_diff(&got_key, &fd_key) < 1e-8, "{kernel:?}");
        // masked positions (above the causal diagonal) get no gradient
        assert_eq!(got_full[[0, s - 1]], 0.0);
    }
}

#[test]
fn batched_bias_gradients_fused_equal_reference() {
    use ndarray::Array3;
    let q = random4((2, 4, 70, 8), 90);
    let (k, v) = (random4((2, 2, 140, 8), 91), random4((2, 2, 140, 5), 92));
    let d_out = random4((2, 4, 70, 5), 93);
    let per_batch = random4((2, 1, 70, 140), 94); // broadcast over heads
    let per_head: Array3<f64> = common::pseudo_random(&[4, 1, 140], 95)
        .into_dimensionality()
        .expect("3-D"); // broadcast over batch and queries
    // a zero bias of the scores' full shape changes nothing; its gradient is dS
    let zero = Array4::<f64>::zeros((2, 4, 70, 140));
    let run = |kernel| {
        ScaledDotProduct::new()
            .with_kernel(kernel)
            .with_mask(Mask::bias(&per_batch))
            .with_mask(Mask::CausalTopLeft)
            .with_mask(Mask::bias(&per_head))
            .with_mask(Mask::bias(&zero))
            .backward_batched(&q, &k, &v, &d_out)
            .expect("valid")
    };
    let (fused, plain) = (run(attn::Kernel::Fused), run(attn::Kernel::Plain));
    assert_eq!(fused.bias[0].shape(), &[2, 1, 70, 140]);
    assert_eq!(fused.bias[1].shape(), &[4, 1, 140]);
    for (f, p) in fused.bias.iter().zip(&plain.bias) {
        assert!(max_abs_diff(f, p) < 1e-12);
    }
    // each broadcast bias's gradient is dS summed over the axes it broadcasts along
    let d_s = &fused.bias[2]; // (2, 4, 70, 140)
    let over_heads = d_s.sum_axis(ndarray::Axis(1)).insert_axis(ndarray::Axis(1));
    assert!(max_abs_diff(&fused.bias[0], &over_heads.into_dyn()) < 1e-12);
    let over_batch_and_rows = d_s
        .sum_axis(ndarray::Axis(0))
        .sum_axis(ndarray::Axis(1))
        .insert_axis(ndarray::Axis(1));
    assert!(max_abs_diff(&fused.bias[1], &over_batch_and_rows.into_dyn()) < 1e-12);
    assert!(d_s.iter().any(|&x| x != 0.0));
}

#[test]
fn projection_gradients_equal_finite_differences() {
    use attn::{ProjectionShape, QkvProjection};
    let (w_q, w_k, w_v) = (random2(4, 3, 100), random2(5, 3, 101), random2(6, 2, 102));
    let (b_q, b_k, b_v) = (random2(1, 3, 103), random2(1, 3, 104), random2(1, 2, 105));
    let make = |w_q: &Array2<f64>, w_k: &Array2<f64>, w_v: &Array2<f64>| {
        QkvProjection::new(w_q.clone(), w_k.clone(), w_v.clone())
            .expect("valid")
            .with_biases(
                b_q.row(0).to_owned(),
                b_k.row(0).to_owned(),
                b_v.row(0).to_owned(),
            )
            .expect("valid")
    };
    let (x, keys_in, values_in) = (random2(3, 4, 106), random2(7, 5, 107), random2(7, 6, 108));
    let d_out = random2(3, 2, 109);
    let causal = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
    let loss_of =
        |proj: &QkvProjection<f64>, x: &Array2<f64>, keys: &Array2<f64>, values: &Array2<f64>| {
            let out = proj
                .cross_attention(x, keys, values, &causal)
                .expect("valid");
            (&out * &d_out).sum()
        };
    let proj = make(&w_q, &w_k, &w_v);
    assert_eq!(
        proj.shape(),
        ProjectionShape::new(4, 3, 2).with_context(5, 6)
    );
    let g = proj
        .cross_attention_backward(&x, &keys_in, &values_in, &causal, &d_out)
        .expect("valid");
    let checks = [
        (
            "x",
            g.query_in.clone(),
            finite_difference(&x, |x| loss_of(&proj, x, &keys_in, &values_in)),
        ),
        (
            "keys_in",
            g.key_in.clone(),
            finite_difference(&keys_in, |k| loss_of(&proj, &x, k, &values_in)),
        ),
        (
            "values_in",
            g.value_in.clone(),
            finite_difference(&values_in, |v| loss_of(&proj, &x, &keys_in, v)),
        ),
        (
            "w_q",
            g.w_q.clone(),
            finite_difference(&w_q, |w| {
                loss_of(&make(w, &w_k, &w_v), &x, &keys_in, &values_in)
            }),
        ),
        (
            "w_k",
            g.w_k.clone(),
            finite_difference(&w_k, |w| {
                loss_of(&make(&w_q, w, &w_v), &x, &keys_in, &values_in)
            }),
        ),
        (
            "w_v",
            g.w_v.clone(),
            finite_difference(&w_v, |w| {
                loss_of(&make(&w_q, &w_k, w), &x, &keys_in, &values_in)
            }),
        ),
    ];
    for (name, got, want) in &checks {
        let e = max_abs_diff(got, want);
        assert!(e < 1e-8, "d{name}: {e:e}");
    }
    // b_v's gradient is d_out's columns summed: each output row's weights sum to 1
    let b_v = g.b_v.expect("biases given");
    assert!(max_abs_diff(&b_v, &d_out.sum_axis(ndarray::Axis(0))) < 1e-12);
    assert!(g.b_q.is_some() && g.b_k.is_some());
    // self-attention: x's gradient is the sum of the three
    let square = QkvProjection::new(random2(4, 3, 110), random2(4, 3, 111), random2(4, 2, 112))
        .expect("valid");
    let s = square
        .self_attention_backward(&x, &causal, &d_out)
        .expect("valid");
    let fd = finite_difference(&x, |x| {
        (&square.self_attention(x, &causal).expect("valid") * &d_out).sum()
    });
    assert!(max_abs_diff(&(&s.query_in + &s.key_in + &s.value_in), &fd) < 1e-8);
}

/// Gradients through the layer's own settings: rotary embeddings (rotated back
/// in the backward), ALiBi, a sliding window, a head width of its own, a scale
/// and biases on some projections.
#[test]
fn multi_head_gradients_through_rope_alibi_and_scale_equal_finite_differences() {
    use attn::{Causality, Init, MultiHeadConfig, PositionEncoding, Projection, Rope, RopeLayout};
    let configs = [
        MultiHeadConfig::new(8, 4)
            .with_kv_heads(2)
            .with_head_dim(4)
            .with_scale(0.3)
            .with_bias_on(&[Projection::Query, Projection::Key])
            .with_causality(Causality::Causal)
            .with_positions(PositionEncoding::Rope(
                Rope::new(50.0)
                    .with_rotary_dim(2)
                    .with_layout(RopeLayout::Interleaved),
            )),
        MultiHeadConfig::new(8, 4)
            .with_causality(Causality::SlidingWindow(3))
            .with_positions(PositionEncoding::Alibi),
    ];
    for (n, config) in configs.into_iter().enumerate() {
        let mha = config
            .random::<f64>(Init::XavierUniform, 50)
            .expect("valid");
        let (x, d_out) = (random2(6, 8, 51), random2(6, 8, 52));
        let g = mha.backward(&x, &x, &x, &[], &d_out).expect("valid");
        let loss = |x: &Array2<f64>| (&mha.forward(x, x, x, &[]).expect("valid") * &d_out).sum();
        let fd = finite_difference(&x, loss);
        let e = max_abs_diff(&(&g.query + &g.key + &g.value), &fd);
        assert!(e < 1e-8, "config {n}: {e:e}");
    }
}
