//! Writing [`Weights`] as safetensors files: the crate's names, PyTorch layout, F32/F16/BF16.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensorError, View};

use super::names::torchvision_name;
use super::read::CLASSES_METADATA_KEY;
use super::Weights;
use crate::error::{Error, Result};

/// On-disk dtype for [`crate::Weights::save`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorageDtype {
    #[default]
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

/// Whose names the tensors of a saved file carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorNames {
    /// The crate's: `conv1.weight`, ..., `fc3.bias`.
    #[default]
    Crate,
    /// torchvision's `alexnet` state-dict keys (`features.0.weight`, ...,
    /// `classifier.6.bias`), so `torchvision.models.alexnet().load_state_dict` takes a
    /// torchvision-preset file as it is.
    Torchvision,
}

/// How [`Weights::save_with`] writes a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions<'a> {
    pub dtype: StorageDtype,
    pub names: TensorNames,
    /// Class names (label order) for the metadata, where [`Weights::class_names_in`] and
    /// `infer` find them; their count must be the model's.
    pub classes: Option<&'a [String]>,
}

impl Weights {
    /// Saves the weights as a safetensors file under the crate's names, in PyTorch layout, with
    /// metadata `{"format": "pt", "config": <config name>}`. The file is written to a temporary
    /// sibling and renamed, so an existing file is never left half-written.
    pub fn save(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<()> {
        self.save_with(
            path,
            &SaveOptions {
                dtype,
                ..SaveOptions::default()
            },
        )
    }

    /// [`Weights::save`] with the class names (label order) in the metadata.
    pub fn save_with_classes(
        &self,
        path: impl AsRef<Path>,
        dtype: StorageDtype,
        classes: &[String],
    ) -> Result<()> {
        self.save_with(
            path,
            &SaveOptions {
                dtype,
                classes: Some(classes),
                ..SaveOptions::default()
            },
        )
    }

    /// Saves the weights as `options` says (dtype, tensor names, class names); otherwise as
    /// [`Weights::save`].
    pub fn save_with(&self, path: impl AsRef<Path>, options: &SaveOptions<'_>) -> Result<()> {
        let path = path.as_ref();
        let mut metadata = self.file_metadata();
        if let Some(classes) = options.classes {
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
            metadata.insert(CLASSES_METADATA_KEY.to_string(), names);
        }
        let tensors = self
            .encoded(options.dtype)
            .into_iter()
            .map(|(name, tensor)| Ok((external_name(&name, options.names)?, tensor)))
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| match e {
            SafeTensorError::IoError(source) => Error::io(path, source),
            other => Error::WeightsFormat {
                path: path.to_path_buf(),
                message: format!("cannot serialize: {other}"),
            },
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

/// `name` (the crate's) as `names` spells it; [`Error::Invalid`] when torchvision has no
/// name for it (a network with more layers than AlexNet's eight).
fn external_name(name: &str, names: TensorNames) -> Result<String> {
    match names {
        TensorNames::Crate => Ok(name.to_string()),
        TensorNames::Torchvision => torchvision_name(name).ok_or_else(|| {
            Error::invalid(
                "torchvision names",
                format!("torchvision's alexnet has no parameter for `{name}`"),
            )
        }),
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
