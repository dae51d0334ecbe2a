//! Widening f16 to f32: launcher of `kernels/convert.cu`; CPU twin `half::f16::to_f32`.

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::AlexnetConvertParams;
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuDtype;
use crate::cuda::launch::{grid_1d, Launch};
use crate::cuda::registry::Kernel;
use crate::error::Result;

/// The kernel's parameters and launch shape for `len` values: what [`convert_f16_to_f32`]
/// passes.
#[doc(hidden)]
pub fn convert_args(len: usize) -> Result<(AlexnetConvertParams, LaunchConfig)> {
    let params = AlexnetConvertParams { len: len as u64 };
    Ok((params, grid_1d("convert_f16_to_f32", params.len)?))
}

/// `src` (f16) to f32 in `dst` (exact) with the `convert_f16_to_f32` kernel; `dst` must hold
/// at least `src.len()` values.
pub fn convert_f16_to_f32(
    gpu: &Gpu,
    src: &CudaView<'_, half::f16>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "convert_f16_to_f32";
    if dst.len() < src.len() {
        return Err(shape_err(
            OP,
            format!("at least {} outputs", src.len()),
            &[dst.len()],
        ));
    }
    let (params, cfg) = convert_args(src.len())?;
    // SAFETY: convert_f16_to_f32(const unsigned short *src, float *dst, AlexnetConvertParams);
    // `src` holds `len` f16 values and `dst` at least `len` floats (checked above).
    unsafe {
        Launch::new(gpu, Kernel::ConvertF16To, GpuDtype::F32)?
            .buffer(src)
            .buffer(dst)
            .params(&params)
            .launch(cfg)
    }
}
