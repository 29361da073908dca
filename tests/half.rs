//! Half precision (`half::bf16`, `half::f16`): the same calls as for f32, inputs
//! and outputs in the half type, computed in f32. Checked against an f64
//! reference computed from the same half inputs: the error may be the rounding
//! of the output to the half type plus the f32 computation's own.

use crate::common;

use attn::{KvCache, Mask, Parallelism, ScaledDotProduct, Storage};
use common::{RefCausal, pseudo_random, reference};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array4, Axis, s};

/// A half type and how far apart its values are.
pub(crate) trait Half: Storage<Compute = f32> {
    const NAME: &'static str;
    /// The spacing of this type's values near `x` (one unit in the last place).
    fn ulp(x: f64) -> f64;
}

/// Attention with every one of `masks`.
fn with_masks<'a, T: Storage>(
    masks: impl IntoIterator<Item = Mask<'a, T>>,
) -> ScaledDotProduct<'a, T> {
    masks
        .into_iter()
        .fold(ScaledDotProduct::new(), ScaledDotProduct::with_mask)
}

impl Half for bf16 {
    const NAME: &'static str = "bf16";
    fn ulp(x: f64) -> f64 {
        // 8 significant bits; subnormal spacing below 2^-126
        2f64.powi(x.abs().max(f64::MIN_POSITIVE).log2().floor().max(-126.0) as i32 - 7)
    }
}

impl Half for f16 {
    const NAME: &'static str = "f16";
    fn ulp(x: f64) -> f64 {
        // 11 significant bits; subnormal spacing 2^-24
        2f64.powi(x.abs().max(f64::MIN_POSITIVE).log2().floor().max(-14.0) as i32 - 10)
    }
}

pub(crate) fn to_half<H: Half, D: ndarray::Dimension>(
    x: &ndarray::Array<f64, D>,
) -> ndarray::Array<H, D> {
    x.mapv(|v| H::from_compute(v as f32))
}

pub(crate) fn to_f64<H: Half, D: ndarray::Dimension>(
    x: &ndarray::Array<H, D>,
) -> ndarray::Array<f64, D> {
    x.mapv(|v| f64::from(v.to_compute()))
}

/// Asserts `got` (half) is within the rounding of the f64 reference `want` plus
/// the f32 computation's error, `1e-5 · scale` (`scale`: the largest |value|).
#[track_caller]
fn assert_rounded<H: Half>(
    what: &str,
    got: &Array2<f64>,
    want: &Array2<f64>,
    scale: f64,
    weights: f64,
) {
    for ((i, j), &w) in want.indexed_iter() {
        let g = got[[i, j]];
        let allowed = H::ulp(w.abs() + 1e-5 * scale) + 1e-5 * scale + weights;
        assert!(
            (g - w).abs() <= allowed,
            "{} {what} [{i}, {j}]: got {g}, want {w}, allowed {allowed:e}",
            H::NAME
        );
    }
}

/// How far an output of type `H` may move when the kernel that ran rounds the
/// softmax's weights to bf16 before `P·V` (bf16 on AMX tiles or with
/// `vdpbf16ps`): each weight by at most 2⁻⁸ of itself, so the weighted average
/// of the values by at most 2⁻⁸ of the largest value (`largest`), within one
/// bf16 spacing of it; 0 for the kernels that keep the weights in f32.
fn rounded_weights<H: Half>(arch: Option<attn::KernelArch>, largest: f64) -> f64 {
    use attn::KernelArch::{Amx, Avx512Bf16};
    match arch {
        Some(Amx | Avx512Bf16) if H::NAME == "bf16" => bf16::ulp(largest),
        _ => 0.0,
    }
}

/// The largest magnitude among `values`.
fn largest<'a>(values: impl IntoIterator<Item = &'a f64>) -> f64 {
    values.into_iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Every mask kind, sizes across the kernel's block edges, both paths (tiled for
/// long queries, direct for a few rows against many keys).
fn masks_and_sizes<H: Half>() {
    let sizes = [
        (1, 1, 8),
        (3, 5, 16),
        (17, 33, 64),
        (64, 300, 64),
        (130, 129, 32),
        (2, 513, 64),
    ];
    for (n, &(l, s_len, d)) in sizes.iter().enumerate() {
        let seed = 100 + n as u64;
        let (q, k, v) = (
            to_half::<H, _>(&common::random2(l, d, seed)),
            to_half::<H, _>(&common::random2(s_len, d, seed + 1)),
            to_half::<H, _>(&common::random2(s_len, d, seed + 2)),
        );
        let keep = Array2::from_shape_fn((l, s_len), |(i, j)| (i * 7 + j * 3) % 5 != 0);
        let bias = to_half::<H, _>(&common::random2(l, s_len, seed + 3).mapv(|b| b / 2.0));
        let slopes = to_half::<H, _>(&Array1::from(vec![0.125]));
        let window = 5;
        let cases: Vec<(Vec<Mask<'_, H>>, RefCausal)> = vec![
            (vec![], RefCausal::None),
            (vec![Mask::CausalTopLeft], RefCausal::TopLeft),
            (vec![Mask::CausalBottomRight], RefCausal::BottomRight),
            (vec![Mask::keep(&keep), Mask::bias(&bias)], RefCausal::None),
            (vec![Mask::SlidingWindow(window)], RefCausal::BottomRight),
            (
                vec![Mask::Alibi(slopes.view()), Mask::CausalBottomRight],
                RefCausal::BottomRight,
            ),
        ];
        let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
        for (masks, causal) in cases {
            let names = format!("{l}x{s_len}x{d} {masks:?}");
            let attn = with_masks(masks.iter().cloned());
            let (got, paths) = attn::kernel_paths(|| attn.forward(&q, &k, &v).expect("valid"));
            let got = to_f64(&got);
            // the reference sees the same half values, every mask spelled out
            let mut bias64 = Array2::<f64>::zeros((l, s_len));
            let mut keep64 = Array2::from_elem((l, s_len), true);
            for mask in &masks {
                match mask {
                    Mask::Keep(_) => keep64 = keep.clone(),
                    Mask::Bias(_) => bias64 = &bias64 + &to_f64(&bias),
                    Mask::Alibi(_) => {
                        let slope = f64::from(slopes[0].to_compute());
                        for ((i, j), b) in bias64.indexed_iter_mut() {
                            let p = i as f64 + s_len as f64 - l as f64;
                            *b -= slope * (p - j as f64).abs();
                        }
                    }
                    Mask::SlidingWindow(w) => {
                        for ((i, j), keep) in keep64.indexed_iter_mut() {
                            let p = i as i64 + s_len as i64 - l as i64;
                            *keep &= j as i64 > p - *w as i64;
                        }
                    }
                    _ => {}
                }
            }
            let (want, _) = reference(
                q64.view(),
                k64.view(),
                v64.view(),
                1.0 / (d as f64).sqrt(),
                Some(keep64.view()),
                Some(bias64.view()),
                causal,
            );
            let weights = rounded_weights::<H>(paths.arch, largest(&v64));
            assert_rounded::<H>(&names, &got, &want, 2.0, weights);
            // the batched call, one head: the same numbers
            let lift = |x: &ndarray::Array2<H>| {
                x.view()
                    .insert_axis(Axis(0))
                    .insert_axis(Axis(0))
                    .to_owned()
            };
            let batched = attn.forward_batched(&lift(&q), &lift(&k), &lift(&v));
            // masks of the 2-D problem broadcast to (1, 1, L, S)
            let batched = batched.expect("valid");
            assert_eq!(
                batched.index_axis(Axis(0), 0).index_axis(Axis(0), 0),
                to_half::<H, _>(&got),
                "{names}"
            );
        }
    }
}

#[test]
fn bf16_matches_the_f64_reference_within_its_rounding() {
    masks_and_sizes::<bf16>();
}

#[test]
fn f16_matches_the_f64_reference_within_its_rounding() {
    masks_and_sizes::<f16>();
}

/// Scores far beyond f16's range (65 504) neither overflow nor lose the answer:
/// they are accumulated in f32.
#[test]
fn f16_scores_beyond_its_range_are_computed_in_f32() {
    let d = 64;
    let q = Array2::from_elem((4, d), f16::from_f32(200.0));
    let k = Array2::from_shape_fn((6, d), |(j, _)| {
        f16::from_f32(if j == 2 { 200.0 } else { 150.0 })
    });
    let v = Array2::from_shape_fn((6, 3), |(j, c)| f16::from_f32((j * 3 + c) as f32));
    // q·k = 2.56e6 for key 2 and 1.92e6 for the others: key 2 takes every weight
    let out = attn::scaled_dot_product(&q, &k, &v).expect("valid");
    for row in out.rows() {
        let row: Vec<f32> = row.iter().map(|x| x.to_f32()).collect();
        assert_eq!(row, vec![6.0, 7.0, 8.0]);
    }
    let w = attn::attention_weights(&q, &k).expect("valid");
    assert!(w.iter().all(|x| x.to_f32().is_finite()));
}

/// A query that sees no key gives zeros, not NaN, in half precision too.
#[test]
fn fully_masked_rows_give_zeros() {
    let x = Array2::from_elem((3, 4), bf16::from_f32(1.0));
    let keep = ndarray::array![
        [false, false, false],
        [true, false, true],
        [false, false, false]
    ];
    let out = ScaledDotProduct::new()
        .with_mask(Mask::keep(&keep))
        .forward_with_weights(&x, &x, &x)
        .expect("valid");
    assert!(out.output.row(0).iter().all(|x| x.to_f32() == 0.0));
    assert!(out.weights.row(2).iter().all(|x| x.to_f32() == 0.0));
    assert_eq!(out.weights[[1, 0]], bf16::from_f32(0.5));
}

/// One thread and two give the same bits.
#[test]
fn one_and_two_threads_give_the_same_bits() {
    let q = to_half::<bf16, _>(
        &pseudo_random(&[2, 4, 300, 64], 7)
            .into_dimensionality()
            .expect("4-D"),
    );
    let kv = to_half::<bf16, _>(
        &pseudo_random(&[2, 2, 300, 64], 8)
            .into_dimensionality()
            .expect("4-D"),
    );
    let attn = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    let two = pool
        .install(|| attn.forward_batched(&q, &kv, &kv))
        .expect("valid");
    let one = attn
        .clone()
        .with_parallelism(Parallelism::Sequential)
        .forward_batched(&q, &kv, &kv)
        .expect("valid");
    assert_eq!(one, two);
}

/// A half cache holds half the bytes and decodes as causal attention over the
/// whole sequence, with grouped-query heads, sliding too.
#[test]
fn half_caches_decode_as_causal_attention() {
    let (heads, kv_heads, t, d) = (4, 2, 20, 16);
    let q = to_half::<f16, _>(
        &pseudo_random(&[1, heads, t, d], 30)
            .into_dimensionality()
            .expect("4-D"),
    );
    let k = to_half::<f16, _>(
        &pseudo_random(&[1, kv_heads, t, d], 31)
            .into_dimensionality()
            .expect("4-D"),
    );
    let v = to_half::<f16, _>(
        &pseudo_random(&[1, kv_heads, t, d], 32)
            .into_dimensionality()
            .expect("4-D"),
    );
    for window in [None, Some(6)] {
        let mut cache = match window {
            None => KvCache::<f16>::new(1, kv_heads, d, d),
            Some(w) => KvCache::<f16>::sliding(1, kv_heads, d, d, w).expect("valid"),
        };
        let full = match window {
            None => ScaledDotProduct::new().with_mask(Mask::CausalTopLeft),
            Some(w) => ScaledDotProduct::new().with_mask(Mask::SlidingWindow(w)),
        }
        .forward_batched(&q, &k, &v)
        .expect("valid");
        let prompt = 7;
        let mut outs = vec![
            cache
                .attend(
                    &q.slice(s![.., .., ..prompt, ..]),
                    &k.slice(s![.., .., ..prompt, ..]),
                    &v.slice(s![.., .., ..prompt, ..]),
                )
                .expect("valid"),
        ];
        for i in prompt..t {
            let r = s![.., .., i..i + 1, ..];
            outs.push(
                cache
                    .attend(&q.slice(r), &k.slice(r), &v.slice(r))
                    .expect("valid"),
            );
        }
        let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
        let stepped = ndarray::concatenate(Axis(2), &views).expect("same shapes");
        // both computed in f32 from the same f16 values, by different paths:
        // at most one rounding step apart
        for (a, b) in stepped.iter().zip(full.iter()) {
            let (a, b) = (f64::from(a.to_f32()), f64::from(b.to_f32()));
            assert!(
                (a - b).abs() <= f16::ulp(a.abs().max(b.abs())),
                "{window:?}: {a} vs {b}"
            );
        }
        let held = cache.keys();
        assert_eq!(std::mem::size_of_val(&held[[0, 0, 0, 0]]), 2);
        assert_eq!(held.dim(), (1, kv_heads, window.unwrap_or(t), d));
    }
}

/// The contract of the half-precision issue, as written there.
#[test]
fn the_contract_compiles_and_runs() -> attn::Result<()> {
    let q: Array2<bf16> = Array2::from_elem((3, 8), bf16::from_f32(0.5));
    let out: Array2<bf16> = attn::scaled_dot_product(&q, &q, &q)?;
    assert_eq!(out, q);
    let q4: Array4<f16> = Array4::from_elem((1, 4, 3, 8), f16::from_f32(0.25));
    let kv4: Array4<f16> = Array4::from_elem((1, 2, 5, 8), f16::from_f32(0.25));
    let out: Array4<f16> = ScaledDotProduct::new()
        .with_mask(Mask::CausalBottomRight)
        .forward_batched(&q4, &kv4, &kv4)?;
    assert_eq!(out.dim(), (1, 4, 3, 8));
    let (batch, kv_heads, d_k, d_v) = (1, 2, 8, 8);
    let mut cache = KvCache::<bf16>::new(batch, kv_heads, d_k, d_v);
    let q_new = Array4::from_elem((1, 4, 1, 8), bf16::from_f32(1.0));
    let k_new = Array4::from_elem((1, 2, 1, 8), bf16::from_f32(1.0));
    let step: Array4<bf16> = cache.attend(&q_new, &k_new, &k_new)?;
    assert_eq!(step, q_new);
    let mut sliding = KvCache::<f16>::sliding(1, 1, 2, 2, 4)?;
    let x = Array4::from_elem((1, 1, 2, 2), f16::from_f32(1.0));
    sliding.attend(&x, &x, &x)?;
    Ok(())
}

/// A decoding step over half-precision keys and values takes the direct path,
/// which reads them where they lie (asserted through the path counter), and
/// agrees with the same step over f32 copies of them to the f32 path's accuracy
/// before rounding: at most one rounding step apart.
#[test]
fn half_decoding_reads_keys_and_values_where_they_lie() {
    // 2 key/value heads: four query rows share each widened chunk of values;
    // 8: one row each, its values widened in registers
    fn check<H: Half>(kv_heads: usize) {
        let (heads, s_len, d) = (8, 700, 64);
        let q = to_half::<H, _>(
            &pseudo_random(&[2, heads, 1, d], 40)
                .into_dimensionality()
                .expect("4-D"),
        );
        let k = to_half::<H, _>(
            &pseudo_random(&[2, kv_heads, s_len, d], 41)
                .into_dimensionality()
                .expect("4-D"),
        );
        let v = to_half::<H, _>(
            &pseudo_random(&[2, kv_heads, s_len, d], 42)
                .into_dimensionality()
                .expect("4-D"),
        );
        let keep = Array2::from_shape_fn((1, s_len), |(_, j)| j % 7 != 3);
        let slopes = to_half::<H, _>(&Array1::from(vec![
            0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08,
        ]));
        let masks: Vec<Vec<Mask<'_, H>>> = vec![
            vec![],
            vec![Mask::keep(&keep), Mask::Alibi(slopes.view())],
            vec![Mask::SlidingWindow(100)],
        ];
        for masks in masks {
            let attn = with_masks(masks.iter().cloned());
            let (out, paths) =
                attn::kernel_paths(|| attn.forward_batched(&q, &k, &v).expect("valid"));
            assert_eq!(
                (paths.direct, paths.reference, paths.tiled),
                (16, 0, 0),
                "{} {masks:?}",
                H::NAME
            );
            // the same step with f32 keys and values (and masks), through the f32 direct path
            let f32_masks: Vec<Mask<'_, f32>> = masks
                .iter()
                .map(|m| match m {
                    Mask::Keep(keep) => Mask::Keep(keep.clone()),
                    Mask::SlidingWindow(w) => Mask::SlidingWindow(*w),
                    _ => Mask::CausalBottomRight, // one query: sees every key either way
                })
                .collect();
            let slopes32 = slopes.mapv(|x| x.to_compute());
            let mut f32_attn = with_masks(f32_masks);
            if masks.iter().any(|m| matches!(m, Mask::Alibi(_))) {
                f32_attn = f32_attn.with_mask(Mask::Alibi(slopes32.view()));
            }
            let wide = |x: &Array4<H>| x.mapv(|h| h.to_compute());
            let want = f32_attn
                .forward_batched(&wide(&q), &wide(&k), &wide(&v))
                .expect("valid");
            for (a, b) in out.iter().zip(want.iter()) {
                let (a, b) = (f64::from(a.to_compute()), f64::from(*b));
                assert!((a - b).abs() <= H::ulp(b) + 1e-6, "{}: {a} vs {b}", H::NAME);
            }
        }
        // a NaN key sends its heads to the reference path, in f32
        let mut k = k.clone();
        k[[1, 0, 5, 0]] = H::from_compute(f32::NAN);
        let (out, paths) = attn::kernel_paths(|| {
            ScaledDotProduct::new()
                .forward_batched(&q, &k, &v)
                .expect("valid")
        });
        let group = heads / kv_heads;
        assert_eq!(
            (paths.direct, paths.reference),
            (16 - group, group),
            "{}",
            H::NAME
        );
        assert!(
            out.slice(s![0, .., .., ..])
                .iter()
                .all(|x| x.to_compute().is_finite())
        );
    }
    for kv_heads in [2, 8] {
        check::<bf16>(kv_heads);
        check::<f16>(kv_heads);
    }
}

/// bf16 calls with many query rows take the tiled kernel, which reads the bf16
/// keys as they are (scores by bf16 dot products where the CPU has them; the
/// path that ran is asserted), and agree with the same call over f32 copies of
/// the inputs to the f32 kernel's accuracy before rounding: at most one rounding
/// step apart. Odd head sizes pad the last pair; grouped-query heads share their
/// packed keys; a head with a NaN key goes to the reference path alone.
#[test]
fn bf16_prefill_reads_its_keys_as_bf16() {
    let arch = common::expected_arch(true);
    println!("bf16 prefill instruction set: {arch:?}");
    let random = |shape: [usize; 4], seed| -> Array4<bf16> {
        to_half(
            &pseudo_random(&shape, seed)
                .into_dimensionality()
                .expect("4-D"),
        )
    };
    for (heads, kv_heads, l, s_len, d, d_v) in [
        (4, 2, 200, 300, 64, 64),
        (2, 1, 50, 77, 33, 20),
        (3, 3, 20, 600, 1, 3),
        (1, 1, 9, 2100, 128, 64),
    ] {
        let q = random([2, heads, l, d], 50);
        let k = random([2, kv_heads, s_len, d], 51);
        let v = random([2, kv_heads, s_len, d_v], 52);
        let keep = Array2::from_shape_fn((l, s_len), |(i, j)| (i + 2 * j) % 9 != 4);
        let bias = to_half::<bf16, _>(&common::random2(l, s_len, 53).mapv(|b| b / 2.0));
        let masks: Vec<Vec<Mask<'_, bf16>>> = vec![
            vec![],
            vec![Mask::CausalBottomRight],
            vec![Mask::keep(&keep), Mask::bias(&bias)],
        ];
        for masks in masks {
            let name = format!("{heads}/{kv_heads} heads, {l}x{s_len}x{d} {masks:?}");
            let attn = with_masks(masks.iter().cloned());
            let (out, paths) =
                attn::kernel_paths(|| attn.forward_batched(&q, &k, &v).expect("valid"));
            assert_eq!(
                (paths.tiled, paths.reference, paths.arch),
                (2 * heads, 0, Some(arch)),
                "{name}"
            );
            // the forward writes each row as bf16 where its block finishes it;
            // `forward_with_lse` keeps the f32 output and rounds it afterwards
            let (kept, paths) =
                attn::kernel_paths(|| attn.forward_with_lse(&q, &k, &v).expect("valid"));
            assert_eq!((paths.tiled, paths.arch), (2 * heads, Some(arch)));
            assert_eq!(out, kept.output, "{name}: rounded where written");
            let wide = |x: &Array4<bf16>| x.mapv(|h| h.to_compute());
            let bias32 = bias.mapv(|x| x.to_compute());
            let f32_masks: Vec<Mask<'_, f32>> = masks
                .iter()
                .map(|m| match m {
                    Mask::Keep(keep) => Mask::Keep(keep.clone()),
                    Mask::Bias(_) => Mask::bias(&bias32),
                    _ => Mask::CausalBottomRight,
                })
                .collect();
            let want = with_masks(f32_masks)
                .forward_batched(&wide(&q), &wide(&k), &wide(&v))
                .expect("valid");
            let weights = rounded_weights::<bf16>(paths.arch, largest(&to_f64(&v)));
            for (a, b) in out.iter().zip(want.iter()) {
                let (a, b) = (f64::from(a.to_compute()), f64::from(*b));
                assert!(
                    (a - b).abs() <= bf16::ulp(b) + 1e-6 + weights,
                    "{name}: {a} vs {b}"
                );
            }
        }
        // the queries are read as stored: a strided view gives a contiguous
        // array's bits; a NaN query sends its head to the reference path,
        // which widens it, and makes its row NaN
        let call = |q: ndarray::ArrayView4<'_, bf16>| {
            attn::kernel_paths(|| {
                ScaledDotProduct::new()
                    .forward_batched(&q, &k, &v)
                    .expect("valid")
            })
        };
        let (out, paths) = call(q.view());
        assert_eq!((paths.tiled, paths.arch), (2 * heads, Some(arch)));
        let spread = Array4::from_shape_fn([2, heads, l, 2 * d], |(b, h, i, c)| {
            if c % 2 == 0 {
                q[[b, h, i, c / 2]]
            } else {
                bf16::NAN
            }
        });
        let (strided, paths) = call(spread.slice(s![.., .., .., ..;2]));
        assert_eq!((paths.tiled, paths.arch), (2 * heads, Some(arch)));
        assert!(
            strided
                .iter()
                .zip(&out)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let mut bad = q.clone();
        bad[[1, heads - 1, l / 2, d - 1]] = bf16::NAN;
        let (with_nan, paths) = call(bad.view());
        assert_eq!((paths.tiled, paths.reference), (2 * heads - 1, 1));
        for ((b, h, i, c), x) in with_nan.indexed_iter() {
            if (b, h) == (1, heads - 1) {
                assert_eq!(x.is_nan(), i == l / 2, "the NaN query's head, row {i}");
            } else {
                assert_eq!(x.to_bits(), out[[b, h, i, c]].to_bits(), "another head");
            }
        }
        let mut k = k.clone();
        k[[1, 0, s_len / 2, 0]] = bf16::NAN;
        let (out, paths) = attn::kernel_paths(|| {
            ScaledDotProduct::new()
                .forward_batched(&q, &k, &v)
                .expect("valid")
        });
        let group = heads / kv_heads;
        assert_eq!((paths.tiled, paths.reference), (2 * heads - group, group));
        let kept = ScaledDotProduct::new()
            .forward_with_lse(&q, &k, &v)
            .expect("valid");
        assert!(
            out.iter()
                .zip(&kept.output)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(
            out.slice(s![0, .., .., ..])
                .iter()
                .all(|x| x.to_compute().is_finite())
        );
        assert!(
            out.slice(s![1, ..group, .., ..])
                .iter()
                .all(|x| x.to_compute().is_nan())
        );
    }
}

/// A thread keeps the f32 copies and output of a half-precision call for its
/// next: a call after a larger one (over the memory it left) and after a
/// smaller one has the bits of the same call on a thread of its own.
#[test]
fn a_call_after_others_on_its_thread_has_the_bits_of_a_first_call() {
    fn x<H: Half>(n: usize, seed: usize) -> Array4<H> {
        Array4::from_shape_fn((1, 2, n, 8), |(_, h, i, j)| {
            H::from_compute(((h * 131 + i * 31 + j * 7 + seed) % 97) as f32 / 48.0 - 1.0)
        })
    }
    fn call<H: Half>(n: usize) -> Array4<H> {
        let (q, k, v) = (x::<H>(n, 1), x::<H>(n, 2), x::<H>(n, 3));
        ScaledDotProduct::<H>::new()
            .forward_batched(&q, &k, &v)
            .expect("valid")
    }
    fn check<H: Half>() {
        let first = std::thread::spawn(|| call::<H>(40)).join().expect("thread");
        let after = std::thread::spawn(|| {
            drop(call::<H>(300));
            let after_larger = call::<H>(40);
            drop(call::<H>(3));
            (after_larger, call::<H>(40))
        })
        .join()
        .expect("thread");
        assert_eq!(after.0, first, "{} after a larger call", H::NAME);
        assert_eq!(after.1, first, "{} after a smaller call", H::NAME);
    }
    check::<bf16>();
    check::<f16>();
}
