//! Gradients in half precision (`half::bf16`, `half::f16`): the backward pass
//! widens the inputs to f32, runs the fused pass in f32 and rounds each gradient
//! once. Checked two ways: bit for bit against the f32 pass on the widened
//! inputs, rounded; and against the f64 pass on the same half values, within
//! the rounding of each gradient plus the f32 computation's own error.

use crate::common::{self, backward_by};
use crate::half::{Half, to_f64, to_half};

use attn::{Error, Mask, ScaledDotProduct, Storage};
use half::{bf16, f16};
use ndarray::{Array, Array2, Array4, Dimension};

/// Asserts every entry of `got` (a half gradient, widened) is within one
/// rounding of the f64 gradient `want` plus `1e-5` of `want`'s largest entry
/// (the f32 pass's error).
#[track_caller]
fn assert_rounded<H: Half, D: Dimension>(what: &str, got: &Array<f64, D>, want: &Array<f64, D>) {
    let scale = want.iter().fold(0.0_f64, |m, w| m.max(w.abs()));
    for ((g, w), i) in got.iter().zip(want).zip(0..) {
        let allowed = H::ulp(w.abs()) + 1e-5 * scale;
        assert!(
            (g - w).abs() <= allowed,
            "{} {what} entry {i}: got {g}, want {w}, allowed {allowed:e}",
            H::NAME
        );
    }
}

/// The masks of one case over `(l, s)` scores, in `T`: none, causal, a
/// keep-mask with a bias (whose gradient comes back too), a sliding window.
fn masks<T: Storage>(keep: &Array2<bool>, bias: &Array2<T>, case: usize) -> Vec<Mask<'static, T>> {
    let (keep, bias) = (keep.clone(), bias.clone());
    match case {
        0 => vec![],
        1 => vec![Mask::CausalTopLeft],
        2 => vec![Mask::keep_owned(keep), Mask::bias_owned(bias)],
        _ => vec![Mask::SlidingWindow(5), Mask::CausalBottomRight],
    }
}

fn with_masks<T: Storage>(masks: Vec<Mask<'static, T>>) -> ScaledDotProduct<'static, T> {
    masks
        .into_iter()
        .fold(ScaledDotProduct::new(), ScaledDotProduct::with_mask)
}

/// 2-D calls across the kernel's block edges, every mask case: the half
/// gradients are the f32 pass's rounded, and within rounding of the f64 pass's.
fn two_d<H: Half>() {
    for (n, &(l, s, d)) in [(1, 1, 8), (17, 33, 64), (130, 129, 32), (64, 300, 64)]
        .iter()
        .enumerate()
    {
        let seed = 400 + 10 * n as u64;
        let half = |rows, cols, seed| to_half::<H, _>(&common::random2(rows, cols, seed));
        let (q, k, v, d_out) = (
            half(l, d, seed),
            half(s, d, seed + 1),
            half(s, d, seed + 2),
            half(l, d, seed + 3),
        );
        let keep = Array2::from_shape_fn((l, s), |(i, j)| (i * 7 + j * 3) % 5 != 0);
        let bias = half(l, s, seed + 4);
        let wide = |x: &Array2<H>| x.mapv(|x| x.to_compute());
        let exact = |x: &Array2<H>| to_f64(x);
        for case in 0..4 {
            let what = format!("{l}x{s}x{d} case {case}");
            let attn = with_masks(masks(&keep, &bias, case));
            let got = backward_by(true, 1, || {
                attn.backward(&q, &k, &v, &d_out).expect("valid")
            });
            // bit for bit: the f32 pass on the widened inputs, rounded once
            let f32s = with_masks(masks(&keep, &wide(&bias), case));
            let want32 = f32s
                .backward(&wide(&q), &wide(&k), &wide(&v), &wide(&d_out))
                .expect("valid");
            let round = |x: &Array2<f32>| x.mapv(H::from_compute);
            assert_eq!(
                (&got.q, &got.k, &got.v),
                (&round(&want32.q), &round(&want32.k), &round(&want32.v)),
                "{what}"
            );
            // within rounding of the f64 pass on the same half values
            let f64s = with_masks(masks(&keep, &exact(&bias), case));
            let want = f64s
                .backward(&exact(&q), &exact(&k), &exact(&v), &exact(&d_out))
                .expect("valid");
            assert_rounded::<H, _>(&format!("{what} dQ"), &to_f64(&got.q), &want.q);
            assert_rounded::<H, _>(&format!("{what} dK"), &to_f64(&got.k), &want.k);
            assert_rounded::<H, _>(&format!("{what} dV"), &to_f64(&got.v), &want.v);
            assert_eq!(got.bias.len(), want.bias.len(), "{what}");
            for (g, w) in got.bias.iter().zip(&want.bias) {
                assert_rounded::<H, _>(
                    &format!("{what} d bias"),
                    &g.mapv(|x| f64::from(x.to_compute())),
                    w,
                );
            }
        }
    }
}

#[test]
fn bf16_gradients_are_the_f32_pass_rounded_once() {
    two_d::<bf16>();
}

#[test]
fn f16_gradients_are_the_f32_pass_rounded_once() {
    two_d::<f16>();
}

/// Batched grouped-query heads from a kept forward: the forward runs on the
/// tiled kernel over bf16 pairs where the CPU has them (AMX tiles or
/// AVX512_BF16) with the same output as `forward_batched`, its lse in f32 (the
/// f64 forward's within f32's error); the gradients are the f32 pass's on the
/// kept bf16 output, rounded.
#[test]
fn bf16_kept_forward_keeps_its_lse_in_f32() {
    let (batch, heads, kv_heads, l, d) = (2, 4, 2, 200, 64);
    let half4 = |shape, seed| to_half::<bf16, _>(&common::random4(shape, seed));
    let q = half4((batch, heads, l, d), 31);
    let (k, v) = (
        half4((batch, kv_heads, l, d), 32),
        half4((batch, kv_heads, l, d), 33),
    );
    let d_out = half4((batch, heads, l, d), 34);
    let attn = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
    let (kept, paths) = attn::kernel_paths(|| attn.forward_with_lse(&q, &k, &v).expect("valid"));
    assert_eq!(
        (paths.tiled, paths.arch),
        (batch * heads, Some(common::expected_arch(true)))
    );
    assert_eq!(
        kept.output,
        attn.forward_batched(&q, &k, &v).expect("valid")
    );
    let wide = |x: &Array4<bf16>| x.mapv(f32::from);
    let exact = |x: &Array4<bf16>| to_f64(x);
    let f64s = ScaledDotProduct::<f64>::new().with_mask(Mask::CausalBottomRight);
    let want = f64s
        .forward_with_lse(&exact(&q), &exact(&k), &exact(&v))
        .expect("valid");
    // AMX rounds the weights to bf16 before P·V: one more rounding of the
    // values' average (|v| < 2)
    let weights = match paths.arch {
        Some(attn::KernelArch::Amx) => bf16::ulp(2.0),
        _ => 0.0,
    };
    for (g, w) in exact(&kept.output).iter().zip(&want.output) {
        let allowed = bf16::ulp(w.abs()) + 1e-5 * 2.0 + weights;
        assert!((g - w).abs() <= allowed, "output {g}, want {w}");
    }
    let lse_error = (&kept.lse.mapv(f64::from) - &want.lse).mapv(f64::abs);
    assert!(
        lse_error.iter().all(|e| *e < 1e-5),
        "lse off by {:e}",
        lse_error.iter().fold(0.0_f64, |m, e| m.max(*e))
    );
    let got = backward_by(true, batch * heads, || {
        attn.backward_with_lse(&q, &k, &v, &kept, &d_out)
            .expect("valid")
    });
    let f32s = ScaledDotProduct::<f32>::new().with_mask(Mask::CausalBottomRight);
    let kept32 = attn::AttentionLse {
        output: wide(&kept.output),
        lse: kept.lse.clone(),
    };
    let want32 = f32s
        .backward_with_lse(&wide(&q), &wide(&k), &wide(&v), &kept32, &wide(&d_out))
        .expect("valid");
    let round = |x: &Array4<f32>| x.mapv(bf16::from_f32);
    assert_eq!(
        (&got.q, &got.k, &got.v),
        (&round(&want32.q), &round(&want32.k), &round(&want32.v))
    );
    // the kept output is rounded to bf16, so D = rowsum(dO ∘ O) moves by its
    // rounding: the gradients stay within a few of their own roundings
    let again = attn.backward_batched(&q, &k, &v, &d_out).expect("valid");
    for (g, w) in [(&got.q, &again.q), (&got.k, &again.k), (&got.v, &again.v)] {
        let scale = w.iter().fold(0.0_f32, |m, x| m.max(x.to_f32().abs()));
        let worst = (to_f64(g) - to_f64(w))
            .mapv(f64::abs)
            .iter()
            .fold(0.0, |m: f64, e| m.max(*e));
        assert!(
            worst <= f64::from(scale) * 2f64.powi(-6),
            "kept against again: {worst:e} of {scale}"
        );
    }
}

/// A `d_out` or a kept forward of the wrong shape is an error naming it, in
/// half precision as in f32.
#[test]
fn half_backward_checks_its_shapes() {
    let x = Array2::from_elem((3, 4), bf16::from_f32(0.5));
    let attn = ScaledDotProduct::new();
    let wrong = Array2::from_elem((2, 4), bf16::ONE);
    assert!(matches!(
        attn.backward(&x, &x, &x, &wrong),
        Err(Error::Shape { .. })
    ));
    let mut kept = attn.forward_with_lse(&x, &x, &x).expect("valid");
    kept.lse = kept.lse.slice_move(ndarray::s![..2]);
    assert!(matches!(
        attn.backward_with_lse(&x, &x, &x, &kept, &x),
        Err(Error::Shape { .. })
    ));
}

/// A head whose inputs the fused kernel cannot take (an infinite query) keeps
/// its log-sum-exp by the reference path over its widened keys: the same
/// numbers as the f32 call on the widened inputs, its output rounded.
#[test]
fn bf16_kept_forward_of_a_head_on_the_reference_path() {
    let (heads, l, d) = (2, 160, 32);
    let mut q = to_half::<bf16, _>(&common::random4((1, heads, l, d), 51));
    q[[0, 1, 7, 3]] = bf16::INFINITY;
    let kv = to_half::<bf16, _>(&common::random4((1, heads, l, d), 52));
    let attn = ScaledDotProduct::new();
    let (kept, paths) = attn::kernel_paths(|| attn.forward_with_lse(&q, &kv, &kv).expect("valid"));
    assert_eq!((paths.tiled, paths.reference), (1, 1), "{paths:?}");
    let wide = |x: &Array4<bf16>| x.mapv(f32::from);
    let f32s = ScaledDotProduct::<f32>::new();
    let want = f32s
        .forward_with_lse(&wide(&q), &wide(&kv), &wide(&kv))
        .expect("valid");
    // head 1, on the reference path; the infinite query's row is NaN in both
    let same = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan());
    let head = |x: &Array4<f32>| x.slice(ndarray::s![0, 1, .., ..]).to_owned();
    let (got, want_out) = (
        head(&kept.output.mapv(f32::from)),
        head(&want.output.mapv(bf16::from_f32).mapv(f32::from)),
    );
    assert!(got.iter().zip(&want_out).all(|(a, b)| same(*a, *b)));
    assert!(got.iter().any(|x| x.is_nan()) && got.iter().any(|x| !x.is_nan()));
    let rows = ndarray::s![0, 1, ..];
    let (got, want_lse) = (kept.lse.slice(rows), want.lse.slice(rows));
    assert!(got.iter().zip(want_lse).all(|(a, b)| same(*a, *b)));
}

/// Programmable attention in bf16: a soft-cap, sinks and a causal mask. The
/// gradients (the cap's and the sinks' too) are the f32 pass's on the widened
/// inputs and the kept bf16 output, rounded once; the cap's stays in f32.
#[test]
fn bf16_flex_gradients_are_the_f32_pass_rounded_once() {
    use attn::flex::SoftCap;
    let (heads, l, d) = (2, 150, 32);
    let half4 = |seed| to_half::<bf16, _>(&common::random4((1, heads, l, d), seed));
    let (q, k, v, d_out) = (half4(61), half4(62), half4(63), half4(64));
    let sinks = ndarray::array![bf16::from_f32(0.5), bf16::from_f32(-1.0)];
    let attention = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .with_score_mod(SoftCap::new(5.0_f32))
        .with_sinks(&sinks);
    let kept = attention.forward_with_lse(&q, &k, &v).expect("valid");
    let got = backward_by(true, heads, || {
        attention
            .backward_with_lse(&q, &k, &v, &kept, &d_out)
            .expect("valid")
    });
    let wide = |x: &Array4<bf16>| x.mapv(f32::from);
    let sinks32 = sinks.mapv(f32::from);
    let f32s = ScaledDotProduct::<f32>::new()
        .with_mask(Mask::CausalTopLeft)
        .with_score_mod(SoftCap::new(5.0_f32))
        .with_sinks(&sinks32);
    let kept32 = attn::AttentionLse {
        output: wide(&kept.output),
        lse: kept.lse.clone(),
    };
    let want = f32s
        .backward_with_lse(&wide(&q), &wide(&k), &wide(&v), &kept32, &wide(&d_out))
        .expect("valid");
    let round = |x: &Array4<f32>| x.mapv(bf16::from_f32);
    assert_eq!(
        (&got.q, &got.k, &got.v),
        (&round(&want.q), &round(&want.k), &round(&want.v))
    );
    assert_eq!(got.score, want.score);
    let want_sinks = want.sinks.expect("sinks").mapv(bf16::from_f32);
    assert_eq!(got.sinks.expect("sinks"), want_sinks);
    assert!(got.score[0] != 0.0 && want_sinks.iter().all(|g| g.to_f32() != 0.0));
}
