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

/// Registers a TrueType font with plotters as "sans-serif", once, with its bold
/// and oblique faces (titles, axis titles) and its monospaced sibling as
/// "monospace", for numbers (its digits are all one width, so the columns of a
/// cell's digits stay even), where the family has them: `ATTN_FONT` (a path) if
/// set, else DejaVu Sans or Liberation Sans where the system has them.
///
/// The `save_png` calls and [`Curve`](super::Curve)'s calls do it themselves;
/// call it before drawing with [`Figure::draw_on`](super::Figure::draw_on) on
/// a bitmap backend of your own.
///
/// # Errors
///
/// [`Error::Plot`] when no font is found, or plotters cannot read it (the same
/// error on every call).
///
/// # Examples
///
/// ```
/// match attn::plot::register_font() {
///     Ok(()) => println!("PNG text will be drawn"),
///     Err(e) => println!("SVG only here: {e}"),
/// }
/// ```
pub fn register_font() -> Result<()> {
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
                let regular: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                // a sibling file in the same family where there is one (DejaVu's
                // names), else the regular face
                let sibling = |name: &str| -> &'static [u8] {
                    let Some(dir) = path.strip_suffix("DejaVuSans.ttf") else {
                        return regular;
                    };
                    match std::fs::read(format!("{dir}{name}")) {
                        Ok(bytes) if bytes.len() > 1000 => Box::leak(bytes.into_boxed_slice()),
                        _ => regular,
                    }
                };
                let faces = [
                    ("sans-serif", FontStyle::Normal, regular),
                    (
                        "sans-serif",
                        FontStyle::Bold,
                        sibling("DejaVuSans-Bold.ttf"),
                    ),
                    (
                        "sans-serif",
                        FontStyle::Italic,
                        sibling("DejaVuSans-Oblique.ttf"),
                    ),
                    (
                        "monospace",
                        FontStyle::Normal,
                        sibling("DejaVuSansMono.ttf"),
                    ),
                ];
                for (family, style, bytes) in faces {
                    plotters::style::register_font(family, style, bytes)
                        .map_err(|_| format!("{path} is not a font plotters can read"))?;
                }
                return Ok(());
            }
        }
        Err("no TrueType font found for PNG text (set ATTN_FONT to a .ttf file)".to_string())
    })
    .clone()
    .map_err(|reason| Error::Plot { reason })
}
