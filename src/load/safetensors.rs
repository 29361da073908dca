//! A safetensors file: a JSON header of names, dtypes and shapes, then the data.

use std::path::Path;

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::StateDict;
use crate::element::{Element, Storage};
use crate::error::{Error, Result};

/// A [safetensors](https://huggingface.co/docs/safetensors) file read into
/// memory (what `save_pretrained` writes as `model.safetensors`). Tensors in
/// f32, f64, f16 or bf16 are read as the caller's element type (any
/// `Storage` type: a bf16 tensor read as bf16 stays exact).
///
/// # Examples
///
/// ```
/// use attn::{SafeTensors, StateDict};
///
/// // a file with one f32 tensor "w" of shape (2,): 8-byte header length, header, data
/// let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
/// let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
/// bytes.extend_from_slice(header);
/// bytes.extend([1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()));
/// let file = SafeTensors::from_bytes(bytes)?;
/// let w = StateDict::<f64>::tensor(&file, "w")?.expect("present");
/// assert_eq!(w.as_slice(), Some(&[1.5, -2.0][..]));
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug)]
pub struct SafeTensors {
    bytes: Vec<u8>,
    /// Where the data begins.
    data_start: usize,
    metadata: Metadata,
}

impl SafeTensors {
    /// Reads and checks a file.
    ///
    /// # Errors
    ///
    /// [`Error::File`] when it cannot be read or is not a valid safetensors file
    /// (its header, or offsets that do not fit the data).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::SafeTensors::open("no/such/model.safetensors").is_err());
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(bytes).map_err(|e| match e {
            Error::File { reason, .. } => Error::File {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Checks the bytes of a file.
    ///
    /// # Errors
    ///
    /// [`Error::File`] when they are not a valid safetensors file.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attn::SafeTensors::from_bytes(vec![1, 2, 3]).is_err());
    /// ```
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let (header, metadata) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::File {
                path: "safetensors bytes".to_string(),
                reason: format!("not a valid safetensors file: {e}"),
            })?;
        Ok(SafeTensors {
            data_start: 8 + header,
            bytes,
            metadata,
        })
    }

    /// The dtype and shape of a tensor as stored, `None` when there is none.
    ///
    /// # Examples
    ///
    /// ```
    /// # let header = br#"{"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}"#;
    /// # let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    /// # bytes.extend_from_slice(header);
    /// # bytes.extend([0u8, 0x3f]);
    /// let file = attn::SafeTensors::from_bytes(bytes)?;
    /// assert_eq!(file.info("w"), Some(("BF16".to_string(), vec![1])));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn info(&self, name: &str) -> Option<(String, Vec<usize>)> {
        self.metadata
            .info(name)
            .map(|info| (format!("{:?}", info.dtype), info.shape.clone()))
    }

    /// The stored shape of `name`, checked: its element count fits in memory
    /// and its bytes are exactly those its dtype and shape need.
    fn checked_shape(&self, name: &str, info: &TensorInfo) -> Result<Vec<usize>> {
        let unusable = |reason: String| Error::Tensor {
            name: name.to_string(),
            reason,
        };
        // ndarray's limit: the product of the non-zero axes fits in an isize
        let addressable = info
            .shape
            .iter()
            .try_fold(1usize, |n, &axis| n.checked_mul(axis.max(1)))
            .filter(|&n| n <= isize::MAX as usize);
        let elements = info.shape.iter().try_fold(1usize, |n, &a| n.checked_mul(a));
        let (Some(_), Some(elements)) = (addressable, elements) else {
            return Err(unusable(format!(
                "shape {:?} has more elements than memory can address",
                info.shape
            )));
        };
        let (start, end) = info.data_offsets;
        let bytes = elements.checked_mul(value_bytes(name, info.dtype)?);
        if bytes != end.checked_sub(start) {
            return Err(unusable(format!(
                "shape {:?} of {:?} needs {} bytes, the header gives {start}..{end}",
                info.shape,
                info.dtype,
                bytes.map_or("too many".to_string(), |b| b.to_string())
            )));
        }
        Ok(info.shape.clone())
    }

    fn read<A: Storage>(&self, name: &str, info: &TensorInfo) -> Result<ArrayD<A>> {
        let shape = self.checked_shape(name, info)?;
        let (start, end) = info.data_offsets;
        let data = self
            .data_start
            .checked_add(start)
            .zip(self.data_start.checked_add(end))
            .and_then(|(from, to)| self.bytes.get(from..to))
            .ok_or_else(|| Error::Tensor {
                name: name.to_string(),
                reason: format!("data {start}..{end} lies outside the file"),
            })?;
        let decoded = match info.dtype {
            Dtype::F32 => decode(data, |b: [u8; 4]| f32::from_le_bytes(b) as f64),
            Dtype::F64 => decode(data, f64::from_le_bytes),
            Dtype::F16 => decode(data, |b: [u8; 2]| f16::from_le_bytes(b).to_f64()),
            Dtype::BF16 => decode(data, |b: [u8; 2]| bf16::from_le_bytes(b).to_f64()),
            other => return Err(unreadable(name, other)),
        };
        let values = decoded.map_err(|(index, x)| Error::Tensor {
            name: name.to_string(),
            reason: format!(
                "element {index} ({x:e}) overflows {}: load it as a wider type",
                std::any::type_name::<A>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("the target type")
            ),
        })?;
        ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| Error::Tensor {
            name: name.to_string(),
            reason: format!("shape {shape:?}: {e}"),
        })
    }
}

fn is_finite<E: Element>(x: E) -> bool {
    x.is_finite()
}

/// The bytes of one value of a dtype attn reads.
fn value_bytes(name: &str, dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F64 => Ok(8),
        Dtype::F32 => Ok(4),
        Dtype::F16 | Dtype::BF16 => Ok(2),
        other => Err(unreadable(name, other)),
    }
}

fn unreadable(name: &str, dtype: Dtype) -> Error {
    Error::Tensor {
        name: name.to_string(),
        reason: format!("dtype {dtype:?}: attention weights are read from F32, F64, F16 or BF16"),
    }
}

/// Little-endian values of `N` bytes each, as `A`; `Err((index, value))` for the
/// first finite value that becomes infinite in `A` (f32 above 65 504 as f16).
fn decode<A: Storage, const N: usize>(
    data: &[u8],
    value: impl Fn([u8; N]) -> f64,
) -> std::result::Result<Vec<A>, (usize, f64)> {
    let mut values = Vec::with_capacity(data.len() / N);
    for (index, chunk) in data.chunks_exact(N).enumerate() {
        let mut bytes = [0; N];
        bytes.copy_from_slice(chunk);
        let x = value(bytes);
        let stored = A::from_compute(<A::Compute as Element>::from_f64(x));
        if x.is_finite() && !is_finite(stored.to_compute()) {
            return Err((index, x));
        }
        values.push(stored);
    }
    Ok(values)
}

impl<A: Storage> StateDict<A> for SafeTensors {
    fn tensor(&self, name: &str) -> Result<Option<ArrayD<A>>> {
        self.metadata
            .info(name)
            .map(|info| self.read(name, info))
            .transpose()
    }

    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        self.metadata
            .info(name)
            .map(|info| self.checked_shape(name, info))
            .transpose()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }
}
