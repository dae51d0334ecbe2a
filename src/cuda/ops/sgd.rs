//! The SGD step over every parameter in one launch: launcher of `kernels/sgd.cu`; CPU twin
//! [`crate::train::Sgd::step`].

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::{
    AlexnetSgdParams, ALEXNET_SGD_PAPER, ALEXNET_SGD_PYTORCH, ALEXNET_SGD_SEGMENTS,
};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuDtype;
use crate::cuda::launch::{grid_1d, Launch};
use crate::cuda::registry::Kernel;
use crate::error::{Error, Result};
use crate::train::{SgdConfig, UpdateRule};

/// One parameter tensor of the flat buffers [`sgd_step`] updates: its length and whether
/// weight decay applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgdSegment {
    pub len: usize,
    pub decayed: bool,
}

impl SgdSegment {
    /// The segment of the parameter `name` of `len` values under `config`: biases are decayed
    /// only with `decay_biases`, as [`crate::train::Sgd`] does.
    pub fn named(name: &str, len: usize, config: &SgdConfig) -> Self {
        SgdSegment {
            len,
            decayed: config.decay_biases || !name.ends_with(".bias"),
        }
    }
}

/// The `sgd` kernel's parameters and launch shape for `segments` laid end to end: what
/// [`sgd_step`] passes. `first_step`: the velocity is taken as 0 without being read.
#[doc(hidden)]
pub fn sgd_args(
    config: &SgdConfig,
    segments: &[SgdSegment],
    first_step: bool,
) -> Result<(AlexnetSgdParams, LaunchConfig)> {
    if segments.is_empty() || segments.len() > ALEXNET_SGD_SEGMENTS as usize {
        return Err(Error::invalid(
            "SGD step",
            format!(
                "{} parameter tensors (one launch takes 1 to {ALEXNET_SGD_SEGMENTS})",
                segments.len()
            ),
        ));
    }
    let mut params = AlexnetSgdParams {
        segments: segments.len() as u32,
        rule: match config.rule {
            UpdateRule::PyTorch => ALEXNET_SGD_PYTORCH,
            UpdateRule::Paper => ALEXNET_SGD_PAPER,
        },
        first_step: u32::from(first_step),
        learning_rate: config.learning_rate,
        momentum: config.momentum,
        weight_decay: config.weight_decay,
        ..Default::default()
    };
    let mut end = 0u64;
    for (i, segment) in segments.iter().enumerate() {
        end = end
            .checked_add(segment.len as u64)
            .ok_or_else(|| Error::invalid("SGD step", "the parameter count overflows"))?;
        params.ends[i] = end;
        params.decay[i] = u32::from(segment.decayed);
    }
    params.len = end;
    Ok((params, grid_1d("sgd_step", end)?))
}

/// One SGD step with momentum over the parameters `weights` (the tensors of `segments` laid
/// end to end), their gradients `grads` and momentum `velocity` (the same layout), as
/// [`crate::train::Sgd::step`] under `config`. `first_step` says the velocity holds nothing
/// yet (it is written, not read).
pub fn sgd_step(
    gpu: &Gpu,
    config: &SgdConfig,
    segments: &[SgdSegment],
    first_step: bool,
    weights: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    velocity: &mut CudaSlice<f32>,
) -> Result<()> {
    let (params, cfg) = sgd_args(config, segments, first_step)?;
    let len = params.len as usize;
    if weights.len() != len || grads.len() != len || velocity.len() != len {
        return Err(shape_err(
            "sgd_step",
            format!("{len} weights, gradients and velocities"),
            &[weights.len(), grads.len(), velocity.len()],
        ));
    }
    // SAFETY: sgd_f32(float *weights, const float *grads, float *velocity, AlexnetSgdParams);
    // all three hold exactly `len` = ends[segments - 1] elements (checked above); `weights`
    // and `velocity` are borrowed exclusively, so no buffer overlaps another.
    unsafe {
        Launch::new(gpu, Kernel::Sgd, GpuDtype::F32)?
            .buffer(weights)
            .buffer(grads)
            .buffer(velocity)
            .params(&params)
            .launch(cfg)
    }
}
