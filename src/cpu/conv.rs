//! 2-D convolution as im2col + GEMM, threaded over images (or inside the GEMM for small batches).

use ndarray::{Array1, Array4, ArrayView4};
use rayon::prelude::*;

use super::bias_act;
use super::gemm::{gemm_accumulate, MatRef, Threads};
use crate::config::window_output;
use crate::error::{Error, Result};

/// A 2-D convolution with square kernels, PyTorch semantics (cross-correlation, zero padding,
/// floor output size). Weights OIHW, activations NCHW.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `[out_channels, in_channels * kernel * kernel]`: OIHW flattened, the GEMM's left operand.
    weight: Vec<f32>,
    bias: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `weight` is `[out, in, k, k]`, `bias` is `[out]`.
    pub fn new(
        weight: ArrayView4<'_, f32>,
        bias: &Array1<f32>,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (out_channels, in_channels, kh, kw) = weight.dim();
        if kh != kw || kh == 0 {
            return Err(Error::Shape {
                op: "Conv2d::new",
                expected: "a square, non-empty kernel [out, in, k, k]".into(),
                found: weight.shape().to_vec(),
            });
        }
        if bias.len() != out_channels {
            return Err(Error::Shape {
                op: "Conv2d::new (bias)",
                expected: format!("[{out_channels}]"),
                found: bias.shape().to_vec(),
            });
        }
        if stride == 0 {
            return Err(Error::invalid("Conv2d stride", "must be positive"));
        }
        Ok(Conv2d {
            weight: weight.iter().copied().collect(),
            bias: bias.to_vec(),
            out_channels,
            in_channels,
            kernel: kh,
            stride,
            padding,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Output `(height, width)` for an input of `(height, width)`, or an error if the kernel does
    /// not fit.
    pub fn output_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let out = |len| window_output(len, self.kernel, self.stride, self.padding);
        match (out(height), out(width)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(Error::Shape {
                op: "Conv2d",
                expected: format!(
                    "spatial size >= {} after padding {}",
                    self.kernel, self.padding
                ),
                found: vec![height, width],
            }),
        }
    }

    /// Convolution plus bias.
    pub fn forward(&self, input: ArrayView4<'_, f32>) -> Result<Array4<f32>> {
        self.run(input, false)
    }

    /// Convolution plus bias followed by ReLU, fused into one pass over the output.
    pub fn forward_relu(&self, input: ArrayView4<'_, f32>) -> Result<Array4<f32>> {
        self.run(input, true)
    }

    fn run(&self, input: ArrayView4<'_, f32>, relu: bool) -> Result<Array4<f32>> {
        let (n, c, h, w) = input.dim();
        if c != self.in_channels {
            return Err(Error::Shape {
                op: "Conv2d",
                expected: format!("[N, {}, H, W]", self.in_channels),
                found: input.shape().to_vec(),
            });
        }
        if c * h * w == 0 {
            return Err(Error::Shape {
                op: "Conv2d",
                expected: "non-empty images [N, C > 0, H > 0, W > 0]".into(),
                found: input.shape().to_vec(),
            });
        }
        let (oh, ow) = self.output_size(h, w)?;
        let input = input.as_standard_layout();
        let input = input.as_slice().unwrap_or(&[]);
        let in_len = c * h * w;
        let out_len = self.out_channels * oh * ow;
        let mut output = vec![0.0f32; n * out_len];
        if n == 0 || out_len == 0 {
            return Array4::from_shape_vec((n, self.out_channels, oh, ow), output)
                .map_err(|e| Error::invalid("Conv2d output", e.to_string()));
        }
        let geometry = Geometry {
            channels: c,
            height: h,
            width: w,
            out_height: oh,
            out_width: ow,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        let col_len = geometry.col_rows() * oh * ow;
        let per_image = |col: &mut Vec<f32>, (image, out): (&[f32], &mut [f32]), threads| {
            im2col(&geometry, image, col);
            self.gemm_image(col, out, oh * ow, threads);
            if relu {
                out.iter_mut().for_each(|v| *v = bias_act::relu(*v));
            }
        };
        if n >= rayon::current_num_threads() {
            // Enough images to keep every core busy: one image per task, single-threaded GEMMs.
            input
                .par_chunks_exact(in_len)
                .zip(output.par_chunks_exact_mut(out_len))
                .for_each_init(
                    || vec![0.0f32; col_len],
                    |col, pair| per_image(col, pair, Threads::One),
                );
        } else {
            let mut col = vec![0.0f32; col_len];
            input
                .chunks_exact(in_len)
                .zip(output.chunks_exact_mut(out_len))
                .for_each(|pair| per_image(&mut col, pair, Threads::All));
        }
        Array4::from_shape_vec((n, self.out_channels, oh, ow), output)
            .map_err(|e| Error::invalid("Conv2d output", e.to_string()))
    }

    /// `out[O, P] = bias + W[O, K] * col[K, P]` for one image.
    fn gemm_image(&self, col: &[f32], out: &mut [f32], positions: usize, threads: Threads) {
        for (row, b) in out.chunks_exact_mut(positions).zip(&self.bias) {
            row.fill(*b);
        }
        let k = self.weight.len() / self.out_channels;
        gemm_accumulate(
            out,
            MatRef::row_major(&self.weight, self.out_channels, k),
            MatRef::row_major(col, k, positions),
            threads,
        );
    }
}

/// Sizes one im2col needs.
struct Geometry {
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn col_rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }
}

/// Unfolds one CHW image into `col[(c, ki, kj), (oy, ox)]`, zeros where the window hangs over
/// the padding. Row order matches the OIHW weight flattening.
fn im2col(g: &Geometry, image: &[f32], col: &mut [f32]) {
    let positions = g.out_height * g.out_width;
    let mut rows = col.chunks_exact_mut(positions);
    for c in 0..g.channels {
        let plane = &image[c * g.height * g.width..(c + 1) * g.height * g.width];
        for ki in 0..g.kernel {
            for kj in 0..g.kernel {
                let Some(row) = rows.next() else { return };
                for (oy, out_row) in row.chunks_exact_mut(g.out_width).enumerate() {
                    let y = (oy * g.stride + ki) as isize - g.padding as isize;
                    if y < 0 || y >= g.height as isize {
                        out_row.fill(0.0);
                        continue;
                    }
                    let src = &plane[y as usize * g.width..(y as usize + 1) * g.width];
                    copy_row(src, out_row, kj as isize - g.padding as isize, g.stride);
                }
            }
        }
    }
}

/// `dst[ox] = src[ox * stride + offset]`, zero outside `src`.
fn copy_row(src: &[f32], dst: &mut [f32], offset: isize, stride: usize) {
    let width = src.len() as isize;
    if stride == 1 {
        // Contiguous: zero the padded ends, copy the middle in one go.
        let first = (-offset).clamp(0, dst.len() as isize) as usize;
        let last = (width - offset).clamp(first as isize, dst.len() as isize) as usize;
        dst[..first].fill(0.0);
        let start = (first as isize + offset) as usize;
        dst[first..last].copy_from_slice(&src[start..start + (last - first)]);
        dst[last..].fill(0.0);
        return;
    }
    // Strided: the output columns whose source lies inside the row form one range [lo, hi).
    let stride = stride as isize;
    let lo = ((-offset + stride - 1).max(0) / stride).min(dst.len() as isize) as usize;
    let hi = ((width - offset + stride - 1).max(0) / stride).clamp(lo as isize, dst.len() as isize)
        as usize;
    dst[..lo].fill(0.0);
    dst[hi..].fill(0.0);
    let start = (lo as isize * stride + offset) as usize;
    for (d, s) in dst[lo..hi]
        .iter_mut()
        .zip(src[start..].iter().step_by(stride as usize))
    {
        *d = *s;
    }
}
