//! Seed 003, "Tokyo is beautiful": self-attention over three tokens, step by step.
//!
//! Run with `cargo run --release --example tokyo`.

use attn::ScaledDotProduct;
use ndarray::{array, Array2};

/// `torch.manual_seed(42); torch.randn(4, 4)` three times, as the seed's notebook draws them.
#[allow(clippy::excessive_precision)] // the digits PyTorch prints
fn torch_weights() -> [Array2<f32>; 3] {
    let w_q = array![
        [1.9269153, 1.4872841, 0.9007172, -2.1055210],
        [0.6784185, -1.2345449, -0.0430675, -1.6046669],
        [-0.7521353, 1.6487230, -0.3924786, -1.4036071],
        [-0.7278813, -0.5594302, -0.7688389, 0.7624454]
    ];
    let w_k = array![
        [1.6423169, -0.1595975, -0.4973975, 0.4395893],
        [-0.7581311, 1.0783176, 0.8008006, 1.6806206],
        [1.2791244, 1.2964228, 0.6104665, 1.3347378],
        [-0.2316243, 0.0417595, -0.2515753, 0.8598585]
    ];
    let w_v = array![
        [-1.3846737, -0.8712361, -0.2233659, 1.7173615],
        [0.3188803, -0.4245190, 0.3057209, -0.7745925],
        [-1.5575725, 0.9956361, -0.8797858, -0.6011420],
        [-1.2741512, 2.1227851, -1.2346531, -0.4879139]
    ];
    [w_q, w_k, w_v]
}

fn print_table(title: &str, rows: &[&str], cols: &[String], m: &Array2<f32>) {
    println!("{title}");
    print!("{:>10}", "");
    for c in cols {
        print!("{c:>11}");
    }
    println!();
    for (name, row) in rows.iter().zip(m.rows()) {
        print!("{name:>10}");
        for x in row {
            print!("{x:>11.6}");
        }
        println!();
    }
    println!();
}

fn main() -> Result<(), attn::Error> {
    let tokens = ["Tokyo", "is", "beautiful"];
    let x: Array2<f32> = array![
        [1.0, 0.5, 0.3, 0.2],
        [0.2, 0.1, 0.9, 0.7],
        [0.8, 0.3, 0.2, 0.4]
    ];
    let [w_q, w_k, w_v] = torch_weights();
    let (q, k, v) = (x.dot(&w_q), x.dot(&w_k), x.dot(&w_v));

    let trace = ScaledDotProduct::new().trace(&q, &k, &v)?;

    let dims: Vec<String> = (0..x.ncols()).map(|d| format!("dim {d}")).collect();
    let keys: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    print_table("input embeddings x", &tokens, &dims, &x);
    print_table("scores QKᵀ/√d_k", &tokens, &keys, &trace.scaled);
    print_table(
        "attention weights softmax(QKᵀ/√d_k)",
        &tokens,
        &keys,
        &trace.weights,
    );
    print_table("output weights·V", &tokens, &dims, &trace.output);
    Ok(())
}
