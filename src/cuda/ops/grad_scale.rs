//! Mixed precision's gradient unscaling with the overflow check: launcher of
//! `kernels/grad_scale.cu`; CPU twin [`crate::train::unscale_gradients`].

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtrMut, LaunchConfig};

use super::shape_err;
use super::step_settings::{Scale, StepSettings};
use crate::cuda::abi::AlexnetGradUnscaleParams;
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::{grid_1d, Launch};
use crate::cuda::registry::Kernel;
use crate::error::{Error, Result};

/// The `grad_unscale` kernel's parameters and launch shape for `len` gradients under loss scale
/// `scale`: what [`unscale_gradients`] passes.
#[doc(hidden)]
pub fn grad_unscale_args(
    len: usize,
    scale: f32,
) -> Result<(AlexnetGradUnscaleParams, LaunchConfig)> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(
            "loss scale",
            format!("{scale} (must be finite and positive)"),
        ));
    }
    let params = AlexnetGradUnscaleParams {
        len: len as u64,
        inv_scale: 1.0 / scale,
    };
    Ok((params, grid_1d("grad_unscale", params.len)?))
}

/// `dst = src / scale` in f32 (the master gradients from the scaled gradients of a
/// mixed-precision backward), setting `found_nonfinite[0]` to 1 if any element of `dst` comes
/// out infinite or NaN (an infinite or NaN gradient, or one a scale below 1 takes past f32's
/// range; it is never cleared here: zero it once per step, check it after the last
/// launch). `src` and `dst` hold the same number of elements. The scale is given by value or
/// read on the device from [`super::StepSettings`].
pub fn unscale_gradients<'s, T: GpuFloat>(
    gpu: &Gpu,
    src: &CudaView<'_, T>,
    dst: &mut CudaViewMut<'_, f32>,
    found_nonfinite: &mut CudaSlice<u32>,
    scale: impl Into<Scale<'s>>,
) -> Result<()> {
    if src.len() != dst.len() || found_nonfinite.is_empty() {
        return Err(shape_err(
            "unscale_gradients",
            format!("{} gradients in and out, and one flag", src.len()),
            &[src.len(), dst.len(), found_nonfinite.len()],
        ));
    }
    let (scale, settings) = scale.into().split();
    let (params, cfg) = grad_unscale_args(src.len(), scale)?;
    // SAFETY: grad_unscale(const T *src, float *dst, unsigned int *found_nonfinite,
    // const AlexnetStepSettings *settings, AlexnetGradUnscaleParams): `src` and `dst` hold
    // `len` elements and the flag at least one (checked above); `dst` and the flag are borrowed
    // exclusively, so neither overlaps `src`; the settings, if any, are one
    // AlexnetStepSettings, only read (null otherwise).
    unsafe {
        Launch::new(gpu, Kernel::GradUnscale, T::DTYPE)?
            .buffer(src)
            .buffer(dst)
            .buffer(found_nonfinite)
            .optional_buffer(settings.map(StepSettings::buffer))
            .params(&params)
            .launch(cfg)
    }
}

/// [`unscale_gradients`] over f32 gradients in place (`grads / scale`, the same flag): the
/// biases' gradients of a mixed-precision backward, which `bias_grad` writes in f32 already.
pub fn unscale_gradients_in_place<'s>(
    gpu: &Gpu,
    grads: &mut CudaViewMut<'_, f32>,
    found_nonfinite: &mut CudaSlice<u32>,
    scale: impl Into<Scale<'s>>,
) -> Result<()> {
    if found_nonfinite.is_empty() {
        return Err(shape_err(
            "unscale_gradients_in_place",
            "one flag".to_string(),
            &[0],
        ));
    }
    let (scale, settings) = scale.into().split();
    let (params, cfg) = grad_unscale_args(grads.len(), scale)?;
    let stream = gpu.stream();
    let (ptr, _done) = grads.device_ptr_mut(stream);
    // SAFETY: grad_unscale_f32(const float *src, float *dst, unsigned int *found_nonfinite,
    // const AlexnetStepSettings *settings, AlexnetGradUnscaleParams) allows src == dst (each
    // element is read, then written, by one thread); both are `grads`, holding `len` floats;
    // the flag holds at least one value (checked above) and is borrowed exclusively, so it does
    // not overlap them; the settings, if any, are one AlexnetStepSettings, only read.
    unsafe {
        Launch::new(gpu, Kernel::GradUnscale, GpuDtype::F32)?
            .address::<f32>(&ptr)
            .address::<f32>(&ptr)
            .buffer(found_nonfinite)
            .optional_buffer(settings.map(StepSettings::buffer))
            .params(&params)
            .launch(cfg)
    }
}
