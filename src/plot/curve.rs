//! A line chart of one series, such as a training loss per step.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::Colormap;
use super::output::{plot_error, register_font, with_path};
use super::panel::{drawn_number, sans};
use crate::error::{Error, Result};

/// One series of numbers drawn as a line against its index (a loss per training
/// step, say), with a title and named axes, as SVG or PNG. Laying out the axes
/// measures text, so both need a TrueType font (found as for
/// [`Figure::save_png`](super::Figure::save_png); `ATTN_FONT` names one).
///
/// # Examples
///
/// ```no_run
/// use attn::plot::Curve;
///
/// let loss = [1.0, 0.5, 0.3, 0.2, 0.15];
/// let curve = Curve::new("training loss", &loss).with_axes("step", "loss");
/// assert_eq!(curve.values(), &loss);
/// curve.save_svg("loss.svg")?;
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    title: String,
    x_label: String,
    y_label: String,
    values: Vec<f64>,
}

impl Curve {
    /// A curve through `(i, values[i])`.
    ///
    /// # Examples
    ///
    /// ```
    /// let curve = attn::plot::Curve::new("loss", &[3.0, 2.0]);
    /// assert_eq!(curve.values().len(), 2);
    /// ```
    pub fn new(title: &str, values: &[f64]) -> Self {
        Curve {
            title: title.to_string(),
            x_label: String::new(),
            y_label: String::new(),
            values: values.to_vec(),
        }
    }

    /// Names the axes.
    ///
    /// # Examples
    ///
    /// ```
    /// let curve = attn::plot::Curve::new("loss", &[3.0, 2.0]).with_axes("step", "mean squared error");
    /// assert_eq!(curve.values(), &[3.0, 2.0]);
    /// ```
    pub fn with_axes(mut self, x: &str, y: &str) -> Self {
        self.x_label = x.to_string();
        self.y_label = y.to_string();
        self
    }

    /// The numbers drawn.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::plot::Curve::new("t", &[1.0]).values(), &[1.0]);
    /// ```
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Writes the curve as an SVG file.
    ///
    /// # Errors
    ///
    /// [`Error::Plot`] when the series is empty or holds a value that is not
    /// finite, when no TrueType font is found, or when the file cannot be written.
    ///
    /// # Examples
    ///
    /// ```
    /// let path = std::env::temp_dir().join("attn_curve_empty.svg");
    /// let err = attn::plot::Curve::new("empty", &[]).save_svg(&path).unwrap_err();
    /// assert!(err.to_string().contains("at least one value"));
    /// ```
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.check()?;
        register_font()?;
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        self.draw_on(&root)
            .and_then(|_| root.present().map_err(plot_error))
            .map_err(|e| with_path(e, path))
    }

    /// Writes the curve as a PNG file.
    ///
    /// # Errors
    ///
    /// As [`save_svg`](Self::save_svg).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// attn::plot::Curve::new("loss", &[2.0, 1.0]).save_png("loss.png")?;
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.check()?;
        register_font()?;
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        self.draw_on(&root)
            .and_then(|_| root.present().map_err(plot_error))
            .map_err(|e| with_path(e, path))
    }

    /// A curve needs at least one value, all finite.
    fn check(&self) -> Result<()> {
        if self.values.is_empty() || !self.values.iter().all(|x| x.is_finite()) {
            return Err(Error::Plot {
                reason: format!(
                    "a curve needs at least one value, all finite: {} values given",
                    self.values.len()
                ),
            });
        }
        Ok(())
    }

    /// Width and height of the picture in pixels.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attn::plot::Curve::new("loss", &[1.0]).size(), (720, 420));
    /// ```
    pub fn size(&self) -> (u32, u32) {
        SIZE
    }

    /// Draws the curve on `root`, any plotters backend [`size`](Self::size)
    /// pixels large. Laying out the axes measures text: register the font first
    /// ([`register_font`](super::register_font)).
    ///
    /// # Errors
    ///
    /// As [`save_svg`](Self::save_svg), but for the file: [`Error::Plot`] when
    /// the series is empty or not finite, or the backend fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::plotters::prelude::*;
    /// use attn::plot::{register_font, Curve};
    ///
    /// if register_font().is_ok() {
    ///     let curve = Curve::new("loss", &[2.0, 1.0, 0.5]).with_axes("step", "loss");
    ///     let mut svg = String::new();
    ///     let root = SVGBackend::with_string(&mut svg, curve.size()).into_drawing_area();
    ///     curve.draw_on(&root)?;
    /// }
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        self.check()?;
        let lo = self.values.iter().fold(0.0_f64, |m, &x| m.min(x));
        let hi = self.values.iter().fold(lo, |m, &x| m.max(x));
        let hi = if hi > lo {
            hi + (hi - lo) * 0.05
        } else {
            lo + 1.0
        };
        let last = (self.values.len() - 1).max(1) as f64;
        // enough decimals to tell about ten ticks apart
        let decimals = (-((hi - lo) / 10.0).log10().floor()).clamp(0.0, 6.0) as usize;
        root.fill(&WHITE).map_err(plot_error)?;
        // the heatmaps' style: a bold title, italic axis titles, monospaced
        // numbers, a light grid, the line in viridis' dark blue
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, sans(18.0, FontStyle::Bold).color(&BLACK))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..last, lo..hi)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| drawn_number(*y, decimals))
            .label_style(("monospace", 12))
            .axis_desc_style(sans(15.0, FontStyle::Italic))
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(plot_error)?;
        let points = self.values.iter().enumerate().map(|(i, &y)| (i as f64, y));
        // the dark blue of the heatmaps' default scale
        let (r, g, b) = Colormap::Viridis.colour(0.3);
        let line = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(points, line.stroke_width(2)))
            .map_err(plot_error)?;
        Ok(())
    }
}

/// Width and height of a curve's picture, in pixels.
const SIZE: (u32, u32) = (720, 420);
