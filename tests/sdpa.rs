//! Scaled dot-product attention against a slow reference, on invariants, on
//! strided inputs, and on every kind of bad input.

use crate::common;

use attn::{Error, Mask, ScaledDotProduct, attention_weights, scaled_dot_product, softmax_rows};
use common::{RefCausal, assert_close, max_abs_diff, random2, random4, reference};
use ndarray::{Array2, Array4, Axis, array, s};

const SIZES: [usize; 6] = [0, 1, 2, 5, 17, 33];

fn keep_pattern(l: usize, s: usize, seed: usize) -> Array2<bool> {
    Array2::from_shape_fn((l, s), |(i, j)| !(i * 7 + j * 3 + seed).is_multiple_of(5))
}

#[test]
fn matches_reference_over_sizes_and_masks() {
    let mut seed = 0;
    for &l in &SIZES {
        for &s in &SIZES {
            for &d in &[1usize, 3, 8] {
                seed += 1;
                let q = random2(l, d, seed);
                let k = random2(s, d, seed + 100);
                let v = random2(s, 4, seed + 200);
                let keep = keep_pattern(l, s, seed as usize);
                let bias = random2(l, s, seed + 300);
                let scale = 1.0 / (d as f64).sqrt();
                let none = (None, None, RefCausal::None);
                let cases: Vec<(Vec<Mask<'_, f64>>, _)> = vec![
                    (vec![], none),
                    (
                        vec![Mask::keep(&keep)],
                        (Some(keep.view()), None, RefCausal::None),
                    ),
                    (
                        vec![Mask::bias(&bias)],
                        (None, Some(bias.view()), RefCausal::None),
                    ),
                    (vec![Mask::CausalTopLeft], (None, None, RefCausal::TopLeft)),
                    (
                        vec![Mask::CausalBottomRight],
                        (None, None, RefCausal::BottomRight),
                    ),
                    (
                        vec![Mask::CausalTopLeft, Mask::keep(&keep), Mask::bias(&bias)],
                        (Some(keep.view()), Some(bias.view()), RefCausal::TopLeft),
                    ),
                ];
                for (masks, (r_keep, r_bias, r_causal)) in cases {
                    let mut attn = ScaledDotProduct::new();
                    for m in masks {
                        attn = attn.with_mask(m);
                    }
                    let got = attn.forward_with_weights(&q, &k, &v).expect("valid shapes");
                    let (want_out, want_w) = reference(
                        q.view(),
                        k.view(),
                        v.view(),
                        scale,
                        r_keep,
                        r_bias,
                        r_causal,
                    );
                    let e = max_abs_diff(&got.output, &want_out)
                        .max(max_abs_diff(&got.weights, &want_w));
                    assert!(
                        e <= 1e-13,
                        "L={l} S={s} d={d} {r_causal:?}: max error {e:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn f32_matches_f64_reference() {
    let (q, k, v) = (random2(19, 16, 1), random2(23, 16, 2), random2(23, 5, 3));
    let to32 = |x: &Array2<f64>| x.mapv(|a| a as f32);
    let got = scaled_dot_product(&to32(&q), &to32(&k), &to32(&v)).expect("valid");
    let (want, _) = reference(
        q.view(),
        k.view(),
        v.view(),
        0.25,
        None,
        None,
        RefCausal::None,
    );
    let e = max_abs_diff(&got.mapv(f64::from), &want);
    assert!(e < 1e-5, "f32 error {e:e}");
}

#[test]
fn weight_rows_sum_to_one_or_are_all_zero() {
    let (q, k) = (random2(9, 4, 5), random2(11, 4, 6));
    let mut keep = keep_pattern(9, 11, 1);
    keep.row_mut(3).fill(false);
    let w = ScaledDotProduct::new()
        .with_mask(Mask::keep(&keep))
        .weights(&q, &k)
        .expect("valid");
    for (i, row) in w.rows().into_iter().enumerate() {
        let total = row.sum();
        if i == 3 {
            assert_eq!(total, 0.0);
        } else {
            assert!((total - 1.0).abs() < 1e-14, "row {i} sums to {total}");
        }
        assert!(row.iter().all(|&x| (0.0..=1.0).contains(&x)));
    }
}

#[test]
fn a_single_key_returns_its_value_row_exactly() {
    let q = random2(6, 5, 7);
    let k = random2(1, 5, 8);
    let v = random2(1, 3, 9);
    let out = scaled_dot_product(&q, &k, &v).expect("valid");
    for row in out.rows() {
        assert_eq!(row, v.row(0));
    }
}

#[test]
fn shifting_every_score_of_a_row_changes_nothing() {
    let (q, k, v) = (random2(4, 6, 10), random2(7, 6, 11), random2(7, 2, 12));
    let shift = array![[100.0], [-50.0], [0.5], [7.0]]; // broadcasts over keys
    let plain = ScaledDotProduct::new()
        .forward_with_weights(&q, &k, &v)
        .expect("valid");
    let shifted = ScaledDotProduct::new()
        .with_mask(Mask::bias(&shift))
        .forward_with_weights(&q, &k, &v)
        .expect("valid");
    assert_close(&plain.weights, &shifted.weights, 1e-13);
    assert_close(&plain.output, &shifted.output, 1e-13);
}

#[test]
fn permuting_keys_with_values_changes_nothing() {
    let (q, k, v) = (random2(5, 4, 13), random2(8, 4, 14), random2(8, 3, 15));
    let order = [3, 7, 0, 5, 1, 6, 2, 4];
    let k_perm = k.select(Axis(0), &order);
    let v_perm = v.select(Axis(0), &order);
    let a = scaled_dot_product(&q, &k, &v).expect("valid");
    let b = scaled_dot_product(&q, &k_perm, &v_perm).expect("valid");
    assert_close(&a, &b, 1e-14);
}

#[test]
fn views_transposes_and_strided_slices_equal_owned_copies() {
    let qt = random2(6, 9, 16); // (d_k, L): q is its transpose
    let big_k = random2(22, 12, 17);
    let big_v = random2(11, 8, 18);
    let q = qt.t();
    let k = big_k.slice(s![..;2, 3..9]); // every other row, 6 columns
    let v = big_v.slice(s![..;-1, 1..;3]); // reversed rows, every third column
    let causal = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
    let strided = causal.forward_with_weights(&q, &k, &v).expect("valid");
    let owned = causal
        .forward_with_weights(&q.to_owned(), &k.to_owned(), &v.to_owned())
        .expect("valid");
    assert_eq!(strided, owned);
    let f32_view = qt.mapv(|x| x as f32);
    assert_eq!(
        scaled_dot_product(&f32_view.t(), &f32_view.t(), &f32_view.t()).expect("valid"),
        scaled_dot_product(
            &f32_view.t().to_owned(),
            &f32_view.t().to_owned(),
            &f32_view.t().to_owned()
        )
        .expect("valid"),
    );
}

#[test]
fn masked_positions_are_never_read() {
    let (q, mut k, mut v) = (random2(4, 3, 19), random2(6, 3, 20), random2(6, 2, 21));
    let keep = Array2::from_shape_fn((4, 6), |(_, j)| j != 2 && j != 4);
    let mut bias = Array2::zeros((4, 6));
    let attn_clean = ScaledDotProduct::new().with_mask(Mask::keep(&keep));
    let clean = attn_clean.forward_with_weights(&q, &k, &v).expect("valid");
    drop(attn_clean);
    k.row_mut(2).fill(f64::NAN);
    v.row_mut(2).fill(f64::NAN);
    k.row_mut(4).fill(1e300);
    v.row_mut(4).fill(f64::INFINITY);
    bias.column_mut(2).fill(f64::NAN);
    bias.column_mut(4).fill(f64::INFINITY);
    let dirty = ScaledDotProduct::new()
        .with_mask(Mask::bias(&bias))
        .with_mask(Mask::keep(&keep))
        .forward_with_weights(&q, &k, &v)
        .expect("valid");
    // the dirty rows are summed over attended positions only, in another order
    // than the matrix product of the clean call: equal to rounding
    assert_eq!(clean.weights, dirty.weights);
    let e = max_abs_diff(&clean.output, &dirty.output);
    assert!(
        e <= 4.0 * f64::EPSILON,
        "masked garbage moved the output by {e:e}"
    );
}

#[test]
fn nan_in_an_unmasked_query_poisons_its_row_only() {
    let (mut q, k, v) = (random2(3, 4, 22), random2(5, 4, 23), random2(5, 2, 24));
    q[[1, 2]] = f64::NAN;
    let out = scaled_dot_product(&q, &k, &v).expect("valid");
    assert!(out.row(1).iter().all(|x| x.is_nan()));
    assert!(
        out.row(0)
            .iter()
            .chain(out.row(2).iter())
            .all(|x| x.is_finite())
    );
}

#[test]
fn nan_in_an_unmasked_value_reaches_the_output() {
    let (q, k, mut v) = (random2(3, 4, 25), random2(5, 4, 26), random2(5, 2, 27));
    v[[3, 1]] = f64::NAN;
    let out = scaled_dot_product(&q, &k, &v).expect("valid");
    assert!(out.column(1).iter().all(|x| x.is_nan()));
    assert!(out.column(0).iter().all(|x| x.is_finite()));
}

#[test]
fn causal_alignments_with_long_and_short_queries() {
    let kv = random2(3, 2, 28);
    let q_long = random2(5, 2, 29);
    let w = ScaledDotProduct::new()
        .with_mask(Mask::CausalBottomRight)
        .forward_with_weights(&q_long, &kv, &kv)
        .expect("valid");
    // L = 5 > S = 3: the first two queries see no key
    assert!(w.weights.slice(s![..2, ..]).iter().all(|&x| x == 0.0));
    assert!(w.output.slice(s![..2, ..]).iter().all(|&x| x == 0.0));
    assert_eq!(w.weights[[2, 1]], 0.0);
    assert_eq!(w.weights[[2, 0]], 1.0);
    let top_left = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .weights(&q_long, &kv)
        .expect("valid");
    assert_eq!(top_left[[0, 0]], 1.0);
    assert!((top_left.row(4).sum() - 1.0).abs() < 1e-15);
    // with L = S both alignments agree
    let q_square = random2(3, 2, 30);
    let tl = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .forward(&q_square, &kv, &kv);
    let br = ScaledDotProduct::new()
        .with_mask(Mask::CausalBottomRight)
        .forward(&q_square, &kv, &kv);
    assert_eq!(tl.expect("valid"), br.expect("valid"));
}

#[test]
fn empty_sequences() {
    let q0 = Array2::<f64>::zeros((0, 4));
    let k = random2(3, 4, 31);
    let v = random2(3, 2, 32);
    assert_eq!(
        scaled_dot_product(&q0, &k, &v).expect("valid").dim(),
        (0, 2)
    );
    let q = random2(2, 4, 33);
    let (k0, v0) = (Array2::<f64>::zeros((0, 4)), Array2::<f64>::zeros((0, 5)));
    let out = ScaledDotProduct::new()
        .forward_with_weights(&q, &k0, &v0)
        .expect("valid");
    assert_eq!(out.output, Array2::<f64>::zeros((2, 5)));
    assert_eq!(out.weights.dim(), (2, 0));
    let v_narrow = Array2::<f64>::zeros((3, 0));
    assert_eq!(
        scaled_dot_product(&q, &k, &v_narrow).expect("valid").dim(),
        (2, 0)
    );
}

#[test]
fn trace_shows_every_step_consistently() {
    let (q, k, v) = (random2(3, 4, 34), random2(5, 4, 35), random2(5, 2, 36));
    let keep = keep_pattern(3, 5, 2);
    let attn = ScaledDotProduct::new().with_mask(Mask::keep(&keep));
    let t = attn.trace(&q, &k, &v).expect("valid");
    let full = attn.forward_with_weights(&q, &k, &v).expect("valid");
    assert_eq!(t.weights, full.weights);
    assert_eq!(t.output, full.output);
    assert_close(&t.scores, &q.dot(&k.t()), 1e-15);
    assert_eq!(t.weights, softmax_rows(&t.scaled));
    for ((i, j), &x) in t.scaled.indexed_iter() {
        if keep[[i, j]] {
            assert!((x - t.scores[[i, j]] * 0.5).abs() < 1e-14);
        } else {
            assert_eq!(x, f64::NEG_INFINITY);
        }
    }
}

#[test]
fn huge_inputs_with_a_matching_scale_stay_finite() {
    let q = random2(4, 8, 37).mapv(|x| x as f32 * 1e19);
    let k = random2(6, 8, 38).mapv(|x| x as f32 * 1e19);
    let v = random2(6, 2, 39).mapv(|x| x as f32);
    let out = ScaledDotProduct::new()
        .with_scale(1e-38)
        .forward(&q, &k, &v)
        .expect("valid");
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn batched_equals_each_head_alone_with_broadcast_masks() {
    let (q, k, v) = (
        random4((2, 3, 5, 4), 40),
        random4((2, 3, 6, 4), 41),
        random4((2, 3, 6, 7), 42),
    );
    let per_batch_keep = Array4::from_shape_fn((2, 1, 5, 6), |(b, _, i, j)| (b + i + j) % 4 != 1);
    let bias = random2(5, 6, 43);
    let attn = ScaledDotProduct::new()
        .with_mask(Mask::keep(&per_batch_keep))
        .with_mask(Mask::bias(&bias))
        .with_mask(Mask::CausalBottomRight);
    let batched = attn
        .forward_batched_with_weights(&q, &k, &v)
        .expect("valid");
    for b in 0..2 {
        let keep = per_batch_keep.slice(s![b, 0, .., ..]);
        let one = ScaledDotProduct::new()
            .with_mask(Mask::keep(&keep))
            .with_mask(Mask::bias(&bias))
            .with_mask(Mask::CausalBottomRight);
        for h in 0..3 {
            let alone = one
                .forward_with_weights(
                    &q.slice(s![b, h, .., ..]),
                    &k.slice(s![b, h, .., ..]),
                    &v.slice(s![b, h, .., ..]),
                )
                .expect("valid");
            assert_eq!(batched.output.slice(s![b, h, .., ..]), alone.output);
            assert_eq!(batched.weights.slice(s![b, h, .., ..]), alone.weights);
        }
    }
}

#[test]
fn grouped_query_equals_repeated_kv_heads() {
    let q = random4((2, 6, 4, 8), 44);
    let (k, v) = (random4((2, 2, 5, 8), 45), random4((2, 2, 5, 3), 46));
    // query heads 0,1,2 use kv head 0; 3,4,5 use kv head 1 (PyTorch's repeat_interleave)
    let repeat = |x: &Array4<f64>| x.select(Axis(1), &[0, 0, 0, 1, 1, 1]);
    let attn = ScaledDotProduct::new().with_mask(Mask::CausalTopLeft);
    let grouped = attn.forward_batched(&q, &k, &v).expect("valid");
    let repeated = attn
        .forward_batched(&q, &repeat(&k), &repeat(&v))
        .expect("valid");
    assert_eq!(grouped, repeated);
}

#[test]
fn batched_empty_batch_and_heads() {
    let q = Array4::<f32>::zeros((0, 2, 3, 4));
    let kv = Array4::<f32>::zeros((0, 2, 5, 4));
    assert_eq!(
        ScaledDotProduct::new()
            .forward_batched(&q, &kv, &kv)
            .expect("valid")
            .dim(),
        (0, 2, 3, 4)
    );
    let q = Array4::<f32>::zeros((1, 0, 3, 4));
    let kv = Array4::<f32>::zeros((1, 0, 5, 4));
    assert_eq!(
        ScaledDotProduct::new()
            .forward_batched(&q, &kv, &kv)
            .expect("valid")
            .dim(),
        (1, 0, 3, 4)
    );
}

#[test]
fn shape_errors_name_the_shapes() {
    let q = Array2::<f64>::zeros((2, 4));
    let k = Array2::<f64>::zeros((3, 4));
    let v = Array2::<f64>::zeros((3, 2));
    let err = scaled_dot_product(&q, &Array2::zeros((3, 5)), &v).unwrap_err();
    assert_eq!(
        err,
        Error::QueryKeyWidth {
            query: vec![2, 4],
            key: vec![3, 5]
        }
    );
    let err = scaled_dot_product(&q, &k, &Array2::zeros((4, 2))).unwrap_err();
    assert_eq!(
        err,
        Error::KeyValueLength {
            key: vec![3, 4],
            value: vec![4, 2]
        }
    );
    assert!(err.to_string().contains("[3, 4]") && err.to_string().contains("[4, 2]"));
    let err = attention_weights(&Array2::<f64>::zeros((2, 0)), &Array2::zeros((3, 0))).unwrap_err();
    assert!(matches!(err, Error::ZeroWidth { .. }), "{err}");
    let bad_mask = Array2::from_elem((2, 4), true);
    let err = ScaledDotProduct::new()
        .with_mask(Mask::keep(&bad_mask))
        .forward(&q, &k, &v)
        .unwrap_err();
    assert_eq!(
        err,
        Error::MaskShape {
            mask: vec![2, 4],
            scores: vec![2, 3]
        }
    );
    let bad_bias = Array2::<f64>::zeros((3, 3));
    let err = ScaledDotProduct::new()
        .with_mask(Mask::bias(&bad_bias))
        .weights(&q, &k)
        .unwrap_err();
    assert!(matches!(err, Error::MaskShape { .. }));
}

#[test]
fn invalid_scales_are_errors() {
    let x = Array2::<f32>::ones((2, 2));
    for scale in [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = ScaledDotProduct::new()
            .with_scale(scale)
            .forward(&x, &x, &x)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidScale { .. }),
            "scale {scale}: {err}"
        );
    }
    // a negative scale is unusual but well defined
    assert!(
        ScaledDotProduct::new()
            .with_scale(-1.0)
            .forward(&x, &x, &x)
            .is_ok()
    );
}

#[test]
fn batched_shape_errors() {
    let q = Array4::<f64>::zeros((2, 4, 3, 8));
    let kv = Array4::<f64>::zeros((2, 2, 5, 8));
    let attn = ScaledDotProduct::new();
    let err = attn
        .forward_batched(&q, &Array4::zeros((1, 2, 5, 8)), &kv)
        .unwrap_err();
    assert!(matches!(err, Error::BatchShape { .. }), "{err}");
    let err = attn
        .forward_batched(&q, &kv, &Array4::zeros((2, 1, 5, 8)))
        .unwrap_err();
    assert!(matches!(err, Error::BatchShape { .. }), "{err}");
    let three = Array4::<f64>::zeros((2, 3, 5, 8));
    let err = attn.forward_batched(&q, &three, &three).unwrap_err();
    assert_eq!(
        err,
        Error::HeadGroups {
            query_heads: 4,
            kv_heads: 3
        }
    );
    let none = Array4::<f64>::zeros((2, 0, 5, 8));
    let err = attn.forward_batched(&q, &none, &none).unwrap_err();
    assert_eq!(
        err,
        Error::HeadGroups {
            query_heads: 4,
            kv_heads: 0
        }
    );
    let head_mask = Array4::from_elem((1, 3, 3, 5), true);
    let err = ScaledDotProduct::new()
        .with_mask(Mask::keep(&head_mask))
        .forward_batched(&q, &kv, &kv)
        .unwrap_err();
    assert_eq!(
        err,
        Error::MaskShape {
            mask: vec![1, 3, 3, 5],
            scores: vec![2, 4, 3, 5]
        }
    );
}

#[test]
fn errors_are_send_sync_std_errors() {
    fn check<E: std::error::Error + Send + Sync + 'static>() {}
    check::<Error>();
}

#[test]
fn minus_infinity_from_the_data_is_weight_zero_not_nan() {
    // q·k_j = −∞ for key 1 (every product is −∞), finite for the others
    let q = array![[1.0_f64, 2.0], [0.5, 1.0]];
    let mut k = random2(4, 2, 51);
    k.row_mut(1).fill(f64::NEG_INFINITY);
    let v = random2(4, 3, 52);
    for kernel in [attn::Kernel::Plain, attn::Kernel::Fused, attn::Kernel::Auto] {
        let attn = ScaledDotProduct::new().with_kernel(kernel);
        let out = attn.forward(&q, &k, &v).expect("valid");
        let weights = attn.weights(&q, &k).expect("valid");
        assert!(weights.column(1).iter().all(|&w| w == 0.0), "{kernel:?}");
        assert!(out.iter().all(|x| x.is_finite()), "{kernel:?}: {out}");
        // equal to attention over the other three keys
        let others = [0, 2, 3];
        let reduced = attn
            .forward(&q, &k.select(Axis(0), &others), &v.select(Axis(0), &others))
            .expect("valid");
        assert!(max_abs_diff(&out, &reduced) < 1e-15, "{kernel:?}");
    }
}
