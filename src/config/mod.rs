//! The model description: [`AlexNetConfig`] with the paper's and torchvision's presets, the layer
//! specs and [`Precision`]; [`AlexNetConfig::plan`] unrolls a configuration into the stages every backend runs,
//! with all shape and parameter arithmetic (nothing is typed in); [`AlexNetConfig::summary`] prints the seed's
//! table from it.

mod plan;
mod summary;

pub use plan::{window_output, ParamSpec, Plan, Stage, StageOp, StageParams};
pub use summary::{thousands, LayerKind, LayerRow};

use summary::SummaryTable;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Numeric mode of a model: how weights and activations are stored and computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 storage and arithmetic.
    #[default]
    Fp32,
    /// f16 storage (weights and activations) with f32 accumulation.
    Fp16,
    /// bf16 storage (weights and activations) with f32 accumulation: f32's range with an 8-bit
    /// significand (about 4e-3 relative rounding). On the GPU it needs compute capability 8.0
    /// (Ampere) or newer, and trains there as mixed precision (f32 masters), as fp16 does.
    Bf16,
    /// f32 storage; convolutions and GEMMs on the GPU in TF32 math (10-bit mantissa inputs,
    /// f32 accumulation: about 1e-3 relative error, several times faster on tensor cores),
    /// PyTorch's default for convolutions. A GPU math mode: the CPU computes it as fp32.
    Tf32,
}

impl Precision {
    /// What the CPU computes for this precision: `Tf32` is a GPU math mode and runs as `Fp32`.
    pub fn on_cpu(self) -> Precision {
        match self {
            Precision::Tf32 => Precision::Fp32,
            other => other,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Tf32 => "tf32",
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "fp16" | "f16" => Ok(Precision::Fp16),
            "bf16" => Ok(Precision::Bf16),
            "tf32" => Ok(Precision::Tf32),
            other => Err(Error::invalid(
                "precision",
                format!("`{other}` (expected fp32, fp16, bf16 or tf32)"),
            )),
        }
    }
}

/// Inter-channel local response normalisation, in the paper's convention:
/// `b_c = a_c / (k + alpha * sum_{j in window(c)} a_j^2)^beta`, the window holding `size` channels
/// centred on `c` (`size/2` before, `(size-1)/2` after, as PyTorch) and clipped at the edges.
///
/// PyTorch's `nn.LocalResponseNorm` (and Caffe) divide `alpha` by `size`; the same layer there is
/// `LocalResponseNorm(size, alpha = alpha * size, beta, k)` (see [`LrnParams::pytorch_alpha`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrnParams {
    /// Number of channels in the window (n in the paper).
    pub size: usize,
    pub k: f32,
    /// The paper's alpha, **not** divided by `size`.
    pub alpha: f32,
    pub beta: f32,
}

impl LrnParams {
    /// The paper's settings: n = 5, k = 2, alpha = 1e-4, beta = 0.75.
    pub const PAPER: LrnParams = LrnParams {
        size: 5,
        k: 2.0,
        alpha: 1e-4,
        beta: 0.75,
    };

    /// The `alpha` to give PyTorch's `nn.LocalResponseNorm` for the same layer.
    pub fn pytorch_alpha(&self) -> f32 {
        self.alpha * self.size as f32
    }
}

/// Max-pooling window (no padding, floor mode, as in the paper and PyTorch's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub kernel: usize,
    pub stride: usize,
}

impl PoolSpec {
    /// The paper's overlapping pooling: 3x3 windows, stride 2.
    pub const OVERLAPPING: PoolSpec = PoolSpec {
        kernel: 3,
        stride: 2,
    };
}

/// One convolution stage: conv -> ReLU -> optional LRN -> optional max-pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvSpec {
    pub out_channels: usize,
    /// Square kernel side.
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub lrn: Option<LrnParams>,
    pub pool: Option<PoolSpec>,
}

/// One fully connected stage: linear -> optional ReLU -> optional dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearSpec {
    pub out_features: usize,
    pub relu: bool,
    /// Dropout probability after the ReLU (`None`: no dropout layer).
    pub dropout: Option<f32>,
}

/// How dropout scales activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DropoutMode {
    /// Training keeps units with probability `1 - p` and scales them by `1 / (1 - p)`; inference is
    /// the identity. What PyTorch does.
    #[default]
    Inverted,
    /// The paper's form: training keeps units unscaled; inference multiplies outputs by `1 - p`.
    Classic,
}

/// Shape of one input image: channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl InputShape {
    /// The side of the square RGB images this input takes (what 8-bit image batches hold), or
    /// [`Error::Invalid`] naming `what` for any other input.
    pub fn square_rgb_side(&self, what: &'static str) -> Result<usize> {
        if self.channels != 3 || self.height != self.width {
            return Err(Error::invalid(
                what,
                format!(
                    "8-bit images are square RGB; the model takes {}x{}x{}",
                    self.channels, self.height, self.width
                ),
            ));
        }
        Ok(self.height)
    }

    /// The batch size of an `[N, C, H, W]` input `shape` that matches this input, or
    /// [`Error::Shape`] naming `op` when it does not (or `N` is 0).
    pub fn check_batch(&self, op: &'static str, shape: &[usize]) -> Result<usize> {
        match *shape {
            [n, c, h, w] if n > 0 && (c, h, w) == (self.channels, self.height, self.width) => Ok(n),
            _ => Err(Error::Shape {
                op,
                expected: format!(
                    "[N >= 1, {}, {}, {}]",
                    self.channels, self.height, self.width
                ),
                found: shape.to_vec(),
            }),
        }
    }
}

/// The whole network: the input shape, the convolution stages and the fully connected stages.
#[derive(Clone, Debug, PartialEq)]
pub struct AlexNetConfig {
    /// A short name for messages and summaries ("paper", "torchvision", or your own).
    pub name: String,
    pub input: InputShape,
    pub convs: Vec<ConvSpec>,
    pub fcs: Vec<LinearSpec>,
    pub dropout_mode: DropoutMode,
}

impl Default for AlexNetConfig {
    fn default() -> Self {
        Self::paper()
    }
}

impl AlexNetConfig {
    /// AlexNet as in the paper: 96-256-384-384-256 channels, LRN after conv1 and conv2, overlapping
    /// pooling, 4096-4096-1000 fully connected layers with dropout 0.5; 62,378,344 parameters.
    pub fn paper() -> Self {
        Self::five_conv_three_fc("paper", [96, 256, 384, 384, 256], Some(LrnParams::PAPER))
    }

    /// torchvision's `alexnet`: 64-192-384-256-256 channels, no LRN; 61,100,840 parameters.
    /// (torchvision's adaptive average pool to 6x6 is the identity for 224x224 inputs.)
    pub fn torchvision() -> Self {
        Self::five_conv_three_fc("torchvision", [64, 192, 384, 256, 256], None)
    }

    /// A preset by name: "paper" or "torchvision".
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::paper()),
            "torchvision" => Ok(Self::torchvision()),
            other => Err(Error::invalid(
                "config",
                format!("unknown preset `{other}` (expected `paper` or `torchvision`)"),
            )),
        }
    }

    /// The AlexNet skeleton with the given conv channels and optional LRN after conv1 and conv2.
    pub fn five_conv_three_fc(name: &str, channels: [usize; 5], lrn: Option<LrnParams>) -> Self {
        let pool = Some(PoolSpec::OVERLAPPING);
        let conv = |i: usize, kernel, stride, padding, lrn, pool| ConvSpec {
            out_channels: channels[i],
            kernel,
            stride,
            padding,
            lrn,
            pool,
        };
        AlexNetConfig {
            name: name.to_string(),
            input: InputShape {
                channels: 3,
                height: 224,
                width: 224,
            },
            convs: vec![
                conv(0, 11, 4, 2, lrn, pool),
                conv(1, 5, 1, 2, lrn, pool),
                conv(2, 3, 1, 1, None, None),
                conv(3, 3, 1, 1, None, None),
                conv(4, 3, 1, 1, None, pool),
            ],
            fcs: vec![
                LinearSpec {
                    out_features: 4096,
                    relu: true,
                    dropout: Some(0.5),
                },
                LinearSpec {
                    out_features: 4096,
                    relu: true,
                    dropout: Some(0.5),
                },
                LinearSpec {
                    out_features: 1000,
                    relu: false,
                    dropout: None,
                },
            ],
            dropout_mode: DropoutMode::Inverted,
        }
    }

    /// Number of output classes (the last linear layer's width).
    pub fn num_classes(&self) -> usize {
        self.fcs.last().map_or(0, |fc| fc.out_features)
    }

    /// The summary table's rows (see [`Plan::summary_rows`]); an error when the configuration
    /// is malformed. Every method below that needs shapes goes through [`AlexNetConfig::plan`].
    pub fn layers(&self) -> Result<Vec<LayerRow>> {
        Ok(self.plan()?.summary_rows())
    }

    /// Total number of learnable parameters.
    pub fn param_count(&self) -> Result<usize> {
        self.plan()?.param_count()
    }

    /// Input features of the first linear layer (the flattened output of the last conv stage).
    pub fn flattened_features(&self) -> Result<usize> {
        Ok(self.plan()?.flatten_shape().iter().product())
    }

    /// The shapes of every parameter tensor, PyTorch layout (conv OIHW, linear [out, in]), in
    /// network order, under the crate's names (`conv1.weight`, ..., `fc3.bias`).
    pub fn parameter_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(self
            .plan()?
            .parameters()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect())
    }

    /// Floating-point operations (2 x multiply-adds) of the convolutions and linear layers for one
    /// image: the figure achieved TFLOP/s is computed from.
    pub fn flops_per_image(&self) -> Result<u64> {
        self.plan()?.flops_per_image()
    }

    /// The summary table as text, in the seed's format.
    pub fn summary(&self) -> Result<String> {
        Ok(SummaryTable(self.layers()?).to_string())
    }
}
