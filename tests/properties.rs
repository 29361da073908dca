//! Property tests: random shapes (0 and 1 included, and sizes past the kernel's
//! blocks), strides, masks and values (±∞ and NaN included), against the
//! reference path and the invariants of attention.
//!
//! The seed is fixed so CI is repeatable; `ATTN_PROPTEST_CASES=10000 cargo test
//! --test properties` runs many more cases locally.

use attn::{Kernel, Mask, ScaledDotProduct};
use ndarray::Array2;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("ATTN_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

/// A length: mostly small (0 and 1 included), sometimes past a kernel block.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..=9, 1 => 95usize..=140]
}

/// A value: mostly ordinary, sometimes huge, infinite or NaN.
fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        40 => -3.0..3.0f64,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => prop_oneof![Just(1e300), Just(-1e300), Just(f64::MIN)],
    ]
}

fn matrix(rows: usize, cols: usize, special: bool) -> impl Strategy<Value = Array2<f64>> {
    let values = if special {
        value().boxed()
    } else {
        (-3.0..3.0f64).boxed()
    };
    proptest::collection::vec(values, rows * cols)
        .prop_map(move |v| Array2::from_shape_vec((rows, cols), v).expect("rows × cols values"))
}

#[derive(Debug, Clone)]
struct Case {
    q: Array2<f64>,
    k: Array2<f64>,
    v: Array2<f64>,
    keep: Option<Array2<bool>>,
    bias: Option<Array2<f64>>,
    causal: u8,
    transpose_q: bool,
}

fn case(special: bool) -> impl Strategy<Value = Case> {
    (length(), length(), 1usize..=9, 0usize..=5).prop_flat_map(move |(l, s, d, dv)| {
        let keep =
            proptest::option::of(proptest::collection::vec(prop::bool::weighted(0.8), l * s));
        let bias = proptest::option::of(proptest::collection::vec(
            prop_oneof![9 => -2.0..2.0f64, 1 => Just(f64::NEG_INFINITY)],
            l * s,
        ));
        (
            matrix(l, d, special),
            matrix(s, d, special),
            matrix(s, dv, special),
            keep,
            bias,
            0u8..3,
            any::<bool>(),
        )
            .prop_map(move |(q, k, v, keep, bias, causal, transpose_q)| Case {
                q,
                k,
                v,
                keep: keep.map(|m| Array2::from_shape_vec((l, s), m).expect("l × s")),
                bias: bias.map(|m| Array2::from_shape_vec((l, s), m).expect("l × s")),
                causal,
                transpose_q,
            })
    })
}

fn attention<'a>(case: &'a Case, kernel: Kernel) -> ScaledDotProduct<'a, f64> {
    let mut attn = ScaledDotProduct::new().with_kernel(kernel);
    if let Some(keep) = &case.keep {
        attn = attn.with_mask(Mask::keep(keep));
    }
    if let Some(bias) = &case.bias {
        attn = attn.with_mask(Mask::bias(bias));
    }
    match case.causal {
        1 => attn.with_mask(Mask::CausalTopLeft),
        2 => attn.with_mask(Mask::CausalBottomRight),
        _ => attn,
    }
}

/// Equal up to `tolerance` relative to the row's scale, NaN where the other is NaN.
fn agree(a: &Array2<f64>, b: &Array2<f64>, tolerance: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.dim(), b.dim());
    for ((idx, x), y) in a.indexed_iter().zip(b.iter()) {
        let same =
            (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= tolerance * (1.0 + y.abs());
        prop_assert!(same, "at {:?}: {} vs {}", idx, x, y);
    }
    Ok(())
}

#[test]
fn fused_and_row_by_row_paths_equal_the_reference() {
    runner()
        .run(&case(true), |case| {
            let q_t = case.q.t().to_owned();
            let plain = attention(&case, Kernel::Plain)
                .forward(&case.q, &case.k, &case.v)
                .expect("valid shapes");
            for kernel in [Kernel::Fused, Kernel::Auto] {
                let attn = attention(&case, kernel);
                let out = if case.transpose_q {
                    attn.forward(&q_t.t(), &case.k, &case.v)
                } else {
                    attn.forward(&case.q, &case.k, &case.v)
                }
                .expect("valid shapes");
                agree(&out, &plain, 1e-12)?;
            }
            Ok(())
        })
        .expect("the fused paths agree with the reference");
}

#[test]
fn weights_are_a_distribution_and_outputs_a_convex_combination() {
    runner()
        .run(&case(false), |case| {
            let out = attention(&case, Kernel::Plain)
                .forward_with_weights(&case.q, &case.k, &case.v)
                .expect("valid shapes");
            for (i, row) in out.weights.rows().into_iter().enumerate() {
                let total: f64 = row.sum();
                prop_assert!(row.iter().all(|&w| (0.0..=1.0).contains(&w)));
                prop_assert!(
                    total == 0.0 || (total - 1.0).abs() < 1e-12,
                    "row {} sums to {}",
                    i,
                    total
                );
                for c in 0..case.v.ncols() {
                    let attended = row.iter().zip(case.v.column(c)).filter(|&(&w, _)| w > 0.0);
                    let (lo, hi) = attended
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, &x)| {
                            (lo.min(x), hi.max(x))
                        });
                    let o = out.output[[i, c]];
                    if total == 0.0 {
                        prop_assert_eq!(o, 0.0);
                    } else {
                        prop_assert!(
                            o >= lo - 1e-12 && o <= hi + 1e-12,
                            "output {} outside [{}, {}]",
                            o,
                            lo,
                            hi
                        );
                    }
                }
            }
            Ok(())
        })
        .expect("attention's invariants hold");
}

#[test]
fn values_at_masked_positions_change_nothing() {
    runner()
        .run(&(case(false), value()), |(case, garbage)| {
            let Some(keep) = &case.keep else {
                return Ok(());
            };
            let clean = attention(&case, Kernel::Auto)
                .forward(&case.q, &case.k, &case.v)
                .expect("valid");
            // a key no query may attend to can hold anything
            let mut dirty = case.clone();
            for j in 0..keep.ncols() {
                if keep.column(j).iter().all(|&k| !k) {
                    dirty.k.row_mut(j).fill(garbage);
                    dirty.v.row_mut(j).fill(garbage);
                }
            }
            let out = attention(&dirty, Kernel::Auto)
                .forward(&dirty.q, &dirty.k, &dirty.v)
                .expect("valid");
            agree(&out, &clean, 1e-12)
        })
        .expect("masked positions are never read");
}

/// bf16 inputs, queries transposed or not: the fused paths (on bf16 pairs
/// where the CPU has AVX512_BF16 or AMX, reading the queries as stored) equal
/// the reference path within the rounding of the weights to bf16 (one bf16
/// spacing of the largest value) and of the output (one of its own), NaN
/// where it is NaN.
#[test]
fn bf16_fused_paths_equal_the_reference_within_its_rounding() {
    use attn::half::bf16;
    // one bf16 spacing at `x`: 8 bits of precision
    let spacing = |x: f64| match x.abs() {
        a if a == 0.0 || !a.is_finite() => 0.0,
        a => 2f64.powi(a.log2().floor() as i32 - 7),
    };
    runner()
        .run(&case(true), |case| {
            let half = |x: &Array2<f64>| x.mapv(bf16::from_f64);
            let (q, k, v) = (half(&case.q), half(&case.k), half(&case.v));
            let q_t = q.t().to_owned();
            let bias = case.bias.as_ref().map(half);
            let attention = |kernel| {
                let mut attn = ScaledDotProduct::<bf16>::new().with_kernel(kernel);
                if let Some(keep) = &case.keep {
                    attn = attn.with_mask(Mask::keep(keep));
                }
                if let Some(bias) = &bias {
                    attn = attn.with_mask(Mask::bias(bias));
                }
                match case.causal {
                    1 => attn.with_mask(Mask::CausalTopLeft),
                    2 => attn.with_mask(Mask::CausalBottomRight),
                    _ => attn,
                }
            };
            let wide = |x: &Array2<bf16>| x.mapv(f64::from);
            let plain = wide(
                &attention(Kernel::Plain)
                    .forward(&q, &k, &v)
                    .expect("valid shapes"),
            );
            let largest = v
                .iter()
                .map(|&x| f64::from(x).abs())
                .filter(|x| x.is_finite())
                .fold(0.0, f64::max);
            for kernel in [Kernel::Fused, Kernel::Auto] {
                let attn = attention(kernel);
                let out = if case.transpose_q {
                    attn.forward(&q_t.t(), &k, &v)
                } else {
                    attn.forward(&q, &k, &v)
                }
                .expect("valid shapes");
                for ((idx, x), y) in wide(&out).indexed_iter().zip(plain.iter()) {
                    let within = (x - y).abs() <= spacing(*y) + spacing(largest) + 1e-6;
                    let same = (x.is_nan() && y.is_nan()) || x == y || within;
                    prop_assert!(same, "{kernel:?} at {:?}: {} vs {}", idx, x, y);
                }
            }
            Ok(())
        })
        .expect("the fused bf16 paths agree with the reference");
}
