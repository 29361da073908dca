//! What every demo does with its numbers: print them as tables, colour them in a
//! terminal, and save pictures.
#![allow(dead_code)]

use std::io::IsTerminal;
use std::path::PathBuf;

use attn::plot::{Figure, Heatmap};

/// Where pictures go: the first command-line argument that is not a `--flag` or a
/// flag's value, or `target/attn-plots/`.
pub fn output_dir() -> PathBuf {
    let mut args = std::env::args().skip(1);
    let mut chosen = None;
    while let Some(arg) = args.next() {
        if arg.starts_with("--") {
            args.next(); // the flag's value
        } else {
            chosen = Some(PathBuf::from(arg));
            break;
        }
    }
    let dir = chosen.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("attn-plots")
    });
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// Prints a labelled table.
pub fn show(map: &Heatmap) {
    println!("{}", map.to_table());
}

/// Prints a compact coloured heatmap when standard output is a terminal.
pub fn show_in_colour(map: &Heatmap) {
    if std::io::stdout().is_terminal() {
        println!("{}", map.to_terminal());
    }
}

/// Saves `figure` as `NAME.svg` and, where a font is found, `NAME.png`, and says where.
pub fn save(figure: &Figure, name: &str) {
    let dir = output_dir();
    let svg = dir.join(format!("{name}.svg"));
    match figure.save_svg(&svg) {
        Ok(()) => println!("wrote {}", svg.display()),
        Err(e) => eprintln!("{e}"),
    }
    let png = dir.join(format!("{name}.png"));
    match figure.save_png(&png) {
        Ok(()) => println!("wrote {}", png.display()),
        Err(e) => println!("no PNG: {e}"),
    }
}
