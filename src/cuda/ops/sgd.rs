//! The SGD step over every parameter in one launch: launcher of `kernels/sgd.cu`; CPU twin
//! [`crate::train::Sgd::step`].

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig};

use super::shape_err;
use super::step_settings::StepSettings;
use crate::cuda::abi::{
    AlexnetSgdParams, ALEXNET_SGD_COPY_BF16, ALEXNET_SGD_COPY_F16, ALEXNET_SGD_PAPER,
    ALEXNET_SGD_PYTORCH, ALEXNET_SGD_SEGMENTS,
};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::{grid_1d, Launch};
use crate::cuda::registry::Kernel;
use crate::error::{Error, Result};
use crate::train::{SgdConfig, UpdateRule};

/// One stretch of the flat gradients and velocities [`sgd_step`] walks: a parameter tensor
/// (its length and whether weight decay applies to it), or padding, a gap the step leaves
/// alone (it keeps the next tensor's gradient aligned for the libraries that write it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgdSegment {
    pub len: usize,
    pub decayed: bool,
    /// A gap: no weight tensor, nothing read or written.
    pub padding: bool,
}

impl SgdSegment {
    /// The segment of the parameter `name` of `len` values under `config`: biases are decayed
    /// only with `decay_biases`, as [`crate::train::Sgd`] does.
    pub fn named(name: &str, len: usize, config: &SgdConfig) -> Self {
        SgdSegment {
            len,
            decayed: config.decay_biases || !name.ends_with(".bias"),
            padding: false,
        }
    }

    /// A gap of `len` values between two tensors.
    pub fn padding(len: usize) -> Self {
        SgdSegment {
            len,
            decayed: false,
            padding: true,
        }
    }
}

/// The `sgd` kernel's parameters and launch shape for `segments` laid end to end: what
/// [`sgd_step`] passes, once it has filled in the weights' and copies' addresses (left 0 here,
/// and for good in the padding segments).
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
                "{} segments, parameter tensors and padding (one launch takes 1 to \
                 {ALEXNET_SGD_SEGMENTS})",
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

/// What one [`sgd_step`] reads and writes; `C` is the copies' type (f16 or bf16; any type
/// where there are none).
pub struct SgdBuffers<'s, 'b, C: GpuFloat> {
    /// The f32 weights of the segments, one tensor per segment that is not padding, in order,
    /// each where its layer keeps it (the master weights under mixed precision).
    pub weights: &'s mut [&'b mut CudaSlice<f32>],
    /// Under mixed precision, each weight tensor's f16 or bf16 copy (what the layer computes
    /// with), rewritten with the new weights rounded to that type; empty otherwise.
    pub copies: &'s mut [&'b mut CudaSlice<C>],
    /// The gradients, laid end to end in segment order (padding included: never read there).
    pub grads: &'s CudaSlice<f32>,
    /// The momentum, laid out as the gradients (never written in the padding).
    pub velocity: &'s mut CudaSlice<f32>,
    /// The overflow flag of the gradients' unscaling: when set on the device, the step changes
    /// nothing (mixed precision's skipped step). `None`: always applied.
    pub skip: Option<&'s CudaSlice<u32>>,
    /// Where the learning rate and the first-step flag are read on the device when the kernel
    /// runs, in place of the config's learning rate and the `first_step` argument (a captured
    /// training step follows them). `None`: those two are used.
    pub settings: Option<&'s StepSettings>,
}

/// The kernel's `copy_format` for copies of type `dtype`; f32 copies exist in no mode, so
/// asking for them is an error (an empty list of any type asks for none).
fn copy_format(dtype: GpuDtype) -> Result<u32> {
    match dtype {
        GpuDtype::F16 => Ok(ALEXNET_SGD_COPY_F16),
        GpuDtype::Bf16 => Ok(ALEXNET_SGD_COPY_BF16),
        GpuDtype::F32 => Err(Error::invalid(
            "sgd_step",
            "f32 copies of f32 weights (copies are f16 or bf16)",
        )),
    }
}

/// One SGD step with momentum, as [`crate::train::Sgd::step`] under `config`, in one launch
/// over every tensor of `segments`, in `buffers`. `first_step` says the velocity holds nothing
/// yet (it is written, not read).
pub fn sgd_step<C: GpuFloat>(
    gpu: &Gpu,
    config: &SgdConfig,
    segments: &[SgdSegment],
    first_step: bool,
    buffers: SgdBuffers<'_, '_, C>,
) -> Result<()> {
    let SgdBuffers {
        weights,
        copies,
        grads,
        velocity,
        skip,
        settings,
    } = buffers;
    let (mut params, cfg) = sgd_args(config, segments, first_step)?;
    if !copies.is_empty() {
        params.copy_format = copy_format(C::DTYPE)?;
    }
    let len = params.len as usize;
    // (segment index, length) of each tensor: the segments that are not padding.
    let tensors: Vec<(usize, usize)> = segments
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.padding)
        .map(|(index, s)| (index, s.len))
        .collect();
    let lens_match =
        |lens: &mut dyn Iterator<Item = usize>| lens.eq(tensors.iter().map(|&(_, len)| len));
    let weights_match = lens_match(&mut weights.iter().map(|w| w.len()));
    let copies_match = copies.is_empty() || lens_match(&mut copies.iter().map(|c| c.len()));
    let skip_ok = skip.is_none_or(|flag| !flag.is_empty());
    if !weights_match || !copies_match || !skip_ok || grads.len() != len || velocity.len() != len {
        let mut found: Vec<usize> = weights.iter().map(|w| w.len()).collect();
        found.extend(copies.iter().map(|c| c.len()));
        found.extend([grads.len(), velocity.len()]);
        return Err(shape_err(
            "sgd_step",
            format!(
                "one weight tensor (and none or one f16/bf16 copy) per tensor segment {:?}, \
                 then {len} gradients and velocities, and a flag if any",
                tensors.iter().map(|&(_, len)| len).collect::<Vec<_>>()
            ),
            &found,
        ));
    }
    let stream = gpu.stream();
    // The guards record the tensors' use on the stream when they drop, after the launch.
    // Padding segments keep address 0, which is what marks them.
    let mut weight_guards = Vec::with_capacity(weights.len());
    for (&(index, _), w) in tensors.iter().zip(weights.iter_mut()) {
        let (ptr, guard) = w.device_ptr_mut(stream);
        params.weights[index] = ptr;
        weight_guards.push(guard);
    }
    let mut copy_guards = Vec::with_capacity(copies.len());
    for (&(index, _), c) in tensors.iter().zip(copies.iter_mut()) {
        let (ptr, guard) = c.device_ptr_mut(stream);
        params.copies[index] = ptr;
        copy_guards.push(guard);
    }
    // SAFETY: sgd_f32(const float *grads, float *velocity, const unsigned int *skip,
    // const AlexnetStepSettings *settings, AlexnetSgdParams); `grads` and `velocity` hold
    // exactly `len` = ends[segments - 1] elements, the weight tensor of each segment s that
    // is not padding (and its copy, if any, of the type `copy_format` names, set from C
    // above) exactly segment s's length, at the addresses in params.weights[s] /
    // params.copies[s] (0: no copy; a padding segment has neither and is not touched), made
    // ready on this stream; the flag, if passed, holds at least one value
    // (all checked above); the settings, if passed, are one AlexnetStepSettings, only read;
    // every buffer is borrowed separately (weights, copies and `velocity` exclusively), so
    // none overlaps another.
    let launched = unsafe {
        Launch::new(gpu, Kernel::Sgd, GpuDtype::F32)?
            .buffer(grads)
            .buffer(velocity)
            .optional_buffer(skip)
            .optional_buffer(settings.map(StepSettings::buffer))
            .params(&params)
            .launch(cfg)
    };
    drop(weight_guards);
    drop(copy_guards);
    launched
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies are f16 or bf16, each its own ABI code; f32 copies are refused, not written as
    /// one of them.
    #[test]
    fn each_copy_type_has_its_own_format_and_f32_has_none() {
        assert_eq!(copy_format(GpuDtype::F16).unwrap(), ALEXNET_SGD_COPY_F16);
        assert_eq!(copy_format(GpuDtype::Bf16).unwrap(), ALEXNET_SGD_COPY_BF16);
        assert_ne!(ALEXNET_SGD_COPY_F16, ALEXNET_SGD_COPY_BF16);
        assert!(copy_format(GpuDtype::F32).is_err());
    }
}
