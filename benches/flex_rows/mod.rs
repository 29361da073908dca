//! The programmable-attention rows of `compare`: soft-capping (Gemma 2's) and
//! a packed batch of documents, attn's fused kernels against PyTorch doing the
//! same in eager mode (its CPU has no fused kernel for them: FlexAttention on a
//! CPU needs `torch.compile` and has no backward).

use std::process::Command;

use attn::flex::{BlockMask, Documents, SoftCap};
use attn::{Mask, ScaledDotProduct};
use ndarray::Array4;

/// Runs `benches/torch_flex.py` for `case`; the best seconds per call and
/// torch's version, or why not.
fn torch_seconds(
    python: &str,
    [n, threads, heads, dim]: [usize; 4],
    case: &str,
    min: f64,
) -> Result<f64, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_flex.py");
    let args = [n, threads, heads, dim].map(|x| x.to_string());
    let output = Command::new(python)
        .arg(script)
        .args(args)
        .args([case.to_string(), min.to_string()])
        .output()
        .map_err(|e| format!("absent: {python}: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.split_whitespace().next().unwrap_or("");
    first.parse().map_err(|_| {
        let why = String::from_utf8_lossy(&output.stderr);
        format!(
            "absent: {}",
            text.trim()
                .lines()
                .chain(why.lines())
                .last()
                .unwrap_or("no output")
        )
    })
}

/// Prints the table. `inputs(n, seed)` gives `(1, heads, n, dim)` arrays;
/// `best(min, f)` the best seconds of `f`; `pool(threads)` a thread pool.
pub fn print(
    python: &str,
    min: f64,
    quick: bool,
    inputs: fn(usize, u64) -> Array4<f32>,
    best: fn(f64, &mut dyn FnMut()) -> f64,
    pool: fn(usize) -> rayon::ThreadPool,
) {
    let (heads, dim) = (inputs(1, 0).dim().1, inputs(1, 0).dim().3);
    println!(
        "\nprogrammable attention (`attn::flex`), f32, {heads} heads, head_dim {dim}: ms per call, best of several"
    );
    println!(
        "soft-cap: Gemma 2's `20·tanh(s/20)` with causal masking, attn's score modification against the same formula in eager PyTorch (backward: attn's `backward_with_lse` from a kept forward, PyTorch's `out.backward` with the forward not timed); documents: 8 causal documents packed in N, attn's block mask against PyTorch SDPA with the boolean mask\n"
    );
    println!("| case | N | threads | attn | PyTorch | attn speed / PyTorch |");
    println!("|---|---|---|---|---|---|");
    let sizes: &[usize] = if quick { &[512] } else { &[512, 2048] };
    let softcap = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .with_score_mod(SoftCap::new(20.0_f32));
    let row = |case: &str, n: usize, threads: usize, ours: f64| {
        let torch = torch_seconds(python, [n, threads, heads, dim], case, min);
        let (cell, ratio) = match torch {
            Ok(s) => (format!("{:.2}", s * 1e3), format!("{:.2}×", s / ours)),
            Err(why) => (why, "–".to_string()),
        };
        println!(
            "| {case} | {n} | {threads} | {:.2} | {cell} | {ratio} |",
            ours * 1e3
        );
    };
    for &n in sizes {
        let (q, k, v, d_out) = (inputs(n, 1), inputs(n, 2), inputs(n, 3), inputs(n, 4));
        for threads in [1, 2] {
            let pool = pool(threads);
            let forward = pool.install(|| best(min, &mut || drop(softcap.forward(&q, &k, &v))));
            row("softcap_forward", n, threads, forward);
            let kept = softcap.forward_with_lse(&q, &k, &v).expect("shapes agree");
            let backward = pool.install(|| {
                best(min, &mut || {
                    drop(softcap.backward_with_lse(&q, &k, &v, &kept, &d_out))
                })
            });
            row("softcap_backward", n, threads, backward);
        }
    }
    let n = if quick { 1024 } else { 4096 };
    let (q, k, v) = (inputs(n, 1), inputs(n, 2), inputs(n, 3));
    let docs = Documents::from_lengths(&[n / 8; 8]).expect("lengths add up");
    let blocks = BlockMask::new(docs, [1, 1, n, n]).expect("a small mask");
    let packed = ScaledDotProduct::new()
        .with_mask(Mask::CausalTopLeft)
        .with_block_mask(&blocks);
    for threads in [1, 2] {
        let pool = pool(threads);
        let ours = pool.install(|| best(min, &mut || drop(packed.forward(&q, &k, &v))));
        row("documents_forward", n, threads, ours);
    }
}
