//! Max-pooling over square windows (no padding, floor mode), one plane per task.

use multiversion::multiversion;
use ndarray::{Array4, ArrayView4};
use rayon::prelude::*;

use crate::config::{window_output, PoolSpec};
use crate::error::{Error, Result};

/// Max-pooling; overlapping when `stride < kernel` (the paper's 3x3, stride 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
}

impl From<PoolSpec> for MaxPool2d {
    fn from(spec: PoolSpec) -> Self {
        MaxPool2d {
            kernel: spec.kernel,
            stride: spec.stride,
        }
    }
}

impl MaxPool2d {
    pub fn output_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let out = |len| window_output(len, self.kernel, self.stride, 0);
        match (out(height), out(width)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(Error::Shape {
                op: "MaxPool2d",
                expected: format!(
                    "spatial size >= kernel {} (kernel and stride > 0)",
                    self.kernel
                ),
                found: vec![height, width],
            }),
        }
    }

    /// `[N, C, H, W] -> [N, C, OH, OW]`. A NaN in a window makes that output NaN.
    pub fn forward(&self, input: ArrayView4<'_, f32>) -> Result<Array4<f32>> {
        let (n, c, h, w) = input.dim();
        let (oh, ow) = self.output_size(h, w)?;
        let input = input.as_standard_layout();
        let src = input.as_slice().unwrap_or(&[]);
        let mut out = vec![0.0f32; n * c * oh * ow];
        if !out.is_empty() {
            out.par_chunks_exact_mut(oh * ow)
                .zip(src.par_chunks_exact(h * w))
                .for_each(|(dst, plane)| self.pool_plane(plane, w, dst, ow));
        }
        Array4::from_shape_vec((n, c, oh, ow), out)
            .map_err(|e| Error::invalid("MaxPool2d output", e.to_string()))
    }

    /// The backward: each output's gradient goes to the input its window took the maximum
    /// from (the first in row-major window order on ties, the last NaN where there are NaNs,
    /// as in PyTorch); overlapping windows add up. `input` is the forward's input, `grad_out` is
    /// shaped like its output.
    pub fn backward(
        &self,
        input: ArrayView4<'_, f32>,
        grad_out: ArrayView4<'_, f32>,
    ) -> Result<Array4<f32>> {
        let (n, c, h, w) = input.dim();
        let (oh, ow) = self.output_size(h, w)?;
        if grad_out.dim() != (n, c, oh, ow) {
            return Err(Error::Shape {
                op: "MaxPool2d::backward",
                expected: format!("a gradient of [{n}, {c}, {oh}, {ow}]"),
                found: grad_out.shape().to_vec(),
            });
        }
        let input = input.as_standard_layout();
        let grad_out = grad_out.as_standard_layout();
        let (src, grad) = (
            input.as_slice().unwrap_or(&[]),
            grad_out.as_slice().unwrap_or(&[]),
        );
        let mut out = vec![0.0f32; n * c * h * w];
        if !out.is_empty() && oh * ow > 0 {
            out.par_chunks_exact_mut(h * w)
                .zip(src.par_chunks_exact(h * w))
                .zip(grad.par_chunks_exact(oh * ow))
                .for_each(|((dst, plane), g)| {
                    // Written before the scattered adds read it: a zeroed allocation read
                    // first faults twice per page (see `gemm_overwrite`).
                    dst.fill(0.0);
                    self.unpool_plane(plane, w, g, ow, dst)
                });
        }
        Array4::from_shape_vec((n, c, h, w), out)
            .map_err(|e| Error::invalid("MaxPool2d gradient", e.to_string()))
    }

    /// Adds each output gradient of one plane to its window's maximum in `dst`.
    fn unpool_plane(
        &self,
        plane: &[f32],
        width: usize,
        grad: &[f32],
        out_width: usize,
        dst: &mut [f32],
    ) {
        // AlexNet's 3x3 windows get a copy with the window loops unrolled.
        match self.kernel {
            3 => unpool_plane(3, self.stride, plane, width, grad, out_width, dst),
            k => unpool_plane(k, self.stride, plane, width, grad, out_width, dst),
        }
    }

    fn pool_plane(&self, plane: &[f32], width: usize, dst: &mut [f32], out_width: usize) {
        pool_plane(self.kernel, self.stride, plane, width, dst, out_width);
    }
}

/// One plane's max-pooling into `dst` (`out_width` wide), separably: the max down each column
/// of the window's rows (a pass that vectorises; AVX-512 or AVX2 where the CPU has them), then
/// across each window of that row. `nan_max` lets any NaN win whatever the order, and picks the
/// same largest value otherwise.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn pool_plane(k: usize, s: usize, plane: &[f32], width: usize, dst: &mut [f32], out_width: usize) {
    let mut column_max = vec![f32::NEG_INFINITY; width];
    for (oy, out_row) in dst.chunks_exact_mut(out_width).enumerate() {
        column_max.fill(f32::NEG_INFINITY);
        for ky in 0..k {
            let row = &plane[(oy * s + ky) * width..][..width];
            for (m, &v) in column_max.iter_mut().zip(row) {
                *m = nan_max(*m, v);
            }
        }
        for (ox, d) in out_row.iter_mut().enumerate() {
            *d = column_max[ox * s..ox * s + k]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v));
        }
    }
}

/// The scan behind [`MaxPool2d::backward`]: each output gradient of one plane added to the
/// input its window took the maximum from. The choice is made with selects, not branches: which
/// element of a window is largest is a coin toss for the branch predictor (the paper's pool1
/// backward at batch 16 went from 21.5 to 15.5 ms on a 2-core Xeon VM, fresh output included).
#[inline(always)]
fn unpool_plane(
    k: usize,
    s: usize,
    plane: &[f32],
    width: usize,
    grad: &[f32],
    out_width: usize,
    dst: &mut [f32],
) {
    for (oy, grad_row) in grad.chunks_exact(out_width).enumerate() {
        for (ox, &g) in grad_row.iter().enumerate() {
            let first = (oy * s) * width + ox * s;
            let (mut best, mut at) = (plane[first], first);
            for ky in 0..k {
                let row = first + ky * width;
                for (kx, &v) in plane[row..row + k].iter().enumerate() {
                    // PyTorch's rule: a strictly larger value or any NaN takes over (the
                    // window's first element against itself changes nothing).
                    let take = (v > best) | v.is_nan();
                    best = if take { v } else { best };
                    at = if take { row + kx } else { at };
                }
            }
            dst[at] += g;
        }
    }
}

/// `max` that propagates NaN (as PyTorch's pooling does) instead of dropping it.
#[inline]
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}
