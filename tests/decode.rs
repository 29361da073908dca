//! Step-by-step decoding with a key/value cache, position biases and mask builders.

use crate::common;

use attn::{
    Init, Kernel, KvCache, Mask, MultiHeadConfig, RopeLayout, ScaledDotProduct, alibi_slopes,
    key_padding, rope,
};
use common::{max_abs_diff, pseudo_random, random2};
use ndarray::{Array2, Array3, Array4, Axis, array, concatenate, s};

fn tokens(t: usize, d: usize, seed: u64) -> Array3<f64> {
    pseudo_random(&[1, t, d], seed)
        .into_dimensionality()
        .expect("3-D")
}

/// Runs `x` through the cache in chunks (a prompt, then single steps), concatenated.
fn in_steps(
    mha: &attn::MultiHeadAttention<f64>,
    x: &Array3<f64>,
    prompt: usize,
    cache: &mut KvCache<f64>,
) -> Array3<f64> {
    let t = x.dim().1;
    let mut outs = vec![
        mha.forward_cached(&x.slice(s![.., ..prompt, ..]), cache)
            .expect("prompt"),
    ];
    for i in prompt..t {
        outs.push(
            mha.forward_cached(&x.slice(s![.., i..i + 1, ..]), cache)
                .expect("step"),
        );
    }
    let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
    concatenate(Axis(1), &views).expect("same widths")
}

#[test]
fn causal_full_pass_equals_prompt_then_steps() {
    for kv_heads in [4, 2, 1] {
        let mha = MultiHeadConfig::new(16, 4)
            .with_kv_heads(kv_heads)
            .random::<f64>(Init::TorchMultihead, 7)
            .expect("valid");
        let x = tokens(11, 16, kv_heads as u64);
        let full = mha
            .forward_batched(&x, &x, &x, &[Mask::CausalTopLeft])
            .expect("valid");
        for prompt in [1, 4, 11] {
            let mut cache = KvCache::new(1, kv_heads, 4, 4);
            let stepped = in_steps(&mha, &x, prompt, &mut cache);
            assert_eq!(cache.len(), 11);
            let e = max_abs_diff(&stepped, &full);
            assert!(e < 1e-13, "kv_heads {kv_heads}, prompt {prompt}: {e:e}");
        }
    }
}

/// A layer with its own scale (T5's 1, or any other) decodes through its cache
/// with that scale: prompt then steps equal the full causal pass, with ALiBi and
/// with a sliding window; a cache at another scale is refused.
#[test]
fn cached_layer_attends_with_its_scale() {
    use attn::{Causality, PositionEncoding};
    let settings = [
        (Causality::Causal, PositionEncoding::None),
        (Causality::Causal, PositionEncoding::Alibi),
        (Causality::SlidingWindow(3), PositionEncoding::None),
    ];
    for scale in [1.0, 0.3] {
        for (causality, positions) in settings {
            let mha = MultiHeadConfig::new(8, 2)
                .with_scale(scale)
                .with_causality(causality)
                .with_positions(positions)
                .random::<f64>(Init::XavierUniform, 31)
                .expect("valid");
            let x = tokens(9, 8, 32);
            let full = mha.forward_batched(&x, &x, &x, &[]).expect("valid");
            for prompt in [1, 5] {
                let mut cache = mha.new_cache(1);
                let stepped = in_steps(&mha, &x, prompt, &mut cache);
                let e = max_abs_diff(&stepped, &full);
                assert!(
                    e < 1e-13,
                    "scale {scale}, {causality:?}, {positions:?}: {e:e}"
                );
            }
            // a cache made at 1/√head_dim (0.5 here) and without the window: the
            // layer's scale and window apply all the same
            let mut default = KvCache::new(1, 2, 4, 4);
            let e = max_abs_diff(&in_steps(&mha, &x, 1, &mut default), &full);
            assert!(e < 1e-13, "scale {scale}, {causality:?}, own cache: {e:e}");
            // while the cache's own calls use its own scale
            assert_eq!(default.scale(), 0.5);
            // the same cache made at the layer's scale attends as the layer does
            let mut rescaled = match causality {
                Causality::SlidingWindow(w) => KvCache::sliding(1, 2, 4, 4, w).expect("valid"),
                _ => KvCache::new(1, 2, 4, 4),
            }
            .with_scale(scale);
            let e = max_abs_diff(&in_steps(&mha, &x, 1, &mut rescaled), &full);
            assert!(e < 1e-13, "scale {scale}: {e:e}");
        }
    }
}

#[test]
fn sliding_cache_equals_sliding_window_attention() {
    let mha = MultiHeadConfig::new(8, 2)
        .random::<f64>(Init::TorchMultihead, 8)
        .expect("valid");
    let x = tokens(13, 8, 9);
    for window in [1, 3, 5, 20] {
        let full = mha
            .forward_batched(&x, &x, &x, &[Mask::SlidingWindow(window)])
            .expect("valid");
        for prompt in [1, 4, 9] {
            let mut cache = KvCache::sliding(1, 2, 4, 4, window).expect("valid");
            let stepped = in_steps(&mha, &x, prompt, &mut cache);
            assert_eq!(cache.len(), window.min(13));
            let e = max_abs_diff(&stepped, &full);
            assert!(e < 1e-13, "window {window}, prompt {prompt}: {e:e}");
        }
    }
}

#[test]
fn cache_errors() {
    let mut cache = KvCache::<f32>::new(1, 2, 4, 4);
    let wrong = Array4::<f32>::zeros((1, 3, 1, 4));
    assert!(cache.append(&wrong, &wrong).is_err());
    let q = Array4::<f32>::zeros((1, 3, 1, 4));
    let kv = Array4::<f32>::zeros((1, 2, 1, 4));
    assert!(
        cache.attend(&q, &kv, &kv).is_err(),
        "2 kv heads do not divide 3 query heads"
    );
    let two_positions = Array4::<f32>::zeros((1, 2, 2, 4));
    let wide = Array4::<f32>::zeros((1, 2, 1, 5));
    for q in [&two_positions, &wide] {
        let Err(attn::Error::Shape { found, .. }) = cache.attend(q, &kv, &kv) else {
            panic!("queries {:?} do not fit the new keys", q.shape());
        };
        assert_eq!(found, q.shape());
    }
    assert!(cache.is_empty(), "failed calls leave the cache as it was");
    assert!(KvCache::<f32>::sliding(1, 1, 4, 4, 0).is_err());
    let cross = MultiHeadConfig::new(8, 2)
        .with_kdim(3)
        .random::<f32>(Init::XavierUniform, 0)
        .expect("valid");
    assert!(
        cross
            .forward_cached(&Array3::zeros((1, 2, 8)), &mut KvCache::new(1, 2, 4, 4))
            .is_err()
    );
}

#[test]
fn sliding_window_mask_equals_its_materialised_keep_mask() {
    for (l, s_len) in [(7, 7), (5, 300), (300, 300), (200, 140)] {
        let (q, k, v) = (random2(l, 8, 1), random2(s_len, 8, 2), random2(s_len, 3, 3));
        for window in [1, 4, 130] {
            let keep = Array2::from_shape_fn((l, s_len), |(i, j)| {
                let p = i as i64 + s_len as i64 - l as i64;
                (j as i64) <= p && j as i64 > p - window as i64
            });
            let want = ScaledDotProduct::new()
                .with_kernel(Kernel::Plain)
                .with_mask(Mask::keep(&keep))
                .forward(&q, &k, &v)
                .expect("valid");
            for kernel in [Kernel::Plain, Kernel::Fused, Kernel::Auto] {
                let got = ScaledDotProduct::new()
                    .with_kernel(kernel)
                    .with_mask(Mask::SlidingWindow(window))
                    .forward(&q, &k, &v)
                    .expect("valid");
                let e = max_abs_diff(&got, &want);
                assert!(
                    e < 1e-13,
                    "L={l} S={s_len} window {window} {kernel:?}: {e:e}"
                );
            }
        }
    }
    let x = random2(3, 2, 4);
    assert!(
        ScaledDotProduct::new()
            .with_mask(Mask::SlidingWindow(0))
            .forward(&x, &x, &x)
            .is_err()
    );
}

#[test]
fn alibi_equals_its_materialised_bias_per_head() {
    let (heads, l, s_len) = (4, 150, 170);
    let q: Array4<f64> = pseudo_random(&[2, heads, l, 16], 5)
        .into_dimensionality()
        .expect("4-D");
    let k: Array4<f64> = pseudo_random(&[2, heads, s_len, 16], 6)
        .into_dimensionality()
        .expect("4-D");
    let v: Array4<f64> = pseudo_random(&[2, heads, s_len, 5], 7)
        .into_dimensionality()
        .expect("4-D");
    let slopes = ndarray::Array1::from(alibi_slopes(heads));
    let bias = Array4::from_shape_fn((1, heads, l, s_len), |(_, h, i, j)| {
        -slopes[h] * ((i as f64 + (s_len - l) as f64) - j as f64).abs()
    });
    let want = ScaledDotProduct::new()
        .with_kernel(Kernel::Plain)
        .with_mask(Mask::bias(&bias))
        .with_mask(Mask::CausalBottomRight)
        .forward_batched(&q, &k, &v)
        .expect("valid");
    for kernel in [Kernel::Plain, Kernel::Fused] {
        let got = ScaledDotProduct::new()
            .with_kernel(kernel)
            .with_mask(Mask::Alibi(slopes.view()))
            .with_mask(Mask::CausalBottomRight)
            .forward_batched(&q, &k, &v)
            .expect("valid");
        let e = max_abs_diff(&got, &want);
        assert!(e < 1e-13, "{kernel:?}: {e:e}");
    }
    let three = ndarray::Array1::from(vec![0.5, 0.25, 0.125]);
    let err = ScaledDotProduct::new()
        .with_mask(Mask::Alibi(three.view()))
        .forward_batched(&q, &k, &v);
    assert!(err.is_err(), "3 slopes for 4 heads");
}

#[test]
fn alibi_slopes_follow_the_paper() {
    assert_eq!(alibi_slopes(1), vec![2f64.powi(-8)]);
    let eight = alibi_slopes(8);
    assert_eq!(eight, (1..=8).map(|i| 2f64.powi(-i)).collect::<Vec<_>>());
    // 12 heads: the 8 slopes of 8, then slopes 1, 3, 5, 7 of 16 (2^-0.5, 2^-1.5, …)
    let twelve = alibi_slopes(12);
    assert_eq!(twelve[..8], eight[..]);
    for (k, &slope) in twelve[8..].iter().enumerate() {
        assert!((slope - 2f64.powf(-0.5 - k as f64)).abs() < 1e-15);
    }
    assert!(alibi_slopes(0).is_empty());
}

#[test]
fn rope_matches_the_rotation_formula() {
    let x = random2(5, 8, 10);
    let positions = [0, 1, 7, 100, 4096];
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
        let got = rope(&x, &positions, 10_000.0, layout).expect("valid");
        for (r, &p) in positions.iter().enumerate() {
            for i in 0..4 {
                let (a, b) = match layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::HalfSplit => (i, i + 4),
                };
                // (x_a + i·x_b) · e^{iθ}, θ = p · 10000^(−2i/8)
                let theta = p as f64 / 10_000f64.powf(2.0 * i as f64 / 8.0);
                let (re, im) = (x[[r, a]], x[[r, b]]);
                assert!((got[[r, a]] - (re * theta.cos() - im * theta.sin())).abs() < 1e-12);
                assert!((got[[r, b]] - (re * theta.sin() + im * theta.cos())).abs() < 1e-12);
            }
        }
    }
    // scores depend only on the distance between positions
    let (q, k) = (random2(1, 8, 11), random2(1, 8, 12));
    let score = |pq: usize, pk: usize| {
        let rq = rope(&q, &[pq], 10_000.0, RopeLayout::HalfSplit).expect("valid");
        let rk = rope(&k, &[pk], 10_000.0, RopeLayout::HalfSplit).expect("valid");
        rq.row(0).dot(&rk.row(0))
    };
    assert!((score(10, 3) - score(107, 100)).abs() < 1e-12);
    assert!(
        rope(
            &random2(2, 3, 1),
            &[0, 1],
            10_000.0,
            RopeLayout::Interleaved
        )
        .is_err()
    );
    assert!(rope(&x, &[0], 10_000.0, RopeLayout::Interleaved).is_err());
    assert!(rope(&x, &positions, 1.0, RopeLayout::Interleaved).is_err());
}

#[test]
fn key_padding_masks_each_sequence() {
    let mask = key_padding(&[4, 2, 0], 4).expect("valid");
    assert_eq!(mask.shape(), &[3, 1, 1, 4]);
    assert_eq!(
        mask.slice(s![1, 0, 0, ..]).to_vec(),
        vec![true, true, false, false]
    );
    assert!(key_padding(&[5], 4).is_err());
    // through multi-head attention: padded keys get no weight, the empty sequence gives 0
    let mha = MultiHeadConfig::new(8, 2)
        .without_bias()
        .random::<f64>(Init::XavierUniform, 1)
        .expect("valid");
    let x: Array3<f64> = pseudo_random(&[3, 4, 8], 13)
        .into_dimensionality()
        .expect("3-D");
    let out = mha
        .forward_batched_with_weights(&x, &x, &x, &[Mask::keep(&mask)])
        .expect("valid");
    assert!(
        out.head_weights
            .slice(s![1, .., .., 2..])
            .iter()
            .all(|&w| w == 0.0)
    );
    assert!(out.output.slice(s![2, .., ..]).iter().all(|&o| o == 0.0));
}

/// A left-padded row decoded through the cache gives the numbers of its sequence
/// decoded alone: full and sliding caches, rotary positions per row, prompts and
/// chunks of several tokens.
#[test]
fn left_padded_rows_decode_as_their_sequences_alone() {
    use attn::{Causality, PositionEncoding, Rope};
    let rope = PositionEncoding::Rope(Rope::new(1e4));
    for causality in [Causality::Causal, Causality::SlidingWindow(3)] {
        let mha = MultiHeadConfig::new(8, 4)
            .with_kv_heads(2)
            .with_causality(causality)
            .with_positions(rope)
            .random::<f64>(Init::XavierUniform, 21)
            .expect("valid");
        let seq = tokens(7, 8, 22);
        let junk = tokens(2, 8, 23);
        let padded = concatenate(Axis(1), &[junk.view(), seq.view()]).expect("same width");
        let both = concatenate(Axis(0), &[padded.view(), padded.view()]).expect("same shape");
        // row 0: two padding tokens then the sequence; row 1: nine real tokens
        let real = Array2::from_shape_fn((2, 9), |(b, t)| b == 1 || t >= 2);
        let chunks = [(0, 4), (4, 5), (5, 7), (7, 9)];
        let mut cache = mha.new_cache(2);
        let mut alone_cache = mha.new_cache(1);
        for (n, &(from, to)) in chunks.iter().enumerate() {
            let step = mha
                .forward_cached_padded_with_weights(
                    &both.slice(s![.., from..to, ..]),
                    &real.slice(s![.., from..to]),
                    &mut cache,
                )
                .expect("valid");
            // the same tokens alone: without the padding
            let (a, b) = (from.max(2) - 2, to - 2);
            let alone = mha
                .forward_cached(&seq.slice(s![.., a..b, ..]), &mut alone_cache)
                .expect("valid");
            let ours = step.output.slice(s![0..1, from.max(2) - from.., ..]);
            let e = max_abs_diff(&ours.to_owned(), &alone);
            assert!(e < 1e-13, "{causality:?}, chunk {n}: {e:e}");
            // each real row's weights sum to 1 (none on padding: see the equality above)
            let sums = step.head_weights.sum_axis(Axis(3));
            for ((b, _, i), &total) in sums.indexed_iter() {
                if real[[b, from + i]] {
                    assert!(
                        (total - 1.0).abs() < 1e-12,
                        "{causality:?}: row sums {total}"
                    );
                }
            }
        }
        assert_eq!(cache.positions(), &[7, 9]);
        assert_eq!(cache.positions_seen(), 9);
        let padding_keys = cache.real().mapv(|r| !r);
        assert_eq!(padding_keys.row(1).iter().filter(|&&p| p).count(), 0);
    }
}

#[test]
fn sliding_cache_keys_come_in_position_order() {
    let mut cache = KvCache::<f64>::sliding(1, 1, 1, 1, 3).expect("valid");
    for p in 0..8_usize {
        let x = Array4::from_elem((1, 1, 1, 1), p as f64);
        cache.attend(&x, &x, &x).expect("valid");
        let held: Vec<f64> = cache.keys().iter().copied().collect();
        let want: Vec<f64> = (p.saturating_sub(2)..=p).map(|q| q as f64).collect();
        assert_eq!(held, want, "after position {p}");
        assert_eq!(cache.values().iter().copied().collect::<Vec<_>>(), want);
    }
    // a chunk larger than the window keeps its last three
    let chunk = Array4::from_shape_fn((1, 1, 5, 1), |(_, _, t, _)| 100.0 + t as f64);
    cache.attend(&chunk, &chunk, &chunk).expect("valid");
    assert_eq!(
        cache.keys().iter().copied().collect::<Vec<_>>(),
        vec![102.0, 103.0, 104.0]
    );
    // a window past the storage's first 16 slots: the ring grows as positions
    // arrive and takes its second copies when they wrap, inside a chunk too
    let window = 37;
    let mut cache = KvCache::<f64>::sliding(1, 1, 1, 1, window).expect("valid");
    let mut seen = 0;
    for t in [1, 7, 20, 3, 1, 45, 2, 30, 1, 36, 74, 5] {
        let chunk = Array4::from_shape_fn((1, 1, t, 1), |(_, _, i, _)| (seen + i) as f64);
        cache.attend(&chunk, &chunk, &chunk).expect("valid");
        seen += t;
        let want: Vec<f64> = (seen.saturating_sub(window)..seen)
            .map(|p| p as f64)
            .collect();
        assert_eq!(
            cache.keys().iter().copied().collect::<Vec<_>>(),
            want,
            "after {seen}"
        );
        assert_eq!(cache.values().iter().copied().collect::<Vec<_>>(), want);
    }
}

#[test]
fn padded_attend_errors_leave_the_cache_as_it_was() {
    let mut cache = KvCache::<f32>::new(2, 1, 2, 2);
    let x = Array4::<f32>::ones((2, 1, 3, 2));
    cache
        .attend_padded(&x, &x, &x, &Array2::from_elem((2, 3), true), &[])
        .expect("valid");
    let before = cache.clone();
    let wrong_real = Array2::from_elem((2, 2), true);
    assert!(matches!(
        cache.attend_padded(&x, &x, &x, &wrong_real, &[]),
        Err(attn::Error::Shape { .. })
    ));
    let bad_mask = Array2::from_elem((3, 5), true);
    assert!(
        cache
            .attend_padded(
                &x,
                &x,
                &x,
                &Array2::from_elem((2, 3), true),
                &[Mask::keep(&bad_mask)]
            )
            .is_err()
    );
    assert_eq!(cache, before);
}

/// Padding between a row's real tokens: where a step reads distances (ALiBi,
/// a window, a sliding cache's ring) they would count that padding, so the
/// step is an error naming the row, and the cache is left as it was; where no
/// mask reads them, the row gives its sequence's numbers alone.
#[test]
fn padding_between_real_tokens_gives_each_sequence_alone_or_is_refused_by_a_ring() {
    // a right-padded prompt, then a step with padding between its own tokens,
    // then one more token: two query heads over one key/value head
    let steps = [
        array![[true, true, true, true], [true, true, false, false]],
        array![[true, true, true], [true, false, true]],
        array![[true], [true]],
    ];
    let slopes = array![0.5, 0.25];
    let distance_masks = [
        vec![Mask::Alibi(slopes.view())],
        vec![Mask::SlidingWindow(2)],
        vec![],
    ];
    for (m, masks) in distance_masks.iter().enumerate() {
        let mut cache = KvCache::<f64>::new(2, 1, 2, 2);
        let mut alone = [KvCache::<f64>::new(1, 1, 2, 2), KvCache::new(1, 1, 2, 2)];
        for (n, real) in steps.iter().enumerate() {
            let t = real.ncols();
            let x = |seed: usize| {
                pseudo_random(&[2, 2, t, 2], seed as u64)
                    .into_dimensionality()
                    .expect("4-D")
            };
            let (q, k, v): (Array4<f64>, Array4<f64>, Array4<f64>) =
                (x(3 * n), x(3 * n + 1), x(3 * n + 2));
            let (k, v) = (
                k.slice(s![.., ..1, .., ..]).to_owned(),
                v.slice(s![.., ..1, .., ..]).to_owned(),
            );
            // in the second step, a keep-mask of the call hides each row's first key
            let s_all = cache.len() + t;
            let hide_first = Array4::from_shape_fn((2, 1, t, s_all), |(_, _, _, j)| j != 0);
            let mut call: Vec<Mask<'_, f64>> = masks.clone();
            if n == 1 {
                call.push(Mask::Keep(hide_first.into_dyn().into()));
            }
            let out = cache
                .attend_padded_with_weights(&q, &k, &v, real, &call)
                .expect("a cache that keeps every position");
            let held = cache.real().to_owned();
            for b in 0..2 {
                let keep: Vec<usize> = (0..t).filter(|&i| real[[b, i]]).collect();
                let pick = |a: &Array4<f64>| a.slice(s![b..=b, .., .., ..]).select(Axis(2), &keep);
                let s_alone = alone[b].len() + keep.len();
                let all_real = Array2::from_elem((1, keep.len()), true);
                let own_hide =
                    Array4::from_shape_fn((1, 1, keep.len(), s_alone), |(_, _, _, j)| j != 0);
                let mut own: Vec<Mask<'_, f64>> = masks.clone();
                if n == 1 {
                    own.push(Mask::Keep(own_hide.into_dyn().into()));
                }
                let want = alone[b]
                    .attend_padded_with_weights(&pick(&q), &pick(&k), &pick(&v), &all_real, &own)
                    .expect("valid");
                let e = max_abs_diff(&pick(&out.output), &want.output);
                assert!(e < 1e-14, "masks {m}, step {n}, row {b}: {e:e}");
                // the weights over the row's real keys, in the order of the call
                let mut slots: Vec<usize> = (0..held.ncols()).filter(|&j| held[[b, j]]).collect();
                if n == 1 && b == 1 {
                    // this step moved row 1's padding first: the call's order was
                    // the held slots as they were, then the new ones
                    slots = vec![0, 1, 4, 6];
                }
                let got = pick(&out.weights).select(Axis(3), &slots);
                let e = max_abs_diff(&got, &want.weights);
                assert!(e < 1e-14, "masks {m}, step {n}, row {b}, weights: {e:e}");
            }
        }
        // a ring's slots are its window: it refuses instead, and stays as it was
        let mut ring = KvCache::<f64>::sliding(2, 1, 2, 2, 8).expect("valid");
        let kv =
            |t| Array4::from_shape_fn((2, 1, t, 2), |(b, _, i, j)| (b + 2 * i + j) as f64 / 7.0);
        let q = |t| concatenate(Axis(1), &[kv(t).view(), kv(t).view()]).expect("two heads");
        ring.attend_padded(&q(4), &kv(4), &kv(4), &steps[0], masks)
            .expect("one run per row");
        let before = ring.clone();
        let err = ring
            .attend_padded(&q(1), &kv(1), &kv(1), &steps[2], masks)
            .expect_err("padding between real tokens in a ring");
        assert!(err.to_string().contains("batch row 1"), "{err}");
        assert_eq!(ring, before);
    }
}
