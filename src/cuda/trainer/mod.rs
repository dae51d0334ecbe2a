//! Training on the GPU: [`CudaTrainer`], the GPU twin of [`crate::train::CpuTrainer`]. The same
//! stages as the CPU model (the plan's), each keeping its input on the device for the backward;
//! the layers' backward through cuDNN and cuBLAS and the crate's kernels; every trainable
//! tensor's gradient in one flat f32 buffer and the momentum in another (each weight at an
//! aligned offset: `flat_layout`), updated by one SGD launch. The weights, the momentum and
//! the step's dropout masks are the CPU's, so a run can move between the devices through a
//! checkpoint.
//!
//! Precisions: true fp32 (the default), TF32 (fp32 storage, TF32 tensor-core math in cuDNN and
//! cuBLAS) and mixed precision ([`Precision::Fp16`]: f16 layers, activations and gradients,
//! f32 master weights and momentum, the loss scaled by a dynamic [`LossScale`] and a step
//! skipped when its gradients overflow, as PyTorch's `autocast` + `GradScaler`;
//! [`Precision::Bf16`]: the same in bf16, on compute capability 8.0 or newer. bf16 has f32's
//! range, so its loss scale seldom matters, but it is kept: one code path, and a step whose
//! gradients are not finite is still skipped).
//!
//! From the second step at a batch size the step's work (forward, loss, backward, unscaling,
//! update) is one CUDA graph launch ([`CudaTrainOptions::eager`] turns that off). The learning
//! rate, loss scale and first-step flag are read on the device, so a schedule that changes the
//! rate every step, or the loss scale's growth and backoff, replays the same graph.
//! [`Trainer::step_buffer_prefetch`] uploads
//! the next batch on the copy stream while a step computes (`prefetch`).
//! [`CudaTrainer::step_profiled`] times one step phase by phase on the device
//! ([`StepProfile`]).
//!
//! `tests/gpu_training.rs` checks it against the CPU trainer step by step. On an H200 (the one
//! GPU run so far) its fp32 steps kept to the GEMM-family convolutions (then the default) and
//! every layer's backward matched the CPU; the mixed-precision and TF32 whole steps, fp32 with
//! FFT and Winograd allowed (now the default), non-deterministic algorithms, batches sent
//! ahead, profiling and a restored loss scale have not run on a GPU to the end yet.

mod flat_layout;
mod net;
mod param_layout;
mod precision;
mod prefetch;
mod profile;

use half::{bf16, f16};
use ndarray::ArrayView4;

use self::net::{Net, NetOptions, StepInput, StepOutcome};
use self::precision::BatchSource;
use self::prefetch::Prefetch;
use self::profile::StepMarks;
pub use self::profile::{StepPhase, StepProfile};
use super::device::Gpu;
use super::graph::GraphStatus;
use super::model::{CudaModel, CudaOptions};
use super::pinned::alloc_upload;
use super::self_test::{check_training, TrainingChecks};
use super::tensor::Layout;
use crate::config::AlexNetConfig;
use crate::error::{Error, Result};
use crate::image::Preprocess;
use crate::train::{
    evaluate, BatchBuffer, Evaluation, ImageFolder, LossScale, SavedLossScale, SgdConfig, Trainer,
};
use crate::weights::Weights;
use crate::Precision;

/// How a [`CudaTrainer`] trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CudaTrainOptions {
    /// The GPU's ordinal.
    pub device: usize,
    /// `Fp32` (true fp32), `Tf32` (TF32 math), `Fp16` or `Bf16` (mixed precision; bf16 on
    /// compute capability 8.0 or newer, else [`Error::DeviceUnavailable`]).
    pub precision: Precision,
    /// True fp32 only: keep the convolutions, forward and backward, to cuDNN's GEMM-family
    /// algorithms, no FFT or Winograd; see [`CudaOptions::fp32_gemm_only`]. Off by default
    /// (every algorithm without tensor cores, as PyTorch's fp32 with TF32 off); another
    /// precision with it is an error.
    pub fp32_gemm_only: bool,
    /// Prefer deterministic convolution algorithms, so the same step gives the same weights
    /// within a process (another process measures afresh and may choose other algorithms:
    /// see [`crate::cuda::ConvOptions::deterministic`] and [`CudaTrainer::conv_choices`]).
    /// On by default. Off: cuDNN's fastest
    /// measured backward algorithms even when they sum with atomics, as PyTorch's default
    /// (`cudnn.deterministic` off); the steps then agree with the CPU's within the same
    /// tolerance but not bit for bit from run to run.
    pub deterministic: bool,
    /// The first layers with parameters (conv1, conv2, ...) kept as they are, as in
    /// [`crate::train::CpuTrainer::frozen_layers`].
    pub frozen_layers: usize,
    /// Mixed precision's loss scale and its schedule (ignored in fp32 and TF32).
    pub loss_scale: LossScale,
    /// Launch every step kernel by kernel. Off by default: from the second step at a batch
    /// size the step (forward, loss, backward, update) is one CUDA graph launch.
    pub eager: bool,
    /// Keep the activations channels-last (NHWC, conv1's input padded to 8 channels), the
    /// layout of cuDNN's tensor-core kernels, as PyTorch's `channels_last`; batches, weights,
    /// momentum and checkpoints stay in the CPU's order either way. Off by default (NCHW).
    /// Not yet measured on a GPU against NCHW (see BENCHMARKS.md).
    pub channels_last: bool,
}

impl Default for CudaTrainOptions {
    fn default() -> Self {
        CudaTrainOptions {
            device: 0,
            precision: Precision::Fp32,
            fp32_gemm_only: false,
            deterministic: true,
            frozen_layers: 0,
            loss_scale: LossScale::default(),
            eager: false,
            channels_last: false,
        }
    }
}

/// The most loss scale an fp16 run resumes with: 2^24 times a gradient of 2^-8 already passes
/// f16's 65504, so a larger saved scale (a bf16 run's, grown where nothing overflowed) would
/// only skip steps until it came down.
const FP16_MAX_RESUMED_SCALE: f32 = 16_777_216.0;

/// The network in its storage type.
enum Network {
    /// fp32 or TF32: f32 everywhere.
    Wide(Net<f32>),
    /// Mixed precision: f16 layers, f32 masters.
    Mixed(Net<f16>),
    /// Mixed precision in bf16: bf16 layers, f32 masters (compute capability 8.0 or newer).
    MixedBf16(Net<bf16>),
}

impl Network {
    /// Whether the layers compute in a 16-bit type from f32 masters, with loss scaling.
    fn is_mixed(&self) -> bool {
        matches!(self, Network::Mixed(_) | Network::MixedBf16(_))
    }
}

/// Runs `$body` with `$net` bound to the network whatever its storage type.
macro_rules! with_net {
    ($network:expr, $net:ident => $body:expr) => {
        match $network {
            Network::Wide($net) => $body,
            Network::Mixed($net) => $body,
            Network::MixedBf16($net) => $body,
        }
    };
}

/// The network on the GPU with its SGD optimiser: [`Trainer::step`] runs the forward in
/// training mode, the softmax cross-entropy, the backward and the update, all on the device;
/// only the batch goes up and the loss comes back. A loop that reuses the page-locked buffers
/// of [`Trainer::batch_buffer`] with [`Trainer::step_buffer`] uploads each batch as one DMA,
/// with no copy on the host.
///
/// ```no_run
/// use alexnet_cuda::config::AlexNetConfig;
/// use alexnet_cuda::cuda::{CudaTrainOptions, CudaTrainer};
/// use alexnet_cuda::train::{SgdConfig, Trainer};
/// use alexnet_cuda::{Precision, Weights};
///
/// # fn main() -> alexnet_cuda::Result<()> {
/// let weights = Weights::paper_init(&AlexNetConfig::paper(), 7)?;
/// let options = CudaTrainOptions {
///     precision: Precision::Fp16, // mixed precision: f16 compute, f32 master weights
///     ..CudaTrainOptions::default()
/// };
/// let mut trainer = CudaTrainer::with_options(&weights, SgdConfig::default(), options)?;
/// let batch = ndarray::Array4::<f32>::zeros((8, 3, 224, 224));
/// let loss = trainer.step(batch.view(), &[0, 1, 2, 3, 4, 5, 6, 7], 0)?;
/// println!("loss {loss}, loss scale {:?}", trainer.loss_scale());
/// let trained = trainer.weights()?; // f32, the same names and layout as the CPU's
/// # Ok(())
/// # }
/// ```
pub struct CudaTrainer {
    network: Network,
    config: AlexNetConfig,
    optimiser: SgdConfig,
    options: CudaTrainOptions,
    /// Mixed precision's scale schedule (moves only in mixed precision).
    loss_scale: LossScale,
    /// Steps whose update was skipped because their gradients overflowed.
    skipped_steps: u64,
    /// The next batch, uploaded during the current step ([`Trainer::step_buffer_prefetch`]).
    prefetch: Prefetch,
    /// The inference model [`Trainer::evaluate`] runs, kept between evaluations with its
    /// algorithm choices (its batch buffers are freed after each); built on the first.
    validation: Option<CudaModel>,
    // Last: dropped after every buffer and descriptor that lives on it.
    gpu: Gpu,
}

impl Drop for CudaTrainer {
    fn drop(&mut self) {
        // The fields are dropped next; the step's CUDA graph among them is destroyed by cudarc
        // without binding its context, so make it current on this thread first. A failure
        // leaves nothing better to do (and must not panic).
        let _ = self.gpu.bind();
    }
}

impl std::fmt::Debug for CudaTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTrainer")
            .field("config", &self.config.name)
            .field("optimiser", &self.optimiser)
            .field("options", &self.options)
            .field("device", &self.gpu.name())
            .finish_non_exhaustive()
    }
}

impl CudaTrainer {
    /// The network of `weights` on GPU `ordinal` in true fp32 (NCHW, no TF32), every layer
    /// trainable, with the optimiser `optimiser` and no momentum yet.
    pub fn new(weights: &Weights, optimiser: SgdConfig, ordinal: usize) -> Result<Self> {
        Self::with_frozen_layers(weights, optimiser, 0, ordinal)
    }

    /// As [`CudaTrainer::new`], with the first `frozen_layers` layers with parameters (conv1,
    /// conv2, ...) frozen as in [`crate::train::CpuTrainer::frozen_layers`]: no gradient is
    /// computed for them or in front of them, and their weights never change.
    pub fn with_frozen_layers(
        weights: &Weights,
        optimiser: SgdConfig,
        frozen_layers: usize,
        ordinal: usize,
    ) -> Result<Self> {
        let options = CudaTrainOptions {
            device: ordinal,
            frozen_layers,
            ..CudaTrainOptions::default()
        };
        Self::with_options(weights, optimiser, options)
    }

    /// The network of `weights` trained as `options` say. Mixed precision keeps f32 masters of
    /// every parameter, so [`Trainer::weights`] gives back f32 values, never f16- or bf16-rounded ones.
    ///
    /// Before the network is built, the convolution (forward, and backward unless every
    /// convolution is frozen) and the linear layers' backward are self-tested in `options`'
    /// precision and layout on tiny operands against the CPU: a cuDNN or cuBLAS that cannot run
    /// them is [`Error::DeviceUnavailable`] here, not an error in the first step.
    pub fn with_options(
        weights: &Weights,
        optimiser: SgdConfig,
        options: CudaTrainOptions,
    ) -> Result<Self> {
        // The same checks as the CPU optimiser (finite, non-negative settings).
        crate::train::Sgd::new(optimiser)?;
        if options.fp32_gemm_only && options.precision != Precision::Fp32 {
            return Err(Error::invalid(
                "fp32_gemm_only",
                format!(
                    "applies to true fp32 only, not {}: TF32, fp16 and bf16 pick from every algorithm",
                    options.precision
                ),
            ));
        }
        let config = weights.config().clone();
        let plan = config.plan()?;
        let layers = plan.stages.iter().filter(|s| s.params.is_some()).count();
        if options.frozen_layers >= layers {
            return Err(Error::invalid(
                "frozen layers",
                format!(
                    "{} of the model's {layers} layers with parameters: nothing would train",
                    options.frozen_layers
                ),
            ));
        }
        let gpu = Gpu::new(options.device)?;
        let frozen = options.frozen_layers;
        let math = NetOptions {
            allow_tf32: options.precision == Precision::Tf32,
            fp32_gemm_only: options.fp32_gemm_only,
            deterministic: options.deterministic,
            graphs: !options.eager,
            layout: match options.channels_last {
                true => Layout::Nhwc,
                false => Layout::Nchw,
            },
        };
        // The trainer's passes are self-tested in its precision and layout before the
        // network's memory is taken (fp32's and fp16's forward GEMMs were when the GPU opened);
        // the convolution's backward only where a convolution trains (the layers with
        // parameters freeze from the first, and the convolutions come first).
        let checks = TrainingChecks {
            conv: math.conv(1, 1),
            conv_backward: frozen < plan.convs().count(),
        };
        let network = match options.precision {
            Precision::Fp16 => {
                check_training::<f16>(&gpu, checks)?;
                Network::Mixed(Net::new(&gpu, weights, &optimiser, frozen, math)?)
            }
            Precision::Fp32 | Precision::Tf32 => {
                check_training::<f32>(&gpu, checks)?;
                Network::Wide(Net::new(&gpu, weights, &optimiser, frozen, math)?)
            }
            Precision::Bf16 => {
                super::self_test::check_bf16_capable(&gpu)?;
                check_training::<bf16>(&gpu, checks)?;
                Network::MixedBf16(Net::new(&gpu, weights, &optimiser, frozen, math)?)
            }
        };
        Ok(CudaTrainer {
            network,
            config,
            optimiser,
            options,
            loss_scale: options.loss_scale,
            skipped_steps: 0,
            prefetch: Prefetch::new(&gpu)?,
            validation: None,
            gpu,
        })
    }

    /// The activations' layout: NHWC with [`CudaTrainOptions::channels_last`], else NCHW.
    pub fn layout(&self) -> Layout {
        match &self.network {
            Network::Wide(net) => net.layout(),
            Network::Mixed(net) => net.layout(),
            Network::MixedBf16(net) => net.layout(),
        }
    }

    /// The GPU it trains on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn optimiser(&self) -> &SgdConfig {
        &self.optimiser
    }

    pub fn frozen_layers(&self) -> usize {
        self.options.frozen_layers
    }

    /// The precision it trains in.
    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// Mixed precision: the loss scale of the next step (`None` in fp32 and TF32).
    pub fn loss_scale(&self) -> Option<f32> {
        self.network.is_mixed().then(|| self.loss_scale.scale())
    }

    /// Whether the steps at the current batch size replay a CUDA graph (see
    /// [`CudaTrainOptions::eager`]).
    pub fn graph_status(&self) -> GraphStatus {
        with_net!(&self.network, net => net.graph_status())
    }

    /// Mixed precision: the steps whose update was skipped because their scaled gradients
    /// overflowed (the loss scale was halved each time); always 0 in fp32 and TF32.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The convolutions' algorithm choices so far (forward, backward data, backward filter
    /// per layer and input shape) with cuDNN's own measurements behind each, one line apiece:
    /// the chosen algorithm's time and the fastest candidate's where another was faster, and
    /// why that one was passed over (non-deterministic, a transform with `fp32_gemm_only`,
    /// tensor-op math in true fp32). Empty before the first step. Beside a [`StepProfile`] it says where the
    /// convolutions' time comes from.
    pub fn conv_choices(&self) -> Vec<String> {
        with_net!(&self.network, net => net.conv_choices())
    }

    /// [`Trainer::step_buffer`] with the time of each of its phases on the GPU (upload, every
    /// stage's forward and backward, loss, update; see [`StepProfile`]): a real step (the
    /// weights move, the step counts for the loss scale), run eagerly with a CUDA event after
    /// each phase, whatever [`CudaTrainOptions::eager`] says. Profile after at least one step
    /// at this batch size: the first chooses the convolution algorithms, and its figures show
    /// that search.
    ///
    /// ```no_run
    /// # use alexnet_cuda::{config::AlexNetConfig, Weights};
    /// # use alexnet_cuda::cuda::CudaTrainer;
    /// # use alexnet_cuda::train::{SgdConfig, Trainer};
    /// # fn main() -> alexnet_cuda::Result<()> {
    /// # let weights = Weights::paper_init(&AlexNetConfig::paper(), 7)?;
    /// let mut trainer = CudaTrainer::new(&weights, SgdConfig::default(), 0)?;
    /// let mut buffer = trainer.batch_buffer(128)?; // page-locked, as `train` uses
    /// buffer.set_labels((0..128).map(|i| i % 1000).collect());
    /// trainer.step_buffer(&buffer, 0)?; // chooses the algorithms
    /// let (loss, profile) = trainer.step_profiled(&buffer, 1)?;
    /// println!("loss {loss}\n{profile}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn step_profiled(
        &mut self,
        buffer: &BatchBuffer,
        step_seed: u64,
    ) -> Result<(f32, StepProfile)> {
        let mut marks = StepMarks::start(&self.gpu)?;
        let op = "CudaTrainer::step_profiled";
        let loss = self.step_on_buffer(op, buffer, step_seed, Some(&mut marks), None)?;
        Ok((loss, marks.finish()?))
    }
}

/// Where a step's batch is on the host.
#[derive(Clone, Copy)]
enum HostBatch<'a> {
    Array(ArrayView4<'a, f32>),
    /// A buffer of [`Trainer::batch_buffer`]'s or any other; it may have been staged ahead.
    Buffer(&'a BatchBuffer),
}

impl CudaTrainer {
    /// A step on `buffer` (its shape, and `next`'s, checked for `op`), `next` uploaded ahead
    /// during it.
    fn step_on_buffer(
        &mut self,
        op: &'static str,
        buffer: &BatchBuffer,
        step_seed: u64,
        marks: Option<&mut StepMarks>,
        next: Option<&BatchBuffer>,
    ) -> Result<f32> {
        let n = self.config.input.check_batch(op, &buffer.shape())?;
        if let Some(next) = next {
            self.config.input.check_batch(op, &next.shape())?;
        }
        let batch = HostBatch::Buffer(buffer);
        self.step_from(batch, n, buffer.labels(), step_seed, marks, next)
    }

    /// The step behind [`Trainer::step`], [`Trainer::step_buffer`],
    /// [`Trainer::step_buffer_prefetch`] and [`CudaTrainer::step_profiled`] (`marks`): `n`
    /// images from `batch` (shape checked by the caller) and their labels. A buffer whose
    /// copy the previous step staged on the device is read from there; any other goes up
    /// first: page-locked memory with one DMA, anything else through the driver's staging
    /// copy. Once the step is queued, `next` starts up on the copy stream; then the loss comes
    /// back.
    fn step_from(
        &mut self,
        batch: HostBatch<'_>,
        n: usize,
        labels: &[usize],
        step_seed: u64,
        mut marks: Option<&mut StepMarks>,
        next: Option<&BatchBuffer>,
    ) -> Result<f32> {
        let classes = self.config.num_classes();
        if labels.len() != n {
            return Err(Error::Shape {
                op: "CudaTrainer::step",
                expected: format!("{n} labels, one per image"),
                found: vec![labels.len()],
            });
        }
        let device_labels = labels
            .iter()
            .map(|&l| match u32::try_from(l) {
                Ok(v) if l < classes => Ok(v),
                _ => Err(Error::invalid(
                    "label",
                    format!("{l} is not a class of this {classes}-class network"),
                )),
            })
            .collect::<Result<Vec<u32>>>()?;
        let mixed = self.network.is_mixed();
        let scale = if mixed { self.loss_scale.scale() } else { 1.0 };
        let CudaTrainer {
            network,
            config,
            optimiser,
            prefetch,
            gpu,
            ..
        } = self;
        // Before the step is queued, so that a first allocation's sync finds an idle stream.
        // Without the device memory for a staging buffer the next batch is not sent ahead: it
        // goes up with its own step, as through `step_buffer`.
        let next = match next {
            Some(next) => match prefetch.prepare(gpu, next) {
                Ok(()) => Some(next),
                Err(Error::OutOfMemory { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let source = match batch {
            HostBatch::Array(array) => BatchSource::Host(array),
            HostBatch::Buffer(buffer) => match prefetch.take(buffer) {
                Some(staged) => BatchSource::Staged(staged),
                None => match buffer.page_locked_images() {
                    Some(memory) => BatchSource::PageLocked(memory),
                    None => BatchSource::Host(buffer.images()?),
                },
            },
        };
        let input = StepInput {
            batch: source,
            labels: &device_labels,
            step_seed,
            optimiser,
            scale,
        };
        let submitted =
            with_net!(&mut *network, net => net.submit(gpu, config, input, marks.as_deref_mut()));
        if let Err(e) = submitted {
            // The batch (page-locked memory too, given as an array) may still be being copied,
            // and it is the caller's again once this returns. A failed wait adds nothing to the
            // first error.
            let _ = gpu.stream().synchronize();
            return Err(e);
        }
        // The step is queued: whatever happens to the upload, its outcome is read back and
        // counted before any error is returned.
        let sent = next.map(|next| prefetch.send(gpu, next));
        let finished = with_net!(network, net => net.finish(gpu, marks));
        // The caller may refill or free `next` once this returns, and nothing else guards its
        // page-locked memory: the upload must be over (it ran beside the step).
        let uploaded = match sent {
            Some(_) => prefetch.wait_for_uploads(gpu),
            None => Ok(()),
        };
        if finished.is_err() {
            // A failed wait for the step may leave it running, reading the batch (page-locked
            // memory too) that is the caller's again once this returns.
            let _ = gpu.stream().synchronize();
        }
        let StepOutcome { loss, overflowed } = finished?;
        if mixed {
            self.loss_scale.update(overflowed);
        }
        if overflowed {
            self.skipped_steps += 1;
        }
        sent.transpose()?;
        uploaded?;
        Ok(loss)
    }
}

impl Trainer for CudaTrainer {
    /// Also in mixed precision the returned loss is the f32 loss of the f16 or bf16 logits; a step
    /// whose gradients overflowed changes no weight and no momentum (see
    /// [`CudaTrainer::skipped_steps`]).
    fn step(
        &mut self,
        batch: ArrayView4<'_, f32>,
        labels: &[usize],
        step_seed: u64,
    ) -> Result<f32> {
        let n = self
            .config
            .input
            .check_batch("CudaTrainer::step", batch.shape())?;
        self.step_from(HostBatch::Array(batch), n, labels, step_seed, None, None)
    }

    /// Page-locked (write-combined) host memory on this trainer's GPU: a step uploads it with
    /// one asynchronous DMA and no host copy, and returns only after every copy from it (its
    /// own, and a batch sent ahead) has finished, so it may be refilled as soon as the step
    /// returns.
    /// Write it, never read it back on the host (reads of write-combined memory are slow).
    fn batch_buffer(&self, batch: usize) -> Result<BatchBuffer> {
        let input = &self.config.input;
        let shape = [batch, input.channels, input.height, input.width];
        let len = shape.iter().product::<usize>();
        BatchBuffer::page_locked(alloc_upload(self.gpu.context(), len)?, shape)
    }

    /// As [`Trainer::step`]; a page-locked buffer (from [`Trainer::batch_buffer`]) goes up
    /// straight from its memory, any other through the driver's staging copy.
    fn step_buffer(&mut self, buffer: &BatchBuffer, step_seed: u64) -> Result<f32> {
        self.step_on_buffer("CudaTrainer::step_buffer", buffer, step_seed, None, None)
    }

    /// As [`Trainer::step_buffer`]; a page-locked `next` (from [`Trainer::batch_buffer`])
    /// goes up on the copy stream while this step computes, into a device buffer with room
    /// for the largest batch sent so far (allocated on first use, and again only for a larger
    /// batch; an epoch's short last batch fits in it), and the following step on it
    /// starts from there. The step returns once both its compute and that upload are done. A
    /// `next` in ordinary memory, or one for which the device has no memory to spare, is
    /// uploaded by its own step.
    fn step_buffer_prefetch(
        &mut self,
        buffer: &BatchBuffer,
        step_seed: u64,
        next: Option<&BatchBuffer>,
    ) -> Result<f32> {
        const OP: &str = "CudaTrainer::step_buffer_prefetch";
        self.step_on_buffer(OP, buffer, step_seed, None, next)
    }

    fn config(&self) -> &AlexNetConfig {
        &self.config
    }

    fn learning_rate(&self) -> f32 {
        self.optimiser.learning_rate
    }

    /// A new learning rate for the next steps (a schedule); the momentum is kept.
    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()> {
        let changed = SgdConfig {
            learning_rate,
            ..self.optimiser
        };
        crate::train::Sgd::new(changed)?;
        self.optimiser = changed;
        Ok(())
    }

    /// The current parameters as [`Weights`], read back from the device in the CPU's layout
    /// and names (to save, to evaluate, or to go on training on the CPU); in mixed precision
    /// the f32 masters.
    fn weights(&self) -> Result<Weights> {
        with_net!(&self.network, net => net.weights(&self.gpu, &self.config))
    }

    /// The momentum of every trainable tensor, in network order (empty before the first
    /// applied step): what [`crate::train::Sgd::velocity`] holds on the CPU, for checkpoints.
    fn velocity(&self) -> Result<Vec<Vec<f32>>> {
        with_net!(&self.network, net => net.velocity(&self.gpu))
    }

    /// Restores the momentum (from a checkpoint, possibly written by the CPU trainer): one
    /// vector per trainable tensor in network order, or none at all (no momentum yet).
    fn set_velocity(&mut self, velocity: Vec<Vec<f32>>) -> Result<()> {
        with_net!(&mut self.network, net => net.set_velocity(&self.gpu, velocity))
    }

    /// Evaluates with an inference model of the current weights on the same GPU in the
    /// trainer's precision. It is built on the first call and kept: later calls copy the
    /// weights into it ([`CudaModel::load_weights`]) instead of opening handles and measuring
    /// algorithms again. Between calls it holds its weights (about 250 MB in f32, half in
    /// fp16 and bf16) and its library handles, not its batch buffers or workspace
    /// ([`CudaModel::release_buffers`]).
    fn evaluate(
        &mut self,
        folder: &ImageFolder,
        preprocess: &Preprocess,
        batch: usize,
    ) -> Result<Evaluation> {
        let weights = self.weights()?;
        // The last evaluation's model takes the new weights in place (no algorithm search, no
        // new handles); one that fails to is dropped, and the next evaluation builds anew.
        let model = match self.validation.take() {
            Some(mut model) => {
                model.load_weights(&weights)?;
                model
            }
            None => {
                let options = CudaOptions {
                    device: self.gpu.ordinal(),
                    fp32_gemm_only: self.options.fp32_gemm_only,
                    ..CudaOptions::default()
                };
                CudaModel::new(&weights, self.options.precision, options)?
            }
        };
        let model = self.validation.insert(model);
        let evaluated = evaluate(model, folder, preprocess, batch);
        // Until the next evaluation its activations would only hold memory the steps may need.
        let released = model.release_buffers();
        let evaluation = evaluated?;
        released?;
        Ok(evaluation)
    }

    fn loss_scaling(&self) -> Option<(f32, u64)> {
        self.loss_scale().map(|scale| (scale, self.skipped_steps))
    }

    fn saved_loss_scale(&self) -> Option<SavedLossScale> {
        self.network.is_mixed().then(|| SavedLossScale {
            scale: self.loss_scale.scale(),
            good_steps: self.loss_scale.good_steps(),
            skipped_steps: self.skipped_steps,
        })
    }

    /// Mixed precision goes on from the saved scale (with this trainer's schedule:
    /// [`CudaTrainOptions::loss_scale`]'s growth, backoff and interval); fp32 and TF32 ignore
    /// it. fp16 takes at most 2^24: a bf16 run's scale seldom overflows
    /// and may have grown far past anything f16 holds, and each step above would be skipped.
    fn restore_loss_scale(&mut self, saved: SavedLossScale) -> Result<()> {
        if self.network.is_mixed() {
            let scale = match self.network {
                Network::Mixed(_) => saved.scale.min(FP16_MAX_RESUMED_SCALE),
                _ => saved.scale,
            };
            self.loss_scale = self.options.loss_scale.resumed(scale, saved.good_steps)?;
            self.skipped_steps = saved.skipped_steps;
        }
        Ok(())
    }
}
