//! Between f16 or bf16 and f32 storage with a scale: launcher of `kernels/convert.cu`; CPU
//! twins `half::f16::to_f32`, `half::bf16::to_f32` and `half::f16::from_f32` of the f32 product.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig};
use half::{bf16, f16};

use super::shape_err;
use super::step_settings::{Scale, StepSettings};
use crate::cuda::abi::AlexnetConvertParams;
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::{grid_1d, KernelElem, Launch};
use crate::cuda::registry::Kernel;
use crate::error::{Error, Result};

/// The kernels' parameters and launch shape for `len` values times `scale` (finite): what
/// [`convert_f16_to_f32`] (scale 1) and [`convert_f32_to_f16`] pass.
#[doc(hidden)]
pub fn convert_args(len: usize, scale: f32) -> Result<(AlexnetConvertParams, LaunchConfig)> {
    if !scale.is_finite() {
        return Err(Error::invalid(
            "conversion scale",
            format!("{scale} (must be finite)"),
        ));
    }
    let params = AlexnetConvertParams {
        len: len as u64,
        scale,
    };
    Ok((params, grid_1d("convert", params.len)?))
}

/// `src` (f16) to f32 in `dst` (exact) with the `convert_f16_to_f32` kernel; `dst` must hold
/// at least `src.len()` values.
pub fn convert_f16_to_f32(
    gpu: &Gpu,
    src: &CudaView<'_, f16>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    widen(gpu, "convert_f16_to_f32", Kernel::ConvertF16To, src, dst)
}

/// `src` (bf16) to f32 in `dst` (exact) with the `convert_bf16_to_f32` kernel; `dst` must hold
/// at least `src.len()` values.
pub fn convert_bf16_to_f32(
    gpu: &Gpu,
    src: &CudaView<'_, bf16>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    widen(gpu, "convert_bf16_to_f32", Kernel::ConvertBf16To, src, dst)
}

/// `src` widened to f32 in `dst` by `kernel`, the `convert_<half>_to_f32` entry of `src`'s type.
fn widen<T: KernelElem + DeviceRepr>(
    gpu: &Gpu,
    op: &'static str,
    kernel: Kernel,
    src: &CudaView<'_, T>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    if dst.len() < src.len() {
        return Err(shape_err(
            op,
            format!("at least {} outputs", src.len()),
            &[dst.len()],
        ));
    }
    let (params, cfg) = convert_args(src.len(), 1.0)?;
    // SAFETY: convert_{f16,bf16}_to_f32(const <half> *src, float *dst, AlexnetConvertParams),
    // the source type checked against `kernel`'s entry by `Launch`; `src` holds `len` values
    // and `dst` at least `len` floats (checked above); `dst` is borrowed exclusively, so it does
    // not overlap `src`.
    unsafe {
        Launch::new(gpu, kernel, GpuDtype::F32)?
            .buffer(src)
            .buffer(dst)
            .params(&params)
            .launch(cfg)
    }
}

/// `src * scale` (f32) rounded to f16 in `dst`, which holds as many values, with the
/// `convert_f32_to_f16` kernel: a training batch into f16 storage (scale 1), the loss gradient
/// into the scaled f16 gradient of mixed precision (the loss scale, given by value or read on
/// the device from [`super::StepSettings`]).
pub fn convert_f32_to_f16<'s>(
    gpu: &Gpu,
    src: &CudaView<'_, f32>,
    dst: &mut CudaViewMut<'_, f16>,
    scale: impl Into<Scale<'s>>,
) -> Result<()> {
    narrow(gpu, "convert_f32_to_f16", src, dst, scale.into())
}

/// As [`convert_f32_to_f16`], rounding to bf16 (nearest even) with `convert_f32_to_bf16`.
pub fn convert_f32_to_bf16<'s>(
    gpu: &Gpu,
    src: &CudaView<'_, f32>,
    dst: &mut CudaViewMut<'_, bf16>,
    scale: impl Into<Scale<'s>>,
) -> Result<()> {
    narrow(gpu, "convert_f32_to_bf16", src, dst, scale.into())
}

/// `src * scale` rounded into `dst` of the same length by `convert_f32_to_<T>`.
fn narrow<T: GpuFloat>(
    gpu: &Gpu,
    op: &'static str,
    src: &CudaView<'_, f32>,
    dst: &mut CudaViewMut<'_, T>,
    scale: Scale<'_>,
) -> Result<()> {
    if dst.len() != src.len() {
        return Err(shape_err(
            op,
            format!("{} outputs, one per input", src.len()),
            &[dst.len()],
        ));
    }
    let (scale, settings) = scale.split();
    let (params, cfg) = convert_args(src.len(), scale)?;
    // SAFETY: convert_f32_to_{f16,bf16}(const float *src, <half> *dst,
    // const AlexnetStepSettings *settings, AlexnetConvertParams), the entry of `T`'s type
    // (checked by `Launch`); both hold `len` values (checked above); `dst` is borrowed
    // exclusively, so it does not overlap `src`; the settings, if any, are one
    // AlexnetStepSettings (null otherwise).
    unsafe {
        Launch::new(gpu, Kernel::ConvertF32To, T::DTYPE)?
            .buffer(src)
            .buffer(dst)
            .optional_buffer(settings.map(StepSettings::buffer))
            .params(&params)
            .launch(cfg)
    }
}
