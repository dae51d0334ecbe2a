//! The whole network on the CPU: the reference every other backend is checked against.

use std::sync::{Mutex, OnceLock, PoisonError};

use ndarray::{s, Array2, Array4, ArrayView2, ArrayView4, ArrayViewD, CowArray, Ix2, Ix4};

use super::bf16::{bf16_bits, bf16_hardware, native_kernels_usable, Bf16Kernels};
use super::bf16_layers::{
    conv_hwc, linear_forward, pack_conv, pack_linear, ConvInput, ConvWeights, LinearWeights,
    ProductKernels,
};
use super::f32_panels::{conv_panels, linear_panels, F32Panels, Kernel};
use super::hwc::{lrn_hwc, pool_hwc, HwcBf16};
use super::linear_rows;
use super::{Conv2d, Conv2dGrads, Dropout, InputGradient, Linear, Lrn, MaxPool2d};
use crate::backend::Backend;
use crate::config::{AlexNetConfig, Precision, StageOp};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// The layer that runs one stage of the plan.
#[derive(Clone, Debug)]
pub(super) enum Layer {
    /// Conv + bias + ReLU, fused.
    Conv(Conv2d),
    Lrn(Lrn),
    Pool(MaxPool2d),
    /// Linear (+ ReLU), then dropout at inference.
    Linear {
        linear: Linear,
        relu: bool,
        dropout: Option<Dropout>,
    },
}

/// A layer's weight packed for one of our own kernels.
#[derive(Clone, Debug)]
enum Packed {
    /// For the bf16 kernels (native bf16 mode).
    Conv(ConvWeights),
    Linear(LinearWeights),
    /// For the fp32 kernels (fp32 and fp16 modes on AVX-512 or AVX2 CPUs).
    ConvF32(F32Panels),
    LinearF32(F32Panels),
}

/// Which of our own kernels a model packs its weights for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Packing {
    /// None: every layer on the `gemm` crate.
    Gemm,
    /// Convolutions and linear layers on an fp32 kernel ([`super::f32_panels`]).
    F32Panels(Kernel),
    /// Convolutions and linear layers on the bf16 kernels.
    Bf16(ProductKernels),
}

/// One stage: its plan name (`conv1`, `lrn1`, ...) and layer.
#[derive(Debug)]
pub(super) struct Stage {
    pub(super) name: String,
    pub(super) layer: Layer,
    /// The layer's weight packed for the model's kernels, packed when first needed and
    /// set aside whenever the parameters may change ([`CpuModel::parameters_mut`]), so a
    /// forward never multiplies by stale weights.
    packed: OnceLock<Option<Packed>>,
    /// The fp32 packing set aside, whose memory the next packing reuses (a training step
    /// packs every weight again after each update). Never read as weights.
    spare: Mutex<Option<F32Panels>>,
    /// A linear layer's weight gradient handed back by [`CpuModel::recycle_gradients`], whose
    /// memory the next backward writes the new one into.
    spare_gradient: Mutex<Vec<f32>>,
}

impl Stage {
    fn new(name: String, layer: Layer) -> Self {
        Stage {
            name,
            layer,
            packed: OnceLock::new(),
            spare: Mutex::new(None),
            spare_gradient: Mutex::new(Vec::new()),
        }
    }

    /// The weight gradient memory handed back for this stage, if any (else empty).
    pub(super) fn take_spare_gradient(&self) -> Vec<f32> {
        std::mem::take(
            &mut *self
                .spare_gradient
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Keeps `values`' memory for the next [`Stage::take_spare_gradient`].
    pub(super) fn give_spare_gradient(&self, values: Vec<f32>) {
        *self
            .spare_gradient
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = values;
    }

    /// The fp32 panels set aside by the last [`CpuModel::drop_packed_weights`], if any, for
    /// the next packing to reuse.
    fn spare_panels(&self) -> Option<F32Panels> {
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Clone for Stage {
    /// The clone shares the packed weights (cheap clones of the packing) but no spare memory
    /// (neither packing nor gradient).
    fn clone(&self) -> Self {
        Stage {
            name: self.name.clone(),
            layer: self.layer.clone(),
            packed: self.packed.clone(),
            spare: Mutex::new(None),
            spare_gradient: Mutex::new(Vec::new()),
        }
    }
}

/// Images per pass of [`CpuModel::forward`]'s convolution stages: enough to keep both cores'
/// GEMMs busy, few enough that the largest activation (conv1's output, ~18 MiB in fp32) stays
/// near the last-level cache. Measured on a 2-core Zen 5 VM, batch 128: the paper preset 8%
/// (bf16) and 12% (fp32) faster than with 32 images per pass, torchvision unchanged.
pub const CHUNK_IMAGES: usize = 16;

/// AlexNet on the CPU, built from [`Weights`].
///
/// `Precision::Fp32` computes in f32 throughout. `Precision::Fp16` emulates a half-precision
/// network: weights, the input and every layer's output are rounded to f16, while each layer
/// still computes (accumulates) in f32 — the same contract as the GPU's fp16 mode (f16 storage,
/// f32 accumulation). `Precision::Bf16` is the same contract with bf16 rounding; a product of
/// two bf16 values is exact in f32, so this is what bf16 dot-product hardware (AVX512-BF16,
/// AMX) computes, up to the order of the f32 additions. Where the CPU has such hardware, bf16
/// mode runs its convolutions and linear layers on it (see [`Bf16Kernels`] and
/// [`CpuModel::bf16`]); elsewhere it multiplies the rounded values with the f32 GEMM.
///
/// On CPUs with AVX-512F (or AVX2 + FMA), fp32 and fp16 modes run their convolutions and
/// linear layers on a micro-kernel of this crate (the weights packed once, convolution windows
/// read in place); elsewhere on the `gemm` crate. Either way the layers compute what [`Conv2d`] and [`Linear`]
/// compute, up to the order of the f32 additions. The packed weights are a second copy of the
/// convolution and linear weights (about 250 MB for the paper preset); they are packed again
/// after [`CpuModel::parameters_mut`]. With AVX-512, batches of up to 32 images run the linear
/// layers from their row-major weights, and the linear layers' share (~234 MB) is packed only
/// by the first larger batch.
///
/// Thread safety: `CpuModel` is `Send + Sync` and [`CpuModel::forward`] takes `&self`, so one
/// model can serve several threads at once (they share rayon's pool); results do not depend on
/// what other threads are doing.
#[derive(Clone, Debug)]
pub struct CpuModel {
    config: AlexNetConfig,
    precision: Precision,
    pub(super) stages: Vec<Stage>,
    packing: Packing,
    /// What runs the bf16 products natively ("AVX512-BF16", ...); `None` when emulated or not
    /// in bf16 mode.
    bf16_kernels: Option<&'static str>,
}

impl CpuModel {
    /// The model in `precision`; [`Precision::Tf32`], a GPU math mode, is computed (and
    /// reported by [`CpuModel::precision`]) as [`Precision::Fp32`].
    ///
    /// `Precision::Bf16` chooses its kernels as [`Bf16Kernels::Auto`] does.
    pub fn new(weights: &Weights, precision: Precision) -> Result<Self> {
        if precision == Precision::Bf16 {
            return Self::bf16(weights, Bf16Kernels::Auto);
        }
        let mut model = Self::build(weights, precision)?;
        if let Some(kernel) = Kernel::best() {
            model.set_packing(Packing::F32Panels(kernel));
        }
        Ok(model)
    }

    /// The model with every layer on the `gemm` crate (what fp32 and fp16 modes run where the
    /// CPU has neither AVX-512 nor AVX2): the twin the tests compare our fp32 kernel with.
    #[cfg(test)]
    pub(super) fn on_gemm(weights: &Weights, precision: Precision) -> Result<Self> {
        Self::build(weights, precision)
    }

    /// Packs every layer's weight for `packing` now (not in the first forward), except the
    /// linear layers' fp32 panels where small batches run from the row-major weight
    /// (`linear_rows`): those ~234 MB (paper preset) are packed by the first batch that needs
    /// them, so a model that only ever sees small batches never holds them.
    fn set_packing(&mut self, packing: Packing) {
        self.packing = packing;
        self.drop_packed_weights();
        for stage in &self.stages {
            let packed_on_demand = match (packing, &stage.layer) {
                (Packing::F32Panels(kernel), Layer::Linear { .. }) => linear_rows::suits(kernel, 1),
                _ => false,
            };
            if !packed_on_demand {
                self.packed(stage);
            }
        }
    }

    /// Drops every packed weight (the parameters are about to change); the next forward packs
    /// them again, the fp32 panels into the memory set aside here where it can (the bf16
    /// packings, which no training step repacks, are freed).
    pub(super) fn drop_packed_weights(&mut self) {
        for stage in &mut self.stages {
            let panels = match stage.packed.take().flatten() {
                Some(Packed::ConvF32(panels) | Packed::LinearF32(panels)) => Some(panels),
                _ => None,
            };
            *stage
                .spare
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner) = panels;
        }
    }

    /// `stage`'s weight packed for the model's kernels (`None` where its layer runs on the
    /// `gemm` crate or has no weight).
    fn packed<'s>(&self, stage: &'s Stage) -> Option<&'s Packed> {
        stage
            .packed
            .get_or_init(|| match (self.packing, &stage.layer) {
                (Packing::Bf16(kernels), Layer::Conv(conv)) => {
                    Some(Packed::Conv(pack_conv(conv, kernels)))
                }
                (Packing::Bf16(kernels), Layer::Linear { linear, .. }) => {
                    Some(Packed::Linear(pack_linear(linear, kernels)))
                }
                (Packing::F32Panels(_), Layer::Conv(conv)) => Some(Packed::ConvF32(
                    F32Panels::of_reusing(conv, stage.spare_panels()),
                )),
                (Packing::F32Panels(_), Layer::Linear { linear, .. }) => Some(Packed::LinearF32(
                    F32Panels::of_linear_reusing(linear, stage.spare_panels()),
                )),
                _ => None,
            })
            .as_ref()
    }

    /// The model in `Precision::Bf16`, its products computed by `kernels`.
    ///
    /// ```
    /// use alexnet_cuda::cpu::{Bf16Kernels, CpuModel};
    /// use alexnet_cuda::{AlexNetConfig, Weights};
    ///
    /// let weights = Weights::paper_init(&AlexNetConfig::torchvision(), 0)?;
    /// let model = CpuModel::bf16(&weights, Bf16Kernels::Auto)?;
    /// // `Some("AVX512-BF16")` or `Some("AMX-BF16")` where the CPU has bf16 hardware.
    /// println!("native bf16 kernels: {:?}", model.bf16_kernels());
    /// # Ok::<(), alexnet_cuda::Error>(())
    /// ```
    ///
    /// [`Bf16Kernels::Native`] is refused (an error) only where numkong's kernels cannot run:
    /// a CPU with AMX whose kernel refuses the process AMX's tile state.
    pub fn bf16(weights: &Weights, kernels: Bf16Kernels) -> Result<Self> {
        let native = match kernels {
            Bf16Kernels::Auto => bf16_hardware(),
            Bf16Kernels::Native if native_kernels_usable() => {
                Some(bf16_hardware().unwrap_or("numkong's portable kernels"))
            }
            Bf16Kernels::Native => {
                return Err(Error::invalid(
                    "bf16 kernels",
                    "this CPU has AMX but Linux refused the process its tile state, so the \
                     native bf16 kernels cannot run; use Bf16Kernels::Auto or Emulated",
                ))
            }
            Bf16Kernels::Emulated => None,
        };
        let mut model = Self::build(weights, Precision::Bf16)?;
        if native.is_some() {
            model.set_packing(Packing::Bf16(ProductKernels::best()));
        }
        model.bf16_kernels = native;
        Ok(model)
    }

    fn build(weights: &Weights, precision: Precision) -> Result<Self> {
        let precision = precision.on_cpu();
        let rounded;
        let weights = match precision {
            Precision::Fp32 | Precision::Tf32 => weights,
            Precision::Fp16 => {
                rounded = weights.rounded_to_f16();
                &rounded
            }
            Precision::Bf16 => {
                rounded = weights.rounded_to_bf16();
                &rounded
            }
        };
        let config = weights.config().clone();
        let plan = config.plan()?;
        let mut convs = weights.convs().iter();
        let mut fcs = weights.fcs().iter();
        let missing = |name: &str| Error::invalid("weights", format!("no parameters for {name}"));
        let stages = plan
            .stages
            .iter()
            .map(|stage| {
                let layer = match stage.op {
                    StageOp::Conv {
                        stride, padding, ..
                    } => {
                        let params = convs.next().ok_or_else(|| missing(&stage.name))?;
                        Layer::Conv(Conv2d::new(
                            params.weight.view(),
                            &params.bias,
                            stride,
                            padding,
                        )?)
                    }
                    StageOp::Lrn(params) => Layer::Lrn(Lrn::new(params)?),
                    StageOp::MaxPool(spec) => Layer::Pool(MaxPool2d::from(spec)),
                    StageOp::Linear { relu, dropout, .. } => {
                        let params = fcs.next().ok_or_else(|| missing(&stage.name))?;
                        Layer::Linear {
                            linear: Linear::new(params.weight.view(), &params.bias)?,
                            relu,
                            dropout: dropout
                                .map(|p| Dropout::new(p, plan.dropout_mode))
                                .transpose()?,
                        }
                    }
                };
                Ok(Stage::new(stage.name.clone(), layer))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuModel {
            config,
            precision,
            stages,
            packing: Packing::Gemm,
            bf16_kernels: None,
        })
    }

    /// The hardware bf16 mode's products run on ("AVX512-BF16", "AMX-BF16", or numkong's
    /// portable kernels when forced with [`Bf16Kernels::Native`]); `None` when they are
    /// emulated with the f32 GEMM, and in every other precision.
    pub fn bf16_kernels(&self) -> Option<&'static str> {
        self.bf16_kernels
    }

    pub fn config(&self) -> &AlexNetConfig {
        &self.config
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Logits `[N, classes]` for a normalised NCHW batch `[N, 3, 224, 224]` (inference mode).
    ///
    /// Large batches run their convolution stages [`CHUNK_IMAGES`] images at a time, so memory
    /// stays bounded whatever the batch size, and their linear layers on the whole batch at
    /// once, so each weight matrix is read once (the logits are the same: images never
    /// interact).
    pub fn forward(&self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let n = self
            .config
            .input
            .check_batch("CpuModel::forward", input.shape())?;
        if n <= CHUNK_IMAGES {
            return self.run(input, None);
        }
        let first_linear = self
            .stages
            .iter()
            .position(|stage| matches!(stage.layer, Layer::Linear { .. }))
            .unwrap_or(self.stages.len());
        let (convolutions, linears) = self.stages.split_at(first_linear);
        let mut features: Option<Array2<f32>> = None;
        for start in (0..n).step_by(CHUNK_IMAGES) {
            let end = (start + CHUNK_IMAGES).min(n);
            let chunk = input.slice(s![start..end, .., .., ..]);
            let x = self.run_stages(self.start(chunk), convolutions, end - start, &mut None)?;
            let flat = x.into_flat(end - start)?;
            features
                .get_or_insert_with(|| Array2::zeros((n, flat.ncols())))
                .slice_mut(s![start..end, ..])
                .assign(&flat);
        }
        let features = features.unwrap_or_else(|| Array2::zeros((n, 0)));
        self.run_stages(Activation::Flat(features), linears, n, &mut None)?
            .into_logits()
    }

    /// Like [`CpuModel::forward`], calling `observe(stage, activation)` after every stage
    /// ("conv1" after its ReLU, "lrn1", "pool1", ..., "fc1" after ReLU and dropout, ..., "fc3") —
    /// for debugging and for checking other backends layer by layer. Activations are NCHW
    /// (flat from fc1 on) whatever layout the model keeps them in.
    pub fn forward_observed(
        &self,
        input: ArrayView4<'_, f32>,
        mut observe: impl FnMut(&str, ArrayViewD<'_, f32>),
    ) -> Result<Array2<f32>> {
        self.run(input, Some(&mut observe))
    }

    /// The forward, observed when `observe` is given (an unobserved run never converts
    /// native bf16 mode's HWC activations to NCHW between layers).
    fn run(
        &self,
        input: ArrayView4<'_, f32>,
        mut observe: Option<Observer<'_>>,
    ) -> Result<Array2<f32>> {
        let n = self
            .config
            .input
            .check_batch("CpuModel::forward", input.shape())?;
        self.run_stages(self.start(input), &self.stages, n, &mut observe)?
            .into_logits()
    }

    /// The activation a forward starts from: the caller's input, read in place (no copy)
    /// unless it must be rounded first (a native bf16 convolution rounds its input itself).
    fn start<'a>(&self, input: ArrayView4<'a, f32>) -> Activation<'a> {
        let rounds_itself = matches!(
            self.stages.first().and_then(|s| self.packed(s)),
            Some(Packed::Conv(_))
        );
        match self.precision {
            Precision::Fp16 | Precision::Bf16 if !rounds_itself => {
                Activation::Nchw(self.round(input.to_owned()))
            }
            _ => Activation::Input(input),
        }
    }

    /// `stages` applied to `x` (`n` images), each stage's output observed when asked.
    fn run_stages<'a>(
        &self,
        mut x: Activation<'a>,
        stages: &[Stage],
        n: usize,
        observe: &mut Option<Observer<'_>>,
    ) -> Result<Activation<'a>> {
        for stage in stages {
            let packed = match (&stage.layer, self.packing) {
                // Packed (or not) by batch size: `linear_stage` decides.
                (Layer::Linear { .. }, Packing::F32Panels(_)) => None,
                _ => self.packed(stage),
            };
            x = match (&stage.layer, packed) {
                // Rounded to bf16 as it is written.
                (Layer::Conv(conv), Some(Packed::Conv(packed))) => {
                    let out = match &x {
                        Activation::Hwc(hwc) => conv_hwc(conv, packed, ConvInput::Hwc(hwc), true),
                        other => {
                            conv_hwc(conv, packed, ConvInput::Nchw(other.nchw()?.view()), true)
                        }
                    };
                    Activation::Hwc(out?)
                }
                (Layer::Conv(conv), _) => {
                    Activation::Nchw(self.round(self.conv_stage(stage, conv, x.nchw()?.view())?))
                }
                (Layer::Lrn(lrn), _) => match &x {
                    Activation::Hwc(hwc) => Activation::Hwc(lrn_hwc(lrn, hwc)),
                    other => Activation::Nchw(self.round(lrn.forward(other.nchw()?.view())?)),
                },
                // The max of f16 (bf16) values is one of them: no rounding.
                (Layer::Pool(pool), _) => match &x {
                    Activation::Hwc(hwc) => Activation::Hwc(pool_hwc(pool, hwc)?),
                    other => Activation::Nchw(pool.forward(other.nchw()?.view())?),
                },
                (
                    Layer::Linear {
                        linear,
                        relu,
                        dropout,
                    },
                    packed,
                ) => {
                    let flat = x.into_flat(n)?;
                    let mut out = match packed {
                        Some(Packed::Linear(blocks)) => {
                            linear_forward(linear, blocks, flat.view(), *relu)?
                        }
                        _ => self.linear_stage(stage, linear, flat.view(), *relu)?,
                    };
                    if let Some(dropout) = dropout {
                        out = dropout
                            .forward_eval(out.view().into_dyn())
                            .into_dimensionality::<Ix2>()
                            .map_err(|e| Error::invalid("dropout", e.to_string()))?;
                    }
                    Activation::Flat(self.round(out))
                }
            };
            if let Some(observe) = observe.as_mut() {
                match &x {
                    Activation::Flat(flat) => observe(&stage.name, flat.view().into_dyn()),
                    other => observe(&stage.name, other.nchw()?.view().into_dyn()),
                }
            }
        }
        Ok(x)
    }

    /// A convolution stage's output (bias and ReLU included), NCHW f32, on the kernel the
    /// model runs it on in fp32 and fp16 modes: the training forward's too, so that it
    /// computes what the inference forward computes.
    pub(super) fn conv_stage(
        &self,
        stage: &Stage,
        conv: &Conv2d,
        input: ArrayView4<'_, f32>,
    ) -> Result<Array4<f32>> {
        match (self.packed(stage), self.packing) {
            (Some(Packed::ConvF32(panels)), Packing::F32Panels(kernel)) => {
                conv_panels(conv, panels, input, true, kernel)
            }
            _ => conv.forward_relu(input),
        }
    }

    /// [`Conv2d::backward`] on the model's kernels: with our fp32 kernel, a stride-1
    /// convolution's input gradient is the forward of [`Conv2d::input_gradient_convolution`]
    /// over `grad_out` on the panels (torchvision's conv2-conv5 at batch 16: 74 ms against 85
    /// for the GEMM and fold-back); the weight and bias gradients stay with `Conv2d::backward`.
    pub(super) fn conv_backward(
        &self,
        conv: &Conv2d,
        input: ArrayView4<'_, f32>,
        grad_out: ArrayView4<'_, f32>,
        wanted: InputGradient,
    ) -> Result<Conv2dGrads> {
        let turned = match (wanted, self.packing) {
            (InputGradient::Compute, Packing::F32Panels(kernel)) => conv
                .input_gradient_convolution()
                .map(|turned| (turned, kernel)),
            _ => None,
        };
        let Some((turned, kernel)) = turned else {
            return conv.backward(input, grad_out, wanted);
        };
        let mut grads = conv.backward(input, grad_out, InputGradient::Skip)?;
        let panels = F32Panels::of(&turned);
        grads.input = Some(conv_panels(&turned, &panels, grad_out, false, kernel)?);
        Ok(grads)
    }

    /// A linear stage's output (ReLU included when `relu`), like [`CpuModel::conv_stage`].
    pub(super) fn linear_stage(
        &self,
        stage: &Stage,
        linear: &Linear,
        input: ArrayView2<'_, f32>,
        relu: bool,
    ) -> Result<Array2<f32>> {
        // Small batches read the row-major weight itself: a training step then never packs
        // the updated weight again (see `linear_rows`).
        if let Packing::F32Panels(kernel) = self.packing {
            if linear_rows::suits(kernel, input.nrows()) {
                return linear_rows::linear_rows(linear, input, relu);
            }
        }
        match (self.packed(stage), self.packing) {
            (Some(Packed::LinearF32(panels)), Packing::F32Panels(kernel)) => {
                linear_panels(linear, panels, input, relu, kernel)
            }
            _ if relu => linear.forward_relu(input),
            _ => linear.forward(input),
        }
    }

    /// Rounds to the storage precision: f16 in fp16 mode, bf16 in bf16 mode; the identity in
    /// fp32 mode.
    fn round<D: ndarray::Dimension>(
        &self,
        mut a: ndarray::Array<f32, D>,
    ) -> ndarray::Array<f32, D> {
        match self.precision {
            Precision::Fp16 => a.par_mapv_inplace(|v| half::f16::from_f32(v).to_f32()),
            Precision::Bf16 => {
                a.par_mapv_inplace(|v| f32::from_bits(u32::from(bf16_bits(v)) << 16))
            }
            Precision::Fp32 | Precision::Tf32 => {}
        }
        a
    }
}

/// What [`CpuModel::forward_observed`] calls after each stage.
type Observer<'o> = &'o mut dyn FnMut(&str, ArrayViewD<'_, f32>);

/// The activation between two stages.
enum Activation<'a> {
    /// The caller's input, read in place.
    Input(ArrayView4<'a, f32>),
    Nchw(Array4<f32>),
    /// Native bf16 mode's, from its first convolution to the flattening.
    Hwc(HwcBf16),
    /// From the first linear layer on.
    Flat(Array2<f32>),
}

impl Activation<'_> {
    /// As an NCHW batch: borrowed where it already is one, converted from HWC.
    fn nchw(&self) -> Result<CowArray<'_, f32, Ix4>> {
        match self {
            Activation::Input(x) => Ok(x.view().into()),
            Activation::Nchw(x) => Ok(x.view().into()),
            Activation::Hwc(x) => Ok(x.to_nchw()?.into()),
            Activation::Flat(_) => Err(Error::invalid(
                "config",
                "a convolution, LRN or pooling stage after a linear layer",
            )),
        }
    }

    /// The logits, once every stage has run.
    fn into_logits(self) -> Result<Array2<f32>> {
        match self {
            Activation::Flat(logits) => Ok(logits),
            _ => Err(Error::invalid("config", "the network has no linear layer")),
        }
    }

    /// Flattened `[n, C * H * W]` in (C, H, W) order, as PyTorch flattens.
    fn into_flat(self, n: usize) -> Result<Array2<f32>> {
        let nchw = match self {
            Activation::Flat(flat) => return Ok(flat),
            Activation::Input(x) => x.to_owned(),
            Activation::Nchw(x) => x,
            Activation::Hwc(x) => x.to_nchw()?,
        };
        let features = nchw.len() / n.max(1);
        // NCHW standard layout already is (C, H, W) order per image.
        nchw.as_standard_layout()
            .into_owned()
            .into_shape_with_order((n, features))
            .map_err(|e| Error::invalid("flatten", e.to_string()))
    }
}

impl Backend for CpuModel {
    fn device_name(&self) -> String {
        let threads = rayon::current_num_threads();
        match self.bf16_kernels {
            Some(kernels) => format!("CPU ({threads} threads, bf16 on {kernels})"),
            None => match self.packing {
                Packing::F32Panels(kernel) => {
                    format!("CPU ({threads} threads, {} kernels)", kernel.name())
                }
                _ => format!("CPU ({threads} threads)"),
            },
        }
    }

    fn precision(&self) -> Precision {
        CpuModel::precision(self)
    }

    fn config(&self) -> &AlexNetConfig {
        CpuModel::config(self)
    }

    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        CpuModel::forward(self, input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(images: usize) -> Array4<f32> {
        Array4::from_shape_fn((images, 3, 224, 224), |(i, c, y, x)| {
            (((i * 3 + c) * 7919 + y * 227 + x * 13) % 255) as f32 / 64.0 - 2.0
        })
    }

    /// On a CPU with AVX-512, fp32 mode runs its convolutions and linear layers on our kernel:
    /// every stage within 1e-5 of the stage's largest value of the `gemm` crate's path (the
    /// f32 additions come in another order), at the batch sizes that split each image's
    /// channels across the threads (1) and that thread over images (5), and past the batch
    /// size where the linear layers leave the row-major kernel for the panels.
    #[test]
    #[cfg_attr(
        not(any(alexnet_build_cpu_avx512f, alexnet_build_cpu_avx2_fma)),
        ignore = "needs a CPU with AVX-512F or AVX2 and FMA (elsewhere fp32 runs on the gemm \
                  crate only), and the machine that built the tests has neither"
    )]
    fn fp32_stages_on_our_kernel_match_the_gemm_path() {
        assert!(
            Kernel::best().is_some(),
            "this CPU has neither AVX-512F nor AVX2 and FMA: our kernel cannot be checked here"
        );
        for config in [AlexNetConfig::paper(), AlexNetConfig::torchvision()] {
            let weights = Weights::paper_init(&config, 3).expect("weights");
            let ours = CpuModel::new(&weights, Precision::Fp32).expect("model");
            let gemm = CpuModel::on_gemm(&weights, Precision::Fp32).expect("model");
            assert!(matches!(ours.packing, Packing::F32Panels(_)));
            for images in [1, 5, linear_rows::MAX_BATCH + 1] {
                let x = input(images);
                let mut want = Vec::new();
                gemm.forward_observed(x.view(), |_, a| want.push(a.to_owned()))
                    .expect("gemm forward");
                let mut stage = 0;
                ours.forward_observed(x.view(), |name, a| {
                    let want = &want[stage];
                    let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let worst = a
                        .iter()
                        .zip(want.iter())
                        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                    assert!(
                        worst <= 1e-5 * largest,
                        "{} {name}, {images} images: {worst} of {largest}",
                        config.name
                    );
                    stage += 1;
                })
                .expect("our forward");
                assert_eq!(stage, want.len());
            }
        }
    }

    /// Weights changed through `parameters_mut` after a forward are the weights the next
    /// forward multiplies by (the packed copies are not stale), in every mode that packs.
    #[test]
    fn changed_parameters_reach_the_packed_kernels() {
        let config = AlexNetConfig::torchvision();
        let weights = Weights::paper_init(&config, 5).expect("weights");
        // Both of the linear layers' fp32 kernels: the row-major one and the panels.
        for (x, precision) in [
            (input(2), Precision::Fp32),
            (input(linear_rows::MAX_BATCH + 1), Precision::Fp32),
            (input(2), Precision::Bf16),
        ] {
            let mut model = CpuModel::new(&weights, precision).expect("model");
            let before = model.forward(x.view()).expect("forward");
            // A clone shares the packed weights: the repacking must not write into them.
            let clone = model.clone();
            for tensor in model.parameters_mut() {
                tensor.iter_mut().for_each(|v| *v *= 1.5);
            }
            let after = model.forward(x.view()).expect("forward");
            assert_eq!(
                clone.forward(x.view()).expect("forward"),
                before,
                "{precision:?}: the clone's weights changed"
            );
            let rebuilt = CpuModel::new(&model.weights().expect("weights"), precision)
                .expect("model")
                .forward(x.view())
                .expect("forward");
            assert_ne!(before, after, "{precision:?}: the change had no effect");
            assert_eq!(after, rebuilt, "{precision:?}: stale packed weights");
        }
    }

    /// A training step at a small batch never packs the linear layers' weights again: they
    /// run from the row-major weight (`linear_rows`), and a repacking of fc1 and fc2 after
    /// each update was ~28 ms of a torchvision step at batch 16. The convolutions' panels are
    /// repacked; a new model and an inference forward at that batch pack no linear layer
    /// either (their panels are ~234 MB), and one past the row kernel's batch packs them.
    #[test]
    #[cfg_attr(
        not(alexnet_build_cpu_avx512f),
        ignore = "needs a CPU with AVX-512F (elsewhere the linear layers run on the panels), and \
                  the machine that built the tests has none"
    )]
    fn small_batch_training_steps_do_not_repack_the_linear_layers() {
        assert_eq!(
            Kernel::best(),
            Some(Kernel::Avx512),
            "this CPU has no AVX-512F: the row-major linear kernel cannot be checked here"
        );
        let config = AlexNetConfig::torchvision();
        let mut model = CpuModel::new(
            &Weights::paper_init(&config, 6).expect("weights"),
            Precision::Fp32,
        )
        .expect("model");
        let packed = |model: &CpuModel, linear: bool| -> Vec<bool> {
            model
                .stages
                .iter()
                .filter(|stage| matches!(stage.layer, Layer::Linear { .. }) == linear)
                .filter(|stage| !matches!(stage.layer, Layer::Lrn(_) | Layer::Pool(_)))
                .map(|stage| stage.packed.get().is_some())
                .collect()
        };
        assert_eq!(
            packed(&model, true),
            [false; 3],
            "linear layers packed when built"
        );
        assert_eq!(
            packed(&model, false),
            [true; 5],
            "convolutions not packed when built"
        );
        model.parameters_mut(); // what an update does: every packed weight is dropped
        let tape = model.forward_train(input(2).view(), 1).expect("forward");
        assert_eq!(packed(&model, true), [false; 3], "linear layers packed");
        model.forward(input(2).view()).expect("forward");
        assert_eq!(packed(&model, true), [false; 3], "inference packed them");
        assert_eq!(packed(&model, false), [true; 5], "convolutions not packed");
        drop(tape);
        model
            .forward(input(linear_rows::MAX_BATCH + 1).view())
            .expect("forward");
        assert_eq!(
            packed(&model, true),
            [true; 3],
            "a large batch ran unpacked"
        );
    }
}
