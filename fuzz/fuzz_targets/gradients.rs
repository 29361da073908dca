//! Fuzzes the forward with log-sum-exp and the backward, plain and under a
//! program (a soft-cap and a document mask), with shapes (0 included), grouped
//! heads, masks, scale and the float bits of every input from raw bytes. Every
//! call must return `Ok` or `Err`, never panic; where the fused kernels and the
//! reference path both answer, their outputs, log-sum-exps and gradients must
//! agree (NaN where the other has NaN), and a backward from a kept forward must
//! agree with one that runs the forward again. The same calls in `f32` and
//! `bf16` must fail where `f64` fails, and answer where it answers.
#![no_main]

use attn::flex::{BlockMask, Documents, SoftCap};
use attn::half::bf16;
use attn::{Error, Kernel, ScaledDotProduct};
use libfuzzer_sys::fuzz_target;
use ndarray::{Array, Array4, Dimension};

#[path = "bytes.rs"]
mod bytes;
use bytes::Bytes;

/// `got` and `want` within `slack` (NaN where the other has NaN).
fn agree<D: Dimension>(got: &Array<f64, D>, want: &Array<f64, D>, slack: f64, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}");
    for (x, y) in got.iter().zip(want.iter()) {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= slack * (1.0 + y.abs());
        assert!(ok, "{what}: fused {x} vs reference {y} (slack {slack:e})");
    }
}

/// Two paths' answers: both `Ok` (then `check` compares them), or both the same
/// error.
fn both<T>(
    fused: &Result<T, Error>,
    plain: &Result<T, Error>,
    what: &str,
    check: impl FnOnce(&T, &T),
) {
    match (fused, plain) {
        (Ok(f), Ok(p)) => check(f, p),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{what}"),
        (f, p) => panic!(
            "{what}: one path failed and the other did not: {:?} vs {:?}",
            f.as_ref().err(),
            p.as_ref().err()
        ),
    }
}

/// The largest magnitude of `x`.
fn largest(x: &Array4<f64>) -> f64 {
    x.iter().fold(0.0_f64, |a, x| a.max(x.abs()))
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let (batch, kv_heads, group) = (bytes.size(2), bytes.size(2), 1 + bytes.size(2));
    let (l, s, d, d_v) = (bytes.size(24), bytes.size(24), bytes.size(8), bytes.size(6));
    let heads = kv_heads * group + usize::from(bytes.byte() % 8 == 0); // sometimes not a multiple
    let flags = bytes.byte();
    let mut four =
        |shape: (usize, usize, usize, usize)| Array4::from_shape_simple_fn(shape, || bytes.float());
    let q = four((batch, heads, l, d));
    let k = four((batch, kv_heads, s, d));
    let v = four((batch, kv_heads, s, d_v));
    let d_out = four((batch, heads, l, d_v));
    let keep = ndarray::Array2::from_shape_simple_fn((l, s), || bytes.byte() % 5 != 0);
    let bias = ndarray::Array2::from_shape_simple_fn((l, s), || bytes.float());
    let scale = (flags & 1 != 0).then(|| bytes.float());
    let cap = bytes.float();
    let documents = Documents::from_offsets(&[0, s / 3, s]).expect("ordered offsets");

    let build = |kernel| bytes::attention(kernel, scale, flags >> 1, &keep, &bias);
    // a score's rounding (an ulp of it) moves a weight by that much of itself:
    // past ~1e12 the paths agree only to the rounding this check cannot see
    let bound = d as f64 * largest(&q) * largest(&k) * scale.map_or(1.0, f64::abs)
        + largest(
            &bias
                .clone()
                .into_shape_with_order((1, 1, l, s))
                .expect("same size"),
        );
    let slack = 1e-9 + 64.0 * f64::EPSILON * bound * (1.0 + largest(&v));
    // `dS = P ∘ (dP − D)` subtracts two sums of about `d_v·|dO|·|V|` that the
    // paths add in other orders: a few ulps of them, times what multiplies dS
    let sums = d_v as f64 * (1.0 + largest(&d_out)) * (1.0 + largest(&v));
    let reach = scale.map_or(1.0, f64::abs) * (l + s) as f64 * (1.0 + largest(&q) + largest(&k));
    let grad_slack = slack + 64.0 * f64::EPSILON * (1.0 + bound) * sums * (1.0 + reach);
    let compare = bound.is_finite() && bound < 1e9 && grad_slack.is_finite();

    let plain = build(Kernel::Plain);
    let fused = build(Kernel::Auto);
    let (lse, lse_plain) = (
        fused.forward_with_lse(&q, &k, &v),
        plain.forward_with_lse(&q, &k, &v),
    );
    let (grads, grads_plain) = (
        fused.backward_batched(&q, &k, &v, &d_out),
        plain.backward_batched(&q, &k, &v, &d_out),
    );
    both(&lse, &lse_plain, "forward", |f, p| {
        if compare {
            agree(&f.output, &p.output, slack, "output");
            agree(&f.lse, &p.lse, slack, "log-sum-exp");
        }
    });
    both(&grads, &grads_plain, "backward", |f, p| {
        if compare {
            agree(&f.q, &p.q, grad_slack, "dQ");
            agree(&f.k, &p.k, grad_slack, "dK");
            agree(&f.v, &p.v, grad_slack, "dV");
            for (f, p) in f.bias.iter().zip(&p.bias) {
                agree(f, p, grad_slack, "the bias's gradient");
            }
        }
    });
    if let (Ok(kept), Ok(again)) = (&lse, &grads) {
        let from_kept = fused
            .backward_with_lse(&q, &k, &v, kept, &d_out)
            .expect("the forward's own output and log-sum-exp");
        if compare {
            agree(&from_kept.q, &again.q, grad_slack, "dQ from a kept forward");
            agree(&from_kept.k, &again.k, grad_slack, "dK from a kept forward");
            agree(&from_kept.v, &again.v, grad_slack, "dV from a kept forward");
        }
    }

    // f32 and bf16: the same answer or the same error as f64
    let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
    let (q32, k32, v32, d32) = (narrow(&q), narrow(&k), narrow(&v), narrow(&d_out));
    let mut attn32 = ScaledDotProduct::<f32>::new();
    if let Some(scale) = scale {
        attn32 = attn32.with_scale(scale as f32);
    }
    let unmasked = flags & 0b11110 == 0;
    if unmasked {
        let plain64 = ScaledDotProduct::<f64>::new();
        let plain64 = match scale {
            Some(scale) => plain64.with_scale(scale),
            None => plain64,
        };
        let base = plain64.forward_batched(&q, &k, &v).is_ok();
        assert_eq!(
            attn32.forward_batched(&q32, &k32, &v32).is_ok(),
            base,
            "f32 forward"
        );
        assert_eq!(
            attn32.backward_batched(&q32, &k32, &v32, &d32).is_ok(),
            base,
            "f32 backward"
        );
        let half = |x: &Array4<f32>| x.mapv(bf16::from_f32);
        let mut attn16 = ScaledDotProduct::<bf16>::new();
        if let Some(scale) = scale {
            attn16 = attn16.with_scale(bf16::from_f64(scale));
        }
        let (q16, k16, v16, d16) = (half(&q32), half(&k32), half(&v32), half(&d32));
        let forward16 = attn16.forward_batched(&q16, &k16, &v16);
        // a scale that rounds to zero or infinity in bf16 is an error there only
        let scale16 = scale.map(|s| bf16::from_f64(s).to_f64());
        if scale16 == scale || !base {
            assert_eq!(forward16.is_ok(), base, "bf16 forward");
        }
        let _ = attn16.backward_batched(&q16, &k16, &v16, &d16);
    }

    // a program: the soft-cap and document masks, fused against the reference
    if let Ok(mask) = BlockMask::new(documents, [batch, heads, l, s]) {
        let flex = |kernel| {
            build(kernel)
                .with_score_mod(SoftCap::new(cap))
                .with_block_mask(&mask)
        };
        let (fused, plain) = (flex(Kernel::Auto), flex(Kernel::Plain));
        let (f, p) = (
            fused.backward(&q, &k, &v, &d_out),
            plain.backward(&q, &k, &v, &d_out),
        );
        both(&f, &p, "flex backward", |f, p| {
            if compare {
                agree(&f.q, &p.q, grad_slack, "flex dQ");
                agree(&f.k, &p.k, grad_slack, "flex dK");
                agree(&f.v, &p.v, grad_slack, "flex dV");
                let cap = grad_slack * (1.0 + bound);
                agree(&f.score, &p.score, cap, "the cap's gradient");
            }
        });
    }
});
