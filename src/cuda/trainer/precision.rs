//! What the trainer's storage type changes, and nothing else: how the f32 batch gets in, how the
//! loss gradient gets out of the logits, where the layers write their parameter gradients, and
//! which tensors the SGD launch updates. In fp32 the layers' own tensors are the master weights
//! and their gradients go straight into the flat f32 buffer; in mixed precision (f16 or bf16) the
//! layers compute with f16 or bf16 copies, the backward runs on the loss times the loss scale,
//! the narrow weight gradients are unscaled into the flat f32 buffer, and SGD updates f32 masters
//! and rewrites the copies (`kernels/sgd.cu`).

use cudarc::driver::{CudaSlice, CudaViewMut, PinnedHostSlice};
use half::{bf16, f16};
use ndarray::ArrayView4;

use super::prefetch::StagedBatch;
use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::dtype::GpuFloat;
use crate::cuda::ops::{
    convert_bf16_to_f32, convert_f16_to_f32, convert_f32_to_bf16, convert_f32_to_f16,
    relayout_f32_input, softmax_cross_entropy, Scale,
};
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};

/// f32 buffers a mixed-precision step needs beside its f16 or bf16 ones, for one batch size.
pub(super) struct WideBuffers {
    /// The logits widened for the loss (computed in f32 and f64, as the CPU does).
    pub logits: GpuTensor<f32>,
    /// The loss's gradient before it is scaled into f16 or bf16.
    pub logit_grad: GpuTensor<f32>,
}

/// Where the backward writes the parameter gradients.
pub(super) struct GradientBuffers<T> {
    /// Every trainable tensor's f32 gradient in network order, each weight at an aligned
    /// offset (`super::flat_layout`): what SGD reads.
    pub flat: CudaSlice<f32>,
    /// Mixed precision: the weights' gradients of the narrow backward (times the loss scale), at
    /// their offsets in `flat` (the bias slots unused: biases' gradients are f32 already).
    pub scaled: Option<CudaSlice<T>>,
}

/// Where a step's f32 batch (NCHW) comes from.
#[derive(Clone, Copy)]
pub(super) enum BatchSource<'a> {
    /// Any host array: copied through the driver's staging memory.
    Host(ArrayView4<'a, f32>),
    /// A [`crate::train::BatchBuffer`]'s page-locked memory: one asynchronous DMA.
    PageLocked(&'a PinnedHostSlice<f32>),
    /// Already on the device: uploaded ahead on the copy stream during the previous step.
    Staged(StagedBatch<'a>),
}

impl BatchSource<'_> {
    /// Into `tensor` (f32, NCHW like the batch).
    fn upload_into(self, gpu: &Gpu, tensor: &mut GpuTensor<f32>) -> Result<()> {
        match self {
            BatchSource::Host(batch) => tensor.upload(gpu, batch.into_dyn()),
            // The buffer is in logical NCHW order: the tensor must be too.
            BatchSource::PageLocked(_) if tensor.layout() != Layout::Nchw => Err(Error::invalid(
                "CudaTrainer",
                "a page-locked batch into a tensor that is not NCHW",
            )),
            BatchSource::PageLocked(memory) => tensor.upload_page_locked(gpu, memory),
            BatchSource::Staged(_) if tensor.layout() != Layout::Nchw => Err(Error::invalid(
                "CudaTrainer",
                "a staged batch into a tensor that is not NCHW",
            )),
            BatchSource::Staged(staged) => staged.read(gpu, |data| {
                let into = tensor.data_mut();
                if data.len() != into.len() {
                    return Err(Error::Shape {
                        op: "CudaTrainer (staged batch)",
                        expected: format!("{} values", into.len()),
                        found: vec![data.len()],
                    });
                }
                gpu.stream()
                    .memcpy_dtod(data, into)
                    .map_err(driver_err("cuMemcpyDtoDAsync (staged batch)"))
            }),
        }
    }
}

/// The storage types the trainer runs in: `f32` (fp32 and TF32), `f16` and `bf16` (mixed
/// precision).
pub(super) trait TrainFloat: GpuFloat {
    /// Whether training in this type keeps f32 master weights and scales the loss.
    const MIXED: bool;

    /// The f32 NCHW batch of `channels` channels into the network's input tensor: straight in
    /// where that is f32 NCHW too, else rounded and reordered on the device, from the staged
    /// copy or through `staging` (f32 NCHW like the batch).
    fn load_batch(
        gpu: &Gpu,
        batch: BatchSource<'_>,
        channels: usize,
        staging: Option<&mut GpuTensor<f32>>,
        input: &mut GpuTensor<Self>,
    ) -> Result<()>;

    /// The per-row losses of `logits` against `labels` into `row_loss`, and the gradient of
    /// the mean loss times `scale` into `grad` (only where [`TrainFloat::MIXED`]: otherwise
    /// the scale is 1 and `scale` is not read).
    fn loss_gradient(
        gpu: &Gpu,
        logits: &GpuTensor<Self>,
        labels: &CudaSlice<u32>,
        wide: Option<&mut WideBuffers>,
        grad: &mut GpuTensor<Self>,
        row_loss: &mut CudaSlice<f64>,
        scale: Scale<'_>,
    ) -> Result<()>;

    /// Runs `backward` with the views a trainable layer writes its weight (in this type) and
    /// bias (f32) gradients into, the layer's tensors starting at `at` in the flat buffer.
    fn with_gradient_views<R>(
        grads: &mut GradientBuffers<Self>,
        at: usize,
        lens: (usize, usize),
        backward: impl FnOnce(&mut CudaViewMut<'_, Self>, &mut CudaViewMut<'_, f32>) -> Result<R>,
    ) -> Result<R>;

    /// What the SGD launch updates: the f32 weights of the trainable tensors (the layers' own,
    /// or the masters) and the narrow copies it rewrites (none, or the layers' own).
    #[allow(clippy::type_complexity)]
    fn sgd_tensors<'a>(
        layer_tensors: Vec<&'a mut CudaSlice<Self>>,
        masters: &'a mut [CudaSlice<f32>],
    ) -> (Vec<&'a mut CudaSlice<f32>>, Vec<&'a mut CudaSlice<Self>>);
}

/// The batch (f32 NCHW, `channels` channels) into an input of another layout or more
/// channels (channels-last, conv1's input padded to 8): reordered, padded and rounded by
/// `relayout_f32_input` on the device, from the staged copy or after an upload into `staging`.
fn relayout_batch<T: GpuFloat>(
    gpu: &Gpu,
    batch: BatchSource<'_>,
    channels: usize,
    staging: Option<&mut GpuTensor<f32>>,
    input: &mut GpuTensor<T>,
) -> Result<()> {
    if let BatchSource::Staged(staged) = batch {
        return staged.read(gpu, |data| {
            relayout_f32_input(gpu, &data.slice(..), channels, input)
        });
    }
    let staging = staging.ok_or_else(missing_staging)?;
    batch.upload_into(gpu, staging)?;
    relayout_f32_input(gpu, &staging.data().slice(..), channels, input)
}

fn missing_buffers() -> Error {
    Error::invalid("CudaTrainer", "no f32 buffers for a mixed-precision step")
}

fn missing_staging() -> Error {
    Error::invalid(
        "CudaTrainer",
        "no f32 staging for a batch the input differs from",
    )
}

fn out_of_range() -> Error {
    Error::invalid("CudaTrainer", "a gradient beyond the flat buffer")
}

impl TrainFloat for f32 {
    const MIXED: bool = false;

    fn load_batch(
        gpu: &Gpu,
        batch: BatchSource<'_>,
        channels: usize,
        staging: Option<&mut GpuTensor<f32>>,
        input: &mut GpuTensor<f32>,
    ) -> Result<()> {
        match input.layout() {
            Layout::Nchw => batch.upload_into(gpu, input),
            Layout::Nhwc => relayout_batch(gpu, batch, channels, staging, input),
        }
    }

    fn loss_gradient(
        gpu: &Gpu,
        logits: &GpuTensor<f32>,
        labels: &CudaSlice<u32>,
        _wide: Option<&mut WideBuffers>,
        grad: &mut GpuTensor<f32>,
        row_loss: &mut CudaSlice<f64>,
        _scale: Scale<'_>,
    ) -> Result<()> {
        softmax_cross_entropy(gpu, logits, labels, grad, row_loss)
    }

    fn with_gradient_views<R>(
        grads: &mut GradientBuffers<f32>,
        at: usize,
        (weight_len, bias_len): (usize, usize),
        backward: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> Result<R>,
    ) -> Result<R> {
        let end = at + weight_len + bias_len;
        if end > grads.flat.len() {
            return Err(out_of_range());
        }
        let mut layer = grads.flat.slice_mut(at..end);
        let (mut weight, mut bias) = layer.split_at_mut(weight_len);
        backward(&mut weight, &mut bias)
    }

    fn sgd_tensors<'a>(
        layer_tensors: Vec<&'a mut CudaSlice<f32>>,
        _masters: &'a mut [CudaSlice<f32>],
    ) -> (Vec<&'a mut CudaSlice<f32>>, Vec<&'a mut CudaSlice<f32>>) {
        (layer_tensors, Vec::new())
    }
}

/// Mixed precision in a 16-bit type: `$narrow` rounds f32 into it (times a scale), `$widen`
/// turns it back into f32. f16 and bf16 differ in nothing else here.
macro_rules! mixed_train_float {
    ($t:ty, $narrow:ident, $widen:ident) => {
        impl TrainFloat for $t {
            const MIXED: bool = true;

            fn load_batch(
                gpu: &Gpu,
                batch: BatchSource<'_>,
                channels: usize,
                staging: Option<&mut GpuTensor<f32>>,
                input: &mut GpuTensor<$t>,
            ) -> Result<()> {
                if input.layout() == Layout::Nhwc {
                    return relayout_batch(gpu, batch, channels, staging, input);
                }
                // Rounded on the device, not by `GpuTensor::upload` on the host: a batch of 128
                // is 19 M values, tens of milliseconds of host time per step.
                if let BatchSource::Staged(staged) = batch {
                    // Rounded straight from the staged copy: no f32 copy of it first.
                    return staged.read(gpu, |data| {
                        $narrow(
                            gpu,
                            &data.slice(..),
                            &mut input.data_mut().slice_mut(..),
                            1.0,
                        )
                    });
                }
                let staging = staging.ok_or_else(missing_staging)?;
                batch.upload_into(gpu, staging)?;
                $narrow(
                    gpu,
                    &staging.data().slice(..),
                    &mut input.data_mut().slice_mut(..),
                    1.0,
                )
            }

            fn loss_gradient(
                gpu: &Gpu,
                logits: &GpuTensor<$t>,
                labels: &CudaSlice<u32>,
                wide: Option<&mut WideBuffers>,
                grad: &mut GpuTensor<$t>,
                row_loss: &mut CudaSlice<f64>,
                scale: Scale<'_>,
            ) -> Result<()> {
                let wide = wide.ok_or_else(missing_buffers)?;
                $widen(gpu, &logits.data().slice(..), wide.logits.data_mut())?;
                softmax_cross_entropy(gpu, &wide.logits, labels, &mut wide.logit_grad, row_loss)?;
                $narrow(
                    gpu,
                    &wide.logit_grad.data().slice(..),
                    &mut grad.data_mut().slice_mut(..),
                    scale,
                )
            }

            fn with_gradient_views<R>(
                grads: &mut GradientBuffers<$t>,
                at: usize,
                (weight_len, bias_len): (usize, usize),
                backward: impl FnOnce(&mut CudaViewMut<'_, $t>, &mut CudaViewMut<'_, f32>) -> Result<R>,
            ) -> Result<R> {
                let end = at + weight_len + bias_len;
                let scaled = grads.scaled.as_mut().ok_or_else(missing_buffers)?;
                if end > grads.flat.len() || end > scaled.len() {
                    return Err(out_of_range());
                }
                backward(
                    &mut scaled.slice_mut(at..at + weight_len),
                    &mut grads.flat.slice_mut(at + weight_len..end),
                )
            }

            fn sgd_tensors<'a>(
                layer_tensors: Vec<&'a mut CudaSlice<$t>>,
                masters: &'a mut [CudaSlice<f32>],
            ) -> (Vec<&'a mut CudaSlice<f32>>, Vec<&'a mut CudaSlice<$t>>) {
                // The trainable tensors are the last ones: frozen layers come first.
                let first = masters.len().saturating_sub(layer_tensors.len());
                (masters[first..].iter_mut().collect(), layer_tensors)
            }
        }
    };
}

mixed_train_float!(f16, convert_f32_to_f16, convert_f16_to_f32);
mixed_train_float!(bf16, convert_f32_to_bf16, convert_bf16_to_f32);
