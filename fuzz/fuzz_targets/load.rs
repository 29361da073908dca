//! Fuzzes loading a checkpoint: every call must return `Ok` or `Err`, never
//! panic, and never allocate past the file's own sizes.
//!
//! Two kinds of input, chosen by the first byte:
//! - raw: the rest split into the text of a `config.json` and the bytes of a
//!   safetensors file;
//! - structured: a `config.json` of one mapped `model_type` whose sizes are drawn
//!   from edge values (0, −1, 2³², 2⁶⁴−1, 1e400, null, a string, small sizes),
//!   and a safetensors file holding the tensors its layout needs, each one
//!   present or missing, of the right or a wrong shape, in a readable or an
//!   unreadable dtype, with a bias or without.
//!
//! Whatever loads runs `forward`, `forward_padded`, `forward_packed` and a
//! cached step on a small input.
#![no_main]

use attn::{HfModel, Layout, MultiHeadAttention, MultiHeadConfig, Projection, SafeTensors};
use libfuzzer_sys::fuzz_target;

#[path = "bytes.rs"]
mod bytes;
use bytes::Bytes;
use ndarray::{Array2, Array3};

const MODEL_TYPES: [&str; 13] = [
    "llama", "mistral", "qwen2", "gemma2", "gpt_oss", "gpt2", "gpt_neox", "bloom", "bert",
    "roberta", "vit", "bart", "t5",
];

/// The attention block each model type's tests name.
fn module_of(model_type: &str) -> &'static str {
    match model_type {
        "gpt2" => "transformer.h.0.attn",
        "bloom" => "transformer.h.0.self_attention",
        "gpt_neox" => "gpt_neox.layers.0.attention",
        "bert" | "roberta" => "bert.encoder.layer.0.attention",
        "vit" => "vit.encoder.layer.0.attention",
        "bart" => "model.decoder.layers.0.self_attn",
        "t5" => "decoder.block.0.layer.0.SelfAttention",
        _ => "model.layers.0.self_attn",
    }
}

/// Edge values as JSON text.
const EDGES: [&str; 12] = [
    "0",
    "-1",
    "4294967296",
    "18446744073709551615",
    "1e400",
    "null",
    "\"8\"",
    "2",
    "4",
    "8",
    "0.5",
    "true",
];

/// A safetensors file: 8-byte header length, the JSON header, the data.
fn safetensors(tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let start = data.len();
        data.extend_from_slice(bytes);
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "{name:?}:{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend(data);
    file
}

/// The tensors (name, `(rows, cols)` as stored, bias length) a layout needs.
fn needed(layout: &Layout, module: &str, c: &MultiHeadConfig) -> Vec<(String, Vec<usize>)> {
    let (d, inner, kv) = (c.d_model(), c.inner_dim(), c.kv_width());
    let fused = inner.saturating_add(kv.saturating_mul(2));
    let name = |suffix: &str| format!("{module}.{suffix}");
    let mut out = Vec::new();
    let mut linear = |m: &str, rows: usize, cols: usize, bias: bool| {
        out.push((name(&format!("{m}.weight")), vec![rows, cols]));
        if bias {
            out.push((name(&format!("{m}.bias")), vec![rows]));
        }
    };
    let has = |p| c.has_bias_on(p);
    match layout {
        Layout::Separate {
            query,
            key,
            value,
            output,
        } => {
            linear(query, inner, d, has(Projection::Query));
            linear(key, kv, c.kdim(), has(Projection::Key));
            linear(value, kv, c.vdim(), has(Projection::Value));
            linear(output, d, inner, has(Projection::Output));
        }
        Layout::Conv1d { qkv, output } => {
            out.push((name(&format!("{qkv}.weight")), vec![d, fused]));
            if has(Projection::Query) {
                out.push((name(&format!("{qkv}.bias")), vec![fused]));
            }
            out.push((name(&format!("{output}.weight")), vec![inner, d]));
            if has(Projection::Output) {
                out.push((name(&format!("{output}.bias")), vec![d]));
            }
        }
        Layout::FusedPerHead { qkv, output } => {
            linear(qkv, fused, d, has(Projection::Query));
            linear(output, d, inner, has(Projection::Output));
        }
        Layout::TorchMultihead => {
            linear("in_proj", fused, d, has(Projection::Query));
            linear("out_proj", d, inner, has(Projection::Output));
        }
    }
    if c.has_sinks() {
        out.push((name("sinks"), vec![c.n_heads()]));
    }
    out
}

/// Runs a loaded layer on a small padded batch.
fn run(layer: &MultiHeadAttention<f32>) {
    let d = layer.config().d_model();
    if d > 512 {
        return;
    }
    let x = Array3::from_shape_fn((2, 3, d), |(b, t, i)| {
        ((b + 2 * t + 3 * i) % 7) as f32 - 3.0
    });
    let x2 = x.index_axis(ndarray::Axis(0), 0);
    let _ = layer.forward(&x2, &x2, &x2, &[]);
    let real = Array2::from_shape_fn((2, 3), |(b, t)| b == 0 || t > 0);
    let _ = layer.forward_padded(&x, &real, &[]);
    let _ = layer.forward_packed(&x2, &[0, 1, 3]);
    let mut cache = layer.new_cache(2);
    let _ = layer.forward_cached_padded(&x, &real, &mut cache);
}

fn raw(data: &[u8]) {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (config, weights) = data.split_at(split);
    let Ok(tensors) = SafeTensors::from_bytes(weights.to_vec()) else {
        return;
    };
    for name in attn::StateDict::<f32>::names(&tensors).iter().take(4) {
        let _ = attn::StateDict::<attn::half::f16>::tensor(&tensors, name);
    }
    let Ok(model) = HfModel::from_parts(&String::from_utf8_lossy(config), tensors) else {
        return;
    };
    if let Ok(modules) = model.attention_modules() {
        for module in modules.iter().take(2) {
            if let Ok(layer) = model.attention::<f32>(module) {
                run(&layer);
            }
        }
    }
    let _ = model.attention::<f32>("model.layers.0.self_attn");
}

fn structured(data: &[u8]) {
    let mut bytes = Bytes(data);
    let model_type = bytes.pick(&MODEL_TYPES);
    let module = module_of(model_type);
    let keys = [
        "hidden_size",
        "n_embd",
        "d_model",
        "num_attention_heads",
        "n_head",
        "num_heads",
        "num_key_value_heads",
        "head_dim",
        "d_kv",
        "sliding_window",
        "rope_theta",
        "partial_rotary_factor",
        "rotary_pct",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "decoder_attention_heads",
        "encoder_attention_heads",
        "use_sliding_window",
        "attention_bias",
        "qkv_bias",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "use_bidirectional_attention",
    ];
    let mut json = format!("{{\"model_type\":\"{model_type}\"");
    for key in keys {
        if bytes.byte() % 3 != 0 {
            json.push_str(&format!(",\"{key}\":{}", bytes.pick(&EDGES)));
        }
    }
    if bytes.byte() % 4 == 0 {
        let kind = bytes.pick(&["\"default\"", "\"linear\"", "\"llama3\"", "\"yarn\"", "3"]);
        json.push_str(&format!(
            ",\"rope_scaling\":{{\"rope_type\":{kind},\"factor\":{},\"low_freq_factor\":{},\"high_freq_factor\":{},\"original_max_position_embeddings\":{}}}",
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES)
        ));
    }
    if bytes.byte() % 3 == 0 {
        // each layer's kind: the known two, another, or not a string
        let kinds = [
            "\"sliding_attention\"",
            "\"full_attention\"",
            "\"chunked\"",
            "7",
        ];
        let (first, second) = (bytes.pick(&kinds), bytes.pick(&kinds));
        let list = match bytes.byte() % 3 {
            0 => String::new(),
            1 => first.to_string(),
            _ => format!("{first},{second}"),
        };
        json.push_str(&format!(",\"layer_types\":[{list}]"));
    }
    if bytes.byte() % 4 == 0 {
        // YaRN's own settings
        json.push_str(&format!(
            ",\"rope_parameters\":{{\"rope_type\":\"yarn\",\"rope_theta\":{},\"factor\":{},\"original_max_position_embeddings\":{},\"beta_fast\":{},\"beta_slow\":{},\"truncate\":{},\"attention_factor\":{},\"mscale\":{},\"mscale_all_dim\":{}}}",
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES),
            bytes.pick(&EDGES)
        ));
    }
    json.push('}');
    let Ok(empty) = SafeTensors::from_bytes(safetensors(&[])) else {
        return;
    };
    let Ok(probe) = HfModel::from_parts(&json, empty) else {
        return;
    };
    let _ = probe.relative_buckets(module);
    let (Ok(config), Ok(layout)) = (probe.config(module), probe.layout()) else {
        return;
    };
    let mut tensors = Vec::new();
    for (name, mut shape) in needed(&layout, module, &config) {
        match bytes.byte() % 8 {
            0 => continue, // missing
            1 => shape[0] = shape[0].wrapping_add(1),
            2 => shape.push(1),
            _ => {}
        }
        let dtype = bytes.pick(&["F32", "F32", "F64", "BF16", "F16", "I8", "F32"]);
        let width = match dtype {
            "F64" => 8,
            "F32" => 4,
            "I8" => 1,
            _ => 2,
        };
        let count = shape.iter().try_fold(1usize, |n, &a| n.checked_mul(a));
        let data = match count {
            // real values, some of them beyond f16's range
            Some(n) if n <= 1 << 14 => (0..n * width)
                .map(|i| (i as u8).wrapping_mul(bytes.byte() | 1))
                .collect(),
            // a hostile header: a huge shape over no bytes
            _ => Vec::new(),
        };
        tensors.push((name, dtype, shape, data));
    }
    if bytes.byte() % 5 == 0 {
        // a zero-element tensor with a huge axis, and an unknown name
        tensors.push((
            format!("{module}.extra"),
            "F32",
            vec![0, 1 << 63],
            Vec::new(),
        ));
    }
    let Ok(file) = SafeTensors::from_bytes(safetensors(&tensors)) else {
        return;
    };
    let Ok(model) = HfModel::from_parts(&json, file) else {
        return;
    };
    let _ = model.attention_modules();
    if let Ok(layer) = model.attention::<f32>(module) {
        run(&layer);
    }
    let _ = model.attention::<f64>(module);
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&kind, rest)) if kind % 2 == 0 => raw(rest),
        Some((_, rest)) => structured(rest),
        None => {}
    }
});
