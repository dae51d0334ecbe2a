//! Softmax cross-entropy and its gradient for training: launcher of `kernels/loss.cu`; CPU
//! twin [`crate::cpu::softmax_cross_entropy`].

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::AlexnetSoftmaxXentParams;
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuDtype;
use crate::cuda::launch::{grid_rows, to_u32, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::GpuTensor;
use crate::error::Result;

/// The `softmax_xent` kernel's parameters and launch shape (one block per row) for `rows` rows
/// of `classes` logits: what [`softmax_cross_entropy`] passes.
#[doc(hidden)]
pub fn softmax_xent_args(
    rows: usize,
    classes: usize,
) -> Result<(AlexnetSoftmaxXentParams, LaunchConfig)> {
    const OP: &str = "softmax_cross_entropy";
    if classes == 0 {
        return Err(shape_err(OP, "at least one class", &[rows, classes]));
    }
    let params = AlexnetSoftmaxXentParams {
        rows: to_u32(OP, "rows", rows)?,
        classes: to_u32(OP, "classes", classes)?,
    };
    Ok((params, grid_rows(OP, params.rows)?))
}

/// Softmax cross-entropy of `logits` `[rows, classes]` against `labels` (one per row, on the
/// device): each row's loss into `row_loss` (f64; the batch loss is their mean) and the
/// gradient of the batch mean into `grad` (shaped like the logits), in f64 as
/// [`crate::cpu::softmax_cross_entropy`]. The labels must be below `classes` (check them before
/// they are uploaded): a row with another label gets a NaN loss and gradient.
pub fn softmax_cross_entropy(
    gpu: &Gpu,
    logits: &GpuTensor<f32>,
    labels: &CudaSlice<u32>,
    grad: &mut GpuTensor<f32>,
    row_loss: &mut CudaSlice<f64>,
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy";
    let &[rows, classes] = logits.shape() else {
        return Err(shape_err(OP, "logits [rows, classes]", logits.shape()));
    };
    if grad.shape() != logits.shape() {
        return Err(shape_err(
            OP,
            format!("a gradient of {:?}", logits.shape()),
            grad.shape(),
        ));
    }
    if labels.len() < rows || row_loss.len() < rows {
        return Err(shape_err(
            OP,
            format!("{rows} labels and {rows} loss slots"),
            &[labels.len(), row_loss.len()],
        ));
    }
    let (params, cfg) = softmax_xent_args(rows, classes)?;
    // SAFETY: softmax_xent_f32(const float *logits, const unsigned int *labels, float *grad,
    // double *row_loss, AlexnetSoftmaxXentParams); `logits` and `grad` hold rows*classes
    // elements, `labels` and `row_loss` at least `rows` (checked above); the outputs are
    // borrowed exclusively; one block of ALEXNET_SOFTMAX_BLOCK (a power of two) per row.
    unsafe {
        Launch::new(gpu, Kernel::SoftmaxXent, GpuDtype::F32)?
            .buffer(logits.data())
            .buffer(labels)
            .buffer(grad.data_mut())
            .buffer(row_loss)
            .params(&params)
            .launch(cfg)
    }
}
