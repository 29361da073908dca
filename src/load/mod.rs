//! Weights from files: safetensors, the layouts models store their attention
//! in, and Hugging Face `config.json`.

mod block;
mod families;
pub(crate) mod hf;
pub(crate) mod layout;
pub(crate) mod safetensors;

use std::collections::HashMap;
use std::hash::BuildHasher;

use ndarray::ArrayD;

use crate::element::Storage;
use crate::error::Result;

/// Named tensors to load a layer from: a [`SafeTensors`](crate::SafeTensors)
/// file, or arrays the caller holds in a `HashMap` (a PyTorch state dict
/// converted by hand, weights built in code).
///
/// # Examples
///
/// ```
/// use std::collections::HashMap;
/// use attn::StateDict;
/// use ndarray::{ArrayD, IxDyn};
///
/// let mut dict = HashMap::new();
/// dict.insert("w".to_string(), ArrayD::<f64>::zeros(IxDyn(&[2, 3])));
/// assert_eq!(dict.tensor("w")?.map(|t| t.shape().to_vec()), Some(vec![2, 3]));
/// assert!(StateDict::<f64>::tensor(&dict, "missing")?.is_none());
/// # Ok::<(), attn::Error>(())
/// ```
pub trait StateDict<A> {
    /// The tensor called `name` as `A`, or `None` when there is none.
    ///
    /// # Errors
    ///
    /// [`Error::Tensor`](crate::Error::Tensor) when it exists but cannot be read
    /// as `A` (its dtype, its data).
    fn tensor(&self, name: &str) -> Result<Option<ArrayD<A>>>;

    /// The shape of the tensor called `name`, or `None` when there is none:
    /// what a loader compares before it decodes anything. The default decodes
    /// the tensor; a file overrides it with the shape its header gives.
    ///
    /// # Errors
    ///
    /// [`Error::Tensor`](crate::Error::Tensor) when it exists but cannot be
    /// read as `A`.
    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.tensor(name)?.map(|t| t.shape().to_vec()))
    }

    /// Every tensor's name, sorted (error messages list the near ones).
    fn names(&self) -> Vec<String>;
}

impl<A: Storage, S: BuildHasher> StateDict<A> for HashMap<String, ArrayD<A>, S> {
    fn tensor(&self, name: &str) -> Result<Option<ArrayD<A>>> {
        Ok(self.get(name).cloned())
    }

    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.get(name).map(|t| t.shape().to_vec()))
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.keys().cloned().collect();
        names.sort();
        names
    }
}
