//! The fused kernels against the reference path: FlashAttention's accuracy rule,
//! masks, block edges, threads, and inputs that must take the reference path.

use crate::common;

use attn::{
    Element, Kernel, KernelPaths, Mask, Parallelism, ScaledDotProduct, Storage, kernel_paths,
};
use common::{
    assert_close, every_mask_kind, expected_arch, max_abs_diff, pseudo_random, random2, random4,
};
use half::{bf16, f16};
use ndarray::{Array2, Array4, s};

/// A path through the kernel, as [`kernel_paths`] counts it.
#[derive(Debug, Clone, Copy)]
enum Path {
    Tiled,
    Direct,
    Rowwise,
    Reference,
}

/// Runs `f`, asserting that `path` computed all of its `heads` heads (and the
/// fused paths ran with [`expected_arch`]).
fn served_by<R>(path: Path, heads: usize, f: impl FnOnce() -> R) -> R {
    let (result, paths) = kernel_paths(f);
    let mut expected = KernelPaths::default();
    match path {
        Path::Tiled => expected.tiled = heads,
        Path::Direct => expected.direct = heads,
        Path::Rowwise => expected.rowwise = heads,
        Path::Reference => expected.reference = heads,
    }
    expected.arch = paths.arch;
    assert_eq!(
        paths, expected,
        "expected {heads} heads on the {path:?} path"
    );
    if matches!(path, Path::Tiled | Path::Direct) {
        assert_eq!(paths.arch, Some(expected_arch(false)));
    }
    result
}

#[test]
fn the_kernels_run_with_the_instruction_set_the_environment_allows() {
    let x = Array2::<f32>::ones((256, 64));
    let (_, paths) = kernel_paths(|| attn::scaled_dot_product(&x, &x, &x));
    assert_eq!(paths.arch, Some(expected_arch(false)));
    println!("kernel instruction set: {:?}", expected_arch(false));
}

/// A call in each storage type reaches its kernel through one plan: many query
/// rows the tiled kernel (bf16 keys by bf16 dot products where the CPU and
/// `ATTN_KERNEL_ARCH` allow them), few the direct path, each with the
/// instruction set the environment allows; and every answer is that of the
/// reference path over the same values.
#[test]
fn every_storage_type_reaches_its_kernel_through_one_plan() {
    fn check<S: Storage>(name: &str, bf16_keys: bool) {
        for (l, path, arch) in [
            (64, Path::Tiled, expected_arch(bf16_keys)),
            (2, Path::Direct, expected_arch(false)),
        ] {
            let stored = |x: f64| S::from_compute(<S::Compute as Element>::from_f64(x));
            let q = pseudo_random(&[1, 3, l, 64], 7).mapv(stored);
            let kv = pseudo_random(&[1, 3, 300, 64], 8).mapv(stored);
            let q = q.into_dimensionality().expect("4-D");
            let kv = kv.into_dimensionality().expect("4-D");
            let attention = ScaledDotProduct::<S>::new();
            let (out, paths) = kernel_paths(|| attention.forward_batched(&q, &kv, &kv));
            let out = out.expect("valid");
            assert_eq!(paths.arch, Some(arch), "{name}, L = {l}");
            let heads = match path {
                Path::Tiled => paths.tiled,
                _ => paths.direct,
            };
            assert_eq!(
                (heads, paths.reference),
                (3, 0),
                "{name}, L = {l}: {paths:?}"
            );
            let plain = attention.with_kernel(Kernel::Plain);
            let want = plain.forward_batched(&q, &kv, &kv).expect("valid");
            let tolerance = if std::mem::size_of::<S>() == 2 {
                1e-2
            } else {
                1e-5
            };
            let diff = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (as_f64(a.to_compute()) - as_f64(b.to_compute())).abs())
                .fold(0.0_f64, f64::max);
            assert!(diff <= tolerance, "{name}, L = {l}: {diff}");
        }
    }
    check::<f32>("f32", false);
    check::<f64>("f64", false);
    check::<bf16>("bf16", true);
    check::<f16>("f16", false);
}

/// `x` as an f64 (exactly).
fn as_f64<E: Element>(x: E) -> f64 {
    x.to_f64().expect("f32 and f64 convert")
}

fn f32_of(x: &Array2<f64>) -> Array2<f32> {
    x.mapv(|a| a as f32)
}

fn f64_of(x: &Array2<f32>) -> Array2<f64> {
    x.mapv(f64::from)
}

/// Attention through `kernel` with every one of `masks`.
fn attention<'m, A: attn::Element>(
    kernel: Kernel,
    masks: &[Mask<'m, A>],
) -> ScaledDotProduct<'m, A> {
    masks.iter().cloned().fold(
        ScaledDotProduct::new().with_kernel(kernel),
        ScaledDotProduct::with_mask,
    )
}

/// FlashAttention's criterion: the fused f32 output's error against an f64
/// reference is at most twice the plain f32 path's (plus one f32 rounding of the
/// output, for cases the plain path gets exactly right).
fn assert_accuracy(
    l: usize,
    s: usize,
    d: usize,
    masks: &[Mask<'_, f32>],
    masks64: &[Mask<'_, f64>],
    seed: u64,
) {
    let (q, k, v) = (
        random2(l, d, seed),
        random2(s, d, seed + 1),
        random2(s, d.min(48), seed + 2),
    );
    let (q32, k32, v32) = (f32_of(&q), f32_of(&k), f32_of(&v));
    let with = |kernel| attention(kernel, masks);
    let reference = attention(Kernel::Plain, masks64)
        .forward(&f64_of(&q32), &f64_of(&k32), &f64_of(&v32))
        .expect("valid");
    let plain = with(Kernel::Plain)
        .forward(&q32, &k32, &v32)
        .expect("valid");
    let fused = served_by(Path::Tiled, 1, || {
        with(Kernel::Fused).forward(&q32, &k32, &v32)
    })
    .expect("valid");
    let (auto, paths) = kernel_paths(|| with(Kernel::Auto).forward(&q32, &k32, &v32));
    let auto = auto.expect("valid");
    assert_eq!(
        (paths.reference, paths.tiled + paths.direct + paths.rowwise),
        (0, 1),
        "Auto takes a fused path: {paths:?}"
    );
    let e_plain = max_abs_diff(&f64_of(&plain), &reference);
    let floor = f32::EPSILON as f64 * reference.iter().fold(1.0_f64, |m, x| m.max(x.abs()));
    for (name, out) in [("fused", fused), ("auto", auto)] {
        let e = max_abs_diff(&f64_of(&out), &reference);
        assert!(
            e <= 2.0 * e_plain + floor,
            "L={l} S={s} d={d}: {name} error {e:e} > 2 × plain error {e_plain:e}"
        );
    }
}

#[test]
fn flash_attention_accuracy_rule_over_sizes() {
    let sizes = [1usize, 3, 97, 113, 1023, 1025, 4096];
    let dims = [1usize, 3, 64, 80, 128];
    for (n, &l) in sizes.iter().enumerate() {
        for (m, &d) in dims.iter().enumerate() {
            let s = sizes[(n + m + 1) % sizes.len()]; // L ≠ S
            if l * s * d > 300_000_000 {
                continue; // the largest products are covered at smaller d
            }
            assert_accuracy(l, s, d, &[], &[], (n * 10 + m) as u64);
        }
    }
}

#[test]
fn accuracy_rule_with_masks() {
    for (l, s) in [(200, 300), (300, 200), (97, 97), (1, 500)] {
        let keep = Array2::from_shape_fn((l, s), |(i, j)| (i * 3 + j * 7) % 5 != 0);
        let bias = random2(l, s, 7);
        let bias32 = f32_of(&bias);
        assert_accuracy(l, s, 64, &[Mask::CausalTopLeft], &[Mask::CausalTopLeft], 1);
        assert_accuracy(
            l,
            s,
            64,
            &[Mask::CausalBottomRight],
            &[Mask::CausalBottomRight],
            2,
        );
        assert_accuracy(l, s, 32, &[Mask::keep(&keep)], &[Mask::keep(&keep)], 3);
        assert_accuracy(l, s, 32, &[Mask::bias(&bias32)], &[Mask::bias(&bias)], 4);
        assert_accuracy(
            l,
            s,
            16,
            &[
                Mask::CausalBottomRight,
                Mask::keep(&keep),
                Mask::bias(&bias32),
            ],
            &[
                Mask::CausalBottomRight,
                Mask::keep(&keep),
                Mask::bias(&bias),
            ],
            5,
        );
    }
}

/// Fused output in f64 equals the reference path to rounding, at block edges.
#[test]
fn f64_fused_equals_reference_at_block_edges() {
    for l in [1, 5, 6, 7, 95, 96, 97, 193] {
        for s in [1, 127, 128, 129, 300] {
            let (q, k, v) = (random2(l, 24, 1), random2(s, 24, 2), random2(s, 17, 3));
            let causal = ScaledDotProduct::new().with_mask(Mask::CausalBottomRight);
            let plain = causal
                .clone()
                .with_kernel(Kernel::Plain)
                .forward(&q, &k, &v)
                .expect("valid");
            let fused = served_by(Path::Tiled, 1, || {
                causal.with_kernel(Kernel::Fused).forward(&q, &k, &v)
            })
            .expect("valid");
            let e = max_abs_diff(&plain, &fused);
            assert!(e < 1e-14, "L={l} S={s}: {e:e}");
        }
    }
}

#[test]
fn fully_masked_rows_are_zero_on_every_path() {
    let (l, s) = (150, 260);
    let (q, k, v) = (random2(l, 8, 4), random2(s, 8, 5), random2(s, 8, 6));
    let mut keep = Array2::from_elem((l, s), true);
    keep.row_mut(0).fill(false);
    keep.row_mut(140).fill(false);
    let mut bias = Array2::zeros((l, s));
    bias.row_mut(70).fill(f64::NEG_INFINITY);
    for (kernel, path) in [
        (Kernel::Plain, Path::Reference),
        (Kernel::Fused, Path::Tiled),
        (Kernel::Auto, Path::Tiled),
    ] {
        let out = served_by(path, 1, || {
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_mask(Mask::keep(&keep))
                .with_mask(Mask::bias(&bias))
                .forward(&q, &k, &v)
        })
        .expect("valid");
        for row in [0, 70, 140] {
            assert!(
                out.row(row).iter().all(|&x| x == 0.0),
                "{kernel:?} row {row}"
            );
        }
        assert!(out.iter().all(|x| x.is_finite()));
    }
    // L > S bottom-right: the first L − S queries see nothing
    let short = random2(40, 8, 7);
    let out = served_by(Path::Tiled, 1, || {
        ScaledDotProduct::new()
            .with_kernel(Kernel::Fused)
            .with_mask(Mask::CausalBottomRight)
            .forward(&random2(100, 8, 8), &short, &short)
    })
    .expect("valid");
    assert!(out.slice(s![..60, ..]).iter().all(|&x| x == 0.0));
    assert!(out.slice(s![60.., ..]).iter().all(|&x| x != 0.0));
}

#[test]
fn huge_negative_bias_is_uniform_not_masked() {
    let (q, k, v) = (random2(130, 8, 9), random2(140, 8, 10), random2(140, 4, 11));
    let (q, k, v) = (f32_of(&q), f32_of(&k), f32_of(&v));
    let bias = Array2::from_elem((130, 140), f32::MIN);
    // a bias this large could overflow a running sum: the fused kernel hands it over
    for kernel in [Kernel::Plain, Kernel::Fused] {
        let out = served_by(Path::Reference, 1, || {
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_mask(Mask::bias(&bias))
                .forward(&q, &k, &v)
        })
        .expect("valid");
        let mean = v.mean_axis(ndarray::Axis(0)).expect("non-empty");
        for row in out.rows() {
            for (x, m) in row.iter().zip(mean.iter()) {
                assert!((x - m).abs() < 1e-5, "{kernel:?}: {x} vs mean {m}");
            }
        }
    }
}

#[test]
fn non_finite_inputs_take_the_reference_path() {
    let (mut q, k, mut v) = (
        random2(200, 16, 12),
        random2(300, 16, 13),
        random2(300, 8, 14),
    );
    q[[5, 3]] = f64::NAN;
    v[[7, 2]] = f64::INFINITY;
    let keep = Array2::from_shape_fn((200, 300), |(_, j)| j != 7);
    let masked = |kernel| {
        served_by(Path::Reference, 1, || {
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_mask(Mask::keep(&keep))
                .forward(&q, &k, &v)
        })
        .expect("valid")
    };
    let (plain, fused) = (masked(Kernel::Plain), masked(Kernel::Fused));
    assert!(fused.row(5).iter().all(|x| x.is_nan()));
    assert!(
        fused
            .iter()
            .enumerate()
            .all(|(i, x)| i / 8 == 5 || x.is_finite())
    );
    // NaN rows in both: compared with NaN equal to NaN
    let e = max_abs_diff(&plain, &fused);
    assert!(e < 1e-14, "{e:e}");
    // scores that would overflow f32 inside the kernel
    let big = f32_of(&random2(150, 4, 15)) * 1e19;
    let out = served_by(Path::Reference, 1, || {
        ScaledDotProduct::new().with_kernel(Kernel::Fused).forward(
            &big,
            &big,
            &f32_of(&random2(150, 4, 16)),
        )
    })
    .expect("valid");
    let plain = ScaledDotProduct::new()
        .with_kernel(Kernel::Plain)
        .forward(&big, &big, &f32_of(&random2(150, 4, 16)))
        .expect("valid");
    assert!(
        out.iter().any(|x| x.is_nan()),
        "the math overflows: NaN, as in the reference"
    );
    assert_eq!(max_abs_diff(&f64_of(&out), &f64_of(&plain)), 0.0);
}

#[test]
fn threads_do_not_change_a_bit() {
    // 300 query rows take the tiled kernel, 3 the direct path (its 5000 keys in parts)
    for (l, s, path) in [(300, 500, Path::Tiled), (3, 5000, Path::Direct)] {
        threads_do_not_change_a_bit_at(l, s, path);
    }
}

fn threads_do_not_change_a_bit_at(l: usize, s: usize, path: Path) {
    let q = pseudo_random(&[2, 4, l, 64], 17).mapv(|x| x as f32);
    let kv = pseudo_random(&[2, 2, s, 64], 18).mapv(|x| x as f32);
    let (q, kv): (Array4<f32>, Array4<f32>) = (
        q.into_dimensionality().expect("4-D"),
        kv.into_dimensionality().expect("4-D"),
    );
    let run = |parallelism| {
        served_by(path, 8, || {
            ScaledDotProduct::new()
                .with_parallelism(parallelism)
                .with_mask(Mask::CausalBottomRight)
                .forward_batched(&q, &kv, &kv)
        })
        .expect("valid")
    };
    let sequential = run(Parallelism::Sequential);
    assert_eq!(sequential, run(Parallelism::Rayon));
    assert_eq!(sequential, run(Parallelism::Rayon), "repeated calls agree");
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    assert_eq!(sequential, two.install(|| run(Parallelism::Rayon)));
}

/// A NaN or a query whose scores could overflow in the last block of a head's
/// queries (the first blocks fine) sends the whole head to the reference path,
/// whose numbers it gives; the same head without it is fused.
#[test]
fn a_bad_query_in_a_later_block_takes_the_head_to_the_reference_path() {
    let (k, v) = (random2(300, 16, 13), random2(300, 8, 14));
    let run = |q: &Array2<f64>, kernel| {
        ScaledDotProduct::new()
            .with_kernel(kernel)
            .forward(q, &k, &v)
            .expect("valid")
    };
    let q = random2(200, 16, 12);
    served_by(Path::Tiled, 1, || run(&q, Kernel::Fused));
    for bad in [f64::NAN, 1e308] {
        let mut q = q.clone();
        q[[190, 3]] = bad;
        let fused = served_by(Path::Reference, 1, || run(&q, Kernel::Fused));
        let e = max_abs_diff(&run(&q, Kernel::Plain), &fused);
        assert!(e < 1e-14, "{bad}: {e:e}");
        assert!(fused.row(0).iter().all(|x| x.is_finite()), "{bad}");
    }
}

/// A thread keeps the tiled kernel's working memory (packed keys and values,
/// block scratch) from call to call: a call after a larger one, of other
/// widths, gives the bits it gives on a thread that made no call before.
#[test]
fn memory_kept_from_a_larger_call_does_not_change_a_bit() {
    fn check<S: Storage>() {
        let stored = |x: f64| S::from_compute(<S::Compute as Element>::from_f64(x));
        let x = |shape: [usize; 4], seed| {
            let x: Array4<S> = (pseudo_random(&shape, seed).mapv(stored))
                .into_dimensionality()
                .expect("4-D");
            x
        };
        // odd widths and part panels after whole ones
        let (big_q, big_kv) = (x([1, 2, 200, 96], 21), x([1, 2, 300, 96], 22));
        let (q, kv) = (x([1, 2, 70, 33], 23), x([1, 2, 101, 33], 24));
        let attention = ScaledDotProduct::new().with_parallelism(Parallelism::Sequential);
        let run = |q: &Array4<S>, kv: &Array4<S>, fused: usize| {
            let (out, paths) = kernel_paths(|| attention.forward_batched(q, kv, kv));
            assert_eq!((paths.tiled, paths.reference), (fused, 2 - fused));
            out.expect("valid")
        };
        let first = std::thread::scope(|scope| {
            scope
                .spawn(|| run(&q, &kv, 2))
                .join()
                .expect("a fresh thread")
        });
        run(&big_q, &big_kv, 2);
        // packed before the pre-check sends its heads to the reference path:
        // infinities in the memory the next call packs into
        run(&big_q, &big_kv.mapv(|_| stored(f64::INFINITY)), 0);
        assert_eq!(run(&q, &kv, 2), first);
    }
    check::<f32>();
    check::<f64>();
    check::<bf16>();
}

#[test]
fn batched_grouped_query_fused_equals_reference() {
    let q: Array4<f64> = pseudo_random(&[2, 6, 130, 32], 19)
        .into_dimensionality()
        .expect("4-D");
    let k: Array4<f64> = pseudo_random(&[2, 3, 150, 32], 20)
        .into_dimensionality()
        .expect("4-D");
    let v: Array4<f64> = pseudo_random(&[2, 3, 150, 20], 21)
        .into_dimensionality()
        .expect("4-D");
    let padding = Array4::from_shape_fn((2, 1, 1, 150), |(b, _, _, j)| j < 150 - 40 * b);
    let run = |kernel, path| {
        served_by(path, 12, || {
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_mask(Mask::keep(&padding))
                .with_mask(Mask::CausalTopLeft)
                .forward_batched(&q, &k, &v)
        })
        .expect("valid")
    };
    let plain = run(Kernel::Plain, Path::Reference);
    assert_close(&plain, &run(Kernel::Fused, Path::Tiled), 1e-14);
}

#[test]
fn strided_inputs_on_the_fused_path() {
    let big = random2(400, 130, 22);
    let q = big.slice(s![..;2, ..64]);
    let k = big.t();
    let k = k.slice(s![..;-1, 100..300]).reversed_axes(); // (200, 130) reversed rows
    let v = big.slice(s![100..300;1, 1..;3]);
    let fused = served_by(Path::Tiled, 1, || {
        ScaledDotProduct::new()
            .with_kernel(Kernel::Fused)
            .forward(&q, &k.slice(s![.., ..64]), &v)
    })
    .expect("valid");
    let owned = ScaledDotProduct::new()
        .with_kernel(Kernel::Fused)
        .forward(
            &q.to_owned(),
            &k.slice(s![.., ..64]).to_owned(),
            &v.to_owned(),
        )
        .expect("valid");
    assert_eq!(fused, owned);
}

/// Small problems go row by row: equal to the reference path, with every mask,
/// widths below, at and past its four-lane dot products and eight-column sums.
#[test]
fn row_by_row_path_equals_reference() {
    for (l, s, d, d_v) in [
        (1, 1, 1, 1),
        (3, 3, 4, 3),
        (5, 7, 8, 13),
        (7, 5, 3, 8),
        (4, 9, 13, 17),
        (12, 20, 16, 9),
    ] {
        let (q, k, v) = (random2(l, d, 30), random2(s, d, 31), random2(s, d_v, 32));
        let keep = Array2::from_shape_fn((l, s), |(i, j)| (i + 2 * j) % 3 != 1);
        let bias = random2(l, s, 33);
        let masks = [
            vec![],
            vec![Mask::CausalTopLeft],
            vec![Mask::CausalBottomRight, Mask::keep(&keep)],
            vec![Mask::bias(&bias), Mask::keep(&keep)],
        ];
        for m in &masks {
            let with = |kernel| attention(kernel, m);
            let auto = served_by(Path::Rowwise, 1, || with(Kernel::Auto).forward(&q, &k, &v))
                .expect("valid");
            let plain = with(Kernel::Plain).forward(&q, &k, &v).expect("valid");
            let e = max_abs_diff(&auto, &plain);
            assert!(e < 1e-14, "L={l} S={s} d={d}: {e:e}");
        }
    }
}

/// Row by row only while the work, each score's `exp` counted as 16
/// multiply-adds, is at most 16 384 (2 048 for heads of at most eight query
/// rows, which the direct path takes otherwise): on either side of it, the
/// reference's numbers.
#[test]
fn small_heads_leave_the_rows_once_their_scores_cost_more() {
    for (l, s, d, path) in [
        (16, 16, 16, Path::Rowwise), // 256 scores × (16 + 16 + 16)
        (16, 16, 32, Path::Tiled),   // 256 × (32 + 32 + 16) = 20 480
        (32, 32, 8, Path::Tiled),    // 1 024 scores × 32, work without exp 16 384
        (8, 64, 16, Path::Direct),   // few query rows
        (1, 14, 64, Path::Rowwise),  // 14 scores × (64 + 64 + 16) = 2 016
        (1, 15, 64, Path::Direct),   // 2 160
        (4, 10, 16, Path::Rowwise),  // 40 × 48 = 1 920
        (4, 11, 16, Path::Direct),   // 2 112
    ] {
        let (q, k, v) = (random2(l, d, 34), random2(s, d, 35), random2(s, d, 36));
        let auto =
            served_by(path, 1, || attention(Kernel::Auto, &[]).forward(&q, &k, &v)).expect("valid");
        let plain = attention(Kernel::Plain, &[])
            .forward(&q, &k, &v)
            .expect("valid");
        assert!(max_abs_diff(&auto, &plain) < 1e-13, "{l}×{s}×{d}");
    }
}

/// A few query rows against many keys (decoding) take the direct path: equal to
/// the reference in f64 with grouped-query heads, every mask kind, key counts
/// across its chunks and widths that are not a multiple of its lanes.
#[test]
fn decode_path_equals_reference() {
    let slopes = ndarray::Array1::from(attn::alibi_slopes(8));
    for (l, s, d, d_v) in [
        (1, 4097, 64, 64),
        (2, 300, 13, 40),
        (3, 1000, 8, 5),
        (8, 257, 70, 9),
    ] {
        let q = random4((2, 8, l, d), 40);
        let (k, v) = (random4((2, 2, s, d), 41), random4((2, 2, s, d_v), 42));
        let keep = Array2::from_shape_fn((l, s), |(i, j)| (i + 3 * j) % 7 != 2);
        let bias = random2(l, s, 43);
        let masks = every_mask_kind(&keep, &bias, &slopes, 100);
        for m in &masks {
            let with = |kernel| attention(kernel, m);
            let auto = served_by(Path::Direct, 16, || {
                with(Kernel::Auto).forward_batched(&q, &k, &v)
            })
            .expect("valid");
            let plain = with(Kernel::Plain)
                .forward_batched(&q, &k, &v)
                .expect("valid");
            let e = max_abs_diff(&auto, &plain);
            assert!(e < 1e-13, "L={l} S={s} d={d} masks {m:?}: {e:e}");
        }
    }
}

/// The direct path checks what it computed instead of scanning the inputs first:
/// non-finite inputs it reads, and overflowing scores, end on the reference path;
/// garbage at keys a mask excludes changes nothing.
#[test]
fn decode_path_non_finite_and_masked_garbage() {
    let (l, s, d) = (1, 600, 32);
    let q = random2(l, d, 50);
    let (k, v) = (random2(s, d, 51), random2(s, d, 52));
    let window = ScaledDotProduct::new().with_mask(Mask::SlidingWindow(64));
    let clean = served_by(Path::Direct, 1, || window.forward(&q, &k, &v)).expect("valid");
    let (mut k_bad, mut v_bad) = (k.clone(), v.clone());
    k_bad[[3, 5]] = f64::NAN;
    v_bad[[10, 0]] = f64::INFINITY;
    let windowed = served_by(Path::Direct, 1, || window.forward(&q, &k_bad, &v_bad));
    assert_eq!(windowed.expect("valid"), clean);
    for (k, v) in [(&k_bad, &v), (&k, &v_bad)] {
        let everywhere = ScaledDotProduct::new();
        // the direct path sees the non-finite result and hands the head over
        let auto = served_by(Path::Reference, 1, || everywhere.forward(&q, k, v)).expect("valid");
        let plain = everywhere
            .clone()
            .with_kernel(Kernel::Plain)
            .forward(&q, k, v)
            .expect("valid");
        assert_eq!(auto.mapv(f64::is_nan), plain.mapv(f64::is_nan));
        assert!(auto.iter().any(|x| !x.is_finite()));
    }
    // scores near 1e301: finite in f64, so the direct path keeps them
    let huge = k.mapv(|x| x * 1e300);
    let auto = served_by(Path::Direct, 1, || {
        ScaledDotProduct::new().forward(&q, &huge, &v)
    })
    .expect("valid");
    let plain = ScaledDotProduct::new()
        .with_kernel(Kernel::Plain)
        .forward(&q, &huge, &v)
        .expect("valid");
    assert_close(&auto, &plain, 1e-12);
    let kt = k.t().to_owned();
    let strided = ScaledDotProduct::new()
        .forward(&q, &kt.t(), &v)
        .expect("valid");
    assert!(
        max_abs_diff(
            &strided,
            &ScaledDotProduct::new().forward(&q, &k, &v).expect("valid")
        ) < 1e-15
    );
}
