//! The model description: [`AlexNetConfig`] with the paper's and torchvision's presets, the layer
//! specs, and the shape and parameter arithmetic derived from them (nothing here is typed in).

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
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "fp16" | "f16" => Ok(Precision::Fp16),
            other => Err(Error::invalid(
                "precision",
                format!("`{other}` (expected fp32 or fp16)"),
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

/// Which kind of row a [`LayerRow`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Conv,
    Pool,
    Linear,
}

/// One row of the summary table (the seed's table for [`AlexNetConfig::paper`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRow {
    /// "Conv1", "Pool1", "FC1", ...
    pub name: String,
    pub kind: LayerKind,
    /// Output activation shape: `[C, H, W]` for conv and pool rows, `[features]` for linear rows.
    pub output: Vec<usize>,
    /// Square filter side for convolutions, `None` otherwise.
    pub filter: Option<usize>,
    pub weights: usize,
    pub biases: usize,
}

impl LayerRow {
    pub fn params(&self) -> usize {
        // `layers()` checked that `weights` fits; saturate rather than wrap on the bias.
        self.weights.saturating_add(self.biases)
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

    /// Checks that every stage is well formed and that the shapes work out; returns the per-layer
    /// rows. Every other method that needs shapes goes through here.
    pub fn layers(&self) -> Result<Vec<LayerRow>> {
        if self.convs.is_empty() || self.fcs.is_empty() {
            return Err(Error::invalid(
                "config",
                "need at least one convolution and one linear layer",
            ));
        }
        let InputShape {
            channels: mut c,
            height: mut h,
            width: mut w,
        } = self.input;
        if c == 0 || h == 0 || w == 0 {
            return Err(Error::invalid("config", "input shape has a zero dimension"));
        }
        let mut rows = Vec::new();
        for (i, conv) in self.convs.iter().enumerate() {
            let n = i + 1;
            if conv.out_channels == 0 || conv.kernel == 0 || conv.stride == 0 {
                return Err(Error::invalid(
                    "config",
                    format!("conv{n}: channels, kernel and stride must be positive"),
                ));
            }
            h = conv_out(h, conv.kernel, conv.stride, conv.padding)
                .ok_or_else(|| too_small(format!("conv{n}"), h, w))?;
            w = conv_out(w, conv.kernel, conv.stride, conv.padding)
                .ok_or_else(|| too_small(format!("conv{n}"), h, w))?;
            let weights = checked_product(&[conv.out_channels, c, conv.kernel, conv.kernel])?;
            c = conv.out_channels;
            rows.push(LayerRow {
                name: format!("Conv{n}"),
                kind: LayerKind::Conv,
                output: vec![c, h, w],
                filter: Some(conv.kernel),
                weights,
                biases: c,
            });
            if let Some(lrn) = conv.lrn {
                if lrn.size == 0 {
                    return Err(Error::invalid("config", format!("conv{n}: LRN size is 0")));
                }
            }
            if let Some(pool) = conv.pool {
                if pool.kernel == 0 || pool.stride == 0 {
                    return Err(Error::invalid(
                        "config",
                        format!("pool after conv{n}: kernel and stride must be positive"),
                    ));
                }
                h = conv_out(h, pool.kernel, pool.stride, 0)
                    .ok_or_else(|| too_small(format!("pool after conv{n}"), h, w))?;
                w = conv_out(w, pool.kernel, pool.stride, 0)
                    .ok_or_else(|| too_small(format!("pool after conv{n}"), h, w))?;
                let pool_index = rows.iter().filter(|r| r.kind == LayerKind::Pool).count() + 1;
                rows.push(LayerRow {
                    name: format!("Pool{pool_index}"),
                    kind: LayerKind::Pool,
                    output: vec![c, h, w],
                    filter: None,
                    weights: 0,
                    biases: 0,
                });
            }
        }
        let mut features = checked_product(&[c, h, w])?;
        for (i, fc) in self.fcs.iter().enumerate() {
            if fc.out_features == 0 {
                return Err(Error::invalid("config", format!("fc{}: zero width", i + 1)));
            }
            if let Some(p) = fc.dropout {
                if !(0.0..1.0).contains(&p) {
                    return Err(Error::invalid(
                        "config",
                        format!("fc{}: dropout probability {p} is not in [0, 1)", i + 1),
                    ));
                }
            }
            rows.push(LayerRow {
                name: format!("FC{}", i + 1),
                kind: LayerKind::Linear,
                output: vec![fc.out_features],
                filter: None,
                weights: checked_product(&[fc.out_features, features])?,
                biases: fc.out_features,
            });
            features = fc.out_features;
        }
        Ok(rows)
    }

    /// Total number of learnable parameters.
    pub fn param_count(&self) -> Result<usize> {
        self.layers()?
            .iter()
            .try_fold(0usize, |total, row| total.checked_add(row.params()))
            .ok_or_else(|| Error::invalid("config", "parameter count overflows usize"))
    }

    /// Input features of the first linear layer (the flattened output of the last conv stage).
    pub fn flattened_features(&self) -> Result<usize> {
        let rows = self.layers()?;
        rows.iter()
            .rev()
            .find(|r| r.kind != LayerKind::Linear)
            .map(|r| r.output.iter().product())
            .ok_or_else(|| Error::invalid("config", "no convolution stage"))
    }

    /// The shapes of every parameter tensor, PyTorch layout (conv OIHW, linear [out, in]), in
    /// network order, under the crate's names (`conv1.weight`, ..., `fc3.bias`).
    pub fn parameter_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let mut shapes = Vec::new();
        let mut in_channels = self.input.channels;
        for (i, conv) in self.convs.iter().enumerate() {
            let k = conv.kernel;
            shapes.push((
                format!("conv{}.weight", i + 1),
                vec![conv.out_channels, in_channels, k, k],
            ));
            shapes.push((format!("conv{}.bias", i + 1), vec![conv.out_channels]));
            in_channels = conv.out_channels;
        }
        let mut features = self.flattened_features()?;
        for (i, fc) in self.fcs.iter().enumerate() {
            shapes.push((
                format!("fc{}.weight", i + 1),
                vec![fc.out_features, features],
            ));
            shapes.push((format!("fc{}.bias", i + 1), vec![fc.out_features]));
            features = fc.out_features;
        }
        Ok(shapes)
    }

    /// Floating-point operations (2 x multiply-adds) of the convolutions and linear layers for one
    /// image: the figure achieved TFLOP/s is computed from.
    pub fn flops_per_image(&self) -> Result<u64> {
        // u128: spatial size x weights can exceed u64 for absurd configs; that is an error.
        let mut total = 0u128;
        for row in self.layers()? {
            match row.kind {
                LayerKind::Conv => {
                    let positions: usize = row.output[1..].iter().product();
                    total += 2 * row.weights as u128 * positions as u128;
                }
                LayerKind::Linear => total += 2 * row.weights as u128,
                LayerKind::Pool => {}
            }
        }
        u64::try_from(total).map_err(|_| Error::invalid("config", "FLOP count overflows u64"))
    }

    /// The summary table as text, in the seed's format.
    pub fn summary(&self) -> Result<String> {
        Ok(SummaryTable(self.layers()?).to_string())
    }
}

/// The product of `dims`, or an error where it overflows (sizes can come from a weights file).
fn checked_product(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d))
        .ok_or_else(|| Error::invalid("config", format!("size {dims:?} overflows usize")))
}

/// Output length of a sliding window (floor mode); `None` when the window does not fit.
fn conv_out(len: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = len + 2 * padding;
    (padded >= kernel).then(|| (padded - kernel) / stride + 1)
}

fn too_small(stage: String, h: usize, w: usize) -> Error {
    Error::invalid(
        "config",
        format!("{stage}: the window does not fit a {h}x{w} input"),
    )
}

/// Formats rows like the seed's table, with thousands separators.
struct SummaryTable(Vec<LayerRow>);

impl fmt::Display for SummaryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| {:<6} | {:<10} | {:<6} | {:>10} | {:>6} | {:>10} |",
            "Layer", "Activation", "Filter", "Weights", "Biases", "Parameters"
        )?;
        writeln!(
            f,
            "|{:-<8}|{:-<12}|{:-<8}|{:-<12}|{:-<8}|{:-<12}|",
            "", "", "", "", "", ""
        )?;
        let mut total = 0;
        for row in &self.0 {
            let activation = row
                .output
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            let filter = row.filter.map_or("-".to_string(), |k| format!("{k}x{k}"));
            writeln!(
                f,
                "| {:<6} | {:<10} | {:<6} | {:>10} | {:>6} | {:>10} |",
                row.name,
                activation,
                filter,
                thousands(row.weights),
                thousands(row.biases),
                thousands(row.params())
            )?;
            total += row.params();
        }
        write!(
            f,
            "| {:<6} | {:<10} | {:<6} | {:>10} | {:>6} | {:>10} |",
            "Total",
            "",
            "",
            "",
            "",
            thousands(total)
        )
    }
}

/// `62378344` -> `62,378,344`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
