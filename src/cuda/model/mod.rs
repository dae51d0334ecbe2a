//! The whole network on the GPU, built from the same [`Weights`] as the CPU model.

mod backend;
mod buffers;
mod net;

use std::mem::ManuallyDrop;

use cudarc::driver::{CudaEvent, CudaStream, CudaView, PinnedHostSlice};
use half::{bf16, f16};
use ndarray::{Array2, ArrayView4, ArrayViewD};

use self::buffers::Buffers;
use self::net::{ConvMath, Layers, Net};
use super::device::{driver_err, Gpu};
use super::dtype::GpuFloat;
use super::events::{record, StageEvents};
use super::graph::GraphStatus;
use super::ops::{ConvPlanInfo, PrepareInput, TopK};
use super::tensor::Layout;
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
    /// much faster). Off by default: fp32 is true fp32. With [`Precision::Tf32`] it changes
    /// nothing (that precision is this math); with fp16 it is an error.
    pub allow_tf32: bool,
    /// True fp32 only: keep the convolutions to cuDNN's GEMM-family and direct algorithms, no
    /// FFT or Winograd: closer to the CPU, about half the speed (on an H200, paper batch 128:
    /// 10.40 ms a batch against 4.97 ms, conv2 within 1e-4 of the CPU against 3.5e-3). Off by
    /// default: fp32 picks among every algorithm without tensor cores, as PyTorch's fp32 (TF32
    /// off) does.
    pub fp32_gemm_only: bool,
    /// The normalisation [`CudaModel::forward_u8`] applies on the GPU (torchvision's ImageNet
    /// mean and std by default).
    pub normalization: PrepareInput,
    /// The cap on the one cuDNN workspace all convolutions share; `None`:
    /// [`DEFAULT_CONV_WORKSPACE_LIMIT`](crate::cuda::DEFAULT_CONV_WORKSPACE_LIMIT) (512 MiB).
    /// Algorithms needing more are not considered; a lower cap trades speed for memory.
    pub conv_workspace_limit: Option<usize>,
    /// Launch every forward kernel by kernel instead of replaying a CUDA graph (for profiling
    /// and debugging; the logits are the same). Off by default: the first forward at a batch
    /// size runs eagerly, the second is captured, later ones replay the graph.
    pub eager: bool,
}

impl CudaOptions {
    /// Settings for fp32's math are refused, not ignored, with another precision, and
    /// GEMM-only (a restriction of true fp32) beside TF32 math. `allow_tf32` with `Tf32` says
    /// what the precision already does, and is accepted.
    fn check(&self, precision: Precision) -> Result<()> {
        if self.allow_tf32 && self.fp32_gemm_only {
            return Err(Error::invalid(
                "CudaOptions",
                "fp32_gemm_only restricts true fp32; with allow_tf32 (TF32 math) cuDNN picks \
                 among every algorithm",
            ));
        }
        let fp32_only = [
            (
                "allow_tf32",
                self.allow_tf32 && precision != Precision::Tf32,
            ),
            ("fp32_gemm_only", self.fp32_gemm_only),
        ];
        match fp32_only.iter().find(|(_, set)| *set) {
            Some((name, _)) if precision != Precision::Fp32 => Err(Error::invalid(
                "CudaOptions",
                format!("{name} applies to fp32 only, not {precision}"),
            )),
            _ => Ok(()),
        }
    }
}

/// The network in the model's storage type.
enum TypedNet {
    F32(Net<f32>),
    F16(Net<f16>),
    Bf16(Net<bf16>),
}

/// Runs `$body` with `$net` bound to the network of either storage type.
macro_rules! with_net {
    ($typed:expr, $net:ident => $body:expr) => {
        match $typed {
            TypedNet::F32($net) => $body,
            TypedNet::F16($net) => $body,
            TypedNet::Bf16($net) => $body,
        }
    };
}

/// The user's observer of [`CudaModel::forward_f32_observed`].
type HostObserver<'a> = dyn FnMut(&str, ArrayViewD<'_, f32>) + 'a;

/// AlexNet on one GPU, built from the same [`Weights`] as [`crate::cpu::CpuModel`] and
/// computing the same function (checked layer by layer in `tests/gpu_*.rs`).
///
/// - [`Precision::Fp32`]: f32 NCHW activations, true fp32 math (cuDNN `CUDNN_FMA_MATH`, FFT and
///   Winograd allowed unless [`CudaOptions::fp32_gemm_only`]; cuBLAS `CUBLAS_COMPUTE_32F`)
///   unless [`CudaOptions::allow_tf32`].
/// - [`Precision::Tf32`]: as fp32, with cuDNN's and cuBLAS's TF32 math (what
///   [`CudaOptions::allow_tf32`] turns on for fp32).
/// - [`Precision::Fp16`]: f16 NHWC activations (the input padded to 8 channels, conv1's weights
///   with zero filters for them) on the tensor cores with f32 accumulation; fc1's weight
///   columns are reordered at load so the (H, W, C) flatten gives the CPU's result.
/// - [`Precision::Bf16`]: as fp16 with bfloat16 storage (f32's range, 8 significant bits); needs
///   compute capability 8.0 (Ampere) or newer, else [`Error::DeviceUnavailable`].
///
/// Buffers are allocated on the first batch of a size and reused until the size changes;
/// convolution algorithms are chosen once per batch size ([`CudaModel::prepare`] does both
/// ahead of time). A steady-state forward allocates nothing on the device, creates no
/// descriptor and synchronises once, to hand back the result.
pub struct CudaModel {
    /// Dropped by hand in `Drop`: only once the GPU is done with its page-locked buffers.
    net: ManuallyDrop<TypedNet>,
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
            .field("batch", &self.batch_size())
            .finish_non_exhaustive()
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // The fields are dropped next; a CUDA graph among them is destroyed by cudarc without
        // binding its context, so make it current on this thread first. A failure leaves
        // nothing better to do (and must not panic).
        let _ = self.gpu.bind();
        // A forward that failed part way may have left a copy from or into the network's
        // page-locked buffers queued (cudarc does not track them: see `Gpu::new`): they are
        // freed only once the compute stream is idle. If that wait fails (a broken context),
        // whether a copy still runs is unknown, so the network is leaked rather than freed
        // under a DMA, as `Pipeline`'s slots are.
        if self.gpu.stream().synchronize().is_ok() {
            // SAFETY: dropped exactly once, here; nothing uses `net` after `drop` begins.
            unsafe { ManuallyDrop::drop(&mut self.net) };
        }
    }
}

impl CudaModel {
    /// Opens GPU `options.device` and uploads `weights` (rounded to f16 or bf16 in those modes).
    /// [`Error::DeviceUnavailable`] when there is no usable GPU or library.
    pub fn new(weights: &Weights, precision: Precision, options: CudaOptions) -> Result<Self> {
        options.check(precision)?;
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
        options.check(precision)?;
        let config = weights.config().clone();
        config.plan()?;
        if let Some(limit) = options.conv_workspace_limit {
            gpu.set_conv_workspace_limit(limit)?;
        }
        PrepareInput::new(options.normalization.mean, options.normalization.std)?;
        let net = match precision {
            Precision::Fp32 => {
                let math = ConvMath {
                    allow_tf32: options.allow_tf32,
                    fp32_gemm_only: options.fp32_gemm_only,
                };
                TypedNet::F32(Net::build(&gpu, weights, Layout::Nchw, math)?)
            }
            Precision::Tf32 => {
                TypedNet::F32(Net::build(&gpu, weights, Layout::Nchw, ConvMath::TF32)?)
            }
            Precision::Fp16 => TypedNet::F16(Net::build(
                &gpu,
                weights,
                Layout::Nhwc,
                ConvMath::default(),
            )?),
            Precision::Bf16 => {
                super::self_test::check_bf16_capable(&gpu)?;
                TypedNet::Bf16(Net::build(
                    &gpu,
                    weights,
                    Layout::Nhwc,
                    ConvMath::default(),
                )?)
            }
        };
        let events = StageEvents::new(&gpu)?;
        Ok(CudaModel {
            net: ManuallyDrop::new(net),
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
        with_net!(&*self.net, net => net.batch_size())
    }

    /// Allocates every buffer for batch `n` and chooses the convolution algorithms, so the
    /// first timed forward of that size does no set-up. Called by every forward.
    pub fn prepare(&mut self, n: usize) -> Result<()> {
        check_batch(n)?;
        let gpu = &self.gpu;
        with_net!(&mut *self.net, net => net.ready(gpu, n).map(|_| ()))
    }

    /// Allocates the buffers for batch `n` if needed and fills every activation buffer (input
    /// included) with NaN, so that in a test a stage that fails to write part of its output
    /// shows up as NaN downstream. Not needed in normal use.
    #[doc(hidden)]
    pub fn poison_buffers(&mut self, n: usize) -> Result<()> {
        check_batch(n)?;
        let gpu = &self.gpu;
        with_net!(&mut *self.net, net => {
            let (_, bufs) = net.ready(gpu, n)?;
            bufs.poison(gpu)
        })
    }

    /// Logits `[N, classes]` for a normalised NCHW batch from the host (the path for checking
    /// against the CPU; [`CudaModel::forward_u8`] is the fast one).
    pub fn forward_f32(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        self.forward_f32_impl(input, None)
    }

    /// Like [`CudaModel::forward_f32`], calling `observe(stage, activation)` after every stage
    /// with the same names and meaning as [`crate::cpu::CpuModel::forward_observed`] ("conv1"
    /// after its ReLU, "lrn1", "pool1", ..., "fc3"), activations downloaded as logical NCHW f32.
    /// Synchronises after every stage: for debugging and tests, not for speed. It runs one
    /// kernel per stage, where every other forward runs each convolution's bias, ReLU, LRN and
    /// pooling as one kernel (`ops::ConvEpilogueGpu`); both give the same logits bit for bit.
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
        // `input` may be page-locked memory (a `BatchBuffer`'s images) whose copy is still
        // queued after an error, and it is the caller's again once this returns.
        let result = self.forward_f32_queued(input, observe);
        self.settled(result)
    }

    /// `result`, once the compute stream is idle if it is an error: a call that failed part
    /// way may have left a copy queued from or into page-locked memory, the caller's or the
    /// network's own (which the next call rewrites after waiting on an event the failure may
    /// not have recorded; see `Gpu::new`). A failed wait adds nothing to the first error.
    fn settled<R>(&self, result: Result<R>) -> Result<R> {
        if result.is_err() {
            let _ = self.gpu.stream().synchronize();
        }
        result
    }

    /// [`CudaModel::forward_f32_impl`] up to the logits on the host (a success waits for
    /// everything it queued; an error may leave the batch's copy queued).
    fn forward_f32_queued(
        &mut self,
        input: ArrayView4<'_, f32>,
        observe: Option<&mut HostObserver<'_>>,
    ) -> Result<Array2<f32>> {
        let n = self
            .config
            .input
            .check_batch("CudaModel::forward_f32", input.shape())?;
        let (gpu, events, eager) = (&self.gpu, &self.events, self.options.eager);
        let stream = gpu.stream();
        let logits = with_net!(&mut *self.net, net => {
            let (layers, bufs) = net.ready(gpu, n)?;
            record(&events.h2d_start, stream)?;
            // The copy ends the upload; a relayout on the device (fp16) counts as compute.
            layers.upload_f32(gpu, bufs, input, || {
                record(&events.h2d_end, stream)?;
                record(&events.compute_start, stream)
            })?;
            match observe {
                None => layers.run_forward(gpu, bufs, eager)?,
                Some(user) => layers.run(gpu, bufs, &mut |name, t, relu| {
                    let mut host = t.to_host(gpu)?;
                    if relu {
                        host.mapv_inplace(|v| if v < 0.0 { 0.0 } else { v });
                    }
                    user(name, host.view());
                    Ok(())
                })?,
            }
            record(&events.compute_end, stream)?;
            bufs.download_logits_to_host(gpu)?;
            finish_logits(stream, events, &bufs.host_logits, n, self.config.num_classes())?
        });
        self.last_timings = Some(self.events.timings()?);
        Ok(logits)
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

    /// Logits `[N, classes]` for a batch of u8 HWC images (the fast path: 4x fewer bytes
    /// uploaded through page-locked memory, normalised on the GPU with
    /// [`CudaOptions::normalization`]).
    pub fn forward_u8(&mut self, batch: &U8Batch) -> Result<Array2<f32>> {
        let norm = self.options.normalization;
        self.forward_u8_with(batch, &norm)
    }

    /// [`CudaModel::forward_u8`] with the normalisation `norm` for this batch only.
    pub(super) fn forward_u8_with(
        &mut self,
        batch: &U8Batch,
        norm: &PrepareInput,
    ) -> Result<Array2<f32>> {
        let result = self.forward_u8_queued(batch, norm);
        self.settled(result)
    }

    /// [`CudaModel::forward_u8_with`] (a success waits for everything it queued; an error may
    /// leave the upload or the download queued).
    fn forward_u8_queued(&mut self, batch: &U8Batch, norm: &PrepareInput) -> Result<Array2<f32>> {
        let n = self.check_u8_batch(batch, "CudaModel::forward_u8")?;
        let (gpu, events, eager) = (&self.gpu, &self.events, self.options.eager);
        let stream = gpu.stream();
        let logits = with_net!(&mut *self.net, net => {
            let (layers, bufs) = net.ready(gpu, n)?;
            run_u8(gpu, events, layers, bufs, batch, norm, eager)?;
            record(&events.compute_end, stream)?;
            bufs.download_logits_to_host(gpu)?;
            finish_logits(stream, events, &bufs.host_logits, n, self.config.num_classes())?
        });
        self.last_timings = Some(self.events.timings()?);
        Ok(logits)
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
        let result = self.top_k_u8_queued(batch, k);
        self.settled(result)
    }

    /// [`CudaModel::top_k_u8`] with `k` checked (a success waits for everything it queued; an
    /// error may leave the upload or the download queued).
    fn top_k_u8_queued(&mut self, batch: &U8Batch, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let n = self.check_u8_batch(batch, "CudaModel::top_k_u8")?;
        let norm = self.options.normalization;
        let (gpu, events, eager) = (&self.gpu, &self.events, self.options.eager);
        let stream = gpu.stream();
        let top = with_net!(&mut *self.net, net => {
            let (layers, bufs) = net.ready(gpu, n)?;
            run_u8(gpu, events, layers, bufs, batch, &norm, eager)?;
            bufs.top_k(gpu, k)?;
            record(&events.compute_end, stream)?;
            bufs.topk.start_download(gpu)?;
            record(&events.d2h_end, stream)?;
            events
                .d2h_end
                .synchronize()
                .map_err(driver_err("cuEventSynchronize"))?;
            bufs.topk.read_downloaded()?
        });
        self.last_timings = Some(self.events.timings()?);
        Ok(top)
    }

    /// Switches CUDA graphs off (`true`) or back on for the forwards that follow (see
    /// [`CudaOptions::eager`]); a graph already captured is kept for when they are back on.
    pub fn set_eager(&mut self, eager: bool) {
        self.options.eager = eager;
    }

    /// Whether forwards at the current batch size replay a CUDA graph (see
    /// [`CudaOptions::eager`]); `None` before the first forward.
    pub fn graph_status(&self) -> Option<GraphStatus> {
        if self.options.eager {
            return Some(GraphStatus::Disabled);
        }
        with_net!(&*self.net, net => net.graph_status())
    }

    /// How many batch sizes' algorithm choices a model keeps: coming back to one of the last
    /// this many sizes reuses its algorithms (the same size always computes the same way); older
    /// ones are forgotten and the shared workspace shrinks to what the rest need.
    pub const PLANNED_SIZES: usize = net::PLANNED_SIZES;

    /// Replaces every parameter with `weights`', which must be for this model's network
    /// ([`CudaModel::config`]; another is [`Error::Invalid`]). Nothing is planned or
    /// allocated again: the parameters are copied into the buffers they occupy, so the
    /// algorithm choices, the batch buffers and a captured CUDA graph all stay, and the next
    /// forward computes with the new weights (rounded to f16 in fp16 mode, as in
    /// [`CudaModel::new`]). Much cheaper than a new model, e.g. to evaluate a checkpoint
    /// after each epoch. If it fails part way (a device error) the model holds a mix of old
    /// and new parameters: load again or drop it.
    ///
    /// ```no_run
    /// # fn main() -> alexnet_cuda::Result<()> {
    /// use alexnet_cuda::cuda::{CudaModel, CudaOptions};
    /// use alexnet_cuda::{AlexNetConfig, Precision, Weights};
    ///
    /// let config = AlexNetConfig::paper();
    /// let first = Weights::paper_init(&config, 0)?;
    /// let mut model = CudaModel::new(&first, Precision::Fp16, CudaOptions::default())?;
    /// for epoch in 1..=3 {
    ///     let weights = Weights::load(format!("epoch-{epoch}.safetensors"), Some(&config))?;
    ///     model.load_weights(&weights)?;
    ///     // ... model.forward_u8(&batch) with this epoch's weights
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn load_weights(&mut self, weights: &Weights) -> Result<()> {
        if weights.config() != &self.config {
            return Err(Error::invalid(
                "CudaModel::load_weights",
                format!(
                    "these weights are for another network than this model's ({:?} weights, \
                     a {:?} model: names, layers, shapes or settings differ); another network \
                     needs a new model",
                    weights.config().name,
                    self.config.name
                ),
            ));
        }
        let gpu = &self.gpu;
        let loaded = with_net!(&mut *self.net, net => net.load(gpu, weights));
        self.settled(loaded)
    }

    /// Frees the buffers of the current batch size (activations, page-locked transfer
    /// buffers, the CUDA graph) and the convolution workspace, keeping the weights and every
    /// algorithm choice: the next forward allocates them again (and captures a new graph)
    /// without measuring algorithms. For a model that waits between uses, e.g. validation
    /// between training epochs, so that only its weights hold device memory meanwhile.
    pub fn release_buffers(&mut self) -> Result<()> {
        let gpu = &self.gpu;
        with_net!(&mut *self.net, net => net.release_buffers(gpu))
    }

    /// The cuDNN algorithm each convolution chose, by stage name, for each batch size whose
    /// choices are kept (the last [`CudaModel::PLANNED_SIZES`] sizes run).
    pub fn conv_plans(&self) -> Vec<(String, ConvPlanInfo)> {
        with_net!(&*self.net, net => net.layers().conv_plans())
    }

    /// CUDA-event timings of the last batch: upload, compute (input preparation to logits),
    /// download.
    pub fn last_timings(&self) -> Option<StageTimings> {
        self.last_timings
    }

    // --- for the pipeline -------------------------------------------------------------------

    pub(crate) fn set_last_timings(&mut self, t: StageTimings) {
        self.last_timings = Some(t);
    }

    /// Runs the network on `n` u8 images already on the device, normalised with `norm`, and
    /// queues the logits' download into the first `n` rows of `dst` (asynchronous).
    pub(crate) fn compute_device_u8(
        &mut self,
        src: &CudaView<'_, u8>,
        n: usize,
        norm: &PrepareInput,
        dst: &mut [f32],
        compute_end: &CudaEvent,
    ) -> Result<()> {
        check_batch(n)?;
        let (len, room) = (n * self.config.num_classes(), dst.len());
        let dst = dst.get_mut(..len).ok_or_else(|| Error::Shape {
            op: "CudaModel (logits download)",
            expected: format!("room for {len} logits"),
            found: vec![room],
        })?;
        let (gpu, eager) = (&self.gpu, self.options.eager);
        with_net!(&mut *self.net, net => {
            let (layers, bufs) = net.ready(gpu, n)?;
            bufs.prepare_from(gpu, src, norm)?;
            layers.run_forward(gpu, bufs, eager)?;
            record(compute_end, gpu.stream())?;
            bufs.download_logits(gpu, dst)
        })
    }
}

/// Uploads `batch` through the page-locked buffer, normalises it with `norm` and runs every
/// layer, recording the upload and compute-start events (not the compute end).
fn run_u8<T: GpuFloat>(
    gpu: &Gpu,
    events: &StageEvents,
    layers: &mut Layers<T>,
    bufs: &mut Buffers<T>,
    batch: &U8Batch,
    norm: &PrepareInput,
    eager: bool,
) -> Result<()> {
    let stream = gpu.stream();
    // The host must not rewrite the page-locked input while its last upload may still read it
    // (cudarc's own event for it is off; see `Gpu::new`).
    events
        .h2d_end
        .synchronize()
        .map_err(driver_err("cuEventSynchronize"))?;
    record(&events.h2d_start, stream)?;
    bufs.upload_u8(gpu, batch.as_slice())?;
    record(&events.h2d_end, stream)?;
    record(&events.compute_start, stream)?;
    bufs.prepare_uploaded(gpu, norm)?;
    layers.run_forward(gpu, bufs, eager)
}

fn check_batch(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    Ok(())
}

/// Records the end of the download on `stream`, waits for it and returns the `[n, classes]`
/// logits from the page-locked `host` buffer.
fn finish_logits(
    stream: &CudaStream,
    events: &StageEvents,
    host: &PinnedHostSlice<f32>,
    n: usize,
    classes: usize,
) -> Result<Array2<f32>> {
    record(&events.d2h_end, stream)?;
    events
        .d2h_end
        .synchronize()
        .map_err(driver_err("cuEventSynchronize"))?;
    let values = host.as_slice().map_err(driver_err("cuEventSynchronize"))?;
    let values = values.get(..n * classes).ok_or_else(|| {
        Error::invalid("logits", format!("{n} x {classes} do not fit the buffer"))
    })?;
    Array2::from_shape_vec((n, classes), values.to_vec())
        .map_err(|e| Error::invalid("logits", e.to_string()))
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
}
