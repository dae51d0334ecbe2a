//! 2-D convolution as im2col + GEMM, threaded over images (or inside the GEMM for small batches).

use ndarray::{Array1, Array4, ArrayView4};
use rayon::prelude::*;

use super::bias_act;
use super::gemm::{gemm_accumulate, gemm_overwrite, MatRef, Threads};
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

    /// The side of the square kernel.
    pub(super) fn kernel(&self) -> usize {
        self.kernel
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// The weight, OIHW in C order, and the bias.
    pub fn parameters(&self) -> [&[f32]; 2] {
        [&self.weight, &self.bias]
    }

    /// The weight and bias for an optimiser to update in place (the same layout as
    /// [`Conv2d::parameters`]; the lengths cannot change).
    pub fn parameters_mut(&mut self) -> [&mut [f32]; 2] {
        [&mut self.weight, &mut self.bias]
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

    /// The convolution whose forward over the output's gradient is this one's input gradient,
    /// where there is one: for stride 1, `dx[c, y, x] = sum w[o, c, i, j] g[o, y + p - i, x + p
    /// - j]` over `o, i, j`, a convolution of `g` by the weight with its channel axes swapped and
    /// its kernel turned half a turn, padded by `k - 1 - p` (then its output is exactly the
    /// input's size). `None` for strides over 1 and paddings of `k` or more. No bias.
    pub(super) fn input_gradient_convolution(&self) -> Option<Conv2d> {
        if self.stride != 1 || self.padding >= self.kernel {
            return None;
        }
        let (o, c, k) = (self.out_channels, self.in_channels, self.kernel);
        let mut weight = vec![0.0f32; self.weight.len()];
        for (oc, filter) in self.weight.chunks_exact(c * k * k).enumerate() {
            for (ic, plane) in filter.chunks_exact(k * k).enumerate() {
                let turned = &mut weight[(ic * o + oc) * k * k..][..k * k];
                for (to, &from) in turned.iter_mut().zip(plane.iter().rev()) {
                    *to = from;
                }
            }
        }
        Some(Conv2d {
            weight,
            bias: vec![0.0; c],
            out_channels: c,
            in_channels: o,
            kernel: k,
            stride: 1,
            padding: k - 1 - self.padding,
        })
    }

    /// The geometry of one image of `input`, after checking its shape.
    pub(super) fn geometry(
        &self,
        op: &'static str,
        input: &ArrayView4<'_, f32>,
    ) -> Result<Geometry> {
        self.geometry_of(op, input.dim())
    }

    /// [`Conv2d::geometry`] of a batch shaped `(n, c, h, w)`, whatever its layout in memory.
    pub(super) fn geometry_of(
        &self,
        op: &'static str,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Geometry> {
        if c != self.in_channels {
            return Err(Error::Shape {
                op,
                expected: format!("[N, {}, H, W]", self.in_channels),
                found: vec![n, c, h, w],
            });
        }
        if c * h * w == 0 {
            return Err(Error::Shape {
                op,
                expected: "non-empty images [N, C > 0, H > 0, W > 0]".into(),
                found: vec![n, c, h, w],
            });
        }
        let (oh, ow) = self.output_size(h, w)?;
        Ok(Geometry {
            channels: c,
            height: h,
            width: w,
            out_height: oh,
            out_width: ow,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        })
    }

    fn run(&self, input: ArrayView4<'_, f32>, relu: bool) -> Result<Array4<f32>> {
        let geometry = self.geometry("Conv2d", &input)?;
        let (n, c, h, w) = input.dim();
        let (oh, ow) = (geometry.out_height, geometry.out_width);
        let input = input.as_standard_layout();
        let input = input.as_slice().unwrap_or(&[]);
        let in_len = c * h * w;
        let out_len = self.out_channels * oh * ow;
        let mut output = vec![0.0f32; n * out_len];
        if n == 0 || out_len == 0 {
            return Array4::from_shape_vec((n, self.out_channels, oh, ow), output)
                .map_err(|e| Error::invalid("Conv2d output", e.to_string()));
        }
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

impl Conv2d {
    /// The backward of [`Conv2d::forward`] (convolution plus bias, before any ReLU) at `input`
    /// for the output's gradient `grad_out`: per image `dW += g col^T`, `db += sum g`,
    /// `dcol = W^T g` folded back onto the input (col2im). The input's gradient is skipped with
    /// [`InputGradient::Skip`] (the first layer, whose input is the data, needs none).
    pub fn backward(
        &self,
        input: ArrayView4<'_, f32>,
        grad_out: ArrayView4<'_, f32>,
        input_gradient: InputGradient,
    ) -> Result<Conv2dGrads> {
        let geometry = self.geometry("Conv2d::backward", &input)?;
        let (n, c, h, w) = input.dim();
        let (o, positions) = (self.out_channels, geometry.out_height * geometry.out_width);
        if grad_out.dim() != (n, o, geometry.out_height, geometry.out_width) {
            return Err(Error::Shape {
                op: "Conv2d::backward",
                expected: format!(
                    "a gradient of [{n}, {o}, {}, {}]",
                    geometry.out_height, geometry.out_width
                ),
                found: grad_out.shape().to_vec(),
            });
        }
        let input = input.as_standard_layout();
        let grad_out = grad_out.as_standard_layout();
        let (x, g) = (
            input.as_slice().unwrap_or(&[]),
            grad_out.as_slice().unwrap_or(&[]),
        );
        let (in_len, out_len) = (c * h * w, o * positions);
        let want_input = input_gradient == InputGradient::Compute;
        let mut dx = vec![0.0f32; if want_input { n * in_len } else { 0 }];
        let k = geometry.col_rows();
        let scratch = || (vec![0.0f32; k * positions], ParamSums::new(o * k, o));
        // One image: its weight and bias gradients into `sums` (the first image of a group
        // writes them, the others add), its input gradient into `dx`.
        let per_image = |(col, sums): &mut (Vec<f32>, ParamSums),
                         image: &[f32],
                         grad: &[f32],
                         dx: Option<&mut [f32]>,
                         first: bool,
                         threads: Threads| {
            im2col(&geometry, image, col);
            let weight_sum = if first {
                gemm_overwrite
            } else {
                gemm_accumulate
            };
            weight_sum(
                &mut sums.weight,
                MatRef::row_major(grad, o, positions),
                MatRef::transposed(col, positions, k),
                threads,
            );
            for (b, row) in sums.bias.iter_mut().zip(grad.chunks_exact(positions)) {
                *b += row.iter().map(|&v| v as f64).sum::<f64>();
            }
            if let Some(dx) = dx {
                gemm_overwrite(
                    col,
                    MatRef::transposed(&self.weight, k, o),
                    MatRef::row_major(grad, o, positions),
                    threads,
                );
                // Written before it is read (see `gemm_overwrite` on fresh zeroed buffers).
                dx.fill(0.0);
                col2im_add(&geometry, col, dx);
            }
        };
        // Images in one contiguous group per thread (a fixed split, so the sums are the same
        // from run to run), each group summing into its own gradients, added up in order.
        let threads = rayon::current_num_threads().max(1);
        let group = n.div_ceil(threads).max(1);
        let gemm_threads = if n >= threads {
            Threads::One
        } else {
            Threads::All
        };
        let mut dx_groups = dx.chunks_mut(group * in_len);
        let groups: Vec<_> = x
            .chunks(group * in_len)
            .zip(g.chunks((group * out_len).max(1)))
            .map(|(xs, gs)| (xs, gs, dx_groups.next()))
            .collect();
        let sum_group = |(xs, gs, mut dxs): (&[f32], &[f32], Option<&mut [f32]>)| {
            let mut acc = scratch();
            for (i, (image, grad)) in xs
                .chunks_exact(in_len)
                .zip(gs.chunks_exact(out_len))
                .enumerate()
            {
                let dx = dxs
                    .as_deref_mut()
                    .map(|d| &mut d[i * in_len..(i + 1) * in_len]);
                per_image(&mut acc, image, grad, dx, i == 0, gemm_threads);
            }
            acc.1
        };
        let partials: Vec<ParamSums> = if n == 0 || out_len == 0 {
            Vec::new() // (chunks of length 0 would panic) nothing to sum
        } else if gemm_threads == Threads::One {
            groups.into_par_iter().map(sum_group).collect()
        } else {
            groups.into_iter().map(sum_group).collect()
        };
        let sums = partials
            .into_iter()
            .reduce(ParamSums::add)
            .unwrap_or_else(|| scratch().1);
        let shape_err = |e: ndarray::ShapeError| Error::invalid("Conv2d gradient", e.to_string());
        Ok(Conv2dGrads {
            input: if want_input {
                Some(Array4::from_shape_vec((n, c, h, w), dx).map_err(shape_err)?)
            } else {
                None
            },
            weight: Array4::from_shape_vec((o, c, self.kernel, self.kernel), sums.weight)
                .map_err(shape_err)?,
            bias: sums.bias.iter().map(|&b| b as f32).collect(),
        })
    }
}

/// Whether [`Conv2d::backward`] computes the gradient with respect to its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGradient {
    Compute,
    /// The input is data (the first layer): only the parameters' gradients are needed.
    Skip,
}

/// A convolution's gradients for one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2dGrads {
    /// `[N, C, H, W]`, or `None` when skipped.
    pub input: Option<Array4<f32>>,
    /// `[out, in, k, k]`, summed over the batch.
    pub weight: Array4<f32>,
    /// `[out]`, summed over the batch.
    pub bias: Array1<f32>,
}

/// Weight and bias gradients being summed over images (the bias in f64: it adds up every
/// position of every image).
struct ParamSums {
    weight: Vec<f32>,
    bias: Vec<f64>,
}

impl ParamSums {
    fn new(weights: usize, biases: usize) -> Self {
        ParamSums {
            weight: vec![0.0; weights],
            bias: vec![0.0; biases],
        }
    }

    fn add(mut self, other: Self) -> Self {
        self.weight
            .iter_mut()
            .zip(&other.weight)
            .for_each(|(a, b)| *a += b);
        self.bias
            .iter_mut()
            .zip(&other.bias)
            .for_each(|(a, b)| *a += b);
        self
    }
}

/// Sizes one im2col needs.
pub(super) struct Geometry {
    pub(super) channels: usize,
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) out_height: usize,
    pub(super) out_width: usize,
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl Geometry {
    pub(super) fn col_rows(&self) -> usize {
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

/// The adjoint of [`im2col`]: adds `col[(c, ki, kj), (oy, ox)]` onto the image position each
/// entry was copied from (entries over the padding are dropped).
fn col2im_add(g: &Geometry, col: &[f32], image: &mut [f32]) {
    let positions = g.out_height * g.out_width;
    let mut rows = col.chunks_exact(positions);
    for c in 0..g.channels {
        let plane = &mut image[c * g.height * g.width..(c + 1) * g.height * g.width];
        for ki in 0..g.kernel {
            for kj in 0..g.kernel {
                let Some(row) = rows.next() else { return };
                for (oy, col_row) in row.chunks_exact(g.out_width).enumerate() {
                    let y = (oy * g.stride + ki) as isize - g.padding as isize;
                    if y < 0 || y >= g.height as isize {
                        continue;
                    }
                    let dst = &mut plane[y as usize * g.width..(y as usize + 1) * g.width];
                    add_row(col_row, dst, kj as isize - g.padding as isize, g.stride);
                }
            }
        }
    }
}

/// `dst[ox * stride + offset] += src[ox]` wherever that lies inside `dst` (the adjoint of
/// [`copy_row`]).
fn add_row(src: &[f32], dst: &mut [f32], offset: isize, stride: usize) {
    if stride == 1 {
        // Contiguous: the columns that land inside `dst` form one range, added in one
        // vectorised pass (every layer after the first has stride 1).
        let first = (-offset).clamp(0, src.len() as isize) as usize;
        let last = (dst.len() as isize - offset).clamp(first as isize, src.len() as isize) as usize;
        let start = (first as isize + offset) as usize;
        for (d, &v) in dst[start..start + (last - first)]
            .iter_mut()
            .zip(&src[first..last])
        {
            *d += v;
        }
        return;
    }
    for (ox, &v) in src.iter().enumerate() {
        let x = ox as isize * stride as isize + offset;
        if x >= 0 && (x as usize) < dst.len() {
            dst[x as usize] += v;
        }
    }
}
