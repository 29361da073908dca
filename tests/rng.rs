//! The NumPy and PyTorch generators against every case of `golden/numpy_random.json`
//! and `golden/torch_randn.json`.

use crate::common;

use attn::rng::{NumpyRandom, TorchGenerator};
use common::{array_f64, golden};
use ndarray::IxDyn;

fn shape(case: &serde_json::Value) -> Vec<usize> {
    case["shape"]
        .as_array()
        .expect("a shape")
        .iter()
        .map(|x| x.as_u64().expect("a size") as usize)
        .collect()
}

#[test]
fn numpy_legacy_generator_is_bit_exact() {
    let file = golden("numpy_random.json");
    let cases = file["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    for case in cases {
        let seed = case["seed"].as_u64().expect("seed") as u32;
        let dims = IxDyn(&shape(case));
        let want = array_f64(&case["values"]);
        let mut np = NumpyRandom::seed(seed);
        let got = match case["kind"].as_str().expect("kind") {
            "randint" => {
                let high = case["high"].as_i64().expect("high");
                np.randint(high, dims)
                    .expect("valid high")
                    .mapv(|x| x as f64)
            }
            "rand" => np.rand(dims),
            "randn" => np.randn(dims),
            other => panic!("unknown kind {other}"),
        };
        assert_eq!(got, want, "{} seed {seed}", case["kind"]);
    }
}

#[test]
fn numpy_randint_rejects_an_empty_range() {
    assert!(NumpyRandom::seed(0).randint(0, 3).is_err());
    assert!(NumpyRandom::seed(0).randint(-5, 3).is_err());
    assert_eq!(
        NumpyRandom::seed(0).randint(1, 4).expect("valid").to_vec(),
        vec![0; 4]
    );
}

/// Distance in units in the last place of `f32`.
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let bits = x.to_bits() as i32;
        if bits < 0 { i32::MIN - bits } else { bits }
    };
    key(a).abs_diff(key(b))
}

#[test]
fn torch_randn_is_bit_exact_for_every_shape() {
    let file = golden("torch_randn.json");
    let cases = file["cases"].as_array().expect("cases");
    assert!(cases.len() >= 4);
    for case in cases {
        let seed = case["seed"].as_u64().expect("seed");
        let dims = shape(case);
        let mut g = TorchGenerator::manual_seed(seed);
        for key in ["first", "second"] {
            let got = g.randn(IxDyn(&dims));
            let want = array_f64(&case[key]).mapv(|x| x as f32);
            assert_eq!(got.shape(), want.shape());
            for (a, b) in got.iter().zip(want.iter()) {
                let d = ulps(*a, *b);
                assert!(
                    d == 0,
                    "seed {seed} shape {dims:?} {key}: {a} vs {b} ({d} ulps)"
                );
            }
        }
    }
}
