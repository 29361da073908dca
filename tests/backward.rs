//! The fused backward pass against the reference backward: sizes across its
//! blocks, every mask, grouped-query heads, strides, threads, FlashAttention's
//! accuracy rule, and inputs that must take the reference path.

use crate::common;

use attn::{Kernel, Mask, Parallelism, ScaledDotProduct, kernel_paths};
use common::{backward_by, every_mask_kind, max_abs_diff, random2, random4};
use ndarray::{Array1, Array2, Array4, s};

/// Attention through `kernel` with every one of `masks`.
fn attention<'m>(kernel: Kernel, masks: &[Mask<'m, f64>]) -> ScaledDotProduct<'m, f64> {
    masks.iter().cloned().fold(
        ScaledDotProduct::new().with_kernel(kernel),
        ScaledDotProduct::with_mask,
    )
}

#[test]
fn fused_equals_reference_across_block_edges_and_masks() {
    let slopes = Array1::from(vec![0.25]);
    for (l, s) in [
        (1, 1),
        (1, 200),
        (63, 129),
        (64, 128),
        (65, 127),
        (130, 300),
        (300, 70),
    ] {
        for (d, d_v) in [(8, 8), (33, 5)] {
            let (q, k, v, d_out) = (
                random2(l, d, 1),
                random2(s, d, 2),
                random2(s, d_v, 3),
                random2(l, d_v, 4),
            );
            let keep = Array2::from_shape_fn((l, s), |(i, j)| (i + 3 * j) % 7 != 2);
            let bias = random2(l, s, 5);
            let masks = every_mask_kind(&keep, &bias, &slopes, 50);
            for m in &masks {
                let fused = backward_by(true, 1, || {
                    attention(Kernel::Auto, m).backward(&q, &k, &v, &d_out)
                })
                .expect("valid");
                let plain = backward_by(false, 1, || {
                    attention(Kernel::Plain, m).backward(&q, &k, &v, &d_out)
                })
                .expect("valid");
                for (name, a, b) in [
                    ("q", &fused.q, &plain.q),
                    ("k", &fused.k, &plain.k),
                    ("v", &fused.v, &plain.v),
                ] {
                    let e = max_abs_diff(a, b);
                    assert!(e < 1e-12, "L={l} S={s} d={d} {m:?} d{name}: {e:e}");
                }
            }
        }
    }
}

#[test]
fn fused_batched_grouped_query_and_strided_inputs_equal_reference() {
    let q = random4((2, 6, 70, 16), 10);
    let (k, v) = (random4((2, 3, 150, 16), 11), random4((2, 3, 150, 12), 12));
    let d_out = random4((2, 6, 70, 12), 13);
    let padding = Array4::from_shape_fn((2, 1, 1, 150), |(b, _, _, j)| j < 150 - 60 * b);
    let masks = [Mask::keep(&padding), Mask::CausalBottomRight];
    let fused = backward_by(true, 12, || {
        attention(Kernel::Fused, &masks).backward_batched(&q, &k, &v, &d_out)
    })
    .expect("valid");
    let plain = attention(Kernel::Plain, &masks)
        .backward_batched(&q, &k, &v, &d_out)
        .expect("valid");
    assert!(max_abs_diff(&fused.q, &plain.q) < 1e-12);
    assert!(max_abs_diff(&fused.k, &plain.k) < 1e-12);
    assert!(max_abs_diff(&fused.v, &plain.v) < 1e-12);
    // transposed and stepped views equal owned copies
    let big = random2(400, 90, 14);
    let (qs, kt) = (big.slice(s![..;3, ..40]), big.t());
    let ks = kt.slice(s![10..50, ..;2]).reversed_axes(); // (200, 40), strided
    let vs = big.slice(s![100..300, 1..;7]);
    let d_out = random2(qs.nrows(), vs.ncols(), 15);
    let attn = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
    let strided = attn.backward(&qs, &ks, &vs, &d_out).expect("valid");
    let owned = attn
        .backward(&qs.to_owned(), &ks.to_owned(), &vs.to_owned(), &d_out)
        .expect("valid");
    assert_eq!(strided, owned);
}

#[test]
fn fused_f32_meets_flash_attention_accuracy_rule() {
    for (l, s, d) in [(200, 300, 64), (513, 129, 32)] {
        let (q, k, v, d_out) = (
            random2(l, d, 20),
            random2(s, d, 21),
            random2(s, d, 22),
            random2(l, d, 23),
        );
        let f32_of = |x: &Array2<f64>| x.mapv(|a| a as f32);
        let f64_of = |x: &Array2<f32>| x.mapv(f64::from);
        let (q32, k32, v32, g32) = (f32_of(&q), f32_of(&k), f32_of(&v), f32_of(&d_out));
        let reference = ScaledDotProduct::new()
            .with_kernel(Kernel::Plain)
            .with_mask(Mask::CausalBottomRight)
            .backward(&f64_of(&q32), &f64_of(&k32), &f64_of(&v32), &f64_of(&g32))
            .expect("valid");
        let run = |kernel| {
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_mask(Mask::CausalBottomRight)
                .backward(&q32, &k32, &v32, &g32)
                .expect("valid")
        };
        let (plain, fused) = (run(Kernel::Plain), run(Kernel::Fused));
        for (name, p, f, r) in [
            ("q", &plain.q, &fused.q, &reference.q),
            ("k", &plain.k, &fused.k, &reference.k),
            ("v", &plain.v, &fused.v, &reference.v),
        ] {
            let e_plain = max_abs_diff(&f64_of(p), r);
            let e_fused = max_abs_diff(&f64_of(f), r);
            let floor = f32::EPSILON as f64 * r.iter().fold(1.0_f64, |m, x| m.max(x.abs()));
            assert!(
                e_fused <= 2.0 * e_plain + floor,
                "L={l} S={s} d{name}: fused {e_fused:e} > 2 × plain {e_plain:e}"
            );
        }
    }
}

#[test]
fn threads_do_not_change_a_bit_of_the_gradients() {
    let q = random4((1, 4, 150, 32), 30).mapv(|x| x as f32);
    let kv = random4((1, 2, 200, 32), 31).mapv(|x| x as f32);
    let d_out = random4((1, 4, 150, 32), 32).mapv(|x| x as f32);
    let run = |parallelism| {
        ScaledDotProduct::new()
            .with_parallelism(parallelism)
            .with_mask(Mask::CausalBottomRight)
            .backward_batched(&q, &kv, &kv, &d_out)
            .expect("valid")
    };
    let sequential = run(Parallelism::Sequential);
    assert_eq!(sequential, run(Parallelism::Rayon));
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    assert_eq!(sequential, two.install(|| run(Parallelism::Rayon)));
}

#[test]
fn one_heads_backward_runs_in_parts_on_every_thread_with_the_same_bits() {
    // 300 query rows: five blocks in parts of two (the last part empty), under
    // a bias whose gradient each part adds to, ALiBi and a causal mask
    let (q, k, v, d_out) = (
        random2(300, 24, 90),
        random2(260, 24, 91),
        random2(260, 10, 92),
        random2(300, 10, 93),
    );
    let bias = random2(300, 260, 94);
    let slopes = Array1::from(vec![0.3]);
    let masks = [
        Mask::bias(&bias),
        Mask::Alibi(slopes.view()),
        Mask::CausalBottomRight,
    ];
    let run = |parallelism| {
        backward_by(true, 1, || {
            attention(Kernel::Fused, &masks)
                .with_parallelism(parallelism)
                .backward(&q, &k, &v, &d_out)
        })
        .expect("valid")
    };
    let sequential = run(Parallelism::Sequential);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a pool");
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    assert_eq!(sequential, one.install(|| run(Parallelism::Rayon)));
    assert_eq!(sequential, two.install(|| run(Parallelism::Rayon)));
    let plain = attention(Kernel::Plain, &masks)
        .backward(&q, &k, &v, &d_out)
        .expect("valid");
    assert!(max_abs_diff(&sequential.q, &plain.q) < 1e-12);
    assert!(max_abs_diff(&sequential.k, &plain.k) < 1e-12);
    assert!(max_abs_diff(&sequential.v, &plain.v) < 1e-12);
    assert!(max_abs_diff(&sequential.bias[0], &plain.bias[0]) < 1e-12);
    // and from the kept forward
    let attn = attention(Kernel::Fused, &masks);
    let forward = attn.forward_with_lse(&q, &k, &v).expect("valid");
    let kept = attn
        .backward_with_lse(&q, &k, &v, &forward, &d_out)
        .expect("valid");
    assert!(max_abs_diff(&kept.q, &plain.q) < 1e-12);
    assert!(max_abs_diff(&kept.k, &plain.k) < 1e-12);
}

#[test]
fn non_finite_or_overflowing_inputs_take_the_reference_path() {
    let (q, k, v, mut d_out) = (
        random2(70, 8, 40),
        random2(90, 8, 41),
        random2(90, 4, 42),
        random2(70, 4, 43),
    );
    let mut q_bad = q.clone();
    q_bad[[3, 2]] = f64::NAN;
    let attn = ScaledDotProduct::new();
    let bad = backward_by(false, 1, || attn.backward(&q_bad, &k, &v, &d_out)).expect("valid");
    assert!(bad.q.row(3).iter().all(|x| x.is_nan()));
    assert!(bad.q.row(4).iter().all(|x| x.is_finite()));
    d_out[[5, 1]] = f64::INFINITY;
    backward_by(false, 1, || attn.backward(&q, &k, &v, &d_out)).expect("valid");
    // values of no width: every gradient is zero, but a NaN query's row, as
    // the reference path gives it (found by the `gradients` fuzz target: the
    // fused pass gave zeros)
    let (none, none_out) = (Array2::zeros((90, 0)), Array2::zeros((70, 0)));
    for kernel in [Kernel::Auto, Kernel::Plain] {
        let attn = ScaledDotProduct::new().with_kernel(kernel);
        let empty = attn.backward(&q_bad, &k, &none, &none_out).expect("valid");
        assert!(empty.q.row(3).iter().all(|x| x.is_nan()), "{kernel:?}");
        assert!(empty.q.row(4).iter().all(|&x| x == 0.0), "{kernel:?}");
    }
    // scores near 1e301 are finite in f64 and no product can overflow: fused (their
    // rounding errors exceed 1, so the two paths' softmax may differ: the values
    // are not compared, as in the fuzz harness)
    let huge = k.mapv(|x| x * 1e300);
    let d_out = random2(70, 4, 44);
    let fused = backward_by(true, 1, || attn.backward(&q, &huge, &v, &d_out)).expect("valid");
    assert!(
        fused
            .q
            .iter()
            .chain(&fused.k)
            .chain(&fused.v)
            .all(|x| x.is_finite())
    );
    // but f32 keys of 1e37 could overflow the scores: the reference path
    let big32 = k.mapv(|x| (x * 1e37) as f32);
    let (q32, v32, g32) = (
        q.mapv(|x| x as f32),
        v.mapv(|x| x as f32),
        d_out.mapv(|x| x as f32),
    );
    let attn32 = ScaledDotProduct::new();
    backward_by(false, 1, || attn32.backward(&q32, &big32, &v32, &g32)).expect("valid");
}

/// `ln Σⱼ exp(scaled score)` over the keys row `i` sees, by hand (`−∞` for none).
fn lse_by_hand(q: &Array2<f64>, k: &Array2<f64>, keep: &Array2<bool>) -> Array1<f64> {
    let scale = 1.0 / (q.ncols() as f64).sqrt();
    Array1::from_shape_fn(q.nrows(), |i| {
        let total: f64 = (0..k.nrows())
            .filter(|&j| keep[[i, j]])
            .map(|j| (q.row(i).dot(&k.row(j)) * scale).exp())
            .sum();
        total.ln()
    })
}

/// Runs `f`, asserting that the tiled kernel computed `fused` of `heads` heads
/// and the reference path the others.
fn forward_lse_by<R>(fused: usize, heads: usize, f: impl FnOnce() -> R) -> R {
    let (result, paths) = kernel_paths(f);
    assert_eq!(
        (
            paths.tiled,
            paths.reference,
            paths.backward + paths.direct + paths.rowwise
        ),
        (fused, heads - fused, 0),
        "{paths:?}"
    );
    result
}

#[test]
fn forward_with_lse_keeps_each_rows_log_sum_exp() {
    let (l, s) = (70, 150);
    let (q, k, v) = (random2(l, 8, 50), random2(s, 8, 51), random2(s, 5, 52));
    let mut keep = Array2::from_shape_fn((l, s), |(i, j)| (i + 2 * j) % 5 != 3);
    keep.row_mut(7).fill(false); // a row that sees nothing
    let want = lse_by_hand(&q, &k, &keep);
    for (kernel, fused) in [(Kernel::Auto, 1), (Kernel::Plain, 0)] {
        let attn = ScaledDotProduct::new()
            .with_kernel(kernel)
            .with_mask(Mask::keep(&keep));
        let out = forward_lse_by(fused, 1, || attn.forward_with_lse(&q, &k, &v)).expect("valid");
        assert_eq!(out.lse[7], f64::NEG_INFINITY, "{kernel:?}");
        assert!(out.output.row(7).iter().all(|&x| x == 0.0));
        assert!(max_abs_diff(&out.lse, &want) < 1e-12, "{kernel:?}");
        let plain = attn
            .clone()
            .with_kernel(Kernel::Plain)
            .forward(&q, &k, &v)
            .expect("valid");
        assert!(max_abs_diff(&out.output, &plain) < 1e-14, "{kernel:?}");
    }
}

#[test]
fn the_tiled_forward_keeps_the_log_sum_exp_of_the_reference() {
    // every mask kind, grouped heads, rows across the tiled kernel's blocks, one
    // decoding row, and sinks (in the log-sum-exp)
    let (keep, bias) = (
        Array2::from_shape_fn((130, 300), |(i, j)| (i + j) % 7 != 0),
        random2(130, 300, 80),
    );
    let slopes = Array1::from(vec![0.5, 0.25, 0.125, 0.0625]);
    for masks in every_mask_kind(&keep, &bias, &slopes, 37) {
        for l in [1, 130] {
            // the (130, 300) keep and bias masks fit 130 query rows only
            let masks: Vec<_> = masks
                .iter()
                .filter(|m| l > 1 || !matches!(m, Mask::Keep(_) | Mask::Bias(_)))
                .cloned()
                .collect();
            let q = random4((1, 4, l, 16), 81);
            let (k, v) = (random4((1, 2, 300, 16), 82), random4((1, 2, 300, 9), 83));
            let fused = forward_lse_by(4, 4, || {
                attention(Kernel::Fused, &masks).forward_with_lse(&q, &k, &v)
            })
            .expect("valid");
            let plain = attention(Kernel::Plain, &masks)
                .forward_with_lse(&q, &k, &v)
                .expect("valid");
            assert!(
                max_abs_diff(&fused.output, &plain.output) < 1e-13,
                "{masks:?}, L {l}"
            );
            assert!(
                max_abs_diff(&fused.lse, &plain.lse) < 1e-12,
                "{masks:?}, L {l}"
            );
        }
    }
    let (q, k, v) = (random2(70, 8, 84), random2(90, 8, 85), random2(90, 4, 86));
    let sinks = Array1::from(vec![0.7]);
    let flex = ScaledDotProduct::new().with_sinks(&sinks);
    let fused = forward_lse_by(1, 1, || flex.forward_with_lse(&q, &k, &v)).expect("valid");
    let plain = ScaledDotProduct::new()
        .with_kernel(Kernel::Plain)
        .with_sinks(&sinks)
        .forward_with_lse(&q, &k, &v)
        .expect("valid");
    assert!(max_abs_diff(&fused.output, &plain.output) < 1e-13);
    assert!(max_abs_diff(&fused.lse, &plain.lse) < 1e-12);
    // a head with a NaN query takes the reference path, its output and
    // log-sum-exp both; the other heads stay on the tiled kernel
    let mut q = random4((1, 3, 70, 8), 87);
    q[[0, 1, 5, 2]] = f64::NAN;
    let (k, v) = (random4((1, 3, 90, 8), 88), random4((1, 3, 90, 4), 89));
    let attn = ScaledDotProduct::new();
    let out = forward_lse_by(2, 3, || attn.forward_with_lse(&q, &k, &v)).expect("valid");
    let plain = attn
        .clone()
        .with_kernel(Kernel::Plain)
        .forward_with_lse(&q, &k, &v)
        .expect("valid");
    assert!(out.lse[[0, 1, 5]].is_nan() && plain.lse[[0, 1, 5]].is_nan());
    for h in [0, 2] {
        let (a, b) = (out.lse.slice(s![0, h, ..]), plain.lse.slice(s![0, h, ..]));
        assert!(max_abs_diff(&a.to_owned(), &b.to_owned()) < 1e-12);
    }
    let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
    let bad_head = out.lse.slice(s![0, 1, ..]);
    assert!(
        bad_head
            .iter()
            .zip(plain.lse.slice(s![0, 1, ..]))
            .all(|(&a, &b)| same(a, b))
    );
}

#[test]
fn backward_from_the_kept_forward_equals_the_backward_that_recomputes_it() {
    let q = random4((2, 4, 90, 16), 70);
    let (k, v) = (random4((2, 2, 140, 16), 71), random4((2, 2, 140, 6), 72));
    let d_out = random4((2, 4, 90, 6), 73);
    let slopes = Array1::from(vec![0.5, 0.25, 0.125, 0.0625]);
    let masks = [Mask::Alibi(slopes.view()), Mask::CausalBottomRight];
    let attn = attention(Kernel::Auto, &masks);
    let forward = attn.forward_with_lse(&q, &k, &v).expect("valid");
    let kept = backward_by(true, 8, || {
        attn.backward_with_lse(&q, &k, &v, &forward, &d_out)
    })
    .expect("valid");
    let again = attn.backward_batched(&q, &k, &v, &d_out).expect("valid");
    assert!(max_abs_diff(&kept.q, &again.q) < 1e-13);
    assert!(max_abs_diff(&kept.k, &again.k) < 1e-13);
    assert!(max_abs_diff(&kept.v, &again.v) < 1e-13);
    // 2-D, and a kept forward of the wrong shape
    let (q2, k2, v2, g2) = (
        random2(30, 8, 74),
        random2(50, 8, 75),
        random2(50, 3, 76),
        random2(30, 3, 77),
    );
    let f2 = attn_2d().forward_with_lse(&q2, &k2, &v2).expect("valid");
    let kept = attn_2d()
        .backward_with_lse(&q2, &k2, &v2, &f2, &g2)
        .expect("valid");
    let again = attn_2d().backward(&q2, &k2, &v2, &g2).expect("valid");
    assert!(max_abs_diff(&kept.k, &again.k) < 1e-13);
    let mut wrong = f2.clone();
    wrong.lse = Array1::zeros(29);
    let err = attn_2d()
        .backward_with_lse(&q2, &k2, &v2, &wrong, &g2)
        .unwrap_err();
    assert!(matches!(err, attn::Error::Shape { .. }), "{err}");
}

fn attn_2d() -> ScaledDotProduct<'static, f64> {
    ScaledDotProduct::new().with_mask(Mask::CausalTopLeft)
}
