//! Heatmaps as one picture: where each panel goes (rows at most [`MAX_WIDTH`]
//! wide, colour bars shared along a scale) and the SVG and PNG files; each
//! panel is drawn by `panel.rs`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::heatmap::Heatmap;
use super::output::{plot_error, register_font, with_path};
use super::panel::{AXIS_BAND, draw_axis_titles, draw_panel, panel_height, panel_width};
use crate::error::Result;

/// Heatmaps side by side, written as one picture: left to right, wrapping to a
/// new row before the picture grows wider than a screen ([`MAX_WIDTH`] pixels).
/// Neighbours in a row that share a colour scale (the same
/// [`with_range`](Heatmap::with_range), colour map and decimals) share one
/// colour bar, drawn right of the last of them.
///
/// # Examples
///
/// ```
/// use attn::plot::{Figure, Heatmap};
/// use ndarray::array;
///
/// let dir = std::env::temp_dir().join("attn-doc-figure");
/// std::fs::create_dir_all(&dir)?;
/// let figure = Figure::new(vec![
///     Heatmap::new("scores", &array![[1.0_f64, -1.0], [0.5, 0.0]]),
///     Heatmap::new("weights", &array![[0.88_f64, 0.12], [0.62, 0.38]]),
/// ]);
/// figure.save_svg(dir.join("panels.svg"))?;
/// assert!(std::fs::read_to_string(dir.join("panels.svg"))?.contains("weights"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    panels: Vec<Heatmap>,
}

/// The widest a [`Figure`] grows before its panels wrap to a new row, in pixels:
/// a screen's width, so that the picture is read at 100 % (a single panel wider
/// than this is drawn whole).
pub const MAX_WIDTH: u32 = 1600;

/// Where one panel goes: its top-left corner, and whether it draws its colour bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    x: u32,
    y: u32,
    legend: bool,
}

impl Figure {
    /// The panels, left to right.
    ///
    /// # Examples
    ///
    /// ```
    /// let figure = attn::plot::Figure::new(vec![attn::plot::Heatmap::new("a", &ndarray::Array2::<f64>::eye(2))]);
    /// assert_eq!(figure.size(), (2 * 64 + 96 + 84, 2 * 64 + 44 + 44));
    /// ```
    pub fn new(panels: Vec<Heatmap>) -> Self {
        Figure { panels }
    }

    /// Width and height of the picture in pixels.
    ///
    /// # Examples
    ///
    /// ```
    /// let figure = attn::plot::Figure::new(vec![]);
    /// assert_eq!(figure.size(), (1, 1));
    /// ```
    pub fn size(&self) -> (u32, u32) {
        self.layout().1
    }

    /// Where each panel goes, and the picture's width and height.
    fn layout(&self) -> (Vec<Place>, (u32, u32)) {
        let mut places = Vec::with_capacity(self.panels.len());
        let (mut x, mut y, mut row_height, mut width) = (0, 0, 0, 0);
        for (i, panel) in self.panels.iter().enumerate() {
            let shares = self
                .panels
                .get(i + 1)
                .is_some_and(|next| same_scale(panel, next));
            // wrap on the width with the bar, which a panel sharing its bar still
            // draws if the bar's owner wraps away
            if x > 0 && x + panel_width(panel, true) > MAX_WIDTH {
                (x, y) = (0, y + row_height);
                row_height = 0;
            }
            places.push(Place {
                x,
                y,
                legend: !shares,
            });
            x += panel_width(panel, !shares);
            width = width.max(x);
            row_height = row_height.max(panel_height(panel));
        }
        // a shared bar whose owner wrapped to the next row is drawn where it is
        for i in 0..places.len().saturating_sub(1) {
            if !places[i].legend && places[i + 1].y != places[i].y {
                places[i].legend = true;
            }
        }
        let width = places
            .iter()
            .zip(&self.panels)
            .map(|(p, panel)| p.x + panel_width(panel, p.legend))
            .max()
            .unwrap_or(width);
        (places, (width.max(1), (y + row_height).max(1)))
    }

    /// Writes the figure as SVG (text stays text: no font is needed).
    ///
    /// # Errors
    ///
    /// [`Error::Plot`](crate::Error::Plot) when the file cannot be written.
    ///
    /// # Examples
    ///
    /// ```
    /// let path = std::env::temp_dir().join("attn-doc-eye.svg");
    /// attn::plot::Figure::new(vec![attn::plot::Heatmap::new("eye", &ndarray::Array2::<f64>::eye(2))]).save_svg(&path)?;
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let root = SVGBackend::new(path, self.size()).into_drawing_area();
        self.draw_on(&root)
            .and_then(|_| root.present().map_err(plot_error))
            .map_err(|e| with_path(e, path))
    }

    /// Writes the figure as PNG. The text needs a TrueType font: `ATTN_FONT`
    /// (a path) if set, else DejaVu Sans or Liberation Sans where the system has them.
    ///
    /// # Errors
    ///
    /// [`Error::Plot`](crate::Error::Plot) when no font is found or the file cannot be written; the SVG
    /// has the same picture.
    ///
    /// # Examples
    ///
    /// ```
    /// let path = std::env::temp_dir().join("attn-doc-eye.png");
    /// let figure = attn::plot::Figure::new(vec![attn::plot::Heatmap::new("eye", &ndarray::Array2::<f64>::eye(2))]);
    /// match figure.save_png(&path) {
    ///     Ok(()) => assert!(path.exists()),
    ///     Err(e) => println!("no PNG here: {e}"),
    /// }
    /// ```
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        register_font()?;
        let root = BitMapBackend::new(path, self.size()).into_drawing_area();
        self.draw_on(&root)
            .and_then(|_| root.present().map_err(plot_error))
            .map_err(|e| with_path(e, path))
    }

    /// Draws the figure on `root`, any plotters backend [`size`](Self::size)
    /// pixels large (what [`save_svg`](Self::save_svg) and
    /// [`save_png`](Self::save_png) do with theirs): to place it in a larger
    /// picture, or to draw where plotters draws. A bitmap backend needs the font
    /// registered first ([`register_font`](super::register_font)).
    ///
    /// # Errors
    ///
    /// [`Error::Plot`](crate::Error::Plot) when the backend fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::plotters::prelude::*;
    /// use attn::plot::{Figure, Heatmap};
    ///
    /// let figure = Figure::new(vec![Heatmap::new("eye", &ndarray::Array2::<f64>::eye(2))]);
    /// let mut svg = String::new();
    /// {
    ///     let root = SVGBackend::with_string(&mut svg, figure.size()).into_drawing_area();
    ///     figure.draw_on(&root)?;
    ///     root.present().expect("an SVG string takes every drawing");
    /// }
    /// assert!(svg.contains("eye"));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(plot_error)?;
        let (places, _) = self.layout();
        for (panel, place) in self.panels.iter().zip(places) {
            let width = panel_width(panel, place.legend);
            let corner = (place.x as i32, place.y as i32);
            let area = root.clone().shrink(corner, (width, panel_height(panel)));
            match &panel.axis_titles {
                None => draw_panel(&area, panel, place.legend).map_err(plot_error)?,
                Some((rows, cols)) => {
                    let band = AXIS_BAND as i32;
                    let (w, h) = area.dim_in_pixel();
                    let inner = area
                        .clone()
                        .shrink((band, 0), (w - AXIS_BAND, h - AXIS_BAND));
                    draw_panel(&inner, panel, place.legend).map_err(plot_error)?;
                    draw_axis_titles(&area, panel, rows, cols).map_err(plot_error)?;
                }
            }
        }
        Ok(())
    }
}

/// Whether two panels draw their values on one colour scale: a range set on both,
/// the same, with the same colour map and decimals.
fn same_scale(a: &Heatmap, b: &Heatmap) -> bool {
    a.scale.is_some() && a.scale == b.scale && a.colormap == b.colormap && a.decimals == b.decimals
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Panels wrap before the picture passes a screen's width; neighbours on one
    /// colour scale share the last one's colour bar, unless it wrapped away.
    #[test]
    fn panels_wrap_at_a_screens_width_and_share_a_scales_bar() {
        let weights = |title: &str| {
            Heatmap::new(title, &ndarray::Array2::<f64>::zeros((5, 5))).with_range(0.0, 1.0)
        };
        // one panel of 5 cells: 5·64 + 96 + 84 = 500 pixels with its bar
        assert_eq!(panel_width(&weights("a"), true), 500);
        let alone = Figure::new(vec![weights("a")]);
        assert_eq!(alone.size(), (500, 5 * 64 + 44 + 44));
        // five on one scale: 4 × (5·64 + 96 + 24) + 500 = 2260 > 1600, so three
        // fit the first row (440 + 440 + 440 = 1320, a fourth would pass 1600)
        let five = Figure::new((0..5).map(|i| weights(&format!("head {i}"))).collect());
        let (places, (width, height)) = five.layout();
        assert!(width <= MAX_WIDTH, "{width}");
        assert_eq!(height, 2 * (5 * 64 + 44 + 44));
        let rows: Vec<u32> = places.iter().map(|p| p.y).collect();
        assert_eq!(rows, [0, 0, 0, 408, 408]);
        // the last of each row draws the bar: the third's owner wrapped away
        let legends: Vec<bool> = places.iter().map(|p| p.legend).collect();
        assert_eq!(legends, [false, false, true, false, true]);
        // panels on their own scales keep their own bars
        let own = Figure::new(vec![
            Heatmap::new("x", &ndarray::Array2::<f64>::eye(2)),
            Heatmap::new("y", &ndarray::Array2::<f64>::eye(2)),
        ]);
        assert!(own.layout().0.iter().all(|p| p.legend));
    }
}
