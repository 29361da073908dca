//! Programmable attention: score modifications, keep predicates, block masks
//! and sinks, forward, against a slow loop reference written here.

use std::sync::atomic::{AtomicUsize, Ordering};

use attn::flex::{
    At, BlockMask, Documents, KeepMod, PrefixLm, RelativeBias, SoftCap, TreeMask, score_mod,
};
use attn::{Kernel, Mask, ScaledDotProduct, kernel_paths};
use ndarray::{Array1, Array2, Array4, ArrayView2, array, s};

use crate::common::{assert_close, random2, random4};

/// A keep predicate behind a pointer: every test's predicate is this one type,
/// so the kernels are compiled once for all of them (each closure type would
/// compile every kernel again: minutes of a cold `cargo test`).
pub type Keep<'a> = Box<dyn Fn(At) -> bool + Sync + 'a>;

/// The block mask of `keep` over `shape`, as a [`Keep`].
pub fn block_mask<'a>(
    keep: impl Fn(At) -> bool + Sync + 'a,
    shape: [usize; 4],
) -> BlockMask<Keep<'a>> {
    BlockMask::new(Box::new(keep) as Keep<'a>, shape).unwrap()
}

/// A function of a score behind a pointer.
pub type ScoreFunction = Box<dyn Fn(f64, At) -> f64 + Sync>;

/// A score function of f64 behind pointers, as [`Keep`] is.
pub type Scored = attn::flex::ScoreFn<ScoreFunction, ScoreFunction>;

/// A [`Scored`] of `f` and its derivative `df`.
pub fn scored(
    f: impl Fn(f64, At) -> f64 + Sync + 'static,
    df: impl Fn(f64, At) -> f64 + Sync + 'static,
) -> Scored {
    score_mod(Box::new(f) as ScoreFunction, Box::new(df) as ScoreFunction)
}

/// Attention of one head under a program, by loops: `f(q·k·scale)`, positions
/// `keep` drops at `−∞`, a sink logit in the denominator.
pub fn loops(
    q: ArrayView2<f64>,
    k: ArrayView2<f64>,
    v: ArrayView2<f64>,
    (b, h): (usize, usize),
    score: &dyn Fn(f64, At) -> f64,
    keep: &dyn Fn(At) -> bool,
    sink: Option<f64>,
) -> Array2<f64> {
    let (l, d) = q.dim();
    let s = k.nrows();
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Array2::zeros((l, v.ncols()));
    for i in 0..l {
        let at = |j| At {
            batch: b,
            head: h,
            query: i,
            key: j,
        };
        let scores: Vec<Option<f64>> = (0..s)
            .map(|j| keep(at(j)).then(|| score(q.row(i).dot(&k.row(j)) * scale, at(j))))
            .collect();
        let max = scores
            .iter()
            .flatten()
            .chain(sink.iter())
            .fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        if max == f64::NEG_INFINITY {
            continue;
        }
        let total: f64 = scores
            .iter()
            .flatten()
            .chain(sink.iter())
            .map(|x| (x - max).exp())
            .sum();
        for (j, score) in scores.iter().enumerate() {
            if let Some(x) = score {
                out.row_mut(i)
                    .scaled_add((x - max).exp() / total, &v.row(j));
            }
        }
    }
    out
}

/// Every head of a batched call by [`loops`].
fn loops4(
    q: &Array4<f64>,
    k: &Array4<f64>,
    v: &Array4<f64>,
    score: &dyn Fn(f64, At) -> f64,
    keep: &dyn Fn(At) -> bool,
    sinks: Option<&Array1<f64>>,
) -> Array4<f64> {
    let (batch, heads, l, _) = q.dim();
    let group = heads / k.dim().1;
    let mut out = Array4::zeros((batch, heads, l, v.dim().3));
    for b in 0..batch {
        for h in 0..heads {
            let head = loops(
                q.slice(s![b, h, .., ..]),
                k.slice(s![b, h / group, .., ..]),
                v.slice(s![b, h / group, .., ..]),
                (b, h),
                score,
                keep,
                sinks.map(|s| s[h]),
            );
            out.slice_mut(s![b, h, .., ..]).assign(&head);
        }
    }
    out
}

fn softcap(c: f64) -> impl Fn(f64, At) -> f64 {
    move |s, _| c * (s / c).tanh()
}

/// (L, S) pairs that reach the row-wise, direct and tiled paths.
const SIZES: [(usize, usize); 4] = [(3, 5), (4, 700), (70, 300), (130, 517)];

#[test]
fn soft_capping_matches_the_loops_on_every_path() {
    for (l, s) in SIZES {
        let (q, k, v) = (random2(l, 16, 1), random2(s, 16, 2) * 3.0, random2(s, 8, 3));
        let attention = ScaledDotProduct::new().with_score_mod(SoftCap::new(2.0));
        let (out, paths) = kernel_paths(|| attention.forward(&q, &k, &v));
        let want = loops(
            q.view(),
            k.view(),
            v.view(),
            (0, 0),
            &softcap(2.0),
            &|_| true,
            None,
        );
        assert_close(&out.unwrap(), &want, 1e-13);
        assert_eq!(paths.reference, 0, "({l}, {s}): {paths:?}");
    }
}

#[test]
fn sinks_match_the_loops_on_every_path_and_thread_count() {
    for (l, s) in SIZES {
        let shape = |n, d| (2, 4, n, d);
        let q = random4(shape(l, 16), 4);
        let (k, v) = (random4((2, 2, s, 16), 5), random4((2, 2, s, 8), 6));
        let sinks = array![0.5, -1.0, 2.0, 0.0];
        let want = loops4(&q, &k, &v, &|s, _| s, &|_| true, Some(&sinks));
        for parallelism in [attn::Parallelism::Sequential, attn::Parallelism::Rayon] {
            let attention = ScaledDotProduct::new()
                .with_parallelism(parallelism)
                .with_sinks(&sinks);
            let (out, paths) = kernel_paths(|| attention.forward(&q, &k, &v));
            assert_close(&out.unwrap(), &want, 1e-13);
            assert_eq!(paths.reference, 0, "({l}, {s}): {paths:?}");
        }
    }
}

#[test]
fn a_keep_predicate_matches_the_loops_with_other_masks() {
    // a causal predicate with a padding mask and a window: all three apply
    for (l, s) in SIZES {
        let (q, k, v) = (random2(l, 8, 7), random2(s, 8, 8), random2(s, 8, 9));
        let offset = s as i64 - l as i64;
        let causal = move |at: At| at.key as i64 <= at.query as i64 + offset;
        let blocks = block_mask(causal, [1, 1, l, s]);
        let padding = Array1::from_shape_fn(s, |j| j % 7 != 3);
        let attention = ScaledDotProduct::new()
            .with_mask(Mask::keep(&padding))
            .with_block_mask(&blocks);
        let (out, paths) = kernel_paths(|| attention.forward(&q, &k, &v));
        let keep = |at: At| causal(at) && padding[at.key];
        let want = loops(q.view(), k.view(), v.view(), (0, 0), &|s, _| s, &keep, None);
        assert_close(&out.unwrap(), &want, 1e-13);
        assert_eq!(paths.reference, 0);
    }
}

#[test]
fn relative_bias_per_head_matches_the_loops() {
    let (l, s) = (70, 90);
    let q = random4((1, 3, l, 8), 10);
    let (k, v) = (random4((1, 3, s, 8), 11), random4((1, 3, s, 4), 12));
    let table = random2(3, 9, 13);
    let bias = RelativeBias::per_head(table.clone());
    let attention = ScaledDotProduct::new().with_score_mod(bias);
    let score = |x: f64, at: At| {
        let offset = (at.key as i64 - at.query as i64).clamp(-4, 4);
        x + table[[at.head, (offset + 4) as usize]]
    };
    let want = loops4(&q, &k, &v, &score, &|_| true, None);
    assert_close(&attention.forward(&q, &k, &v).unwrap(), &want, 1e-13);
}

#[test]
fn alibi_written_as_a_score_function_equals_the_built_in() {
    let (q, k, v) = (
        random4((2, 4, 40, 16), 14),
        random4((2, 4, 60, 16), 15),
        random4((2, 4, 60, 16), 16),
    );
    let slopes = Array1::from(attn::alibi_slopes(4));
    let offset = 60 - 40;
    let alibi = {
        let slopes = slopes.clone();
        scored(
            move |s: f64, at: At| s - slopes[at.head] * (at.query + offset).abs_diff(at.key) as f64,
            |_, _| 1.0,
        )
    };
    let built_in = ScaledDotProduct::new().with_mask(Mask::Alibi(slopes.view()));
    let written = ScaledDotProduct::new().with_score_mod(alibi);
    let want = built_in.forward_batched(&q, &k, &v).unwrap();
    assert_close(&written.forward(&q, &k, &v).unwrap(), &want, 1e-13);
}

#[test]
fn documents_prefix_lm_and_trees_match_the_loops() {
    let docs = Documents::from_lengths(&[50, 1, 77, 200]).unwrap().causal();
    let n = docs.len();
    let (q, k, v) = (random2(n, 16, 17), random2(n, 16, 18), random2(n, 16, 19));
    let check = |keep: &dyn Fn(At) -> bool,
                 out: Array2<f64>,
                 q: &Array2<f64>,
                 k: &Array2<f64>,
                 v: &Array2<f64>| {
        let want = loops(q.view(), k.view(), v.view(), (0, 0), &|s, _| s, keep, None);
        assert_close(&out, &want, 1e-13);
    };
    let blocks = block_mask(|at| docs.keep(at), [1, 1, n, n]);
    let out = ScaledDotProduct::new()
        .with_block_mask(&blocks)
        .forward(&q, &k, &v)
        .unwrap();
    check(&|at| docs.keep(at), out, &q, &k, &v);

    let lm = PrefixLm::new(100);
    let blocks = block_mask(move |at| lm.keep(at), [1, 1, n, n]);
    let out = ScaledDotProduct::new()
        .with_block_mask(&blocks)
        .forward(&q, &k, &v)
        .unwrap();
    check(&|at| lm.keep(at), out, &q, &k, &v);

    // a tree of 7 drafts after 300 cached positions
    let tree = TreeMask::new(
        300,
        &[None, Some(0), Some(0), Some(1), Some(1), Some(2), None],
    )
    .unwrap();
    let (q, k, v) = (
        random2(7, 16, 20),
        random2(307, 16, 21),
        random2(307, 16, 22),
    );
    let blocks = block_mask(|at| tree.keep(at), [1, 1, 7, 307]);
    let out = ScaledDotProduct::new()
        .with_block_mask(&blocks)
        .forward(&q, &k, &v)
        .unwrap();
    check(&|at| tree.keep(at), out, &q, &k, &v);
}

#[test]
fn blocks_that_are_full_or_empty_never_call_the_predicate() {
    // documents of 768 tokens: whole query and key blocks of every kernel
    // (forward 48 × 256, backward 64 × 128), so no block is partial
    let docs = Documents::from_lengths(&[768, 768]).unwrap();
    let n = docs.len();
    let calls = AtomicUsize::new(0);
    let counted = |at: At| {
        calls.fetch_add(1, Ordering::Relaxed);
        docs.keep(at)
    };
    let blocks = block_mask(counted, [1, 1, n, n]);
    assert_eq!(blocks.counts()[1], 0, "no partial block");
    let built = calls.swap(0, Ordering::Relaxed);
    assert_eq!(built, n * n, "classifying calls it once per position");
    let (q, k, v) = (random2(n, 8, 23), random2(n, 8, 24), random2(n, 8, 25));
    let attention = ScaledDotProduct::new().with_block_mask(&blocks);
    let out = attention.forward(&q, &k, &v).unwrap();
    let d_out = random2(n, 8, 26);
    let grads = attention.backward(&q, &k, &v, &d_out).unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    // and empty blocks were skipped, not computed: each document alone
    for doc in [0..768, 768..1536] {
        let alone = attn::scaled_dot_product(
            &q.slice(s![doc.clone(), ..]),
            &k.slice(s![doc.clone(), ..]),
            &v.slice(s![doc.clone(), ..]),
        )
        .unwrap();
        assert_close(&out.slice(s![doc.clone(), ..]).to_owned(), &alone, 1e-13);
        let alone = ScaledDotProduct::new()
            .backward(
                &q.slice(s![doc.clone(), ..]),
                &k.slice(s![doc.clone(), ..]),
                &v.slice(s![doc.clone(), ..]),
                &d_out.slice(s![doc.clone(), ..]),
            )
            .unwrap();
        assert_close(
            &grads.q.slice(s![doc.clone(), ..]).to_owned(),
            &alone.q,
            1e-12,
        );
        assert_close(
            &grads.k.slice(s![doc.clone(), ..]).to_owned(),
            &alone.k,
            1e-12,
        );
    }
}

#[test]
fn half_precision_storage_runs_the_program() {
    use attn::half::bf16;
    let (l, s) = (64, 300);
    let (q, k, v) = (random2(l, 32, 27), random2(s, 32, 28), random2(s, 32, 29));
    let to = |x: &Array2<f64>| x.mapv(bf16::from_f64);
    let (qh, kh, vh) = (to(&q), to(&k), to(&v));
    let sinks = array![bf16::from_f32(0.25)];
    let capped = ScaledDotProduct::new()
        .with_sinks(&sinks)
        .with_score_mod(SoftCap::new(1.5_f32));
    // sinks alone leave the scores as they are: a kernel may scale them late
    let sunk = ScaledDotProduct::new().with_sinks(&sinks);
    let identity = |s: f64, _: At| s;
    for (l, qh) in [(l, qh.clone()), (2, qh.slice(s![..2, ..]).to_owned())] {
        let back = |x: &Array2<bf16>| x.mapv(f64::from);
        let want = |score: &dyn Fn(f64, At) -> f64| {
            loops(
                back(&qh).view(),
                back(&kh).view(),
                back(&vh).view(),
                (0, 0),
                score,
                &|_| true,
                Some(0.25),
            )
        };
        let out = capped.forward(&qh, &kh, &vh).unwrap().mapv(f64::from);
        assert_close(&out, &want(&softcap(1.5)), 2e-2);
        assert_eq!(out.nrows(), l);
        let out = sunk.forward(&qh, &kh, &vh).unwrap().mapv(f64::from);
        assert_close(&out, &want(&identity), 2e-2);
    }
}

#[test]
fn a_score_function_that_makes_nan_gives_the_reference_nan() {
    let (q, k, v) = (random2(60, 8, 30), random2(80, 8, 31), random2(80, 8, 32));
    let bad = scored(
        |s: f64, at: At| {
            if at.query == 5 && at.key == 7 {
                f64::NAN
            } else {
                s
            }
        },
        |_, _| 1.0,
    );
    let attention = ScaledDotProduct::new().with_score_mod(bad);
    let (out, paths) = kernel_paths(|| attention.forward(&q, &k, &v).unwrap());
    assert!(out.row(5).iter().all(|x| x.is_nan()));
    assert!(out.row(4).iter().all(|x| x.is_finite()));
    assert_eq!(paths.reference, 1, "{paths:?}");
}

#[test]
fn wrong_shapes_and_values_are_errors() {
    let x = Array2::<f64>::zeros((4, 8));
    let blocks = block_mask(|_| true, [1, 1, 4, 5]);
    let err = ScaledDotProduct::new()
        .with_block_mask(&blocks)
        .forward(&x, &x, &x)
        .unwrap_err();
    assert!(matches!(err, attn::Error::MaskShape { .. }), "{err}");
    let sinks = array![0.0, 1.0];
    let err = ScaledDotProduct::new()
        .with_sinks(&sinks)
        .forward(&x, &x, &x)
        .unwrap_err();
    assert!(err.to_string().contains("sinks"), "{err}");
    let sinks = array![f64::NAN];
    assert!(
        ScaledDotProduct::new()
            .with_sinks(&sinks)
            .forward(&x, &x, &x)
            .is_err()
    );
    assert!(
        ScaledDotProduct::new()
            .with_score_mod(SoftCap::new(0.0))
            .forward(&x, &x, &x)
            .is_err()
    );
    let even = RelativeBias::new(Array1::zeros(4));
    assert!(
        ScaledDotProduct::new()
            .with_score_mod(even)
            .forward(&x, &x, &x)
            .is_err()
    );
    assert!(TreeMask::new(0, &[Some(0)]).is_err());
    assert!(Documents::from_offsets(&[0, 3, 2]).is_err());
    assert!(BlockMask::new(Documents::from_lengths(&[2, 2]).unwrap(), [1, 1, 4, 5]).is_err());
    assert!(BlockMask::new(|_: At| true, [usize::MAX, 2, 16, 128]).is_err());
}

#[test]
fn kernels_agree_with_the_plain_path() {
    let (q, k, v) = (
        random4((2, 4, 90, 16), 33),
        random4((2, 2, 140, 16), 34),
        random4((2, 2, 140, 8), 35),
    );
    let sinks = array![0.1, 0.2, 0.3, 0.4];
    let blocks = block_mask(
        move |at: At| at.key < 140 && (at.query + 50 >= at.key),
        [1, 4, 90, 140],
    );
    let attention = |kernel| {
        ScaledDotProduct::new()
            .with_kernel(kernel)
            .with_mask(Mask::CausalBottomRight)
            .with_sinks(&sinks)
            .with_score_mod(SoftCap::new(1.0))
            .with_block_mask(&blocks)
    };
    let plain = attention(Kernel::Plain).forward(&q, &k, &v).unwrap();
    let fused = attention(Kernel::Fused).forward(&q, &k, &v).unwrap();
    assert_close(&fused, &plain, 1e-13);
}

#[test]
fn random_shapes_and_predicates_match_the_loops() {
    // sizes around every block edge (16, 48, 64, 256 rows or keys), grouped
    // heads, a predicate that drops whole blocks and single scores, a
    // soft-cap and sinks, f64 and f32
    let mut state = 0x9e37_79b9_u64;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) as usize % n
    };
    for case in 0..24 {
        let l = [1, 2, 7, 15, 16, 17, 47, 48, 49, 63, 65, 130][next(12)];
        let s = [1, 5, 63, 64, 65, 255, 257, 300][next(8)];
        let (kv, group) = (1 + next(2), 1 + next(3));
        let (d, dv) = ([1, 3, 8, 16][next(4)], [1, 4, 7][next(3)]);
        let q = random4((2, kv * group, l, d), case);
        let (k, v) = (
            random4((2, kv, s, d), case + 100),
            random4((2, kv, s, dv), case + 200),
        );
        let salt = next(1000);
        let keep = move |at: At| {
            let block = (at.query / 16 * 7 + at.key / 64 * 13 + at.head + salt) % 5;
            block != 0 && (block != 1 || !(at.query * 31 + at.key * 17 + salt).is_multiple_of(3))
        };
        let blocks = block_mask(keep, [1, kv * group, l, s]);
        let sinks = Array1::from_shape_fn(kv * group, |h| h as f64 * 0.3 - 0.2);
        let attention = ScaledDotProduct::new()
            .with_score_mod(SoftCap::new(1.5))
            .with_block_mask(&blocks)
            .with_sinks(&sinks);
        let want = loops4(&q, &k, &v, &softcap(1.5), &keep, Some(&sinks));
        let (got, paths) = kernel_paths(|| attention.forward(&q, &k, &v).unwrap());
        assert_eq!(paths.reference, 0, "case {case}: {paths:?}");
        assert_close(&got, &want, 1e-13);
        let f32s = |x: &Array4<f64>| x.mapv(|x| x as f32);
        let sinks32 = sinks.mapv(|x| x as f32);
        let attention32 = ScaledDotProduct::new()
            .with_score_mod(SoftCap::new(1.5_f32))
            .with_block_mask(&blocks)
            .with_sinks(&sinks32);
        let got32 = attention32
            .forward(&f32s(&q), &f32s(&k), &f32s(&v))
            .unwrap();
        assert_close(&got32.mapv(f64::from), &want, 2e-5);
        // and the backward, against the reference path's
        let d_out = random4((2, kv * group, l, dv), case + 300);
        let fused = attention.backward(&q, &k, &v, &d_out).unwrap();
        let reference = ScaledDotProduct::new()
            .with_kernel(Kernel::Plain)
            .with_score_mod(SoftCap::new(1.5))
            .with_block_mask(&blocks)
            .with_sinks(&sinks)
            .backward(&q, &k, &v, &d_out)
            .unwrap();
        for (got, want) in [
            (&fused.q, &reference.q),
            (&fused.k, &reference.k),
            (&fused.v, &reference.v),
        ] {
            assert_close(got, want, 1e-11);
        }
        assert_close(&fused.score, &reference.score, 1e-11);
        assert_close(
            fused.sinks.as_ref().unwrap(),
            reference.sinks.as_ref().unwrap(),
            1e-11,
        );
    }
}
