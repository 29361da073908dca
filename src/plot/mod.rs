//! Pictures of attention: labelled, annotated heatmaps and rows of them, as SVG
//! (always) and PNG (where a font for the text is found), and as coloured text
//! for a terminal. Behind the `plot` feature.

use std::path::Path;

use ndarray::{Array2, ArrayRef2};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

mod colormap;
mod curve;
mod output;

pub use colormap::Colormap;
pub use curve::Curve;

use output::{plot_error, register_system_font, with_path};

use crate::element::Element;
use crate::error::Result;

/// One matrix drawn as a heatmap: a title, row and column labels, and each cell
/// annotated with its value (like seaborn's `annot=True`), on a viridis scale
/// with a legend.
///
/// # Examples
///
/// ```
/// use attn::plot::Heatmap;
/// use ndarray::array;
///
/// let weights = array![[0.7_f32, 0.3], [0.4, 0.6]];
/// let map = Heatmap::new("weights", &weights)
///     .with_row_labels(["Tokyo", "is"])
///     .with_col_labels(["Tokyo", "is"]);
/// assert_eq!(map.values().dim(), (2, 2));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    title: String,
    values: Array2<f64>,
    rows: Vec<String>,
    cols: Vec<String>,
    decimals: usize,
    /// The values the colour scale spans; the data's own range when `None`.
    scale: Option<(f64, f64)>,
    colormap: Colormap,
    /// What the rows and the columns are (`query`, `key`), drawn beside them.
    axis_titles: Option<(String, String)>,
}

impl Heatmap {
    /// A heatmap of `values`, rows and columns numbered until labelled, values
    /// shown with 2 decimals.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = attn::plot::Heatmap::new("x", &ndarray::Array2::<f64>::eye(3));
    /// assert_eq!(map.title(), "x");
    /// ```
    pub fn new<A: Element>(title: &str, values: &ArrayRef2<A>) -> Self {
        let values = values.mapv(|x| x.to_f64().unwrap_or(f64::NAN));
        Heatmap {
            title: title.to_string(),
            rows: (0..values.nrows()).map(|i| i.to_string()).collect(),
            cols: (0..values.ncols()).map(|j| j.to_string()).collect(),
            values,
            decimals: 2,
            scale: None,
            colormap: Colormap::Viridis,
            axis_titles: None,
        }
    }

    /// Names the rows (top to bottom); missing names stay numbers.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = attn::plot::Heatmap::new("x", &ndarray::Array2::<f64>::eye(2)).with_row_labels(["a", "b"]);
    /// ```
    pub fn with_row_labels<S: ToString>(mut self, labels: impl IntoIterator<Item = S>) -> Self {
        for (slot, label) in self.rows.iter_mut().zip(labels) {
            *slot = label.to_string();
        }
        self
    }

    /// Names the columns (left to right); missing names stay numbers.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = attn::plot::Heatmap::new("x", &ndarray::Array2::<f64>::eye(2)).with_col_labels(["a", "b"]);
    /// ```
    pub fn with_col_labels<S: ToString>(mut self, labels: impl IntoIterator<Item = S>) -> Self {
        for (slot, label) in self.cols.iter_mut().zip(labels) {
            *slot = label.to_string();
        }
        self
    }

    /// Shows values with `decimals` digits after the point.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = attn::plot::Heatmap::new("x", &ndarray::Array2::<f64>::eye(2)).with_decimals(4);
    /// ```
    pub fn with_decimals(mut self, decimals: usize) -> Self {
        self.decimals = decimals;
        self
    }

    /// Colours the scale from `low` to `high` instead of the data's own range: give
    /// attention weights `(0.0, 1.0)`, and panels that compare one quantity the same
    /// range, so that nearly uniform weights look nearly uniform.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::Heatmap;
    /// use ndarray::array;
    ///
    /// let uniform = array![[0.34_f64, 0.33, 0.33]];
    /// let map = Heatmap::new("weights", &uniform).with_range(0.0, 1.0);
    /// assert_eq!(map.values(), &uniform);
    /// ```
    pub fn with_range(mut self, low: f64, high: f64) -> Self {
        self.scale = (low.is_finite() && high.is_finite() && low < high).then_some((low, high));
        self
    }

    /// Colours the cells with `colormap` (viridis unless set).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::{Colormap, Heatmap};
    /// let map = Heatmap::new("x", &ndarray::Array2::<f64>::eye(2)).with_colormap(Colormap::OrRd);
    /// assert_eq!(map.colormap(), Colormap::OrRd);
    /// ```
    pub fn with_colormap(mut self, colormap: Colormap) -> Self {
        self.colormap = colormap;
        self
    }

    /// Names what the rows and the columns are (for attention weights: `"query"`
    /// and `"key"`), drawn beside the row labels and below the column labels.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::{Figure, Heatmap};
    ///
    /// let plain = Heatmap::new("w", &ndarray::Array2::<f64>::eye(2));
    /// let named = plain.clone().with_axis_titles("query", "key");
    /// assert_eq!(named.axis_titles(), Some(("query", "key")));
    /// // the titles take a band of their own on each side they name
    /// let (w0, h0) = Figure::new(vec![plain]).size();
    /// let (w1, h1) = Figure::new(vec![named]).size();
    /// assert!(w1 > w0 && h1 > h0);
    /// ```
    pub fn with_axis_titles(mut self, rows: &str, cols: &str) -> Self {
        self.axis_titles = Some((rows.to_string(), cols.to_string()));
        self
    }

    /// What the rows and the columns are, if named.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::plot::Heatmap::new("w", &ndarray::Array2::<f64>::eye(2)).axis_titles(), None);
    /// ```
    pub fn axis_titles(&self) -> Option<(&str, &str)> {
        self.axis_titles
            .as_ref()
            .map(|(r, c)| (r.as_str(), c.as_str()))
    }

    /// The colour scale.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = attn::plot::Heatmap::new("x", &ndarray::Array2::<f64>::eye(2));
    /// assert_eq!(map.colormap(), attn::plot::Colormap::Viridis);
    /// ```
    pub fn colormap(&self) -> Colormap {
        self.colormap
    }

    /// The title.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::plot::Heatmap::new("w", &ndarray::Array2::<f32>::eye(1)).title(), "w");
    /// ```
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The values, as `f64`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = attn::plot::Heatmap::new("w", &ndarray::array![[0.5_f32]]);
    /// assert_eq!(map.values()[[0, 0]], 0.5);
    /// ```
    pub fn values(&self) -> &Array2<f64> {
        &self.values
    }

    /// The finite range of the values, `(0, 1)` when there is none.
    fn range(&self) -> (f64, f64) {
        if let Some(scale) = self.scale {
            return scale;
        }
        let finite = self.values.iter().filter(|x| x.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
        match (lo.is_finite(), lo < hi) {
            (true, true) => (lo, hi),
            (true, false) => (lo - 0.5, lo + 0.5),
            _ => (0.0, 1.0),
        }
    }

    /// The matrix as an aligned text table under its title, with the row and
    /// column labels as headers.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::Heatmap;
    ///
    /// let table = Heatmap::new("w", &ndarray::array![[0.25_f64, 0.75]])
    ///     .with_row_labels(["Tokyo"])
    ///     .with_col_labels(["is", "nice"])
    ///     .to_table();
    /// assert_eq!(table, "w\n           is   nice\nTokyo    0.25   0.75\n");
    /// ```
    pub fn to_table(&self) -> String {
        self.render(|x, cell, _, _| format!(" {x:>cell$.prec$}", prec = self.decimals))
    }

    /// The matrix as rows of text: labels, then each value on a coloured
    /// background (24-bit ANSI colours), for a terminal.
    ///
    /// # Examples
    ///
    /// ```
    /// let text = attn::plot::Heatmap::new("w", &ndarray::array![[0.25_f64, 0.75]]).to_terminal();
    /// assert!(text.contains("0.25") && text.contains("\x1b["));
    /// ```
    pub fn to_terminal(&self) -> String {
        self.render(|x, cell, lo, hi| {
            let RGBColor(r, g, b) = colour(self.colormap, x, lo, hi);
            let ink = if is_dark(self.colormap, x, lo, hi) {
                255
            } else {
                0
            };
            format!(
                " \x1b[48;2;{r};{g};{b}m\x1b[38;2;{ink};{ink};{ink}m{x:>cell$.prec$}\x1b[0m",
                prec = self.decimals
            )
        })
    }

    /// Title, header row, then a row per matrix row with `cell(value, width, lo, hi)`.
    fn render(&self, cell: impl Fn(f64, usize, f64, f64) -> String) -> String {
        let (lo, hi) = self.range();
        let label_width = self
            .rows
            .iter()
            .map(|r| r.chars().count())
            .max()
            .unwrap_or(0);
        let largest = self
            .values
            .iter()
            .fold(1.0_f64, |m, x| m.max(x.abs()))
            .log10()
            .floor()
            .max(0.0) as usize;
        let width = self
            .cols
            .iter()
            .map(|c| c.chars().count())
            .chain(std::iter::once(self.decimals + largest + 4))
            .max()
            .unwrap_or(6);
        let mut text = format!("{}\n{:label_width$} ", self.title, "");
        for c in &self.cols {
            text += &format!(" {c:>width$}");
        }
        text.push('\n');
        for (label, row) in self.rows.iter().zip(self.values.rows()) {
            text += &format!("{label:>label_width$} ");
            for &x in row {
                text += &cell(x, width, lo, hi);
            }
            text.push('\n');
        }
        text
    }
}

/// A row of heatmaps side by side, written as one picture.
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
        let widths = self.panels.iter().map(panel_width).sum::<u32>();
        let height = self.panels.iter().map(panel_height).max().unwrap_or(1);
        (widths.max(1), height)
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
        self.draw(&root)
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
        register_system_font()?;
        let root = BitMapBackend::new(path, self.size()).into_drawing_area();
        self.draw(&root)
            .and_then(|_| root.present().map_err(plot_error))
            .map_err(|e| with_path(e, path))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(plot_error)?;
        let mut x = 0;
        for panel in &self.panels {
            let width = panel_width(panel);
            let area = root.clone().shrink((x, 0), (width, panel_height(panel)));
            match &panel.axis_titles {
                None => draw_panel(&area, panel).map_err(plot_error)?,
                Some((rows, cols)) => {
                    let band = AXIS_BAND as i32;
                    let (w, h) = area.dim_in_pixel();
                    let inner = area
                        .clone()
                        .shrink((band, 0), (w - AXIS_BAND, h - AXIS_BAND));
                    draw_panel(&inner, panel).map_err(plot_error)?;
                    draw_axis_titles(&area, panel, rows, cols).map_err(plot_error)?;
                }
            }
            x += width as i32;
        }
        Ok(())
    }
}

/// The band an axis title takes, left of the row labels and below the column labels.
const AXIS_BAND: u32 = 24;

fn panel_width(h: &Heatmap) -> u32 {
    let titles = if h.axis_titles.is_some() {
        AXIS_BAND
    } else {
        0
    };
    h.values.ncols() as u32 * CELL + LEFT_BAND + legend_band(h) + titles
}

/// The colour bar and its tick labels: wide enough for the longest label (the
/// ticks are drawn 34 pixels right of the cells, about 8 pixels a character).
fn legend_band(h: &Heatmap) -> u32 {
    let (lo, hi) = h.range();
    let longest = [lo, hi]
        .iter()
        .map(|&v| drawn_number(v, h.decimals).chars().count())
        .max()
        .unwrap_or(0) as u32;
    LEGEND_BAND.max(44 + 8 * longest)
}

fn panel_height(h: &Heatmap) -> u32 {
    let titles = if h.axis_titles.is_some() {
        AXIS_BAND
    } else {
        0
    };
    h.values.nrows() as u32 * CELL + TITLE_BAND + BOTTOM_BAND + titles
}

/// The row title upright along the rows, the column title centred below the columns.
fn draw_axis_titles<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &Heatmap,
    rows: &str,
    cols: &str,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (n_rows, n_cols) = h.values.dim();
    let cell = CELL as i32;
    let font = ("sans-serif", 15)
        .into_font()
        .style(FontStyle::Italic)
        .color(&BLACK);
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
    let middle_of_cols = (AXIS_BAND + LEFT_BAND) as i32 + cell * n_cols as i32 / 2;
    let below_labels =
        (TITLE_BAND + BOTTOM_BAND) as i32 + cell * n_rows as i32 + AXIS_BAND as i32 / 2 - 4;
    area.draw(&Text::new(
        cols.to_string(),
        (middle_of_cols, below_labels),
        font.pos(centred),
    ))?;
    Ok(())
}

fn colour(map: Colormap, x: f64, lo: f64, hi: f64) -> RGBColor {
    if !x.is_finite() {
        return RGBColor(200, 200, 200);
    }
    let (r, g, b) = map.colour((x - lo) / (hi - lo));
    RGBColor(r, g, b)
}

/// A number as a picture shows it: the true minus sign (U+2212), level with the
/// digits, where the hyphen would sit small and high.
fn drawn_number(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}").replace('-', "\u{2212}")
}

/// White text on dark cells, black on light ones.
fn is_dark(map: Colormap, x: f64, lo: f64, hi: f64) -> bool {
    x.is_finite() && map.dark((x - lo) / (hi - lo))
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &Heatmap,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (lo, hi) = h.range();
    let (rows, cols) = h.values.dim();
    let (left, top, cell) = (LEFT_BAND as i32, TITLE_BAND as i32, CELL as i32);
    let centred = Pos::new(HPos::Center, VPos::Center);
    let title = ("sans-serif", 18)
        .into_font()
        .style(FontStyle::Bold)
        .color(&BLACK)
        .pos(centred);
    area.draw(&Text::new(
        h.title.clone(),
        (left + cell * cols as i32 / 2, top / 2),
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
        let x = left + cell * j as i32 + cell / 2;
        let y = top + cell * rows as i32 + 14;
        area.draw(&Text::new(
            name.clone(),
            (x, y),
            label.clone().pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    for ((i, j), &x) in h.values.indexed_iter() {
        let (x0, y0) = (left + cell * j as i32, top + cell * i as i32);
        area.draw(&Rectangle::new(
            [(x0, y0), (x0 + cell, y0 + cell)],
            colour(h.colormap, x, lo, hi).filled(),
        ))?;
        let ink = if is_dark(h.colormap, x, lo, hi) {
            WHITE
        } else {
            BLACK
        };
        let text = drawn_number(x, h.decimals);
        let style = ("monospace", 13).into_font().color(&ink).pos(centred);
        area.draw(&Text::new(text, (x0 + cell / 2, y0 + cell / 2), style))?;
    }
    // the legend: the colour scale from the smallest to the largest value
    let (bar_x, bar_top, bar_height) = (
        left + cell * cols as i32 + 14,
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
        assert!(panel_width(&long) > panel_width(&short));
    }

    #[test]
    fn pictures_draw_numbers_with_a_true_minus_sign() {
        assert_eq!(drawn_number(-0.5, 3), "\u{2212}0.500");
        assert_eq!(drawn_number(2.25, 1), "2.2");
        assert_eq!(drawn_number(0.0, 2), "0.00");
    }
}
