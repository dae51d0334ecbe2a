//! Bias + ReLU: the CPU twin of the GPU's `bias_act` kernel (`kernels/bias_act.cu`,
//! `src/cuda/ops/bias_act.rs`). The CPU convolution and linear layers fuse both into their own
//! output pass; [`bias_act_inplace`] is the stand-alone form the kernel is checked against.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, Zip};

use crate::error::{Error, Result};

/// `max(x, 0)` for one value; NaN stays NaN (as in PyTorch), where `f32::max` would hide it.
#[inline]
pub(crate) fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// `max(x, 0)` in place, on any shape. NaN stays NaN (as in PyTorch).
pub fn relu_inplace(mut x: ArrayViewMutD<'_, f32>) {
    x.par_mapv_inplace(relu);
}

/// The ReLU's backward: `grad_out` where the ReLU's `output` is positive, else 0 (PyTorch's
/// rule: a NaN output passes no gradient). Shapes must match.
pub fn relu_backward(
    output: ArrayViewD<'_, f32>,
    grad_out: ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    if output.shape() != grad_out.shape() {
        return Err(Error::Shape {
            op: "relu_backward",
            expected: format!("a gradient shaped like the output {:?}", output.shape()),
            found: grad_out.shape().to_vec(),
        });
    }
    Ok(Zip::from(&output)
        .and(&grad_out)
        .par_map_collect(|&y, &g| if y > 0.0 { g } else { 0.0 }))
}

/// `x += bias[channel]`, then ReLU if `relu`, in place. The channel axis is axis 1: C of an
/// `[N, C, H, W]` activation, the columns of a `[rows, cols]` matrix.
pub fn bias_act_inplace(
    mut x: ArrayViewMutD<'_, f32>,
    bias: &[f32],
    relu_after: bool,
) -> Result<()> {
    if x.ndim() < 2 || x.shape()[1] != bias.len() {
        return Err(Error::Shape {
            op: "bias_act",
            expected: format!("[N, {}, ...] (axis 1 = the bias length)", bias.len()),
            found: x.shape().to_vec(),
        });
    }
    for (mut channel, &b) in x.axis_iter_mut(Axis(1)).zip(bias) {
        channel.mapv_inplace(|v| {
            let v = v + b;
            if relu_after {
                relu(v)
            } else {
                v
            }
        });
    }
    Ok(())
}
