//! Reading [`Weights`] from safetensors files.
//!
//! Files hold one tensor per parameter, in PyTorch layout (conv OIHW, linear `[out, in]`), under
//! the crate's names (`conv1.weight`, ..., `fc3.bias`). For the 5-conv/3-fc skeleton, torchvision's
//! names (`features.0.weight`, ..., `classifier.6.bias`) are read as well, so torchvision's
//! pretrained `state_dict` saved with `safetensors.torch.save_file` loads unchanged.
//!
//! Loading is strict: every tensor in the file must map to exactly one parameter and every
//! parameter must be present with the right shape and a float dtype (F32, F16 or BF16). Every
//! error names the file, and the tensor where there is one.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use memmap2::Mmap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::architecture::{check_preset_swap, detect_config};
use super::diagnostics::{check_data_end, data_end, format_error, MAX_HEADER_BYTES};
use super::names::{layout_hint, torchvision_alias, without_wrapper_prefix};
use super::Weights;
use crate::config::AlexNetConfig;
use crate::error::{Error, Result};

/// Most bytes [`Weights::load`] reads from something that is not a regular file (a pipe, a
/// device): AlexNet's weights are 250 MB in f32.
pub const MAX_STREAMED_WEIGHTS_BYTES: u64 = 4 << 30;

impl Weights {
    /// Loads weights from a safetensors file.
    ///
    /// With `config`, every tensor must match it. Without one, the architecture is read off the
    /// tensor shapes: the conv channels pick the paper or torchvision preset, and the fully
    /// connected widths (including the number of classes) are taken from the file; the config
    /// keeps the preset's name even when the head differs. The crate's tensor names and, for the
    /// 5-conv/3-fc skeleton, torchvision's (`features.0.weight`, ...) are accepted. Tensors may be
    /// F32, F16 or BF16 and are converted to f32 exactly.
    ///
    /// Errors: [`Error::Io`] if the file cannot be read, [`Error::WeightsFormat`] if it is not a
    /// valid safetensors file, [`Error::MissingTensor`], [`Error::UnexpectedTensor`],
    /// [`Error::TensorShape`], [`Error::TensorDtype`] for tensors that do not fit, and
    /// [`Error::Architecture`] when the architecture cannot be told or a parameter is given twice.
    ///
    /// A regular file is memory-mapped, not read into memory: loading holds the file once (as
    /// the f32 tensors it copies out), whatever its size. The file must not be truncated by
    /// another process while it loads (the tensors are copied out of the map during this call;
    /// afterwards the file is not touched). Anything else (a pipe, a device such as /dev/zero)
    /// is read up to [`MAX_STREAMED_WEIGHTS_BYTES`] and refused beyond.
    pub fn load(path: impl AsRef<Path>, config: Option<&AlexNetConfig>) -> Result<Weights> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
        if metadata.is_file() {
            if metadata.len() == 0 {
                // An empty file cannot be mapped; it is simply not a safetensors file.
                return Self::from_safetensors_bytes(&[], path, config);
            }
            // SAFETY: the map is read-only and dropped before this function returns; the
            // tensors are copied out of it during the call. The one hazard, another process
            // truncating the file meanwhile (SIGBUS), is documented above.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            Self::from_safetensors_bytes(&map, path, config)
        } else {
            let bytes = read_stream(file, path)?;
            Self::from_safetensors_bytes(&bytes, path, config)
        }
    }

    /// Like [`Weights::load`], from the bytes of a safetensors file; `origin` names the bytes in
    /// error messages. The buffer need not be aligned.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        origin: &Path,
        config: Option<&AlexNetConfig>,
    ) -> Result<Weights> {
        // A training checkpoint is a weights file plus momentum buffers: read its weights.
        let checkpoint = SafeTensors::read_metadata(bytes).is_ok_and(|(_, metadata)| {
            metadata
                .metadata()
                .as_ref()
                .is_some_and(|m| m.contains_key(crate::train::TRAIN_STATE_KEY))
        });
        Self::from_safetensors_bytes_where(bytes, origin, config, |name| {
            !(checkpoint && name.starts_with(crate::train::MOMENTUM_PREFIX))
        })
    }

    /// [`Weights::from_safetensors_bytes`] over the tensors whose file name `keep` accepts
    /// (a checkpoint's weights beside its momentum buffers).
    pub(crate) fn from_safetensors_bytes_where(
        bytes: &[u8],
        origin: &Path,
        config: Option<&AlexNetConfig>,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Weights> {
        check_data_end(bytes, origin)?;
        let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(origin, bytes, &e))?;
        let mut tensors = index_tensors(&file, origin)?;
        tensors.retain(|_, tensor| keep(&tensor.file_name));
        let config = match config {
            Some(config) => {
                check_preset_swap(config, &tensors, origin)?;
                config.clone()
            }
            None => detect_config(&tensors, origin)?,
        };
        let expected = validate(&config, &tensors, origin)?;
        let values = expected
            .into_iter()
            .map(|(name, shape)| {
                let tensor = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                    path: origin.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                })?;
                let data = decode(tensor, origin)?;
                Ok((name, shape, data))
            })
            .collect::<Result<Vec<_>>>()?;
        // Every name and shape was checked above, so this only fails on a bug; still name the file.
        Weights::from_tensors(&config, values).map_err(|e| Error::Architecture {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// A tensor of the file, filed under the crate's name for it.
pub(super) struct FileTensor<'a> {
    /// The name as spelled in the file.
    file_name: String,
    /// The crate's name for the parameter.
    name: String,
    /// Whether `file_name` is torchvision's spelling.
    torchvision: bool,
    view: TensorView<'a>,
}

impl FileTensor<'_> {
    /// The name for messages: the file's spelling, plus the crate's name when they differ.
    pub(super) fn label(&self) -> String {
        if self.file_name != self.name {
            format!("{} (= {})", self.file_name, self.name)
        } else {
            self.name.clone()
        }
    }

    pub(super) fn shape(&self) -> &[usize] {
        self.view.shape()
    }
}

/// Tensors of a file keyed by the crate's names.
pub(super) type TensorIndex<'a> = HashMap<String, FileTensor<'a>>;

/// The metadata key under which [`Weights::save_with_classes`] keeps the class names (a JSON
/// array of strings, in label order).
pub const CLASSES_METADATA_KEY: &str = "classes";

impl Weights {
    /// The class names a weights file carries in its metadata ([`Weights::save_with_classes`]),
    /// or `None` when it carries none. Reads the header only.
    ///
    /// Errors: [`Error::Io`] when the file cannot be read, [`Error::WeightsFormat`] when its
    /// header is not a safetensors header or the names are not a JSON list of strings.
    pub fn class_names_in(path: impl AsRef<Path>) -> Result<Option<Vec<String>>> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut length = [0u8; 8];
        file.read_exact(&mut length)
            .map_err(|e| Error::io(path, e))?;
        let length = u64::from_le_bytes(length);
        let bad = |message: String| Error::WeightsFormat {
            path: path.to_path_buf(),
            message,
        };
        if length > MAX_HEADER_BYTES {
            return Err(bad(format!("a header of {length} bytes is not plausible")));
        }
        let mut header = vec![0u8; length as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let Some(names) = header
            .get("__metadata__")
            .and_then(|m| m.get(CLASSES_METADATA_KEY))
        else {
            return Ok(None);
        };
        let names = names
            .as_str()
            .and_then(|text| serde_json::from_str::<Vec<String>>(text).ok())
            .ok_or_else(|| bad("the class names are not a JSON list of strings".into()))?;
        Ok(Some(names))
    }
}

/// Reads a safetensors stream (not a regular file) no further than its header says it goes,
/// and never past [`MAX_STREAMED_WEIGHTS_BYTES`]: `/dev/zero` is refused after 8 bytes, an
/// endless or huge stream after the cap.
fn read_stream(file: File, path: &Path) -> Result<Vec<u8>> {
    let mut reader = file.take(MAX_STREAMED_WEIGHTS_BYTES);
    let mut bytes = vec![0u8; 8];
    let short = |bytes: &[u8]| Error::WeightsFormat {
        path: path.to_path_buf(),
        message: format!(
            "the stream ended after {} bytes, inside the header",
            bytes.len()
        ),
    };
    reader.read_exact(&mut bytes).map_err(|_| short(&bytes))?;
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if header == 0 || header > MAX_HEADER_BYTES {
        // Let the parser say what is wrong with such a header.
        return Ok(bytes);
    }
    let header_end = 8 + header as usize;
    bytes.resize(header_end, 0);
    reader
        .read_exact(&mut bytes[8..])
        .map_err(|_| short(&bytes))?;
    let total = data_end(&bytes)
        .and_then(|end| end.checked_add(header_end))
        .filter(|&total| total as u64 <= MAX_STREAMED_WEIGHTS_BYTES)
        .ok_or_else(|| Error::WeightsFormat {
            path: path.to_path_buf(),
            message: format!(
                "not a regular file, and its header describes more than {} GiB or cannot be \
                 read: refusing to read further",
                MAX_STREAMED_WEIGHTS_BYTES >> 30
            ),
        })?;
    (&mut reader)
        .take((total - header_end) as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Files every tensor under the crate's name; two tensors naming one parameter are an error.
fn index_tensors<'a>(file: &SafeTensors<'a>, origin: &Path) -> Result<TensorIndex<'a>> {
    // Sorted so that which duplicate is reported does not depend on hash order.
    let mut entries: Vec<_> = file.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut index = TensorIndex::with_capacity(entries.len());
    for (file_name, view) in entries {
        let bare = without_wrapper_prefix(file_name);
        let alias = torchvision_alias(bare);
        let tensor = FileTensor {
            file_name: file_name.to_string(),
            torchvision: alias.is_some(),
            name: alias.unwrap_or_else(|| bare.to_string()),
            view,
        };
        if let Some(previous) = index.get(&tensor.name) {
            return Err(Error::Architecture {
                path: origin.to_path_buf(),
                message: format!(
                    "tensors `{}` and `{}` both hold the parameter `{}` (two spellings of one \
                     name); keep only one",
                    previous.file_name, tensor.file_name, tensor.name
                ),
            });
        }
        index.insert(tensor.name.clone(), tensor);
    }
    Ok(index)
}

/// Checks names, shapes and dtypes of every tensor against `config` before anything is
/// converted; returns the config's parameter shapes in network order.
fn validate(
    config: &AlexNetConfig,
    tensors: &TensorIndex<'_>,
    origin: &Path,
) -> Result<Vec<(String, Vec<usize>)>> {
    let expected = config.parameter_shapes().map_err(|e| Error::Architecture {
        path: origin.to_path_buf(),
        message: format!("the architecture `{}` is not usable: {e}", config.name),
    })?;
    check_no_unexpected(config, &expected, tensors, origin)?;
    for (name, shape) in &expected {
        let tensor = tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: origin.to_path_buf(),
            name: name.clone(),
            expected: shape.clone(),
        })?;
        if tensor.shape() != shape.as_slice() {
            return Err(Error::TensorShape {
                path: origin.to_path_buf(),
                name: tensor.label(),
                expected: shape.clone(),
                found: tensor.shape().to_vec(),
                hint: layout_hint(shape, tensor.shape()),
            });
        }
        if bytes_per_value(tensor.view.dtype()).is_none() {
            return Err(Error::TensorDtype {
                path: origin.to_path_buf(),
                name: tensor.label(),
                found: tensor.view.dtype().to_string(),
            });
        }
    }
    Ok(expected)
}

/// Every tensor of the file must be a parameter of `config`; torchvision's spellings only count
/// for the 5-conv/3-fc skeleton they were written for.
fn check_no_unexpected(
    config: &AlexNetConfig,
    expected: &[(String, Vec<usize>)],
    tensors: &TensorIndex<'_>,
    origin: &Path,
) -> Result<()> {
    let torchvision_layout = config.convs.len() == 5 && config.fcs.len() == 3;
    let mut unexpected: Vec<&FileTensor<'_>> = tensors
        .values()
        .filter(|t| {
            !expected.iter().any(|(name, _)| *name == t.name)
                || (t.torchvision && !torchvision_layout)
        })
        .collect();
    // Report the same tensor every time, whatever the hash order.
    unexpected.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    match unexpected.first() {
        Some(tensor) => Err(Error::UnexpectedTensor {
            path: origin.to_path_buf(),
            name: tensor.file_name.clone(),
            shape: tensor.shape().to_vec(),
            config: config.name.clone(),
        }),
        None => Ok(()),
    }
}

/// Bytes per element of the dtypes this crate reads; `None` for the others.
fn bytes_per_value(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// The tensor's values as f32 (exact for all three dtypes), read byte-wise because the data need
/// not be aligned.
fn decode(tensor: &FileTensor<'_>, origin: &Path) -> Result<Vec<f32>> {
    let dtype = tensor.view.dtype();
    let data = tensor.view.data();
    let count: usize = tensor.shape().iter().product();
    let dtype_error = || Error::TensorDtype {
        path: origin.to_path_buf(),
        name: tensor.label(),
        found: dtype.to_string(),
    };
    let width = bytes_per_value(dtype).ok_or_else(dtype_error)?;
    // safetensors checks this already; a mismatch here would mean a corrupt file, not a panic.
    if count.checked_mul(width) != Some(data.len()) {
        return Err(Error::WeightsFormat {
            path: origin.to_path_buf(),
            message: format!(
                "tensor `{}` holds {} bytes, its shape {:?} and dtype {dtype} need {count} x {width}",
                tensor.label(),
                data.len(),
                tensor.shape()
            ),
        });
    }
    let values = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return Err(dtype_error()),
    };
    Ok(values)
}
