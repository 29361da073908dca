//! The crate's one error type.

use std::fmt;

/// What went wrong: every variant names the shapes involved.
///
/// Bad input to any function of the crate is reported through this type,
/// never by a panic.
///
/// # Examples
///
/// ```
/// use attn::{scaled_dot_product, Error};
/// use ndarray::Array2;
///
/// let q = Array2::<f64>::zeros((2, 4));
/// let k = Array2::<f64>::zeros((3, 5)); // d_k differs from the query's
/// let v = Array2::<f64>::zeros((3, 2));
/// let err = scaled_dot_product(&q, &k, &v).unwrap_err();
/// assert!(matches!(err, Error::QueryKeyWidth { .. }));
/// assert_eq!(
///     err.to_string(),
///     "query width d_k differs from key width: query [2, 4], key [3, 5]"
/// );
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Queries and keys have different feature widths `d_k`.
    QueryKeyWidth {
        /// Shape of the queries.
        query: Vec<usize>,
        /// Shape of the keys.
        key: Vec<usize>,
    },
    /// Keys and values hold a different number of positions `S`.
    KeyValueLength {
        /// Shape of the keys.
        key: Vec<usize>,
        /// Shape of the values.
        value: Vec<usize>,
    },
    /// Batched inputs disagree on the batch size or on the number of heads.
    BatchShape {
        /// Shape of the queries.
        query: Vec<usize>,
        /// Shape of the keys.
        key: Vec<usize>,
        /// Shape of the values.
        value: Vec<usize>,
    },
    /// Grouped-query attention needs the key/value heads to divide the query heads.
    HeadGroups {
        /// Number of query heads.
        query_heads: usize,
        /// Number of key/value heads.
        kv_heads: usize,
    },
    /// A mask does not broadcast to the shape of the attention scores.
    MaskShape {
        /// Shape of the mask.
        mask: Vec<usize>,
        /// Shape of the scores it must broadcast to.
        scores: Vec<usize>,
    },
    /// The score scale is zero, NaN or infinite.
    InvalidScale {
        /// The scale that was given.
        scale: f64,
    },
    /// An array does not have the shape its role needs (weights, biases, layer inputs).
    Shape {
        /// What the array is, e.g. `"W_K rows (key input width)"`.
        what: &'static str,
        /// The shape that fits.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A layer or initialisation setting is invalid.
    InvalidConfig {
        /// What is wrong, in words.
        reason: String,
    },
    /// A picture could not be drawn or written (feature `plot`).
    Plot {
        /// What went wrong, with the file's path.
        reason: String,
    },
    /// A width that must be positive is zero.
    ZeroWidth {
        /// Which width.
        what: &'static str,
        /// Shape of the array it belongs to.
        shape: Vec<usize>,
    },
    /// A weights file or tensor cannot be used: a missing name (the message lists
    /// what the file has under the same prefix), a dtype attn does not read, or
    /// data that does not fit the header.
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor in a weights file does not have the shape the layer needs.
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape the layer's configuration needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A key/value cache cannot do what was asked: a paged cache's pool has too
    /// few free blocks, a sequence was freed or belongs to another cache, or a
    /// value cannot be quantised (NaN, infinity); a [`KvCache`](crate::KvCache)
    /// cannot grow because the system refuses the memory. Nothing was written.
    Cache {
        /// What is wrong, in words.
        reason: String,
    },
    /// A file cannot be read or parsed (safetensors, `config.json`).
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// `std::result::Result` with [`Error`] as its error.
///
/// # Examples
///
/// ```
/// use ndarray::{array, Array2};
///
/// fn attend(x: &Array2<f64>) -> attn::Result<Array2<f64>> {
///     attn::scaled_dot_product(x, x, x)
/// }
/// assert!(attend(&array![[1.0, 2.0]]).is_ok());
/// ```
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::QueryKeyWidth { query, key } => write!(
                f,
                "query width d_k differs from key width: query {query:?}, key {key:?}"
            ),
            Error::KeyValueLength { key, value } => write!(
                f,
                "keys and values hold different numbers of positions: key {key:?}, value {value:?}"
            ),
            Error::BatchShape { query, key, value } => write!(
                f,
                "batch or head sizes disagree: query {query:?}, key {key:?}, value {value:?}"
            ),
            Error::HeadGroups {
                query_heads,
                kv_heads,
            } => write!(
                f,
                "{kv_heads} key/value heads do not divide {query_heads} query heads"
            ),
            Error::MaskShape { mask, scores } => {
                write!(
                    f,
                    "mask of shape {mask:?} does not broadcast to scores of shape {scores:?}"
                )?;
                if let ([b, s], [batch, _, _, keys]) = (&mask[..], &scores[..])
                    && (b, s) == (batch, keys)
                {
                    write!(
                        f,
                        " (a (B, S) key-padding mask: Mask::key_padding applies it as (B, 1, 1, S))"
                    )?;
                }
                Ok(())
            }
            Error::InvalidScale { scale } => {
                write!(f, "scale must be finite and non-zero, got {scale}")
            }
            Error::Shape {
                what,
                expected,
                found,
            } => write!(f, "{what}: expected shape {expected:?}, found {found:?}"),
            Error::InvalidConfig { reason } => write!(f, "invalid configuration: {reason}"),
            Error::Plot { reason } => write!(f, "cannot draw the picture: {reason}"),
            Error::ZeroWidth { what, shape } => {
                write!(f, "{what} is zero in shape {shape:?}")
            }
            Error::Tensor { name, reason } => write!(f, "tensor {name:?}: {reason}"),
            Error::TensorShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name:?}: expected shape {expected:?}, found {found:?}"
            ),
            Error::Cache { reason } => write!(f, "paged cache: {reason}"),
            Error::File { path, reason } => write!(f, "cannot use {path}: {reason}"),
        }
    }
}

impl std::error::Error for Error {}
