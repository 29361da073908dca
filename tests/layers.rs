//! Projections, self-/cross-attention, multi-head attention and the seeds'
//! parameter-free forms.

use crate::common;

use attn::parameter_free::{FeatureMapAttention, cat, sa};
use attn::{
    Error, Init, Mask, MultiHeadConfig, MultiHeadWeights, ProjectionShape, QkvProjection,
    ScaledDotProduct, scaled_dot_product,
};
use common::{
    RefCausal, array_f64, array2, assert_close, golden, max_abs_diff, random2, reference,
};
use ndarray::{Array1, Array2, Array3, Axis, array, s};
use rand::Rng;

fn vector(v: &serde_json::Value) -> Array1<f64> {
    array_f64(v).into_dimensionality().expect("1-D")
}

#[test]
fn every_golden_multi_head_case_to_1e_10() {
    let file = golden("mha.json");
    let cases = file["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let size = |key: &str| case[key].as_u64().expect("size") as usize;
        let config = MultiHeadConfig::new(size("d_model"), size("n_heads"))
            .with_kdim(size("kdim"))
            .with_vdim(size("vdim"));
        let mha = config
            .with_weights(MultiHeadWeights {
                w_q: array2(&case["w_q"]),
                w_k: array2(&case["w_k"]),
                w_v: array2(&case["w_v"]),
                w_o: array2(&case["w_o"]),
                b_q: Some(vector(&case["b_q"])),
                b_k: Some(vector(&case["b_k"])),
                b_v: Some(vector(&case["b_v"])),
                b_o: Some(vector(&case["b_o"])),
                sinks: None,
            })
            .expect("golden weights fit");
        let (q, k, v) = (
            array2(&case["query"]),
            array2(&case["key"]),
            array2(&case["value"]),
        );
        let out = mha.forward_with_weights(&q, &k, &v, &[]).expect("valid");
        let e_out = max_abs_diff(&out.output, &array2(&case["output"]));
        let e_mean = max_abs_diff(&out.mean_weights, &array2(&case["weights_avg"]));
        let want_heads = array_f64(&case["weights_per_head"])
            .into_dimensionality()
            .expect("3-D");
        let e_heads = max_abs_diff(&out.head_weights, &want_heads);
        assert!(e_out <= 1e-10, "{name}: output off by {e_out:e}");
        assert!(e_mean <= 1e-10, "{name}: mean weights off by {e_mean:e}");
        assert!(e_heads <= 1e-10, "{name}: head weights off by {e_heads:e}");
        let fused = mha.forward(&q, &k, &v, &[]).expect("valid");
        assert!(
            max_abs_diff(&fused, &out.output) < 1e-14,
            "{name}: fused output differs"
        );
    }
}

#[test]
fn self_attention_is_core_attention_on_projected_inputs() {
    let x = random2(6, 5, 1);
    let proj = QkvProjection::random(ProjectionShape::new(5, 4, 3), Init::Normal { std: 0.5 }, 11)
        .expect("valid")
        .with_biases(
            array![0.1, -0.2, 0.3, 0.0],
            Array1::zeros(4),
            array![1.0, 2.0, 3.0],
        )
        .expect("bias lengths fit");
    let causal = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft);
    let got = proj
        .self_attention_with_weights(&x, &causal)
        .expect("valid");
    let (q, k, v) = (
        x.dot(proj.w_q()) + array![0.1, -0.2, 0.3, 0.0],
        x.dot(proj.w_k()),
        x.dot(proj.w_v()) + array![1.0, 2.0, 3.0],
    );
    let (want_out, want_w) = reference(
        q.view(),
        k.view(),
        v.view(),
        0.5,
        None,
        None,
        RefCausal::TopLeft,
    );
    assert_close(&got.output, &want_out, 1e-13);
    assert_close(&got.weights, &want_w, 1e-13);
    assert!(
        max_abs_diff(
            &proj.self_attention(&x, &causal).expect("valid"),
            &got.output
        ) < 1e-14
    );
}

#[test]
fn cross_attention_with_one_query_is_a_row_of_full_attention() {
    let shape = ProjectionShape::new(6, 4, 5).with_context(3, 7);
    let proj = QkvProjection::<f64>::random(shape, Init::XavierUniform, 3).expect("valid");
    let queries = random2(5, 6, 2);
    let (keys_in, values_in) = (random2(9, 3, 3), random2(9, 7, 4));
    let none = ScaledDotProduct::new();
    let full = proj
        .cross_attention_with_weights(&queries, &keys_in, &values_in, &none)
        .expect("valid");
    let cls = queries.slice(s![2..3, ..]);
    let one = proj
        .cross_attention_with_weights(&cls, &keys_in, &values_in, &none)
        .expect("valid");
    assert_eq!(one.output.dim(), (1, 5));
    assert_close(
        &one.output,
        &full.output.slice(s![2..3, ..]).to_owned(),
        1e-14,
    );
    assert_close(
        &one.weights,
        &full.weights.slice(s![2..3, ..]).to_owned(),
        1e-14,
    );
    assert!(matches!(
        proj.cross_attention(&cls, &values_in, &values_in, &none),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        proj.cross_attention(&cls, &keys_in, &random2(8, 7, 5), &none),
        Err(Error::KeyValueLength { .. })
    ));
}

#[test]
fn projection_constructor_errors() {
    let eye = Array2::<f64>::eye(3);
    assert!(matches!(
        QkvProjection::new(eye.clone(), Array2::zeros((3, 2)), eye.clone()),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        QkvProjection::new(Array2::zeros((3, 0)), Array2::zeros((3, 0)), eye.clone()),
        Err(Error::ZeroWidth { .. })
    ));
    let proj = QkvProjection::new(eye.clone(), eye.clone(), eye).expect("valid");
    let err = proj
        .clone()
        .with_biases(Array1::zeros(3), Array1::zeros(2), Array1::zeros(3))
        .unwrap_err();
    assert_eq!(
        err,
        Error::Shape {
            what: "b_k must be d_k long",
            expected: vec![3],
            found: vec![2]
        }
    );
    assert!(proj.query(&Array2::zeros((2, 4))).is_err());
    for init in [
        Init::Normal { std: f64::NAN },
        Init::Normal { std: -1.0 },
        Init::Uniform {
            low: 1.0,
            high: 1.0,
        },
        Init::Uniform {
            low: 0.0,
            high: f64::INFINITY,
        },
    ] {
        let err = QkvProjection::<f32>::random(ProjectionShape::new(2, 2, 2), init, 0).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{init:?}: {err}"
        );
    }
}

#[test]
fn seeded_weights_are_reproducible_and_pinned() {
    // the ChaCha8 stream is fixed by its specification: these numbers never change
    let first: u64 = attn::rng::seeded(42).random();
    assert_eq!(first, PINNED_CHACHA8_SEED_42);
    let shape = ProjectionShape::new(4, 3, 3);
    let a = QkvProjection::<f64>::random(shape, Init::XavierUniform, 5).expect("valid");
    let b =
        QkvProjection::<f64>::random_using(shape, Init::XavierUniform, &mut attn::rng::seeded(5))
            .expect("valid");
    let c = QkvProjection::<f64>::random(shape, Init::XavierUniform, 6).expect("valid");
    assert_eq!(a, b);
    assert_ne!(a, c);
    let a32 = QkvProjection::<f32>::random(shape, Init::XavierUniform, 5).expect("valid");
    assert_eq!(a32.w_q(), &a.w_q().mapv(|x| x as f32));
}

const PINNED_CHACHA8_SEED_42: u64 = 12_578_764_544_318_200_737;

#[test]
fn initialisations_have_their_bounds_and_spread() {
    let mut rng = attn::rng::seeded(1);
    let w: Array2<f64> = Init::XavierNormal
        .sample((200, 300), &mut rng)
        .expect("valid");
    let std = (w.mapv(|x| x * x).mean().expect("non-empty")).sqrt();
    let want = (2.0 / 500.0_f64).sqrt();
    assert!((std / want - 1.0).abs() < 0.02, "std {std} vs {want}");
    let w: Array2<f64> = Init::Normal { std: 3.0 }
        .sample((200, 200), &mut rng)
        .expect("valid");
    let std = (w.mapv(|x| x * x).mean().expect("non-empty")).sqrt();
    assert!((std / 3.0 - 1.0).abs() < 0.02, "std {std}");
    // PyTorch's MultiheadAttention: in-projection xavier over the packed (3E, E) matrix
    let e = 32;
    let mha = MultiHeadConfig::new(e, 4)
        .random::<f64>(Init::TorchMultihead, 2)
        .expect("valid");
    let in_bound = (6.0 / (4 * e) as f64).sqrt();
    let out_bound = 1.0 / (e as f64).sqrt();
    let weights = mha.weights();
    for w in [&weights.w_q, &weights.w_k, &weights.w_v] {
        let max = w.iter().fold(0.0_f64, |m, x| m.max(x.abs()));
        assert!(
            max <= in_bound && max > 0.9 * in_bound,
            "in-projection max {max} vs bound {in_bound}"
        );
    }
    let max = weights.w_o.iter().fold(0.0_f64, |m, x| m.max(x.abs()));
    assert!(max <= out_bound && max > 0.9 * out_bound);
    assert_eq!(weights.b_q, Some(Array1::zeros(e)));
}

#[test]
fn multi_head_config_errors() {
    let cases = [
        MultiHeadConfig::new(10, 3),
        MultiHeadConfig::new(0, 1),
        MultiHeadConfig::new(8, 0),
        MultiHeadConfig::new(8, 4).with_kv_heads(3),
        MultiHeadConfig::new(8, 4).with_kv_heads(0),
        MultiHeadConfig::new(8, 4).with_kdim(0),
        MultiHeadConfig::new(8, 4).with_vdim(0),
        MultiHeadConfig::new(8, 4).with_head_dim(0),
        MultiHeadConfig::new(8, 4).with_scale(0.0),
        MultiHeadConfig::new(8, 4).with_scale(f64::NAN),
        MultiHeadConfig::new(8, 4).with_causality(attn::Causality::SlidingWindow(0)),
        // rotary settings that do not fit a head of 2
        MultiHeadConfig::new(8, 4).with_positions(attn::PositionEncoding::Rope(
            attn::Rope::new(1e4).with_rotary_dim(4),
        )),
        MultiHeadConfig::new(8, 4)
            .with_positions(attn::PositionEncoding::Rope(attn::Rope::new(0.5))),
        MultiHeadConfig::new(8, 4).with_positions(attn::PositionEncoding::Rope(
            attn::Rope::new(1e4).with_scaling(attn::RopeScaling::Linear { factor: 0.0 }),
        )),
        MultiHeadConfig::new(8, 4).with_positions(attn::PositionEncoding::Rope(
            attn::Rope::new(1e4).with_scaling(attn::RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 4.0,
                high_freq_factor: 1.0,
                original_max_position_embeddings: 512,
            }),
        )),
    ];
    for config in cases {
        let err = config.random::<f32>(Init::XavierUniform, 0).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{config:?}: {err}"
        );
    }
    let w = |r, c| Array2::<f64>::zeros((r, c));
    let weights = MultiHeadWeights {
        w_q: w(8, 8),
        w_k: w(8, 8),
        w_v: w(8, 8),
        w_o: w(8, 8),
        b_q: None,
        b_k: None,
        b_v: None,
        b_o: None,
        sinks: None,
    };
    // biases missing from a configuration that has them
    assert!(matches!(
        MultiHeadConfig::new(8, 2).with_weights(weights.clone()),
        Err(Error::Shape { .. })
    ));
    // wrong key projection width for two kv heads
    assert!(matches!(
        MultiHeadConfig::new(8, 2)
            .with_kv_heads(1)
            .without_bias()
            .with_weights(weights.clone()),
        Err(Error::Shape { .. })
    ));
    let mha = MultiHeadConfig::new(8, 2)
        .without_bias()
        .with_weights(weights)
        .expect("fits");
    let x = Array2::<f64>::zeros((3, 8));
    assert!(matches!(
        mha.forward(&Array2::zeros((3, 7)), &x, &x, &[]),
        Err(Error::Shape { .. })
    ));
    // a 2-D call's errors name the caller's shapes, not the batch of one it runs as
    let err = mha
        .forward(&Array2::zeros((3, 4)), &x, &x, &[])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "query width must be d_model: expected shape [3, 8], found [3, 4]"
    );
    let err = mha
        .forward_with_weights(&x, &x, &Array2::zeros((4, 8)), &[])
        .unwrap_err();
    assert_eq!(
        err,
        Error::KeyValueLength {
            key: vec![3, 8],
            value: vec![4, 8]
        }
    );
    let err = mha
        .backward(&x, &x, &x, &[], &Array2::zeros((3, 5)))
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("expected shape [3, 8], found [3, 5]"),
        "{err}"
    );
    assert!(matches!(
        mha.forward(&x, &x, &Array2::zeros((4, 8)), &[]),
        Err(Error::KeyValueLength { .. })
    ));
    let x3 = Array3::<f64>::zeros((2, 3, 8));
    assert!(matches!(
        mha.forward_batched(&x3, &Array3::zeros((1, 3, 8)), &x3, &[]),
        Err(Error::BatchShape { .. })
    ));
    let bad_mask = Array2::from_elem((3, 4), true);
    assert!(matches!(
        mha.forward(&x, &x, &x, &[Mask::keep(&bad_mask)]),
        Err(Error::MaskShape { .. })
    ));
}

#[test]
fn grouped_query_heads_equal_repeated_kv_projections() {
    let (d, heads, kv_heads) = (12, 6, 2);
    let hd = d / heads;
    let gqa = MultiHeadConfig::new(d, heads)
        .with_kv_heads(kv_heads)
        .random::<f64>(Init::XavierNormal, 4)
        .expect("valid");
    // repeat each kv head's columns for the query heads that share it
    let group = heads / kv_heads;
    let repeat = |w: &Array2<f64>| {
        let cols: Vec<usize> = (0..heads)
            .flat_map(|h| (0..hd).map(move |c| (h / group) * hd + c))
            .collect();
        w.select(Axis(1), &cols)
    };
    let g = gqa.weights();
    let full = MultiHeadConfig::new(d, heads)
        .with_weights(MultiHeadWeights {
            w_q: g.w_q.clone(),
            w_k: repeat(&g.w_k),
            w_v: repeat(&g.w_v),
            w_o: g.w_o.clone(),
            b_q: g.b_q.clone(),
            b_k: Some(Array1::zeros(d)),
            b_v: Some(Array1::zeros(d)),
            b_o: g.b_o.clone(),
            sinks: None,
        })
        .expect("fits");
    let x = random2(7, d, 9);
    let a = gqa
        .forward_with_weights(&x, &x, &x, &[Mask::CausalTopLeft])
        .expect("valid");
    let b = full
        .forward_with_weights(&x, &x, &x, &[Mask::CausalTopLeft])
        .expect("valid");
    assert_close(&a.output, &b.output, 1e-13);
    assert_close(&a.head_weights, &b.head_weights, 1e-13);
}

#[test]
fn batched_multi_head_equals_each_sample_alone() {
    let mha = MultiHeadConfig::new(8, 2)
        .with_kdim(5)
        .random::<f64>(Init::TorchMultihead, 7)
        .expect("valid");
    let q = common::pseudo_random(&[3, 4, 8], 1)
        .into_dimensionality::<ndarray::Ix3>()
        .expect("3-D");
    let k = common::pseudo_random(&[3, 6, 5], 2)
        .into_dimensionality::<ndarray::Ix3>()
        .expect("3-D");
    let v = common::pseudo_random(&[3, 6, 8], 3)
        .into_dimensionality::<ndarray::Ix3>()
        .expect("3-D");
    let padding = ndarray::Array4::from_shape_fn((3, 1, 1, 6), |(b, _, _, j)| j < 6 - b);
    let batched = mha
        .forward_batched_with_weights(&q, &k, &v, &[Mask::keep(&padding)])
        .expect("valid");
    for b in 0..3 {
        let keep = padding.slice(s![b, 0, 0, ..]);
        let alone = mha
            .forward_with_weights(
                &q.index_axis(Axis(0), b),
                &k.index_axis(Axis(0), b),
                &v.index_axis(Axis(0), b),
                &[Mask::keep(&keep)],
            )
            .expect("valid");
        assert!(
            max_abs_diff(
                &batched.output.index_axis(Axis(0), b).to_owned(),
                &alone.output
            ) < 1e-14
        );
        assert!(
            max_abs_diff(
                &batched.mean_weights.index_axis(Axis(0), b).to_owned(),
                &alone.mean_weights
            ) < 1e-15
        );
        assert!(
            alone
                .head_weights
                .slice(s![.., .., 6 - b..])
                .iter()
                .all(|&w| w == 0.0)
        );
    }
}

#[test]
fn sa_and_cat_by_hand() {
    // SA([[1, 0], [0, 1]]): each token scores 1/√2 with itself and 0 with the other
    let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
    let e = (1.0 / 2f64.sqrt()).exp();
    let (p, r) = (e / (e + 1.0), 1.0 / (e + 1.0));
    let want = array![[p, r], [r, p]];
    assert_close(&sa(&x).expect("valid"), &want, 1e-15);
    // CAT(Q, K, V) = softmax(SA(Q)·SA(K)ᵀ/√d_k)·SA(V), step by step
    let q = array![[2.0, 0.0]];
    let k = array![[1.0, 1.0], [0.0, -1.0], [0.5, 0.5]];
    let v = array![[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 3.0, 0.0]];
    let (sq, sk, sv) = (sa(&q).expect("q"), sa(&k).expect("k"), sa(&v).expect("v"));
    assert_eq!(sq, q); // a single token attends to itself only
    let (want, _) = reference(
        sq.view(),
        sk.view(),
        sv.view(),
        1.0 / 2f64.sqrt(),
        None,
        None,
        RefCausal::None,
    );
    assert!(max_abs_diff(&cat(&q, &k, &v).expect("valid"), &want) < 1e-15);
    assert!(matches!(
        cat(&q, &k, &v.slice(s![..2, ..])),
        Err(Error::KeyValueLength { .. })
    ));
    assert!(matches!(
        cat(&array![[1.0]], &k, &v),
        Err(Error::QueryKeyWidth { .. })
    ));
}

#[test]
fn feature_map_by_hand() {
    // seed 000's 2×2×2 map: x[c][h][w]
    let x = array![[[0.1_f64, 0.2], [0.3, 0.4]], [[-0.5, 0.6], [0.7, -0.8]]];
    let out = FeatureMapAttention::new().forward(&x).expect("valid");
    // by hand: pixels n = h·2 + w, S[n][m] = Σ_c x[c][n]·x[c][m], A = softmax rows, o[c][n] = Σ_m x[c][m]·A[n][m]
    let px = |c: usize, n: usize| x[[c, n / 2, n % 2]];
    let mut a = Array2::<f64>::zeros((4, 4));
    for n in 0..4 {
        let scores: Vec<f64> = (0..4)
            .map(|m| px(0, n) * px(0, m) + px(1, n) * px(1, m))
            .collect();
        let total: f64 = scores.iter().map(|s| s.exp()).sum();
        for m in 0..4 {
            a[[n, m]] = scores[m].exp() / total;
        }
    }
    let o = Array3::from_shape_fn((2, 2, 2), |(c, h, w)| {
        (0..4).map(|m| px(c, m) * a[[h * 2 + w, m]]).sum()
    });
    assert_close(&out.weights, &a, 1e-15);
    assert_close(&out.output, &o, 1e-15);
    let gamma = 0.3;
    let residual = FeatureMapAttention::new()
        .with_residual(gamma)
        .forward(&x)
        .expect("valid");
    assert_close(&residual.output, &(&o * gamma + &x), 1e-15);
    // batched equals each map alone; no channels is an error
    let batch = ndarray::stack(Axis(0), &[x.view(), (&x * 2.0).view()]).expect("same shapes");
    let both = FeatureMapAttention::new()
        .forward_batched(&batch)
        .expect("valid");
    assert_eq!(both.output.index_axis(Axis(0), 0), out.output);
    assert_eq!(both.weights.index_axis(Axis(0), 0), out.weights);
    assert!(matches!(
        FeatureMapAttention::<f64>::new().forward(&Array3::zeros((0, 2, 2))),
        Err(Error::ZeroWidth { .. })
    ));
}

#[test]
fn projected_widths_may_be_non_square() {
    // seed 004: embeddings of 4 mapped to 3
    let words = array![
        [1.0_f64, 0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, 1.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0]
    ];
    let file = golden("four_words.json");
    let proj = QkvProjection::new(
        array2(&file["w_q"]),
        array2(&file["w_k"]),
        array2(&file["w_v"]),
    )
    .expect("valid");
    assert_eq!(proj.query(&words).expect("fits"), array2(&file["q"]));
    let out = proj
        .self_attention(&words, &ScaledDotProduct::new())
        .expect("valid");
    let want = scaled_dot_product(
        &array2(&file["q"]),
        &array2(&file["k"]),
        &array2(&file["v"]),
    )
    .expect("valid");
    assert_eq!(out, want);
    assert_close(&out, &array2(&file["attention_rows"]), 1e-12);
}

#[test]
fn multi_head_fully_masked_row_gives_zero_weights_not_nan() {
    // PyTorch's MultiheadAttention returns NaN here (pytorch/pytorch#160064)
    let mha = MultiHeadConfig::new(8, 2)
        .random::<f64>(Init::TorchMultihead, 3)
        .expect("valid");
    let x = random2(3, 8, 50);
    let mut keep = Array2::from_elem((3, 3), true);
    keep.row_mut(1).fill(false);
    let out = mha
        .forward_with_weights(&x, &x, &x, &[Mask::keep(&keep)])
        .expect("valid");
    assert!(
        out.head_weights
            .slice(s![.., 1, ..])
            .iter()
            .all(|&w| w == 0.0)
    );
    assert!(out.mean_weights.row(1).iter().all(|&w| w == 0.0));
    // the row's attention is 0, so its output is the output bias alone
    let bias = mha.weights().b_o.clone().expect("biases on");
    assert_eq!(out.output.row(1), bias);
    assert!(out.output.iter().all(|x| x.is_finite()));
}

/// A layer with its own head width (T5), a scale, biases on some projections, and
/// each setting doing what it says: checked against attention by hand on the
/// layer's own weights.
#[test]
fn head_dim_scale_and_biases_per_projection() {
    use attn::{Projection, ScaledDotProduct};
    let config = MultiHeadConfig::new(6, 2)
        .with_head_dim(5)
        .with_kv_heads(1)
        .with_scale(0.7)
        .with_bias_on(&[Projection::Query, Projection::Output]);
    let mha = config.random::<f64>(Init::XavierUniform, 4).expect("valid");
    let w = mha.weights();
    assert_eq!(
        (w.w_q.dim(), w.w_k.dim(), w.w_o.dim()),
        ((6, 10), (6, 5), (10, 6))
    );
    assert!(w.b_q.is_some() && w.b_k.is_none() && w.b_v.is_none() && w.b_o.is_some());
    let x = common::random2(4, 6, 5);
    let got = mha.forward(&x, &x, &x, &[]).expect("valid");
    let q = x.dot(&w.w_q) + w.b_q.as_ref().expect("bias");
    let (k, v) = (x.dot(&w.w_k), x.dot(&w.w_v));
    let heads: Vec<Array2<f64>> = (0..2)
        .map(|h| {
            let qh = q.slice(ndarray::s![.., h * 5..(h + 1) * 5]);
            ScaledDotProduct::new()
                .with_scale(0.7)
                .forward(&qh, &k, &v)
                .expect("valid")
        })
        .collect();
    let views: Vec<_> = heads.iter().map(|h| h.view()).collect();
    let want = ndarray::concatenate(ndarray::Axis(1), &views)
        .expect("same rows")
        .dot(&w.w_o)
        + w.b_o.as_ref().expect("bias");
    let e = common::max_abs_diff(&got, &want);
    assert!(e < 1e-14, "{e:e}");
}

/// Rotary embeddings in the layer equal `rope` applied by hand to the projected
/// heads at positions 0, 1, …; ALiBi in the layer equals `Mask::Alibi` with the
/// standard slopes.
#[test]
fn rope_and_alibi_in_the_layer_equal_their_manual_forms() {
    use attn::{Causality, PositionEncoding, Rope, RopeLayout, ScaledDotProduct, rope};
    let x = common::random2(5, 8, 6).insert_axis(ndarray::Axis(0));
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let base = MultiHeadConfig::new(8, 2).with_causality(Causality::Causal);
        let plain = base.random::<f64>(Init::XavierUniform, 8).expect("valid");
        let rotary = base
            .with_positions(PositionEncoding::Rope(Rope::new(100.0).with_layout(layout)))
            .with_weights(plain.weights())
            .expect("same shapes");
        let heads = plain.project(&x, &x, &x).expect("valid");
        let mut rotated = heads.clone();
        for which in [0, 1] {
            for h in 0..2 {
                let target = if which == 0 {
                    &mut rotated.q
                } else {
                    &mut rotated.k
                };
                let source = if which == 0 { &heads.q } else { &heads.k };
                let r = rope(
                    &source.slice(ndarray::s![0, h, .., ..]),
                    &[0, 1, 2, 3, 4],
                    100.0,
                    layout,
                )
                .expect("valid");
                target.slice_mut(ndarray::s![0, h, .., ..]).assign(&r);
            }
        }
        assert_eq!(rotary.project(&x, &x, &x).expect("valid"), rotated);
        let by_hand = ScaledDotProduct::new()
            .with_mask(Mask::CausalBottomRight)
            .forward_batched(&rotated.q, &rotated.k, &rotated.v)
            .expect("valid");
        let e = common::max_abs_diff(
            &rotary.forward_batched(&x, &x, &x, &[]).expect("valid"),
            &plain.output(&by_hand).expect("valid"),
        );
        assert!(e < 1e-14, "{layout:?}: {e:e}");
    }
    let alibi = MultiHeadConfig::new(8, 4)
        .with_causality(Causality::Causal)
        .with_positions(PositionEncoding::Alibi)
        .random::<f64>(Init::XavierUniform, 9)
        .expect("valid");
    let slopes = ndarray::Array1::from(attn::alibi_slopes(4));
    let heads = alibi.project(&x, &x, &x).expect("valid");
    let by_hand = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .with_mask(Mask::Alibi(slopes.view()))
        .forward_batched(&heads.q, &heads.k, &heads.v)
        .expect("valid");
    let e = common::max_abs_diff(
        &alibi.forward_batched(&x, &x, &x, &[]).expect("valid"),
        &alibi.output(&by_hand).expect("valid"),
    );
    assert!(e < 1e-14, "alibi: {e:e}");
}

/// A padded row gives the numbers of its sequence alone, left or right padded,
/// with rotary embeddings, ALiBi or a sliding window.
#[test]
fn padded_rows_equal_their_sequences_alone() {
    use attn::{Causality, PositionEncoding, Rope};
    let configs = [
        MultiHeadConfig::new(8, 4)
            .with_kv_heads(2)
            .with_causality(Causality::Causal)
            .with_positions(PositionEncoding::Rope(Rope::new(1e4).with_rotary_dim(1))),
        MultiHeadConfig::new(8, 4)
            .with_kv_heads(2)
            .with_causality(Causality::Causal)
            .with_positions(PositionEncoding::Rope(Rope::new(1e4))),
        MultiHeadConfig::new(8, 4)
            .with_causality(Causality::Causal)
            .with_positions(PositionEncoding::Alibi),
        MultiHeadConfig::new(8, 2).with_causality(Causality::SlidingWindow(2)),
        MultiHeadConfig::new(8, 2),
    ];
    let seq = common::random2(4, 8, 11);
    for (n, config) in configs.into_iter().enumerate() {
        let Ok(mha) = config.random::<f64>(Init::XavierUniform, 12) else {
            assert_eq!(n, 0, "only the odd rotary width is invalid");
            continue;
        };
        let alone = mha
            .forward(&seq, &seq, &seq, &[])
            .expect("valid")
            .insert_axis(ndarray::Axis(0));
        let junk = common::random2(3, 8, 13);
        for left in [true, false] {
            let parts = if left {
                [junk.view(), seq.view()]
            } else {
                [seq.view(), junk.view()]
            };
            let padded = ndarray::concatenate(ndarray::Axis(0), &parts)
                .expect("same width")
                .insert_axis(ndarray::Axis(0));
            let real = Array2::from_shape_fn((1, 7), |(_, t)| if left { t >= 3 } else { t < 4 });
            let out = mha.forward_padded(&padded, &real, &[]).expect("valid");
            let rows = if left {
                ndarray::s![.., 3.., ..]
            } else {
                ndarray::s![.., ..4, ..]
            };
            let e = common::max_abs_diff(&out.slice(rows).to_owned(), &alone);
            assert!(e < 1e-14, "config {n}, left {left}: {e:e}");
        }
    }
}

/// A padded batch whose row has padding between its real tokens gives each
/// row's numbers alone, whatever reads distances (ALiBi, a window, a mask of
/// the call) and with the weights.
#[test]
fn padding_between_real_tokens_gives_each_sequence_alone() {
    use attn::{Causality, PositionEncoding, Rope};
    // row 0 has padding between its tokens, row 1 on the right
    let x = Array3::from_shape_vec((2, 5, 8), random2(10, 8, 31).into_raw_vec_and_offset().0)
        .expect("10 rows of 8");
    let real = array![
        [true, false, true, false, true],
        [true, true, true, false, false]
    ];
    let alibi = MultiHeadConfig::new(8, 2).with_positions(PositionEncoding::Alibi);
    let window = MultiHeadConfig::new(8, 2).with_causality(Causality::SlidingWindow(2));
    let rope = MultiHeadConfig::new(8, 2)
        .with_causality(Causality::Causal)
        .with_positions(PositionEncoding::Rope(Rope::new(1e4)));
    let plain = MultiHeadConfig::new(8, 2);
    // a bias of the call in the caller's slots: (B, 1, L, L), and its blocks alone
    let bias = Array2::from_shape_fn((5, 5), |(i, j)| (i * 5 + j) as f64 / 10.0);
    let biases = ndarray::stack(Axis(0), &[bias.view(), (-&bias).view()])
        .expect("same shape")
        .insert_axis(Axis(1));
    for (n, config) in [alibi, window, rope, plain].into_iter().enumerate() {
        let mha = config
            .random::<f64>(Init::XavierUniform, 32 + n as u64)
            .expect("valid");
        for call in [
            vec![],
            vec![Mask::SlidingWindow(2)],
            vec![Mask::bias(&biases)],
        ] {
            let out = mha
                .forward_padded_with_weights(&x, &real, &call)
                .expect("valid");
            for b in 0..2 {
                let keep: Vec<usize> = (0..5).filter(|&t| real[[b, t]]).collect();
                let seq = x.index_axis(Axis(0), b).select(Axis(0), &keep);
                let seq = seq.insert_axis(Axis(0));
                let own_bias = biases
                    .slice(s![b..=b, .., .., ..])
                    .select(Axis(2), &keep)
                    .select(Axis(3), &keep);
                let alone_call: Vec<Mask<'_, f64>> = match &call[..] {
                    [Mask::Bias(_)] => vec![Mask::Bias(own_bias.into_dyn().into())],
                    _ => call.clone(),
                };
                let alone = mha
                    .forward_batched_with_weights(&seq, &seq, &seq, &alone_call)
                    .expect("valid");
                let got = out.output.slice(s![b..=b, .., ..]).select(Axis(1), &keep);
                let e = max_abs_diff(&got, &alone.output);
                assert!(e < 1e-14, "layer {n}, row {b}: {e:e}");
                let weights = (out.head_weights.slice(s![b..=b, .., .., ..]))
                    .select(Axis(2), &keep)
                    .select(Axis(3), &keep);
                let e = max_abs_diff(&weights, &alone.head_weights);
                assert!(e < 1e-14, "layer {n}, row {b}, weights: {e:e}");
                // no weight on padding keys
                for t in (0..5).filter(|&t| !real[[b, t]]) {
                    let on_pad = out.head_weights.slice(s![b, .., .., t]);
                    assert!(on_pad.iter().all(|&w| w == 0.0), "layer {n}, row {b}");
                }
            }
        }
    }
}

/// A right-padded prompt, then decoding: through a cache that keeps every
/// position, a layer with ALiBi (BLOOM) or a sliding window (Mistral, its window
/// then a mask) gives each row's numbers alone at every step; the ring that
/// `new_cache` makes for a windowed layer refuses, naming the row.
#[test]
fn cached_padding_between_real_tokens_gives_each_sequence_alone() {
    use attn::{Causality, KvCache, PositionEncoding};
    let alibi = MultiHeadConfig::new(8, 2).with_positions(PositionEncoding::Alibi);
    let window = MultiHeadConfig::new(8, 2)
        .with_kv_heads(1)
        .with_causality(Causality::SlidingWindow(3));
    let steps = [
        array![[true, true, true, true], [true, true, false, false]],
        array![[true, false], [true, true]],
        array![[true], [true]],
        array![[true], [true]],
    ];
    for (n, config) in [alibi, window].into_iter().enumerate() {
        let mha = config
            .random::<f64>(Init::XavierUniform, 40 + n as u64)
            .expect("valid");
        let (kv, hd) = (mha.config().n_kv_heads(), mha.config().head_dim());
        // the layer's scale and window apply whatever the cache
        let mut cache = KvCache::<f64>::new(2, kv, hd, hd);
        let mut alone = [0, 1].map(|_| KvCache::<f64>::new(1, kv, hd, hd));
        for (i, real) in steps.iter().enumerate() {
            let t = real.ncols();
            let x = Array3::from_shape_vec(
                (2, t, 8),
                random2(2 * t, 8, 50 + i as u64).into_raw_vec_and_offset().0,
            )
            .expect("2·t rows of 8");
            let out = mha
                .forward_cached_padded(&x, real, &mut cache)
                .expect("a cache that keeps every position");
            for b in 0..2 {
                let keep: Vec<usize> = (0..t).filter(|&j| real[[b, j]]).collect();
                let mine = x.slice(s![b..=b, .., ..]).select(Axis(1), &keep);
                let want = mha.forward_cached(&mine, &mut alone[b]).expect("valid");
                let got = out.slice(s![b..=b, .., ..]).select(Axis(1), &keep);
                let e = common::max_abs_diff(&got, &want);
                assert!(e < 1e-14, "layer {n}, step {i}, row {b}: {e:e}");
            }
        }
    }
    let mistral = MultiHeadConfig::new(8, 2)
        .with_causality(Causality::SlidingWindow(3))
        .random::<f64>(Init::XavierUniform, 42)
        .expect("valid");
    let mut ring = mistral.new_cache(2);
    let x = Array3::from_shape_vec((2, 4, 8), random2(8, 8, 60).into_raw_vec_and_offset().0)
        .expect("8 rows of 8");
    mistral
        .forward_cached_padded(&x, &steps[0], &mut ring)
        .expect("one run per row");
    let err = mistral
        .forward_cached_padded(&x.slice(s![.., ..1, ..]), &steps[2], &mut ring)
        .expect_err("padding between real tokens in a ring");
    assert!(err.to_string().contains("batch row 1"), "{err}");
}
