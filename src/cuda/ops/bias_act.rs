//! Bias + optional ReLU in place: launcher of `kernels/bias_act.cu`; CPU twin
//! [`crate::cpu::bias_act_inplace`].

use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::{
    AlexnetBiasActParams, AlexnetBiasGradParams, AlexnetReluBackwardParams,
    ALEXNET_BIAS_GRAD_BLOCK, ALEXNET_BIAS_GRAD_PER_THREAD,
};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use crate::cuda::launch::{element_count, grid_1d, grid_rows, to_u32, Launch};
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
    let [_, channels, inner] = channel_axis(OP, shape, layout)?;
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

/// `[outer, channels, inner]`: the channel axis of a tensor of `shape` in `layout` (C of a 4-D
/// tensor in either layout, the columns of a 2-D `[rows, cols]` one) and the element counts
/// outside and inside it in memory order.
fn channel_axis(op: &'static str, shape: &[usize], layout: Layout) -> Result<[usize; 3]> {
    Ok(match (shape, layout) {
        (&[n, c, h, w], Layout::Nchw) => [n, c, h * w],
        (&[n, c, h, w], Layout::Nhwc) => [n * h * w, c, 1],
        (&[rows, cols], Layout::Nchw) => [rows, cols, 1],
        (other, _) => return Err(shape_err(op, "[N, C, H, W] or [rows, cols]", other)),
    })
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
/// is not positive (as [`crate::cpu::relu_backward`]); both the same shape, f32 or f16.
pub fn relu_backward<T: GpuFloat>(
    gpu: &Gpu,
    output: &GpuTensor<T>,
    grad: &mut GpuTensor<T>,
) -> Result<()> {
    if grad.shape() != output.shape() || grad.layout() != output.layout() {
        return Err(shape_err(
            "relu_backward",
            format!("a gradient shaped like the output {:?}", output.shape()),
            grad.shape(),
        ));
    }
    let (params, cfg) = relu_backward_args(output.len())?;
    // SAFETY: relu_backward(const T *output, T *grad, AlexnetReluBackwardParams); both hold
    // `len` elements (same shape, checked above); `grad` is borrowed exclusively.
    unsafe {
        Launch::new(gpu, Kernel::ReluBackward, T::DTYPE)?
            .buffer(output.data())
            .buffer(grad.data_mut())
            .params(&params)
            .launch(cfg)
    }
}

/// The `bias_grad` kernel's parameters and launch shape for a gradient of `shape` in `layout`
/// (channel axis as for [`bias_act`]): what [`bias_grad`] passes. One block per channel, of
/// [`bias_grad_block`] threads.
#[doc(hidden)]
pub fn bias_grad_args(
    shape: &[usize],
    layout: Layout,
) -> Result<(AlexnetBiasGradParams, LaunchConfig)> {
    const OP: &str = "bias_grad";
    let [outer, channels, inner] = channel_axis(OP, shape, layout)?;
    element_count(shape)?; // the index arithmetic below cannot overflow
    let params = AlexnetBiasGradParams {
        outer: outer as u64,
        inner: inner as u64,
        channels: to_u32(OP, "channels", channels)?,
    };
    let mut cfg = grid_rows(OP, params.channels)?;
    cfg.block_dim = (bias_grad_block(outer.saturating_mul(inner)), 1, 1);
    Ok((params, cfg))
}

/// Threads per `bias_grad` block for a channel of `positions` values: a power of two from a warp
/// up to `ALEXNET_BIAS_GRAD_BLOCK`, the smallest that leaves no thread more than
/// `ALEXNET_BIAS_GRAD_PER_THREAD` positions where the block can be that large. A block runs one
/// channel, so a large channel (conv1's 128 x 55 x 55 at batch 128) wants every thread and every
/// load in flight the block can hold, and a small one (a linear layer's 128 rows) no more threads
/// than it has positions for, nor the deeper reduction tree they bring.
#[doc(hidden)]
pub fn bias_grad_block(positions: usize) -> u32 {
    const WARP: u32 = 32;
    let wanted = positions.div_ceil(ALEXNET_BIAS_GRAD_PER_THREAD as usize);
    let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
    wanted
        .checked_next_power_of_two()
        .unwrap_or(ALEXNET_BIAS_GRAD_BLOCK)
        .clamp(WARP, ALEXNET_BIAS_GRAD_BLOCK)
}

/// A bias's gradient for training: `out[c]` = the sum of `grad` over every position of channel
/// `c` (every image, every pixel; every row of a 2-D gradient), in f64, written as f32 (the
/// master gradient, also for f16 gradients). `out` holds one value per channel.
pub fn bias_grad<T: GpuFloat>(
    gpu: &Gpu,
    grad: &GpuTensor<T>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (params, cfg) = bias_grad_args(grad.shape(), grad.layout())?;
    if out.len() != params.channels as usize {
        return Err(shape_err(
            "bias_grad",
            format!("{} bias gradients", params.channels),
            &[out.len()],
        ));
    }
    // SAFETY: bias_grad(const T *grad, float *bias_grad, AlexnetBiasGradParams): `grad` holds
    // outer * channels * inner elements (its own shape) and `out` exactly `channels` (checked
    // above); `out` is borrowed exclusively, so it overlaps nothing the kernel reads.
    unsafe {
        Launch::new(gpu, Kernel::BiasGrad, T::DTYPE)?
            .buffer(grad.data())
            .buffer(out)
            .params(&params)
            .launch(cfg)
    }
}
