//! Programmable attention inside the layer: a `MultiHeadAttention` with
//! Gemma 2's soft-cap, gpt-oss's sinks and YaRN rotary embeddings equals
//! `FlexAttention` on its projected heads, its gradients equal finite
//! differences (the sinks' included), its cached decoding equals one call, and
//! bad settings are errors.

use attn::flex::SoftCap;
use attn::{
    Causality, Init, Mask, MultiHeadAttention, MultiHeadConfig, PositionEncoding, Rope,
    RopeScaling, ScaledDotProduct, kernel_paths,
};
use ndarray::{Array1, Array2, Array3, Axis, s};

use crate::common::{assert_close, max_abs_diff, pseudo_random, random2};
use crate::grad::finite_difference;

/// YaRN as gpt-oss configures it, on a short original context so that the
/// ramp falls inside the head's pairs.
fn yarn() -> Rope {
    Rope::new(100.0).with_scaling(RopeScaling::Yarn {
        factor: 32.0,
        original_max_position_embeddings: 64,
        beta_fast: 32.0,
        beta_slow: 1.0,
        truncate: false,
        attention_factor: 0.1 * 32f64.ln() + 1.0,
    })
}

/// A layer with a soft-cap, sinks (random, not the zeros `random` gives) and
/// YaRN, causal within `causality`.
fn layer(causality: Causality) -> MultiHeadAttention<f64> {
    let config = MultiHeadConfig::new(16, 4)
        .with_kv_heads(2)
        .with_scale(0.6)
        .with_softcap(3.0)
        .with_sinks()
        .with_causality(causality)
        .with_positions(PositionEncoding::Rope(yarn()));
    let mut weights = config
        .random::<f64>(Init::XavierUniform, 7)
        .expect("valid")
        .weights();
    weights.sinks = Some(Array1::from_vec(vec![0.5, -1.0, 1.5, 0.0]));
    config.with_weights(weights).expect("valid")
}

fn input(batch: usize, len: usize, seed: u64) -> Array3<f64> {
    pseudo_random(&[batch, len, 16], seed)
        .into_dimensionality()
        .expect("3-D")
}

#[test]
fn a_layer_with_softcap_and_sinks_is_flex_attention_on_its_heads() {
    let mha = layer(Causality::SlidingWindow(4));
    let x = input(2, 7, 1);
    let heads = mha.project(&x, &x, &x).expect("valid");
    let sinks = mha.weights().sinks.expect("sinks");
    let by_hand = ScaledDotProduct::new()
        .with_scale(0.6)
        .with_mask(Mask::SlidingWindow(4))
        .with_score_mod(SoftCap::new(3.0))
        .with_sinks(&sinks)
        .forward(&heads.q, &heads.k, &heads.v)
        .expect("valid");
    let out = mha
        .forward_batched_with_weights(&x, &x, &x, &[])
        .expect("valid");
    assert_close(&out.output, &mha.output(&by_hand).expect("valid"), 1e-13);
    // the sinks take weight: every row sums to less than 1
    for row in out.head_weights.lanes(Axis(3)) {
        assert!(row.sum() < 1.0 - 1e-3 && row.sum() > 0.0);
    }
    // and the fused path (every head of the batch on it) equals the weights' pass
    let (fast, paths) = kernel_paths(|| mha.forward_batched(&x, &x, &x, &[]).expect("valid"));
    assert_eq!(paths.reference, 0, "{paths:?}");
    assert_eq!(paths.tiled + paths.direct + paths.rowwise, 8, "{paths:?}");
    assert_close(&fast, &out.output, 1e-13);
}

#[test]
fn layer_gradients_through_softcap_sinks_and_yarn_equal_finite_differences() {
    let mha = layer(Causality::Causal);
    let (x, d_out) = (random2(6, 16, 11), random2(6, 16, 12));
    let (g, paths) = kernel_paths(|| mha.backward(&x, &x, &x, &[], &d_out).expect("valid"));
    // the four heads' kept forward (the tiled kernel) and their backward, fused
    assert_eq!(
        (paths.reference, paths.tiled, paths.backward),
        (0, 4, 4),
        "{paths:?}"
    );
    let loss = |mha: &MultiHeadAttention<f64>, x: &Array2<f64>| {
        (&mha.forward(x, x, x, &[]).expect("valid") * &d_out).sum()
    };
    let fd = finite_difference(&x, |x| loss(&mha, x));
    let e = max_abs_diff(&(&g.query + &g.key + &g.value), &fd);
    assert!(e < 1e-8, "inputs: {e:e}");
    // each sink's gradient, by moving that sink
    let h = 1e-6;
    let sinks = mha.weights().sinks.expect("sinks");
    let d_sinks = g.weights.sinks.expect("a gradient for the sinks");
    for head in 0..sinks.len() {
        let moved = |by: f64| {
            let mut weights = mha.weights();
            weights.sinks.as_mut().expect("sinks")[head] += by;
            let moved = mha.config().with_weights(weights).expect("valid");
            loss(&moved, &x)
        };
        let want = (moved(h) - moved(-h)) / (2.0 * h);
        assert!(
            (d_sinks[head] - want).abs() < 1e-8,
            "sink {head}: {} vs {want}",
            d_sinks[head]
        );
    }
    // a layer without sinks has no gradient for them
    let plain = MultiHeadConfig::new(16, 4)
        .random::<f64>(Init::XavierUniform, 1)
        .expect("valid");
    let g = plain.backward(&x, &x, &x, &[], &d_out).expect("valid");
    assert!(g.weights.sinks.is_none());
}

#[test]
fn cached_decoding_with_softcap_and_sinks_equals_one_call() {
    for causality in [Causality::Causal, Causality::SlidingWindow(3)] {
        let mha = layer(causality);
        let x = input(2, 9, 21);
        let whole = mha.forward_batched(&x, &x, &x, &[]).expect("valid");
        let mut cache = mha.new_cache(2);
        // a prompt of 4, one token, a chunk of 3, one token
        let mut start = 0;
        for len in [4, 1, 3, 1] {
            let chunk = x.slice(s![.., start..start + len, ..]).to_owned();
            let (out, paths) =
                kernel_paths(|| mha.forward_cached(&chunk, &mut cache).expect("valid"));
            assert_eq!(paths.reference, 0, "{causality}: {paths:?}");
            let want = whole.slice(s![.., start..start + len, ..]);
            let e = max_abs_diff(&out, &want.to_owned());
            assert!(
                e < 1e-13,
                "{causality}: tokens {start}..{}: {e:e}",
                start + len
            );
            start += len;
        }
    }
}

/// Packed sequences (one empty) give what each gives alone: causal, in a
/// window, with YaRN positions restarting per sequence, soft-cap and sinks;
/// and a non-causal layer with ALiBi.
#[test]
fn packed_sequences_equal_each_alone() {
    let encoder = MultiHeadConfig::new(16, 4)
        .with_positions(PositionEncoding::Alibi)
        .random::<f64>(Init::XavierUniform, 3)
        .expect("valid");
    let layers = [
        layer(Causality::Causal),
        layer(Causality::SlidingWindow(5)),
        encoder,
    ];
    let offsets = [0, 70, 70, 75, 150];
    let x: Array2<f64> = pseudo_random(&[150, 16], 31)
        .into_dimensionality()
        .expect("2-D");
    for (n, mha) in layers.iter().enumerate() {
        let (packed, paths) = kernel_paths(|| mha.forward_packed(&x, &offsets).expect("valid"));
        assert_eq!(
            (paths.reference, paths.tiled),
            (0, 4),
            "layer {n}: {paths:?}"
        );
        for w in offsets.windows(2).filter(|w| w[0] < w[1]) {
            let one = x.slice(s![w[0]..w[1], ..]);
            let alone = mha.forward(&one, &one, &one, &[]).expect("valid");
            let e = max_abs_diff(&packed.slice(s![w[0]..w[1], ..]).to_owned(), &alone);
            assert!(e < 1e-13, "layer {n}, tokens {}..{}: {e:e}", w[0], w[1]);
        }
    }
    let mha = &layers[0];
    for (offsets, what) in [
        (&[0, 70, 149][..], "end at x's rows"),
        (&[0, 80, 70, 150][..], "never decrease"),
        (&[5, 150][..], "start at 0"),
    ] {
        let err = mha.forward_packed(&x, offsets).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}

#[test]
fn bad_softcaps_and_sinks_are_errors() {
    let config = MultiHeadConfig::new(8, 2);
    for cap in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = config
            .with_softcap(cap)
            .random::<f64>(Init::XavierUniform, 0)
            .unwrap_err();
        assert!(err.to_string().contains("soft-cap"), "{err}");
    }
    let with_sinks = config.with_sinks();
    let weights = with_sinks
        .random::<f64>(Init::XavierUniform, 0)
        .expect("valid")
        .weights();
    assert_eq!(weights.sinks, Some(Array1::zeros(2)));
    for (sinks, what) in [
        (None, "sinks"),
        (Some(Array1::zeros(3)), "sinks"),
        (Some(Array1::from_vec(vec![0.0, f64::NAN])), "finite"),
    ] {
        let mut bad = weights.clone();
        bad.sinks = sinks;
        let err = with_sinks.with_weights(bad).unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    // sinks given to a layer configured without them
    let err = config.with_weights(weights).unwrap_err();
    assert!(err.to_string().contains("sinks"), "{err}");
}

#[test]
fn bad_yarn_settings_are_errors() {
    let yarn = |beta_fast: f64, factor: f64, attention_factor: f64| {
        Rope::new(1e4).with_scaling(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: 4096,
            beta_fast,
            beta_slow: 1.0,
            truncate: true,
            attention_factor,
        })
    };
    assert!(yarn(32.0, 8.0, 1.2).check(64).is_ok());
    for rope in [
        yarn(1.0, 8.0, 1.2),
        yarn(32.0, 0.0, 1.2),
        yarn(32.0, 8.0, 0.0),
        yarn(f64::NAN, 8.0, 1.2),
    ] {
        let err = rope.frequencies(64).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }
}

#[cfg(feature = "load")]
mod files {
    use attn::{Causality, HfModel, Layout, SafeTensors};

    fn gpt_oss() -> String {
        format!("{}/tests/golden/hf/gpt_oss", env!("CARGO_MANIFEST_DIR"))
    }

    fn config(json: &str) -> attn::Result<attn::MultiHeadConfig> {
        let header = br#"{}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let weights = SafeTensors::from_bytes(bytes)?;
        HfModel::from_parts(json, weights)?.config("model.layers.1.self_attn")
    }

    #[test]
    fn sinks_in_the_file_and_not_in_the_configuration_are_an_error() {
        let model = HfModel::open(gpt_oss()).expect("opens");
        let module = "model.layers.0.self_attn";
        let without = model.config(module).expect("maps");
        let without = attn::MultiHeadConfig::new(without.d_model(), without.n_heads())
            .with_kv_heads(without.n_kv_heads())
            .with_head_dim(without.head_dim());
        let err = without
            .load::<f64>(model.tensors(), module, &Layout::llama())
            .unwrap_err();
        assert!(
            err.to_string().contains("model.layers.0.self_attn.sinks"),
            "{err}"
        );
    }

    #[test]
    fn gemma2_and_gpt_oss_settings_from_config_json() {
        // what the config class gives absent keys: Gemma 2's cap 50 and scalar 256
        let gemma = config(
            r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4, "head_dim": 8,
                "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 5}"#,
        )
        .expect("maps");
        assert_eq!(gemma.softcap(), Some(50.0));
        assert_eq!(gemma.scale(), 1.0 / 16.0);
        assert_eq!(gemma.causality(), Causality::SlidingWindow(5));
        // null: no cap; no layer_types: odd layers attend to all
        let gemma = config(
            r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4,
                "attn_logit_softcapping": null, "query_pre_attn_scalar": 4}"#,
        )
        .expect("maps");
        assert_eq!((gemma.softcap(), gemma.scale()), (None, 0.5));
        assert_eq!(gemma.causality(), Causality::Causal);
        let oss = config(
            r#"{"model_type": "gpt_oss", "hidden_size": 32, "num_attention_heads": 4,
                "layer_types": ["sliding_attention", "sliding_attention"],
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000, "factor": 32.0,
                                    "original_max_position_embeddings": 4096, "truncate": false}}"#,
        )
        .expect("maps");
        assert!(oss.has_sinks());
        assert_eq!(oss.causality(), Causality::SlidingWindow(128));
        for (json, what) in [
            (
                r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4, "query_pre_attn_scalar": 0}"#,
                "query_pre_attn_scalar",
            ),
            (
                r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4, "attn_logit_softcapping": -1}"#,
                "soft-cap",
            ),
            (
                r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4, "layer_types": ["full_attention"]}"#,
                "layer 1",
            ),
            (
                r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4, "layer_types": ["x", "chunked_attention"]}"#,
                "chunked_attention",
            ),
            (
                r#"{"model_type": "gemma2", "hidden_size": 32, "num_attention_heads": 4, "use_bidirectional_attention": true}"#,
                "use_bidirectional_attention",
            ),
            (
                r#"{"model_type": "gpt_oss", "hidden_size": 32, "num_attention_heads": 4,
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 64}}"#,
                "factor",
            ),
            (
                r#"{"model_type": "gpt_oss", "hidden_size": 32, "num_attention_heads": 4,
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4, "original_max_position_embeddings": 64, "truncate": 1}}"#,
                "truncate",
            ),
        ] {
            let err = config(json)
                .and_then(|c| c.random::<f32>(attn::Init::XavierUniform, 0).map(|_| c))
                .unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        // a module that names no layer cannot be given its kind
        let header = br#"{}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let model = HfModel::from_parts(
            r#"{"model_type": "gpt_oss", "hidden_size": 32, "num_attention_heads": 4}"#,
            SafeTensors::from_bytes(bytes).expect("empty"),
        )
        .expect("parses");
        let err = model.config("model.self_attn").unwrap_err();
        assert!(err.to_string().contains("names no layer"), "{err}");
    }
}
