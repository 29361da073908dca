//! Cross-attention in CrossViT (arXiv 2103.14899): two branches of patch
//! tokens of different sizes; the CLS token of the large-patch branch is the one
//! query of a multi-head cross-attention over the small-patch branch. Then the
//! cost claim: one query costs O(N), all-to-all attention O(N²), measured as N doubles.
//! The picture shows where the CLS token looks: each head's weights over the 12 × 12
//! grid of small patches, on one colour scale (`cross_vit.svg`/`.png`).
//!
//! `cargo run --release --example cross_vit [OUTPUT_DIR]`

mod common;

use std::time::Instant;

use attn::plot::{Figure, Heatmap};
use attn::rng::seeded;
use attn::{Init, MultiHeadConfig};
use ndarray::{Array2, Array3, Axis, concatenate, s};
use rand::Rng;

/// Tokens of one branch: a CLS row followed by one row per patch.
fn branch(patches: usize, dim: usize, seed: u64) -> Array2<f32> {
    let mut rng = seeded(seed);
    Array2::from_shape_simple_fn((patches + 1, dim), || rng.random_range(-1.0..1.0))
}

/// The small branch's patches per side: a 96 × 96 image in 8 × 8 patches.
pub const GRID: usize = 12;

/// Every step of the CLS exchange, with the shapes along the way.
pub struct Exchange {
    pub steps: Vec<(String, Vec<usize>)>,
    pub new_cls: Array2<f32>,
    /// Each head's weights over the keys `[f(CLS); 144 small patches]`, `(heads, 1, 145)`.
    pub weights: Array3<f32>,
}

impl Exchange {
    /// Head `h`'s weights over the small patches, laid out as the image's grid.
    pub fn patch_grid(&self, h: usize) -> Array2<f32> {
        self.weights
            .slice(s![h, 0, 1..])
            .to_owned()
            .into_shape_with_order((GRID, GRID))
            .expect("144 patches make a 12 × 12 grid")
    }
}

/// The large branch's CLS token cross-attends to the small branch's tokens.
pub fn cls_exchange() -> attn::Result<Exchange> {
    let (small_dim, large_dim, heads) = (64, 128, 4);
    let small = branch(144, small_dim, 1); // 96×96 image, 8×8 patches
    let large = branch(36, large_dim, 2); // 96×96 image, 16×16 patches
    let mut rng = seeded(3);
    let f: Array2<f32> = Init::XavierUniform.sample((large_dim, small_dim), &mut rng)?; // large → small width
    let g: Array2<f32> = Init::XavierUniform.sample((small_dim, large_dim), &mut rng)?; // back
    let attention =
        MultiHeadConfig::new(small_dim, heads).random::<f32>(Init::TorchMultihead, 4)?;

    let mut steps = vec![
        (
            "small branch: CLS + 144 patch tokens".to_string(),
            small.shape().to_vec(),
        ),
        (
            "large branch: CLS + 36 patch tokens".to_string(),
            large.shape().to_vec(),
        ),
    ];
    let cls = large.slice(s![0..1, ..]);
    let query = cls.dot(&f);
    steps.push((
        "large CLS projected to the small width, f(CLS)".into(),
        query.shape().to_vec(),
    ));
    let context = concatenate(Axis(0), &[query.view(), small.slice(s![1.., ..])])
        .map_err(|_| shape_error())?;
    steps.push((
        "keys/values: [f(CLS); small patch tokens]".into(),
        context.shape().to_vec(),
    ));
    let out = attention.forward_with_weights(&query, &context, &context, &[])?;
    steps.push((
        format!("multi-head cross-attention output ({heads} heads)"),
        out.output.shape().to_vec(),
    ));
    steps.push((
        "attention weights per head (heads, 1, S)".into(),
        out.head_weights.shape().to_vec(),
    ));
    let new_cls = &cls + &out.output.dot(&g);
    steps.push((
        "g(output) + CLS: the new large CLS".into(),
        new_cls.shape().to_vec(),
    ));
    Ok(Exchange {
        steps,
        new_cls,
        weights: out.head_weights,
    })
}

fn shape_error() -> attn::Error {
    attn::Error::InvalidConfig {
        reason: "tokens of one width concatenate".into(),
    }
}

/// Best time of a few calls, in seconds.
fn time(mut f: impl FnMut() -> attn::Result<()>) -> attn::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

#[allow(dead_code)]
fn main() -> attn::Result<()> {
    common::help(include_str!("cross_vit.rs"), &[]);
    let exchange = cls_exchange()?;
    for (step, shape) in &exchange.steps {
        println!("{step:<52} {shape:?}");
    }
    // where the CLS token looks, head by head, on one colour scale
    let heads = exchange.weights.dim().0;
    let top = exchange
        .weights
        .slice(s![.., .., 1..])
        .fold(0.0_f32, |m, &w| m.max(w));
    let panels: Vec<Heatmap> = (0..heads)
        .map(|h| {
            let own = exchange.weights[[h, 0, 0]];
            Heatmap::new(
                &format!("head {h}: CLS over the 12×12 small patches (itself: {own:.3})"),
                &exchange.patch_grid(h),
            )
            .with_row_labels((0..GRID).map(|r| format!("row {r}")))
            .with_col_labels((0..GRID).map(|c| c.to_string()))
            .with_decimals(3)
            .with_range(0.0, f64::from(top))
            .with_axis_titles("patch row", "patch column")
        })
        .collect();
    println!(
        "\nthe CLS query's weights over the small patches, per head (uniform would be {:.4}):",
        1.0 / 145.0
    );
    for panel in &panels {
        common::show_once(panel);
    }
    common::save(&Figure::new(panels), "cross_vit");

    println!(
        "\nOne query (CLS) against N tokens vs all N tokens against each other, d_model 64, 4 heads:"
    );
    println!(
        "{:>6} {:>14} {:>8} {:>16} {:>8}",
        "N", "CLS only", "ratio", "all-to-all", "ratio"
    );
    let attention = MultiHeadConfig::new(64, 4).random::<f32>(Init::TorchMultihead, 5)?;
    let mut previous: Option<(f64, f64)> = None;
    for n in [256, 512, 1024, 2048, 4096] {
        let tokens = branch(n - 1, 64, n as u64);
        let cls = tokens.slice(s![0..1, ..]);
        let one = time(|| attention.forward(&cls, &tokens, &tokens, &[]).map(drop))?;
        let all = time(|| attention.forward(&tokens, &tokens, &tokens, &[]).map(drop))?;
        let ratio = |now: f64, before: Option<f64>| {
            before.map_or("".to_string(), |b| format!("{:.1}×", now / b))
        };
        println!(
            "{n:>6} {:>11.1} µs {:>8} {:>13.2} ms {:>8}",
            one * 1e6,
            ratio(one, previous.map(|p| p.0)),
            all * 1e3,
            ratio(all, previous.map(|p| p.1))
        );
        previous = Some((one, all));
    }
    println!(
        "doubling N about doubles the cost of one query (O(N)) and about quadruples all-to-all"
    );
    println!("(O(N²)); the key/value projections, O(N) in both, blur the ratios at small N.");
    Ok(())
}
