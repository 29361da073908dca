//! Writing pictures: the error of a drawing, the file it was for, and the font
//! that PNG text needs.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

pub(crate) fn plot_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Plot {
        reason: e.to_string(),
    }
}

pub(crate) fn with_path(e: Error, path: &Path) -> Error {
    match e {
        Error::Plot { reason } => Error::Plot {
            reason: format!("{}: {reason}", path.display()),
        },
        other => other,
    }
}

/// Registers a TrueType font as "sans-serif" for PNG text, once, and its
/// monospaced sibling (where there is one) as "monospace", for numbers: its
/// digits are all one width, so the columns of a cell's digits stay even.
pub(crate) fn register_system_font() -> Result<()> {
    use std::sync::OnceLock;
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = std::env::var("ATTN_FONT").into_iter().chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/Library/Fonts/Arial.ttf",
                "C:\\Windows\\Fonts\\arial.ttf",
            ]
            .map(String::from),
        );
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                for style in [FontStyle::Normal, FontStyle::Bold, FontStyle::Italic] {
                    plotters::style::register_font("sans-serif", style, bytes)
                        .map_err(|_| format!("{path} is not a font plotters can read"))?;
                }
                let mono = path.replace("DejaVuSans.ttf", "DejaVuSansMono.ttf");
                let mono: &'static [u8] = match std::fs::read(&mono) {
                    Ok(mono) if mono.len() > 1000 => Box::leak(mono.into_boxed_slice()),
                    _ => bytes,
                };
                plotters::style::register_font("monospace", FontStyle::Normal, mono)
                    .map_err(|_| format!("{path} is not a font plotters can read"))?;
                return Ok(());
            }
        }
        Err("no TrueType font found for PNG text (set ATTN_FONT to a .ttf file)".to_string())
    })
    .clone()
    .map_err(|reason| Error::Plot { reason })
}
