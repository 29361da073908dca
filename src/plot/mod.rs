//! Pictures of attention: labelled, annotated heatmaps and rows of them, as SVG
//! (always) and PNG (where a font for the text is found), and as coloured text
//! for a terminal. Behind the `plot` feature.

mod colormap;
mod curve;
mod figure;
#[cfg(test)]
mod fits;
mod heatmap;
mod output;

pub use colormap::Colormap;
pub use curve::Curve;
pub use figure::Figure;
pub use heatmap::Heatmap;
