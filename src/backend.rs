//! What every backend shares: the precision and device choices, and the [`Backend`] trait the
//! CLI and benchmarks drive.

use std::fmt;
use std::str::FromStr;

use ndarray::{Array2, ArrayView4};

use crate::config::AlexNetConfig;
use crate::cpu::CpuModel;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Numeric mode of a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 storage and arithmetic.
    #[default]
    Fp32,
    /// f16 storage (weights and activations) with f32 accumulation.
    Fp16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "fp16" | "f16" => Ok(Precision::Fp16),
            other => Err(Error::invalid(
                "precision",
                format!("`{other}` (expected fp32 or fp16)"),
            )),
        }
    }
}

/// Which device to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when usable, otherwise the CPU (with a notice).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// A model that turns normalised NCHW batches into logits.
pub trait Backend {
    /// A human-readable device description ("CPU (2 threads)", "NVIDIA H100 ...").
    fn device_name(&self) -> String;
    fn precision(&self) -> Precision;
    /// The architecture being run.
    fn config(&self) -> &AlexNetConfig;
    /// Logits `[N, classes]` for a normalised `[N, 3, H, W]` batch.
    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>>;
}

impl Backend for crate::cpu::CpuModel {
    fn device_name(&self) -> String {
        format!("CPU ({} threads)", rayon::current_num_threads())
    }

    fn precision(&self) -> Precision {
        crate::cpu::CpuModel::precision(self)
    }

    fn config(&self) -> &AlexNetConfig {
        crate::cpu::CpuModel::config(self)
    }

    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        crate::cpu::CpuModel::forward(self, input)
    }
}

/// A backend ready to run, and a one-line notice when the choice was not the one asked for.
pub struct OpenedBackend {
    pub backend: Box<dyn Backend>,
    /// E.g. why `Auto` fell back to the CPU.
    pub notice: Option<String>,
}

/// Why there is no GPU path in this build (the CUDA backend is not written yet).
const NO_CUDA_BACKEND: &str = "this build of alexnet-cuda has no CUDA backend yet";

/// Builds a model for `weights` on the chosen device. `Cuda` fails with
/// [`Error::DeviceUnavailable`] when no GPU path is usable; `Auto` falls back to the CPU and
/// says so in the notice.
pub fn open_backend(
    weights: &Weights,
    choice: DeviceChoice,
    precision: Precision,
) -> Result<OpenedBackend> {
    let cpu = || -> Result<Box<dyn Backend>> { Ok(Box::new(CpuModel::new(weights, precision)?)) };
    match choice {
        DeviceChoice::Cpu => Ok(OpenedBackend {
            backend: cpu()?,
            notice: None,
        }),
        DeviceChoice::Cuda => Err(Error::DeviceUnavailable(format!(
            "{NO_CUDA_BACKEND}; use --device cpu"
        ))),
        DeviceChoice::Auto => Ok(OpenedBackend {
            backend: cpu()?,
            notice: Some(format!("{NO_CUDA_BACKEND}; running on the CPU")),
        }),
    }
}
