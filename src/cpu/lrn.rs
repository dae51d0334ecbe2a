//! Inter-channel local response normalisation (the paper's, see [`LrnParams`]).

use multiversion::multiversion;
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
            out.par_chunks_exact_mut(plane)
                .enumerate()
                .for_each(|(index, dst)| {
                    let (image, channel) = (index / c, index % c);
                    let image_src = &src[image * c * plane..(image + 1) * c * plane];
                    sum_of_squares(image_src, plane, window(channel, c, size), dst);
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
            // Per thread, reused image to image: D_c, then D_c^-beta, then t_c.
            let scratch = || {
                [
                    vec![0.0f32; image],
                    vec![0.0f32; image],
                    vec![0.0f32; image],
                ]
            };
            out.par_chunks_exact_mut(image)
                .zip(src.par_chunks_exact(image))
                .zip(grad.par_chunks_exact(image))
                .for_each_init(scratch, |[denom, scale, t], ((dst, a), g)| {
                    for (ch, d) in denom.chunks_exact_mut(plane).enumerate() {
                        sum_of_squares(a, plane, window(ch, c, size), d);
                        d.iter_mut().for_each(|d| *d = k + alpha * *d);
                    }
                    scale.copy_from_slice(denom);
                    inverse_powers(scale, beta);
                    // t_c = g_c a_c D_c^(-beta-1) = g_c a_c D_c^-beta / D_c.
                    for (((t, &gq), &aq), (&sq, &dq)) in t
                        .iter_mut()
                        .zip(g.iter())
                        .zip(a.iter())
                        .zip(scale.iter().zip(denom.iter()))
                    {
                        *t = gq * aq * sq / dq;
                    }
                    for i in 0..c {
                        // The channels whose window holds i: c in [i - after, i + before].
                        let (before, after) = (size / 2, (size - 1) / 2);
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
                        for (((d, &gq), &sq), &aq) in dst
                            .iter_mut()
                            .zip(&g[range.clone()])
                            .zip(&scale[range.clone()])
                            .zip(&a[range])
                        {
                            *d = gq * sq - 2.0 * alpha * beta * aq * *d;
                        }
                    }
                });
        }
        Array4::from_shape_vec((n, c, h, w), out)
            .map_err(|e| Error::invalid("LRN gradient", e.to_string()))
    }
}

/// The channels channel `channel`'s sum runs over (of `channels`, window `size`):
/// `[c - n/2, c + (n-1)/2]` clipped, PyTorch's rule, symmetric for the paper's odd n.
fn window(channel: usize, channels: usize, size: usize) -> std::ops::RangeInclusive<usize> {
    channel.saturating_sub(size / 2)..=(channel + (size - 1) / 2).min(channels - 1)
}

/// `dst[p] = sum_{j in window} image[j][p]^2` over one image's `plane`-sized channel planes,
/// plane by plane (contiguous, vectorised; AVX-512 or AVX2 where the CPU has them).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn sum_of_squares(
    image: &[f32],
    plane: usize,
    window: std::ops::RangeInclusive<usize>,
    dst: &mut [f32],
) {
    dst.fill(0.0);
    for j in window {
        for (d, &a) in dst.iter_mut().zip(&image[j * plane..(j + 1) * plane]) {
            *d += a * a;
        }
    }
}

/// `dst[p] = centre[p] / (k + alpha * dst[p])^beta`, where `dst` holds the window's sums of
/// squares. AVX-512 or AVX2 where the CPU has them (see [`normalise_values`]).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn normalise(dst: &mut [f32], centre: &[f32], k: f32, alpha: f32, beta: f32) {
    normalise_values(dst, centre, k, alpha, beta);
}

/// [`normalise`]'s loops, inlined into each caller so that they are compiled for the caller's
/// target features. The paper's beta = 0.75 is computed as two square roots: several times
/// faster than `powf`, vectorisable, and as accurate. The branch sits outside the loops so each
/// loop stays branch-free. IEEE square roots and divisions: the same numbers at every width.
#[inline(always)]
pub(super) fn normalise_values(dst: &mut [f32], centre: &[f32], k: f32, alpha: f32, beta: f32) {
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

/// `v = v^-beta` in place, with the paper's beta = 0.75 as two square roots (as in
/// [`normalise`]: several times faster than `powf`, and as accurate).
fn inverse_powers(values: &mut [f32], beta: f32) {
    if beta == 0.75 {
        for v in values.iter_mut() {
            let s = v.sqrt();
            *v = 1.0 / (s * s.sqrt());
        }
    } else {
        for v in values.iter_mut() {
            *v = v.powf(-beta);
        }
    }
}
