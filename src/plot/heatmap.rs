//! One matrix as an annotated heatmap: its labels, scale and colours, and the
//! same as text tables for a terminal.

use ndarray::{Array2, ArrayRef2};
use plotters::style::RGBColor;

use super::colormap::{Colormap, colour, is_dark};
use crate::element::Element;

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
    pub(super) title: String,
    pub(super) values: Array2<f64>,
    pub(super) rows: Vec<String>,
    pub(super) cols: Vec<String>,
    pub(super) decimals: usize,
    /// The values the colour scale spans; the data's own range when `None`.
    pub(super) scale: Option<(f64, f64)>,
    pub(super) colormap: Colormap,
    /// What the rows and the columns are (`query`, `key`), drawn beside them.
    pub(super) axis_titles: Option<(String, String)>,
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
    pub(super) fn range(&self) -> (f64, f64) {
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
