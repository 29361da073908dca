//! The paged cache against the contiguous one: every stored type, block
//! tables, copy on write, int8 within its stated bound, errors that write
//! nothing, and the layer's variable-length calls.

use crate::common;

use attn::half::{bf16, f16};
use attn::{
    CacheElement, Causality, Init, KvCache, MultiHeadAttention, MultiHeadConfig, PagedKvCache,
    PositionEncoding, Rope, SequenceId, kernel_paths,
};
use common::{expected_arch, pseudo_random};
use ndarray::{Array2, Array3, Axis, concatenate, s};

/// `(heads, t, d)` pseudo-random values in [-2, 2).
fn random3(heads: usize, t: usize, d: usize, seed: u64) -> Array3<f64> {
    pseudo_random(&[heads, t, d], seed)
        .into_dimensionality()
        .expect("3-D")
}

/// The largest difference of two arrays' elements, in f64.
fn diff<'a, A: Into<f64> + Copy + 'a>(
    a: impl IntoIterator<Item = &'a A>,
    b: impl IntoIterator<Item = &'a A>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .fold(0.0, |m, (&x, &y)| m.max((x.into() - y.into()).abs()))
}

/// One step of the contiguous cache, `(heads, T, d)` in and out.
fn contiguous_step<A: attn::Element>(
    cache: &mut KvCache<A>,
    q: &Array3<A>,
    k: &Array3<A>,
    v: &Array3<A>,
) -> Array3<A> {
    let four = |x: &Array3<A>| x.view().insert_axis(Axis(0)).to_owned();
    cache
        .attend(&four(q), &four(k), &four(v))
        .expect("valid step")
        .index_axis_move(Axis(0), 0)
}

/// The chunks of a conversation: a prompt (through the tiled kernel), decoding
/// steps (the direct path), a chunk of a few and one longer than the direct
/// path takes.
const CHUNKS: [usize; 8] = [13, 1, 3, 1, 8, 1, 20, 1];

/// Paged steps of stored type `E` against a contiguous `f32` cache given the
/// keys and values as `E` stores them (`round`): the same numbers up to the
/// order of the sums; decoding steps run the direct path.
fn matches_contiguous<E: CacheElement<Compute = f32>>(round: fn(f32) -> f32, name: &str) {
    let (heads, kv_heads, d) = (4, 2, 16);
    for block_size in [5, 16] {
        let mut paged = PagedKvCache::<E>::new(64, block_size, kv_heads, d, d).expect("valid");
        let seq = paged.add_sequence();
        let mut contiguous = KvCache::<f32>::new(1, kv_heads, d, d);
        for (i, &t) in CHUNKS.iter().enumerate() {
            let f = |x: Array3<f64>| x.mapv(|x| x as f32);
            let q = f(random3(heads, t, d, 3 * i as u64));
            let k = f(random3(kv_heads, t, d, 3 * i as u64 + 1));
            let v = f(random3(kv_heads, t, d, 3 * i as u64 + 2));
            let (out, paths) = kernel_paths(|| paged.attend(seq, &q, &k, &v).expect("valid"));
            let expected = contiguous_step(&mut contiguous, &q, &k.mapv(round), &v.mapv(round));
            let e = diff(&out, &expected);
            assert!(e < 2e-6, "{name}, block {block_size}, chunk {i}: {e:e}");
            if t == 1 {
                assert_eq!(
                    (paths.direct, paths.reference),
                    (heads, 0),
                    "{name}: {paths:?}"
                );
                assert_eq!(paths.arch, Some(expected_arch(false)));
            }
        }
        let held: usize = CHUNKS.iter().sum();
        assert_eq!(paged.len(seq).expect("live"), held);
        assert_eq!(
            paged.block_table(seq).expect("live").len(),
            held.div_ceil(block_size)
        );
    }
}

#[test]
fn every_stored_type_matches_the_contiguous_cache() {
    matches_contiguous::<f32>(|x| x, "f32");
    matches_contiguous::<bf16>(|x| bf16::from_f32(x).to_f32(), "bf16");
    matches_contiguous::<f16>(|x| f16::from_f32(x).to_f32(), "f16");
    // f64: to rounding
    let (heads, kv_heads, d) = (4, 1, 12);
    let mut paged = PagedKvCache::<f64>::new(64, 3, kv_heads, d, d).expect("valid");
    let seq = paged.add_sequence();
    let mut contiguous = KvCache::<f64>::new(1, kv_heads, d, d);
    for (i, &t) in CHUNKS.iter().enumerate() {
        let q = random3(heads, t, d, 3 * i as u64);
        let k = random3(kv_heads, t, d, 3 * i as u64 + 1);
        let v = random3(kv_heads, t, d, 3 * i as u64 + 2);
        let out = paged.attend(seq, &q, &k, &v).expect("valid");
        let e = diff(&out, &contiguous_step(&mut contiguous, &q, &k, &v));
        assert!(e < 1e-14, "f64 chunk {i}: {e:e}");
    }
}

/// The stated bound of an int8 step ([`PagedKvCache`]): for each query head,
/// `(e^{2ε} − 1)·V + V/127` with `ε = c·m·(‖q‖₁/254 + d·‖q‖∞/32767)`,
/// `m = max|k|`, `V = max|v|` (over the head's keys and values), and room for
/// f32 rounding.
fn int8_bound(q: &Array3<f32>, keys: &Array3<f32>, values: &Array3<f32>, scale: f32) -> Vec<f32> {
    let (heads, kv_heads, d) = (q.dim().0, keys.dim().0, q.dim().2);
    (0..heads)
        .map(|h| {
            let kv = h / (heads / kv_heads);
            let largest = |x: ndarray::ArrayView2<'_, f32>| x.fold(0.0_f32, |m, x| m.max(x.abs()));
            let (m, big_v) = (
                largest(keys.slice(s![kv, .., ..])),
                largest(values.slice(s![kv, .., ..])),
            );
            let eps = q
                .slice(s![h, .., ..])
                .rows()
                .into_iter()
                .map(|r| {
                    let l1: f32 = r.iter().map(|x| x.abs()).sum();
                    let inf = r.iter().fold(0.0_f32, |a, x| a.max(x.abs()));
                    scale * m * (l1 / 254.0 + d as f32 * inf / 32767.0)
                })
                .fold(0.0, f32::max);
            ((2.0 * eps).exp() - 1.0) * big_v + big_v / 127.0 + 1e-5
        })
        .collect()
}

/// Whether decoding steps of an int8 cache run on integer dot products here.
fn integer_dots() -> bool {
    #[cfg(target_arch = "x86_64")]
    if expected_arch(false) == attn::KernelArch::Avx512 {
        return is_x86_feature_detected!("avx512vnni");
    }
    false
}

#[test]
fn int8_stays_within_its_bound_of_the_f32_cache() {
    // one query row per key/value head, four, sixteen (two batches of the
    // direct path), and a width that is not a multiple of the lanes; 2100
    // positions and more are two parts of the direct path, of chunks each
    // (the integer queries are rounded once per batch and kept for its
    // chunks; a thread's working memory is kept from part to part)
    for (heads, kv_heads, d) in [(8, 8, 64), (8, 2, 64), (16, 1, 32), (2, 1, 12)] {
        let mut int8 = PagedKvCache::<i8>::new(140, 16, kv_heads, d, d).expect("valid");
        let seq = int8.add_sequence();
        let mut exact = KvCache::<f32>::new(1, kv_heads, d, d);
        let (mut keys, mut values) = (
            Array3::zeros((kv_heads, 0, d)),
            Array3::zeros((kv_heads, 0, d)),
        );
        let mut worst = 0.0_f64;
        for (i, t) in [2100, 1, 1, 5, 1].into_iter().enumerate() {
            let f = |x: Array3<f64>| x.mapv(|x| x as f32);
            let q = f(random3(heads, t, d, 100 + 3 * i as u64));
            let k = f(random3(kv_heads, t, d, 101 + 3 * i as u64));
            let v = f(random3(kv_heads, t, d, 102 + 3 * i as u64));
            keys = concatenate(Axis(1), &[keys.view(), k.view()]).expect("same heads");
            values = concatenate(Axis(1), &[values.view(), v.view()]).expect("same heads");
            let (out, paths) = kernel_paths(|| int8.attend(seq, &q, &k, &v).expect("valid"));
            let expected = contiguous_step(&mut exact, &q, &k, &v);
            let bound = int8_bound(&q, &keys, &values, int8.scale());
            for (h, &bound) in bound.iter().enumerate() {
                let e = diff(out.slice(s![h, .., ..]), expected.slice(s![h, .., ..]));
                assert!(
                    e <= f64::from(bound),
                    "({heads}, {kv_heads}, {d}) step {i} head {h}: {e:e} > {:e}",
                    bound
                );
                worst = worst.max(e / f64::from(bound));
            }
            if t == 1 {
                assert_eq!(paths.direct, heads, "{paths:?}");
                // integer dot products for widths of whole registers (the
                // direct path's batches of up to 8 rows, any group size)
                let fits = d % 32 == 0;
                let expected = if integer_dots() && fits { heads } else { 0 };
                assert_eq!(paths.int8_dots, expected, "{paths:?}");
            }
        }
        // quantised for real: not the f32 numbers
        assert!(worst > 0.0);
        // each stored element within m/254 of its key
        let stored = int8.keys(seq).expect("live");
        for (row, exact) in stored.rows().into_iter().zip(keys.rows()) {
            let m = exact.fold(0.0_f32, |m, x| m.max(x.abs()));
            let e = diff(row, exact);
            assert!(
                e <= f64::from(m / 254.0 * 1.0001),
                "{e:e} > {:e}",
                m / 254.0
            );
        }
    }
}

#[test]
fn a_prompt_in_chunks_equals_the_prompt_at_once() {
    let (heads, kv, d) = (4, 2, 16);
    let f = |x: Array3<f64>| x.mapv(|x| x as f32);
    let (q, k, v) = (
        f(random3(heads, 40, d, 1)),
        f(random3(kv, 40, d, 2)),
        f(random3(kv, 40, d, 3)),
    );
    let mut cache = PagedKvCache::<i8>::new(32, 8, kv, d, d).expect("valid");
    let (whole, chunked) = (cache.add_sequence(), cache.add_sequence());
    let at_once = cache.attend(whole, &q, &k, &v).expect("valid");
    let mut start = 0;
    for t in [7, 1, 20, 12] {
        let span = s![.., start..start + t, ..];
        let out = cache
            .attend(chunked, &q.slice(span), &k.slice(span), &v.slice(span))
            .expect("valid");
        let e = diff(&out, at_once.slice(span));
        assert!(e < 1e-5, "chunk at {start}: {e:e}");
        start += t;
    }
    assert_eq!(
        cache.keys(whole).expect("live"),
        cache.keys(chunked).expect("live")
    );
}

#[test]
fn forks_share_blocks_and_copy_on_write() {
    let (heads, kv, d) = (2, 1, 8);
    let token = |t: usize, seed: u64| random3(kv, t, d, seed);
    let mut cache = PagedKvCache::<f64>::new(6, 4, kv, d, d).expect("valid");
    let parent = cache.add_sequence();
    let prompt = token(6, 1);
    cache.append(parent, &prompt, &prompt).expect("room");
    let child = cache.fork(parent).expect("live");
    assert_eq!(
        cache.block_table(child).expect("live"),
        cache.block_table(parent).expect("live")
    );
    assert_eq!(cache.free_blocks(), 4);
    // the child writes into the shared, partly filled second block: a copy
    let (q, x) = (random3(heads, 3, d, 2), token(3, 3));
    let child_out = cache.attend(child, &q, &x, &x).expect("room");
    let (p, c) = (
        cache.block_table(parent).expect("live").to_vec(),
        cache.block_table(child).expect("live").to_vec(),
    );
    assert_eq!(p[0], c[0], "the full first block stays shared");
    assert_ne!(p[1], c[1], "the written block was copied");
    assert_eq!(
        cache.keys(parent).expect("live"),
        prompt,
        "the parent is untouched"
    );
    // each equals a contiguous cache of its own history
    let mut alone = KvCache::<f64>::new(1, kv, d, d);
    let four = |x: &Array3<f64>| x.view().insert_axis(Axis(0)).to_owned();
    alone.append(&four(&prompt), &four(&prompt)).expect("valid");
    let expected = contiguous_step(&mut alone, &q, &x, &x);
    assert!(diff(&child_out, &expected) < 1e-14);
    // the parent now writes into its own second block, in place
    let y = token(1, 4);
    cache
        .attend(parent, &random3(heads, 1, d, 5), &y, &y)
        .expect("room");
    assert_eq!(cache.block_table(parent).expect("live"), &p[..]);
    // freeing one keeps the shared block for the other
    let free = cache.free_blocks();
    cache.free(parent).expect("live");
    assert_eq!(cache.free_blocks(), free + 1);
    assert_eq!(
        cache.keys(child).expect("live").slice(s![.., ..6, ..]),
        prompt
    );
    cache.free(child).expect("live");
    assert_eq!(cache.free_blocks(), 6);
}

#[test]
fn a_failed_step_writes_nothing() {
    let (kv, d) = (1, 4);
    let mut cache = PagedKvCache::<i8>::new(2, 2, kv, d, d).expect("valid");
    let seq = cache.add_sequence();
    let x = Array3::from_elem((kv, 3, d), 0.5_f32);
    cache.append(seq, &x, &x).expect("room");
    let before = (
        cache.len(seq).expect("live"),
        cache.free_blocks(),
        cache.keys(seq).expect("live"),
    );
    let after = |c: &PagedKvCache<i8>| {
        (
            c.len(seq).expect("live"),
            c.free_blocks(),
            c.keys(seq).expect("live"),
        )
    };
    let q = Array3::from_elem((2, 2, d), 1.0_f32);
    let two = Array3::from_elem((kv, 2, d), 0.25_f32);
    // a full pool: 5 positions need 3 blocks of 2
    let err = cache.attend(seq, &q, &two, &two).unwrap_err();
    assert!(matches!(err, attn::Error::Cache { .. }), "{err}");
    assert!(err.to_string().contains("free blocks"), "{err}");
    assert_eq!(after(&cache), before);
    // values int8 cannot hold
    let mut bad = Array3::from_elem((kv, 1, d), 0.5_f32);
    for x in [f32::NAN, f32::INFINITY] {
        bad[[0, 0, 1]] = x;
        let err = cache
            .attend(
                seq,
                &q.slice(s![.., ..1, ..]),
                &bad,
                &two.slice(s![.., ..1, ..]),
            )
            .unwrap_err();
        assert!(
            matches!(err, attn::Error::Cache { .. }) && err.to_string().contains("key"),
            "{err}"
        );
        assert_eq!(after(&cache), before);
    }
    // shapes, scales
    let one = Array3::from_elem((kv, 1, d), 0.5_f32);
    assert!(
        cache
            .attend(seq, &Array3::zeros((2, 1, d + 1)), &one, &one)
            .is_err()
    );
    assert!(
        cache
            .attend(
                seq,
                &q.slice(s![.., ..1, ..]),
                &Array3::zeros((2, 1, d)),
                &one
            )
            .is_err()
    );
    assert!(
        cache
            .attend(
                seq,
                &q.slice(s![.., ..1, ..]),
                &one,
                &Array3::zeros((kv, 2, d))
            )
            .is_err()
    );
    let mut zero_scale = cache.clone().with_scale(0.0);
    assert!(matches!(
        zero_scale.attend(seq, &q.slice(s![.., ..1, ..]), &one, &one),
        Err(attn::Error::InvalidScale { .. })
    ));
    assert_eq!(after(&zero_scale), before);
    assert_eq!(after(&cache), before);
    // freed and foreign sequences
    let other = cache.add_sequence();
    cache.free(other).expect("live");
    let err = cache.attend(other, &q, &two, &two).unwrap_err();
    assert!(err.to_string().contains("freed"), "{err}");
    let reused = cache.add_sequence(); // the freed slot, a new generation
    assert!(cache.len(other).is_err());
    assert_eq!(cache.len(reused).expect("live"), 0);
    let mut elsewhere = PagedKvCache::<i8>::new(2, 2, kv, d, d).expect("valid");
    let foreign: SequenceId = elsewhere.add_sequence();
    assert!(
        cache
            .len(foreign)
            .unwrap_err()
            .to_string()
            .contains("another cache")
    );
    assert_eq!(after(&cache), before);
    // sizes that make no pool
    assert!(PagedKvCache::<f32>::new(usize::MAX, 2, 2, 2, 2).is_err());
    assert!(PagedKvCache::<f32>::new(2, 0, 2, 2, 2).is_err());
    assert!(
        PagedKvCache::<f32>::new(2, 2, 2, 2, 2)
            .expect("valid")
            .with_window(0)
            .is_err()
    );
}

#[test]
fn non_finite_queries_of_an_int8_cache_take_the_reference_path() {
    let (heads, kv, d) = (2, 2, 64);
    let mut int8 = PagedKvCache::<i8>::new(8, 4, kv, d, d).expect("valid");
    let seq = int8.add_sequence();
    let x = random3(kv, 5, d, 1).mapv(|x| x as f32);
    int8.append(seq, &x, &x).expect("room");
    for bad in [f32::INFINITY, f32::NAN] {
        let mut q = random3(heads, 1, d, 3).mapv(|x| x as f32);
        q[[1, 0, 2]] = bad;
        let keep = int8.clone();
        let y = random3(kv, 1, d, 4).mapv(|x| x as f32);
        let (out, paths) = kernel_paths(|| int8.attend(seq, &q, &y, &y).expect("valid"));
        assert_eq!((paths.direct, paths.reference), (1, 1), "{bad}: {paths:?}");
        // the reference path over the stored keys: NaN where a score is
        let stored = (
            int8.keys(seq).expect("live"),
            int8.values(seq).expect("live"),
        );
        assert!(out.slice(s![0, .., ..]).iter().all(|x| x.is_finite()));
        assert!(
            out.slice(s![1, .., ..]).iter().all(|x| x.is_nan()),
            "{bad}: {out:?}"
        );
        assert_eq!(stored.0.dim().1, 6);
        int8 = keep;
    }
}

#[test]
fn non_finite_queries_take_the_reference_path() {
    // two key/value heads: the bad query head's group alone leaves the direct path
    let (heads, kv, d) = (2, 2, 8);
    let mut paged = PagedKvCache::<f32>::new(8, 4, kv, d, d).expect("valid");
    let seq = paged.add_sequence();
    let mut contiguous = KvCache::<f32>::new(1, kv, d, d);
    let x = random3(kv, 9, d, 1).mapv(|x| x as f32);
    let q = random3(heads, 9, d, 2).mapv(|x| x as f32);
    paged.attend(seq, &q, &x, &x).expect("valid");
    contiguous_step(&mut contiguous, &q, &x, &x);
    let mut q = random3(heads, 1, d, 3).mapv(|x| x as f32);
    q[[1, 0, 2]] = f32::INFINITY;
    let y = random3(kv, 1, d, 4).mapv(|x| x as f32);
    let (out, paths) = kernel_paths(|| paged.attend(seq, &q, &y, &y).expect("valid"));
    let expected = contiguous_step(&mut contiguous, &q, &y, &y);
    assert_eq!((paths.direct, paths.reference), (1, 1), "{paths:?}");
    for (a, b) in out.iter().zip(&expected) {
        assert!(
            a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() < 1e-6,
            "{a} vs {b}"
        );
    }
}

/// A Llama-like layer: grouped queries, RoPE, causal within `causality`.
fn llama(causality: Causality) -> MultiHeadAttention<f64> {
    MultiHeadConfig::new(16, 4)
        .with_kv_heads(2)
        .with_causality(causality)
        .with_positions(PositionEncoding::Rope(Rope::new(10_000.0)))
        .random::<f64>(Init::XavierUniform, 3)
        .expect("valid")
}

#[test]
fn the_layer_decodes_sequences_of_different_lengths_as_each_alone() {
    for causality in [Causality::Causal, Causality::SlidingWindow(6)] {
        let mha = llama(causality);
        let lengths = [5, 17, 1, 9];
        let mut cache = PagedKvCache::<f64>::new(64, 4, 2, 4, 4).expect("valid");
        let ids: Vec<_> = lengths.iter().map(|_| cache.add_sequence()).collect();
        let mut alone: Vec<KvCache<f64>> = lengths.iter().map(|_| mha.new_cache(1)).collect();
        let mut offsets = vec![0];
        for &l in &lengths {
            offsets.push(offsets.last().unwrap() + l);
        }
        let x: Array2<f64> = pseudo_random(&[offsets[4], 16], 1)
            .into_dimensionality()
            .expect("2-D");
        let out = mha
            .forward_paged(&x, &offsets, &mut cache, &ids)
            .expect("valid");
        // then three decoding steps of every sequence, one token each
        let mut rounds = vec![(x, offsets.clone(), out)];
        for round in 0..3 {
            let x: Array2<f64> = pseudo_random(&[4, 16], 10 + round)
                .into_dimensionality()
                .expect("2-D");
            let (out, paths) = kernel_paths(|| {
                mha.forward_paged(&x, &[0, 1, 2, 3, 4], &mut cache, &ids)
                    .expect("valid")
            });
            assert_eq!(paths.direct, 4 * 4, "{paths:?}");
            rounds.push((x, vec![0, 1, 2, 3, 4], out));
        }
        for (x, offsets, out) in &rounds {
            for (i, w) in offsets.windows(2).enumerate() {
                let tokens = x.slice(s![w[0]..w[1], ..]).insert_axis(Axis(0));
                let expected = mha.forward_cached(&tokens, &mut alone[i]).expect("valid");
                let e = diff(
                    out.slice(s![w[0]..w[1], ..]),
                    expected.index_axis(Axis(0), 0),
                );
                assert!(e < 1e-13, "{causality:?} sequence {i}: {e:e}");
            }
        }
    }
}

#[test]
fn a_layer_call_that_fails_writes_nothing() {
    let mut cache = PagedKvCache::<f32>::new(3, 4, 2, 4, 4).expect("valid");
    let mha = MultiHeadConfig::new(16, 4)
        .with_kv_heads(2)
        .random::<f32>(Init::XavierUniform, 3)
        .expect("valid");
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    let x = Array2::<f32>::ones((10, 16));
    // 5 + 5 positions fit 3 blocks of 4 one by one, not together
    let err = mha
        .forward_paged(&x, &[0, 5, 10], &mut cache, &[a, b])
        .unwrap_err();
    assert!(matches!(err, attn::Error::Cache { .. }), "{err}");
    assert_eq!(
        (
            cache.len(a).unwrap(),
            cache.len(b).unwrap(),
            cache.free_blocks()
        ),
        (0, 0, 3)
    );
    let err = mha
        .forward_paged(&x, &[0, 5, 10], &mut cache, &[a, a])
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    assert!(
        mha.forward_paged(&x, &[0, 5, 8], &mut cache, &[a, b])
            .is_err()
    );
    assert!(
        mha.forward_paged(&x, &[0, 10], &mut cache, &[a, b])
            .is_err()
    );
    let c = cache.add_sequence();
    assert!(
        mha.forward_paged(&x, &[0, 6, 5, 10], &mut cache, &[a, b, c])
            .is_err()
    );
    let mut wrong = PagedKvCache::<f32>::new(3, 4, 1, 4, 4).expect("valid");
    let w = wrong.add_sequence();
    assert!(mha.forward_paged(&x, &[0, 10], &mut wrong, &[w]).is_err());
    assert_eq!(cache.free_blocks(), 3);
}
