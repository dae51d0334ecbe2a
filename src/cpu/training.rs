//! The CPU model in training mode: a forward that keeps what the backward needs (dropout
//! active), the backward through every stage, and the parameters open to an optimiser.

use ndarray::{ArrayD, ArrayView2, ArrayView4, Ix2, Ix4};

use super::model::{CpuModel, Layer};
use super::{relu_backward, InputGradient};
use crate::config::Precision;
use crate::cpu::dropout::layer_seed;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// What [`CpuModel::forward_train`] keeps for [`CpuModel::backward`]: every stage's input,
/// the logits, and the dropout masks' seeds.
#[derive(Clone, Debug)]
pub struct Tape {
    /// `activations[i]` is stage `i`'s input; the last one is the logits.
    activations: Vec<ArrayD<f32>>,
    /// Per stage, the seed its dropout drew its mask from (stages without dropout: `None`).
    dropout_seeds: Vec<Option<u64>>,
}

impl Tape {
    /// Stage `i`'s input (`i` = the number of stages: the logits), for inspecting a training
    /// forward stage by stage.
    pub fn activation(&self, i: usize) -> Option<ndarray::ArrayViewD<'_, f32>> {
        self.activations.get(i).map(|a| a.view())
    }

    /// The logits `[N, classes]` of the training forward.
    pub fn logits(&self) -> Result<ArrayView2<'_, f32>> {
        self.activations
            .last()
            .ok_or_else(|| Error::invalid("tape", "empty"))?
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|e| Error::invalid("tape logits", e.to_string()))
    }
}

/// The gradient of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradient {
    /// The parameter's name (`conv1.weight`, ..., `fc3.bias`).
    pub name: String,
    /// Its PyTorch shape (conv OIHW, linear `[out, in]`).
    pub shape: Vec<usize>,
    /// Its values in C order, summed over the batch.
    pub values: Vec<f32>,
}

/// Every parameter's gradient, in network order (the order of [`CpuModel::parameters`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    pub tensors: Vec<Gradient>,
}

impl Gradients {
    /// The gradient of the parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Gradient> {
        self.tensors.iter().find(|g| g.name == name)
    }
}

impl CpuModel {
    /// The forward in training mode: dropout draws its masks (the `l`-th dropout layer from
    /// [`layer_seed`]`(step_seed, l)`), and every stage's input is kept for
    /// [`CpuModel::backward`]. Training computes in fp32: an fp16 model is an error.
    pub fn forward_train(&self, input: ArrayView4<'_, f32>, step_seed: u64) -> Result<Tape> {
        self.check_trainable()?;
        let n = self
            .config()
            .input
            .check_batch("CpuModel::forward_train", input.shape())?;
        let mut activations = Vec::with_capacity(self.stages.len() + 1);
        let mut dropout_seeds = Vec::with_capacity(self.stages.len());
        activations.push(input.to_owned().into_dyn());
        let mut dropouts = 0u64;
        for stage in &self.stages {
            let x = activations
                .last()
                .ok_or_else(|| Error::invalid("tape", "empty"))?;
            let mut seed = None;
            let out = match &stage.layer {
                Layer::Conv(conv) => self.conv_stage(stage, conv, image(x)?)?.into_dyn(),
                Layer::Lrn(lrn) => lrn.forward(image(x)?)?.into_dyn(),
                Layer::Pool(pool) => pool.forward(image(x)?)?.into_dyn(),
                Layer::Linear {
                    linear,
                    relu,
                    dropout,
                } => {
                    let out = self.linear_stage(stage, linear, flat(x, n)?, *relu)?;
                    match dropout {
                        Some(dropout) => {
                            let s = layer_seed(step_seed, dropouts);
                            dropouts += 1;
                            seed = Some(s);
                            dropout.forward_train(out.view().into_dyn(), s)
                        }
                        None => out.into_dyn(),
                    }
                }
            };
            activations.push(out);
            dropout_seeds.push(seed);
        }
        Ok(Tape {
            activations,
            dropout_seeds,
        })
    }

    /// The gradients of every parameter, given the logits' gradient `grad_logits` (for
    /// instance [`crate::cpu::softmax_cross_entropy`]'s) and the tape of the forward that
    /// produced them.
    pub fn backward(&self, tape: &Tape, grad_logits: ArrayView2<'_, f32>) -> Result<Gradients> {
        self.backward_trainable(tape, grad_logits, 0)
    }

    /// [`CpuModel::backward`] with the first `frozen_layers` layers that have parameters
    /// (conv1, conv2, ... in network order) frozen: the gradients of the layers after them
    /// only, in network order, and nothing computed in front of the first trainable layer.
    /// Freezing every layer is an error (nothing would train).
    pub fn backward_trainable(
        &self,
        tape: &Tape,
        grad_logits: ArrayView2<'_, f32>,
        frozen_layers: usize,
    ) -> Result<Gradients> {
        self.check_trainable()?;
        let layers = self.parameter_layers();
        if frozen_layers >= layers.len() {
            return Err(Error::invalid(
                "frozen layers",
                format!(
                    "{frozen_layers} of the model's {} layers with parameters: nothing would train",
                    layers.len()
                ),
            ));
        }
        if tape.activations.len() != self.stages.len() + 1 {
            return Err(Error::invalid(
                "tape",
                "it was not recorded by this model's forward_train",
            ));
        }
        let logits = tape.logits()?;
        if grad_logits.dim() != logits.dim() {
            return Err(Error::Shape {
                op: "CpuModel::backward",
                expected: format!("a gradient shaped like the logits {:?}", logits.shape()),
                found: grad_logits.shape().to_vec(),
            });
        }
        let n = logits.dim().0;
        let plan = self.config().plan()?;
        let mut specs = plan.parameters().collect::<Vec<_>>().into_iter().rev();
        let mut tensors = Vec::with_capacity(specs.len());
        let mut push = |values: Vec<f32>| -> Result<()> {
            let spec = specs
                .next()
                .ok_or_else(|| Error::invalid("backward", "more gradients than parameters"))?;
            if values.len() != spec.len() {
                return Err(Error::invalid(
                    "backward",
                    format!("{} values for {}", values.len(), spec.name),
                ));
            }
            tensors.push(Gradient {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                values,
            });
            Ok(())
        };
        let mut grad: ArrayD<f32> = grad_logits.to_owned().into_dyn();
        let mut layer = layers.len(); // parameterised layers not yet passed, counting backwards
        for (i, stage) in self.stages.iter().enumerate().rev() {
            if matches!(stage.layer, Layer::Conv(_) | Layer::Linear { .. }) {
                layer -= 1;
            }
            // The first trainable layer needs no input gradient: nothing in front of it learns.
            let first_trainable = layer == frozen_layers;
            let input = &tape.activations[i];
            let output = &tape.activations[i + 1];
            grad = match &stage.layer {
                Layer::Conv(conv) => {
                    let g = relu_backward(output.view(), grad.view())?;
                    let g = g
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| Error::invalid("conv gradient", e.to_string()))?;
                    let wanted = if i == 0 || first_trainable {
                        InputGradient::Skip
                    } else {
                        InputGradient::Compute
                    };
                    let grads = self.conv_backward(conv, image(input)?, g.view(), wanted)?;
                    // Pushed in reverse network order: bias, then weight.
                    push(grads.bias.to_vec())?;
                    push(grads.weight.into_raw_vec_and_offset().0)?;
                    match grads.input {
                        Some(g) => g.into_dyn(),
                        None => break,
                    }
                }
                Layer::Lrn(lrn) => lrn.backward(image(input)?, image(&grad)?)?.into_dyn(),
                Layer::Pool(pool) => pool.backward(image(input)?, image(&grad)?)?.into_dyn(),
                Layer::Linear {
                    linear,
                    relu,
                    dropout,
                } => {
                    if let (Some(dropout), Some(seed)) = (dropout, tape.dropout_seeds[i]) {
                        grad = dropout.backward_train(grad.view(), seed);
                    }
                    if *relu {
                        // The stored output is after dropout, whose positive scale keeps every
                        // sign; where it dropped a unit the gradient is already 0.
                        grad = relu_backward(output.view(), grad.view())?;
                    }
                    let g = grad
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::invalid("linear gradient", e.to_string()))?;
                    let spare = stage.take_spare_gradient();
                    let grads = linear.backward_reusing(flat(input, n)?, g.view(), spare)?;
                    push(grads.bias.to_vec())?;
                    push(grads.weight.into_raw_vec_and_offset().0)?;
                    if first_trainable {
                        break;
                    }
                    // Unflattened back to the stage input's shape.
                    grads
                        .input
                        .into_shape_with_order(input.shape())
                        .map_err(|e| Error::invalid("linear gradient", e.to_string()))?
                }
            };
        }
        tensors.reverse();
        Ok(Gradients { tensors })
    }

    /// Hands the memory of `gradients` (from this model's backward) back, for the next
    /// backward to write the linear layers' weight gradients into instead of new memory: fc1's
    /// alone is 151 MB, which the kernel would otherwise map in and clear every step. What
    /// [`crate::train::CpuTrainer`] does after each update; the values are never read again.
    /// A gradient of another shape (or of a layer without a weight of that name) is dropped.
    pub fn recycle_gradients(&self, gradients: Gradients) {
        for gradient in gradients.tensors {
            let stage = self.stages.iter().find(|stage| {
                matches!(stage.layer, Layer::Linear { .. })
                    && gradient.name.strip_suffix(".weight") == Some(stage.name.as_str())
            });
            if let Some(stage) = stage {
                stage.give_spare_gradient(gradient.values);
            }
        }
    }

    /// The names of the layers with parameters (`conv1`, ..., `fc3`), in network order: what
    /// [`CpuModel::backward_trainable`]'s `frozen_layers` counts.
    pub fn parameter_layers(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|stage| matches!(stage.layer, Layer::Conv(_) | Layer::Linear { .. }))
            .map(|stage| stage.name.as_str())
            .collect()
    }

    /// Every parameter tensor, in network order (`conv1.weight`, `conv1.bias`, ...).
    pub fn parameters(&self) -> Vec<&[f32]> {
        self.stages
            .iter()
            .flat_map(|stage| match &stage.layer {
                Layer::Conv(conv) => conv.parameters().to_vec(),
                Layer::Linear { linear, .. } => linear.parameters().to_vec(),
                Layer::Lrn(_) | Layer::Pool(_) => Vec::new(),
            })
            .collect()
    }

    /// Every parameter tensor for an optimiser to update in place, in the order of
    /// [`CpuModel::parameters`].
    /// The weights packed for the model's own kernels are dropped here and packed again from
    /// the updated values by the next forward.
    pub fn parameters_mut(&mut self) -> Vec<&mut [f32]> {
        self.drop_packed_weights();
        self.stages
            .iter_mut()
            .flat_map(|stage| match &mut stage.layer {
                Layer::Conv(conv) => conv.parameters_mut().into_iter().collect(),
                Layer::Linear { linear, .. } => linear.parameters_mut().into_iter().collect(),
                Layer::Lrn(_) | Layer::Pool(_) => Vec::new(),
            })
            .collect()
    }

    /// The current parameters as [`Weights`] (to save, or to build another backend from).
    pub fn weights(&self) -> Result<Weights> {
        let params = self.parameters();
        Weights::from_fn(self.config(), |index, _, _| {
            params.get(index).map(|p| p.to_vec()).unwrap_or_default()
        })
    }

    fn check_trainable(&self) -> Result<()> {
        match self.precision() {
            Precision::Fp32 | Precision::Tf32 => Ok(()),
            other => Err(Error::invalid(
                "precision",
                format!("training on the CPU computes in fp32; this model is {other:?}"),
            )),
        }
    }
}

/// An `[N, C, H, W]` view of a stage's activation.
fn image(a: &ArrayD<f32>) -> Result<ArrayView4<'_, f32>> {
    a.view()
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::invalid("activation", e.to_string()))
}

/// An `[N, features]` view of a stage's activation (flattened in (C, H, W) order).
fn flat(a: &ArrayD<f32>, n: usize) -> Result<ArrayView2<'_, f32>> {
    let features = a.len() / n.max(1);
    a.view()
        .into_shape_with_order((n, features))
        .map_err(|e| Error::invalid("flatten", e.to_string()))
}
