//! What a paged cache stores its keys and values as: `f32`, `f64`, `bf16`,
//! `f16`, or int8 with one scale per row.

use half::{bf16, f16};

use crate::element::{Element, Half, Storage, sealed};
use crate::error::{Error, Result};
use crate::kernel::round_to_i8;

/// A type a [`PagedKvCache`](crate::PagedKvCache) stores keys and values as.
/// Queries, new keys and values and outputs are in its
/// [`Compute`](Self::Compute) type.
///
/// - `f32`, `f64`: stored as given.
/// - `bf16`, `f16`: rounded to nearest on writing, widened exactly on reading
///   (half the bytes of `f32`).
/// - `i8`: each row (one token of one key/value head) is stored as `d` bytes
///   and one `f32` scale, `scale = max|x| / 127`, `x ≈ round(x / scale) · scale`
///   (to nearest, ties to even; about a quarter of the bytes of `f32`). Each element is then within
///   `max|x| / 254` of its value; see [`PagedKvCache`](crate::PagedKvCache)
///   for what that bounds in the output. NaN and infinite values cannot be
///   quantised: writing one is an [`Error::Cache`].
///
/// # Examples
///
/// ```
/// use attn::CacheElement;
///
/// assert_eq!(<i8 as CacheElement>::bytes_per_row(64), 68); // 64 bytes and a scale
/// assert_eq!(<half::bf16 as CacheElement>::bytes_per_row(64), 128);
/// ```
pub trait CacheElement: Copy + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed {
    /// What queries, new keys and values and outputs are in.
    type Compute: Element;

    /// Bytes one stored row of `width` values takes, its scale included.
    fn bytes_per_row(width: usize) -> usize {
        width * std::mem::size_of::<Self>()
    }

    /// Stores `row` in `out` (equally long) and returns its scale (1 where
    /// there is none).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] when the row cannot be stored (only int8 refuses: a
    /// NaN or infinite value).
    #[doc(hidden)]
    fn store(row: &[Self::Compute], out: &mut [Self]) -> Result<f32>;

    /// Reads a stored row back: `out[i]` is the value `row[i]` stands for.
    #[doc(hidden)]
    fn load(row: &[Self], scale: f32, out: &mut [Self::Compute]);

    /// Whether rows have scales.
    #[doc(hidden)]
    const SCALED: bool = false;

    /// Zero in this type (a fresh pool's contents).
    #[doc(hidden)]
    fn zero() -> Self;

    /// Calls the arm of `switch` written for this type (how the cache reaches
    /// the kernel's code for each stored type).
    #[doc(hidden)]
    fn select_cache<S: PerCache>(switch: S) -> S::Output<Self>;
}

/// Something written once per stored type of a paged cache;
/// [`CacheElement::select_cache`] picks the arm.
#[doc(hidden)]
pub trait PerCache {
    /// What each arm gives, for stored type `E`.
    type Output<E: CacheElement>;
    /// `f32` and `f64`, stored as computed.
    fn native<A: Element + CacheElement<Compute = A>>(self) -> Self::Output<A>;
    /// `bf16` and `f16`.
    fn half<H: Half + CacheElement<Compute = f32>>(self) -> Self::Output<H>;
    /// int8 with a scale per row.
    fn int8(self) -> Self::Output<i8>;
}

/// `f32`, `f64`, `bf16` and `f16`, stored as [`Storage`] stores them; `$arm`
/// is their arm of [`PerCache`].
macro_rules! stored_as_is {
    ($($t:ident => $arm:ident),*) => {$(
        impl CacheElement for $t {
            type Compute = <$t as Storage>::Compute;

            fn store(row: &[Self::Compute], out: &mut [Self]) -> Result<f32> {
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = <$t as Storage>::from_compute(x);
                }
                Ok(1.0)
            }

            fn load(row: &[Self], _: f32, out: &mut [Self::Compute]) {
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = x.to_compute();
                }
            }

            fn zero() -> Self {
                <$t as Storage>::from_compute(<Self::Compute as Element>::from_f64(0.0))
            }

            fn select_cache<S: PerCache>(switch: S) -> S::Output<Self> {
                switch.$arm::<$t>()
            }
        }
    )*};
}

stored_as_is!(f32 => native, f64 => native, bf16 => half, f16 => half);

impl CacheElement for i8 {
    type Compute = f32;
    const SCALED: bool = true;

    fn bytes_per_row(width: usize) -> usize {
        width + std::mem::size_of::<f32>()
    }

    fn store(row: &[f32], out: &mut [i8]) -> Result<f32> {
        let scale = round_to_i8(row, out);
        if scale.is_nan() {
            let bad = row.iter().find(|x| !x.is_finite()).unwrap_or(&f32::NAN);
            return Err(Error::Cache {
                reason: format!("{bad} cannot be quantised to int8"),
            });
        }
        Ok(scale)
    }

    fn load(row: &[i8], scale: f32, out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = f32::from(x) * scale;
        }
    }

    fn zero() -> Self {
        0
    }

    fn select_cache<S: PerCache>(switch: S) -> S::Output<Self> {
        switch.int8()
    }
}
