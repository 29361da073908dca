//! Every text a picture draws fits it: measured with the PNG's own font, each
//! title, label, cell number and tick lies inside the picture and overlaps no
//! other text. The figures are those the examples draw, with their real titles
//! and labels, and the extremes (long numbers, negative ranges).

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use attn::plot::plotters::coord::Shift;
use attn::plot::plotters::prelude::*;
use attn::plot::{Colormap, Curve, Figure, Heatmap, register_font};
use ndarray::Array2;
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
    text_anchor::{HPos, VPos},
};

/// One drawn text and the pixels its glyphs take: `(left, top)` to `(right, bottom)`.
#[derive(Debug, Clone)]
struct TextBox {
    text: String,
    min: (i32, i32),
    max: (i32, i32),
}

/// A drawing backend that draws nothing and records where each text would go,
/// laid out as the bitmap backend lays it out.
struct Recorder {
    size: (u32, u32),
    texts: Rc<RefCell<Vec<TextBox>>>,
}

/// An error the recorder never returns.
#[derive(Debug)]
struct Never(Infallible);

impl std::fmt::Display for Never {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {}
    }
}

impl std::error::Error for Never {}

impl DrawingBackend for Recorder {
    type ErrorType = Never;

    fn get_size(&self) -> (u32, u32) {
        self.size
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Never>> {
        Ok(())
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Never>> {
        Ok(())
    }

    fn draw_pixel(
        &mut self,
        _: BackendCoord,
        _: BackendColor,
    ) -> Result<(), DrawingErrorKind<Never>> {
        Ok(())
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        _: BackendCoord,
        _: BackendCoord,
        _: &S,
    ) -> Result<(), DrawingErrorKind<Never>> {
        Ok(())
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        _: BackendCoord,
        _: BackendCoord,
        _: &S,
        _: bool,
    ) -> Result<(), DrawingErrorKind<Never>> {
        Ok(())
    }

    /// The box the bitmap backend's `draw_text` fills: the font's layout box,
    /// moved by the anchor, turned by the transform, placed at `pos`.
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Never>> {
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .expect("the registered font lays out every text");
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let turn = style.transform();
        let corners = [(0, 0), (width, 0), (0, height), (width, height)]
            .map(|(x, y)| turn.transform(x + dx, y + dy))
            .map(|(x, y)| (pos.0 + x, pos.1 + y));
        let xs = corners.map(|c| c.0);
        let ys = corners.map(|c| c.1);
        let min = (
            *xs.iter().min().unwrap_or(&0),
            *ys.iter().min().unwrap_or(&0),
        );
        let max = (
            *xs.iter().max().unwrap_or(&0),
            *ys.iter().max().unwrap_or(&0),
        );
        if !text.trim().is_empty() {
            self.texts.borrow_mut().push(TextBox {
                text: text.to_string(),
                min,
                max,
            });
        }
        Ok(())
    }
}

/// A drawing error as attn reports one.
fn plot_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> attn::Error {
    attn::Error::Plot {
        reason: e.to_string(),
    }
}

/// The text boxes `draw` makes on a `size` picture.
fn texts_of(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<Recorder, Shift>) -> attn::Result<()>,
) -> Vec<TextBox> {
    let texts = Rc::new(RefCell::new(Vec::new()));
    let root = Recorder {
        size,
        texts: Rc::clone(&texts),
    }
    .into_drawing_area();
    draw(&root).expect("drawing on the recorder");
    texts.take()
}

/// What is wrong with the texts of a `size` picture: each text outside it, each
/// pair that overlaps.
fn misfits(size: (u32, u32), texts: &[TextBox]) -> Vec<String> {
    let (w, h) = (size.0 as i32, size.1 as i32);
    let mut wrong = Vec::new();
    for t in texts {
        if t.min.0 < 0 || t.min.1 < 0 || t.max.0 > w || t.max.1 > h {
            wrong.push(format!(
                "{:?} at {:?}..{:?} leaves the {w} × {h} picture",
                t.text, t.min, t.max
            ));
        }
    }
    for (i, a) in texts.iter().enumerate() {
        for b in &texts[i + 1..] {
            let apart = a.max.0 <= b.min.0
                || b.max.0 <= a.min.0
                || a.max.1 <= b.min.1
                || b.max.1 <= a.min.1;
            if !apart {
                wrong.push(format!(
                    "{:?} at {:?}..{:?} overlaps {:?} at {:?}..{:?}",
                    a.text, a.min, a.max, b.text, b.min, b.max
                ));
            }
        }
    }
    wrong
}

/// Asserts that every text `draw` puts on a `size` picture fits, and returns the
/// texts; `None` where this system has no font for PNG text (there is no PNG to
/// check then).
fn assert_drawn_fits(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<Recorder, Shift>) -> attn::Result<()>,
) -> Option<Vec<TextBox>> {
    if let Err(e) = register_font() {
        eprintln!("no font, no PNG text to measure: {e}");
        return None;
    }
    let texts = texts_of(size, draw);
    let wrong = misfits(size, &texts);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Some(texts)
}

/// [`assert_drawn_fits`] for a figure.
fn assert_fits(figure: &Figure) {
    let (width, _) = figure.size();
    assert!(
        width <= attn::plot::MAX_WIDTH,
        "{width} px is wider than a screen"
    );
    assert_drawn_fits(figure.size(), |root| figure.draw_on(root));
}

fn ramp(rows: usize, cols: usize, lo: f64, hi: f64) -> Array2<f64> {
    let n = (rows * cols).max(2) - 1;
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        lo + (hi - lo) * (i * cols + j) as f64 / n as f64
    })
}

#[test]
fn the_recorder_sees_text_that_leaves_the_picture_or_overlaps() {
    if register_font().is_err() {
        return;
    }
    // a title far wider than its 2-cell panel, and two texts on one spot
    let texts = texts_of((300, 200), |root| {
        let font = ("sans-serif", 18).into_font();
        let long = "a title that is far too long for a panel of two cells";
        root.draw(&Text::new(long, (10, 10), font.clone()))
            .map_err(plot_error)?;
        root.draw(&Text::new("x", (100, 100), font.clone()))
            .map_err(plot_error)?;
        root.draw(&Text::new("y", (101, 101), font))
            .map_err(plot_error)?;
        Ok(())
    });
    let wrong = misfits((300, 200), &texts);
    assert_eq!(wrong.len(), 2, "{wrong:?}");
    assert!(
        wrong[0].contains("leaves the 300 × 200 picture"),
        "{wrong:?}"
    );
    assert!(
        wrong[1].contains("\"x\"") && wrong[1].contains("overlaps"),
        "{wrong:?}"
    );
}

#[test]
fn four_words_text_fits() {
    let names = ["word_1", "word_2", "word_3", "word_4"];
    let panel = |title: &str| {
        Heatmap::new(title, &ramp(4, 4, 0.0, 0.9))
            .with_row_labels(names)
            .with_col_labels(names)
            .with_decimals(7)
            .with_range(0.0, 1.0)
            .with_axis_titles("query", "key")
    };
    let figure = Figure::new(vec![
        panel("whole-matrix softmax (the script)"),
        panel("row-wise softmax (attention)"),
    ]);
    assert_fits(&figure);
}

#[test]
fn tokyo_with_heads_wraps_and_fits() {
    // `tokyo --heads 4`: the input, four heads' weights and their mean on one
    // scale, the output: seven panels, which no screen holds in one row
    let tokens = ["Tokyo", "is", "beautiful"];
    let weights = |title: String| {
        Heatmap::new(&title, &ramp(3, 3, 0.0, 1.0))
            .with_row_labels(tokens)
            .with_col_labels(tokens)
            .with_decimals(4)
            .with_range(0.0, 1.0)
            .with_colormap(Colormap::Blues)
            .with_axis_titles("query", "key")
    };
    let mut panels = vec![
        Heatmap::new("input embeddings x", &ramp(3, 8, -1.7, 2.3))
            .with_row_labels(tokens)
            .with_decimals(4),
    ];
    panels.extend((0..4).map(|h| weights(format!("head {h} weights"))));
    panels.push(weights("mean of 4 heads".to_string()));
    panels.push(Heatmap::new("output", &ramp(3, 8, -0.75, 0.5)).with_decimals(4));
    let figure = Figure::new(panels);
    assert!(
        figure.size().1 > 3 * 64 + 88,
        "{:?}: wrapped",
        figure.size()
    );
    assert_fits(&figure);
}

#[test]
fn tokyo_text_fits() {
    let tokens = ["Tokyo", "is", "beautiful"];
    let dims = ["d0", "d1", "d2", "d3"];
    let figure = Figure::new(vec![
        Heatmap::new("input embeddings x", &ramp(3, 4, -1.7, 2.3))
            .with_row_labels(tokens)
            .with_col_labels(dims)
            .with_decimals(4)
            .with_colormap(Colormap::YlGnBu),
        Heatmap::new("scores QKᵀ/√d_k", &ramp(3, 3, -12.5, 9.25))
            .with_row_labels(tokens)
            .with_col_labels(tokens)
            .with_decimals(4)
            .with_colormap(Colormap::OrRd)
            .with_axis_titles("query", "key"),
        Heatmap::new("attention weights", &ramp(3, 3, 0.0, 1.0))
            .with_row_labels(tokens)
            .with_col_labels(tokens)
            .with_decimals(4)
            .with_range(0.0, 1.0)
            .with_colormap(Colormap::Blues)
            .with_axis_titles("query", "key"),
        Heatmap::new("output", &ramp(3, 4, -0.75, 0.5))
            .with_row_labels(tokens)
            .with_col_labels(dims)
            .with_decimals(4)
            .with_colormap(Colormap::Greens),
    ]);
    assert_fits(&figure);
}

#[test]
fn decoding_steps_text_fits() {
    let tokens = ["the", "cat", "sat", "on", "the", "mat", "and", "slept"];
    let panels = (0..3)
        .map(|n| {
            let seen = 6 + n;
            Heatmap::new(
                &format!(
                    "step {}: \"{}\" attends to {seen} cached positions",
                    n + 1,
                    tokens[seen - 1]
                ),
                &ramp(2, seen, 0.0, 0.958),
            )
            .with_row_labels(["head 0", "head 1"])
            .with_col_labels(
                tokens[..seen]
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("{i}:{t}")),
            )
            .with_decimals(3)
            .with_range(0.0, 1.0)
            .with_axis_titles("head", "cached position: token")
        })
        .collect();
    assert_fits(&Figure::new(panels));
}

#[test]
fn learned_attention_text_fits() {
    let panel = |title: &str| {
        // the example's twelve evaluation rows over six pairs: small cells
        Heatmap::new(title, &ramp(12, 6, 0.0, 1.0))
            .with_row_labels((1..=12).map(|i| format!("{i}: pair {}", (i - 1) % 6 + 1)))
            .with_col_labels((1..=6).map(|p| format!("pair {p}")))
            .with_decimals(2)
            .with_range(0.0, 1.0)
            .with_axis_titles("evaluation example: its answer", "key")
    };
    let figure = Figure::new(vec![
        panel("attention before training"),
        panel("after training"),
    ]);
    assert_fits(&figure);
}

#[test]
fn llama_decoding_and_csv_classes_text_fits() {
    let llama = (1..=2)
        .map(|n| {
            let keys = 6 + n;
            Heatmap::new(
                &format!("step {n}: token 1234 (position {}) over {keys} keys", 4 + n),
                &ramp(4, keys, 0.0, 1.0),
            )
            .with_row_labels((0..4).map(|h| format!("head {h}")))
            .with_col_labels((0..keys).map(|j| match j {
                0 | 1 => format!("{j}:pad"),
                _ => format!("{j}:{}", 1000 + 37 * j),
            }))
            .with_decimals(2)
            .with_range(0.0, 1.0)
            .with_axis_titles("head", "key (position: token)")
        })
        .collect();
    assert_fits(&Figure::new(llama));
    let csv = ["no scaling", "scaled"]
        .map(|name| {
            Heatmap::new(
                &format!("{name}: mean attention per class"),
                &ramp(3, 9, 0.05, 0.2),
            )
            .with_row_labels(["NORMAL", "ERROR(A)", "ERROR(B)"])
            .with_col_labels((0..9).map(|j| format!("A{j}")))
            .with_decimals(2)
            .with_range(0.05, 0.2)
        })
        .to_vec();
    assert_fits(&Figure::new(csv));
}

#[test]
fn long_negative_numbers_fit() {
    let figure = Figure::new(vec![
        Heatmap::new("wide", &ramp(2, 3, -1234.5, 99.25))
            .with_decimals(7)
            .with_axis_titles("row", "column"),
    ]);
    assert_fits(&figure);
}

#[test]
fn a_loss_curve_text_fits() {
    let values: Vec<f64> = (0..300).map(|i| 2.3 * (-(i as f64) / 60.0).exp()).collect();
    let curve = Curve::new("training loss", &values).with_axes("step", "cross-entropy");
    if let Some(texts) = assert_drawn_fits(curve.size(), |root| curve.draw_on(root)) {
        assert!(texts.len() > 5, "{texts:?}");
    }
}

#[test]
fn titles_are_set_in_the_bold_face() {
    if register_font().is_err() {
        return;
    }
    let width = |style: FontStyle| {
        let ((x0, _), (x1, _)) = FontDesc::new(FontFamily::Name("sans-serif"), 18.0, style)
            .layout_box("attention weights")
            .expect("the registered font lays out the text");
        x1 - x0
    };
    let (regular, bold) = (width(FontStyle::Normal), width(FontStyle::Bold));
    // DejaVu Sans Bold sets the same text wider than the regular face
    assert!(bold > regular, "bold {bold} px, regular {regular} px");
}
