//! Network parameters: the paper's seeded initialisation, safetensors load/save (see
//! [`Weights::load`]), name mapping and validation against an [`AlexNetConfig`].
//!
//! Layouts are PyTorch's: convolution weights `[out, in, kh, kw]` (OIHW), linear weights
//! `[out, in]`.

mod safetensors_io;

pub use safetensors_io::StorageDtype;

use std::borrow::Cow;

use ndarray::{Array1, Array2, Array4, ArrayViewD};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::AlexNetConfig;
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
    /// each against the configuration.
    pub(crate) fn from_tensors(
        config: &AlexNetConfig,
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        let expected = config.parameter_shapes()?;
        if tensors.len() != expected.len() {
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} tensors given, the {} architecture has {}",
                    tensors.len(),
                    config.name,
                    expected.len()
                ),
            ));
        }
        let mut convs = Vec::with_capacity(config.convs.len());
        let mut fcs = Vec::with_capacity(config.fcs.len());
        let mut pending_weight = None;
        for ((name, shape, values), (want_name, want_shape)) in tensors.into_iter().zip(expected) {
            if name != want_name
                || shape != want_shape
                || values.len() != want_shape.iter().product::<usize>()
            {
                return Err(Error::invalid(
                    "weights",
                    format!(
                        "tensor `{name}` {shape:?} with {} values where `{want_name}` {want_shape:?} was expected",
                        values.len()
                    ),
                ));
            }
            if name.ends_with(".weight") {
                pending_weight = Some((shape, values));
                continue;
            }
            let Some((w_shape, w_values)) = pending_weight.take() else {
                return Err(Error::invalid(
                    "weights",
                    format!("bias `{name}` without its weight"),
                ));
            };
            let bias = Array1::from(values);
            let shape_err =
                |e: ndarray::ShapeError| Error::invalid("weights", format!("{name}: {e}"));
            if name.starts_with("conv") {
                let dims = [w_shape[0], w_shape[1], w_shape[2], w_shape[3]];
                let weight = Array4::from_shape_vec(dims, w_values).map_err(shape_err)?;
                convs.push(ConvParams { weight, bias });
            } else {
                let weight = Array2::from_shape_vec([w_shape[0], w_shape[1]], w_values)
                    .map_err(shape_err)?;
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
        let mut out = Vec::with_capacity(2 * (self.convs.len() + self.fcs.len()));
        for (i, c) in self.convs.iter().enumerate() {
            out.push(tensor_entry(
                format!("conv{}.weight", i + 1),
                c.weight.view().into_dyn(),
            ));
            out.push(tensor_entry(
                format!("conv{}.bias", i + 1),
                c.bias.view().into_dyn(),
            ));
        }
        for (i, l) in self.fcs.iter().enumerate() {
            out.push(tensor_entry(
                format!("fc{}.weight", i + 1),
                l.weight.view().into_dyn(),
            ));
            out.push(tensor_entry(
                format!("fc{}.bias", i + 1),
                l.bias.view().into_dyn(),
            ));
        }
        out
    }

    /// Total number of parameters held.
    pub fn param_count(&self) -> usize {
        self.named_tensors().iter().map(|(_, _, v)| v.len()).sum()
    }

    /// A copy with every value rounded to f16 precision (what fp16 mode computes with).
    pub fn rounded_to_f16(&self) -> Self {
        let round = |x: &f32| half::f16::from_f32(*x).to_f32();
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

fn tensor_entry(name: String, array: ArrayViewD<'_, f32>) -> (String, Vec<usize>, Cow<'_, [f32]>) {
    let shape = array.shape().to_vec();
    // Arrays built by this crate are in standard layout and borrow; others are copied in C order.
    let values = match array.to_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(array.iter().copied().collect()),
    };
    (name, shape, values)
}
