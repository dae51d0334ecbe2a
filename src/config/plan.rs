//! The execution plan: an [`AlexNetConfig`] unrolled into the stages a backend runs, each with
//! its name, operation, per-image input and output shapes and parameter tensors. Computed once
//! with checked arithmetic; the summary table, the weights loader and both backends read it, so
//! no shape, name or window formula is written anywhere else.

use super::{AlexNetConfig, DropoutMode, InputShape, LrnParams, PoolSpec};
use crate::error::{Error, Result};

/// What one stage computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StageOp {
    /// Cross-correlation with `kernel x kernel` filters, zero padding, plus bias, then ReLU.
    Conv {
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// The paper's inter-channel LRN.
    Lrn(LrnParams),
    /// Max-pooling, no padding, floor mode.
    MaxPool(PoolSpec),
    /// `x W^T + b` on the flattened input, then ReLU if `relu`; `dropout` is the probability of
    /// the dropout that follows in training (at inference: the identity, or a scaling by `1 - p`
    /// under [`DropoutMode::Classic`]).
    Linear {
        out_features: usize,
        relu: bool,
        dropout: Option<f32>,
    },
}

/// A parameter tensor: its name in weight files (`conv1.weight`) and PyTorch-layout shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// Number of values.
    pub fn len(&self) -> usize {
        // The plan checked every product when it was built.
        self.shape.iter().product()
    }

    /// Always false: the plan has no empty tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The weight and bias of a conv or linear stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageParams {
    /// Conv: `[out, in, k, k]` (OIHW); linear: `[out, in]`.
    pub weight: ParamSpec,
    /// `[out]`.
    pub bias: ParamSpec,
}

/// One stage of the network.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// `conv1`, `lrn1`, `pool1`, ..., `fc3`: the names both backends report activations under.
    /// LRN stages take their convolution's number; pooling stages count themselves.
    pub name: String,
    pub op: StageOp,
    /// Per-image input shape: `[C, H, W]`, or `[features]` for linear stages (the first one's
    /// input is the previous stage's `[C, H, W]` flattened in (C, H, W) order).
    pub input: Vec<usize>,
    /// Per-image output shape, in the same convention.
    pub output: Vec<usize>,
    /// Conv and linear stages only.
    pub params: Option<StageParams>,
}

impl Stage {
    /// Values in one image's output.
    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }
}

/// The whole network as stages, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub input: InputShape,
    pub stages: Vec<Stage>,
    pub dropout_mode: DropoutMode,
}

impl Plan {
    /// Every parameter tensor in network order (weight then bias of each layer): the order of
    /// [`crate::Weights`] and of weight files.
    pub fn parameters(&self) -> impl Iterator<Item = &ParamSpec> {
        self.stages
            .iter()
            .filter_map(|s| s.params.as_ref())
            .flat_map(|p| [&p.weight, &p.bias])
    }

    /// The convolution stages, in order.
    pub fn convs(&self) -> impl Iterator<Item = &Stage> {
        self.stages
            .iter()
            .filter(|s| matches!(s.op, StageOp::Conv { .. }))
    }

    /// The linear stages, in order.
    pub fn linears(&self) -> impl Iterator<Item = &Stage> {
        self.stages
            .iter()
            .filter(|s| matches!(s.op, StageOp::Linear { .. }))
    }

    /// `[C, H, W]` of the last spatial stage: what is flattened before the first linear layer.
    pub fn flatten_shape(&self) -> [usize; 3] {
        let input = [self.input.channels, self.input.height, self.input.width];
        self.stages
            .iter()
            .rev()
            .find_map(|s| match s.output.as_slice() {
                &[c, h, w] => Some([c, h, w]),
                _ => None,
            })
            .unwrap_or(input)
    }

    /// Width of the last stage: the number of classes.
    pub fn num_classes(&self) -> usize {
        self.stages.last().map_or(0, Stage::output_len)
    }

    /// Number of learnable parameters.
    pub fn param_count(&self) -> Result<usize> {
        self.parameters()
            .try_fold(0usize, |total, p| total.checked_add(p.len()))
            .ok_or_else(|| Error::invalid("config", "parameter count overflows usize"))
    }

    /// Floating-point operations (2 x multiply-adds) of the conv and linear stages per image.
    pub fn flops_per_image(&self) -> Result<u64> {
        // u128: spatial size x weights can exceed u64 for absurd configs; that is an error.
        let mut total = 0u128;
        for stage in &self.stages {
            let Some(params) = &stage.params else {
                continue;
            };
            // A conv weight meets every output position; a linear weight each input once.
            let positions: usize = stage.output.iter().skip(1).product();
            total += 2 * params.weight.len() as u128 * positions as u128;
        }
        u64::try_from(total).map_err(|_| Error::invalid("config", "FLOP count overflows u64"))
    }
}

/// Output length of a sliding window over `len` values padded by `padding` on both sides (floor
/// mode, PyTorch's formula): `(len + 2 * padding - kernel) / stride + 1`. `None` when the window
/// does not fit, the stride is 0 or the arithmetic overflows. The only place this formula lives.
pub fn window_output(len: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = padding.checked_mul(2)?.checked_add(len)?;
    if stride == 0 || kernel == 0 || padded < kernel {
        return None;
    }
    Some((padded - kernel) / stride + 1)
}

/// The product of `dims`, or an error where it overflows (sizes can come from a weights file).
pub(crate) fn checked_product(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d))
        .ok_or_else(|| Error::invalid("config", format!("size {dims:?} overflows usize")))
}

fn params(layer: &str, weight: Vec<usize>, out: usize) -> Result<StageParams> {
    checked_product(&weight)?;
    Ok(StageParams {
        weight: ParamSpec {
            name: format!("{layer}.weight"),
            shape: weight,
        },
        bias: ParamSpec {
            name: format!("{layer}.bias"),
            shape: vec![out],
        },
    })
}

/// `(h, w)` after a window, or a typed error naming the stage.
fn window_2d(
    stage: &str,
    (h, w): (usize, usize),
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(usize, usize)> {
    match (
        window_output(h, kernel, stride, padding),
        window_output(w, kernel, stride, padding),
    ) {
        (Some(oh), Some(ow)) => Ok((oh, ow)),
        _ => Err(Error::invalid(
            "config",
            format!(
                "{stage}: a {kernel}x{kernel} window with stride {stride} and padding {padding} \
                 does not fit a {h}x{w} input (or the sizes overflow)"
            ),
        )),
    }
}

impl AlexNetConfig {
    /// The execution plan: checks that every stage is well formed and that the shapes work out,
    /// with checked arithmetic (an absurd size is an error, never an overflow).
    pub fn plan(&self) -> Result<Plan> {
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
        checked_product(&[c, h, w])?;
        let mut stages = Vec::new();
        let mut pools = 0;
        for (i, conv) in self.convs.iter().enumerate() {
            let name = format!("conv{}", i + 1);
            if conv.out_channels == 0 || conv.kernel == 0 || conv.stride == 0 {
                return Err(Error::invalid(
                    "config",
                    format!("{name}: channels, kernel and stride must be positive"),
                ));
            }
            let input = vec![c, h, w];
            (h, w) = window_2d(&name, (h, w), conv.kernel, conv.stride, conv.padding)?;
            let weight = vec![conv.out_channels, c, conv.kernel, conv.kernel];
            c = conv.out_channels;
            checked_product(&[c, h, w])?;
            stages.push(Stage {
                params: Some(params(&name, weight, c)?),
                name,
                op: StageOp::Conv {
                    out_channels: conv.out_channels,
                    kernel: conv.kernel,
                    stride: conv.stride,
                    padding: conv.padding,
                },
                input,
                output: vec![c, h, w],
            });
            if let Some(lrn) = conv.lrn {
                if lrn.size == 0 {
                    return Err(Error::invalid(
                        "config",
                        format!("conv{}: LRN size is 0", i + 1),
                    ));
                }
                stages.push(Stage {
                    name: format!("lrn{}", i + 1),
                    op: StageOp::Lrn(lrn),
                    input: vec![c, h, w],
                    output: vec![c, h, w],
                    params: None,
                });
            }
            if let Some(pool) = conv.pool {
                pools += 1;
                let name = format!("pool{pools}");
                if pool.kernel == 0 || pool.stride == 0 {
                    return Err(Error::invalid(
                        "config",
                        format!(
                            "{name} (after conv{}): kernel and stride must be positive",
                            i + 1
                        ),
                    ));
                }
                let input = vec![c, h, w];
                (h, w) = window_2d(&name, (h, w), pool.kernel, pool.stride, 0)?;
                stages.push(Stage {
                    name,
                    op: StageOp::MaxPool(pool),
                    input,
                    output: vec![c, h, w],
                    params: None,
                });
            }
        }
        let mut features = checked_product(&[c, h, w])?;
        for (i, fc) in self.fcs.iter().enumerate() {
            let name = format!("fc{}", i + 1);
            if fc.out_features == 0 {
                return Err(Error::invalid("config", format!("{name}: zero width")));
            }
            if let Some(p) = fc.dropout {
                if !(0.0..1.0).contains(&p) {
                    return Err(Error::invalid(
                        "config",
                        format!("{name}: dropout probability {p} is not in [0, 1)"),
                    ));
                }
            }
            stages.push(Stage {
                params: Some(params(
                    &name,
                    vec![fc.out_features, features],
                    fc.out_features,
                )?),
                name,
                op: StageOp::Linear {
                    out_features: fc.out_features,
                    relu: fc.relu,
                    dropout: fc.dropout,
                },
                input: vec![features],
                output: vec![fc.out_features],
            });
            features = fc.out_features;
        }
        let plan = Plan {
            input: self.input,
            stages,
            dropout_mode: self.dropout_mode,
        };
        plan.param_count()?;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_formula_is_pytorchs_and_never_overflows() {
        assert_eq!(window_output(224, 11, 4, 2), Some(55));
        assert_eq!(window_output(55, 3, 2, 0), Some(27));
        assert_eq!(window_output(13, 3, 1, 1), Some(13));
        assert_eq!(window_output(2, 3, 1, 0), None);
        assert_eq!(window_output(8, 3, 0, 0), None);
        assert_eq!(window_output(8, 0, 1, 0), None);
        assert_eq!(window_output(1, 3, 1, usize::MAX / 2 + 1), None);
        assert_eq!(window_output(usize::MAX, 1, 1, 1), None);
    }

    #[test]
    fn absurd_padding_is_a_typed_error() {
        let mut config = AlexNetConfig::paper();
        config.convs[0].padding = usize::MAX / 2 + 1;
        match config.plan() {
            Err(Error::Invalid { message, .. }) => assert!(message.contains("conv1"), "{message}"),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
        let mut config = AlexNetConfig::paper();
        config.convs[1].out_channels = usize::MAX / 3;
        assert!(config.plan().is_err());
    }

    #[test]
    fn stage_names_and_shapes_follow_the_network() {
        let plan = AlexNetConfig::paper().plan().unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1", "lrn1", "pool1", "conv2", "lrn2", "pool2", "conv3", "conv4", "conv5",
                "pool3", "fc1", "fc2", "fc3"
            ]
        );
        assert_eq!(plan.flatten_shape(), [256, 6, 6]);
        assert_eq!(plan.stages[10].input, [9216]);
        assert_eq!(plan.num_classes(), 1000);
        let params: Vec<&str> = plan.parameters().map(|p| p.name.as_str()).collect();
        assert_eq!(params.len(), 16);
        assert_eq!((params[0], params[15]), ("conv1.weight", "fc3.bias"));
    }
}
