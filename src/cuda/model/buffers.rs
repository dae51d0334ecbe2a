//! Every buffer of one batch size (activations, the u8 input, page-locked host buffers, top-k),
//! and what is done to them outside the layers: uploads, input preparation, downloads.

use cudarc::driver::{CudaSlice, CudaView, HostSlice, PinnedHostSlice};
use half::{bf16, f16};
use ndarray::ArrayView4;

use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::graph::GraphState;
use crate::cuda::ops::{
    convert_bf16_to_f32, convert_f16_to_f32, relayout_f32_input, softmax_top_k, PrepareInput, TopK,
};
use crate::cuda::tensor::GpuTensor;
use crate::error::{Error, Result};

/// Every buffer for one batch size.
pub(crate) struct Buffers<T: GpuFloat> {
    /// First, so that it is dropped before the buffers whose addresses it holds. Keyed by the
    /// shared convolution workspace's generation, the one address it bakes in from outside.
    pub(super) graph: GraphState<u64>,
    pub(super) n: usize,
    /// The network's input tensor.
    pub(super) input: GpuTensor<T>,
    /// One per stage, in order; the last holds the logits.
    pub(super) outputs: Vec<GpuTensor<T>>,
    /// The logits widened to f32 for the download (fp16 mode; unused in fp32).
    pub(super) logits_f32: CudaSlice<f32>,
    /// u8 HWC images on the device, before normalisation.
    pub(super) device_u8: CudaSlice<u8>,
    /// Write-combined: written by the host, read by the upload only.
    pub(super) host_u8: PinnedHostSlice<u8>,
    /// Cached page-locked memory: fast for the host to read.
    pub(super) host_logits: PinnedHostSlice<f32>,
    /// An f32 NCHW batch from [`Buffers::upload_f32_relayout`] before the device reorders it
    /// into the input; allocated on first use (u8-only users never pay for it).
    pub(super) staged_f32: Option<CudaSlice<f32>>,
    pub(super) topk: TopK,
}

impl<T: GpuFloat> Buffers<T> {
    /// Copies u8 HWC images into the write-combined buffer and queues their upload to the
    /// device. The caller has waited for the previous upload from that buffer (`run_u8` waits
    /// on its `h2d_end` event).
    pub fn upload_u8(&mut self, gpu: &Gpu, pixels: &[u8]) -> Result<()> {
        let host = self
            .host_u8
            .as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        if pixels.len() != host.len() {
            return Err(Error::Shape {
                op: "CudaModel (u8 upload)",
                expected: format!("{} bytes", host.len()),
                found: vec![pixels.len()],
            });
        }
        // A sequential copy into write-combined memory, never read back.
        host.copy_from_slice(pixels);
        gpu.stream()
            .memcpy_htod(&self.host_u8, &mut self.device_u8)
            .map_err(driver_err("cuMemcpyHtoDAsync (images)"))
    }

    /// Uploads a normalised f32 NCHW batch as it is and pads, reorders and rounds it into the
    /// input tensor on the device (`relayout_f32_input`): for inputs whose channels or layout
    /// differ from the batch's (the fp16 network's 8-channel NHWC input). `copied` runs once
    /// the copy is queued, before the relayout (the timing events go there).
    pub fn upload_f32_relayout(
        &mut self,
        gpu: &Gpu,
        batch: ArrayView4<'_, f32>,
        copied: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let len = batch.len();
        let staged = match &mut self.staged_f32 {
            Some(staged) if staged.len() == len => staged,
            slot => slot.insert(
                gpu.stream()
                    .alloc_zeros::<f32>(len)
                    .map_err(driver_err("allocating the f32 input staging"))?,
            ),
        };
        let standard = batch.as_standard_layout(); // a copy only for a strided view
        let values = standard.as_slice().ok_or_else(|| {
            Error::invalid("CudaModel (f32 upload)", "a batch not in standard layout")
        })?;
        gpu.stream()
            .memcpy_htod(values, staged)
            .map_err(driver_err("cuMemcpyHtoDAsync (f32 batch)"))?;
        copied()?;
        relayout_f32_input(gpu, &staged.as_view(), batch.dim().1, &mut self.input)
    }

    /// Normalises the images of [`Buffers::upload_u8`] into the input tensor.
    pub fn prepare_uploaded(&mut self, gpu: &Gpu, norm: &PrepareInput) -> Result<()> {
        let Buffers {
            device_u8, input, ..
        } = self;
        norm.forward(gpu, &device_u8.as_view(), input)
    }

    /// Normalises `n` u8 HWC images already on the device (e.g. a pipeline slot) into the
    /// input tensor.
    pub fn prepare_from(
        &mut self,
        gpu: &Gpu,
        src: &CudaView<'_, u8>,
        norm: &PrepareInput,
    ) -> Result<()> {
        norm.forward(gpu, src, &mut self.input)
    }

    /// Queues the copy of the logits (as f32) into `dst` on the compute stream.
    pub fn download_logits<D: HostSlice<f32> + ?Sized>(
        &mut self,
        gpu: &Gpu,
        dst: &mut D,
    ) -> Result<()> {
        let Buffers {
            outputs,
            logits_f32,
            ..
        } = self;
        download_logits(gpu, last(outputs)?, logits_f32, dst)
    }

    /// Queues the logits' download into the buffers' own page-locked `host_logits`.
    pub fn download_logits_to_host(&mut self, gpu: &Gpu) -> Result<()> {
        let Buffers {
            outputs,
            logits_f32,
            host_logits,
            ..
        } = self;
        download_logits(gpu, last(outputs)?, logits_f32, host_logits)
    }

    /// Softmax and top-k of the logits into the buffers' `topk`.
    pub fn top_k(&mut self, gpu: &Gpu, k: usize) -> Result<()> {
        let Buffers { outputs, topk, .. } = self;
        softmax_top_k(gpu, last(outputs)?, k, None, topk)
    }

    /// Fills every activation buffer (input included) with NaN.
    pub fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        self.input.poison(gpu)?;
        for t in &mut self.outputs {
            t.poison(gpu)?;
        }
        Ok(())
    }
}

/// The logits tensor `[n, classes]`: the last stage's output.
fn last<T: GpuFloat>(outputs: &[GpuTensor<T>]) -> Result<&GpuTensor<T>> {
    outputs
        .last()
        .ok_or_else(|| Error::invalid("config", "the network has no stage"))
}

/// Queues the copy of `logits` (as f32, widened through `wide` in fp16 and bf16) into `dst` on the
/// compute stream.
fn download_logits<T: GpuFloat, D: HostSlice<f32> + ?Sized>(
    gpu: &Gpu,
    logits: &GpuTensor<T>,
    wide: &mut CudaSlice<f32>,
    dst: &mut D,
) -> Result<()> {
    let len = logits.len();
    // Exactly: cudarc copies as many bytes as `dst` holds, so a longer `dst` would read past
    // the logits on the device.
    if dst.len() != len {
        return Err(Error::Shape {
            op: "CudaModel (logits download)",
            expected: format!("room for exactly {len} logits"),
            found: vec![dst.len()],
        });
    }
    let stream = gpu.stream();
    let view_err = || Error::cuda("CudaModel", "logits view");
    match T::DTYPE {
        GpuDtype::F32 => {
            // SAFETY: `T::DTYPE == F32` holds only for `T = f32` (GpuFloat is sealed), so the
            // buffer holds `len` f32 values.
            let view = unsafe { logits.data().transmute::<f32>(len) }.ok_or_else(view_err)?;
            return stream
                .memcpy_dtoh(&view, dst)
                .map_err(driver_err("cuMemcpyDtoH (logits)"));
        }
        GpuDtype::F16 => {
            // SAFETY: `T::DTYPE == F16` holds only for `T = half::f16`.
            let view = unsafe { logits.data().transmute::<f16>(len) }.ok_or_else(view_err)?;
            convert_f16_to_f32(gpu, &view, wide)?;
        }
        GpuDtype::Bf16 => {
            // SAFETY: `T::DTYPE == Bf16` holds only for `T = half::bf16`.
            let view = unsafe { logits.data().transmute::<bf16>(len) }.ok_or_else(view_err)?;
            convert_bf16_to_f32(gpu, &view, wide)?;
        }
    }
    // Widened into `wide` by the f16 or bf16 branch above.
    let wide = wide.try_slice(..len).ok_or_else(view_err)?;
    stream
        .memcpy_dtoh(&wide, dst)
        .map_err(driver_err("cuMemcpyDtoH (logits)"))
}
