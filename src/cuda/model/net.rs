//! The network of one storage type on the GPU: the plan's stages as GPU layers ([`Layers`]) and
//! every buffer of one batch size ([`Buffers`]), allocated once and reused until the size
//! changes.

use cudarc::driver::{CudaSlice, CudaView, HostSlice, PinnedHostSlice};
use half::f16;
use ndarray::{Array2, Array4, ArrayView4};

use crate::config::{DropoutMode, StageOp};
use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::ops::{
    convert_f16_to_f32, softmax_top_k, Conv2dGpu, ConvOptions, DropoutGpu, LinearGpu, LrnGpu,
    MaxPoolGpu, PrepareInput, TopK,
};
use crate::cuda::pinned::{alloc_readback, alloc_upload};
use crate::cuda::tensor::{to_physical, GpuTensor, Layout};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// What one stage runs.
enum Layer<T: GpuFloat> {
    /// Conv + bias, with the ReLU fused unless `relu_in_next` (the LRN after it applies it).
    Conv {
        conv: Conv2dGpu<T>,
        relu_in_next: bool,
    },
    /// LRN; `relu_first` applies the ReLU the convolution before it left out.
    Lrn {
        lrn: LrnGpu,
        relu_first: bool,
    },
    Pool(MaxPoolGpu),
    /// GEMM + bias (+ ReLU), then the classic dropout's inference scaling where configured
    /// (inverted dropout is the identity at inference).
    Linear {
        linear: LinearGpu<T>,
        relu: bool,
        eval_dropout: Option<DropoutGpu>,
    },
}

/// One stage of the plan: its name, layer and per-image output shape.
struct Stage<T: GpuFloat> {
    name: String,
    layer: Layer<T>,
    output: Vec<usize>,
}

/// What an observer receives per stage: its name, the tensor, and whether the ReLU still has
/// to be applied (the GPU fuses it into the LRN that follows the convolution).
pub(super) type Observer<'a, T> = dyn FnMut(&str, &GpuTensor<T>, bool) -> Result<()> + 'a;

/// The network's layers for one storage type, built from the plan.
pub(super) struct Layers<T: GpuFloat> {
    layout: Layout,
    /// Channels of the device input tensor: the image's 3, or 8 in fp16 NHWC mode.
    input_channels: usize,
    height: usize,
    width: usize,
    classes: usize,
    stages: Vec<Stage<T>>,
}

/// Every buffer for one batch size.
pub(super) struct Buffers<T: GpuFloat> {
    pub n: usize,
    /// The network's input tensor.
    input: GpuTensor<T>,
    /// One per stage, in order; the last holds the logits.
    outputs: Vec<GpuTensor<T>>,
    /// The logits widened to f32 for the download (fp16 mode; unused in fp32).
    logits_f32: CudaSlice<f32>,
    /// u8 HWC images on the device, before normalisation.
    device_u8: CudaSlice<u8>,
    /// Write-combined: written by the host, read by the upload only.
    host_u8: PinnedHostSlice<u8>,
    /// Cached page-locked memory: fast for the host to read.
    pub host_logits: PinnedHostSlice<f32>,
    pub topk: TopK,
}

/// The layers and, once a batch size is known, its buffers.
pub(super) struct Net<T: GpuFloat> {
    layers: Layers<T>,
    buffers: Option<Buffers<T>>,
}

impl<T: GpuFloat> Net<T> {
    pub fn build(gpu: &Gpu, weights: &Weights, layout: Layout, allow_tf32: bool) -> Result<Self> {
        Ok(Net {
            layers: Layers::build(gpu, weights, layout, allow_tf32)?,
            buffers: None,
        })
    }

    /// The batch size the buffers are allocated for, if any.
    pub fn batch_size(&self) -> Option<usize> {
        self.buffers.as_ref().map(|b| b.n)
    }

    /// The layers and the buffers for batch `n`, allocated (and every convolution's algorithm
    /// chosen) on the first call for that size; the buffers of another size are freed first.
    pub fn ready(&mut self, gpu: &Gpu, n: usize) -> Result<(&mut Layers<T>, &mut Buffers<T>)> {
        let buffers = match self.buffers.take() {
            Some(buffers) if buffers.n == n => buffers,
            other => {
                drop(other); // free the old size before allocating the new one
                self.layers.allocate(gpu, n)?
            }
        };
        let buffers = self.buffers.insert(buffers);
        Ok((&mut self.layers, buffers))
    }
}

impl<T: GpuFloat> Layers<T> {
    fn build(gpu: &Gpu, weights: &Weights, layout: Layout, allow_tf32: bool) -> Result<Self> {
        let plan = weights.config().plan()?;
        let input = plan.input;
        let input_channels = match layout {
            Layout::Nchw => input.channels,
            Layout::Nhwc => input.channels.div_ceil(8) * 8,
        };
        let missing = |name: &str| Error::invalid("weights", format!("no parameters for {name}"));
        let mut convs = weights.convs().iter();
        let mut fcs = weights.fcs().iter();
        let mut stages: Vec<Stage<T>> = Vec::with_capacity(plan.stages.len());
        for (i, spec) in plan.stages.iter().enumerate() {
            let next_is_lrn = matches!(plan.stages.get(i + 1).map(|s| s.op), Some(StageOp::Lrn(_)));
            let layer = match spec.op {
                StageOp::Conv {
                    stride, padding, ..
                } => {
                    let first = stages
                        .iter()
                        .all(|s| !matches!(s.layer, Layer::Conv { .. }));
                    let params = convs.next().ok_or_else(|| missing(&spec.name))?;
                    let mut options = ConvOptions::new(stride, padding, layout);
                    options.allow_tf32 = allow_tf32;
                    if first {
                        options.in_channels = Some(input_channels);
                    }
                    let conv =
                        Conv2dGpu::new(gpu, params.weight.view(), params.bias.view(), options)?;
                    Layer::Conv {
                        conv,
                        relu_in_next: next_is_lrn,
                    }
                }
                StageOp::Lrn(params) => Layer::Lrn {
                    lrn: LrnGpu::new(params)?,
                    relu_first: matches!(
                        stages.last().map(|s| &s.layer),
                        Some(Layer::Conv {
                            relu_in_next: true,
                            ..
                        })
                    ),
                },
                StageOp::MaxPool(pool) => Layer::Pool(MaxPoolGpu::new(pool.kernel, pool.stride)?),
                StageOp::Linear { relu, dropout, .. } => {
                    let first = stages
                        .iter()
                        .all(|s| !matches!(s.layer, Layer::Linear { .. }));
                    let params = fcs.next().ok_or_else(|| missing(&spec.name))?;
                    let linear = if first && layout == Layout::Nhwc {
                        // NHWC activations flatten in (H, W, C) order: reorder fc1's columns
                        // from PyTorch's (C, H, W) so the result is the CPU's.
                        let permuted =
                            chw_columns_to_hwc(params.weight.view(), plan.flatten_shape())?;
                        LinearGpu::new(gpu, permuted.view(), params.bias.view(), allow_tf32)?
                    } else {
                        LinearGpu::new(gpu, params.weight.view(), params.bias.view(), allow_tf32)?
                    };
                    let eval_dropout = match (dropout, plan.dropout_mode) {
                        (Some(p), DropoutMode::Classic) => {
                            Some(DropoutGpu::new(p, DropoutMode::Classic)?)
                        }
                        _ => None,
                    };
                    Layer::Linear {
                        linear,
                        relu,
                        eval_dropout,
                    }
                }
            };
            stages.push(Stage {
                name: spec.name.clone(),
                layer,
                output: spec.output.clone(),
            });
        }
        Ok(Layers {
            layout,
            input_channels,
            height: input.height,
            width: input.width,
            classes: plan.num_classes(),
            stages,
        })
    }

    /// Every buffer for batch `n`, with each convolution's algorithm chosen for it.
    fn allocate(&mut self, gpu: &Gpu, n: usize) -> Result<Buffers<T>> {
        let input = GpuTensor::zeros(
            gpu,
            &[n, self.input_channels, self.height, self.width],
            self.layout,
        )?;
        let mut outputs = Vec::with_capacity(self.stages.len());
        let (mut h, mut w) = (self.height, self.width);
        for stage in &mut self.stages {
            let shape: Vec<usize> = std::iter::once(n)
                .chain(stage.output.iter().copied())
                .collect();
            if let Layer::Conv { conv, .. } = &mut stage.layer {
                conv.prepare(gpu, n, h, w)?;
            }
            let layout = match shape.as_slice() {
                &[_, _, oh, ow] => {
                    (h, w) = (oh, ow);
                    self.layout
                }
                _ => Layout::Nchw,
            };
            outputs.push(GpuTensor::zeros(gpu, &shape, layout)?);
        }
        let too_big = || Error::invalid("batch", format!("{n} images overflow the buffer sizes"));
        let logits = n.checked_mul(self.classes).ok_or_else(too_big)?;
        let image_bytes = self.height * self.width * 3;
        let pixels = n.checked_mul(image_bytes).ok_or_else(too_big)?;
        let stream = gpu.stream();
        Ok(Buffers {
            n,
            input,
            outputs,
            logits_f32: stream
                .alloc_zeros::<f32>(logits)
                .map_err(driver_err("allocating the f32 logits"))?,
            device_u8: stream
                .alloc_zeros::<u8>(pixels)
                .map_err(driver_err("allocating the u8 input"))?,
            host_u8: alloc_upload(gpu.context(), pixels)?,
            host_logits: alloc_readback(gpu.context(), logits)?,
            topk: TopK::new(gpu, n)?,
        })
    }

    /// Uploads a normalised NCHW f32 batch into the input tensor (rounded to `T`, reordered to
    /// the layout, channels past the image's zero).
    pub fn upload_f32(
        &self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        input: ArrayView4<'_, f32>,
    ) -> Result<()> {
        let padded = self.input_channels;
        let (n, c, h, w) = input.dim();
        let host = if padded == c {
            to_physical::<T>(input.into_dyn(), self.layout)?
        } else {
            let mut full = Array4::<f32>::zeros((n, padded, h, w));
            full.slice_mut(ndarray::s![.., ..c, .., ..]).assign(&input);
            to_physical::<T>(full.view().into_dyn(), self.layout)?
        };
        bufs.input.upload_physical(gpu, &host)
    }

    /// Copies u8 HWC images into the write-combined buffer and queues their upload to the
    /// device (waiting first for the previous upload from that buffer).
    pub fn upload_u8(&self, gpu: &Gpu, bufs: &mut Buffers<T>, pixels: &[u8]) -> Result<()> {
        let host = bufs
            .host_u8
            .as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        if pixels.len() != host.len() {
            return Err(Error::Shape {
                op: "CudaModel (u8 upload)",
                expected: format!("{} bytes", host.len()),
                found: vec![pixels.len()],
            });
        }
        // A sequential copy into write-combined memory, never read back.
        host.copy_from_slice(pixels);
        gpu.stream()
            .memcpy_htod(&bufs.host_u8, &mut bufs.device_u8)
            .map_err(driver_err("cuMemcpyHtoDAsync (images)"))
    }

    /// Normalises the images of [`Layers::upload_u8`] into the input tensor.
    pub fn prepare_uploaded(
        &self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        norm: &PrepareInput,
    ) -> Result<()> {
        let Buffers {
            device_u8, input, ..
        } = bufs;
        norm.forward(gpu, &device_u8.as_view(), input)
    }

    /// Normalises `n` u8 HWC images already on the device (e.g. a pipeline slot) into the
    /// input tensor.
    pub fn prepare_from(
        &self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        src: &CudaView<'_, u8>,
        norm: &PrepareInput,
    ) -> Result<()> {
        norm.forward(gpu, src, &mut bufs.input)
    }

    /// Runs every stage from the input tensor to the logits, calling `observe` after each.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        observe: &mut Observer<'_, T>,
    ) -> Result<()> {
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let (before, rest) = bufs.outputs.split_at_mut(i);
            let x = before.last().unwrap_or(&bufs.input);
            let Some((y, _)) = rest.split_first_mut() else {
                return Err(Error::invalid(
                    "CudaModel",
                    "activation buffers of another network",
                ));
            };
            let relu_pending = match &mut stage.layer {
                Layer::Conv { conv, relu_in_next } => {
                    conv.forward(gpu, x, y, !*relu_in_next)?;
                    *relu_in_next
                }
                Layer::Lrn { lrn, relu_first } => {
                    lrn.forward(gpu, x, y, *relu_first)?;
                    false
                }
                Layer::Pool(pool) => {
                    pool.forward(gpu, x, y)?;
                    false
                }
                Layer::Linear {
                    linear,
                    relu,
                    eval_dropout,
                } => {
                    linear.forward(gpu, x, y, *relu)?;
                    if let Some(dropout) = eval_dropout {
                        dropout.forward_eval(gpu, y)?;
                    }
                    false
                }
            };
            observe(&stage.name, y, relu_pending)?;
        }
        Ok(())
    }

    /// Queues the copy of the logits (as f32) into `dst` on the compute stream.
    pub fn download_logits<D: HostSlice<f32> + ?Sized>(
        &self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        dst: &mut D,
    ) -> Result<()> {
        let Buffers {
            outputs,
            logits_f32,
            ..
        } = bufs;
        download_logits(gpu, last(outputs)?, logits_f32, dst)
    }

    /// Queues the logits' download into the buffers' own page-locked `host_logits`.
    pub fn download_logits_to_host(&self, gpu: &Gpu, bufs: &mut Buffers<T>) -> Result<()> {
        let Buffers {
            outputs,
            logits_f32,
            host_logits,
            ..
        } = bufs;
        download_logits(gpu, last(outputs)?, logits_f32, host_logits)
    }

    /// Softmax and top-k of the logits into the buffers' `topk`.
    pub fn top_k(&self, gpu: &Gpu, bufs: &mut Buffers<T>, k: usize) -> Result<()> {
        let Buffers { outputs, topk, .. } = bufs;
        softmax_top_k(gpu, last(outputs)?, k, None, topk)
    }

    /// Fills every activation buffer (input included) with NaN.
    pub fn poison(&self, gpu: &Gpu, bufs: &mut Buffers<T>) -> Result<()> {
        bufs.input.poison(gpu)?;
        for t in &mut bufs.outputs {
            t.poison(gpu)?;
        }
        Ok(())
    }
}

/// The logits tensor `[n, classes]`: the last stage's output.
fn last<T: GpuFloat>(outputs: &[GpuTensor<T>]) -> Result<&GpuTensor<T>> {
    outputs
        .last()
        .ok_or_else(|| Error::invalid("config", "the network has no stage"))
}

/// Queues the copy of `logits` (as f32, widened through `wide` in fp16 mode) into `dst` on the
/// compute stream.
fn download_logits<T: GpuFloat, D: HostSlice<f32> + ?Sized>(
    gpu: &Gpu,
    logits: &GpuTensor<T>,
    wide: &mut CudaSlice<f32>,
    dst: &mut D,
) -> Result<()> {
    let len = logits.len();
    if dst.len() < len {
        return Err(Error::Shape {
            op: "CudaModel (logits download)",
            expected: format!("room for {len} logits"),
            found: vec![dst.len()],
        });
    }
    let stream = gpu.stream();
    let view_err = || Error::cuda("CudaModel", "logits view");
    match T::DTYPE {
        GpuDtype::F32 => {
            // SAFETY: `T::DTYPE == F32` holds only for `T = f32` (GpuFloat is sealed), so the
            // buffer holds `len` f32 values.
            let view = unsafe { logits.data().transmute::<f32>(len) }.ok_or_else(view_err)?;
            stream
                .memcpy_dtoh(&view, dst)
                .map_err(driver_err("cuMemcpyDtoH (logits)"))
        }
        GpuDtype::F16 => {
            // SAFETY: `T::DTYPE == F16` holds only for `T = half::f16`.
            let view = unsafe { logits.data().transmute::<f16>(len) }.ok_or_else(view_err)?;
            convert_f16_to_f32(gpu, &view, wide)?;
            let wide = wide.try_slice(..len).ok_or_else(view_err)?;
            stream
                .memcpy_dtoh(&wide, dst)
                .map_err(driver_err("cuMemcpyDtoH (logits)"))
        }
    }
}

/// `weight` `[out, C*H*W]` with its columns reordered from (C, H, W) to (H, W, C) order.
fn chw_columns_to_hwc(
    weight: ndarray::ArrayView2<'_, f32>,
    [c, h, w]: [usize; 3],
) -> Result<Array2<f32>> {
    let (out, features) = weight.dim();
    if features != c * h * w {
        return Err(Error::Shape {
            op: "fc1 weight",
            expected: format!("[{out}, {}] ({c} x {h} x {w} features)", c * h * w),
            found: vec![out, features],
        });
    }
    Ok(Array2::from_shape_fn((out, features), |(o, g)| {
        // Column g of the NHWC flatten is (y, x, ch) with g = (y * w + x) * c + ch.
        let ch = g % c;
        let x = (g / c) % w;
        let y = g / (c * w);
        weight[[o, (ch * h + y) * w + x]]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fc1_columns_follow_the_nhwc_flatten() {
        let (c, h, w) = (3, 2, 4);
        // Weight row 0 holds each column's own (C, H, W) index.
        let weight = Array2::from_shape_fn((2, c * h * w), |(o, f)| (o * 1000 + f) as f32);
        let permuted = chw_columns_to_hwc(weight.view(), [c, h, w]).unwrap();
        // An activation a[ch, y, x] flattened NCHW at ch*h*w + y*w + x and NHWC at
        // (y*w + x)*c + ch must meet the same weight.
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let chw = (ch * h + y) * w + x;
                    let hwc = (y * w + x) * c + ch;
                    assert_eq!(permuted[[1, hwc]], weight[[1, chw]]);
                }
            }
        }
    }
}
