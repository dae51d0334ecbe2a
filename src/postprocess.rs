//! Post-processing of logits shared by both backends and the CLI: row-wise softmax and top-k.
//! The GPU's fused `softmax_topk` kernel (`kernels/softmax.cu`) computes the same order, ties
//! and NaN rule as [`top_k`] here, and is checked against it.

use ndarray::{Array2, ArrayView1, ArrayView2, Axis, Zip};

use crate::error::{Error, Result};

/// Row-wise softmax of `[N, classes]` logits, computed stably (max subtracted) in f32.
pub fn softmax(logits: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut out = logits.to_owned();
    Zip::from(out.axis_iter_mut(Axis(0))).par_for_each(|mut row| {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    });
    out
}

/// The `k` largest entries of `row` as `(index, value)`, largest first; equal values keep index
/// order. NaN counts as larger than everything (so it is seen, not hidden).
pub fn top_k(row: ArrayView1<'_, f32>, k: usize) -> Result<Vec<(usize, f32)>> {
    if k == 0 || k > row.len() {
        return Err(Error::invalid(
            "top-k",
            format!(
                "k = {k} with {} classes (need 1 <= k <= classes)",
                row.len()
            ),
        ));
    }
    let mut entries: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    // NaN of either sign first (x86 makes negative NaNs, which total_cmp ranks below -inf), then
    // values descending, then the lower index: the GPU's softmax_topk uses the same order.
    let by_value_desc = |a: &(usize, f32), b: &(usize, f32)| {
        b.1.is_nan()
            .cmp(&a.1.is_nan())
            .then(b.1.total_cmp(&a.1))
            .then(a.0.cmp(&b.0))
    };
    if k < entries.len() {
        entries.select_nth_unstable_by(k - 1, by_value_desc);
        entries.truncate(k);
    }
    entries.sort_by(by_value_desc);
    Ok(entries)
}
