//! Network parameters: the paper's seeded initialisation, safetensors load/save (see
//! [`Weights::load`]), name mapping and validation against an [`AlexNetConfig`].
//!
//! Layouts are PyTorch's: convolution weights `[out, in, kh, kw]` (OIHW), linear weights
//! `[out, in]`.

mod architecture;
mod diagnostics;
mod names;
mod read;
mod write;

pub use read::{CLASSES_METADATA_KEY, MAX_STREAMED_WEIGHTS_BYTES};
pub use write::{SaveOptions, StorageDtype, TensorNames};

use std::borrow::Cow;

use ndarray::{Array1, Array2, Array4, ArrayViewD};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::{AlexNetConfig, ParamSpec, StageOp};
use crate::error::{Error, Result};

/// Weight and bias of one convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvParams {
    /// `[out_channels, in_channels, kernel, kernel]`.
    pub weight: Array4<f32>,
    /// `[out_channels]`.
    pub bias: Array1<f32>,
}

/// Weight and bias of one linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearParams {
    /// `[out_features, in_features]`.
    pub weight: Array2<f32>,
    /// `[out_features]`.
    pub bias: Array1<f32>,
}

/// All parameters of one network, checked against its configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    config: AlexNetConfig,
    convs: Vec<ConvParams>,
    fcs: Vec<LinearParams>,
}

/// Standard deviation of the paper's weight initialisation.
pub const PAPER_INIT_STD: f32 = 0.01;

impl Weights {
    /// The paper's initialisation, reproducible from `seed`: every weight drawn from N(0, 0.01^2);
    /// biases 1 in conv2, conv4, conv5 and the hidden linear layers (fc1, fc2), 0 elsewhere.
    /// The same seed gives the same weights on every machine (ChaCha8 stream, one per tensor).
    pub fn paper_init(config: &AlexNetConfig, seed: u64) -> Result<Self> {
        let n_convs = config.convs.len();
        let n_fcs = config.fcs.len();
        let normal = Normal::new(0.0f32, PAPER_INIT_STD)
            .map_err(|e| Error::invalid("initialisation", e.to_string()))?;
        Self::from_fn(config, |index, name, shape| {
            let len: usize = shape.iter().product();
            if name.ends_with(".weight") {
                // One independent stream per tensor, so tensors do not depend on each other's sizes.
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(index as u64);
                normal.sample_iter(&mut rng).take(len).collect()
            } else {
                let layer = index / 2; // tensors come in (weight, bias) pairs, network order
                let one = if layer < n_convs {
                    matches!(layer, 1 | 3 | 4)
                } else {
                    layer - n_convs + 1 < n_fcs
                };
                vec![if one { 1.0 } else { 0.0 }; len]
            }
        })
    }

    /// Builds weights from a generator called once per tensor, in network order, with the
    /// tensor's index, its name (`conv1.weight`, ...) and its PyTorch shape; the generator returns
    /// the values in C order.
    pub fn from_fn(
        config: &AlexNetConfig,
        mut generate: impl FnMut(usize, &str, &[usize]) -> Vec<f32>,
    ) -> Result<Self> {
        let tensors = config
            .parameter_shapes()?
            .into_iter()
            .enumerate()
            .map(|(index, (name, shape))| {
                let values = generate(index, &name, &shape);
                (name, shape, values)
            })
            .collect::<Vec<_>>();
        Self::from_tensors(config, tensors)
    }

    /// Assembles weights from `(name, shape, values)` triples under the crate's names, checking
    /// each against the configuration's plan (names, shapes and order).
    pub(crate) fn from_tensors(
        config: &AlexNetConfig,
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        let plan = config.plan()?;
        let expected = plan.parameters().count();
        if tensors.len() != expected {
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} tensors given, the {} architecture has {expected}",
                    tensors.len(),
                    config.name,
                ),
            ));
        }
        let mut convs = Vec::with_capacity(config.convs.len());
        let mut fcs = Vec::with_capacity(config.fcs.len());
        let mut tensors = tensors.into_iter();
        let mut take = |want: &ParamSpec| -> Result<Vec<f32>> {
            let (name, shape, values) = tensors
                .next()
                .ok_or_else(|| Error::invalid("weights", format!("`{}` is missing", want.name)))?;
            if name != want.name || shape != want.shape || values.len() != want.len() {
                return Err(Error::invalid(
                    "weights",
                    format!(
                        "tensor `{name}` {shape:?} with {} values where `{}` {:?} was expected",
                        values.len(),
                        want.name,
                        want.shape
                    ),
                ));
            }
            Ok(values)
        };
        for stage in &plan.stages {
            let Some(params) = &stage.params else {
                continue;
            };
            let weight = take(&params.weight)?;
            let bias = Array1::from(take(&params.bias)?);
            let shape = &params.weight.shape;
            let shape_err =
                |e: ndarray::ShapeError| Error::invalid("weights", format!("{}: {e}", stage.name));
            if let StageOp::Conv { .. } = stage.op {
                let dims = [shape[0], shape[1], shape[2], shape[3]];
                let weight = Array4::from_shape_vec(dims, weight).map_err(shape_err)?;
                convs.push(ConvParams { weight, bias });
            } else {
                let weight =
                    Array2::from_shape_vec([shape[0], shape[1]], weight).map_err(shape_err)?;
                fcs.push(LinearParams { weight, bias });
            }
        }
        Ok(Weights {
            config: config.clone(),
            convs,
            fcs,
        })
    }

    /// The architecture these weights belong to.
    pub fn config(&self) -> &AlexNetConfig {
        &self.config
    }

    /// Convolution parameters in network order.
    pub fn convs(&self) -> &[ConvParams] {
        &self.convs
    }

    /// Linear-layer parameters in network order.
    pub fn fcs(&self) -> &[LinearParams] {
        &self.fcs
    }

    /// Every tensor under the crate's names, in network order, with its shape and values.
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Cow<'_, [f32]>)> {
        let layers = self
            .convs
            .iter()
            .map(|c| (c.weight.view().into_dyn(), c.bias.view().into_dyn()))
            .chain(
                self.fcs
                    .iter()
                    .map(|l| (l.weight.view().into_dyn(), l.bias.view().into_dyn())),
            );
        // Weights only exist for a configuration whose plan was built (`from_tensors`), and
        // the plan lists the parameters in the same (network) order as the layers.
        let names = self.config.plan().map(|plan| {
            plan.parameters()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        });
        let names = names.unwrap_or_default();
        let arrays = layers.flat_map(|(weight, bias)| [weight, bias]);
        names
            .into_iter()
            .zip(arrays)
            .map(|(name, array)| tensor_entry(name, array))
            .collect()
    }

    /// The first value that is not finite (NaN or infinite), as `(tensor name, flat index,
    /// value)` in network order: what a diverged training run leaves. `None` when all are.
    pub fn first_non_finite(&self) -> Option<(String, usize, f32)> {
        first_non_finite(
            self.named_tensors()
                .iter()
                .map(|(name, _, values)| (name.as_str(), values.as_ref())),
        )
    }

    /// Total number of parameters held.
    pub fn param_count(&self) -> usize {
        self.named_tensors().iter().map(|(_, _, v)| v.len()).sum()
    }

    /// A copy with every value rounded to f16 precision (what fp16 mode computes with).
    pub fn rounded_to_f16(&self) -> Self {
        self.rounded_with(|x| half::f16::from_f32(x).to_f32())
    }

    /// A copy with every value rounded to bf16 precision (what bf16 mode computes with).
    pub fn rounded_to_bf16(&self) -> Self {
        self.rounded_with(|x| half::bf16::from_f32(x).to_f32())
    }

    fn rounded_with(&self, round: impl Fn(f32) -> f32) -> Self {
        let round = |x: &f32| round(*x);
        Weights {
            config: self.config.clone(),
            convs: self
                .convs
                .iter()
                .map(|c| ConvParams {
                    weight: c.weight.map(round),
                    bias: c.bias.map(round),
                })
                .collect(),
            fcs: self
                .fcs
                .iter()
                .map(|l| LinearParams {
                    weight: l.weight.map(round),
                    bias: l.bias.map(round),
                })
                .collect(),
        }
    }
}

/// The first non-finite value of `tensors` (`(name, values)` in order) as `(name, flat index,
/// value)`.
pub(crate) fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
) -> Option<(String, usize, f32)> {
    tensors.into_iter().find_map(|(name, values)| {
        let at = values.iter().position(|v| !v.is_finite())?;
        Some((name.to_string(), at, values[at]))
    })
}

fn tensor_entry(name: String, array: ArrayViewD<'_, f32>) -> (String, Vec<usize>, Cow<'_, [f32]>) {
    let shape = array.shape().to_vec();
    // Arrays built by this crate are in standard layout and borrow; others are copied in C order.
    let values = match array.to_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(array.iter().copied().collect()),
    };
    (name, shape, values)
}
