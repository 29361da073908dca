//! Real models from their files: every attention block in `tests/golden/hf/`
//! (tiny checkpoints written by Hugging Face `transformers`' `save_pretrained`,
//! and a `torch.nn.MultiheadAttention` state dict), loaded through the public
//! API alone and run on the recorded inputs. Outputs and probabilities must
//! match transformers' float64 reference to 1e-10 in f64, and to PyTorch's own
//! f32 tolerance (`torch.testing`: 1e-5 + 1.3e-6·|x|) in f32.

use crate::common;

use attn::{
    Causality, Element, HfModel, Layout, Mask, MultiHeadAttention, MultiHeadConfig,
    MultiHeadOutput, PositionEncoding, SafeTensors, StateDict, alibi_slopes,
};
use common::{array_f64, golden};
use ndarray::{Array2, Array3, Array4, ArrayD, Axis, Ix2, Ix3, Ix4, s};
use serde_json::Value;

fn dir(name: &str) -> String {
    format!("{}/tests/golden/hf/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    golden(&format!("hf/{name}/attention_io.json"))
}

fn f64_array<D: ndarray::Dimension>(v: &Value) -> ndarray::Array<f64, D> {
    array_f64(v)
        .into_dimensionality()
        .expect("the recorded rank")
}

/// A recorded 0/1 mask as booleans (1 = real token).
fn real(v: &Value) -> Array2<bool> {
    f64_array::<Ix2>(v).mapv(|x| x == 1.0)
}

fn to<A: Element, D: ndarray::Dimension>(x: &ndarray::Array<f64, D>) -> ndarray::Array<A, D> {
    x.mapv(A::from_f64)
}

fn back<A: Element + Into<f64>, D: ndarray::Dimension>(
    x: &ndarray::Array<A, D>,
) -> ndarray::Array<f64, D> {
    x.mapv(Into::into)
}

/// The element's tolerance against a float64 reference.
trait Tolerance {
    fn allowed(reference: f64) -> f64;
}

impl Tolerance for f64 {
    fn allowed(_: f64) -> f64 {
        1e-10
    }
}

impl Tolerance for f32 {
    fn allowed(reference: f64) -> f64 {
        1e-5 + 1.3e-6 * reference.abs()
    }
}

/// Largest difference over the rows that are real queries (padding queries hold
/// whatever HF computed for them), asserting each is within the tolerance.
fn compare<A: Tolerance>(
    what: &str,
    got: &Array4<f64>,
    want: &Array4<f64>,
    rows: &Array2<bool>,
) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let mut worst = 0.0_f64;
    for ((b, h, i, j), &w) in want.indexed_iter() {
        let _ = h;
        if !rows[[b, i]] {
            continue;
        }
        let g = got[[b, h, i, j]];
        let e = (g - w).abs();
        assert!(
            e <= A::allowed(w),
            "{what}: [{b}, {h}, {i}, {j}] got {g}, want {w} (difference {e:e})"
        );
        worst = worst.max(e);
    }
    worst
}

/// The output `(B, L, d)` as `(B, 1, L, d)`, to compare like the probabilities.
fn lift(x: Array3<f64>) -> Array4<f64> {
    x.insert_axis(Axis(1))
}

/// Output and probabilities against the record's, on its real query rows.
fn check<A: Tolerance + Element + Into<f64>>(
    what: &str,
    out: &MultiHeadOutput<A, Ix3>,
    record: &Value,
    rows: &Array2<bool>,
) -> (f64, f64) {
    let output = compare::<A>(
        &format!("{what} output"),
        &lift(back(&out.output)),
        &lift(f64_array(&record["output"])),
        rows,
    );
    let probs = compare::<A>(
        &format!("{what} probabilities"),
        &back(&out.head_weights),
        &f64_array(&record["probs"]),
        rows,
    );
    (output, probs)
}

/// Every query row real.
fn all_rows(b: usize, l: usize) -> Array2<bool> {
    Array2::from_elem((b, l), true)
}

/// One record of a self-attention block (prefill), from the model's files.
fn self_attention<A: Tolerance + Element + Into<f64>>(
    model: &HfModel,
    record: &Value,
    masks: &[Mask<'_, A>],
) -> (f64, f64) {
    let module = record["module"].as_str().expect("a module name");
    let layer: MultiHeadAttention<A> = model.attention(module).expect("loads from the files");
    let x: Array3<A> = to(&f64_array::<Ix3>(&record["hidden_states"]));
    let (b, l, _) = x.dim();
    let (out, rows) = match record.get("attention_mask") {
        Some(mask) => {
            let real = real(mask);
            let out = layer
                .forward_padded_with_weights(&x, &real, masks)
                .expect("runs");
            (out, real)
        }
        None => (
            layer
                .forward_batched_with_weights(&x, &x, &x, masks)
                .expect("runs"),
            all_rows(b, l),
        ),
    };
    check(module, &out, record, &rows)
}

/// Cross-attention: queries from the decoder, keys and values from the encoder.
fn cross_attention<A: Tolerance + Element + Into<f64>>(
    model: &HfModel,
    record: &Value,
) -> (f64, f64) {
    let module = record["module"].as_str().expect("a module name");
    let layer: MultiHeadAttention<A> = model.attention(module).expect("loads from the files");
    let x: Array3<A> = to(&f64_array::<Ix3>(&record["hidden_states"]));
    let context: Array3<A> = to(&f64_array::<Ix3>(&record["encoder_hidden_states"]));
    let keep = real(&record["encoder_attention_mask"])
        .insert_axis(Axis(1))
        .insert_axis(Axis(1));
    let out = layer
        .forward_batched_with_weights(&x, &context, &context, &[Mask::keep(&keep)])
        .expect("runs");
    let (b, l, _) = x.dim();
    check(module, &out, record, &all_rows(b, l))
}

/// A decode record: the prompt and then new tokens through the layer's cache,
/// one row left-padded where the record has padding.
fn decode<A: Tolerance + Element + Into<f64>>(model: &HfModel, record: &Value) -> (f64, f64) {
    let module = record["module"].as_str().expect("a module name");
    let layer: MultiHeadAttention<A> = model.attention(module).expect("loads from the files");
    let steps = record["steps"].as_array().expect("steps");
    let batch = f64_array::<Ix3>(&steps[0]["hidden_states"]).dim().0;
    let mut cache = layer.new_cache(batch);
    let (mut worst_out, mut worst_probs) = (0.0_f64, 0.0_f64);
    for (n, step) in steps.iter().enumerate() {
        let x: Array3<A> = to(&f64_array::<Ix3>(&step["hidden_states"]));
        let t = x.dim().1;
        let mask = real(&step["attention_mask"]);
        let total = mask.ncols();
        let new = mask.slice(s![.., total - t..]).to_owned();
        let out = layer
            .forward_cached_padded_with_weights(&x, &new, &mut cache)
            .expect("runs");
        let what = format!("{module} step {n}");
        // HF's keys are positions key_start..total; ours the cache's, ending at total
        let key_start = step["key_start"].as_u64().expect("key_start") as usize;
        let ours = back(&out.head_weights);
        let first = total - ours.dim().3;
        assert!(first <= key_start, "{what}: the cache lost a key HF used");
        let outside = ours.slice(s![.., .., .., ..key_start - first]);
        assert!(
            outside.iter().all(|&w| w == 0.0),
            "{what}: weight outside the window"
        );
        worst_out = worst_out.max(compare::<A>(
            &format!("{what} output"),
            &lift(back(&out.output)),
            &lift(f64_array(&step["output"])),
            &new,
        ));
        worst_probs = worst_probs.max(compare::<A>(
            &format!("{what} probabilities"),
            &ours.slice(s![.., .., .., key_start - first..]).to_owned(),
            &f64_array(&step["probs"]),
            &new,
        ));
    }
    (worst_out, worst_probs)
}

/// Every record of a checkpoint in this element type; T5's position bias is
/// built from the learned table with `RelativeBuckets`.
fn run_model<A: Tolerance + Element + Into<f64>>(name: &str) -> (f64, f64) {
    let model = HfModel::open(dir(name)).expect("the checkpoint opens");
    let io = fixture(name);
    let mut worst = (0.0_f64, 0.0_f64);
    for record in io["records"].as_array().expect("records") {
        let module = record["module"].as_str().expect("a module name");
        let (o, p) = if record.get("steps").is_some() {
            decode::<A>(&model, record)
        } else if record.get("encoder_hidden_states").is_some() {
            cross_attention::<A>(&model, record)
        } else if let Some(buckets) = model.relative_buckets(module).expect("t5 buckets") {
            let table_name = record["weights"]["relative_attention_bias"]
                .as_str()
                .expect("a table");
            let table: Array2<A> = StateDict::<A>::tensor(model.tensors(), table_name)
                .expect("reads")
                .expect("present")
                .into_dimensionality()
                .expect("2-D");
            let l = f64_array::<Ix3>(&record["hidden_states"]).dim().1;
            let bias = buckets.bias(&table, 0, l, l).expect("valid buckets");
            let want = f64_array::<Ix4>(&record["position_bias"]).index_axis_move(Axis(0), 0);
            let e = common::max_abs_diff(&back(&bias), &want);
            assert!(e <= A::allowed(1.0), "{module}: position bias off by {e:e}");
            self_attention::<A>(&model, record, &[Mask::bias(&bias)])
        } else {
            self_attention::<A>(&model, record, &[])
        };
        worst = (worst.0.max(o), worst.1.max(p));
    }
    worst
}

/// Runs a checkpoint in f64 and f32 and prints the largest differences (the
/// closing note's table comes from `cargo test --test hf_models -- --nocapture`).
fn reproduce(name: &str) {
    let (o64, p64) = run_model::<f64>(name);
    let (o32, p32) = run_model::<f32>(name);
    println!(
        "{name:>18}: f64 output {o64:.1e} probs {p64:.1e} | f32 output {o32:.1e} probs {p32:.1e}"
    );
}

#[test]
fn llama_grouped_query_rope_prefill_and_left_padded_decode() {
    reproduce("llama");
}

#[test]
fn llama_linear_rope_scaling() {
    reproduce("llama_rope_linear");
}

#[test]
fn llama3_rope_scaling_and_explicit_head_dim() {
    let model = HfModel::open(dir("llama_rope_llama3")).expect("opens");
    let config = model.config("model.layers.0.self_attn").expect("maps");
    assert_eq!((config.head_dim(), config.inner_dim()), (16, 64));
    reproduce("llama_rope_llama3");
}

#[test]
fn mistral_sliding_window_through_its_sliding_cache() {
    let model = HfModel::open(dir("mistral")).expect("opens");
    let config = model.config("model.layers.0.self_attn").expect("maps");
    assert_eq!(config.causality(), Causality::SlidingWindow(3));
    reproduce("mistral");
}

#[test]
fn qwen2_biases_on_qkv_only() {
    reproduce("qwen2");
}

#[test]
fn gpt2_fused_conv1d_and_cached_decode() {
    reproduce("gpt2");
}

#[test]
fn gpt_neox_per_head_fused_qkv_and_partial_rotary() {
    reproduce("gpt_neox");
}

#[test]
fn bloom_per_head_fused_qkv_and_alibi() {
    let io = fixture("bloom");
    let slopes = array_f64(&io["attention"]["alibi_slopes"]);
    assert_eq!(slopes.as_slice(), Some(&alibi_slopes(6)[..]));
    reproduce("bloom");
}

#[test]
fn bert_padded_encoder() {
    reproduce("bert");
}

#[test]
fn vit_unmasked() {
    reproduce("vit");
}

#[test]
fn bart_cross_attention() {
    reproduce("bart");
}

#[test]
fn t5_relative_bias_unscaled_and_wide_heads() {
    reproduce("t5");
}

/// Gemma 2: every layer soft-caps its scores at `attn_logit_softcapping` and
/// scales by `query_pre_attn_scalar^(−1/2)`; layer 0 slides, layer 1 does not.
#[test]
fn gemma2_softcap_and_alternating_sliding_layers() {
    let model = HfModel::open(dir("gemma2")).expect("opens");
    let attention = &fixture("gemma2")["attention"];
    let [sliding, global] = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        .map(|module| model.config(module).expect("maps"));
    assert_eq!(sliding.causality(), Causality::SlidingWindow(3));
    assert_eq!(global.causality(), Causality::Causal);
    for config in [sliding, global] {
        assert_eq!(config.softcap(), attention["softcap"].as_f64());
        assert_eq!(Some(config.scale()), attention["scale"].as_f64());
        assert!(!config.has_sinks());
    }
    reproduce("gemma2");
}

/// gpt-oss: a learned sink logit per head (read from `{module}.sinks`),
/// biases on every projection, YaRN rotary embeddings; layer 0 slides.
#[test]
fn gpt_oss_sinks_yarn_and_alternating_sliding_layers() {
    let model = HfModel::open(dir("gpt_oss")).expect("opens");
    let attention = &fixture("gpt_oss")["attention"];
    for (module, causality) in [
        ("model.layers.0.self_attn", Causality::SlidingWindow(3)),
        ("model.layers.1.self_attn", Causality::Causal),
    ] {
        let layer: MultiHeadAttention<f64> = model.attention(module).expect("loads");
        assert_eq!(layer.config().causality(), causality);
        let sinks = layer.weights().sinks.expect("sinks");
        assert_eq!(
            sinks,
            array_f64(&attention["sinks"][module])
                .into_dimensionality()
                .expect("1-D")
        );
    }
    reproduce("gpt_oss");
}

/// YaRN's frequencies and amplitude equal transformers' (computed in f64 by
/// the fixture's script from the same formula).
#[test]
fn yarn_frequencies_match_transformers() {
    let model = HfModel::open(dir("gpt_oss")).expect("opens");
    let config = model.config("model.layers.0.self_attn").expect("maps");
    let PositionEncoding::Rope(rope) = config.positions() else {
        panic!("rotary");
    };
    let want = &fixture("gpt_oss")["attention"]["rope"];
    let frequencies = rope.frequencies(config.head_dim()).expect("valid");
    let expected = array_f64(&want["inv_freq"]);
    assert_eq!(frequencies.len(), expected.len());
    for (got, want) in frequencies.iter().zip(&expected) {
        assert!((got - want).abs() <= 1e-15 * want, "{got} vs {want}");
    }
    // the ramp is inside the pairs: one pair neither kept nor fully divided
    let plain = attn::Rope::new(rope.theta())
        .frequencies(config.head_dim())
        .expect("valid");
    assert!(
        frequencies
            .iter()
            .zip(&plain)
            .any(|(f, p)| f < p && f * 32.0 > p * 1.000_001)
    );
    let amplitude = want["attention_factor"].as_f64().expect("a number");
    assert!((rope.amplitude() - amplitude).abs() < 1e-15);
}

/// `torch.nn.MultiheadAttention`: no config.json; its constructor arguments are
/// in the fixture, its masks are boolean with **true = masked**, the opposite of
/// attn's.
fn torch_mha<A: Tolerance + Element + Into<f64>>() -> (f64, f64) {
    let io = fixture("torch_mha");
    let args = &io["module_args"];
    let size = |key: &str| args[key].as_u64().expect("a size") as usize;
    let file = SafeTensors::open(format!("{}/model.safetensors", dir("torch_mha"))).expect("opens");
    let layer: MultiHeadAttention<A> = MultiHeadConfig::new(size("embed_dim"), size("num_heads"))
        .load(&file, "", &Layout::TorchMultihead)
        .expect("loads");
    let mut worst = (0.0_f64, 0.0_f64);
    for record in io["records"].as_array().expect("records") {
        let query: Array3<A> = to(&f64_array::<Ix3>(&record["query"]));
        let (key, value) = match record.get("key") {
            Some(key) => (
                to(&f64_array::<Ix3>(key)),
                to(&f64_array::<Ix3>(&record["value"])),
            ),
            None => (query.clone(), query.clone()),
        };
        let flags = |v: &Value| -> ArrayD<bool> {
            common::array_bool(v).mapv(|masked| !masked) // torch: true = masked
        };
        let padding = flags(&record["key_padding_mask"])
            .into_dimensionality::<Ix2>()
            .expect("(B, S)")
            .insert_axis(Axis(1))
            .insert_axis(Axis(1));
        let mut keep = vec![padding];
        if let Some(m) = record.get("attn_mask") {
            keep.push(
                flags(m)
                    .into_dimensionality::<Ix2>()
                    .expect("(L, S)")
                    .insert_axis(Axis(0))
                    .insert_axis(Axis(0)),
            );
        }
        let masks: Vec<Mask<'_, A>> = keep.iter().map(|k| Mask::keep(k)).collect();
        let out = layer
            .forward_batched_with_weights(&query, &key, &value, &masks)
            .expect("runs");
        let (b, l, _) = query.dim();
        let (o, p) = check("torch_mha", &out, record, &all_rows(b, l));
        worst = (worst.0.max(o), worst.1.max(p));
    }
    worst
}

#[test]
fn torch_multihead_state_dict() {
    let (o64, p64) = torch_mha::<f64>();
    let (o32, p32) = torch_mha::<f32>();
    println!(
        "{:>18}: f64 output {o64:.1e} probs {p64:.1e} | f32 output {o32:.1e} probs {p32:.1e}",
        "torch_mha"
    );
}

/// The rotary angles of every RoPE model equal the cos/sin HF recorded.
#[test]
fn rope_angles_match_transformers() {
    for name in [
        "llama",
        "llama_rope_linear",
        "llama_rope_llama3",
        "gpt_neox",
        "qwen2",
    ] {
        let model = HfModel::open(dir(name)).expect("opens");
        let config = model.config("any.self_attn").expect("maps");
        let PositionEncoding::Rope(rope) = config.positions() else {
            panic!("{name}: rotary");
        };
        let frequencies = rope.frequencies(config.head_dim()).expect("valid");
        let record = &fixture(name)["records"][0];
        let positions = f64_array::<Ix2>(&record["position_ids"]);
        let (cos, sin) = (
            f64_array::<Ix3>(&record["rope_cos"]),
            f64_array::<Ix3>(&record["rope_sin"]),
        );
        let half = frequencies.len();
        assert_eq!(cos.dim().2, 2 * half, "{name}: rotary width");
        for ((b, l, i), &c) in cos.indexed_iter() {
            let angle = positions[[b, l]] * frequencies[i % half];
            assert!(
                (c - angle.cos()).abs() < 1e-12,
                "{name}: cos [{b}, {l}, {i}]"
            );
            assert!(
                (sin[[b, l, i]] - angle.sin()).abs() < 1e-12,
                "{name}: sin [{b}, {l}, {i}]"
            );
        }
    }
}

/// Wrong names, shapes, biases and dtypes are errors that name the tensor.
#[test]
fn loading_errors_name_the_tensor() {
    let model = HfModel::open(dir("llama")).expect("opens");
    let module = "model.layers.0.self_attn";
    let err = model
        .attention::<f32>("model.layers.7.self_attn")
        .unwrap_err();
    // a block the file does not have: the nearest ones it has
    let text = err.to_string();
    assert!(
        text.contains("\"model.layers.7.self_attn\"")
            && text.contains("nearest attention blocks are \"model.layers.0.self_attn\""),
        "{text}"
    );
    assert_eq!(model.attention_modules().expect("llama"), [module]);
    // a configuration that disagrees with the file: 4 key/value heads, not 2
    let config = model.config(module).expect("maps").with_kv_heads(4);
    let err = config
        .load::<f64>(model.tensors(), module, &Layout::llama())
        .unwrap_err();
    assert!(
        matches!(&err, attn::Error::TensorShape { name, expected, found }
            if name == "model.layers.0.self_attn.k_proj.weight" && expected == &vec![32, 64] && found == &vec![16, 64]),
        "{err}"
    );
    // a bias the configuration does not have
    let qwen = HfModel::open(dir("qwen2")).expect("opens");
    let err = qwen
        .config(module)
        .expect("maps")
        .without_bias()
        .load::<f64>(qwen.tensors(), module, &Layout::llama())
        .unwrap_err();
    assert!(err.to_string().contains("q_proj.bias"), "{err}");
    // the wrong layout for the file
    let err = model
        .config(module)
        .expect("maps")
        .load::<f64>(model.tensors(), module, &Layout::gpt2())
        .unwrap_err();
    assert!(err.to_string().contains("c_attn.weight"), "{err}");
    assert!(
        err.to_string().contains("q_proj.weight"),
        "lists what is there: {err}"
    );
    // a dtype attn does not read, and a file that is not safetensors
    let header = br#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend(7i64.to_le_bytes());
    let file = SafeTensors::from_bytes(bytes).expect("valid file");
    let err = StateDict::<f32>::tensor(&file, "w").unwrap_err();
    assert!(err.to_string().contains("I64"), "{err}");
    assert!(SafeTensors::from_bytes(b"\x10\0\0\0\0\0\0\0{}".to_vec()).is_err());
    // a model type attn does not map, and an unsupported rope type
    let empty = || SafeTensors::from_bytes(b"\x02\0\0\0\0\0\0\0{}".to_vec()).expect("empty file");
    let err = HfModel::from_parts(r#"{"model_type": "mamba"}"#, empty())
        .expect("parses")
        .config("x")
        .unwrap_err();
    assert!(err.to_string().contains("mamba"), "{err}");
    let yarn = r#"{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}"#;
    let err = HfModel::from_parts(yarn, empty())
        .expect("parses")
        .config("x")
        .unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");
}

/// f16 and bf16 files load as the same numbers as their f32 values.
#[test]
fn half_precision_files_load_exactly() {
    let values = [1.5f32, -0.25, 3.0, 1.0e-3];
    for (dtype, bytes) in [
        (
            "F16",
            values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        (
            "BF16",
            values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
    ] {
        let header = format!(r#"{{"w":{{"dtype":"{dtype}","shape":[2,2],"data_offsets":[0,8]}}}}"#);
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend(bytes);
        let file = SafeTensors::from_bytes(file).expect("valid");
        let w = StateDict::<f64>::tensor(&file, "w")
            .expect("reads")
            .expect("present");
        let rounded: Vec<f64> = values
            .iter()
            .map(|&x| match dtype {
                "F16" => half::f16::from_f32(x).to_f64(),
                _ => half::bf16::from_f32(x).to_f64(),
            })
            .collect();
        assert_eq!(w.iter().copied().collect::<Vec<_>>(), rounded, "{dtype}");
    }
}

/// The stated int8 bound at a layer's output: each head within
/// `(e^{2ε} − 1)·V + V/127` (`PagedKvCache`'s docs) of the f32 cache's, then
/// `W_O`'s column sums of magnitudes. `q_norms` are each query row's
/// `(‖q‖₁, ‖q‖∞)` before rotary embeddings (a rotation of pairs grows neither
/// by more than √2); `keys` and `values` the exact rows, `(kv_heads, S, d)`.
fn int8_layer_bound(
    layer: &MultiHeadAttention<f32>,
    q_norms: &[(f32, f32)],
    keys: &Array3<f32>,
    values: &Array3<f32>,
) -> f32 {
    let config = layer.config();
    let (scale, d) = (config.scale() as f32, config.head_dim() as f32);
    let largest = |x: &Array3<f32>| x.fold(0.0_f32, |m, v| m.max(v.abs()));
    // rotated keys: within √2 of the largest unrotated element
    let (m, big_v) = (largest(keys) * 2f32.sqrt(), largest(values));
    let (l1, inf) = q_norms
        .iter()
        .fold((0.0_f32, 0.0_f32), |(a, b), &(l1, inf)| {
            (a.max(l1), b.max(inf))
        });
    let eps = scale * m * 2f32.sqrt() * (l1 / 254.0 + d * inf / 32767.0);
    let head = ((2.0 * eps).exp() - 1.0) * big_v + big_v / 127.0;
    let w_o = layer.weights().w_o;
    let columns = w_o
        .columns()
        .into_iter()
        .map(|c| c.iter().map(|w| w.abs()).sum::<f32>());
    head * columns.fold(0.0, f32::max)
}

/// The recorded cached steps of a checkpoint through a paged int8 cache, one
/// sequence per batch row (its real tokens only, no padding), against the
/// same layer's f32 `KvCache` steps: within the stated bound. Returns the
/// rows checked and the largest error as a share of its bound.
fn int8_paged_steps(name: &str) -> (usize, f32) {
    let model = HfModel::open(dir(name)).expect("the checkpoint opens");
    let (mut checked, mut share) = (0, 0.0_f32);
    for record in fixture(name)["records"].as_array().expect("records") {
        let Some(steps) = record.get("steps").and_then(Value::as_array) else {
            continue;
        };
        let module = record["module"].as_str().expect("a module name");
        let layer: MultiHeadAttention<f32> = model.attention(module).expect("loads");
        let config = layer.config();
        let (kv_heads, hd) = (config.n_kv_heads(), config.head_dim());
        let batch = f64_array::<Ix3>(&steps[0]["hidden_states"]).dim().0;
        let mut exact = layer.new_cache(batch);
        let mut paged = attn::PagedKvCache::<i8>::new(64, 4, kv_heads, hd, hd).expect("valid");
        let ids: Vec<_> = (0..batch).map(|_| paged.add_sequence()).collect();
        // every real token so far, per row: the rows of the bound
        let mut seen: Vec<Vec<ndarray::Array1<f32>>> = vec![Vec::new(); batch];
        for (n, step) in steps.iter().enumerate() {
            let x: Array3<f32> = to(&f64_array::<Ix3>(&step["hidden_states"]));
            let t = x.dim().1;
            let mask = real(&step["attention_mask"]);
            let new = mask.slice(s![.., mask.ncols() - t..]).to_owned();
            let want = layer
                .forward_cached_padded(&x, &new, &mut exact)
                .expect("runs");
            let mut rows = Vec::new();
            let mut offsets = vec![0];
            for b in 0..batch {
                for i in (0..t).filter(|&i| new[[b, i]]) {
                    rows.push(x.slice(s![b, i, ..]).to_owned());
                    seen[b].push(x.slice(s![b, i, ..]).to_owned());
                }
                offsets.push(rows.len());
            }
            let views: Vec<_> = rows.iter().map(|r| r.view().insert_axis(Axis(0))).collect();
            let tokens = ndarray::concatenate(Axis(0), &views).expect("one width");
            let got = layer
                .forward_paged(&tokens, &offsets, &mut paged, &ids)
                .expect("runs");
            for b in 0..batch {
                let history: Vec<_> = seen[b]
                    .iter()
                    .map(|r| r.view().insert_axis(Axis(0)))
                    .collect();
                let history = ndarray::concatenate(Axis(0), &history).expect("one width");
                let h = history.view().insert_axis(Axis(0));
                let heads = layer.project(&h, &h, &h).expect("projects");
                let q = heads.q.index_axis(Axis(0), 0);
                let norms: Vec<(f32, f32)> = q
                    .outer_iter()
                    .flat_map(|head| {
                        head.rows()
                            .into_iter()
                            .map(|r| {
                                (
                                    r.iter().map(|x| x.abs()).sum(),
                                    r.iter().fold(0.0_f32, |m, x| m.max(x.abs())),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let (k, v) = (
                    heads.k.index_axis(Axis(0), 0).to_owned(),
                    heads.v.index_axis(Axis(0), 0).to_owned(),
                );
                let bound = int8_layer_bound(&layer, &norms, &k, &v) + 1e-4;
                let real_rows = (0..t).filter(|&i| new[[b, i]]);
                for (r, i) in real_rows.enumerate() {
                    let ours = got.row(offsets[b] + r);
                    let theirs = want.slice(s![b, i, ..]);
                    let e = ours
                        .iter()
                        .zip(theirs)
                        .fold(0.0_f32, |m, (a, c)| m.max((a - c).abs()));
                    assert!(
                        e <= bound,
                        "{name} {module} step {n} row {b}: {e:e} > {bound:e}"
                    );
                    assert!(e > 0.0, "{name}: int8 is not f32");
                    checked += 1;
                    share = share.max(e / bound);
                }
            }
        }
    }
    (checked, share)
}

#[test]
fn int8_paged_cache_stays_within_its_bound_on_real_models() {
    for name in ["llama", "mistral", "gpt2", "bloom", "gemma2", "gpt_oss"] {
        let (checked, share) = int8_paged_steps(name);
        assert!(checked >= 4, "{name}: {checked} rows");
        println!("{name:>8}: {checked} decoded rows, largest error {share:.1e} of the bound");
    }
}
