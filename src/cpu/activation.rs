//! ReLU, the activation every layer of the network uses (fused into conv and linear).

use ndarray::ArrayViewMutD;

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
