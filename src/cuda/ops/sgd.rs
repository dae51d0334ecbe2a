//! The SGD step over every parameter in one launch: launcher of `kernels/sgd.cu`; CPU twin
//! [`crate::train::Sgd::step`].

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig};

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

/// One parameter tensor [`sgd_step`] updates: its length and whether weight decay applies to
/// it.
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
/// [`sgd_step`] passes, once it has filled in the weights' addresses (left 0 here).
/// `first_step`: the velocity is taken as 0 without being read.
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

/// One SGD step with momentum, as [`crate::train::Sgd::step`] under `config`, in one launch:
/// `weights` are the parameter tensors of `segments` (each where its layer keeps it, one per
/// segment, in order), `grads` and `velocity` their gradients and momentum laid end to end in
/// the same order. `first_step` says the velocity holds nothing yet (it is written, not read).
pub fn sgd_step(
    gpu: &Gpu,
    config: &SgdConfig,
    segments: &[SgdSegment],
    first_step: bool,
    weights: &mut [&mut CudaSlice<f32>],
    grads: &CudaSlice<f32>,
    velocity: &mut CudaSlice<f32>,
) -> Result<()> {
    let (mut params, cfg) = sgd_args(config, segments, first_step)?;
    let len = params.len as usize;
    let lens_match = weights.len() == segments.len()
        && weights.iter().zip(segments).all(|(w, s)| w.len() == s.len);
    if !lens_match || grads.len() != len || velocity.len() != len {
        let mut found: Vec<usize> = weights.iter().map(|w| w.len()).collect();
        found.extend([grads.len(), velocity.len()]);
        return Err(shape_err(
            "sgd_step",
            format!(
                "one weight tensor per segment {:?}, then {len} gradients and velocities",
                segments.iter().map(|s| s.len).collect::<Vec<_>>()
            ),
            &found,
        ));
    }
    let stream = gpu.stream();
    // The guards record the weights' use on the stream when they drop, after the launch.
    let mut guards = Vec::with_capacity(weights.len());
    for (address, w) in params.weights.iter_mut().zip(weights.iter_mut()) {
        let (ptr, guard) = w.device_ptr_mut(stream);
        *address = ptr;
        guards.push(guard);
    }
    // SAFETY: sgd_f32(const float *grads, float *velocity, AlexnetSgdParams); `grads` and
    // `velocity` hold exactly `len` = ends[segments - 1] elements and weight tensor s exactly
    // segment s's length (checked above), at the address in params.weights[s], made ready on
    // this stream; every buffer is borrowed separately (the weights and `velocity`
    // exclusively), so none overlaps another.
    let launched = unsafe {
        Launch::new(gpu, Kernel::Sgd, GpuDtype::F32)?
            .buffer(grads)
            .buffer(velocity)
            .params(&params)
            .launch(cfg)
    };
    drop(guards);
    launched
}
