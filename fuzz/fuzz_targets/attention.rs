//! Fuzzes the main entry points with raw bytes: shapes (0 included), strides,
//! masks, scale and the float bits of every input. Every call must return `Ok`
//! or `Err`, never panic; and where the fused kernel and the reference path both
//! answer, they must agree (NaN where the other has NaN).
#![no_main]

use attn::parameter_free::{cat, FeatureMapAttention};
use attn::rng::{NumpyRandom, TorchGenerator};
use attn::{Init, Kernel, Mask, MultiHeadConfig, ProjectionShape, QkvProjection, ScaledDotProduct};
use libfuzzer_sys::fuzz_target;

#[path = "bytes.rs"]
mod bytes;
use bytes::Bytes;
use ndarray::{concatenate, Array2, Array4, Axis};

fn agree(fused: &Array2<f64>, plain: &Array2<f64>) {
    assert_eq!(fused.dim(), plain.dim());
    for (x, y) in fused.iter().zip(plain.iter()) {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-9 * (1.0 + y.abs());
        assert!(ok, "fused {x} vs reference {y}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let (l, s, d, dv) = (
        bytes.size(40),
        bytes.size(40),
        bytes.size(12),
        bytes.size(6),
    );
    let flags = bytes.byte();
    let q = bytes.matrix(l, d);
    let k = bytes.matrix(s, d);
    let v_rows = if flags & 1 == 0 { s } else { bytes.size(40) };
    let v = bytes.matrix(v_rows, dv);
    let keep = Array2::from_shape_simple_fn((l, s), || bytes.byte() % 5 != 0);
    let bias = bytes.matrix(l, s);
    // long keys: the keys, values and masks repeated 64 times, so that few query
    // rows reach the decoding path (and its parts of 2048 keys)
    let (k, v, keep, bias) = if flags & 64 != 0 {
        let rows =
            |m: &Array2<f64>| concatenate(Axis(0), &vec![m.view(); 64]).expect("same widths");
        let cols =
            |m: &Array2<f64>| concatenate(Axis(1), &vec![m.view(); 64]).expect("same heights");
        let keep = concatenate(Axis(1), &vec![keep.view(); 64]).expect("same heights");
        (rows(&k), rows(&v), keep, cols(&bias))
    } else {
        (k, v, keep, bias)
    };
    let s = k.nrows();
    let scale = if flags & 2 == 0 {
        None
    } else {
        Some(bytes.float())
    };
    let build = |kernel| bytes::attention(kernel, scale, flags >> 2, &keep, &bias);
    // Scores of magnitude past ~1e12 carry a rounding error (an ulp of the score)
    // that the softmax turns into O(1) changes of the weights: there the paths
    // agree only to the rounding of the scores, which this check cannot see.
    let largest = |m: &Array2<f64>| m.iter().fold(0.0_f64, |a, x| a.max(x.abs()));
    let score_bound = d as f64 * largest(&q) * largest(&k) * scale.map_or(1.0, f64::abs);
    let well_conditioned = !(score_bound.is_finite() && score_bound >= 1e12);
    let q_t = q.t().to_owned();
    let plain = build(Kernel::Plain).forward(&q, &k, &v);
    for kernel in [Kernel::Fused, Kernel::Auto] {
        let fused = build(kernel).forward(&q_t.t(), &k, &v);
        match (&fused, &plain) {
            (Ok(f), Ok(p)) if well_conditioned => agree(f, p),
            (Ok(f), Ok(p)) => assert_eq!(f.dim(), p.dim()),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("one path failed and the other did not: {fused:?} vs {plain:?}"),
        }
    }
    let _ = build(Kernel::Plain).forward_with_weights(&q, &k, &v);
    // batched and grouped-query: heads from a byte, any of them may not divide
    let (heads, kv_heads) = (1 + bytes.size(3), bytes.size(3));
    let q4 = Array4::from_shape_fn((1, heads, l, d), |(_, _, i, j)| q[[i, j]]);
    let k4 = Array4::from_shape_fn((1, kv_heads, s, d), |(_, _, i, j)| k[[i, j]]);
    let v4 = Array4::from_shape_fn((1, kv_heads, v.nrows(), dv), |(_, _, i, j)| v[[i, j]]);
    let _ = build(Kernel::Auto).forward_batched(&q4, &k4, &v4);
    // the layers: sizes and counts from bytes, any of them invalid
    let (d_model, n_heads, n_kv) = (bytes.size(12), bytes.size(4), bytes.size(4));
    let config = MultiHeadConfig::new(d_model, n_heads)
        .with_kv_heads(n_kv)
        .with_kdim(d.max(1));
    if let Ok(mha) = config.random::<f64>(Init::TorchMultihead, u64::from(flags)) {
        let x = Array2::from_shape_fn((l, d_model), |(i, j)| {
            q.get((i, j % d.max(1))).copied().unwrap_or(0.5)
        });
        let kv = Array2::from_shape_fn((s, d.max(1)), |(i, j)| {
            k.get((i, j)).copied().unwrap_or(-0.5)
        });
        let _ = mha.forward_with_weights(&x, &kv, &kv, &[Mask::CausalBottomRight]);
        let _ = mha.forward(&x, &x, &x, &[]);
    }
    let shape = ProjectionShape::new(d, bytes.size(6), dv).with_context(d, d);
    if let Ok(projection) =
        QkvProjection::<f64>::random(shape, Init::Normal { std: bytes.float() }, 7)
    {
        let _ = projection.cross_attention(&q, &k, &k, &ScaledDotProduct::new());
        let _ = projection.self_attention(&k, &ScaledDotProduct::new());
    }
    let _ = cat(&q, &k, &v);
    let map = ndarray::Array3::from_shape_fn((dv, 2, l.min(5)), |(c, h, w)| {
        bytes.float() + (c + h + w) as f64
    });
    let _ = FeatureMapAttention::new()
        .with_residual(bytes.float())
        .forward(&map);
    // the generators: any seed, any bound, small shapes
    let high = i64::from(i32::from_le_bytes([
        bytes.byte(),
        bytes.byte(),
        bytes.byte(),
        bytes.byte(),
    ]));
    let _ = NumpyRandom::seed(u32::from(flags)).randint(high, bytes.size(20));
    let _ = TorchGenerator::manual_seed(u64::from(flags)).randn((bytes.size(20), bytes.size(3)));
});
