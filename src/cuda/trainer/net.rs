//! The trainer's network in one storage type `T`: the plan's stages on the device, each keeping
//! its input for the backward, the parameter gradients, the momentum, and (mixed precision) the
//! f32 master weights. [`super::CudaTrainer`] holds one of these per precision.
//!
//! A step is uploads (batch, labels, dropout seeds, step settings), then everything else queued
//! on the compute stream without a sync ([`Net::compute`]): [`Net::submit`]; then the loss and
//! overflow flag read back: [`Net::finish`]. The middle part is captured as a CUDA graph on the
//! second step at a batch size and replayed after, as the inference forward is
//! (`crate::cuda::graph`); the dropout kernels read their seeds on the device so that a replay
//! draws each step's own masks, and the loss scaling and SGD read the step's learning rate, loss
//! scale and first-step flag there ([`StepSettings`]) so that a replay follows them.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaViewMut};
use ndarray::ArrayView2;

use super::flat_layout::FlatLayout;
use super::param_layout::ParamLayout;
use super::precision::{BatchSource, GradientBuffers, TrainFloat, WideBuffers};
use super::profile::{mark, StepMarks};
use crate::config::{AlexNetConfig, StageOp};
use crate::cpu::layer_seed;
use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::events::{new_event, record};
use crate::cuda::graph::{GraphState, GraphStatus, StreamWork};
use crate::cuda::ops::{
    relu_backward, sgd_step, unscale_gradients, unscale_gradients_in_place, Conv2dGpu, ConvOptions,
    DropoutGpu, LinearGpu, LrnGpu, MaxPoolGpu, Scale, SgdBuffers, SgdSegment, StepSettings,
};
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};
use crate::train::SgdConfig;
use crate::weights::Weights;

/// What one stage runs (in the network's layout).
enum Layer<T: TrainFloat> {
    /// Convolution + bias, then ReLU (as the CPU model's convolution stages).
    Conv(Conv2dGpu<T>),
    Lrn(LrnGpu),
    Pool(MaxPoolGpu),
    /// GEMM + bias (+ ReLU), then dropout with the CPU's mask, its seed at the given slot of
    /// the step's device seeds (the k-th dropout layer's is `layer_seed(step_seed, k)`).
    Linear {
        linear: LinearGpu<T>,
        relu: bool,
        dropout: Option<(DropoutGpu, usize)>,
    },
}

impl<T: TrainFloat> Layer<T> {
    /// The lengths of its weight and bias, for the layers with parameters.
    fn parameter_lens(&self) -> Option<(usize, usize)> {
        match self {
            Layer::Conv(conv) => Some((conv.parameters()[0].len(), conv.out_channels())),
            Layer::Linear { linear, .. } => Some((
                linear.in_features() * linear.out_features(),
                linear.out_features(),
            )),
            Layer::Lrn(_) | Layer::Pool(_) => None,
        }
    }

    fn parameters_mut(&mut self) -> Vec<&mut CudaSlice<T>> {
        match self {
            Layer::Conv(conv) => conv.parameters_mut().into_iter().collect(),
            Layer::Linear { linear, .. } => linear.parameters_mut().into_iter().collect(),
            Layer::Lrn(_) | Layer::Pool(_) => Vec::new(),
        }
    }
}

struct Stage<T: TrainFloat> {
    /// The plan's name for it (`conv1`, `lrn1`, ...), for profiles.
    name: String,
    layer: Layer<T>,
    /// Per-image output shape (`[C, H, W]` or `[features]`).
    output: Vec<usize>,
    /// Where its weight gradient starts in the flat gradient buffer (aligned; its bias
    /// follows), for the trainable layers; `None` for frozen layers and stages without
    /// parameters.
    gradient_at: Option<usize>,
}

/// The step's device buffers for one batch size: every stage's input (the last one is the
/// logits) and a gradient shaped like each, the labels, the per-row losses and, in mixed
/// precision, the f32 buffers around the f16 or bf16 network.
struct StepBuffers<T: TrainFloat> {
    /// The step captured at this batch size: first, so that it is dropped before the buffers
    /// whose addresses it holds.
    graph: GraphState<Baked>,
    batch: usize,
    activations: Vec<GpuTensor<T>>,
    /// The gradient of each stage's input, where one is computed: not for the first trainable
    /// stage's or any before it (the backward stops there), so never for the batch itself.
    gradients: Vec<Option<GpuTensor<T>>>,
    labels: CudaSlice<u32>,
    row_loss: CudaSlice<f64>,
    /// The batch as given (f32 NCHW) where the network's input differs from it in type or
    /// layout, for a batch not staged on the device already.
    staging: Option<GpuTensor<f32>>,
    wide: Option<WideBuffers>,
}

/// What a captured step bakes in from outside its buffers: the shared convolution workspace's
/// address (by generation) and the settings in its kernels' parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Baked {
    workspace_generation: u64,
    run: StepRun,
}

/// One step's batch, labels (checked classes, one per image), dropout seed, optimiser
/// settings and loss scale (1 unless mixed).
pub(super) struct StepInput<'a, 'b> {
    pub batch: BatchSource<'b>,
    pub labels: &'a [u32],
    pub step_seed: u64,
    pub optimiser: &'a SgdConfig,
    pub scale: f32,
}

/// What one step did.
pub(super) struct StepOutcome {
    /// The mean loss before the update.
    pub loss: f32,
    /// Mixed precision: the scaled gradients overflowed and the update was skipped.
    pub overflowed: bool,
}

pub(super) struct Net<T: TrainFloat> {
    stages: Vec<Stage<T>>,
    /// Where the trainable tensors (in network order) lie in the flat gradients and momentum.
    flat: FlatLayout,
    /// Mixed precision: an f32 master of every parameter tensor (frozen ones too, so that
    /// [`Net::weights`] gives back exactly what was given), in network order and the layers'
    /// layout. Empty in fp32, where the layers' own tensors are the masters.
    masters: Vec<CudaSlice<f32>>,
    /// Every parameter tensor's device order (frozen ones too), in network order: the trainable
    /// ones are the last `flat.tensor_count()`.
    param_layouts: Vec<ParamLayout>,
    /// The activations' layout (4-D ones; the linear layers' are rows either way).
    layout: Layout,
    grads: GradientBuffers<T>,
    velocity: CudaSlice<f32>,
    /// Whether `velocity` holds momentum yet (not before the first applied step or a restore).
    has_velocity: bool,
    /// Mixed precision: set by the unscaling when a gradient overflowed; SGD then skips.
    overflow: CudaSlice<u32>,
    /// The step's dropout seeds, one per dropout layer, uploaded before each step.
    seeds: CudaSlice<u64>,
    /// The step's learning rate, loss scale and first-step flag, uploaded before each step and
    /// read on the device, so that a captured step follows them.
    settings: StepSettings,
    dropout_layers: usize,
    /// Whether steps run through a CUDA graph once their shapes are fixed.
    graphs: bool,
    /// Recorded after a queued step; the host sleeps on it (blocking sync) until the step is
    /// done.
    step_done: CudaEvent,
    buffers: Option<StepBuffers<T>>,
}

/// How a [`Net`] computes: TF32 math (f32 only), true fp32 kept to the GEMM-family
/// convolutions (see [`crate::cuda::ConvOptions::fp32_gemm_only`]), deterministic algorithms first
/// ([`crate::cuda::ConvOptions::deterministic`]), steps captured as CUDA graphs.
#[derive(Clone, Copy, Debug)]
pub(super) struct NetOptions {
    pub allow_tf32: bool,
    pub fp32_gemm_only: bool,
    pub deterministic: bool,
    pub graphs: bool,
    /// The activations' layout: NCHW, or NHWC (channels-last) for the tensor cores.
    pub layout: Layout,
}

impl NetOptions {
    /// A convolution's options under these settings, for `stride` and `padding` (the weights'
    /// own input channels).
    pub fn conv(&self, stride: usize, padding: usize) -> ConvOptions {
        ConvOptions {
            allow_tf32: self.allow_tf32,
            fp32_gemm_only: self.fp32_gemm_only,
            deterministic: self.deterministic,
            ..ConvOptions::new(stride, padding, self.layout)
        }
    }
}

/// What a captured step bakes into its kernels' parameters: the graph is replayed only while
/// these stay the same. The learning rate, loss scale and first-step flag are not among them:
/// the kernels read them on the device ([`StepSettings`]).
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepRun {
    /// The optimiser's settings but its learning rate (held at 0 here).
    optimiser: SgdConfig,
}

impl StepRun {
    fn new(optimiser: &SgdConfig) -> Self {
        StepRun {
            optimiser: SgdConfig {
                learning_rate: 0.0,
                ..*optimiser
            },
        }
    }
}

fn no_buffers() -> Error {
    Error::invalid("CudaTrainer::step", "no step buffers")
}

/// A backward that needs the gradient of stage `i`'s input where `StepBuffers` keeps none.
fn no_gradient(i: usize) -> Error {
    Error::invalid(
        "CudaTrainer::step",
        format!("no buffer for the gradient of stage {i}'s input"),
    )
}

/// Channels of the network's input: the batch's own in NCHW, padded to a multiple of 8 in
/// NHWC, where cuDNN's tensor-core kernels want them (as the inference model does).
fn input_channels(config: &AlexNetConfig, layout: Layout) -> usize {
    match layout {
        Layout::Nchw => config.input.channels,
        Layout::Nhwc => config.input.channels.div_ceil(8) * 8,
    }
}

/// Reads a device buffer back as f32.
fn read_back<T: TrainFloat>(stream: &Arc<CudaStream>, tensor: &CudaSlice<T>) -> Result<Vec<f32>> {
    let values = stream
        .clone_dtoh(tensor)
        .map_err(driver_err("read back the parameters"))?;
    Ok(values.into_iter().map(T::to_f32).collect())
}

impl<T: TrainFloat> Net<T> {
    /// The network of `weights` on `gpu` in `options.layout`, the first `frozen_layers` layers
    /// with parameters frozen, computing as `options` say.
    pub fn new(
        gpu: &Gpu,
        weights: &Weights,
        optimiser: &SgdConfig,
        frozen_layers: usize,
        options: NetOptions,
    ) -> Result<Self> {
        let NetOptions {
            allow_tf32,
            graphs,
            layout,
            ..
        } = options;
        let config = weights.config();
        let plan = config.plan()?;
        let input_channels = input_channels(config, layout);
        let mut convs = weights.convs().iter();
        let mut fcs = weights.fcs().iter();
        let missing = |name: &str| Error::invalid("weights", format!("no parameters for {name}"));
        let stream = gpu.stream();
        let upload = |values: &[f32]| {
            stream
                .clone_htod(values)
                .map_err(driver_err("upload the master weights"))
        };
        let mut stages = Vec::with_capacity(plan.stages.len());
        let mut flat = FlatLayout::default();
        let mut masters = Vec::new();
        let mut param_layouts = Vec::new();
        let mut layer_index = 0usize;
        let mut dropout_layers = 0usize;
        for spec in &plan.stages {
            // The layer, and for one with parameters its weight's device layout and the CPU's
            // weight and bias values.
            let (layer, parameters) = match spec.op {
                StageOp::Conv {
                    stride, padding, ..
                } => {
                    let first = layer_index == 0;
                    let params = convs.next().ok_or_else(|| missing(&spec.name))?;
                    let options = ConvOptions {
                        in_channels: first.then_some(input_channels),
                        ..options.conv(stride, padding)
                    };
                    let conv =
                        Conv2dGpu::new(gpu, params.weight.view(), params.bias.view(), options)?;
                    let (out, weight_in, k, _) = params.weight.dim();
                    let weight_layout = ParamLayout::Filter {
                        out,
                        weight_in,
                        k,
                        in_channels: conv.in_channels(),
                        layout,
                    };
                    let host = (
                        params.weight.iter().copied().collect(),
                        params.bias.to_vec(),
                    );
                    (Layer::Conv(conv), Some((weight_layout, host)))
                }
                StageOp::Lrn(params) => (Layer::Lrn(LrnGpu::new(params)?), None),
                StageOp::MaxPool(pool) => (
                    Layer::Pool(MaxPoolGpu::new(pool.kernel, pool.stride)?),
                    None,
                ),
                StageOp::Linear { relu, dropout, .. } => {
                    let first = fcs.len() == weights.fcs().len();
                    let params = fcs.next().ok_or_else(|| missing(&spec.name))?;
                    let (out, features) = params.weight.dim();
                    // NHWC activations flatten in (H, W, C) order: fc1's columns follow.
                    let weight_layout = match first && layout == Layout::Nhwc {
                        true => ParamLayout::HwcColumns {
                            out,
                            chw: plan.flatten_shape(),
                        },
                        false => ParamLayout::Same {
                            len: out * features,
                        },
                    };
                    let host: (Vec<f32>, Vec<f32>) = (
                        params.weight.iter().copied().collect(),
                        params.bias.to_vec(),
                    );
                    let weight = weight_layout.to_device(&host.0)?;
                    let weight = ArrayView2::from_shape((out, features), &weight)
                        .map_err(|e| Error::invalid("weights", e.to_string()))?;
                    let linear = LinearGpu::new(gpu, weight, params.bias.view(), allow_tf32)?;
                    let dropout = match dropout {
                        Some(p) => {
                            dropout_layers += 1;
                            Some((DropoutGpu::new(p, plan.dropout_mode)?, dropout_layers - 1))
                        }
                        None => None,
                    };
                    let layer = Layer::Linear {
                        linear,
                        relu,
                        dropout,
                    };
                    (layer, Some((weight_layout, host)))
                }
            };
            if parameters.is_some() != spec.params.is_some() {
                // The plan and the layers disagree: the tensors' order would shift.
                return Err(Error::invalid(
                    "CudaTrainer",
                    format!("{}: parameters and the plan disagree", spec.name),
                ));
            }
            let mut gradient_at = None;
            if let (Some((weight_layout, (weight, bias))), Some(specs)) = (parameters, &spec.params)
            {
                let tensors = [
                    (&specs.weight.name, weight_layout, weight),
                    (
                        &specs.bias.name,
                        ParamLayout::Same { len: bias.len() },
                        bias,
                    ),
                ];
                if layer_index >= frozen_layers {
                    let [weight, bias] = tensors.each_ref().map(|(name, tensor_layout, _)| {
                        SgdSegment::named(name, tensor_layout.device_len(), optimiser)
                    });
                    gradient_at = Some(flat.push_layer(weight, bias));
                }
                for (_, tensor_layout, host) in tensors {
                    if T::MIXED {
                        masters.push(upload(&tensor_layout.to_device(&host)?)?);
                    }
                    param_layouts.push(tensor_layout);
                }
                layer_index += 1;
            }
            stages.push(Stage {
                name: spec.name.clone(),
                layer,
                output: spec.output.clone(),
                gradient_at,
            });
        }
        let grads = GradientBuffers {
            flat: stream
                .alloc_zeros::<f32>(flat.len())
                .map_err(driver_err("allocate the parameter gradients"))?,
            scaled: match T::MIXED {
                true => Some(
                    stream
                        .alloc_zeros::<T>(flat.len())
                        .map_err(driver_err("allocate the scaled gradients"))?,
                ),
                false => None,
            },
        };
        let velocity = stream
            .alloc_zeros::<f32>(flat.len())
            .map_err(driver_err("allocate the momentum"))?;
        Ok(Net {
            stages,
            flat,
            masters,
            param_layouts,
            layout,
            grads,
            velocity,
            has_velocity: false,
            overflow: stream
                .alloc_zeros::<u32>(1)
                .map_err(driver_err("allocate the overflow flag"))?,
            seeds: stream
                .alloc_zeros::<u64>(dropout_layers.max(1))
                .map_err(driver_err("allocate the dropout seeds"))?,
            settings: StepSettings::new(gpu, optimiser.learning_rate, 1.0, true)?,
            dropout_layers,
            graphs,
            step_done: new_event(gpu)?,
            buffers: None,
        })
    }

    /// The step's buffers for batch `n` of `config`'s input, allocated when the size changes.
    fn buffers_for(&mut self, gpu: &Gpu, config: &AlexNetConfig, n: usize) -> Result<()> {
        if self.buffers.as_ref().is_some_and(|b| b.batch == n) {
            return Ok(());
        }
        // Free the old size's first. The graph among them is destroyed with this thread's
        // context current (cudarc's graph destructor does not bind it).
        gpu.bind()?;
        self.buffers = None;
        let input = config.input;
        let channels = input_channels(config, self.layout);
        let mut shapes = vec![vec![n, channels, input.height, input.width]];
        for stage in &self.stages {
            shapes.push([&[n][..], &stage.output].concat());
        }
        // Images in the network's layout; the linear layers' rows in their one order.
        let layout_of = |shape: &[usize]| match shape.len() {
            4 => self.layout,
            _ => Layout::Nchw,
        };
        let tensors = |shapes: &[Vec<usize>]| -> Result<Vec<GpuTensor<T>>> {
            shapes
                .iter()
                .map(|shape| GpuTensor::zeros(gpu, shape, layout_of(shape)))
                .collect()
        };
        let activations = tensors(&shapes)?;
        // With every layer trainable this saves the batch-sized gradient (79 MB in f32 at 128
        // images); with frozen layers, every gradient before the first trainable one.
        let first_trainable = self.stages.iter().position(|s| s.gradient_at == Some(0));
        let gradients = shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let written = i > first_trainable.unwrap_or(0);
                written
                    .then(|| GpuTensor::zeros(gpu, shape, layout_of(shape)))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let wide = match T::MIXED {
            true => {
                let logits = &shapes[shapes.len() - 1];
                Some(WideBuffers {
                    logits: GpuTensor::zeros(gpu, logits, Layout::Nchw)?,
                    logit_grad: GpuTensor::zeros(gpu, logits, Layout::Nchw)?,
                })
            }
            false => None,
        };
        // The batch as the caller gives it, where the input differs from it.
        let batch_shape = [n, input.channels, input.height, input.width];
        let staging = (T::MIXED || self.layout != Layout::Nchw)
            .then(|| GpuTensor::zeros(gpu, &batch_shape, Layout::Nchw))
            .transpose()?;
        let stream = gpu.stream();
        self.buffers = Some(StepBuffers {
            batch: n,
            activations,
            gradients,
            labels: stream
                .alloc_zeros::<u32>(n)
                .map_err(driver_err("allocate the labels"))?,
            row_loss: stream
                .alloc_zeros::<f64>(n)
                .map_err(driver_err("allocate the losses"))?,
            staging,
            wide,
            graph: GraphState::Fresh,
        });
        Ok(())
    }

    /// The first half of a training step (the batch checked by the caller against `config`):
    /// the batch, labels, dropout seeds and step settings uploaded, then [`Net::compute`] queued eagerly or
    /// through the batch size's CUDA graph ([`Net::run_compute`]). Nothing here waits for the
    /// device, so the host may queue other work (the next batch's upload) before
    /// [`Net::finish`] reads the loss back. With `marks` the step is profiled: it runs eagerly
    /// (the graph is left as it is) with an event at the end of each phase.
    pub fn submit(
        &mut self,
        gpu: &Gpu,
        config: &AlexNetConfig,
        input: StepInput<'_, '_>,
        mut marks: Option<&mut StepMarks>,
    ) -> Result<()> {
        let StepInput {
            batch,
            labels,
            step_seed,
            optimiser,
            scale,
        } = input;
        let n = labels.len();
        self.buffers_for(gpu, config, n)?;
        let stream = gpu.stream();
        // The small pageable copies first: the driver may wait for the stream before staging
        // one, which after the batch's DMA would hold the host until the batch is up.
        if self.dropout_layers > 0 {
            // Read on the device by the dropout kernels, so a replayed graph draws new masks.
            let seeds: Vec<u64> = (0..self.dropout_layers as u64)
                .map(|k| layer_seed(step_seed, k))
                .collect();
            stream
                .memcpy_htod(&seeds, &mut self.seeds)
                .map_err(driver_err("upload the dropout seeds"))?;
        }
        self.settings
            .write(gpu, optimiser.learning_rate, scale, !self.has_velocity)?;
        {
            let buffers = self.buffers.as_mut().ok_or_else(no_buffers)?;
            stream
                .memcpy_htod(labels, &mut buffers.labels)
                .map_err(driver_err("upload the labels"))?;
            T::load_batch(
                gpu,
                batch,
                config.input.channels,
                buffers.staging.as_mut(),
                &mut buffers.activations[0],
            )?;
        }
        mark(&mut marks, gpu, || "batch upload".into())?;
        let run = StepRun::new(optimiser);
        match marks {
            Some(marks) => self.compute(gpu, &run, Some(marks)),
            None => self.run_compute(gpu, run),
        }
    }

    /// The second half of the step [`Net::submit`] queued: its mean loss and (mixed
    /// precision) the overflow flag read back, the step's one sync.
    pub fn finish(&mut self, gpu: &Gpu, mut marks: Option<&mut StepMarks>) -> Result<StepOutcome> {
        let stream = gpu.stream();
        let buffers = self.buffers.as_ref().ok_or_else(no_buffers)?;
        let n = buffers.batch;
        // Sleep until the step is done: the copies below would wait for it spinning a core
        // (the context's default scheduling) that the image loader needs.
        record(&self.step_done, stream)?;
        self.step_done
            .synchronize()
            .map_err(driver_err("cuEventSynchronize (training step)"))?;
        let losses = stream
            .clone_dtoh(&buffers.row_loss)
            .map_err(driver_err("read back the loss"))?;
        let overflowed = T::MIXED
            && stream
                .clone_dtoh(&self.overflow)
                .map_err(driver_err("read back the overflow flag"))?
                .first()
                .is_some_and(|&flag| flag != 0);
        // Copies into ordinary memory return once done in practice, but the driver only says
        // they "might be synchronous": the step is over (its batch the caller's again) only
        // when the stream says so. Idle by now, so this costs nothing.
        stream
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))?;
        mark(&mut marks, gpu, || "loss read-back".into())?;
        if !overflowed {
            self.has_velocity = true;
        }
        Ok(StepOutcome {
            loss: (losses.iter().sum::<f64>() / n as f64) as f32,
            overflowed,
        })
    }

    /// Every convolution's algorithm choices so far with cuDNN's measurements, one line each:
    /// `conv1 [128, 227, 227] backward filter: ...` (see [`crate::cuda::ConvChoice`]).
    pub fn conv_choices(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for stage in &self.stages {
            if let Layer::Conv(conv) = &stage.layer {
                for choice in conv.choices() {
                    lines.push(format!(
                        "{} {:?} {}: {}",
                        stage.name, choice.input, choice.call, choice.measured
                    ));
                }
            }
        }
        lines
    }

    /// The activations' layout (the 4-D ones).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Where the current batch size's graph stands.
    pub fn graph_status(&self) -> GraphStatus {
        match (&self.buffers, self.graphs) {
            (_, false) => GraphStatus::Disabled,
            (None, true) => GraphStatus::NotCaptured,
            (Some(buffers), true) => buffers.graph.status(),
        }
    }

    /// [`Net::compute`] eagerly, or through the batch size's CUDA graph: eager on the first
    /// step at this size (algorithms are chosen, buffers and workspaces sized), captured and
    /// launched on the second, replayed after. What the graph bakes in must not change under
    /// it: other optimiser settings than the learning rate ([`StepRun`]) or a moved
    /// convolution workspace run that step eagerly and capture again on the next.
    fn run_compute(&mut self, gpu: &Gpu, run: StepRun) -> Result<()> {
        if !self.graphs {
            return self.compute(gpu, &run, None);
        }
        let baked = Baked {
            workspace_generation: gpu.conv_workspace()?.generation(),
            run,
        };
        // Out of the buffers while the step borrows the network; put back whatever happens.
        let buffers = self.buffers.as_mut().ok_or_else(no_buffers)?;
        let mut graph = std::mem::replace(&mut buffers.graph, GraphState::Fresh);
        let result = graph.run(
            baked,
            &mut StreamWork {
                stream: gpu.stream(),
                queue: || self.compute(gpu, &run, None),
            },
        );
        let buffers = self.buffers.as_mut().ok_or_else(no_buffers)?;
        buffers.graph = graph;
        result
    }

    /// Everything of a step between the uploads and the read-backs, all queued on the compute
    /// stream with nothing synchronising (so it can be captured): forward in training mode
    /// (dropout seeds read on the device), the loss times the scale, backward, unscaling with
    /// the overflow check (mixed), one SGD launch (skipped on the device on overflow). With
    /// `marks`, an event at the end of each phase (never while capturing).
    fn compute(
        &mut self,
        gpu: &Gpu,
        run: &StepRun,
        mut marks: Option<&mut StepMarks>,
    ) -> Result<()> {
        let StepRun { optimiser } = *run;
        let Net {
            stages,
            flat,
            masters,
            grads,
            velocity,
            overflow,
            seeds,
            settings,
            buffers,
            ..
        } = self;
        let settings = &*settings;
        let buffers = buffers.as_mut().ok_or_else(no_buffers)?;
        let StepBuffers {
            activations,
            gradients,
            labels,
            row_loss,
            wide,
            ..
        } = buffers;
        let stream = gpu.stream();
        let seed_of = |slot: usize| seeds.slice(slot..slot + 1);

        // Forward in training mode, keeping every stage's input.
        for (i, stage) in stages.iter_mut().enumerate() {
            let (done, rest) = activations.split_at_mut(i + 1);
            let (x, y) = (&done[i], &mut rest[0]);
            match &mut stage.layer {
                Layer::Conv(conv) => conv.forward(gpu, x, y, true)?,
                Layer::Lrn(lrn) => lrn.forward(gpu, x, y, false)?,
                Layer::Pool(pool) => pool.forward(gpu, x, y)?,
                Layer::Linear {
                    linear,
                    relu,
                    dropout,
                } => {
                    linear.forward(gpu, x, y, *relu)?;
                    if let Some((dropout, slot)) = dropout {
                        dropout.forward_train_seeded(gpu, y, &seed_of(*slot))?;
                    }
                }
            }
            mark(&mut marks, gpu, || format!("{} forward", stage.name))?;
        }
        let last = stages.len();
        T::loss_gradient(
            gpu,
            &activations[last],
            labels,
            wide.as_mut(),
            gradients[last].as_mut().ok_or_else(|| no_gradient(last))?,
            row_loss,
            Scale::OnDevice(settings),
        )?;
        mark(&mut marks, gpu, || "loss".into())?;

        // A convolution's ReLU (fused into its forward) followed by an LRN or a pooling: that
        // layer's backward applies the ReLU's too (`relu_first`), one pass over the
        // convolution's gradient fewer than a `relu_backward` of its own (conv1, conv2 and
        // conv5 in both presets).
        let relu_fused_after: Vec<bool> = (0..stages.len())
            .map(|i| {
                i > 0
                    && matches!(stages[i].layer, Layer::Lrn(_) | Layer::Pool(_))
                    && matches!(stages[i - 1].layer, Layer::Conv(_))
            })
            .collect();

        // Backward, from the logits to the first trainable layer.
        for (i, stage) in stages.iter_mut().enumerate().rev() {
            let (before, after) = gradients.split_at_mut(i + 1);
            let dy = after[0].as_mut().ok_or_else(|| no_gradient(i + 1))?;
            let dx = before[i].as_mut();
            let (x, y) = (&activations[i], &activations[i + 1]);
            let first_trainable = stage.gradient_at == Some(0);
            let lens = stage.layer.parameter_lens();
            let name = &stage.name;
            let done = || format!("{name} backward");
            match &mut stage.layer {
                Layer::Conv(conv) => {
                    if !relu_fused_after.get(i + 1).copied().unwrap_or(false) {
                        relu_backward(gpu, y, dy)?;
                    }
                    let wants_dx = i > 0 && !first_trainable;
                    let dx = match wants_dx {
                        true => Some(dx.ok_or_else(|| no_gradient(i))?),
                        false => None,
                    };
                    with_gradient_views(grads, stage.gradient_at, lens, |dw, db| {
                        conv.backward(gpu, x, dy, dx, dw, db)
                    })?;
                    mark(&mut marks, gpu, done)?;
                    if !wants_dx {
                        break;
                    }
                }
                Layer::Lrn(lrn) => {
                    let dx = dx.ok_or_else(|| no_gradient(i))?;
                    lrn.backward(gpu, x, dy, dx, relu_fused_after[i])?;
                    mark(&mut marks, gpu, done)?;
                }
                Layer::Pool(pool) => {
                    let dx = dx.ok_or_else(|| no_gradient(i))?;
                    pool.backward(gpu, x, y, dy, dx, relu_fused_after[i])?;
                    mark(&mut marks, gpu, done)?;
                }
                Layer::Linear {
                    linear,
                    relu,
                    dropout,
                } => {
                    if let Some((dropout, slot)) = dropout {
                        // The same mask and scale on the gradient: dropout's backward.
                        dropout.forward_train_seeded(gpu, dy, &seed_of(*slot))?;
                    }
                    if *relu {
                        // The stored output is after dropout, whose positive scale keeps every
                        // sign; where it dropped a unit the gradient is already 0.
                        relu_backward(gpu, y, dy)?;
                    }
                    let dx = match first_trainable {
                        true => None,
                        false => Some(dx.ok_or_else(|| no_gradient(i))?),
                    };
                    with_gradient_views(grads, stage.gradient_at, lens, |dw, db| {
                        linear.backward(gpu, x, dy, dx, dw, db)
                    })?;
                    mark(&mut marks, gpu, done)?;
                    if first_trainable {
                        break;
                    }
                }
            }
        }

        // Mixed precision: the f32 gradients without the loss scale, and the overflow check.
        if T::MIXED {
            stream
                .memset_zeros(overflow)
                .map_err(driver_err("clear the overflow flag"))?;
            let scaled = grads.scaled.as_ref().ok_or_else(|| {
                Error::invalid("CudaTrainer", "no scaled gradients in mixed precision")
            })?;
            for stage in stages.iter() {
                let (Some(at), Some((weight_len, bias_len))) =
                    (stage.gradient_at, stage.layer.parameter_lens())
                else {
                    continue;
                };
                let weights = at..at + weight_len;
                unscale_gradients(
                    gpu,
                    &scaled.slice(weights.clone()),
                    &mut grads.flat.slice_mut(weights),
                    overflow,
                    settings,
                )?;
                let biases = at + weight_len..at + weight_len + bias_len;
                unscale_gradients_in_place(
                    gpu,
                    &mut grads.flat.slice_mut(biases),
                    overflow,
                    settings,
                )?;
            }
            mark(&mut marks, gpu, || "gradient unscaling".into())?;
        }

        // One SGD launch over every trainable tensor.
        let layer_tensors: Vec<&mut CudaSlice<T>> = stages
            .iter_mut()
            .filter(|stage| stage.gradient_at.is_some())
            .flat_map(|stage| stage.layer.parameters_mut())
            .collect();
        let (mut weights, mut copies) = T::sgd_tensors(layer_tensors, masters);
        // The learning rate and the first-step flag come from `settings` on the device.
        sgd_step(
            gpu,
            &optimiser,
            flat.segments(),
            false,
            SgdBuffers {
                weights: &mut weights,
                copies: &mut copies,
                grads: &grads.flat,
                velocity,
                skip: T::MIXED.then_some(&*overflow),
                settings: Some(settings),
            },
        )?;
        mark(&mut marks, gpu, || "sgd update".into())
    }

    /// The current parameters as [`Weights`] of `config`, in the CPU's layout and names: the
    /// masters in mixed precision, the layers' own tensors in fp32.
    pub fn weights(&self, gpu: &Gpu, config: &AlexNetConfig) -> Result<Weights> {
        let stream = gpu.stream();
        let mut device: Vec<Vec<f32>> = Vec::new();
        for stage in &self.stages {
            let layer_tensors = match &stage.layer {
                Layer::Conv(conv) => conv.parameters(),
                Layer::Linear { linear, .. } => linear.parameters(),
                Layer::Lrn(_) | Layer::Pool(_) => continue,
            };
            let at = device.len();
            match self.masters.get(at..at + 2) {
                Some([weight, bias]) if T::MIXED => {
                    device.push(read_back::<f32>(stream, weight)?);
                    device.push(read_back::<f32>(stream, bias)?);
                }
                _ => {
                    device.push(read_back(stream, layer_tensors[0])?);
                    device.push(read_back(stream, layer_tensors[1])?);
                }
            }
        }
        if device.len() != self.param_layouts.len() {
            return Err(Error::invalid(
                "CudaTrainer::weights",
                format!(
                    "{} tensors read back for {} parameter layouts",
                    device.len(),
                    self.param_layouts.len()
                ),
            ));
        }
        let tensors = device
            .into_iter()
            .zip(&self.param_layouts)
            .map(|(values, layout)| layout.to_host(values))
            .collect::<Result<Vec<_>>>()?;
        Weights::from_fn(config, |index, _, _| {
            tensors.get(index).cloned().unwrap_or_default()
        })
    }

    /// The layouts of the trainable tensors (the last ones: frozen layers come first), one per
    /// SGD segment that is not padding.
    fn trainable_layouts(&self) -> &[ParamLayout] {
        let first = self
            .param_layouts
            .len()
            .saturating_sub(self.flat.tensor_count());
        &self.param_layouts[first..]
    }

    /// The momentum of every trainable tensor in network order and the CPU's layout (empty
    /// before the first applied step).
    pub fn velocity(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        if !self.has_velocity {
            return Ok(Vec::new());
        }
        let flat = gpu
            .stream()
            .clone_dtoh(&self.velocity)
            .map_err(driver_err("read back the momentum"))?;
        self.flat
            .split(&flat)?
            .into_iter()
            .zip(self.trainable_layouts())
            .map(|(values, layout)| layout.to_host(values))
            .collect()
    }

    /// Restores the momentum: one vector per trainable tensor in network order and the CPU's
    /// layout, or none.
    pub fn set_velocity(&mut self, gpu: &Gpu, velocity: Vec<Vec<f32>>) -> Result<()> {
        if velocity.is_empty() {
            self.has_velocity = false;
            return Ok(());
        }
        let layouts = self.trainable_layouts();
        let lens: Vec<usize> = velocity.iter().map(Vec::len).collect();
        let want: Vec<usize> = layouts.iter().map(|l| l.host_len()).collect();
        if lens != want {
            return Err(Error::Shape {
                op: "CudaTrainer::set_velocity",
                expected: format!("momentum tensors of {want:?}"),
                found: lens,
            });
        }
        let device = velocity
            .iter()
            .zip(layouts)
            .map(|(values, layout)| layout.to_device(values))
            .collect::<Result<Vec<_>>>()?;
        let flat = self.flat.join(&device)?;
        gpu.stream()
            .memcpy_htod(&flat, &mut self.velocity)
            .map_err(driver_err("upload the momentum"))?;
        self.has_velocity = true;
        Ok(())
    }
}

/// Runs `backward` with the views a trainable layer (`lens`: its weight's and bias's lengths)
/// writes its gradients into, from its offset `at` (`None`: the layer is frozen, and the
/// backward must not reach it).
fn with_gradient_views<T: TrainFloat>(
    grads: &mut GradientBuffers<T>,
    at: Option<usize>,
    lens: Option<(usize, usize)>,
    backward: impl FnOnce(&mut CudaViewMut<'_, T>, &mut CudaViewMut<'_, f32>) -> Result<()>,
) -> Result<()> {
    let (Some(at), Some(lens)) = (at, lens) else {
        return Err(Error::invalid(
            "CudaTrainer",
            "the backward reached a frozen layer",
        ));
    };
    T::with_gradient_views(grads, at, lens, backward)
}
