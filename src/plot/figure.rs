//! A row of heatmaps as one picture: the layout of each panel (cells, labels,
//! axis titles, colour bar) and the SVG and PNG files.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::colormap::{colour, is_dark};
use super::heatmap::Heatmap;
use super::output::{plot_error, register_font, with_path};
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

/// Pixels per cell, and the bands around the cells of a panel.
const CELL: u32 = 64;
const TITLE_BAND: u32 = 44;
const LEFT_BAND: u32 = 96;
const BOTTOM_BAND: u32 = 44;
const LEGEND_BAND: u32 = 84;
/// The gap that stands in for a colour bar a panel shares with its right-hand
/// neighbour.
const SHARED_GAP: u32 = 24;

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

/// The band an axis title takes, left of the row labels and below the column labels.
const AXIS_BAND: u32 = 24;

/// Whether two panels draw their values on one colour scale: a range set on both,
/// the same, with the same colour map and decimals.
fn same_scale(a: &Heatmap, b: &Heatmap) -> bool {
    a.scale.is_some() && a.scale == b.scale && a.colormap == b.colormap && a.decimals == b.decimals
}

/// A panel's width, with its colour bar or the gap left where it shares one.
fn panel_width(h: &Heatmap, legend: bool) -> u32 {
    let titles = if h.axis_titles.is_some() {
        AXIS_BAND
    } else {
        0
    };
    let right = if legend { legend_band(h) } else { SHARED_GAP };
    h.values.ncols() as u32 * cell_width(h) + LEFT_BAND + right + titles
}

/// The colour bar and its tick labels: wide enough for the longest label (the
/// ticks are drawn 34 pixels right of the cells, about 8 pixels a character).
fn legend_band(h: &Heatmap) -> u32 {
    let (lo, hi) = h.range();
    LEGEND_BAND.max(44 + 8 * longest_number(h, &[lo, hi]))
}

/// Characters in the longest of `values` as the picture draws them.
fn longest_number<'v>(h: &Heatmap, values: impl IntoIterator<Item = &'v f64>) -> u32 {
    values
        .into_iter()
        .map(|&v| drawn_number(v, h.decimals).chars().count())
        .max()
        .unwrap_or(0) as u32
}

/// Rows or columns past which a panel's cells shrink, so that a big grid (ViT's
/// 12 × 12 patches) stays about as wide as 8 cells of [`CELL`].
const BIG_GRID: u32 = 8;

/// The smallest a shrunk cell gets, in pixels.
const MIN_CELL: u32 = 20;

/// A panel's cells: width and height in pixels, and whether each shows its number.
/// Up to [`BIG_GRID`] rows and columns a cell is [`CELL`] square, or wider where
/// its number needs it (about 8 pixels a character, 4 either side). A bigger grid
/// has square cells that shrink with it, and numbers only where they fit: the
/// colour bar then reads the values.
fn cells(h: &Heatmap) -> (u32, u32, bool) {
    let (rows, cols) = h.values.dim();
    let longest = rows.max(cols) as u32;
    let text = 8 * longest_number(h, &h.values) + 8;
    if longest <= BIG_GRID {
        return (CELL.max(text), CELL, true);
    }
    let side = (BIG_GRID * CELL / longest).max(MIN_CELL);
    (side, side, text <= side)
}

/// Pixels across a cell.
fn cell_width(h: &Heatmap) -> u32 {
    cells(h).0
}

/// Pixels down a cell.
fn cell_height(h: &Heatmap) -> u32 {
    cells(h).1
}

fn panel_height(h: &Heatmap) -> u32 {
    let titles = if h.axis_titles.is_some() {
        AXIS_BAND
    } else {
        0
    };
    h.values.nrows() as u32 * cell_height(h) + TITLE_BAND + BOTTOM_BAND + titles
}

/// The row title upright along the rows, the column title centred below the columns.
fn draw_axis_titles<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &Heatmap,
    rows: &str,
    cols: &str,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (n_rows, n_cols) = h.values.dim();
    let (cell, cell_x) = (cell_height(h) as i32, cell_width(h) as i32);
    let font = sans(15.0, FontStyle::Italic).color(&BLACK);
    let centred = Pos::new(HPos::Center, VPos::Center);
    let middle_of_rows = TITLE_BAND as i32 + cell * n_rows as i32 / 2;
    // just left of the widest row label (about 8 pixels a character at 14 points)
    let widest = h.rows.iter().map(|r| r.chars().count()).max().unwrap_or(0) as i32;
    let x = ((AXIS_BAND + LEFT_BAND) as i32 - 16 - 8 * widest).max(AXIS_BAND as i32 / 2);
    area.draw(&Text::new(
        rows.to_string(),
        (x, middle_of_rows),
        font.clone()
            .transform(FontTransform::Rotate270)
            .pos(centred),
    ))?;
    let middle_of_cols = (AXIS_BAND + LEFT_BAND) as i32 + cell_x * n_cols as i32 / 2;
    let below_labels =
        (TITLE_BAND + BOTTOM_BAND) as i32 + cell * n_rows as i32 + AXIS_BAND as i32 / 2 - 4;
    area.draw(&Text::new(
        cols.to_string(),
        (middle_of_cols, below_labels),
        font.pos(centred),
    ))?;
    Ok(())
}

/// The sans-serif font in `style`, its face looked up by that style (plotters'
/// `FontDesc::style` changes the style but keeps the face it was made with, so a
/// bold title would be set in the regular face).
pub(super) fn sans(size: f64, style: FontStyle) -> FontDesc<'static> {
    FontDesc::new(FontFamily::Name("sans-serif"), size, style)
}

/// A number as a picture shows it: the true minus sign (U+2212), level with the
/// digits, where the hyphen would sit small and high.
pub(super) fn drawn_number(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}").replace('-', "\u{2212}")
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &Heatmap,
    legend: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (lo, hi) = h.range();
    let (rows, cols) = h.values.dim();
    let (left, top) = (LEFT_BAND as i32, TITLE_BAND as i32);
    let (cell_x, cell, numbers) = cells(h);
    let (cell_x, cell) = (cell_x as i32, cell as i32);
    let centred = Pos::new(HPos::Center, VPos::Center);
    let title = sans(18.0, FontStyle::Bold).color(&BLACK).pos(centred);
    area.draw(&Text::new(
        h.title.clone(),
        (left + cell_x * cols as i32 / 2, top / 2),
        title,
    ))?;
    let label = ("sans-serif", 14).into_font().color(&BLACK);
    for (i, name) in h.rows.iter().enumerate() {
        let y = top + cell * i as i32 + cell / 2;
        area.draw(&Text::new(
            name.clone(),
            (left - 8, y),
            label.clone().pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    for (j, name) in h.cols.iter().enumerate() {
        let x = left + cell_x * j as i32 + cell_x / 2;
        let y = top + cell * rows as i32 + 14;
        area.draw(&Text::new(
            name.clone(),
            (x, y),
            label.clone().pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    for ((i, j), &x) in h.values.indexed_iter() {
        let (x0, y0) = (left + cell_x * j as i32, top + cell * i as i32);
        area.draw(&Rectangle::new(
            [(x0, y0), (x0 + cell_x, y0 + cell)],
            colour(h.colormap, x, lo, hi).filled(),
        ))?;
        if !numbers {
            continue;
        }
        let ink = if is_dark(h.colormap, x, lo, hi) {
            WHITE
        } else {
            BLACK
        };
        let text = drawn_number(x, h.decimals);
        let style = ("monospace", 13).into_font().color(&ink).pos(centred);
        area.draw(&Text::new(text, (x0 + cell_x / 2, y0 + cell / 2), style))?;
    }
    if !legend {
        return Ok(());
    }
    // the legend: the colour scale from the smallest to the largest value
    let (bar_x, bar_top, bar_height) = (
        left + cell_x * cols as i32 + 14,
        top,
        (cell * rows as i32).max(40),
    );
    let steps = 64;
    for s in 0..steps {
        let t = 1.0 - (s as f64 + 0.5) / steps as f64;
        let y0 = bar_top + bar_height * s / steps;
        let y1 = bar_top + bar_height * (s + 1) / steps;
        area.draw(&Rectangle::new(
            [(bar_x, y0), (bar_x + 16, y1)],
            colour(h.colormap, lo + t * (hi - lo), lo, hi).filled(),
        ))?;
    }
    let tick = ("monospace", 12)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let legend_text = |v: f64| drawn_number(v, h.decimals);
    // five ticks, ends included
    for k in 0..=4 {
        let t = k as f64 / 4.0;
        let y = bar_top + bar_height - ((bar_height - 12) as f64 * t) as i32 - 6;
        area.draw(&Text::new(
            legend_text(lo + t * (hi - lo)),
            (bar_x + 20, y),
            tick.clone(),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_colour_bar_is_as_wide_as_its_longest_label() {
        let x = ndarray::array![[-1234.5_f64, 1.0]];
        let (short, long) = (
            Heatmap::new("x", &x).with_decimals(0),
            Heatmap::new("x", &x).with_decimals(7),
        );
        // "−1234.5000000": 13 characters, 8 pixels each, after the 44 of the bar
        assert_eq!(legend_band(&long), 44 + 8 * 13);
        assert_eq!(legend_band(&short), LEGEND_BAND);
        assert!(panel_width(&long, true) > panel_width(&short, true));
    }

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

    /// A grid past 8 rows or columns keeps about 8 cells' width, its cells
    /// square, with numbers only where they fit.
    #[test]
    fn big_grids_shrink_their_cells() {
        let small = Heatmap::new("s", &ndarray::Array2::<f64>::zeros((3, 8))).with_decimals(3);
        assert_eq!(cells(&small), (CELL, CELL, true));
        let vit = Heatmap::new("v", &ndarray::Array2::<f64>::zeros((12, 12))).with_decimals(3);
        // 8·64/12 = 42 pixels; "0.000" needs 5·8 + 8 = 48: no numbers
        assert_eq!(cells(&vit), (42, 42, false));
        let vit = vit.with_decimals(1);
        assert_eq!(cells(&vit), (42, 42, true));
        let huge = Heatmap::new("h", &ndarray::Array2::<f64>::zeros((2, 100)));
        assert_eq!(cells(&huge).0, MIN_CELL);
    }

    #[test]
    fn pictures_draw_numbers_with_a_true_minus_sign() {
        assert_eq!(drawn_number(-0.5, 3), "\u{2212}0.500");
        assert_eq!(drawn_number(2.25, 1), "2.2");
        assert_eq!(drawn_number(0.0, 2), "0.00");
    }
}
