//! Hostile files and traps: each is a clear `Err` naming what is wrong, never a
//! panic, never a silent wrong number (issue "Untrusted files and silent traps").

use std::cell::Cell;
use std::collections::HashMap;

use attn::half::f16;
use attn::{
    AttentionLse, Error, HfModel, Init, KvCache, Layout, Mask, MultiHeadConfig, RelativeBuckets,
    SafeTensors, ScaledDotProduct, StateDict, merge_attention,
};
use ndarray::{Array1, Array2, Array3, Array4, ArrayD, IxDyn, arr0};

/// A safetensors file from `(name, dtype, shape, data)`.
fn file(tensors: &[(&str, &str, &[u128], Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let start = data.len();
        data.extend_from_slice(bytes);
        let sep = if i > 0 { "," } else { "" };
        header.push_str(&format!(
            "{sep}{name:?}:{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(data);
    out
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn reason(err: &Error) -> String {
    err.to_string()
}

#[test]
fn a_zero_element_tensor_with_a_huge_axis_is_refused() {
    let bytes = file(&[("w", "F32", &[0, 1 << 63], vec![])]);
    let weights = SafeTensors::from_bytes(bytes).expect("safetensors accepts the header");
    let err = StateDict::<f32>::tensor(&weights, "w").unwrap_err();
    assert!(
        matches!(&err, Error::Tensor { name, .. } if name == "w"),
        "{err}"
    );
    assert!(reason(&err).contains("more elements than memory can address"));
    assert!(StateDict::<f32>::shape(&weights, "w").is_err());
}

#[test]
fn config_sizes_that_overflow_are_refused() {
    let json = r#"{"model_type":"llama","hidden_size":4611686018427387904,
                   "num_attention_heads":4,"head_dim":4611686018427387904}"#;
    let names = ["q_proj", "k_proj", "v_proj", "o_proj"];
    let tensors: Vec<(String, &str, &[u128], Vec<u8>)> = names
        .iter()
        .map(|n| {
            let shape: &[u128] = &[0, 0];
            (
                format!("model.layers.0.self_attn.{n}.weight"),
                "F32",
                shape,
                vec![],
            )
        })
        .collect();
    let borrowed: Vec<(&str, &str, &[u128], Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, *s, b.clone()))
        .collect();
    let weights = SafeTensors::from_bytes(file(&borrowed)).expect("valid file");
    let model = HfModel::from_parts(json, weights).expect("valid JSON");
    let err = model
        .attention::<f32>("model.layers.0.self_attn")
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { ref reason } if reason.contains("overflows")),
        "{err}"
    );
    // the configuration by hand: the same check
    let config = MultiHeadConfig::new(1 << 62, 4).with_head_dim(1 << 62);
    assert!(config.random::<f32>(Init::XavierUniform, 0).is_err());
    let huge = MultiHeadConfig::new(1 << 40, 1 << 20);
    assert!(matches!(
        huge.random::<f32>(Init::XavierUniform, 0),
        Err(Error::InvalidConfig { .. })
    ));
}

/// A state dict that counts how many tensors it decodes.
struct Counting {
    inner: HashMap<String, ArrayD<f64>>,
    decoded: Cell<usize>,
}

impl StateDict<f64> for Counting {
    fn tensor(&self, name: &str) -> attn::Result<Option<ArrayD<f64>>> {
        self.decoded.set(self.decoded.get() + 1);
        self.inner.tensor(name)
    }

    fn shape(&self, name: &str) -> attn::Result<Option<Vec<usize>>> {
        StateDict::<f64>::shape(&self.inner, name)
    }

    fn names(&self) -> Vec<String> {
        StateDict::<f64>::names(&self.inner)
    }
}

#[test]
fn a_wrong_shape_is_found_before_anything_is_decoded() {
    let mut inner = HashMap::new();
    inner.insert(
        "attn.in_proj_weight".to_string(),
        ArrayD::zeros(IxDyn(&[11, 4])),
    );
    let dict = Counting {
        inner,
        decoded: Cell::new(0),
    };
    let err = MultiHeadConfig::new(4, 2)
        .load(&dict, "attn", &Layout::TorchMultihead)
        .unwrap_err();
    assert!(
        matches!(&err, Error::TensorShape { name, expected, found }
            if name == "attn.in_proj_weight" && expected == &[12, 4] && found == &[11, 4]),
        "{err}"
    );
    assert_eq!(dict.decoded.get(), 0, "the wrong-shaped tensor was decoded");

    // a file: the header's shape, compared before decoding
    let bytes = file(&[("w.weight", "BF16", &[3, 2], vec![0; 12])]);
    let weights = SafeTensors::from_bytes(bytes).expect("valid");
    let err = MultiHeadConfig::new(2, 1)
        .without_bias()
        .load::<f64>(&weights, "", &Layout::separate("w", "w", "w", "w"))
        .unwrap_err();
    assert!(matches!(err, Error::TensorShape { .. }), "{err}");
}

#[test]
fn values_beyond_f16_are_an_error_not_infinity() {
    let bytes = file(&[("w", "F32", &[2], f32_bytes(&[1.0, 70000.0]))]);
    let weights = SafeTensors::from_bytes(bytes).expect("valid");
    let err = StateDict::<f16>::tensor(&weights, "w").unwrap_err();
    assert!(
        reason(&err).contains("element 1") && reason(&err).contains("f16"),
        "{err}"
    );
    // f32 holds it; infinity in the file stays infinity (it is a value, not an overflow)
    assert!(StateDict::<f32>::tensor(&weights, "w").is_ok());
    let inf = file(&[("w", "F32", &[1], f32_bytes(&[f32::INFINITY]))]);
    let weights = SafeTensors::from_bytes(inf).expect("valid");
    let w = StateDict::<f16>::tensor(&weights, "w").expect("readable");
    assert_eq!(w.map(|w| w[[0]]), Some(f16::INFINITY));
}

#[test]
fn unreadable_dtypes_and_offsets_name_the_tensor() {
    let bytes = file(&[("ids", "I8", &[2], vec![1, 2])]);
    let weights = SafeTensors::from_bytes(bytes).expect("valid");
    let err = StateDict::<f32>::tensor(&weights, "ids").unwrap_err();
    assert!(reason(&err).contains("dtype I8"), "{err}");
}

#[test]
fn cache_sizes_are_checked() {
    let err = KvCache::<f32>::sliding(1, 1, 4, 4, usize::MAX / 2).unwrap_err();
    assert!(reason(&err).contains("KvCache::sliding"), "{err}");
    assert!(KvCache::<f32>::sliding(1, 0, 4, 4, 8).is_err());
    // a window of 2⁴⁰ positions (32 TiB at full length) allocates as positions
    // arrive: made and stepped in a few bytes
    let mut huge = KvCache::<f32>::sliding(1, 1, 4, 4, 1 << 40).expect("addressable");
    let one = Array4::<f32>::ones((1, 1, 1, 4));
    huge.attend(&one, &one, &one).expect("one position");
    assert_eq!(huge.len(), 1);
    // growth the allocator refuses (16 slots of 2³⁸-wide keys: 16 TiB) is an
    // `Err` naming the cache, not an abort, and leaves the cache as it was
    if std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|m| m.trim() != "1") {
        let mut wide = KvCache::<f32>::new(1, 1, 1 << 38, 1);
        let k = Array4::<f32>::zeros((1, 1, 1, 1));
        let k = k.broadcast((1, 1, 1, 1 << 38)).expect("a view");
        let v = Array4::<f32>::zeros((1, 1, 1, 1));
        let err = wide.append(&k, &v).unwrap_err();
        assert!(matches!(err, attn::Error::Cache { .. }), "{err}");
        assert!(
            reason(&err).contains("KvCache::new(batch 1") && reason(&err).contains("16 positions")
        );
        assert!(wide.is_empty());
    }
    // `new` keeps its signature: a size that cannot make a cache is reported by
    // the first call that writes, naming the constructor's arguments
    let q = Array4::<f32>::zeros((1, 1, 1, 4));
    for (mut cache, words) in [
        (KvCache::<f32>::new(0, 0, 0, 0), "at least 1"),
        (KvCache::<f32>::new(usize::MAX / 2, 3, 4, 4), "do not fit"),
    ] {
        let err = cache.attend(&q, &q, &q).unwrap_err();
        assert!(
            reason(&err).contains("KvCache::new(batch") && reason(&err).contains(words),
            "{err}"
        );
        assert!(cache.is_empty());
    }
}

#[test]
fn cache_errors_name_the_callers_arguments() {
    let mut cache = KvCache::<f32>::new(1, 1, 8, 8);
    let q = Array4::<f32>::zeros((1, 1, 1, 8));
    let narrow = Array4::<f32>::zeros((1, 1, 1, 4));
    let err = cache.attend(&q, &narrow, &q).unwrap_err();
    assert!(
        matches!(&err, Error::Shape { what, expected, found }
            if what.starts_with("new keys") && expected == &[1, 1, 1, 8] && found == &[1, 1, 1, 4]),
        "{err}"
    );
    let err = cache.attend(&q, &q, &narrow).unwrap_err();
    assert!(
        matches!(&err, Error::Shape { what, .. } if what.starts_with("new values")),
        "{err}"
    );

    let layer = MultiHeadConfig::new(8, 2)
        .random::<f32>(Init::XavierUniform, 0)
        .expect("valid");
    let mut cache = layer.new_cache(1);
    let err = layer
        .forward_cached(&Array3::zeros((2, 3, 8)), &mut cache)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Shape { what, expected, found }
            if what.starts_with("x must be") && expected == &[1, 3, 8] && found == &[2, 3, 8]),
        "{err}"
    );
    let mut foreign = KvCache::new(1, 2, 3, 3);
    let err = layer
        .forward_cached(&Array3::zeros((1, 3, 8)), &mut foreign)
        .unwrap_err();
    assert!(reason(&err).contains("new_cache"), "{err}");
}

#[test]
fn merging_zero_dimensional_outputs_is_an_error() {
    let dynamic = AttentionLse {
        output: arr0(1.0_f64).into_dyn(),
        lse: arr0(0.0_f64).into_dyn(),
    };
    assert!(matches!(
        merge_attention(&[dynamic]),
        Err(Error::Shape { .. })
    ));
    let nan = AttentionLse {
        output: Array2::<f64>::zeros((1, 2)),
        lse: Array1::from_elem(1, f64::NAN),
    };
    assert!(merge_attention(&[nan]).is_err());
}

#[test]
fn relative_buckets_need_buckets() {
    let none = RelativeBuckets {
        num_buckets: 0,
        max_distance: 128,
        bidirectional: true,
    };
    assert!(matches!(none.bucket(-3), Err(Error::InvalidConfig { .. })));
    let json = r#"{"model_type":"t5","relative_attention_num_buckets":"32"}"#;
    let empty = SafeTensors::from_bytes(file(&[])).expect("valid");
    let model = HfModel::from_parts(json, empty).expect("valid JSON");
    let err = model
        .relative_buckets("encoder.block.0.layer.0.SelfAttention")
        .unwrap_err();
    assert!(
        reason(&err).contains("relative_attention_num_buckets"),
        "{err}"
    );
}

#[test]
fn config_errors_carry_its_path() {
    let dir = std::env::temp_dir().join(format!("attn-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    std::fs::write(dir.join("config.json"), "").expect("writable");
    // no model.safetensors either: the config's error comes first
    let err = HfModel::open(&dir).unwrap_err();
    let path = dir.join("config.json").display().to_string();
    assert!(
        matches!(&err, Error::File { path: p, .. } if p == &path),
        "{err}"
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","hidden_size":"wide","num_attention_heads":2}"#,
    )
    .expect("writable");
    std::fs::write(dir.join("model.safetensors"), file(&[])).expect("writable");
    let model = HfModel::open(&dir).expect("opens");
    let err = model.config("model.layers.0.self_attn").unwrap_err();
    assert!(reason(&err).contains(&path), "{err}");
    std::fs::remove_dir_all(&dir).expect("removable");
}

#[test]
fn a_batch_of_padding_rows_ported_from_pytorch() {
    // (B, S) given to `keep` broadcasts as (L, S) when B = L: the map says key_padding
    let real = ndarray::array![[true, false], [true, true]];
    let x = Array4::<f64>::from_shape_fn((2, 1, 2, 2), |(b, _, i, j)| (b + i + j) as f64);
    let ported = ScaledDotProduct::new()
        .with_mask(Mask::key_padding(&real))
        .forward_batched_with_weights(&x, &x, &x)
        .expect("valid");
    // batch 1 has no padding: its second query weighs both keys
    assert!(ported.weights[[1, 0, 1, 1]] > 0.0);
    assert_eq!(ported.weights[[0, 0, 1, 1]], 0.0);
    // B ≠ L: (B, S) against scores (B, H, L, S) does not broadcast, and the
    // error says how to pass key padding
    let three = Array4::<f64>::zeros((2, 1, 3, 2));
    let err = ScaledDotProduct::new()
        .with_mask(Mask::keep(&real))
        .forward_batched(&three, &x, &x)
        .unwrap_err();
    assert!(reason(&err).contains("Mask::key_padding"), "{err}");
}

#[test]
fn config_flags_must_be_booleans() {
    let json =
        r#"{"model_type":"llama","hidden_size":8,"num_attention_heads":2,"attention_bias":"yes"}"#;
    let empty = SafeTensors::from_bytes(file(&[])).expect("valid");
    let model = HfModel::from_parts(json, empty).expect("valid JSON");
    let err = model.config("model.layers.0.self_attn").unwrap_err();
    assert!(
        reason(&err).contains("attention_bias must be true or false"),
        "{err}"
    );
}
