//! The layers on the GPU, one file per operation, each usable on its own and generic over `f32`,
//! `f16` and `bf16` storage. Every operation has a CPU twin it is tested against and, unless a library
//! runs it, a kernel of the same name:
//!
//! | operation | CPU twin                                   | launcher (here)  | kernel / library       |
//! |-----------|--------------------------------------------|------------------|------------------------|
//! | conv      | `src/cpu/conv.rs`                          | `conv.rs`        | cuDNN (`../cudnn.rs`)  |
//! | linear    | `src/cpu/linear.rs`                        | `linear.rs`      | cuBLAS                 |
//! | bias_act  | `src/cpu/bias_act.rs`                      | `bias_act.rs`    | `kernels/bias_act.cu`  |
//! | lrn       | `src/cpu/lrn.rs`                           | `lrn.rs`         | `kernels/lrn.cu`       |
//! | pool      | `src/cpu/pool.rs`                          | `pool.rs`        | `kernels/pool.cu`      |
//! | conv_epilogue | bias_act + lrn + pool above, combined  | `conv_epilogue.rs` | `kernels/conv_epilogue.cu` |
//! | dropout   | `src/cpu/dropout.rs`                       | `dropout.rs`     | `kernels/dropout.cu`   |
//! | softmax   | `src/postprocess.rs` (softmax, top-k)      | `softmax.rs`     | `kernels/softmax.cu`   |
//! | prepare   | `src/image/batch.rs` (`U8Batch::to_nchw_f32`); `tensor::to_physical` (relayout) | `prepare.rs`  | `kernels/prepare.cu`   |
//! | convert   | `half::{f16,bf16}::{to_f32,from_f32}`      | `convert.rs`     | `kernels/convert.cu`   |
//! | loss      | `src/cpu/loss.rs` (training)               | `loss.rs`        | `kernels/loss.cu`      |
//! | sgd       | `src/train/sgd.rs` (training)              | `sgd.rs`         | `kernels/sgd.cu`       |
//! | grad_scale | `src/train/loss_scale.rs` (training)      | `grad_scale.rs`  | `kernels/grad_scale.cu` |
//!
//! `step_settings.rs` holds what a training step may change between steps (learning rate, loss
//! scale) in device memory, for the convert, grad_scale and sgd kernels to read when they run.
//!
//! The training backward of every layer sits beside its forward (`backward` methods,
//! `relu_backward`, `bias_grad`), with its kernel in the same `.cu` file; the convolution's in
//! `conv/backward.rs` (cuDNN). The pool, LRN and ReLU backward and the bias gradient have f32,
//! f16 and bf16 kernels, like the forwards (the f16 and bf16 ones run mixed precision's
//! backward); the loss (`softmax_xent`) and the SGD step (`sgd`) are f32 only, on mixed
//! precision's f32 logits and master weights.
//!
//! Every launcher checks shapes, layouts and buffer lengths before it launches; a mismatch is an
//! [`Error::Shape`], never an out-of-bounds access. Kernels launch through
//! [`super::launch::Launch`], which checks the arguments against `src/cuda/registry.rs`.

mod bias_act;
mod calls;
mod conv;
mod conv_epilogue;
mod convert;
mod dropout;
mod grad_scale;
mod linear;
mod loss;
mod lrn;
mod pool;
mod prepare;
mod sgd;
mod softmax;
mod step_settings;

pub use bias_act::{
    bias_act, bias_act_args, bias_grad, bias_grad_args, bias_grad_columns_args, relu_backward,
    relu_backward_args,
};
pub use calls::{
    chw_columns_to_hwc, pack_conv_weights, unpack_conv_weights, ConvCall, GemmCall, LinearBuffer,
};
pub use conv::{Conv2dGpu, ConvChoice, ConvOptions, ConvPlanInfo};
pub use conv_epilogue::ConvEpilogueGpu;
pub use convert::{
    convert_args, convert_bf16_to_f32, convert_f16_to_f32, convert_f32_to_bf16, convert_f32_to_f16,
};
pub use dropout::DropoutGpu;
pub use grad_scale::{grad_unscale_args, unscale_gradients, unscale_gradients_in_place};
pub use linear::LinearGpu;
pub use loss::{softmax_cross_entropy, softmax_xent_args};
pub use lrn::LrnGpu;
pub use pool::MaxPoolGpu;
pub use prepare::{relayout_args, relayout_f32_input, PrepareInput};
pub use sgd::{sgd_args, sgd_step, SgdBuffers, SgdSegment};
pub use softmax::{softmax_top_k, softmax_top_k_args, TopK};
pub use step_settings::{step_settings_args, Scale, StepSettings};

use cudarc::driver::CudaSlice;

use super::device::Gpu;
use super::dtype::GpuFloat;
use super::tensor::Layout;
use crate::error::{Error, Result};

fn shape_err(op: &'static str, expected: impl Into<String>, found: &[usize]) -> Error {
    Error::Shape {
        op,
        expected: expected.into(),
        found: found.to_vec(),
    }
}

fn layout_err(op: &'static str, expected: Layout, found: Layout) -> Error {
    Error::invalid(
        "tensor layout",
        format!("{op}: expected {expected:?}, found {found:?}"),
    )
}

/// One of a launch's tensors, `(shape, layout)`, against the shape and layout the others imply.
fn expect_like(
    op: &'static str,
    shape: &[usize],
    layout: Layout,
    (found_shape, found_layout): (&[usize], Layout),
) -> Result<()> {
    if found_shape != shape {
        return Err(shape_err(op, format!("{shape:?}"), found_shape));
    }
    if found_layout != layout {
        return Err(layout_err(op, layout, found_layout));
    }
    Ok(())
}

/// Copies a layer's new parameters into its device buffer, in the compute stream's order (after
/// every forward queued before, which read the old ones), at the same address, so a captured
/// CUDA graph reads the new values.
fn upload_into<T: GpuFloat>(
    gpu: &Gpu,
    values: &[T],
    buffer: &mut CudaSlice<T>,
    what: &str,
) -> Result<()> {
    if values.len() != buffer.len() {
        return Err(Error::invalid(
            "parameters",
            format!("{} {what} for a buffer of {}", values.len(), buffer.len()),
        ));
    }
    gpu.stream()
        .memcpy_htod(values, buffer)
        .map_err(|e| Error::cuda(format!("uploading {what}"), e))
}

/// Copies a layer's parameters to a new device buffer.
fn upload<T: GpuFloat>(gpu: &Gpu, values: &[T], what: &str) -> Result<CudaSlice<T>> {
    if values.is_empty() {
        return Err(Error::invalid("upload", format!("{what} is empty")));
    }
    gpu.stream()
        .clone_htod(values)
        .map_err(|e| Error::cuda(format!("uploading {what}"), e))
}
