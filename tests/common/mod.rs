//! Shared test helpers: golden-file loading and a slow, obvious reference.
#![allow(dead_code)]

use ndarray::{Array2, Array4, ArrayD, ArrayView2, IxDyn};
use serde_json::Value;

/// Reads `tests/golden/NAME` (reference numbers from real PyTorch / NumPy).
pub fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}

fn shape_of(v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    shape
}

fn leaves<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|x| leaves(x, out)),
        leaf => out.push(leaf),
    }
}

/// A nested JSON list of numbers as an array of any dimension (the strings
/// `"-inf"` and `"inf"` stand for the infinities).
pub fn array_f64(v: &Value) -> ArrayD<f64> {
    let mut flat = Vec::new();
    leaves(v, &mut flat);
    let number = |x: &Value| match x.as_str() {
        Some("-inf") => f64::NEG_INFINITY,
        Some("inf") => f64::INFINITY,
        _ => x.as_f64().expect("a number"),
    };
    let data = flat.iter().map(|x| number(x)).collect();
    ArrayD::from_shape_vec(IxDyn(&shape_of(v)), data).expect("a rectangular list")
}

/// A nested JSON list of booleans as an array of any dimension.
pub fn array_bool(v: &Value) -> ArrayD<bool> {
    let mut flat = Vec::new();
    leaves(v, &mut flat);
    let data = flat
        .iter()
        .map(|x| x.as_bool().expect("a boolean"))
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape_of(v)), data).expect("a rectangular list")
}

/// A nested JSON list of numbers as a 2-D array.
pub fn array2(v: &Value) -> Array2<f64> {
    array_f64(v).into_dimensionality().expect("a 2-D list")
}

/// How the reference treats masks, spelled out position by position.
#[derive(Clone, Copy, Debug)]
pub enum RefCausal {
    None,
    TopLeft,
    BottomRight,
}

/// Slow, obvious attention in f64: loops, no library code.
///
/// `keep[i][j] == false` or `causal` excluding `(i, j)` means weight 0; `bias` is
/// added to the scaled score. A row with nothing allowed gives weights 0.
pub fn reference(
    q: ArrayView2<f64>,
    k: ArrayView2<f64>,
    v: ArrayView2<f64>,
    scale: f64,
    keep: Option<ArrayView2<bool>>,
    bias: Option<ArrayView2<f64>>,
    causal: RefCausal,
) -> (Array2<f64>, Array2<f64>) {
    let (l, d) = q.dim();
    let s = k.nrows();
    let dv = v.ncols();
    let mut weights = Array2::zeros((l, s));
    let mut output = Array2::zeros((l, dv));
    for i in 0..l {
        let mut scores = vec![None; s];
        for j in 0..s {
            let allowed_by_causal = match causal {
                RefCausal::None => true,
                RefCausal::TopLeft => j <= i,
                RefCausal::BottomRight => j as i64 <= i as i64 + s as i64 - l as i64,
            };
            let allowed = allowed_by_causal && keep.is_none_or(|m| m[[i, j]]);
            if allowed {
                let mut dot = 0.0;
                for c in 0..d {
                    dot += q[[i, c]] * k[[j, c]];
                }
                let score = dot * scale + bias.map_or(0.0, |b| b[[i, j]]);
                if score != f64::NEG_INFINITY {
                    scores[j] = Some(score);
                }
            }
        }
        let max = scores
            .iter()
            .flatten()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue;
        }
        let total: f64 = scores.iter().flatten().map(|x| (x - max).exp()).sum();
        for j in 0..s {
            if let Some(x) = scores[j] {
                let w = (x - max).exp() / total;
                weights[[i, j]] = w;
                for c in 0..dv {
                    output[[i, c]] += w * v[[j, c]];
                }
            }
        }
    }
    (output, weights)
}

/// Largest absolute difference: equal entries (infinities and NaNs included)
/// count 0; a NaN against a number counts infinity.
pub fn max_abs_diff<D: ndarray::Dimension>(
    a: &ndarray::Array<f64, D>,
    b: &ndarray::Array<f64, D>,
) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (false, false) if x == y => 0.0,
            (false, false) => (x - y).abs(),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

/// Asserts that `got` equals `want` entry by entry within `epsilon` (approx's
/// `abs_diff_eq`, which also requires equal shapes), reporting the largest
/// difference when it does not.
#[track_caller]
pub fn assert_close<D: ndarray::Dimension>(
    got: &ndarray::Array<f64, D>,
    want: &ndarray::Array<f64, D>,
    epsilon: f64,
) {
    assert!(
        approx::abs_diff_eq!(got, want, epsilon = epsilon),
        "largest difference {:e} exceeds {epsilon:e}",
        max_abs_diff(got, want)
    );
}

/// One set of masks per kind the kernels take: none, both causal alignments, a
/// sliding window of `window`, ALiBi with causal, and a keep-mask with a bias.
pub fn every_mask_kind<'m>(
    keep: &'m Array2<bool>,
    bias: &'m Array2<f64>,
    slopes: &'m ndarray::Array1<f64>,
    window: usize,
) -> Vec<Vec<attn::Mask<'m, f64>>> {
    use attn::Mask;
    vec![
        vec![],
        vec![Mask::CausalTopLeft],
        vec![Mask::CausalBottomRight],
        vec![Mask::SlidingWindow(window)],
        vec![Mask::Alibi(slopes.view()), Mask::CausalBottomRight],
        vec![Mask::keep(keep), Mask::bias(bias)],
    ]
}

/// A deterministic pseudo-random array in [-2, 2), from a simple LCG.
pub fn pseudo_random(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
    })
}

/// [`pseudo_random`] as a 2-D array.
pub fn random2(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
    pseudo_random(&[rows, cols], seed)
        .into_dimensionality()
        .expect("2-D")
}

/// [`pseudo_random`] as a 4-D `(batch, heads, seq, dim)` array.
pub fn random4(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f64> {
    pseudo_random(&[shape.0, shape.1, shape.2, shape.3], seed)
        .into_dimensionality()
        .expect("4-D")
}

/// The instruction set the fused paths must run with in this process: what
/// `ATTN_KERNEL_ARCH` allows of what the CPU has. Keys stored in bf16
/// (`bf16_keys`) take the tiled kernel's bf16 dot products where the CPU has
/// AVX512_BF16 and the cap allows them.
pub fn expected_arch(bf16_keys: bool) -> attn::KernelArch {
    use attn::KernelArch;
    let cap = std::env::var("ATTN_KERNEL_ARCH").unwrap_or_default();
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        let bf16 = avx512 && is_x86_feature_detected!("avx512bf16");
        let amx = bf16 && cpu_flag("amx_tile") && cpu_flag("amx_bf16");
        match cap.as_str() {
            "" | "amx" if amx && bf16_keys => return KernelArch::Amx,
            "" | "amx" | "avx512bf16" if bf16 && bf16_keys => return KernelArch::Avx512Bf16,
            "" | "amx" | "avx512bf16" | "avx512" if avx512 => return KernelArch::Avx512,
            "" | "amx" | "avx512bf16" | "avx512" | "avx2" if avx2 => return KernelArch::Avx2,
            _ => {}
        }
    }
    let _ = (cap, bf16_keys);
    KernelArch::Portable
}

/// Whether Linux lists `name` among this CPU's flags (the AMX flags have no
/// stable `is_x86_feature_detected!`).
#[cfg(target_arch = "x86_64")]
fn cpu_flag(name: &str) -> bool {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu.lines()
        .find(|line| line.starts_with("flags"))
        .is_some_and(|line| line.split_whitespace().any(|flag| flag == name))
}

/// Runs `f`, asserting that the fused backward pass computed all `heads` heads
/// (`fused`), or the reference path did.
pub fn backward_by<R>(fused: bool, heads: usize, f: impl FnOnce() -> R) -> R {
    backward_paths(fused, heads, f).0
}

/// [`backward_by`], and the paths, for their instruction set.
pub fn backward_paths<R>(
    fused: bool,
    heads: usize,
    f: impl FnOnce() -> R,
) -> (R, attn::KernelPaths) {
    let (result, paths) = attn::kernel_paths(f);
    let (want_fused, want_reference) = if fused { (heads, 0) } else { (0, heads) };
    assert_eq!(
        (
            paths.backward,
            paths.reference,
            paths.tiled + paths.direct + paths.rowwise
        ),
        (want_fused, want_reference, 0),
        "{paths:?}"
    );
    (result, paths)
}
