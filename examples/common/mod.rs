//! What every demo does with its numbers: print them as tables, colour them in a
//! terminal, and save pictures.
#![allow(dead_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use attn::plot::{Figure, Heatmap};

/// The usage text of an example: the `//!` lines at the top of its source.
pub fn usage(source: &str) -> String {
    source
        .lines()
        .take_while(|line| line.starts_with("//!"))
        .map(|line| line.trim_start_matches("//!").trim_start_matches(' '))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Answers `--help` (or `-h`) with the example's usage (`source` is its own
/// text: `include_str!("NAME.rs")`) and exits; refuses, with exit code 2, a flag
/// that is not one of `flags`.
pub fn help(source: &str, flags: &[&str]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        // (a closed pipe, as in `--help | head`, is no error of the example's)
        let _ = writeln!(std::io::stdout(), "{}", usage(source));
        std::process::exit(0);
    }
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if flags.contains(&arg.as_str()) {
            args.next(); // its value
        } else if arg.starts_with('-') {
            let takes = if flags.is_empty() {
                "no flags, only an output directory".to_string()
            } else {
                flags.join(", ")
            };
            eprintln!("unknown flag {arg}: this example takes {takes} (see --help)");
            std::process::exit(2);
        }
    }
}

/// Where pictures go: the first command-line argument that is not a `--flag` or a
/// flag's value, or `attn-plots/` in the target directory (`CARGO_TARGET_DIR`
/// when it is set, else `target/` in the crate).
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
    let dir = chosen.unwrap_or_else(|| target_dir().join("attn-plots"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// The target directory: `CARGO_TARGET_DIR` when it is set (relative to the
/// crate, as cargo reads it), else `target/` in the crate.
pub fn target_dir() -> PathBuf {
    let krate = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => krate.join(dir),
        _ => krate.join("target"),
    }
}

/// Prints a labelled table.
pub fn show(map: &Heatmap) {
    println!("{}", map.to_table());
}

/// Prints a compact coloured heatmap of a table already printed, when standard
/// output is a terminal (in a file or a pipe the table says it all).
pub fn show_in_colour(map: &Heatmap) {
    if std::io::stdout().is_terminal() {
        println!("{}", map.to_terminal());
    }
}

/// Prints a heatmap shown nowhere else: in colour when standard output is a
/// terminal, else (a file, a pipe) as a plain table.
pub fn show_once(map: &Heatmap) {
    println!("{}", once(map, std::io::stdout().is_terminal()));
}

/// What [`show_once`] prints, on a terminal or not.
pub fn once(map: &Heatmap, terminal: bool) -> String {
    if terminal {
        map.to_terminal()
    } else {
        map.to_table()
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
