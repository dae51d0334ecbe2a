//! Explanations of malformed safetensors files: what the header claims against what the file
//! holds, naming the tensor where the header allows, so an error says more than "invalid".

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorInfo;
use safetensors::SafeTensorError;

use crate::error::{Error, Result};

/// Largest header `safetensors` accepts; only quoted in messages.
pub(super) const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Turns a `safetensors` parse error into [`Error::WeightsFormat`], saying what the header claims
/// where that explains the failure.
pub(super) fn format_error(origin: &Path, bytes: &[u8], error: &SafeTensorError) -> Error {
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

/// Bytes of tensor data the header of `bytes` (length field and header, at least) describes:
/// the largest end offset. `None` when the header cannot be read.
pub(super) fn data_end(bytes: &[u8]) -> Option<usize> {
    let (_, entries) = header_entries(bytes)?;
    Some(
        entries
            .iter()
            .map(|(_, info)| info.data_offsets.1)
            .max()
            .unwrap_or(0),
    )
}

/// Rejects a header whose data offsets end so far out that `safetensors` (0.8.0) would overflow
/// adding the header length to them: it does so unchecked, a panic where overflow checks are on
/// (found while writing the fuzz targets; see `tests/fuzz_regressions.rs`). Other headers are
/// left to `safetensors`.
pub(super) fn check_data_end(bytes: &[u8], origin: &Path) -> Result<()> {
    let (Some((n, _)), Some(data_end)) = (header_entries(bytes), data_end(bytes)) else {
        return Ok(());
    };
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
    let (n, _) = header_entries(bytes)?;
    let data_end = data_end(bytes)?;
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
