//! Inter-channel local response normalisation (the paper's, see [`LrnParams`]).

use ndarray::{Array4, ArrayView4};
use rayon::prelude::*;

use crate::config::LrnParams;
use crate::error::{Error, Result};

/// `b_c = a_c / (k + alpha * sum_{j=max(0,c-n/2)}^{min(C-1,c+(n-1)/2)} a_j^2)^beta` (integer
/// halves; symmetric for odd n, and PyTorch's window for even n), alpha **not** divided by n
/// (PyTorch: `LocalResponseNorm(n, alpha * n, beta, k)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lrn {
    pub params: LrnParams,
}

impl Lrn {
    pub fn new(params: LrnParams) -> Result<Self> {
        if params.size == 0 {
            return Err(Error::invalid("LRN size", "must be positive"));
        }
        Ok(Lrn { params })
    }

    /// `[N, C, H, W] -> [N, C, H, W]`, one output channel plane per task.
    pub fn forward(&self, input: ArrayView4<'_, f32>) -> Result<Array4<f32>> {
        let (n, c, h, w) = input.dim();
        let input = input.as_standard_layout();
        let src = input.as_slice().unwrap_or(&[]);
        let plane = h * w;
        let mut out = vec![0.0f32; n * c * plane];
        if !out.is_empty() {
            let LrnParams {
                size,
                k,
                alpha,
                beta,
            } = self.params;
            // Window [c - n/2, c + (n-1)/2]: PyTorch's rule, symmetric for the paper's odd n.
            let before = size / 2;
            let after = (size - 1) / 2;
            out.par_chunks_exact_mut(plane)
                .enumerate()
                .for_each(|(index, dst)| {
                    let (image, channel) = (index / c, index % c);
                    let image_src = &src[image * c * plane..(image + 1) * c * plane];
                    let first = channel.saturating_sub(before);
                    let last = (channel + after).min(c - 1);
                    // Sum of squares over the window, plane by plane (contiguous, vectorised).
                    dst.fill(0.0);
                    for j in first..=last {
                        let neighbour = &image_src[j * plane..(j + 1) * plane];
                        for (d, &a) in dst.iter_mut().zip(neighbour) {
                            *d += a * a;
                        }
                    }
                    let centre = &image_src[channel * plane..(channel + 1) * plane];
                    normalise(dst, centre, k, alpha, beta);
                });
        }
        Array4::from_shape_vec((n, c, h, w), out)
            .map_err(|e| Error::invalid("LRN output", e.to_string()))
    }
}

impl Lrn {
    /// The backward: with `D_c = k + alpha * sum_{j in W(c)} a_j^2` and `b_c = a_c D_c^-beta`,
    /// `da_i = g_i D_i^-beta - 2 alpha beta a_i sum_{c : i in W(c)} g_c a_c D_c^(-beta-1)`.
    /// `input` is the forward's input, `grad_out` is shaped like it. One image per task.
    pub fn backward(
        &self,
        input: ArrayView4<'_, f32>,
        grad_out: ArrayView4<'_, f32>,
    ) -> Result<Array4<f32>> {
        let (n, c, h, w) = input.dim();
        if grad_out.dim() != (n, c, h, w) {
            return Err(Error::Shape {
                op: "Lrn::backward",
                expected: format!("a gradient of [{n}, {c}, {h}, {w}]"),
                found: grad_out.shape().to_vec(),
            });
        }
        let input = input.as_standard_layout();
        let grad_out = grad_out.as_standard_layout();
        let (src, grad) = (
            input.as_slice().unwrap_or(&[]),
            grad_out.as_slice().unwrap_or(&[]),
        );
        let plane = h * w;
        let image = c * plane;
        let mut out = vec![0.0f32; n * image];
        if !out.is_empty() {
            let LrnParams {
                size,
                k,
                alpha,
                beta,
            } = self.params;
            let (before, after) = (size / 2, (size - 1) / 2);
            out.par_chunks_exact_mut(image)
                .zip(src.par_chunks_exact(image))
                .zip(grad.par_chunks_exact(image))
                .for_each(|((dst, a), g)| {
                    // D_c per element, then t_c = g_c a_c D_c^(-beta-1).
                    let mut denom = vec![0.0f32; image];
                    for ch in 0..c {
                        let d = &mut denom[ch * plane..(ch + 1) * plane];
                        for j in ch.saturating_sub(before)..=(ch + after).min(c - 1) {
                            for (d, &v) in d.iter_mut().zip(&a[j * plane..(j + 1) * plane]) {
                                *d += v * v;
                            }
                        }
                        d.iter_mut().for_each(|d| *d = k + alpha * *d);
                    }
                    let t: Vec<f32> = (0..image)
                        .map(|p| g[p] * a[p] * denom[p].powf(-beta - 1.0))
                        .collect();
                    for i in 0..c {
                        // The channels whose window holds i: c in [i - after, i + before].
                        let first = i.saturating_sub(after);
                        let last = (i + before).min(c - 1);
                        let dst = &mut dst[i * plane..(i + 1) * plane];
                        dst.fill(0.0);
                        for ch in first..=last {
                            for (d, &tc) in dst.iter_mut().zip(&t[ch * plane..(ch + 1) * plane]) {
                                *d += tc;
                            }
                        }
                        let range = i * plane..(i + 1) * plane;
                        for (((d, &gq), &dq), &aq) in dst
                            .iter_mut()
                            .zip(&g[range.clone()])
                            .zip(&denom[range.clone()])
                            .zip(&a[range])
                        {
                            *d = gq * dq.powf(-beta) - 2.0 * alpha * beta * aq * *d;
                        }
                    }
                });
        }
        Array4::from_shape_vec((n, c, h, w), out)
            .map_err(|e| Error::invalid("LRN gradient", e.to_string()))
    }
}

/// `dst[p] = centre[p] / (k + alpha * dst[p])^beta`, where `dst` holds the window's sums of
/// squares. The paper's beta = 0.75 is computed as two square roots: several times faster than
/// `powf`, vectorisable, and as accurate. The branch sits outside the loops so each loop stays
/// branch-free.
fn normalise(dst: &mut [f32], centre: &[f32], k: f32, alpha: f32, beta: f32) {
    if beta == 0.75 {
        for (d, &a) in dst.iter_mut().zip(centre) {
            let s = (k + alpha * *d).sqrt();
            *d = a / (s * s.sqrt());
        }
    } else {
        for (d, &a) in dst.iter_mut().zip(centre) {
            *d = a / (k + alpha * *d).powf(beta);
        }
    }
}
