//! The fuzzer's bytes read as small choices, sizes and floats: shared by the
//! fuzz targets (each uses part of it).
#![allow(dead_code)]

use attn::{Kernel, Mask, ScaledDotProduct};
use ndarray::Array2;

/// AddressSanitizer's defaults in every target: memory the system refuses comes
/// back as a null pointer, which the crate's `try_reserve` reports as an `Err`
/// (its promise for a cache or file too large to hold), where ASan by default
/// aborts the run (a 512 GiB sliding cache from a hostile `config.json` did).
#[no_mangle]
pub extern "C" fn __asan_default_options() -> *const std::ffi::c_char {
    c"allocator_may_return_null=1".as_ptr()
}

/// Reads the fuzzer's bytes as small numbers and floats.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn size(&mut self, max: u8) -> usize {
        (self.byte() % (max + 1)) as usize
    }

    /// An f32 from raw bits (NaN, ±∞ and subnormals come up often), widened.
    pub fn float(&mut self) -> f64 {
        let bits = u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()]);
        if self.byte().is_multiple_of(4) {
            f64::from(f32::from_bits(bits))
        } else {
            f64::from((bits % 2001) as i32 - 1000) / 250.0
        }
    }

    pub fn matrix(&mut self, rows: usize, cols: usize) -> Array2<f64> {
        Array2::from_shape_simple_fn((rows, cols), || self.float())
    }

    /// One of `items`.
    pub fn pick<'t>(&mut self, items: &[&'t str]) -> &'t str {
        items[self.byte() as usize % items.len()]
    }
}

/// Attention in f64 on `kernel`, at `scale` if given, with the masks `choice`'s
/// bits pick: `keep` (bit 0), `bias` (bit 1), and causal (`choice >> 2`
/// modulo 3: none, top-left, bottom-right).
pub fn attention<'m>(
    kernel: Kernel,
    scale: Option<f64>,
    choice: u8,
    keep: &'m Array2<bool>,
    bias: &'m Array2<f64>,
) -> ScaledDotProduct<'m, f64> {
    let mut attn = ScaledDotProduct::new().with_kernel(kernel);
    if let Some(scale) = scale {
        attn = attn.with_scale(scale);
    }
    if choice & 1 != 0 {
        attn = attn.with_mask(Mask::keep(keep));
    }
    if choice & 2 != 0 {
        attn = attn.with_mask(Mask::bias(bias));
    }
    match (choice >> 2) % 3 {
        1 => attn.with_mask(Mask::CausalTopLeft),
        2 => attn.with_mask(Mask::CausalBottomRight),
        _ => attn,
    }
}
