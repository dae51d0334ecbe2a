//! The whole network on the GPU, built from the same [`Weights`] as the CPU model.

use cudarc::driver::{CudaEvent, CudaSlice, CudaView, HostSlice, PinnedHostSlice};
use half::f16;
use ndarray::{Array2, Array4, ArrayView4, ArrayViewD};

use super::device::{driver_err, Gpu};
use super::dtype::{GpuDtype, GpuFloat};
use super::layers::{
    convert_f16_to_f32, softmax_top_k, Conv2dGpu, ConvOptions, DropoutGpu, LinearGpu, LrnGpu,
    MaxPoolGpu, PrepareInput, TopK,
};
use super::pinned::{alloc_readback, alloc_upload};
use super::pipeline::Pipeline;
use super::tensor::{to_physical, GpuTensor, Layout};
use crate::backend::StageTimings;
use crate::config::{AlexNetConfig, Precision};
use crate::error::{Error, Result};
use crate::image::U8Batch;
use crate::weights::Weights;

/// Settings of a [`CudaModel`]. The default: device 0, true fp32, ImageNet normalisation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// fp32 only: let convolutions and GEMMs use TF32 tensor cores (about 1e-3 relative error,
    /// much faster). Off by default: fp32 is true fp32.
    pub allow_tf32: bool,
    /// The normalisation [`CudaModel::forward_u8`] applies on the GPU (torchvision's ImageNet
    /// mean and std by default).
    pub normalization: PrepareInput,
}

/// One convolution stage: conv + bias (ReLU fused unless an LRN follows, which applies it),
/// optional LRN, optional max-pool.
struct ConvStage<T: GpuFloat> {
    conv: Conv2dGpu<T>,
    lrn: Option<LrnGpu>,
    pool: Option<MaxPoolGpu>,
    /// The CPU model's stage names ("conv1", "lrn1", "pool1"), made once.
    names: [String; 3],
}

/// One fully connected stage: GEMM + bias (+ ReLU), then the classic dropout's inference
/// scaling when the configuration asks for it (inverted dropout is the identity).
struct FcStage<T: GpuFloat> {
    linear: LinearGpu<T>,
    relu: bool,
    eval_dropout: Option<DropoutGpu>,
    name: String,
}

/// The activations of one convolution stage.
struct StageActs<T: GpuFloat> {
    conv: GpuTensor<T>,
    lrn: Option<GpuTensor<T>>,
    pool: Option<GpuTensor<T>>,
}

impl<T: GpuFloat> StageActs<T> {
    fn output(&self) -> &GpuTensor<T> {
        self.pool
            .as_ref()
            .or(self.lrn.as_ref())
            .unwrap_or(&self.conv)
    }
}

/// Every activation buffer for one batch size, allocated once and reused.
struct Activations<T: GpuFloat> {
    n: usize,
    input: GpuTensor<T>,
    stages: Vec<StageActs<T>>,
    fcs: Vec<GpuTensor<T>>,
    /// f16 logits widened to f32 before the download (fp16 mode only).
    logits_f32: Option<CudaSlice<f32>>,
}

/// The network for one storage type.
struct NetT<T: GpuFloat> {
    layout: Layout,
    /// Channels of the device input tensor: the image's 3, or 8 in fp16 NHWC mode.
    input_channels: usize,
    height: usize,
    width: usize,
    convs: Vec<ConvStage<T>>,
    fcs: Vec<FcStage<T>>,
    acts: Option<Activations<T>>,
}

enum Net {
    F32(NetT<f32>),
    F16(NetT<f16>),
}

/// Runs `$body` with `$n` bound to the network of either storage type.
macro_rules! with_net {
    ($net:expr, $n:ident => $body:expr) => {
        match $net {
            Net::F32($n) => $body,
            Net::F16($n) => $body,
        }
    };
}

/// What an observer receives per stage: its name, the tensor, and whether the ReLU still has
/// to be applied (the GPU fuses it into the LRN that follows the convolution).
type Observer<'a, T> = dyn FnMut(&str, &GpuTensor<T>, bool) -> Result<()> + 'a;

/// The user's observer of [`CudaModel::forward_f32_observed`].
type HostObserver<'a> = dyn FnMut(&str, ArrayViewD<'_, f32>) + 'a;

impl<T: GpuFloat> NetT<T> {
    fn build(gpu: &Gpu, weights: &Weights, layout: Layout, allow_tf32: bool) -> Result<Self> {
        let config = weights.config();
        let plan = config.plan()?;
        let input = config.input;
        let input_channels = match layout {
            Layout::Nchw => input.channels,
            Layout::Nhwc => input.channels.div_ceil(8) * 8,
        };
        let mut pools = 0;
        let mut convs = Vec::with_capacity(config.convs.len());
        for (i, (spec, params)) in config.convs.iter().zip(weights.convs()).enumerate() {
            let mut options = ConvOptions::new(spec.stride, spec.padding, layout);
            options.allow_tf32 = allow_tf32;
            if i == 0 {
                options.in_channels = Some(input_channels);
            }
            if spec.pool.is_some() {
                pools += 1;
            }
            convs.push(ConvStage {
                conv: Conv2dGpu::new(gpu, params.weight.view(), params.bias.view(), options)?,
                lrn: spec.lrn.map(LrnGpu::new).transpose()?,
                pool: spec
                    .pool
                    .map(|p| MaxPoolGpu::new(p.kernel, p.stride))
                    .transpose()?,
                names: [
                    format!("conv{}", i + 1),
                    format!("lrn{}", i + 1),
                    format!("pool{pools}"),
                ],
            });
        }
        // The last convolution stage's output [C, H, W], flattened before fc1.
        let flat = plan.flatten_shape();
        let fcs = config
            .fcs
            .iter()
            .zip(weights.fcs())
            .enumerate()
            .map(|(i, (spec, params))| {
                let linear = if i == 0 && layout == Layout::Nhwc {
                    // NHWC activations flatten in (H, W, C) order: reorder fc1's columns from
                    // PyTorch's (C, H, W) so the result is the CPU's.
                    let permuted = chw_columns_to_hwc(params.weight.view(), flat)?;
                    LinearGpu::new(gpu, permuted.view(), params.bias.view(), allow_tf32)?
                } else {
                    LinearGpu::new(gpu, params.weight.view(), params.bias.view(), allow_tf32)?
                };
                let eval_dropout = match (spec.dropout, config.dropout_mode) {
                    (Some(p), crate::config::DropoutMode::Classic) => {
                        Some(DropoutGpu::new(p, config.dropout_mode)?)
                    }
                    _ => None,
                };
                Ok(FcStage {
                    linear,
                    relu: spec.relu,
                    eval_dropout,
                    name: format!("fc{}", i + 1),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(NetT {
            layout,
            input_channels,
            height: input.height,
            width: input.width,
            convs,
            fcs,
            acts: None,
        })
    }

    /// Allocates the activations for batch `n` (dropping those of another size first) and
    /// chooses every convolution's algorithm for it.
    fn ensure(&mut self, gpu: &Gpu, n: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.n == n) {
            return Ok(());
        }
        self.acts = None; // free the old size before allocating the new one
        let layout = self.layout;
        let input = GpuTensor::zeros(
            gpu,
            &[n, self.input_channels, self.height, self.width],
            layout,
        )?;
        let (mut c, mut h, mut w) = (self.input_channels, self.height, self.width);
        let mut stages = Vec::with_capacity(self.convs.len());
        for stage in &mut self.convs {
            stage.conv.prepare(gpu, n, h, w)?;
            (h, w) = stage.conv.output_size(h, w)?;
            c = stage.conv.out_channels();
            let conv = GpuTensor::zeros(gpu, &[n, c, h, w], layout)?;
            let lrn = match stage.lrn {
                Some(_) => Some(GpuTensor::zeros(gpu, &[n, c, h, w], layout)?),
                None => None,
            };
            let pool = match stage.pool {
                Some(p) => {
                    (h, w) = p.output_size(h, w)?;
                    Some(GpuTensor::zeros(gpu, &[n, c, h, w], layout)?)
                }
                None => None,
            };
            stages.push(StageActs { conv, lrn, pool });
        }
        let features = c * h * w;
        let mut fcs = Vec::with_capacity(self.fcs.len());
        let mut width = features;
        for fc in &self.fcs {
            if fc.linear.in_features() != width {
                return Err(Error::invalid(
                    "model",
                    format!(
                        "a linear layer takes {} features where {width} arrive",
                        fc.linear.in_features()
                    ),
                ));
            }
            width = fc.linear.out_features();
            fcs.push(GpuTensor::zeros(gpu, &[n, width], Layout::Nchw)?);
        }
        let logits_f32 = match T::DTYPE {
            GpuDtype::F32 => None,
            GpuDtype::F16 => Some(
                gpu.stream()
                    .alloc_zeros::<f32>(n * width)
                    .map_err(driver_err("allocating the f32 logits"))?,
            ),
        };
        self.acts = Some(Activations {
            n,
            input,
            stages,
            fcs,
            logits_f32,
        });
        Ok(())
    }

    fn acts_mut(&mut self) -> Result<&mut Activations<T>> {
        self.acts
            .as_mut()
            .ok_or_else(|| Error::cuda("CudaModel", "no activation buffers (internal)"))
    }

    /// Uploads a normalised NCHW f32 batch into the input tensor (rounded to `T`, reordered to
    /// the layout, channels past the image's zero).
    fn upload_f32(&mut self, gpu: &Gpu, input: ArrayView4<'_, f32>) -> Result<()> {
        let padded = self.input_channels;
        let acts = self.acts_mut()?;
        let (n, c, h, w) = input.dim();
        let host = if padded == c {
            to_physical::<T>(input.into_dyn(), acts.input.layout())?
        } else {
            let mut full = Array4::<f32>::zeros((n, padded, h, w));
            full.slice_mut(ndarray::s![.., ..c, .., ..]).assign(&input);
            to_physical::<T>(full.view().into_dyn(), acts.input.layout())?
        };
        acts.input.upload_physical(gpu, &host)
    }

    /// Normalises `n` u8 HWC images already on the device into the input tensor.
    fn prepare_u8(&mut self, gpu: &Gpu, src: &CudaView<'_, u8>, norm: &PrepareInput) -> Result<()> {
        let acts = self.acts_mut()?;
        norm.forward(gpu, src, &mut acts.input)
    }

    /// Runs every layer from the input tensor to the logits.
    fn run(&mut self, gpu: &Gpu, observe: &mut Observer<'_, T>) -> Result<()> {
        let acts = self
            .acts
            .as_mut()
            .ok_or_else(|| Error::cuda("CudaModel", "no activation buffers (internal)"))?;
        for (i, stage) in self.convs.iter_mut().enumerate() {
            let (before, rest) = acts.stages.split_at_mut(i);
            let x = match before.last() {
                Some(prev) => prev.output(),
                None => &acts.input,
            };
            let out = &mut rest[0];
            stage
                .conv
                .forward(gpu, x, &mut out.conv, stage.lrn.is_none())?;
            observe(&stage.names[0], &out.conv, stage.lrn.is_some())?;
            if let (Some(lrn), Some(y)) = (&stage.lrn, out.lrn.as_mut()) {
                lrn.forward(gpu, &out.conv, y, true)?;
                observe(&stage.names[1], y, false)?;
            }
            if let (Some(pool), Some(y)) = (&stage.pool, out.pool.as_mut()) {
                let src = out.lrn.as_ref().unwrap_or(&out.conv);
                pool.forward(gpu, src, y)?;
                observe(&stage.names[2], y, false)?;
            }
        }
        let flat = acts
            .stages
            .last()
            .map(StageActs::output)
            .ok_or_else(|| Error::cuda("CudaModel", "no convolution stage (internal)"))?;
        for (j, fc) in self.fcs.iter().enumerate() {
            let (before, rest) = acts.fcs.split_at_mut(j);
            let x = before.last().unwrap_or(flat);
            let y = &mut rest[0];
            fc.linear.forward(gpu, x, y, fc.relu)?;
            if let Some(dropout) = &fc.eval_dropout {
                dropout.forward_eval(gpu, y)?;
            }
            observe(&fc.name, y, false)?;
        }
        Ok(())
    }

    /// Copies the logits (as f32) into `dst`, asynchronously on the compute stream.
    fn download_logits<D: HostSlice<f32> + ?Sized>(
        &mut self,
        gpu: &Gpu,
        dst: &mut D,
    ) -> Result<()> {
        let acts = self.acts_mut()?;
        let Activations {
            fcs, logits_f32, ..
        } = acts;
        let logits = fcs
            .last()
            .ok_or_else(|| Error::cuda("CudaModel", "no linear layer (internal)"))?;
        let len = logits.len();
        if dst.len() < len {
            return Err(Error::cuda(
                "CudaModel",
                format!("logits buffer of {} for {len} logits (internal)", dst.len()),
            ));
        }
        let stream = gpu.stream();
        match T::DTYPE {
            GpuDtype::F32 => {
                // SAFETY: `T::DTYPE == F32` holds only for `T = f32` (GpuFloat is sealed), so
                // the buffer holds `len` f32 values.
                let view = unsafe { logits.data().transmute::<f32>(len) }
                    .ok_or_else(|| Error::cuda("CudaModel", "logits view (internal)"))?;
                stream
                    .memcpy_dtoh(&view, dst)
                    .map_err(driver_err("cuMemcpyDtoH (logits)"))
            }
            GpuDtype::F16 => {
                // SAFETY: `T::DTYPE == F16` holds only for `T = half::f16`.
                let view = unsafe { logits.data().transmute::<f16>(len) }
                    .ok_or_else(|| Error::cuda("CudaModel", "logits view (internal)"))?;
                let wide = logits_f32
                    .as_mut()
                    .ok_or_else(|| Error::cuda("CudaModel", "no f32 logits (internal)"))?;
                convert_f16_to_f32(gpu, &view, wide)?;
                let wide = wide
                    .try_slice(..len)
                    .ok_or_else(|| Error::cuda("CudaModel", "f32 logits view (internal)"))?;
                stream
                    .memcpy_dtoh(&wide, dst)
                    .map_err(driver_err("cuMemcpyDtoH (logits)"))
            }
        }
    }

    /// Fills every activation buffer with NaN (tests: a stage that fails to write shows).
    fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        let acts = self.acts_mut()?;
        acts.input.poison(gpu)?;
        for stage in &mut acts.stages {
            stage.conv.poison(gpu)?;
            if let Some(t) = stage.lrn.as_mut() {
                t.poison(gpu)?;
            }
            if let Some(t) = stage.pool.as_mut() {
                t.poison(gpu)?;
            }
        }
        for t in &mut acts.fcs {
            t.poison(gpu)?;
        }
        Ok(())
    }

    /// Softmax and top-k of the logits into `topk`.
    fn top_k(&mut self, gpu: &Gpu, k: usize, topk: &mut TopK) -> Result<()> {
        let acts = self.acts_mut()?;
        let logits = acts
            .fcs
            .last()
            .ok_or_else(|| Error::cuda("CudaModel", "no linear layer (internal)"))?;
        softmax_top_k(gpu, logits, k, None, topk)
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

/// Host and device I/O buffers of the plain (non-pipelined) path for one batch size.
struct Io {
    n: usize,
    device_u8: CudaSlice<u8>,
    /// Write-combined: written by the host, read by the upload only.
    host_u8: PinnedHostSlice<u8>,
    /// Cached page-locked memory: fast for the host to read.
    host_logits: PinnedHostSlice<f32>,
    topk: TopK,
}

/// CUDA events (with timing) around the three phases of one batch.
pub(crate) struct StageEvents {
    pub h2d_start: CudaEvent,
    pub h2d_end: CudaEvent,
    pub compute_start: CudaEvent,
    pub compute_end: CudaEvent,
    pub d2h_end: CudaEvent,
}

impl StageEvents {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let event = || {
            gpu.context()
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver_err("cuEventCreate"))
        };
        Ok(StageEvents {
            h2d_start: event()?,
            h2d_end: event()?,
            compute_start: event()?,
            compute_end: event()?,
            d2h_end: event()?,
        })
    }

    /// The three durations; waits for the last event.
    pub fn timings(&self) -> Result<StageTimings> {
        let ms = |a: &CudaEvent, b: &CudaEvent| {
            a.elapsed_ms(b)
                .map(f64::from)
                .map_err(driver_err("cuEventElapsedTime"))
        };
        Ok(StageTimings {
            h2d_ms: ms(&self.h2d_start, &self.h2d_end)?,
            compute_ms: ms(&self.compute_start, &self.compute_end)?,
            d2h_ms: ms(&self.compute_end, &self.d2h_end)?,
        })
    }
}

pub(crate) fn record(event: &CudaEvent, stream: &cudarc::driver::CudaStream) -> Result<()> {
    event.record(stream).map_err(driver_err("cuEventRecord"))
}

/// AlexNet on one GPU, built from the same [`Weights`] as [`crate::cpu::CpuModel`] and
/// computing the same function (checked layer by layer in `tests/gpu_*.rs`).
///
/// - [`Precision::Fp32`]: f32 NCHW activations, true fp32 math (cuDNN `CUDNN_FMA_MATH`, cuBLAS
///   `CUBLAS_COMPUTE_32F`) unless [`CudaOptions::allow_tf32`].
/// - [`Precision::Fp16`]: f16 NHWC activations (the input padded to 8 channels, conv1's weights
///   with zero filters for them) on the tensor cores with f32 accumulation; fc1's weight
///   columns are reordered at load so the (H, W, C) flatten gives the CPU's result.
///
/// Activation buffers are allocated on the first batch of a size and reused until the size
/// changes; convolution algorithms are chosen once per batch size ([`CudaModel::prepare`] does
/// both ahead of time). A steady-state forward allocates nothing on the device, creates no
/// descriptor and synchronises once, to hand back the result.
pub struct CudaModel {
    net: Net,
    io: Option<Io>,
    events: StageEvents,
    last_timings: Option<StageTimings>,
    config: AlexNetConfig,
    precision: Precision,
    options: CudaOptions,
    // Last: dropped after every buffer and descriptor that lives on it.
    gpu: Gpu,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("gpu", &self.gpu)
            .field("config", &self.config.name)
            .field("precision", &self.precision)
            .field("options", &self.options)
            .field("batch", &self.io.as_ref().map(|io| io.n))
            .finish_non_exhaustive()
    }
}

impl CudaModel {
    /// Opens GPU `options.device` and uploads `weights` (rounded to f16 in fp16 mode).
    /// [`Error::DeviceUnavailable`] when there is no usable GPU or library.
    pub fn new(weights: &Weights, precision: Precision, options: CudaOptions) -> Result<Self> {
        let gpu = Gpu::new(options.device)?;
        Self::with_gpu(gpu, weights, precision, options)
    }

    /// Like [`CudaModel::new`] on an already opened [`Gpu`] (`options.device` is ignored).
    pub fn with_gpu(
        gpu: Gpu,
        weights: &Weights,
        precision: Precision,
        options: CudaOptions,
    ) -> Result<Self> {
        let config = weights.config().clone();
        config.plan()?;
        PrepareInput::new(options.normalization.mean, options.normalization.std)?;
        let net = match precision {
            Precision::Fp32 => Net::F32(NetT::build(
                &gpu,
                weights,
                Layout::Nchw,
                options.allow_tf32,
            )?),
            Precision::Fp16 => Net::F16(NetT::build(&gpu, weights, Layout::Nhwc, false)?),
        };
        let events = StageEvents::new(&gpu)?;
        Ok(CudaModel {
            net,
            io: None,
            events,
            last_timings: None,
            config,
            precision,
            options,
            gpu,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn config(&self) -> &AlexNetConfig {
        &self.config
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn options(&self) -> &CudaOptions {
        &self.options
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        self.gpu.name()
    }

    /// Sets the normalisation [`CudaModel::forward_u8`] applies.
    pub fn set_normalization(&mut self, normalization: PrepareInput) -> Result<()> {
        self.options.normalization = PrepareInput::new(normalization.mean, normalization.std)?;
        Ok(())
    }

    /// The batch size the buffers are allocated for, if any.
    pub fn batch_size(&self) -> Option<usize> {
        self.io.as_ref().map(|io| io.n)
    }

    /// Allocates every buffer for batch `n` and chooses the convolution algorithms, so the
    /// first timed forward of that size does no set-up. Called by every forward.
    pub fn prepare(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::invalid("batch", "must be at least 1"));
        }
        if self.io.as_ref().is_some_and(|io| io.n == n) {
            return Ok(());
        }
        self.io = None;
        let gpu = &self.gpu;
        with_net!(&mut self.net, net => net.ensure(gpu, n))?;
        let input = self.config.input;
        let image_bytes = input.height * input.width * 3;
        let classes = self.config.num_classes();
        self.io = Some(Io {
            n,
            device_u8: gpu
                .stream()
                .alloc_zeros::<u8>(n * image_bytes)
                .map_err(driver_err("allocating the u8 input"))?,
            host_u8: alloc_upload(gpu.context(), n * image_bytes)?,
            host_logits: alloc_readback(gpu.context(), n * classes)?,
            topk: TopK::new(gpu, n)?,
        });
        Ok(())
    }

    /// Allocates the buffers for batch `n` if needed and fills every activation buffer (input
    /// included) with NaN, so that in a test a stage that fails to write part of its output
    /// shows up as NaN downstream. Not needed in normal use.
    pub fn poison_buffers(&mut self, n: usize) -> Result<()> {
        self.prepare(n)?;
        let gpu = &self.gpu;
        with_net!(&mut self.net, net => net.poison(gpu))
    }

    fn check_f32_input(&self, input: &ArrayView4<'_, f32>) -> Result<usize> {
        let want = self.config.input;
        let (n, c, h, w) = input.dim();
        if (c, h, w) != (want.channels, want.height, want.width) || n == 0 {
            return Err(Error::Shape {
                op: "CudaModel::forward_f32",
                expected: format!(
                    "[N >= 1, {}, {}, {}]",
                    want.channels, want.height, want.width
                ),
                found: input.shape().to_vec(),
            });
        }
        Ok(n)
    }

    /// Logits `[N, classes]` for a normalised NCHW batch from the host (the path for checking
    /// against the CPU; [`CudaModel::forward_u8`] is the fast one).
    pub fn forward_f32(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        self.forward_f32_impl(input, None)
    }

    /// Like [`CudaModel::forward_f32`], calling `observe(stage, activation)` after every stage
    /// with the same names and meaning as [`crate::cpu::CpuModel::forward_observed`] ("conv1"
    /// after its ReLU, "lrn1", "pool1", ..., "fc3"), activations downloaded as logical NCHW f32.
    /// Synchronises after every stage: for debugging and tests, not for speed.
    pub fn forward_f32_observed(
        &mut self,
        input: ArrayView4<'_, f32>,
        mut observe: impl FnMut(&str, ArrayViewD<'_, f32>),
    ) -> Result<Array2<f32>> {
        self.forward_f32_impl(input, Some(&mut observe))
    }

    fn forward_f32_impl(
        &mut self,
        input: ArrayView4<'_, f32>,
        observe: Option<&mut HostObserver<'_>>,
    ) -> Result<Array2<f32>> {
        let n = self.check_f32_input(&input)?;
        self.prepare(n)?;
        let gpu = &self.gpu;
        let stream = gpu.stream();
        record(&self.events.h2d_start, stream)?;
        with_net!(&mut self.net, net => net.upload_f32(gpu, input))?;
        record(&self.events.h2d_end, stream)?;
        record(&self.events.compute_start, stream)?;
        match observe {
            None => with_net!(&mut self.net, net => net.run(gpu, &mut |_, _, _| Ok(()))),
            Some(user) => with_net!(&mut self.net, net => net.run(gpu, &mut |name, t, relu| {
                let mut host = t.to_host(gpu)?;
                if relu {
                    host.mapv_inplace(|v| if v < 0.0 { 0.0 } else { v });
                }
                user(name, host.view());
                Ok(())
            })),
        }?;
        record(&self.events.compute_end, stream)?;
        self.finish_logits(n)
    }

    /// Copies the logits into the page-locked buffer, waits, and returns them.
    fn finish_logits(&mut self, n: usize) -> Result<Array2<f32>> {
        let gpu = &self.gpu;
        let io = self
            .io
            .as_mut()
            .ok_or_else(|| Error::cuda("CudaModel", "no I/O buffers (internal)"))?;
        with_net!(&mut self.net, net => net.download_logits(gpu, &mut io.host_logits))?;
        record(&self.events.d2h_end, gpu.stream())?;
        self.events
            .d2h_end
            .synchronize()
            .map_err(driver_err("cuEventSynchronize"))?;
        let values = io
            .host_logits
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))?
            .to_vec();
        self.last_timings = Some(self.events.timings()?);
        Array2::from_shape_vec((n, self.config.num_classes()), values)
            .map_err(|e| Error::invalid("logits", e.to_string()))
    }

    /// Checks that `batch` fits the model's input and returns its size.
    pub(crate) fn check_u8_batch(&self, batch: &U8Batch, op: &'static str) -> Result<usize> {
        let want = self.config.input;
        let side = batch.crop() as usize;
        if want.channels != 3 || side != want.height || side != want.width || batch.is_empty() {
            return Err(Error::Shape {
                op,
                expected: format!(
                    "N >= 1 RGB images of {}x{} (the model's input {}x{}x{})",
                    want.height, want.width, want.channels, want.height, want.width
                ),
                found: batch.shape().to_vec(),
            });
        }
        Ok(batch.len())
    }

    /// Uploads `batch` through the page-locked buffer and runs the network (not the download).
    fn run_u8(&mut self, batch: &U8Batch, op: &'static str) -> Result<usize> {
        let n = self.check_u8_batch(batch, op)?;
        self.prepare(n)?;
        let gpu = &self.gpu;
        let stream = gpu.stream();
        let io = self
            .io
            .as_mut()
            .ok_or_else(|| Error::cuda("CudaModel", "no I/O buffers (internal)"))?;
        // Waits for the previous upload from this buffer, then writes (write-combined memory:
        // a sequential copy, never read).
        io.host_u8
            .as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))?
            .copy_from_slice(batch.as_slice());
        record(&self.events.h2d_start, stream)?;
        stream
            .memcpy_htod(&io.host_u8, &mut io.device_u8)
            .map_err(driver_err("cuMemcpyHtoDAsync (images)"))?;
        record(&self.events.h2d_end, stream)?;
        record(&self.events.compute_start, stream)?;
        let norm = self.options.normalization;
        let src = io.device_u8.as_view();
        with_net!(&mut self.net, net => {
            net.prepare_u8(gpu, &src, &norm)?;
            net.run(gpu, &mut |_, _, _| Ok(()))
        })?;
        Ok(n)
    }

    /// Logits `[N, classes]` for a batch of u8 HWC images (the fast path: 4x fewer bytes
    /// uploaded through page-locked memory, normalised on the GPU with
    /// [`CudaOptions::normalization`]).
    pub fn forward_u8(&mut self, batch: &U8Batch) -> Result<Array2<f32>> {
        let n = self.run_u8(batch, "CudaModel::forward_u8")?;
        record(&self.events.compute_end, self.gpu.stream())?;
        self.finish_logits(n)
    }

    /// The `k` most probable classes of every image, most probable first, as
    /// `(class, probability)`: softmax and top-k run on the GPU and only these leave it.
    /// `1 <= k <= min(classes, 32)`.
    pub fn top_k_u8(&mut self, batch: &U8Batch, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let classes = self.config.num_classes();
        if k == 0 || k > classes.min(TopK::MAX_K) {
            return Err(Error::invalid(
                "top-k",
                format!(
                    "k = {k} (need 1 <= k <= {} on the GPU)",
                    classes.min(TopK::MAX_K)
                ),
            ));
        }
        self.run_u8(batch, "CudaModel::top_k_u8")?;
        let gpu = &self.gpu;
        let io = self
            .io
            .as_mut()
            .ok_or_else(|| Error::cuda("CudaModel", "no I/O buffers (internal)"))?;
        with_net!(&mut self.net, net => net.top_k(gpu, k, &mut io.topk))?;
        record(&self.events.compute_end, gpu.stream())?;
        io.topk.start_download(gpu)?;
        record(&self.events.d2h_end, gpu.stream())?;
        self.events
            .d2h_end
            .synchronize()
            .map_err(driver_err("cuEventSynchronize"))?;
        let top = io.topk.read_downloaded()?;
        self.last_timings = Some(self.events.timings()?);
        Ok(top)
    }

    /// CUDA-event timings of the last batch: upload, compute (input preparation to logits),
    /// download.
    pub fn last_timings(&self) -> Option<StageTimings> {
        self.last_timings
    }

    /// An overlapped pipeline for batches of up to `max_batch` images: two page-locked input
    /// slots, uploads on the copy stream overlapping the previous batch's compute.
    pub fn pipeline(&mut self, max_batch: usize) -> Result<Pipeline<'_>> {
        Pipeline::new(self, max_batch)
    }

    // --- for the pipeline -------------------------------------------------------------------

    pub(crate) fn set_last_timings(&mut self, t: StageTimings) {
        self.last_timings = Some(t);
    }

    /// Prepares buffers for `n` and runs the network on `n` images already on the device.
    pub(crate) fn compute_device_u8(&mut self, src: &CudaView<'_, u8>, n: usize) -> Result<()> {
        self.prepare(n)?;
        let gpu = &self.gpu;
        let norm = self.options.normalization;
        with_net!(&mut self.net, net => {
            net.prepare_u8(gpu, src, &norm)?;
            net.run(gpu, &mut |_, _, _| Ok(()))
        })
    }

    /// Queues the download of the last logits into `dst` (asynchronous).
    pub(crate) fn download_logits_into(&mut self, dst: &mut [f32]) -> Result<()> {
        let gpu = &self.gpu;
        with_net!(&mut self.net, net => net.download_logits(gpu, dst))
    }
}

impl crate::backend::Backend for CudaModel {
    fn device_name(&self) -> String {
        self.gpu.name().to_string()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn config(&self) -> &AlexNetConfig {
        &self.config
    }

    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        self.forward_f32(input)
    }

    fn forward_u8(
        &mut self,
        batch: &U8Batch,
        pre: &crate::image::Preprocess,
    ) -> Result<Array2<f32>> {
        self.set_normalization(PrepareInput::new(pre.mean, pre.std)?)?;
        CudaModel::forward_u8(self, batch)
    }

    fn last_stage_timings(&self) -> Option<StageTimings> {
        self.last_timings
    }

    fn is_gpu(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_can_move_to_another_thread() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<CudaModel>();
        send::<Gpu>();
        sync::<Gpu>();
    }

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
