//! Pictures of attention: labelled, annotated heatmaps and rows of them, as SVG
//! (always) and PNG (where a font for the text is found), and as coloured text
//! for a terminal. Behind the `plot` feature.

mod colormap;
mod curve;
mod figure;
mod heatmap;
mod output;
mod panel;

/// The plotters version the pictures are drawn with, for
/// [`Figure::draw_on`] and [`Curve::draw_on`] on a backend of your own.
pub use plotters;

pub use colormap::Colormap;
pub use curve::Curve;
pub use figure::{Figure, MAX_WIDTH};
pub use heatmap::Heatmap;
pub use output::register_font;
