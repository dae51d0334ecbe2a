//! What a training step may change from one step to the next (learning rate, loss scale, the
//! first-step flag) kept in device memory, so that a step captured as a CUDA graph reads the
//! current values when it is replayed instead of the ones baked in at capture. The kernels that
//! take it: `convert_f32_to_f16` (the loss scale), `grad_unscale` (its inverse) and `sgd` (the
//! learning rate and the first-step flag); see `AlexnetStepSettings` in `kernels/alexnet_abi.h`.

use cudarc::driver::CudaSlice;

use crate::cuda::abi::AlexnetStepSettings;
use crate::cuda::device::{driver_err, Gpu};
use crate::error::{Error, Result};

/// The settings' values as the kernels read them: `inv_loss_scale` is `1 / loss_scale` rounded
/// to f32 here, exactly as the launchers compute it for a scale given by value. The learning
/// rate must be finite and not negative, the loss scale finite and positive.
#[doc(hidden)]
pub fn step_settings_args(
    learning_rate: f32,
    loss_scale: f32,
    first_step: bool,
) -> Result<AlexnetStepSettings> {
    if !(learning_rate.is_finite() && learning_rate >= 0.0) {
        return Err(Error::invalid(
            "learning rate",
            format!("{learning_rate} (must be finite and not negative)"),
        ));
    }
    if !(loss_scale.is_finite() && loss_scale > 0.0) {
        return Err(Error::invalid(
            "loss scale",
            format!("{loss_scale} (must be finite and positive)"),
        ));
    }
    Ok(AlexnetStepSettings {
        learning_rate,
        loss_scale,
        inv_loss_scale: 1.0 / loss_scale,
        first_step: u32::from(first_step),
    })
}

/// A training step's changing settings in device memory (see the module's doc). Written with
/// [`StepSettings::write`] on the compute stream before the step's kernels are queued; each
/// launch given it reads the values when it runs.
#[derive(Debug)]
pub struct StepSettings {
    buffer: CudaSlice<AlexnetStepSettings>,
}

impl StepSettings {
    /// Device memory for the settings, holding `learning_rate`, `loss_scale` and `first_step`.
    pub fn new(gpu: &Gpu, learning_rate: f32, loss_scale: f32, first_step: bool) -> Result<Self> {
        let values = step_settings_args(learning_rate, loss_scale, first_step)?;
        let buffer = gpu
            .stream()
            .clone_htod(&[values])
            .map_err(driver_err("upload the step settings"))?;
        Ok(StepSettings { buffer })
    }

    /// Queues new values on the compute stream: launches queued after this read them, and
    /// work queued before (a step still running) reads the old ones.
    pub fn write(
        &mut self,
        gpu: &Gpu,
        learning_rate: f32,
        loss_scale: f32,
        first_step: bool,
    ) -> Result<()> {
        let values = step_settings_args(learning_rate, loss_scale, first_step)?;
        // From pageable memory: the driver stages the 16 bytes before this returns.
        gpu.stream()
            .memcpy_htod(&[values], &mut self.buffer)
            .map_err(driver_err("upload the step settings"))
    }

    /// The device buffer, for a launch.
    pub(crate) fn buffer(&self) -> &CudaSlice<AlexnetStepSettings> {
        &self.buffer
    }
}

/// Where a launch takes its loss scale from.
#[derive(Clone, Copy, Debug)]
pub enum Scale<'a> {
    /// This value, passed in the kernel's parameters (and baked into a CUDA graph that captures
    /// the launch).
    Value(f32),
    /// The loss scale of these settings, read on the device when the kernel runs.
    OnDevice(&'a StepSettings),
}

impl From<f32> for Scale<'_> {
    fn from(value: f32) -> Self {
        Scale::Value(value)
    }
}

impl<'a> From<&'a StepSettings> for Scale<'a> {
    fn from(settings: &'a StepSettings) -> Self {
        Scale::OnDevice(settings)
    }
}

impl<'a> Scale<'a> {
    /// The value for the kernel's parameter struct (1 where the device's is read instead) and
    /// the settings to pass, if any.
    pub(crate) fn split(self) -> (f32, Option<&'a StepSettings>) {
        match self {
            Scale::Value(value) => (value, None),
            Scale::OnDevice(settings) => (1.0, Some(settings)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_a_kernel_cannot_use_are_refused() {
        assert!(step_settings_args(f32::NAN, 1.0, false).is_err());
        assert!(step_settings_args(-0.1, 1.0, false).is_err());
        assert!(step_settings_args(0.1, 0.0, false).is_err());
        assert!(step_settings_args(0.1, f32::INFINITY, false).is_err());
        assert!(step_settings_args(0.0, 1.0, false).is_ok());
    }
}
