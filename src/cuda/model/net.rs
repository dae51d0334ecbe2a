//! The network of one storage type on the GPU: the plan's stages as GPU layers ([`Layers`]),
//! and its [`Buffers`] for one batch size, allocated once and reused until the size changes.

use std::collections::VecDeque;

use ndarray::{ArrayView2, ArrayView4, CowArray, Ix2};

use crate::config::{DropoutMode, StageOp};
use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::dtype::GpuFloat;
use crate::cuda::graph::{GraphState, GraphStatus, StreamWork};
use crate::cuda::ops::{
    chw_columns_to_hwc, Conv2dGpu, ConvEpilogueGpu, ConvOptions, ConvPlanInfo, DropoutGpu,
    LinearGpu, LrnGpu, MaxPoolGpu, TopK,
};
use crate::cuda::pinned::{alloc_readback, alloc_upload};
use crate::cuda::tensor::{GpuTensor, Layout};

use super::buffers::Buffers;
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

/// A convolution's bias, ReLU, LRN (if any) and max-pooling run as one kernel: the stages from
/// the convolution up to `last` (the pooling), with [`ConvEpilogueGpu`].
struct FusedEpilogue {
    op: ConvEpilogueGpu,
    last: usize,
}

/// The network's layers for one storage type, built from the plan.
pub(super) struct Layers<T: GpuFloat> {
    layout: Layout,
    /// Channels of the device input tensor: the image's 3, or 8 in fp16 NHWC mode.
    input_channels: usize,
    height: usize,
    width: usize,
    classes: usize,
    stages: Vec<Stage<T>>,
    /// Per stage: the fused epilogue that starts at it (a convolution followed by an optional
    /// LRN and a max-pooling), used by [`Layers::run_fused`].
    fused: Vec<Option<FusedEpilogue>>,
}

/// The math an fp32 network's layers may use (see [`super::CudaOptions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ConvMath {
    pub allow_tf32: bool,
    pub fp32_gemm_only: bool,
}

impl ConvMath {
    pub const TF32: ConvMath = ConvMath {
        allow_tf32: true,
        fp32_gemm_only: false,
    };
}

/// How many batch sizes' algorithm choices a network keeps (descriptors only: the buffers
/// exist for one size at a time).
pub const PLANNED_SIZES: usize = 4;

/// The layers and, once a batch size is known, its buffers.
pub(super) struct Net<T: GpuFloat> {
    layers: Layers<T>,
    buffers: Option<Buffers<T>>,
    /// Batch sizes with algorithm choices, least recently used first.
    planned_sizes: VecDeque<usize>,
}

impl<T: GpuFloat> Net<T> {
    pub fn build(gpu: &Gpu, weights: &Weights, layout: Layout, math: ConvMath) -> Result<Self> {
        Ok(Net {
            layers: Layers::build(gpu, weights, layout, math)?,
            buffers: None,
            planned_sizes: VecDeque::new(),
        })
    }

    pub fn layers(&self) -> &Layers<T> {
        &self.layers
    }

    /// Copies `weights` into the layers in place ([`Layers::load`]).
    pub fn load(&mut self, gpu: &Gpu, weights: &Weights) -> Result<()> {
        self.layers.load(gpu, weights)
    }

    /// Frees the current batch size's buffers (and its graph) and the convolution workspace,
    /// keeping the layers and their algorithm choices; the next forward allocates them again
    /// (the workspace to what its algorithms need, before the graph is captured).
    pub fn release_buffers(&mut self, gpu: &Gpu) -> Result<()> {
        free_buffers(gpu, self.buffers.take())?;
        gpu.conv_workspace()?.shrink_to(gpu.stream(), 0)
    }

    /// Marks `n` as the most recent batch size and forgets the algorithm choices of the
    /// sizes beyond the last [`PLANNED_SIZES`], shrinking the shared workspace to what the
    /// remaining choices need. Coming back to a remembered size reuses its algorithms: the
    /// same size always computes with the same algorithms (bit-identical results), and
    /// alternating sizes does not measure again.
    fn remember_size(&mut self, gpu: &Gpu, n: usize) -> Result<()> {
        self.planned_sizes.retain(|&s| s != n);
        self.planned_sizes.push_back(n);
        let mut forgot = false;
        while self.planned_sizes.len() > PLANNED_SIZES {
            if let Some(old) = self.planned_sizes.pop_front() {
                self.layers.forget_plans(old);
                forgot = true;
            }
        }
        if forgot {
            let need = self.layers.workspace_need();
            gpu.conv_workspace()?.shrink_to(gpu.stream(), need)?;
        }
        Ok(())
    }

    /// The CUDA graph's state at the current batch size, if buffers exist.
    pub fn graph_status(&self) -> Option<GraphStatus> {
        self.buffers.as_ref().map(|b| b.graph.status())
    }

    /// The batch size the buffers are allocated for, if any.
    pub fn batch_size(&self) -> Option<usize> {
        self.buffers.as_ref().map(|b| b.n)
    }

    /// The layers and the buffers for batch `n`, allocated (and every convolution's algorithm
    /// chosen, unless it was for one of the last [`PLANNED_SIZES`] sizes) on the first call for
    /// that size; the buffers of another size are freed first.
    pub fn ready(&mut self, gpu: &Gpu, n: usize) -> Result<(&mut Layers<T>, &mut Buffers<T>)> {
        let buffers = match self.buffers.take() {
            Some(buffers) if buffers.n == n => buffers,
            other => {
                // One batch size of buffers at a time, so memory does not grow with every
                // size ever run.
                gpu.bind()?;
                free_buffers(gpu, other)?;
                self.remember_size(gpu, n)?;
                self.layers.allocate(gpu, n)?
            }
        };
        let buffers = self.buffers.insert(buffers);
        Ok((&mut self.layers, buffers))
    }
}

/// A linear layer's weight as the GPU layer takes it: NHWC activations flatten in (H, W, C)
/// order, so the first linear layer's columns are reordered from PyTorch's (C, H, W)
/// (`flatten`) and the result is the CPU's.
fn linear_weight<'a>(
    weight: ArrayView2<'a, f32>,
    first_linear: bool,
    layout: Layout,
    flatten: [usize; 3],
) -> Result<CowArray<'a, f32, Ix2>> {
    Ok(match first_linear && layout == Layout::Nhwc {
        true => chw_columns_to_hwc(weight, flatten)?.into(),
        false => weight.into(),
    })
}

/// Frees `buffers`, if any. The graph among them is destroyed with this thread's context
/// current (cudarc's graph destructor does not bind it). A forward that failed part way may
/// have left a copy into or out of their page-locked buffers queued: they are freed once the
/// stream is idle, or never (leaked, as `CudaModel`'s drop does) if it cannot be waited for.
fn free_buffers<T: GpuFloat>(gpu: &Gpu, buffers: Option<Buffers<T>>) -> Result<()> {
    let Some(old) = buffers else {
        return Ok(());
    };
    gpu.bind()?;
    if let Err(e) = gpu.stream().synchronize() {
        std::mem::forget(old);
        return Err(driver_err("cuStreamSynchronize")(e));
    }
    drop(old);
    Ok(())
}

impl<T: GpuFloat> Layers<T> {
    fn build(gpu: &Gpu, weights: &Weights, layout: Layout, math: ConvMath) -> Result<Self> {
        let allow_tf32 = math.allow_tf32;
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
                    options.fp32_gemm_only = math.fp32_gemm_only;
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
                    let weight =
                        linear_weight(params.weight.view(), first, layout, plan.flatten_shape())?;
                    let linear =
                        LinearGpu::new(gpu, weight.view(), params.bias.view(), allow_tf32)?;
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
        let fused = (0..stages.len())
            .map(|i| fused_epilogue(&stages, i))
            .collect();
        Ok(Layers {
            layout,
            input_channels,
            height: input.height,
            width: input.width,
            classes: plan.num_classes(),
            stages,
            fused,
        })
    }

    /// Copies `weights` (for this network's configuration, checked by the caller) into the
    /// layers' parameter buffers, in place: algorithm choices and captured graphs stay valid.
    fn load(&mut self, gpu: &Gpu, weights: &Weights) -> Result<()> {
        let flatten = weights.config().plan()?.flatten_shape();
        let missing = |name: &str| Error::invalid("weights", format!("no parameters for {name}"));
        let (mut convs, mut fcs) = (weights.convs().iter(), weights.fcs().iter());
        let mut first_linear = true;
        for stage in &mut self.stages {
            match &mut stage.layer {
                Layer::Conv { conv, .. } => {
                    let params = convs.next().ok_or_else(|| missing(&stage.name))?;
                    conv.load(gpu, params.weight.view(), params.bias.view())?;
                }
                Layer::Linear { linear, .. } => {
                    let params = fcs.next().ok_or_else(|| missing(&stage.name))?;
                    let weight =
                        linear_weight(params.weight.view(), first_linear, self.layout, flatten)?;
                    linear.load(gpu, weight.view(), params.bias.view())?;
                    first_linear = false;
                }
                Layer::Lrn { .. } | Layer::Pool(_) => {}
            }
        }
        Ok(())
    }

    /// Every convolution's chosen algorithms, by stage name.
    pub fn conv_plans(&self) -> Vec<(String, ConvPlanInfo)> {
        self.stages
            .iter()
            .filter_map(|stage| match &stage.layer {
                Layer::Conv { conv, .. } => Some((stage.name.clone(), conv.plans())),
                _ => None,
            })
            .flat_map(|(name, plans)| plans.into_iter().map(move |p| (name.clone(), p)))
            .collect()
    }

    /// Forgets every convolution's algorithm choices for batch size `n`.
    fn forget_plans(&mut self, n: usize) {
        for stage in &mut self.stages {
            if let Layer::Conv { conv, .. } = &mut stage.layer {
                conv.forget_plans(n);
            }
        }
    }

    /// The most workspace any remembered algorithm choice needs.
    fn workspace_need(&self) -> usize {
        self.conv_plans()
            .iter()
            .map(|(_, plan)| plan.workspace_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Every buffer for batch `n`, with each convolution's algorithm chosen for it.
    fn allocate(&mut self, gpu: &Gpu, n: usize) -> Result<Buffers<T>> {
        let input = GpuTensor::zeros(
            gpu,
            &[n, self.input_channels, self.height, self.width],
            self.layout,
        )?;
        let mut outputs = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let shape: Vec<usize> = std::iter::once(n)
                .chain(stage.output.iter().copied())
                .collect();
            // Images keep the model's layout; flat features are [n, features].
            let layout = match shape.len() {
                4 => self.layout,
                _ => Layout::Nchw,
            };
            outputs.push(GpuTensor::zeros(gpu, &shape, layout)?);
        }
        // Each convolution's algorithm is measured on the very buffers it will run on.
        for (i, stage) in self.stages.iter_mut().enumerate() {
            if let Layer::Conv { conv, .. } = &mut stage.layer {
                let (before, rest) = outputs.split_at_mut(i);
                let x = before.last().unwrap_or(&input);
                if let Some(y) = rest.first_mut() {
                    conv.prepare_on(gpu, x, y)?;
                }
            }
        }
        let too_big = || Error::invalid("batch", format!("{n} images overflow the buffer sizes"));
        let logits = n.checked_mul(self.classes).ok_or_else(too_big)?;
        let image_bytes = self.height * self.width * 3;
        let pixels = n.checked_mul(image_bytes).ok_or_else(too_big)?;
        let stream = gpu.stream();
        Ok(Buffers {
            graph: GraphState::Fresh,
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
            staged_f32: None,
            topk: TopK::new(gpu, n)?,
        })
    }

    /// Uploads a normalised NCHW f32 batch into the input tensor (rounded to `T`, reordered to
    /// the layout, channels past the image's zero); `copied` runs once the host-to-device copy
    /// is queued, before any work on the device that finishes the input.
    pub fn upload_f32(
        &self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        input: ArrayView4<'_, f32>,
        copied: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if self.input_channels == input.dim().1 {
            // No padding: the tensor's own upload (straight from `input` for f32 NCHW, no
            // host copy of the batch).
            bufs.input.upload(gpu, input.into_dyn())?;
            return copied();
        }
        // Padded (fp16's 8-channel NHWC input): the f32 batch goes up as it is and the device
        // pads, reorders and rounds it, instead of a host pass over every value.
        bufs.upload_f32_relayout(gpu, input, copied)
    }

    /// Runs the network from the input tensor to the logits, each convolution's bias, ReLU, LRN
    /// and pooling as one kernel ([`ConvEpilogueGpu`]; bit for bit [`Layers::run`]'s result).
    /// The buffers of the stages inside a fused group are left unwritten.
    pub fn run_fused(&mut self, gpu: &Gpu, bufs: &mut Buffers<T>) -> Result<()> {
        let mut i = 0;
        while i < self.stages.len() {
            let (Some(fused), Layer::Conv { conv, .. }) =
                (&self.fused[i], &mut self.stages[i].layer)
            else {
                self.run_stage(gpu, bufs, i)?;
                i += 1;
                continue;
            };
            let (before, rest) = bufs.outputs.split_at_mut(i);
            let x = before.last().unwrap_or(&bufs.input);
            let (raw, after) = rest.split_first_mut().ok_or_else(foreign_buffers)?;
            let pooled = after
                .get_mut(fused.last - i - 1)
                .ok_or_else(foreign_buffers)?;
            conv.forward_unbiased(gpu, x, raw)?;
            fused.op.forward(gpu, raw, conv.bias(), pooled)?;
            i = fused.last + 1;
        }
        Ok(())
    }

    /// The forward from the input tensor to the logits, as [`Layers::run_fused`] runs it:
    /// eagerly when `eager`, else through the batch size's CUDA graph — eager on the first
    /// run, captured and launched on the second, replayed after (re-captured if the shared
    /// convolution workspace moved; eager for good if capturing fails).
    pub fn run_forward(&mut self, gpu: &Gpu, bufs: &mut Buffers<T>, eager: bool) -> Result<()> {
        if eager {
            return self.run_fused(gpu, bufs);
        }
        let generation = gpu.conv_workspace()?.generation();
        // Out of the buffers while the work borrows them; put back whatever happens.
        let mut graph = std::mem::replace(&mut bufs.graph, GraphState::Fresh);
        let result = graph.run(
            generation,
            &mut StreamWork {
                stream: gpu.stream(),
                queue: || self.run_fused(gpu, bufs),
            },
        );
        bufs.graph = graph;
        result
    }

    /// Runs stage `i` alone, reading the previous stage's output; returns whether the ReLU is
    /// still pending in its output (the LRN after a convolution applies it).
    fn run_stage(&mut self, gpu: &Gpu, bufs: &mut Buffers<T>, i: usize) -> Result<bool> {
        let (before, rest) = bufs.outputs.split_at_mut(i);
        let x = before.last().unwrap_or(&bufs.input);
        let (y, _) = rest.split_first_mut().ok_or_else(foreign_buffers)?;
        let stage = self.stages.get_mut(i).ok_or_else(foreign_buffers)?;
        Ok(match &mut stage.layer {
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
        })
    }

    /// Runs every stage from the input tensor to the logits, one kernel (or library call) per
    /// stage, calling `observe` after each.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        bufs: &mut Buffers<T>,
        observe: &mut Observer<'_, T>,
    ) -> Result<()> {
        for i in 0..self.stages.len() {
            let relu_pending = self.run_stage(gpu, bufs, i)?;
            if let (Some(stage), Some(y)) = (self.stages.get(i), bufs.outputs.get(i)) {
                observe(&stage.name, y, relu_pending)?;
            }
        }
        Ok(())
    }
}

fn foreign_buffers() -> Error {
    Error::invalid("CudaModel", "activation buffers of another network")
}

/// The fused epilogue starting at stage `i`, if it is a convolution followed by an optional LRN
/// and a max-pooling.
fn fused_epilogue<T: GpuFloat>(stages: &[Stage<T>], i: usize) -> Option<FusedEpilogue> {
    let layer = |j: usize| stages.get(j).map(|s| &s.layer);
    if !matches!(layer(i), Some(Layer::Conv { .. })) {
        return None;
    }
    let (lrn, pool_at) = match layer(i + 1) {
        Some(Layer::Lrn { lrn, .. }) => (Some(*lrn), i + 2),
        _ => (None, i + 1),
    };
    match layer(pool_at) {
        Some(Layer::Pool(pool)) => Some(FusedEpilogue {
            op: ConvEpilogueGpu { lrn, pool: *pool },
            last: pool_at,
        }),
        _ => None,
    }
}
