//! One heatmap panel: its cells, labels, axis titles and colour bar, their sizes
//! and how they are drawn ([`super::figure`] places the panels).

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::colormap::{colour, is_dark};
use super::heatmap::Heatmap;

/// Pixels per cell, and the bands around the cells of a panel.
const CELL: u32 = 64;
const TITLE_BAND: u32 = 44;
const LEFT_BAND: u32 = 96;
const BOTTOM_BAND: u32 = 44;
const LEGEND_BAND: u32 = 84;
/// The gap that stands in for a colour bar a panel shares with its right-hand
/// neighbour.
const SHARED_GAP: u32 = 24;

/// The band an axis title takes, left of the row labels and below the column labels.
pub(super) const AXIS_BAND: u32 = 24;

/// A panel's width, with its colour bar or the gap left where it shares one.
pub(super) fn panel_width(h: &Heatmap, legend: bool) -> u32 {
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

pub(super) fn panel_height(h: &Heatmap) -> u32 {
    let titles = if h.axis_titles.is_some() {
        AXIS_BAND
    } else {
        0
    };
    h.values.nrows() as u32 * cell_height(h) + TITLE_BAND + BOTTOM_BAND + titles
}

/// The row title upright along the rows, the column title centred below the columns.
pub(super) fn draw_axis_titles<DB: DrawingBackend>(
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

pub(super) fn draw_panel<DB: DrawingBackend>(
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
