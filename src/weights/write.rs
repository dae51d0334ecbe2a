//! Writing [`Weights`] as safetensors files: the crate's names, PyTorch layout, F32/F16/BF16.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensorError, View};

use super::read::CLASSES_METADATA_KEY;
use super::Weights;
use crate::error::{Error, Result};

/// On-disk dtype for [`crate::Weights::save`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
}

impl StorageDtype {
    /// The safetensors dtype tag written to the header.
    fn dtype(self) -> Dtype {
        match self {
            StorageDtype::F32 => Dtype::F32,
            StorageDtype::F16 => Dtype::F16,
            StorageDtype::BF16 => Dtype::BF16,
        }
    }

    /// Little-endian bytes of `values` in this dtype; f16 and bf16 round to nearest even
    /// (values beyond the f16 range become infinities, as in PyTorch's `.half()`).
    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            StorageDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            StorageDtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            StorageDtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl Weights {
    /// Saves the weights as a safetensors file under the crate's names, in PyTorch layout, with
    /// metadata `{"format": "pt", "config": <config name>}`. The file is written to a temporary
    /// sibling and renamed, so an existing file is never left half-written.
    pub fn save(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<()> {
        let path = path.as_ref();
        safetensors::serialize_to_file(self.encoded(dtype), Some(self.file_metadata()), path)
            .map_err(|e| match e {
                SafeTensorError::IoError(source) => Error::io(path, source),
                other => Error::WeightsFormat {
                    path: path.to_path_buf(),
                    message: format!("cannot serialize: {other}"),
                },
            })
    }

    /// [`Weights::save`] with the class names (label order) in the metadata, where
    /// [`Weights::class_names_in`] and `infer` find them. Their count must be the model's.
    pub fn save_with_classes(
        &self,
        path: impl AsRef<Path>,
        dtype: StorageDtype,
        classes: &[String],
    ) -> Result<()> {
        let path = path.as_ref();
        if classes.len() != self.config().num_classes() {
            return Err(Error::invalid(
                "class names",
                format!(
                    "{} names for a {}-class model",
                    classes.len(),
                    self.config().num_classes()
                ),
            ));
        }
        let names = serde_json::to_string(classes)
            .map_err(|e| Error::invalid("class names", e.to_string()))?;
        let mut metadata = self.file_metadata();
        metadata.insert(CLASSES_METADATA_KEY.to_string(), names);
        safetensors::serialize_to_file(self.encoded(dtype), Some(metadata), path).map_err(|e| {
            match e {
                SafeTensorError::IoError(source) => Error::io(path, source),
                other => Error::WeightsFormat {
                    path: path.to_path_buf(),
                    message: format!("cannot serialize: {other}"),
                },
            }
        })
    }

    /// The bytes [`Weights::save`] would write.
    pub fn to_safetensors_bytes(&self, dtype: StorageDtype) -> Result<Vec<u8>> {
        safetensors::serialize(self.encoded(dtype), Some(self.file_metadata()))
            .map_err(|e| Error::invalid("safetensors serialization", e.to_string()))
    }

    /// Every tensor under the crate's names, encoded in `dtype`.
    fn encoded(&self, dtype: StorageDtype) -> Vec<(String, EncodedTensor)> {
        self.named_tensors()
            .into_iter()
            .map(|(name, shape, values)| {
                let tensor = EncodedTensor {
                    dtype: dtype.dtype(),
                    shape,
                    bytes: dtype.encode(&values),
                };
                (name, tensor)
            })
            .collect()
    }

    /// The `__metadata__` block: PyTorch's format tag and the config name.
    fn file_metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("config".to_string(), self.config().name.clone()),
        ])
    }
}

/// One tensor ready for `safetensors::serialize`.
struct EncodedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for EncodedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
