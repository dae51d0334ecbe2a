//! Checkpoints: the weights, the optimiser's momentum buffers and where the run stands, in one
//! safetensors file, so a run resumes exactly where it stopped.
//!
//! Layout: the weights under the crate's names (F32), each momentum buffer as
//! `momentum.<name>` (F32), and the [`TrainState`] as JSON under the metadata key
//! `alexnet_cuda.train_state`. [`Weights::load`] (and so `infer --weights`) reads a checkpoint's
//! weights and passes over its momentum.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::SavedLossScale;
use crate::config::AlexNetConfig;
use crate::error::{Error, Result};
use crate::weights::{first_non_finite, Weights};

/// The metadata key of the run's state.
pub const TRAIN_STATE_KEY: &str = "alexnet_cuda.train_state";
/// The prefix of the momentum buffers' tensor names.
pub const MOMENTUM_PREFIX: &str = "momentum.";

/// Where a run stands: everything besides weights and momentum that resuming needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps done (the next step's number).
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    pub learning_rate: f32,
    /// The lowest validation top-1 error so far, and the epochs since it last improved (the
    /// plateau schedule's memory).
    pub best_val_error: Option<f64>,
    pub epochs_without_improvement: u32,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// The settings the run was started with (seed, batch, data order, optimiser, ...), as
    /// the trainer recorded them: a resumed run must use the same.
    pub settings: serde_json::Value,
    /// Mixed precision: where the loss scaling stood (absent in checkpoints of runs that do
    /// not scale their loss, and in those written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<SavedLossScale>,
}

/// Weights, momentum buffers and state. The momentum buffers belong to the last
/// `velocity.len()` parameter tensors in network order (all of them, or those after frozen
/// layers; none before the first step).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub weights: Weights,
    pub velocity: Vec<Vec<f32>>,
    pub state: TrainState,
}

impl Checkpoint {
    /// Writes the checkpoint to `path` through a temporary sibling renamed over it, so an
    /// interrupted save leaves the previous checkpoint whole. A successful save also removes
    /// the temporary siblings of earlier saves of `path` that were killed mid-write (on Linux:
    /// `<name>.partial-<pid>` whose process no longer runs and that has not been written to for
    /// a minute), so a `kill -9` does not leave a checkpoint-sized file behind for good.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors = self.weights.named_tensors();
        let first_with_momentum = tensors.len().checked_sub(self.velocity.len());
        let matches = first_with_momentum.is_some_and(|first| {
            self.velocity
                .iter()
                .zip(&tensors[first..])
                .all(|(v, (_, _, w))| v.len() == w.len())
        });
        if !matches {
            return Err(Error::invalid(
                "checkpoint",
                "the momentum buffers do not match the weights",
            ));
        }
        // A diverged run's weights would replace the last checkpoint worth resuming.
        let first_with_momentum = first_with_momentum.unwrap_or(0);
        let momentum_names: Vec<String> = tensors[first_with_momentum..]
            .iter()
            .map(|(name, _, _)| format!("{MOMENTUM_PREFIX}{name}"))
            .collect();
        let momentum = momentum_names
            .iter()
            .zip(&self.velocity)
            .map(|(name, v)| (name.as_str(), v.as_slice()));
        let weights = tensors
            .iter()
            .map(|(name, _, v)| (name.as_str(), v.as_ref()));
        if let Some((name, at, value)) = first_non_finite(weights.chain(momentum)) {
            return Err(Error::invalid(
                "checkpoint",
                format!(
                    "{name}[{at}] is {value}: the training diverged, so \
                     {} was not written (any earlier checkpoint there is kept)",
                    path.display()
                ),
            ));
        }
        let encode =
            |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, (name, shape, values)) in tensors.iter().enumerate() {
            entries.push((name.clone(), shape.clone(), encode(values)));
            if let Some(v) = i
                .checked_sub(first_with_momentum)
                .and_then(|j| self.velocity.get(j))
            {
                entries.push((format!("{MOMENTUM_PREFIX}{name}"), shape.clone(), encode(v)));
            }
        }
        let views = entries
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
                    .map_err(|e| Error::invalid("checkpoint", e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let state = serde_json::to_string(&self.state)
            .map_err(|e| Error::invalid("checkpoint state", e.to_string()))?;
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("config".to_string(), self.weights.config().name.clone()),
            (TRAIN_STATE_KEY.to_string(), state),
        ]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::invalid("checkpoint", e.to_string()))?;
        write_replacing(path, &bytes)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`], its architecture read off the
    /// tensors (a preset's) or given as `config` (as [`Weights::load`]). A file without the
    /// train state (a plain weights file) is [`Error::Invalid`]; so are momentum buffers that
    /// do not match the weights.
    pub fn load(path: impl AsRef<Path>, config: Option<&AlexNetConfig>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| Error::WeightsFormat {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let state_json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(TRAIN_STATE_KEY))
            .ok_or_else(|| {
                Error::invalid(
                    "checkpoint",
                    format!(
                        "{} holds no training state (a weights file, not a checkpoint)",
                        path.display()
                    ),
                )
            })?;
        let state: TrainState = serde_json::from_str(state_json).map_err(|e| {
            Error::invalid(
                "checkpoint",
                format!("{}: train state: {e}", path.display()),
            )
        })?;
        let weights = Weights::from_safetensors_bytes_where(&bytes, path, config, |name| {
            !name.starts_with(MOMENTUM_PREFIX)
        })?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| Error::WeightsFormat {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut velocity = Vec::new();
        for (name, shape, values) in weights.named_tensors() {
            let Ok(view) = file.tensor(&format!("{MOMENTUM_PREFIX}{name}")) else {
                if !velocity.is_empty() {
                    return Err(Error::invalid(
                        "checkpoint",
                        format!(
                            "{}: `{name}` has no momentum but a tensor before it has",
                            path.display()
                        ),
                    ));
                }
                continue;
            };
            if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                return Err(Error::invalid(
                    "checkpoint",
                    format!(
                        "{}: the momentum of `{name}` is not F32 {shape:?}",
                        path.display()
                    ),
                ));
            }
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            debug_assert_eq!(v.len(), values.len());
            velocity.push(v);
        }
        Ok(Checkpoint {
            weights,
            velocity,
            state,
        })
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| {
        Error::invalid(
            "checkpoint path",
            format!("{} names no file", path.display()),
        )
    })?;
    let mut temporary = name.to_os_string();
    temporary.push(format!(".partial-{}", std::process::id()));
    let temporary = path.with_file_name(temporary);
    // On disk before the rename: after a power cut the name holds the old checkpoint or the
    // whole new one, never a renamed file whose blocks were not written yet.
    let written = write_synced(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, path));
    written.map_err(|e| {
        // Best effort: a failed write should not leave its partial file behind.
        let _ = std::fs::remove_file(&temporary);
        Error::io(path, e)
    })?;
    // The rename itself lasts once the directory is synced. Best effort: some file systems
    // cannot sync a directory, and the checkpoint is written either way.
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if let Ok(directory) = std::fs::File::open(directory) {
        let _ = directory.sync_all();
    }
    remove_abandoned_partials(directory, name);
    Ok(())
}

/// Removes `<name>.partial-<pid>` files in `directory` that a save killed mid-write left: its
/// process no longer runs and nothing has written to the file for a minute (a save in progress
/// writes continuously). Best effort and cautious: where a process's liveness cannot be read
/// (not Linux, no `/proc`), nothing is removed.
fn remove_abandoned_partials(directory: &Path, name: &std::ffi::OsStr) {
    const QUIET_FOR: std::time::Duration = std::time::Duration::from_secs(60);
    let mut prefix = name.to_os_string();
    prefix.push(".partial-");
    let (Some(prefix), Ok(entries)) = (prefix.to_str(), std::fs::read_dir(directory)) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let pid = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        let quiet = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age >= QUIET_FOR);
        if quiet && process_has_ended(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` has certainly ended: false wherever that cannot be told.
fn process_has_ended(pid: u32) -> bool {
    let proc = Path::new("/proc");
    cfg!(target_os = "linux")
        && pid != std::process::id()
        && proc.join("self").exists()
        && !proc.join(pid.to_string()).exists()
}

/// `bytes` written to a new file at `path` and synced to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
