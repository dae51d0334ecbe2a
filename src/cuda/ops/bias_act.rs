//! Bias + optional ReLU in place: launcher of `kernels/bias_act.cu`; CPU twin
//! [`crate::cpu::bias_act_inplace`].

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::{AlexnetBiasActParams, AlexnetReluBackwardParams};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::{element_count, grid_1d, to_u32, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::Result;

/// The kernel's parameters and launch shape for a tensor of `shape` in `layout` and a bias of
/// `bias_len`: what [`bias_act`] passes.
#[doc(hidden)]
pub fn bias_act_args(
    shape: &[usize],
    layout: Layout,
    bias_len: usize,
    relu: bool,
) -> Result<(AlexnetBiasActParams, LaunchConfig)> {
    const OP: &str = "bias_act";
    let (channels, inner) = match (shape, layout) {
        (&[_, c, h, w], Layout::Nchw) => (c, h * w),
        (&[_, c, _, _], Layout::Nhwc) => (c, 1),
        (&[_, cols], Layout::Nchw) => (cols, 1),
        (other, _) => return Err(shape_err(OP, "[N, C, H, W] or [rows, cols]", other)),
    };
    if bias_len != channels {
        return Err(shape_err(OP, format!("a bias of {channels}"), &[bias_len]));
    }
    let params = AlexnetBiasActParams {
        len: element_count(shape)?,
        channels: to_u32(OP, "channels", channels)?,
        inner: to_u32(OP, "inner", inner)?,
        relu: u32::from(relu),
    };
    Ok((params, grid_1d(OP, params.len)?))
}

/// `x += bias[channel]`, then ReLU if `relu`, in place, with the `bias_act` kernel. The channel
/// axis is C of a 4-D tensor (either layout) or the columns of a 2-D `[rows, cols]` tensor.
pub fn bias_act<T: GpuFloat>(
    gpu: &Gpu,
    x: &mut GpuTensor<T>,
    bias: &CudaSlice<T>,
    relu: bool,
) -> Result<()> {
    let (params, cfg) = bias_act_args(x.shape(), x.layout(), bias.len(), relu)?;
    // SAFETY: bias_act(T *x, const T *bias, AlexnetBiasActParams): `x` holds `len` elements and
    // `bias` holds `channels` (checked above); `x` is written in place, `bias` only read, and
    // they are distinct buffers (one borrowed shared, the other exclusively).
    unsafe {
        Launch::new(gpu, Kernel::BiasAct, T::DTYPE)?
            .buffer(x.data_mut())
            .buffer(bias)
            .params(&params)
            .launch(cfg)
    }
}

/// The `relu_backward` kernel's parameters and launch shape for `len` elements: what
/// [`relu_backward`] passes.
#[doc(hidden)]
pub fn relu_backward_args(len: usize) -> Result<(AlexnetReluBackwardParams, LaunchConfig)> {
    let params = AlexnetReluBackwardParams { len: len as u64 };
    Ok((params, grid_1d("relu_backward", params.len)?))
}

/// The ReLU's backward for training, in place: `grad` is zeroed wherever the ReLU's `output`
/// is not positive (as [`crate::cpu::relu_backward`]); both the same shape.
pub fn relu_backward(gpu: &Gpu, output: &GpuTensor<f32>, grad: &mut GpuTensor<f32>) -> Result<()> {
    if grad.shape() != output.shape() || grad.layout() != output.layout() {
        return Err(shape_err(
            "relu_backward",
            format!("a gradient shaped like the output {:?}", output.shape()),
            grad.shape(),
        ));
    }
    let (params, cfg) = relu_backward_args(output.len())?;
    // SAFETY: relu_backward_f32(const float *output, float *grad, AlexnetReluBackwardParams);
    // both hold `len` elements (same shape, checked above); `grad` is borrowed exclusively.
    unsafe {
        Launch::new(gpu, Kernel::ReluBackward, GpuDtype::F32)?
            .buffer(output.data())
            .buffer(grad.data_mut())
            .params(&params)
            .launch(cfg)
    }
}
