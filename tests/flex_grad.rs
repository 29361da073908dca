//! Gradients through programmable attention: the fused backward against the
//! reference backward, finite differences of the forward, and the built-in
//! bias's gradient against the bias mask's.

use attn::flex::{At, Documents, FlexGradients, KeepMod, RelativeBias, ScoreMod, SoftCap};
use attn::{Kernel, Mask, Parallelism, ScaledDotProduct, kernel_paths};
use ndarray::{Array1, Array2, Array4, Ix4, array, s};

use crate::common::{assert_close, random2, random4};
use crate::flex::{block_mask, scored};

/// `Σ out ∘ w`: a loss whose gradient by the output is `w`.
fn loss(out: &Array4<f64>, w: &Array4<f64>) -> f64 {
    (out * w).sum()
}

/// The central difference of `f` at `x[index]`.
fn difference<D: ndarray::Dimension>(
    x: &ndarray::Array<f64, D>,
    index: D::Pattern,
    f: impl Fn(&ndarray::Array<f64, D>) -> f64,
) -> f64
where
    D::Pattern: ndarray::NdIndex<D> + Copy,
{
    let step = 1e-5;
    let (mut up, mut down) = (x.clone(), x.clone());
    up[index] += step;
    down[index] -= step;
    (f(&up) - f(&down)) / (2.0 * step)
}

/// Inputs of a batched call with grouped-query heads: 4 query heads on 2
/// key/value heads.
fn inputs(l: usize, s: usize) -> (Array4<f64>, Array4<f64>, Array4<f64>, Array4<f64>) {
    (
        random4((2, 4, l, 8), 40),
        random4((2, 2, s, 8), 41) * 2.0,
        random4((2, 2, s, 4), 42),
        random4((2, 4, l, 4), 43),
    )
}

#[test]
fn the_fused_backward_equals_the_reference_under_every_program_part() {
    let (l, s) = (100, 150);
    let (q, k, v, d_out) = inputs(l, s);
    let sinks = array![0.3, -0.5, 1.0, 0.0];
    let docs = Documents::from_lengths(&[40, 60]).unwrap();
    let window = |at: At| {
        at.key + 60 >= at.query + 50
            && docs.keep(At {
                key: at.key.min(99),
                ..at
            })
    };
    let blocks = block_mask(window, [1, 1, l, s]);
    let bias = RelativeBias::per_head(random2(4, 21, 44));
    for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
        let attention = |kernel| {
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_parallelism(parallelism)
                .with_mask(Mask::CausalBottomRight)
                .with_sinks(&sinks)
                .with_score_mod(bias.clone())
                .with_block_mask(&blocks)
        };
        let want = attention(Kernel::Plain)
            .backward(&q, &k, &v, &d_out)
            .unwrap();
        let (got, paths) = kernel_paths(|| {
            attention(Kernel::Auto)
                .backward(&q, &k, &v, &d_out)
                .unwrap()
        });
        assert_eq!(paths.reference, 0, "{paths:?}");
        assert_eq!(paths.backward, 8, "{paths:?}");
        assert_gradients_close(&got, &want, 1e-12);
        // from a kept forward, the same
        let fused = attention(Kernel::Auto);
        let forward = fused.forward_with_lse(&q, &k, &v).unwrap();
        let kept = fused
            .backward_with_lse(&q, &k, &v, &forward, &d_out)
            .unwrap();
        assert_gradients_close(&kept, &want, 1e-12);
    }
}

fn assert_gradients_close(
    got: &FlexGradients<f64, Ix4>,
    want: &FlexGradients<f64, Ix4>,
    epsilon: f64,
) {
    assert_close(&got.q, &want.q, epsilon);
    assert_close(&got.k, &want.k, epsilon);
    assert_close(&got.v, &want.v, epsilon);
    assert_close(&got.score, &want.score, epsilon);
    assert_eq!(got.sinks.is_some(), want.sinks.is_some());
    if let (Some(a), Some(b)) = (&got.sinks, &want.sinks) {
        assert_close(a, b, epsilon);
    }
}

#[test]
fn soft_capping_and_sinks_agree_with_finite_differences() {
    let (l, s) = (20, 70);
    let (q, k, v, w) = inputs(l, s);
    let sinks = array![0.3, -0.5, 1.0, 0.0];
    let cap = 1.2;
    let forward =
        |q: &Array4<f64>, k: &Array4<f64>, v: &Array4<f64>, cap: f64, sinks: &Array1<f64>| {
            let attention = ScaledDotProduct::new()
                .with_sinks(sinks)
                .with_score_mod(SoftCap::new(cap));
            loss(&attention.forward(q, k, v).unwrap(), &w)
        };
    let attention = ScaledDotProduct::new()
        .with_sinks(&sinks)
        .with_score_mod(SoftCap::new(cap));
    let g = attention.backward(&q, &k, &v, &w).unwrap();
    let close = |analytic: f64, numeric: f64, what: &str| {
        assert!(
            (analytic - numeric).abs() < 1e-8 * (1.0 + numeric.abs()),
            "{what}: {analytic} vs {numeric}"
        );
    };
    for index in [(0, 0, 0, 0), (1, 3, 19, 7), (0, 2, 11, 4)] {
        close(
            g.q[index],
            difference(&q, index, |q| forward(q, &k, &v, cap, &sinks)),
            "dq",
        );
    }
    for index in [(0, 0, 0, 0), (1, 1, 69, 7), (0, 1, 33, 2)] {
        close(
            g.k[index],
            difference(&k, index, |k| forward(&q, k, &v, cap, &sinks)),
            "dk",
        );
    }
    for index in [(0, 0, 5, 0), (1, 1, 69, 3)] {
        close(
            g.v[index],
            difference(&v, index, |v| forward(&q, &k, v, cap, &sinks)),
            "dv",
        );
    }
    let caps = array![cap];
    close(
        g.score[0],
        difference(&caps, 0, |c| forward(&q, &k, &v, c[0], &sinks)),
        "d cap",
    );
    let d_sinks = g.sinks.expect("the call had sinks");
    for h in 0..4 {
        close(
            d_sinks[h],
            difference(&sinks, h, |s| forward(&q, &k, &v, cap, s)),
            "d sink",
        );
    }
}

#[test]
fn a_user_written_score_function_agrees_with_finite_differences() {
    // s·(1 + 0.1·sin(s)) + 0.01·(k − q): a nonlinear, position-dependent modification
    let f = |s: f64, at: At| s * (1.0 + 0.1 * s.sin()) + 0.01 * (at.key as f64 - at.query as f64);
    let df = |s: f64, _: At| 1.0 + 0.1 * s.sin() + 0.1 * s * s.cos();
    let (l, s) = (70, 90);
    let (q, k, v, w) = inputs(l, s);
    let forward = |q: &Array4<f64>, k: &Array4<f64>| {
        loss(
            &ScaledDotProduct::new()
                .with_score_mod(scored(f, df))
                .forward(q, k, &v)
                .unwrap(),
            &w,
        )
    };
    let g = ScaledDotProduct::new()
        .with_score_mod(scored(f, df))
        .backward(&q, &k, &v, &w)
        .unwrap();
    for index in [(0, 0, 0, 0), (1, 3, 69, 7), (0, 2, 48, 4)] {
        let numeric = difference(&q, index, |q| forward(q, &k));
        assert!(
            (g.q[index] - numeric).abs() < 1e-8 * (1.0 + numeric.abs()),
            "dq {index:?}"
        );
        let index = (index.0, index.1 / 2, index.2, index.3);
        let numeric = difference(&k, index, |k| forward(&q, k));
        assert!(
            (g.k[index] - numeric).abs() < 1e-8 * (1.0 + numeric.abs()),
            "dk {index:?}"
        );
    }
}

#[test]
fn the_relative_bias_table_gradient_sums_the_bias_mask_gradient_by_offset() {
    let (l, s) = (60, 60);
    let (q, k, v, d_out) = inputs(l, s);
    let table = random2(1, 11, 45); // R = 5
    let bias = RelativeBias::per_head(table.clone());
    let full = Array2::from_shape_fn((l, s), |(i, j)| {
        bias.score(
            0.0,
            At {
                batch: 0,
                head: 0,
                query: i,
                key: j,
            },
        )
    });
    let as_mask = ScaledDotProduct::new().with_mask(Mask::bias(&full));
    let by_mask = as_mask.backward_batched(&q, &k, &v, &d_out).unwrap();
    let by_table = ScaledDotProduct::new()
        .with_score_mod(bias)
        .backward(&q, &k, &v, &d_out)
        .unwrap();
    assert_close(&by_table.q, &by_mask.q, 1e-12);
    let mut want = Array1::zeros(11);
    for ((i, j), &g) in by_mask.bias[0]
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap()
        .indexed_iter()
    {
        want[((j as i64 - i as i64).clamp(-5, 5) + 5) as usize] += g;
    }
    assert_close(&by_table.score, &want, 1e-12);
}

#[test]
fn a_backward_without_keys_gives_zeros_and_the_sink_takes_all() {
    // a predicate that drops everything: every row sees only its sink
    let (q, k, v, d_out) = inputs(10, 20);
    let sinks = array![0.0, 1.0, 2.0, 3.0];
    let nothing = block_mask(|_| false, [1, 1, 10, 20]);
    let attention = ScaledDotProduct::new()
        .with_sinks(&sinks)
        .with_block_mask(&nothing);
    let out = attention.forward(&q, &k, &v).unwrap();
    assert!(out.iter().all(|&x| x == 0.0));
    let g = attention.backward(&q, &k, &v, &d_out).unwrap();
    assert!(g.q.iter().chain(&g.k).chain(&g.v).all(|&x| x == 0.0));
    assert!(g.sinks.unwrap().iter().all(|&x| x == 0.0));
}

/// One case of `golden/flex.json`: inputs, output and float64 autograd
/// gradients of `sum(output · d_out)` by PyTorch.
struct Golden {
    case: serde_json::Value,
}

impl Golden {
    fn new(name: &str) -> Self {
        Golden {
            case: crate::common::golden("flex.json")[name].clone(),
        }
    }

    fn get<D: ndarray::Dimension>(&self, key: &str) -> ndarray::Array<f64, D> {
        crate::common::array_f64(&self.case[key])
            .into_dimensionality()
            .expect("the field's dimension")
    }

    /// Checks a call's output and gradients against PyTorch's.
    fn check<S: ScoreMod<f64>, K: attn::flex::KeepMod>(
        &self,
        attention: &attn::flex::FlexAttention<'_, f64, S, K>,
    ) -> FlexGradients<f64, Ix4> {
        let [q, k, v, d_out]: [Array4<f64>; 4] = ["q", "k", "v", "d_out"].map(|key| self.get(key));
        assert_close(
            &attention.forward(&q, &k, &v).unwrap(),
            &self.get("output"),
            1e-13,
        );
        let g = attention.backward(&q, &k, &v, &d_out).unwrap();
        assert_close(&g.q, &self.get("dq"), 1e-12);
        assert_close(&g.k, &self.get("dk"), 1e-12);
        assert_close(&g.v, &self.get("dv"), 1e-12);
        g
    }
}

#[test]
fn soft_capping_sinks_and_documents_match_pytorch_autograd() {
    let golden = Golden::new("softcap_sinks_documents");
    let sinks: Array1<f64> = golden.get("sinks");
    let cap = golden.case["cap"].as_f64().unwrap();
    let docs = Documents::from_offsets(&[0, 10, 25, 37]).unwrap().causal();
    let blocks = block_mask(move |at| docs.keep(at), [1, 1, 37, 37]);
    let attention = ScaledDotProduct::new()
        .with_sinks(&sinks)
        .with_score_mod(SoftCap::new(cap))
        .with_block_mask(&blocks);
    let g = golden.check(&attention);
    let d_cap = golden.case["d_cap"].as_f64().unwrap();
    assert!(
        (g.score[0] - d_cap).abs() < 1e-12,
        "{} vs {d_cap}",
        g.score[0]
    );
    assert_close(&g.sinks.unwrap(), &golden.get("d_sinks"), 1e-12);
}

#[test]
fn a_relative_bias_table_under_prefix_lm_matches_pytorch_autograd() {
    let golden = Golden::new("relative_bias_prefix_lm");
    let table: Array2<f64> = golden.get("table");
    let lm = attn::flex::PrefixLm::new(12);
    let blocks = block_mask(move |at| lm.keep(at), [1, 1, 30, 30]);
    let attention = ScaledDotProduct::new()
        .with_score_mod(RelativeBias::per_head(table))
        .with_block_mask(&blocks);
    let g = golden.check(&attention);
    let want: Array2<f64> = golden.get("d_table");
    assert_close(&g.score, &want.into_shape_with_order(36).unwrap(), 1e-12);
}

#[test]
fn a_user_function_under_a_tree_mask_matches_pytorch_autograd() {
    let golden = Golden::new("tree_user_function");
    let tree = attn::flex::TreeMask::new(11, &[None, Some(0), Some(0), Some(1), Some(1), Some(2)])
        .unwrap();
    let blocks = block_mask(move |at| tree.keep(at), [1, 1, 6, 17]);
    let distance = |at: At| (at.query + 11).abs_diff(at.key) as f64;
    let f = move |s: f64, at: At| s - 0.1 * distance(at) * s.sin();
    let df = move |s: f64, at: At| 1.0 - 0.1 * distance(at) * s.cos();
    let attention = ScaledDotProduct::new()
        .with_score_mod(scored(f, df))
        .with_block_mask(&blocks);
    golden.check(&attention);
}

/// A score function that overflows at one position of one head.
struct OverflowAt(At);

impl ScoreMod<f64> for OverflowAt {
    fn score(&self, score: f64, at: At) -> f64 {
        if at == self.0 { f64::INFINITY } else { score }
    }

    fn derivative(&self, _: f64, _: At) -> f64 {
        1.0
    }
}

#[test]
fn a_head_whose_program_overflows_late_keeps_nothing_of_its_fused_start() {
    // head 1's score overflows at query 100 and key 300, after the fused pass
    // added its first query block (and, with the forward kept, the key blocks
    // before 256 of its second) into the call's gradients: the head is the
    // reference path's alone, the others the fused pass's
    let (heads, l, s) = (3, 130, 320);
    let q = random4((1, heads, l, 8), 60);
    let k = random4((1, heads, s, 8), 61);
    let v = random4((1, heads, s, 4), 62);
    let d_out = random4((1, heads, l, 4), 63);
    // query 100 sees its last 40 keys only
    let keep = Array2::from_shape_fn((l, s), |(i, j)| i != 100 || j >= 280);
    let at = At {
        batch: 0,
        head: 1,
        query: 100,
        key: 300,
    };
    let attention = |kernel| {
        ScaledDotProduct::new()
            .with_kernel(kernel)
            .with_mask(Mask::keep(&keep))
            .with_score_mod(OverflowAt(at))
    };
    let forward = attention(Kernel::Auto)
        .forward_with_lse(&q, &k, &v)
        .unwrap();
    for kept in [false, true] {
        let backward = |kernel| {
            let attention = attention(kernel);
            match kept {
                false => attention.backward(&q, &k, &v, &d_out).unwrap(),
                true => attention
                    .backward_with_lse(&q, &k, &v, &forward, &d_out)
                    .unwrap(),
            }
        };
        let want = backward(Kernel::Plain);
        let (got, paths) = kernel_paths(|| backward(Kernel::Auto));
        assert_eq!(
            (paths.backward, paths.reference),
            (heads - 1, 1),
            "{paths:?}"
        );
        for (got, want) in [(&got.q, &want.q), (&got.k, &want.k), (&got.v, &want.v)] {
            // (the overflow's NaN reaches only some of head 1's gradients)
            assert!(want.iter().filter(|x| x.is_finite()).count() > want.len() * 9 / 10);
            for h in 0..heads {
                let (got, want) = (got.slice(s![0, h, .., ..]), want.slice(s![0, h, .., ..]));
                for (&x, &y) in got.iter().zip(&want) {
                    let same = match h {
                        1 => x.to_bits() == y.to_bits(),
                        _ => (x - y).abs() < 1e-12,
                    };
                    assert!(same, "head {h}, forward kept {kept}: {x} against {y}");
                }
            }
        }
    }
}
