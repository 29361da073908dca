//! Gradients in half precision (`half::bf16`, `half::f16`): the backward pass
//! widens the inputs to f32, runs the fused pass in f32 and rounds each gradient
//! once; bf16 inputs run on AMX tiles where the CPU has them, which round the
//! weights `P` and their gradients `dS` to bf16 for the products. Checked two
//! ways: bit for bit against the f32 pass on the widened inputs, rounded (on
//! the tiles: within the tiles' roundings of it); and against the f64 pass on
//! the same half values, within the rounding of each gradient plus the f32
//! computation's own error (plus the tiles' roundings, bounded entry by entry
//! from the f64 weights: [`TileBounds`]).

use crate::common::{self, backward_paths};
use crate::half::{Half, to_f64, to_half};

use attn::{Error, KernelArch, KernelPaths, Mask, ScaledDotProduct, Storage};
use half::{bf16, f16};
use ndarray::{Array, Array1, Array2, Array4, ArrayView2, Axis, Dimension, s};

/// Asserts every entry of `got` (a half gradient, widened) is within one
/// rounding of the f64 gradient `want`, plus `1e-5` of `want`'s largest entry
/// (the f32 pass's error), plus `extra` (the tiles' roundings, or zeros).
#[track_caller]
fn assert_rounded<H: Half, D: Dimension>(
    what: &str,
    got: &Array<f64, D>,
    want: &Array<f64, D>,
    extra: &Array<f64, D>,
) {
    let scale = want.iter().fold(0.0_f64, |m, w| m.max(w.abs()));
    for (((g, w), e), i) in got.iter().zip(want).zip(extra).zip(0..) {
        let allowed = H::ulp(w.abs()) + 1e-5 * scale + e;
        assert!(
            (g - w).abs() <= allowed,
            "{} {what} entry {i}: got {g}, want {w}, allowed {allowed:e}",
            H::NAME
        );
    }
}

/// Whether the backward `paths` saw ran on AMX tiles, asserting it did
/// exactly where it must: bf16 inputs where the CPU and `ATTN_KERNEL_ARCH`
/// give AMX.
#[track_caller]
fn on_tiles<H: Half>(paths: &KernelPaths) -> bool {
    let tiles = H::NAME == "bf16" && common::expected_arch(true) == KernelArch::Amx;
    assert_eq!(paths.arch == Some(KernelArch::Amx), tiles, "{paths:?}");
    tiles
}

/// Allowances, entry by entry, for what the AMX tiles round in one query
/// head's gradients: `P` (in `dV = Pᵀ·dO`) and `dS` (in `dQ = dS·K·scale`,
/// `dK = dSᵀ·Q·scale`) each by a whole bf16 spacing (2⁻⁸ of itself, twice
/// the bound); and, where the forward runs again on the tiles (`again`),
/// `D = rowsum(dO ∘ O)` by `O`'s `P·V` over rounded weights, which moves each
/// `dS` (and a bias's gradient) by `P·ΔD`.
struct TileBounds {
    dq: Array2<f64>,
    dk: Array2<f64>,
    dv: Array2<f64>,
    bias: Array2<f64>,
}

impl TileBounds {
    /// From the head's inputs and its f64 weights `p` (after masks); `ds`
    /// bounds `|dS|` entry by entry.
    fn of(
        [q, k, v, d_out]: [ArrayView2<'_, f64>; 4],
        p: ArrayView2<'_, f64>,
        ds: &Array2<f64>,
        again: bool,
    ) -> Self {
        let (r, scale) = (2f64.powi(-8), 1.0 / (q.ncols() as f64).sqrt());
        let abs = |x: ArrayView2<'_, f64>| x.mapv(f64::abs);
        let delta_d: Array1<f64> = match again {
            true => (abs(d_out) * p.dot(&abs(v))).sum_axis(Axis(1)) * r,
            false => Array1::zeros(q.nrows()),
        };
        let bias = &p * &delta_d.insert_axis(Axis(1));
        let e = ds * r + &bias;
        TileBounds {
            dq: e.dot(&abs(k)) * scale,
            dk: e.t().dot(&abs(q)) * scale,
            dv: p.t().dot(&abs(d_out)) * r,
            bias,
        }
    }

    /// No allowance: the pass did not run on the tiles.
    fn none((l, s, d, d_v): (usize, usize, usize, usize)) -> Self {
        TileBounds {
            dq: Array2::zeros((l, d)),
            dk: Array2::zeros((s, d)),
            dv: Array2::zeros((s, d_v)),
            bias: Array2::zeros((l, s)),
        }
    }
}

/// `|dS| = |P ∘ (dO·Vᵀ − D)|` in f64, `D = rowsum(dO ∘ P·V)`.
fn ds_abs(
    p: ArrayView2<'_, f64>,
    v: ArrayView2<'_, f64>,
    d_out: ArrayView2<'_, f64>,
) -> Array2<f64> {
    let d = (&d_out * &p.dot(&v)).sum_axis(Axis(1)).insert_axis(Axis(1));
    (&p * &(d_out.dot(&v.t()) - &d)).mapv(f64::abs)
}

/// [`TileBounds`] of every head of a batched call with a kept forward, `p` its
/// f64 weights `(batch, heads, L, S)`, `group` query heads per key/value head:
/// `dQ`'s, `dK`'s and `dV`'s, the latter summed over each group.
fn tile_bounds4(
    [q, k, v, d_out]: [Array4<f64>; 4],
    p: &Array4<f64>,
    group: usize,
) -> [Array4<f64>; 3] {
    let [mut dq, mut dk, mut dv] = [q.raw_dim(), k.raw_dim(), v.raw_dim()].map(Array4::zeros);
    let (batch, heads) = (q.dim().0, q.dim().1);
    for (b, h) in (0..batch).flat_map(|b| (0..heads).map(move |h| (b, h))) {
        let kv = h / group;
        let (q, d_out, p) = (
            q.slice(s![b, h, .., ..]),
            d_out.slice(s![b, h, .., ..]),
            p.slice(s![b, h, .., ..]),
        );
        let (k, v) = (k.slice(s![b, kv, .., ..]), v.slice(s![b, kv, .., ..]));
        let bounds = TileBounds::of([q, k, v, d_out], p, &ds_abs(p, v, d_out), false);
        dq.slice_mut(s![b, h, .., ..]).assign(&bounds.dq);
        let mut dk = dk.slice_mut(s![b, kv, .., ..]);
        dk += &bounds.dk;
        let mut dv = dv.slice_mut(s![b, kv, .., ..]);
        dv += &bounds.dv;
    }
    [dq, dk, dv]
}

/// Asserts `got` (the half gradients) are the f32 pass's `want` rounded, bit
/// for bit; on the tiles within one rounding and the tiles' `bounds` of it.
#[track_caller]
fn assert_f32_rounded<H: Half>(
    what: &str,
    got: [&Array2<H>; 3],
    want: [&Array2<f32>; 3],
    bounds: Option<[&Array2<f64>; 3]>,
) {
    for (n, (got, want)) in got.into_iter().zip(want).enumerate() {
        let what = format!("{what} gradient {n}");
        match bounds {
            None => assert_eq!(got, want.mapv(H::from_compute), "{what}"),
            Some(bounds) => {
                assert_rounded::<H, _>(&what, &to_f64(got), &want.mapv(f64::from), bounds[n])
            }
        }
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
            let (got, paths) = backward_paths(true, 1, || {
                attn.backward(&q, &k, &v, &d_out).expect("valid")
            });
            let f64s = with_masks(masks(&keep, &exact(&bias), case));
            let bounds = match on_tiles::<H>(&paths) {
                true => {
                    let (q, k, v, d_out) = (exact(&q), exact(&k), exact(&v), exact(&d_out));
                    let p = f64s.forward_with_weights(&q, &k, &v).expect("valid");
                    let p = p.weights.mapv(|x| if x.is_nan() { 0.0 } else { x });
                    let ds = ds_abs(p.view(), v.view(), d_out.view());
                    let inputs = [q.view(), k.view(), v.view(), d_out.view()];
                    TileBounds::of(inputs, p.view(), &ds, true)
                }
                false => TileBounds::none((l, s, d, d)),
            };
            let tiles = (paths.arch == Some(KernelArch::Amx))
                .then_some([&bounds.dq, &bounds.dk, &bounds.dv]);
            // the f32 pass on the widened inputs, rounded once
            let f32s = with_masks(masks(&keep, &wide(&bias), case));
            let want32 = f32s
                .backward(&wide(&q), &wide(&k), &wide(&v), &wide(&d_out))
                .expect("valid");
            assert_f32_rounded(
                &what,
                [&got.q, &got.k, &got.v],
                [&want32.q, &want32.k, &want32.v],
                tiles,
            );
            // within rounding of the f64 pass on the same half values
            let want = f64s
                .backward(&exact(&q), &exact(&k), &exact(&v), &exact(&d_out))
                .expect("valid");
            assert_rounded::<H, _>(&format!("{what} dQ"), &to_f64(&got.q), &want.q, &bounds.dq);
            assert_rounded::<H, _>(&format!("{what} dK"), &to_f64(&got.k), &want.k, &bounds.dk);
            assert_rounded::<H, _>(&format!("{what} dV"), &to_f64(&got.v), &want.v, &bounds.dv);
            assert_eq!(got.bias.len(), want.bias.len(), "{what}");
            for (g, w) in got.bias.iter().zip(&want.bias) {
                let extra = bounds.bias.clone().into_dyn();
                assert_rounded::<H, _>(
                    &format!("{what} d bias"),
                    &g.mapv(|x| f64::from(x.to_compute())),
                    w,
                    &extra,
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

/// Widths that are not whole tiles (queries 80 wide, values 24; queries 8
/// wide, values 100), value widths other than the queries', under a causal
/// mask and none: within rounding (and, on the tiles, their roundings) of the
/// f64 pass.
#[test]
fn bf16_gradients_of_widths_off_the_tiles() {
    for (n, &(l, s, d, d_v)) in [(70, 45, 80, 24), (33, 200, 8, 100)].iter().enumerate() {
        let seed = 700 + 10 * n as u64;
        let half = |rows, cols, seed| to_half::<bf16, _>(&common::random2(rows, cols, seed));
        let (q, k, v, d_out) = (
            half(l, d, seed),
            half(s, d, seed + 1),
            half(s, d_v, seed + 2),
            half(l, d_v, seed + 3),
        );
        for causal in [false, true] {
            fn masks<T: Storage>(causal: bool) -> Vec<Mask<'static, T>> {
                match causal {
                    true => vec![Mask::CausalBottomRight],
                    false => vec![],
                }
            }
            let attn = with_masks(masks(causal));
            let (got, paths) = backward_paths(true, 1, || {
                attn.backward(&q, &k, &v, &d_out).expect("valid")
            });
            let (q, k, v, d_out) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&d_out));
            let f64s = with_masks(masks(causal));
            let want = f64s.backward(&q, &k, &v, &d_out).expect("valid");
            let bounds = match on_tiles::<bf16>(&paths) {
                true => {
                    let p = f64s
                        .forward_with_weights(&q, &k, &v)
                        .expect("valid")
                        .weights;
                    let ds = ds_abs(p.view(), v.view(), d_out.view());
                    let inputs = [q.view(), k.view(), v.view(), d_out.view()];
                    TileBounds::of(inputs, p.view(), &ds, true)
                }
                false => TileBounds::none((l, s, d, d_v)),
            };
            let what = format!("{l}x{s}x{d}x{d_v} causal {causal}");
            assert_rounded::<bf16, _>(&format!("{what} dQ"), &to_f64(&got.q), &want.q, &bounds.dq);
            assert_rounded::<bf16, _>(&format!("{what} dK"), &to_f64(&got.k), &want.k, &bounds.dk);
            assert_rounded::<bf16, _>(&format!("{what} dV"), &to_f64(&got.v), &want.v, &bounds.dv);
        }
    }
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
    let (kept, forward) = attn::kernel_paths(|| attn.forward_with_lse(&q, &k, &v).expect("valid"));
    assert_eq!(
        (forward.tiled, forward.arch),
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
    // AMX and AVX512_BF16 round the weights to bf16 before P·V: one more
    // rounding of the values' average (|v| < 2)
    let weights = match forward.arch {
        Some(attn::KernelArch::Amx | attn::KernelArch::Avx512Bf16) => bf16::ulp(2.0),
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
    let (got, paths) = backward_paths(true, batch * heads, || {
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
    let bounds = match on_tiles::<bf16>(&paths) {
        true => {
            let p = f64s
                .forward_batched_with_weights(&exact(&q), &exact(&k), &exact(&v))
                .expect("valid")
                .weights;
            let inputs = [&q, &k, &v, &d_out].map(exact);
            Some(tile_bounds4(inputs, &p, heads / kv_heads))
        }
        false => None,
    };
    let round = |x: &Array4<f32>| x.mapv(bf16::from_f32);
    match &bounds {
        None => assert_eq!(
            (&got.q, &got.k, &got.v),
            (&round(&want32.q), &round(&want32.k), &round(&want32.v))
        ),
        Some(bounds) => {
            let pairs = [
                (&got.q, &want32.q),
                (&got.k, &want32.k),
                (&got.v, &want32.v),
            ];
            for ((got, want), bound) in pairs.into_iter().zip(bounds) {
                let want = want.mapv(f64::from);
                assert_rounded::<bf16, _>("kept on tiles", &to_f64(got), &want, bound);
            }
        }
    }
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
/// inputs and the kept bf16 output, rounded once (on the tiles within their
/// roundings); the cap's stays in f32.
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
    let (got, paths) = backward_paths(true, heads, || {
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
    let want_sinks = want.sinks.expect("sinks").mapv(bf16::from_f32);
    let got_sinks = got.sinks.expect("sinks");
    assert!(got.score[0] != 0.0 && want_sinks.iter().all(|g| g.to_f32() != 0.0));
    if !on_tiles::<bf16>(&paths) {
        let round = |x: &Array4<f32>| x.mapv(bf16::from_f32);
        assert_eq!(
            (&got.q, &got.k, &got.v),
            (&round(&want.q), &round(&want.k), &round(&want.v))
        );
        assert_eq!(got.score, want.score);
        assert_eq!(got_sinks, want_sinks);
        return;
    }
    // on the tiles: |dS| by the raw scores is at most |P ∘ (dP − D)| (the
    // cap's slope is at most 1), P the f64 weights with the sink in each sum
    let exact = |x: &Array4<bf16>| to_f64(x);
    let (q, k, v, d_out) = (exact(&q), exact(&k), exact(&v), exact(&d_out));
    let mut p = Array4::zeros((1, heads, l, l));
    for h in 0..heads {
        let (qh, kh) = (q.slice(s![0, h, .., ..]), k.slice(s![0, h, .., ..]));
        let scores: Array2<f64> = ndarray::linalg::Dot::dot(&qh, &kh.t());
        let sink = f64::from(sinks[h].to_f32());
        for (i, row) in scores.outer_iter().enumerate() {
            let capped = row.mapv(|x| 5.0 * (x / (d as f64).sqrt() / 5.0).tanh());
            let total: f64 = sink.exp() + capped.iter().take(i + 1).map(|x| x.exp()).sum::<f64>();
            for j in 0..=i {
                p[[0, h, i, j]] = capped[j].exp() / total;
            }
        }
    }
    let bounds = tile_bounds4([q, k, v, d_out], &p, 1);
    let pairs = [(&got.q, &want.q), (&got.k, &want.k), (&got.v, &want.v)];
    for ((got, want), bound) in pairs.into_iter().zip(&bounds) {
        let want = want.mapv(f64::from);
        assert_rounded::<bf16, _>("flex on tiles", &to_f64(got), &want, bound);
    }
    // the cap's and the sinks' gradients come from the f32 dS (the scores
    // differ from the f32 pass's in their last bits only)
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs();
    assert!(
        got.score
            .iter()
            .zip(&want.score)
            .all(|(a, b)| close(*a, *b))
    );
    for (g, w) in got_sinks.iter().zip(&want_sinks) {
        let allowed = bf16::ulp(f64::from(w.to_f32()).abs());
        assert!(
            f64::from((g.to_f32() - w.to_f32()).abs()) <= allowed,
            "sink {g} {w}"
        );
    }
}

/// Values of no width: no output, every gradient zero (no panic), in f32 and
/// bf16 (where the bf16 pass would run on the tiles).
#[test]
fn values_of_no_width_give_zero_gradients() {
    fn check<T: Storage>(one: T, zero: T) {
        let q = Array2::from_elem((5, 4), one);
        let v = Array2::from_elem((7, 0), one);
        let k = Array2::from_elem((7, 4), one);
        let d_out = Array2::from_elem((5, 0), one);
        for attn in [
            ScaledDotProduct::new(),
            ScaledDotProduct::new().with_mask(Mask::CausalTopLeft),
        ] {
            let grads = attn.backward(&q, &k, &v, &d_out).expect("valid");
            assert_eq!(
                (grads.q.dim(), grads.k.dim(), grads.v.dim()),
                ((5, 4), (7, 4), (7, 0))
            );
            assert!(grads.q.iter().chain(&grads.k).all(|x| *x == zero));
        }
    }
    check(1.0_f32, 0.0);
    check(bf16::ONE, bf16::ZERO);
}
