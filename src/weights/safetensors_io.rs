//! Reading and writing [`Weights`] as safetensors files.
//!
//! Files hold one tensor per parameter, in PyTorch layout (conv OIHW, linear `[out, in]`), under
//! the crate's names (`conv1.weight`, ..., `fc3.bias`). For the 5-conv/3-fc skeleton, torchvision's
//! names (`features.0.weight`, ..., `classifier.6.bias`) are read as well, so torchvision's
//! pretrained `state_dict` saved with `safetensors.torch.save_file` loads unchanged.
//!
//! Loading is strict: every tensor in the file must map to exactly one parameter and every
//! parameter must be present with the right shape and a float dtype (F32, F16 or BF16). Every
//! error names the file, and the tensor where there is one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use super::Weights;
use crate::config::{AlexNetConfig, Plan};
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

/// torchvision's `alexnet` module paths and the crate's layer names they stand for.
const TORCHVISION_LAYERS: [(&str, &str); 8] = [
    ("features.0", "conv1"),
    ("features.3", "conv2"),
    ("features.6", "conv3"),
    ("features.8", "conv4"),
    ("features.10", "conv5"),
    ("classifier.1", "fc1"),
    ("classifier.4", "fc2"),
    ("classifier.6", "fc3"),
];

/// Largest header `safetensors` accepts; only quoted in messages.
const MAX_HEADER_BYTES: u64 = 100_000_000;

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
    pub fn load(path: impl AsRef<Path>, config: Option<&AlexNetConfig>) -> Result<Weights> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_safetensors_bytes(&bytes, path, config)
    }

    /// Like [`Weights::load`], from the bytes of a safetensors file; `origin` names the bytes in
    /// error messages. The buffer need not be aligned.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        origin: &Path,
        config: Option<&AlexNetConfig>,
    ) -> Result<Weights> {
        check_data_end(bytes, origin)?;
        let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(origin, bytes, &e))?;
        let tensors = index_tensors(&file, origin)?;
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

/// A tensor of the file, filed under the crate's name for it.
struct FileTensor<'a> {
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
    fn label(&self) -> String {
        if self.torchvision {
            format!("{} (= {})", self.file_name, self.name)
        } else {
            self.name.clone()
        }
    }

    fn shape(&self) -> &[usize] {
        self.view.shape()
    }
}

/// Tensors of a file keyed by the crate's names.
type TensorIndex<'a> = HashMap<String, FileTensor<'a>>;

/// Turns a `safetensors` parse error into [`Error::WeightsFormat`], saying what the header claims
/// where that explains the failure.
fn format_error(origin: &Path, bytes: &[u8], error: &SafeTensorError) -> Error {
    Error::WeightsFormat {
        path: origin.to_path_buf(),
        message: explain_format_error(bytes, error),
    }
}

/// A message for a `safetensors` parse error, naming the tensor where the header allows.
fn explain_format_error(bytes: &[u8], error: &SafeTensorError) -> String {
    let len = bytes.len();
    let claimed = bytes
        .first_chunk::<8>()
        .map(|field| u64::from_le_bytes(*field));
    let detail = match (error, claimed) {
        (SafeTensorError::HeaderTooSmall, _) => Some(format!(
            "the file is {len} bytes, too short for the 8-byte header length field"
        )),
        (SafeTensorError::HeaderTooLarge, Some(n)) => Some(format!(
            "the header length field claims {n} bytes (at most {MAX_HEADER_BYTES} are accepted; \
             the file is {len} bytes)"
        )),
        (SafeTensorError::InvalidHeaderLength, Some(n)) => Some(format!(
            "the header length field claims {n} bytes but the file is only {len} bytes"
        )),
        (SafeTensorError::MetadataIncompleteBuffer, _) => explain_size_mismatch(bytes),
        (SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow, _) => {
            explain_bad_tensor(bytes)
        }
        _ => None,
    };
    detail.unwrap_or_else(|| error.to_string())
}

/// The header's tensor entries sorted by name, with the header length, parsed a second time
/// to explain an error `safetensors` reports without details. `None` if the header is unreadable.
fn header_entries(bytes: &[u8]) -> Option<(usize, Vec<(String, TensorInfo)>)> {
    let n = usize::try_from(u64::from_le_bytes(*bytes.first_chunk::<8>()?)).ok()?;
    // `get` bounds the slice by the file, so a lying length field cannot make this allocate.
    let header = bytes.get(8..n.checked_add(8)?)?;
    let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<(String, TensorInfo)> = raw
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, value)| Some((name, serde_json::from_value(value).ok()?)))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Some((n, entries))
}

/// Rejects a header whose data offsets end so far out that `safetensors` (0.8.0) would overflow
/// adding the header length to them: it does so unchecked, a panic where overflow checks are on
/// (found while writing the fuzz targets; see `tests/fuzz_regressions.rs`). Other headers are
/// left to `safetensors`.
fn check_data_end(bytes: &[u8], origin: &Path) -> Result<()> {
    let Some((n, entries)) = header_entries(bytes) else {
        return Ok(());
    };
    let data_end = entries
        .iter()
        .map(|(_, info)| info.data_offsets.1)
        .max()
        .unwrap_or(0);
    let file_end = data_end.checked_add(n).and_then(|end| end.checked_add(8));
    if file_end.is_some() {
        return Ok(());
    }
    Err(Error::WeightsFormat {
        path: origin.to_path_buf(),
        message: format!(
            "the header's data offsets reach byte {data_end} of the data, beyond any file size \
             (the file is {} bytes)",
            bytes.len()
        ),
    })
}

/// Bytes a tensor of this shape and dtype occupies; `None` on overflow.
fn needed_bytes(info: &TensorInfo) -> Option<usize> {
    let count = info
        .shape
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))?;
    Some(count.checked_mul(info.dtype.bitsize())?.div_ceil(8))
}

/// Names the first tensor whose data offsets disagree with its shape and dtype.
fn explain_bad_tensor(bytes: &[u8]) -> Option<String> {
    let (_, entries) = header_entries(bytes)?;
    entries.iter().find_map(|(name, info)| {
        let (start, end) = info.data_offsets;
        let span = end.checked_sub(start);
        match needed_bytes(info) {
            None => Some(format!(
                "tensor `{name}`: shape {:?} is too large to address",
                info.shape
            )),
            Some(needed) if Some(needed) != span => Some(format!(
                "tensor `{name}`: shape {:?} in {} needs {needed} bytes, but its data_offsets \
                 [{start}, {end}] say otherwise",
                info.shape, info.dtype
            )),
            Some(_) => None,
        }
    })
}

/// Says how far the file's length is from the one its header describes.
fn explain_size_mismatch(bytes: &[u8]) -> Option<String> {
    let (n, entries) = header_entries(bytes)?;
    let data_end = entries
        .iter()
        .map(|(_, info)| info.data_offsets.1)
        .max()
        .unwrap_or(0);
    let described = data_end.checked_add(n)?.checked_add(8)?;
    let len = bytes.len();
    Some(if len < described {
        format!("the header describes {described} bytes but the file has only {len}: truncated")
    } else {
        format!(
            "the header describes {described} bytes but the file has {len}: {} unexpected bytes \
             at the end",
            len - described
        )
    })
}

/// The crate's name for `file_name` when it is torchvision's spelling of a parameter.
fn torchvision_alias(file_name: &str) -> Option<String> {
    let (module, param) = file_name.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    TORCHVISION_LAYERS
        .iter()
        .find(|(theirs, _)| *theirs == module)
        .map(|(_, ours)| format!("{ours}.{param}"))
}

/// Files every tensor under the crate's name; two tensors naming one parameter are an error.
fn index_tensors<'a>(file: &SafeTensors<'a>, origin: &Path) -> Result<TensorIndex<'a>> {
    // Sorted so that which duplicate is reported does not depend on hash order.
    let mut entries: Vec<_> = file.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut index = TensorIndex::with_capacity(entries.len());
    for (file_name, view) in entries {
        let alias = torchvision_alias(file_name);
        let tensor = FileTensor {
            file_name: file_name.to_string(),
            torchvision: alias.is_some(),
            name: alias.unwrap_or_else(|| file_name.to_string()),
            view,
        };
        if let Some(previous) = index.get(&tensor.name) {
            return Err(Error::Architecture {
                path: origin.to_path_buf(),
                message: format!(
                    "tensors `{}` and `{}` both hold the parameter `{}` (crate and torchvision \
                     spellings); keep only one",
                    previous.file_name, tensor.file_name, tensor.name
                ),
            });
        }
        index.insert(tensor.name.clone(), tensor);
    }
    Ok(index)
}

/// Output width of layer `layer` (`conv1`, `fc3`, ...) as the file has it: the weight's first
/// dimension, or the bias's length when the weight is absent.
fn out_width(tensors: &TensorIndex<'_>, layer: &str) -> Option<usize> {
    ["weight", "bias"].iter().find_map(|param| {
        tensors
            .get(&format!("{layer}.{param}"))?
            .shape()
            .first()
            .copied()
    })
}

/// The file's output channels for each convolution of `plan` (`None` where the file does not
/// say), looked up under the plan's layer names.
fn file_conv_channels(tensors: &TensorIndex<'_>, plan: &Plan) -> Vec<Option<usize>> {
    plan.convs()
        .map(|stage| out_width(tensors, &stage.name))
        .collect()
}

fn conv_channels(config: &AlexNetConfig) -> Vec<usize> {
    config.convs.iter().map(|c| c.out_channels).collect()
}

/// `[96, ?, 384, ...]` for messages.
fn channel_list(channels: &[Option<usize>]) -> String {
    let items: Vec<String> = channels
        .iter()
        .map(|c| c.map_or("?".to_string(), |c| c.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

/// Reads the architecture off the tensor shapes: the conv channels pick a preset (missing
/// tensors are left to the full check, which names them with their expected shapes), and the
/// fully connected widths come from the file.
fn detect_config(tensors: &TensorIndex<'_>, origin: &Path) -> Result<AlexNetConfig> {
    let presets = [AlexNetConfig::paper(), AlexNetConfig::torchvision()];
    // Both presets name their layers alike (conv1..conv5, fc1..fc3).
    let names = presets[0].plan()?;
    let channels = file_conv_channels(tensors, &names);
    let matching: Vec<&AlexNetConfig> = presets
        .iter()
        .filter(|preset| {
            conv_channels(preset)
                .iter()
                .zip(&channels)
                .all(|(want, found)| found.is_none_or(|found| found == *want))
        })
        .collect();
    let architecture_error = |message: String| Error::Architecture {
        path: origin.to_path_buf(),
        message,
    };
    let preset = match matching.as_slice() {
        [preset] => *preset,
        [] => {
            return Err(architecture_error(format!(
                "conv channels {} match neither the paper preset {:?} nor torchvision's {:?}; \
                 pass an explicit AlexNetConfig to load this file",
                channel_list(&channels),
                conv_channels(&presets[0]),
                conv_channels(&presets[1]),
            )))
        }
        _ => {
            return Err(architecture_error(format!(
                "cannot tell the architecture: the file's conv channels {} fit both the paper and \
                 the torchvision preset (conv weights missing); pass an explicit AlexNetConfig",
                channel_list(&channels),
            )))
        }
    };
    let mut config = preset.clone();
    for (fc, stage) in config.fcs.iter_mut().zip(names.linears()) {
        if let Some(width) = out_width(tensors, &stage.name) {
            fc.out_features = width;
        }
    }
    Ok(config)
}

/// With an explicit config, catches the common mix-up of the two presets (paper weights with the
/// torchvision config or the reverse) and says so, rather than reporting a shape mismatch.
fn check_preset_swap(
    config: &AlexNetConfig,
    tensors: &TensorIndex<'_>,
    origin: &Path,
) -> Result<()> {
    if config.convs.len() != 5 {
        return Ok(());
    }
    let Ok(plan) = config.plan() else {
        return Ok(()); // the full check reports a malformed config
    };
    let Some(found) = file_conv_channels(tensors, &plan)
        .into_iter()
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(());
    };
    if found == conv_channels(config) {
        return Ok(());
    }
    let presets = [AlexNetConfig::paper(), AlexNetConfig::torchvision()];
    match presets.iter().find(|p| conv_channels(p) == found) {
        Some(preset) => Err(Error::Architecture {
            path: origin.to_path_buf(),
            message: format!(
                "the file holds {} AlexNet weights (conv channels {found:?}), but the config `{}` \
                 has conv channels {:?}; pass the `{}` preset or no config at all",
                preset.name,
                config.name,
                conv_channels(config),
                preset.name
            ),
        }),
        None => Ok(()),
    }
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
