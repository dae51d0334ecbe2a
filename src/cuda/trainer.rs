//! Training on the GPU in true fp32: [`CudaTrainer`], the GPU twin of
//! [`crate::train::CpuTrainer`]. The same stages as the CPU model (the plan's), each keeping its
//! input on the device for the backward; the layers' backward through cuDNN and cuBLAS and the
//! crate's kernels; every trainable tensor's gradient in one flat buffer and the momentum in
//! another, updated by one SGD launch. The weights, the momentum and the step's dropout masks
//! are the CPU's, so a run can move between the devices through a checkpoint.
//!
//! Not run on a GPU yet (no GPU test of this crate has run anywhere); `tests/gpu_training.rs`
//! checks it against the CPU trainer step by step.

use cudarc::driver::{CudaSlice, CudaViewMut};
use ndarray::ArrayView4;

use super::device::{driver_err, Gpu};
use super::model::{CudaModel, CudaOptions};
use super::ops::{
    relu_backward, sgd_step, softmax_cross_entropy, unpack_conv_weights, Conv2dGpu, ConvOptions,
    DropoutGpu, LinearGpu, LrnGpu, MaxPoolGpu, SgdBuffers, SgdSegment,
};
use super::tensor::{GpuTensor, Layout};
use crate::config::{AlexNetConfig, StageOp};
use crate::cpu::layer_seed;
use crate::error::{Error, Result};
use crate::image::Preprocess;
use crate::train::{evaluate, Evaluation, ImageFolder, SgdConfig, Trainer};
use crate::weights::Weights;
use crate::Precision;

/// What one stage runs (fp32, NCHW).
enum Layer {
    /// Convolution + bias, then ReLU (as the CPU model's convolution stages).
    Conv(Conv2dGpu<f32>),
    Lrn(LrnGpu),
    Pool(MaxPoolGpu),
    /// GEMM + bias (+ ReLU), then dropout with the CPU's mask.
    Linear {
        linear: LinearGpu<f32>,
        relu: bool,
        dropout: Option<DropoutGpu>,
    },
}

struct Stage {
    layer: Layer,
    /// Per-image output shape (`[C, H, W]` or `[features]`).
    output: Vec<usize>,
    /// Where its weight gradient starts in the flat gradient buffer (its bias follows), for
    /// the trainable layers; `None` for frozen layers and stages without parameters.
    gradient_at: Option<usize>,
}

/// The step's device buffers for one batch size: every stage's input (the last one is the
/// logits) and a gradient shaped like each, the labels and the per-row losses.
struct StepBuffers {
    batch: usize,
    activations: Vec<GpuTensor<f32>>,
    gradients: Vec<GpuTensor<f32>>,
    labels: CudaSlice<u32>,
    row_loss: CudaSlice<f64>,
}

/// The network on the GPU with its SGD optimiser: [`Trainer::step`] runs the forward in
/// training mode, the softmax cross-entropy, the backward and the update, all on the device;
/// only the batch goes up and the loss comes back.
///
/// ```no_run
/// use alexnet_cuda::config::AlexNetConfig;
/// use alexnet_cuda::cuda::CudaTrainer;
/// use alexnet_cuda::train::{SgdConfig, Trainer};
/// use alexnet_cuda::Weights;
///
/// # fn main() -> alexnet_cuda::Result<()> {
/// let weights = Weights::paper_init(&AlexNetConfig::paper(), 7)?;
/// let mut trainer = CudaTrainer::new(&weights, SgdConfig::default(), 0)?;
/// let batch = ndarray::Array4::<f32>::zeros((8, 3, 224, 224));
/// let loss = trainer.step(batch.view(), &[0, 1, 2, 3, 4, 5, 6, 7], 0)?;
/// println!("loss {loss}");
/// let trained = trainer.weights()?; // the same names and layout as the CPU's
/// # Ok(())
/// # }
/// ```
pub struct CudaTrainer {
    stages: Vec<Stage>,
    config: AlexNetConfig,
    optimiser: SgdConfig,
    frozen_layers: usize,
    /// The trainable tensors, in network order.
    segments: Vec<SgdSegment>,
    gradients: CudaSlice<f32>,
    velocity: CudaSlice<f32>,
    /// Whether `velocity` holds momentum yet (not before the first step or a restore).
    has_velocity: bool,
    buffers: Option<StepBuffers>,
    // Last: dropped after every buffer and descriptor that lives on it.
    gpu: Gpu,
}

impl std::fmt::Debug for CudaTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTrainer")
            .field("config", &self.config.name)
            .field("optimiser", &self.optimiser)
            .field("frozen_layers", &self.frozen_layers)
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
        // The same checks as the CPU optimiser (finite, non-negative settings).
        crate::train::Sgd::new(optimiser)?;
        let gpu = Gpu::new(ordinal)?;
        let config = weights.config().clone();
        let plan = config.plan()?;
        let layers = plan.stages.iter().filter(|s| s.params.is_some()).count();
        if frozen_layers >= layers {
            return Err(Error::invalid(
                "frozen layers",
                format!("{frozen_layers} of the model's {layers} layers with parameters: nothing would train"),
            ));
        }
        let mut convs = weights.convs().iter();
        let mut fcs = weights.fcs().iter();
        let missing = |name: &str| Error::invalid("weights", format!("no parameters for {name}"));
        let mut stages = Vec::with_capacity(plan.stages.len());
        let mut segments = Vec::new();
        let mut gradient_len = 0usize;
        let mut layer_index = 0usize;
        for spec in &plan.stages {
            let mut gradient_at = None;
            if let Some(params) = &spec.params {
                if layer_index >= frozen_layers {
                    gradient_at = Some(gradient_len);
                    for tensor in [&params.weight, &params.bias] {
                        segments.push(SgdSegment::named(&tensor.name, tensor.len(), &optimiser));
                        gradient_len += tensor.len();
                    }
                }
                layer_index += 1;
            }
            let layer = match spec.op {
                StageOp::Conv {
                    stride, padding, ..
                } => {
                    let params = convs.next().ok_or_else(|| missing(&spec.name))?;
                    let options = ConvOptions::new(stride, padding, Layout::Nchw);
                    Layer::Conv(Conv2dGpu::new(
                        &gpu,
                        params.weight.view(),
                        params.bias.view(),
                        options,
                    )?)
                }
                StageOp::Lrn(params) => Layer::Lrn(LrnGpu::new(params)?),
                StageOp::MaxPool(pool) => Layer::Pool(MaxPoolGpu::new(pool.kernel, pool.stride)?),
                StageOp::Linear { relu, dropout, .. } => {
                    let params = fcs.next().ok_or_else(|| missing(&spec.name))?;
                    Layer::Linear {
                        linear: LinearGpu::new(
                            &gpu,
                            params.weight.view(),
                            params.bias.view(),
                            false,
                        )?,
                        relu,
                        dropout: dropout
                            .map(|p| DropoutGpu::new(p, plan.dropout_mode))
                            .transpose()?,
                    }
                }
            };
            stages.push(Stage {
                layer,
                output: spec.output.clone(),
                gradient_at,
            });
        }
        let stream = gpu.stream();
        let gradients = stream
            .alloc_zeros::<f32>(gradient_len)
            .map_err(driver_err("allocate the parameter gradients"))?;
        let velocity = stream
            .alloc_zeros::<f32>(gradient_len)
            .map_err(driver_err("allocate the momentum"))?;
        Ok(CudaTrainer {
            stages,
            config,
            optimiser,
            frozen_layers,
            segments,
            gradients,
            velocity,
            has_velocity: false,
            buffers: None,
            gpu,
        })
    }

    /// The GPU it trains on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn optimiser(&self) -> &SgdConfig {
        &self.optimiser
    }

    pub fn frozen_layers(&self) -> usize {
        self.frozen_layers
    }

    /// The step's buffers for batch `n`, allocated when the batch size changes.
    fn buffers_for(&mut self, n: usize) -> Result<()> {
        if self.buffers.as_ref().is_some_and(|b| b.batch == n) {
            return Ok(());
        }
        self.buffers = None; // free the old size's first
        let input = self.config.input;
        let mut shapes = vec![vec![n, input.channels, input.height, input.width]];
        for stage in &self.stages {
            shapes.push([&[n][..], &stage.output].concat());
        }
        let tensors = |shapes: &[Vec<usize>]| -> Result<Vec<GpuTensor<f32>>> {
            shapes
                .iter()
                .map(|shape| GpuTensor::zeros(&self.gpu, shape, Layout::Nchw))
                .collect()
        };
        let activations = tensors(&shapes)?;
        let gradients = tensors(&shapes)?;
        let stream = self.gpu.stream();
        let labels = stream
            .alloc_zeros::<u32>(n)
            .map_err(driver_err("allocate the labels"))?;
        let row_loss = stream
            .alloc_zeros::<f64>(n)
            .map_err(driver_err("allocate the losses"))?;
        self.buffers = Some(StepBuffers {
            batch: n,
            activations,
            gradients,
            labels,
            row_loss,
        });
        Ok(())
    }
}

impl Trainer for CudaTrainer {
    fn step(
        &mut self,
        batch: ArrayView4<'_, f32>,
        labels: &[usize],
        step_seed: u64,
    ) -> Result<f32> {
        const OP: &str = "CudaTrainer::step";
        let n = self.config.input.check_batch(OP, batch.shape())?;
        let classes = self.config.num_classes();
        if labels.len() != n {
            return Err(Error::Shape {
                op: OP,
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
        self.buffers_for(n)?;
        let CudaTrainer {
            stages,
            optimiser,
            segments,
            gradients: flat_gradients,
            velocity,
            has_velocity,
            buffers,
            gpu,
            ..
        } = self;
        let Some(buffers) = buffers.as_mut() else {
            return Err(Error::invalid(OP, "no step buffers"));
        };
        let StepBuffers {
            activations,
            gradients,
            labels: labels_on_device,
            row_loss,
            ..
        } = buffers;
        activations[0].upload(gpu, batch.into_dyn())?;
        gpu.stream()
            .memcpy_htod(&device_labels, labels_on_device)
            .map_err(driver_err("upload the labels"))?;

        // Forward in training mode, keeping every stage's input.
        let mut dropout_seeds = vec![None; stages.len()];
        let mut dropouts = 0u64;
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
                    if let Some(dropout) = dropout {
                        let seed = layer_seed(step_seed, dropouts);
                        dropouts += 1;
                        dropout.forward_train(gpu, y, seed)?;
                        dropout_seeds[i] = Some(seed);
                    }
                }
            }
        }
        let last = stages.len();
        softmax_cross_entropy(
            gpu,
            &activations[last],
            labels_on_device,
            &mut gradients[last],
            row_loss,
        )?;

        // Backward, from the logits to the first trainable layer.
        for (i, stage) in stages.iter_mut().enumerate().rev() {
            let (before, after) = gradients.split_at_mut(i + 1);
            let (dx, dy) = (&mut before[i], &mut after[0]);
            let (x, y) = (&activations[i], &activations[i + 1]);
            let first_trainable = stage.gradient_at == Some(0);
            match &mut stage.layer {
                Layer::Conv(conv) => {
                    relu_backward(gpu, y, dy)?;
                    let weight_len = conv.parameters()[0].len();
                    let mut view = gradient_view(
                        flat_gradients,
                        stage.gradient_at,
                        weight_len + conv.out_channels(),
                    )?;
                    let (mut dw, mut db) = view.split_at_mut(weight_len);
                    let wants_dx = i > 0 && !first_trainable;
                    conv.backward(gpu, x, dy, wants_dx.then_some(dx), &mut dw, &mut db)?;
                    if !wants_dx {
                        break;
                    }
                }
                Layer::Lrn(lrn) => lrn.backward(gpu, x, dy, dx)?,
                Layer::Pool(pool) => pool.backward(gpu, x, dy, dx)?,
                Layer::Linear {
                    linear,
                    relu,
                    dropout,
                } => {
                    if let (Some(dropout), Some(seed)) = (dropout, dropout_seeds[i]) {
                        // The same mask and scale on the gradient: dropout's backward.
                        dropout.forward_train(gpu, dy, seed)?;
                    }
                    if *relu {
                        // The stored output is after dropout, whose positive scale keeps every
                        // sign; where it dropped a unit the gradient is already 0.
                        relu_backward(gpu, y, dy)?;
                    }
                    let weight_len = linear.in_features() * linear.out_features();
                    let mut view = gradient_view(
                        flat_gradients,
                        stage.gradient_at,
                        weight_len + linear.out_features(),
                    )?;
                    let (mut dw, mut db) = view.split_at_mut(weight_len);
                    linear.backward(
                        gpu,
                        x,
                        dy,
                        (!first_trainable).then_some(dx),
                        &mut dw,
                        &mut db,
                    )?;
                    if first_trainable {
                        break;
                    }
                }
            }
        }

        // One SGD launch over every trainable tensor.
        let mut weights: Vec<&mut CudaSlice<f32>> = stages
            .iter_mut()
            .filter(|stage| stage.gradient_at.is_some())
            .flat_map(|stage| match &mut stage.layer {
                Layer::Conv(conv) => conv.parameters_mut().into_iter().collect(),
                Layer::Linear { linear, .. } => linear.parameters_mut().into_iter().collect(),
                Layer::Lrn(_) | Layer::Pool(_) => Vec::new(),
            })
            .collect();
        sgd_step(
            gpu,
            optimiser,
            segments,
            !*has_velocity,
            SgdBuffers {
                weights: &mut weights,
                copies: &mut [],
                grads: flat_gradients,
                velocity,
                skip: None,
            },
        )?;
        *has_velocity = true;

        let losses = gpu
            .stream()
            .clone_dtoh(row_loss)
            .map_err(driver_err("read back the loss"))?;
        Ok((losses.iter().sum::<f64>() / n as f64) as f32)
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
    /// and names (to save, to evaluate, or to go on training on the CPU).
    fn weights(&self) -> Result<Weights> {
        let stream = self.gpu.stream();
        let mut tensors: Vec<Vec<f32>> = Vec::new();
        for stage in &self.stages {
            match &stage.layer {
                Layer::Conv(conv) => {
                    let [weight, bias] = conv.parameters();
                    let packed = stream.clone_dtoh(weight).map_err(driver_err("read back"))?;
                    let (out, k) = (conv.out_channels(), conv.kernel());
                    let oihw = unpack_conv_weights(
                        &packed,
                        [out, conv.in_channels(), k],
                        conv.in_channels(),
                        conv.options().layout,
                    )?;
                    tensors.push(oihw.into_raw_vec_and_offset().0);
                    tensors.push(stream.clone_dtoh(bias).map_err(driver_err("read back"))?);
                }
                Layer::Linear { linear, .. } => {
                    for tensor in linear.parameters() {
                        tensors.push(stream.clone_dtoh(tensor).map_err(driver_err("read back"))?);
                    }
                }
                Layer::Lrn(_) | Layer::Pool(_) => {}
            }
        }
        Weights::from_fn(&self.config, |index, _, _| {
            tensors.get(index).cloned().unwrap_or_default()
        })
    }

    /// The momentum of every trainable tensor, in network order (empty vectors before the
    /// first step): what [`crate::train::Sgd::velocity`] holds on the CPU, for checkpoints.
    fn velocity(&self) -> Result<Vec<Vec<f32>>> {
        if !self.has_velocity {
            return Ok(Vec::new());
        }
        let flat = self
            .gpu
            .stream()
            .clone_dtoh(&self.velocity)
            .map_err(driver_err("read back the momentum"))?;
        let mut at = 0;
        Ok(self
            .segments
            .iter()
            .map(|s| {
                at += s.len;
                flat[at - s.len..at].to_vec()
            })
            .collect())
    }

    /// Restores the momentum (from a checkpoint, possibly written by the CPU trainer): one
    /// vector per trainable tensor in network order, or none at all (no momentum yet).
    fn set_velocity(&mut self, velocity: Vec<Vec<f32>>) -> Result<()> {
        if velocity.is_empty() {
            self.has_velocity = false;
            return Ok(());
        }
        let lens: Vec<usize> = velocity.iter().map(Vec::len).collect();
        let want: Vec<usize> = self.segments.iter().map(|s| s.len).collect();
        if lens != want {
            return Err(Error::Shape {
                op: "CudaTrainer::set_velocity",
                expected: format!("momentum tensors of {want:?}"),
                found: lens,
            });
        }
        self.gpu
            .stream()
            .memcpy_htod(&velocity.concat(), &mut self.velocity)
            .map_err(driver_err("upload the momentum"))?;
        self.has_velocity = true;
        Ok(())
    }

    /// Evaluates with an inference model of the current weights on the same GPU (true fp32),
    /// built for the call: training keeps no inference buffers between validations.
    fn evaluate(
        &mut self,
        folder: &ImageFolder,
        preprocess: &Preprocess,
        batch: usize,
    ) -> Result<Evaluation> {
        let options = CudaOptions {
            device: self.gpu.ordinal(),
            ..CudaOptions::default()
        };
        let mut model = CudaModel::new(&self.weights()?, Precision::Fp32, options)?;
        evaluate(&mut model, folder, preprocess, batch)
    }
}

/// The `len` values of a trainable layer's weight and bias gradients in the flat buffer,
/// starting at `at` (`None`: the layer is frozen, and the backward must not reach it).
fn gradient_view(
    flat: &mut CudaSlice<f32>,
    at: Option<usize>,
    len: usize,
) -> Result<CudaViewMut<'_, f32>> {
    let at =
        at.ok_or_else(|| Error::invalid("CudaTrainer", "the backward reached a frozen layer"))?;
    if at + len > flat.len() {
        return Err(Error::invalid(
            "CudaTrainer",
            "a gradient beyond the flat buffer",
        ));
    }
    Ok(flat.slice_mut(at..at + len))
}
