//! The colour scales a heatmap can use: viridis, and ColorBrewer's sequential
//! scales under the names seaborn and matplotlib give them.

use plotters::style::RGBColor;
use plotters::style::colors::colormaps::ViridisRGB;

/// A colour scale, from the low end of a heatmap's range to the high end.
///
/// # Examples
///
/// ```
/// use attn::plot::{Colormap, Heatmap};
/// use ndarray::array;
///
/// // the "Tokyo is beautiful" notebook draws its weights with seaborn's "Blues"
/// let map = Heatmap::new("weights", &array![[0.7_f32, 0.3]]).with_colormap(Colormap::Blues);
/// assert_eq!(map.colormap(), Colormap::Blues);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Colormap {
    /// Dark blue through green to yellow (matplotlib's default; the crate's too).
    #[default]
    Viridis,
    /// White to dark blue.
    Blues,
    /// White to dark green.
    Greens,
    /// Light yellow through orange to dark red.
    OrRd,
    /// Light yellow through green to dark blue.
    YlGnBu,
}

/// ColorBrewer's nine-class sequential scales, light to dark.
const BLUES: [u32; 9] = [
    0xf7fbff, 0xdeebf7, 0xc6dbef, 0x9ecae1, 0x6baed6, 0x4292c6, 0x2171b5, 0x08519c, 0x08306b,
];
const GREENS: [u32; 9] = [
    0xf7fcf5, 0xe5f5e0, 0xc7e9c0, 0xa1d99b, 0x74c476, 0x41ab5d, 0x238b45, 0x006d2c, 0x00441b,
];
const OR_RD: [u32; 9] = [
    0xfff7ec, 0xfee8c8, 0xfdd49e, 0xfdbb84, 0xfc8d59, 0xef6548, 0xd7301f, 0xb30000, 0x7f0000,
];
const YL_GN_BU: [u32; 9] = [
    0xffffd9, 0xedf8b1, 0xc7e9b4, 0x7fcdbb, 0x41b6c4, 0x1d91c0, 0x225ea8, 0x253494, 0x081d58,
];

impl Colormap {
    /// The colour at `t` in `[0, 1]` (clamped).
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::plot::Colormap;
    ///
    /// assert_eq!(Colormap::Blues.colour(0.0), (0xf7, 0xfb, 0xff));
    /// assert_eq!(Colormap::Blues.colour(1.0), (0x08, 0x30, 0x6b));
    /// ```
    pub fn colour(self, t: f64) -> (u8, u8, u8) {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let stops = match self {
            Colormap::Viridis => {
                let RGBColor(r, g, b) = ViridisRGB::get_color(t as f32);
                return (r, g, b);
            }
            Colormap::Blues => &BLUES,
            Colormap::Greens => &GREENS,
            Colormap::OrRd => &OR_RD,
            Colormap::YlGnBu => &YL_GN_BU,
        };
        let at = t * (stops.len() - 1) as f64;
        let i = (at.floor() as usize).min(stops.len() - 2);
        let f = at - i as f64;
        let channel = |c: u32, shift: u32| f64::from((c >> shift) & 0xff);
        let mix = |shift| {
            let (a, b) = (channel(stops[i], shift), channel(stops[i + 1], shift));
            (a + (b - a) * f).round() as u8
        };
        (mix(16), mix(8), mix(0))
    }

    /// Whether text on the colour at `t` should be white (the colour is dark).
    pub(crate) fn dark(self, t: f64) -> bool {
        let (r, g, b) = self.colour(t);
        // relative luminance, sRGB weights
        let y = 0.2126 * f64::from(r) + 0.7152 * f64::from(g) + 0.0722 * f64::from(b);
        y < 128.0
    }
}

/// The colour of `x` on `map` over `lo..hi`; grey for values that are not finite.
pub(super) fn colour(map: Colormap, x: f64, lo: f64, hi: f64) -> RGBColor {
    if !x.is_finite() {
        return RGBColor(200, 200, 200);
    }
    let (r, g, b) = map.colour((x - lo) / (hi - lo));
    RGBColor(r, g, b)
}

/// White text on dark cells, black on light ones.
pub(super) fn is_dark(map: Colormap, x: f64, lo: f64, hi: f64) -> bool {
    x.is_finite() && map.dark((x - lo) / (hi - lo))
}
