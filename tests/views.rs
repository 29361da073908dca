//! Every kernel entry takes any view: each argument given as a permuted,
//! transposed, negative-stride or strided-slice view gives the same numbers,
//! bit for bit, as the same values in a fresh standard-layout array.

use crate::common;

use attn::{AttentionLse, Element, KvCache, Mask, ScaledDotProduct, merge_attention};
use common::pseudo_random;
use ndarray::{
    Array2, ArrayD, ArrayView2, ArrayView4, ArrayViewD, Axis, Dimension, Ix2, Ix4, IxDyn,
    ShapeBuilder, Slice,
};

/// How a view's values lie in its storage.
#[derive(Debug, Clone, Copy)]
enum Lay {
    /// Axes stored in another order (rotated by one).
    Permuted,
    /// Axes stored reversed (column-major for a matrix).
    Transposed,
    /// Every axis read backwards: negative strides.
    Reversed,
    /// Every other element of a larger, NaN-filled array.
    Strided,
}

const LAYS: [Lay; 4] = [Lay::Permuted, Lay::Transposed, Lay::Reversed, Lay::Strided];

/// Storage holding `x`'s values in `lay`.
fn storage<A: Element>(x: &ArrayD<A>, lay: Lay) -> ArrayD<A> {
    let n = x.ndim();
    match lay {
        Lay::Permuted => x.view().permuted_axes(rotation(n)).to_owned(),
        Lay::Transposed => x.t().as_standard_layout().into_owned(),
        Lay::Reversed => x.slice_each_axis(|_| Slice::new(0, None, -1)).to_owned(),
        Lay::Strided => {
            let big: Vec<usize> = x.shape().iter().map(|&d| 2 * d + 1).collect();
            let mut s = ArrayD::from_elem(IxDyn(&big), A::nan());
            s.slice_each_axis_mut(|_| Slice::new(1, None, 2)).assign(x);
            s
        }
    }
}

/// The view of `storage` whose values are the original array's.
fn view<A: Element>(storage: &ArrayD<A>, lay: Lay) -> ArrayViewD<'_, A> {
    let n = storage.ndim();
    match lay {
        Lay::Permuted => {
            let rotated = rotation(n);
            let mut inverse = vec![0; n];
            for (i, &a) in rotated.iter().enumerate() {
                inverse[a] = i;
            }
            storage.view().permuted_axes(inverse)
        }
        Lay::Transposed => storage.t(),
        Lay::Reversed => storage.slice_each_axis(|_| Slice::new(0, None, -1)),
        Lay::Strided => storage.slice_each_axis(|_| Slice::new(1, None, 2)),
    }
}

fn rotation(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i + 1) % n).collect()
}

/// Runs `call` on owned `inputs`, then with each input alone, and all of them
/// together, in each layout: every output must have the same bits.
fn same_for_every_view<A: Element + BitsEq>(
    what: &str,
    inputs: &[ArrayD<A>],
    call: impl Fn(&[ArrayViewD<'_, A>]) -> Vec<ArrayD<A>>,
) {
    let owned: Vec<ArrayViewD<'_, A>> = inputs.iter().map(|x| x.view()).collect();
    let expected = call(&owned);
    for lay in LAYS {
        let stored: Vec<ArrayD<A>> = inputs.iter().map(|x| storage(x, lay)).collect();
        for which in (0..inputs.len()).map(Some).chain([None]) {
            let views: Vec<ArrayViewD<'_, A>> = (0..inputs.len())
                .map(|i| match which {
                    Some(w) if w != i => inputs[i].view(),
                    _ => view(&stored[i], lay),
                })
                .collect();
            for (v, x) in views.iter().zip(inputs) {
                assert_eq!(v, x, "the {lay:?} view holds the input's values");
            }
            let found = call(&views);
            for (e, f) in expected.iter().zip(&found) {
                let same = e.shape() == f.shape()
                    && e.iter()
                        .zip(f)
                        .all(|(a, b)| a.to_bits_eq(*b) || (a.is_nan() && b.is_nan()));
                assert!(
                    same,
                    "{what}: argument {which:?} as a {lay:?} view changed the result"
                );
            }
        }
    }
}

/// Exact equality for f32 and f64 (0.0 and −0.0 apart).
trait BitsEq {
    fn to_bits_eq(self, other: Self) -> bool;
}
impl BitsEq for f32 {
    fn to_bits_eq(self, other: Self) -> bool {
        self.to_bits() == other.to_bits()
    }
}
impl BitsEq for f64 {
    fn to_bits_eq(self, other: Self) -> bool {
        self.to_bits() == other.to_bits()
    }
}

fn d2<'a, A>(x: &ArrayViewD<'a, A>) -> ArrayView2<'a, A> {
    x.clone().into_dimensionality::<Ix2>().expect("2-D")
}

fn d4<'a, A>(x: &ArrayViewD<'a, A>) -> ArrayView4<'a, A> {
    x.clone().into_dimensionality::<Ix4>().expect("4-D")
}

fn dyn_<A, D: Dimension>(x: ndarray::Array<A, D>) -> ArrayD<A> {
    x.into_dyn()
}

fn random<A: Element>(shape: &[usize], seed: u64) -> ArrayD<A> {
    pseudo_random(shape, seed).mapv(A::from_f64)
}

/// Sizes past the blocks of the fused paths, and not multiples of them.
const L: usize = 37;
const S: usize = 70;

fn two_d<A: Element + BitsEq>() {
    let (q, k, v) = (
        random::<A>(&[L, 16], 1),
        random::<A>(&[S, 16], 2),
        random::<A>(&[S, 8], 3),
    );
    let d_out = random::<A>(&[L, 8], 4);
    let keep = pseudo_random(&[L, S], 5).mapv(|x| A::from_f64(x.abs()));
    let plain = [q.clone(), k.clone(), v.clone()];
    let with_bias = [q.clone(), k.clone(), v.clone(), keep.clone()];
    same_for_every_view("forward", &with_bias, |x| {
        let attention = ScaledDotProduct::new()
            .with_mask(Mask::CausalBottomRight)
            .with_mask(Mask::bias(&x[3]));
        let out = attention.forward_with_weights(&d2(&x[0]), &d2(&x[1]), &d2(&x[2]));
        let out = out.expect("valid");
        vec![dyn_(out.output), dyn_(out.weights)]
    });
    same_for_every_view("forward_with_lse", &plain, |x| {
        let out = ScaledDotProduct::new()
            .forward_with_lse(&d2(&x[0]), &d2(&x[1]), &d2(&x[2]))
            .expect("valid");
        vec![dyn_(out.output), dyn_(out.lse)]
    });
    let mut with_d_out = plain.to_vec();
    with_d_out.push(d_out.clone());
    let grads = |g: attn::AttentionGradients<A, Ix2>| vec![dyn_(g.q), dyn_(g.k), dyn_(g.v)];
    same_for_every_view("backward", &with_d_out, |x| {
        let g = ScaledDotProduct::new()
            .with_mask(Mask::CausalTopLeft)
            .backward(&d2(&x[0]), &d2(&x[1]), &d2(&x[2]), &d2(&x[3]))
            .expect("valid");
        grads(g)
    });
    let attention = ScaledDotProduct::new();
    let (q2, k2, v2) = (d2(&q.view()), d2(&k.view()), d2(&v.view()));
    let forward = attention.forward_with_lse(&q2, &k2, &v2).expect("valid");
    same_for_every_view("backward_with_lse", &with_d_out, |x| {
        let g = attention
            .backward_with_lse(&d2(&x[0]), &d2(&x[1]), &d2(&x[2]), &forward, &d2(&x[3]))
            .expect("valid");
        grads(g)
    });
    same_for_every_view("scaled_dot_product", &plain, |x| {
        let out = attn::scaled_dot_product(&d2(&x[0]), &d2(&x[1]), &d2(&x[2]));
        vec![dyn_(out.expect("valid"))]
    });
}

fn four_d<A: Element + BitsEq>() {
    let (q, k, v) = (
        random::<A>(&[2, 4, L, 16], 11),
        random::<A>(&[2, 2, S, 16], 12),
        random::<A>(&[2, 2, S, 8], 13),
    );
    let d_out = random::<A>(&[2, 4, L, 8], 14);
    let bias = random::<A>(&[2, 1, L, S], 15);
    let plain = [q.clone(), k.clone(), v.clone()];
    same_for_every_view(
        "forward_batched",
        &[q.clone(), k.clone(), v.clone(), bias],
        |x| {
            let out = ScaledDotProduct::new()
                .with_mask(Mask::bias(&x[3]))
                .with_mask(Mask::SlidingWindow(20))
                .forward_batched_with_weights(&d4(&x[0]), &d4(&x[1]), &d4(&x[2]))
                .expect("valid");
            let plain = ScaledDotProduct::new()
                .forward_batched(&d4(&x[0]), &d4(&x[1]), &d4(&x[2]))
                .expect("valid");
            vec![dyn_(out.output), dyn_(out.weights), dyn_(plain)]
        },
    );
    same_for_every_view("forward_with_lse, batched", &plain, |x| {
        let out = ScaledDotProduct::new()
            .forward_with_lse(&d4(&x[0]), &d4(&x[1]), &d4(&x[2]))
            .expect("valid");
        vec![dyn_(out.output), dyn_(out.lse)]
    });
    let mut with_d_out = plain.to_vec();
    with_d_out.push(d_out);
    same_for_every_view("backward_batched", &with_d_out, |x| {
        let g = ScaledDotProduct::new()
            .with_mask(Mask::CausalBottomRight)
            .backward_batched(&d4(&x[0]), &d4(&x[1]), &d4(&x[2]), &d4(&x[3]))
            .expect("valid");
        vec![dyn_(g.q), dyn_(g.k), dyn_(g.v)]
    });
    let attention = ScaledDotProduct::new();
    let (q4, k4, v4) = (d4(&q.view()), d4(&k.view()), d4(&v.view()));
    let forward = attention.forward_with_lse(&q4, &k4, &v4).expect("valid");
    same_for_every_view("backward_with_lse, batched", &with_d_out, |x| {
        let g = attention
            .backward_with_lse(&d4(&x[0]), &d4(&x[1]), &d4(&x[2]), &forward, &d4(&x[3]))
            .expect("valid");
        vec![dyn_(g.q), dyn_(g.k), dyn_(g.v)]
    });
}

fn cache<A: Element + BitsEq>() {
    let prompt = [
        random::<A>(&[2, 4, 9, 16], 21),
        random::<A>(&[2, 2, 9, 16], 22),
        random::<A>(&[2, 2, 9, 8], 23),
    ];
    let step = [
        random::<A>(&[2, 4, 1, 16], 24),
        random::<A>(&[2, 2, 1, 16], 25),
        random::<A>(&[2, 2, 1, 8], 26),
    ];
    let mut inputs = prompt.to_vec();
    inputs.extend(step);
    let real = ndarray::array![
        [false, false, true, true, true, true, true, true, true],
        [true; 9]
    ];
    for window in [None, Some(5)] {
        same_for_every_view("KvCache::attend_padded", &inputs, |x| {
            let mut cache = match window {
                None => KvCache::new(2, 2, 16, 8),
                Some(w) => KvCache::sliding(2, 2, 16, 8, w).expect("valid"),
            };
            let first = cache
                .attend_padded(&d4(&x[0]), &d4(&x[1]), &d4(&x[2]), &real.t().t(), &[])
                .expect("valid");
            let next = cache
                .attend(&d4(&x[3]), &d4(&x[4]), &d4(&x[5]))
                .expect("valid");
            vec![dyn_(first), dyn_(next), dyn_(cache.keys().to_owned())]
        });
    }
}

#[test]
fn two_d_calls_take_any_view() {
    two_d::<f64>();
    two_d::<f32>();
}

#[test]
fn batched_calls_take_any_view() {
    four_d::<f64>();
    four_d::<f32>();
}

#[test]
fn cache_steps_take_any_view() {
    cache::<f64>();
    cache::<f32>();
}

#[test]
fn merge_takes_outputs_in_any_layout() {
    let attention = ScaledDotProduct::new();
    let q = random::<f64>(&[5, 4], 31)
        .into_dimensionality::<Ix2>()
        .unwrap();
    let k = random::<f64>(&[12, 4], 32)
        .into_dimensionality::<Ix2>()
        .unwrap();
    let v = random::<f64>(&[12, 3], 33)
        .into_dimensionality::<Ix2>()
        .unwrap();
    let parts: Vec<AttentionLse<f64, Ix2>> = [0..5, 5..12]
        .into_iter()
        .map(|keys| {
            let k = k.slice_axis(Axis(0), keys.clone().into());
            let v = v.slice_axis(Axis(0), keys.into());
            attention.forward_with_lse(&q, &k, &v).expect("valid")
        })
        .collect();
    let expected = merge_attention(&parts).expect("valid");
    // the same parts with outputs stored column-major
    let column_major: Vec<AttentionLse<f64, Ix2>> = parts
        .iter()
        .map(|p| AttentionLse {
            output: {
                let mut o = Array2::zeros(p.output.dim().f());
                o.assign(&p.output);
                o
            },
            lse: p.lse.clone(),
        })
        .collect();
    let found = merge_attention(&column_major).expect("valid");
    assert_eq!(found.output, expected.output);
    assert_eq!(found.lse, expected.lse);
    let whole = attention.forward_with_lse(&q, &k, &v).expect("valid");
    common::assert_close(&found.output, &whole.output, 1e-14);
}
