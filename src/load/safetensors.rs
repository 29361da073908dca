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

    fn read<A: Storage>(&self, name: &str, info: &TensorInfo) -> Result<ArrayD<A>> {
        let (start, end) = info.data_offsets;
        let data = &self.bytes[self.data_start + start..self.data_start + end];
        let values: Vec<A> = match info.dtype {
            Dtype::F32 => decode(data, |b: [u8; 4]| f32::from_le_bytes(b) as f64),
            Dtype::F64 => decode(data, f64::from_le_bytes),
            Dtype::F16 => decode(data, |b: [u8; 2]| f16::from_le_bytes(b).to_f64()),
            Dtype::BF16 => decode(data, |b: [u8; 2]| bf16::from_le_bytes(b).to_f64()),
            other => {
                return Err(Error::Tensor {
                    name: name.to_string(),
                    reason: format!(
                        "dtype {other:?}: attention weights are read from F32, F64, F16 or BF16"
                    ),
                })
            }
        };
        Ok(ArrayD::from_shape_vec(IxDyn(&info.shape), values)
            .expect("the header's offsets were checked against the shape"))
    }
}

/// Little-endian values of `N` bytes each, as `A`.
fn decode<A: Storage, const N: usize>(data: &[u8], value: impl Fn([u8; N]) -> f64) -> Vec<A> {
    data.chunks_exact(N)
        .map(|chunk| {
            let x = value(chunk.try_into().expect("chunks of N bytes"));
            A::from_compute(<A::Compute as Element>::from_f64(x))
        })
        .collect()
}

impl<A: Storage> StateDict<A> for SafeTensors {
    fn tensor(&self, name: &str) -> Result<Option<ArrayD<A>>> {
        self.metadata
            .info(name)
            .map(|info| self.read(name, info))
            .transpose()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }
}
