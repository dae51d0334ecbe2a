//! Row-wise softmax and top-k of the logits on the GPU, so only the best classes leave it:
//! launcher of `kernels/softmax.cu`; CPU twin [`crate::postprocess::softmax`] and
//! [`crate::postprocess::top_k`].

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, LaunchConfig, PinnedHostSlice};

use super::{layout_err, shape_err};
use crate::cuda::abi::{AlexnetSoftmaxParams, ALEXNET_TOPK_MAX};
use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::dtype::GpuFloat;
use crate::cuda::events::{new_event, wait_for_stream};
use crate::cuda::launch::{grid_rows, to_u32, Launch};
use crate::cuda::pinned::alloc_readback;
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};

/// Device and page-locked host buffers for the `k <= ALEXNET_TOPK_MAX` best classes of up to
/// `rows` rows, filled by [`softmax_top_k`]: only these leave the GPU.
#[derive(Debug)]
pub struct TopK {
    class: CudaSlice<u32>,
    prob: CudaSlice<f32>,
    host_class: PinnedHostSlice<u32>,
    host_prob: PinnedHostSlice<f32>,
    rows: usize,
    /// `(rows, k)` of the last launch.
    filled: Option<(usize, usize)>,
    /// Recorded after [`TopK::to_host`]'s copies; the host sleeps on it (blocking sync).
    downloaded: CudaEvent,
}

impl TopK {
    /// The largest `k` the kernel returns.
    pub const MAX_K: usize = ALEXNET_TOPK_MAX as usize;

    /// Buffers for up to `rows` rows.
    pub fn new(gpu: &Gpu, rows: usize) -> Result<Self> {
        let len = rows
            .checked_mul(Self::MAX_K)
            .filter(|&l| l > 0)
            .ok_or_else(|| Error::invalid("top-k rows", format!("{rows}")))?;
        let stream = gpu.stream();
        Ok(TopK {
            class: stream
                .alloc_zeros(len)
                .map_err(driver_err("allocating top-k classes"))?,
            prob: stream
                .alloc_zeros(len)
                .map_err(driver_err("allocating top-k probabilities"))?,
            host_class: alloc_readback(gpu.context(), len)?,
            host_prob: alloc_readback(gpu.context(), len)?,
            rows,
            filled: None,
            downloaded: new_event(gpu)?,
        })
    }

    /// Row capacity.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Fills the device buffers with 0xFF bytes (class `u32::MAX`, probability NaN), so slots
    /// the kernel does not write show up.
    #[doc(hidden)]
    pub fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        let stream = gpu.stream();
        for (ptr, bytes, _done) in [
            {
                let bytes = self.class.num_bytes();
                let (p, d) = self.class.device_ptr_mut(stream);
                (p, bytes, d)
            },
            {
                let bytes = self.prob.num_bytes();
                let (p, d) = self.prob.device_ptr_mut(stream);
                (p, bytes, d)
            },
        ] {
            // SAFETY: `ptr` addresses `bytes` bytes of a live buffer, ordered on `stream`; any
            // bit pattern is a valid u32 / f32.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream())
            }
            .map_err(driver_err("cuMemsetD8Async"))?;
        }
        Ok(())
    }

    /// Copies the last launch's `(class, probability)` lists to the host, one per row, most
    /// probable first. Waits for the GPU.
    pub fn to_host(&mut self, gpu: &Gpu) -> Result<Vec<Vec<(usize, f32)>>> {
        let started = self.start_download(gpu);
        // The page-locked buffers' own events are not recorded (event tracking is off, see
        // `Gpu::new`): reading them waits for nothing, so wait for the copies here, also for
        // the first when the second could not be queued (the buffers may be dropped next). On
        // an event, which a wait sleeps on, not on the stream, which it spins on; without one,
        // on the whole stream, so the buffers are never freed under a queued copy.
        wait_for_stream(
            &self.downloaded,
            gpu.stream(),
            "cuEventSynchronize (top-k download)",
        )?;
        started?;
        self.read_downloaded()
    }

    /// Queues the copies of the last launch's results into the page-locked host buffers.
    pub(crate) fn start_download(&mut self, gpu: &Gpu) -> Result<()> {
        if self.filled.is_none() {
            return Err(Error::invalid(
                "top-k",
                "no softmax_top_k has run into these buffers",
            ));
        }
        // cudarc copies as many bytes as the *host* buffer holds, whatever the device view's
        // length: so the whole buffers go (rows * MAX_K each, 128 KiB at most for a batch of
        // 512), which are allocated equal. A device view cut to `rows * k` would be read past
        // its end.
        if self.class.len() != self.host_class.len() || self.prob.len() != self.host_prob.len() {
            return Err(Error::cuda(
                "TopK::to_host",
                "host and device buffers differ",
            ));
        }
        let stream = gpu.stream();
        stream
            .memcpy_dtoh(&self.class, &mut self.host_class)
            .map_err(driver_err("cuMemcpyDtoH (top-k classes)"))?;
        stream
            .memcpy_dtoh(&self.prob, &mut self.host_prob)
            .map_err(driver_err("cuMemcpyDtoH (top-k probabilities)"))
    }

    /// Reads what [`TopK::start_download`] copied. The caller has waited for the copies (an
    /// event recorded after them, or the stream): nothing here does.
    pub(crate) fn read_downloaded(&self) -> Result<Vec<Vec<(usize, f32)>>> {
        let (rows, k) = self.filled.ok_or_else(|| {
            Error::invalid("top-k", "no softmax_top_k has run into these buffers")
        })?;
        let classes = self
            .host_class
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        let probs = self
            .host_prob
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        Ok((0..rows)
            .map(|r| {
                (0..k)
                    .map(|j| (classes[r * k + j] as usize, probs[r * k + j]))
                    .collect()
            })
            .collect())
    }
}

/// The kernel's parameters and launch shape for `rows` x `classes` logits and the best `k`:
/// what [`softmax_top_k`] passes.
#[doc(hidden)]
pub fn softmax_top_k_args(
    rows: usize,
    classes: usize,
    k: usize,
    write_probs: bool,
) -> Result<(AlexnetSoftmaxParams, LaunchConfig)> {
    const OP: &str = "softmax_top_k";
    if k == 0 || k > TopK::MAX_K || k > classes {
        return Err(Error::invalid(
            "top-k",
            format!(
                "k = {k} with {classes} classes (need 1 <= k <= min(classes, {}))",
                TopK::MAX_K
            ),
        ));
    }
    let params = AlexnetSoftmaxParams {
        rows: to_u32(OP, "rows", rows)?,
        classes: to_u32(OP, "classes", classes)?,
        k: k as u32,
        write_probs: u32::from(write_probs),
    };
    Ok((params, grid_rows(OP, params.rows)?))
}

/// Row-wise softmax of `logits` `[rows, classes]` and its `k` most probable classes (ties to
/// the lower index) into `out`, with the `softmax_topk` kernel. `probs` (`[rows, classes]`,
/// f32) receives the full softmax when given; otherwise only the top-k are written.
pub fn softmax_top_k<T: GpuFloat>(
    gpu: &Gpu,
    logits: &GpuTensor<T>,
    k: usize,
    probs: Option<&mut GpuTensor<f32>>,
    out: &mut TopK,
) -> Result<()> {
    const OP: &str = "softmax_top_k";
    let &[rows, classes] = logits.shape() else {
        return Err(shape_err(OP, "logits [rows, classes]", logits.shape()));
    };
    if logits.layout() != Layout::Nchw {
        return Err(layout_err(OP, Layout::Nchw, logits.layout()));
    }
    let (params, cfg) = softmax_top_k_args(rows, classes, k, probs.is_some())?;
    if rows > out.rows {
        return Err(shape_err(
            OP,
            format!("at most {} rows (the TopK buffers' capacity)", out.rows),
            logits.shape(),
        ));
    }
    if let Some(p) = &probs {
        if p.shape() != logits.shape() || p.layout() != Layout::Nchw {
            return Err(shape_err(
                OP,
                format!("probabilities {:?}", logits.shape()),
                p.shape(),
            ));
        }
    }
    let mut launch = Launch::new(gpu, Kernel::SoftmaxTopk, T::DTYPE)?;
    launch.buffer(logits.data());
    match probs {
        Some(p) => launch.buffer(p.data_mut()),
        None => launch.null_buffer::<f32>(),
    };
    launch
        .buffer(&mut out.class)
        .buffer(&mut out.prob)
        .params(&params);
    // SAFETY: softmax_topk(const T *logits, float *probs, unsigned *top_class, float *top_prob,
    // AlexnetSoftmaxParams); `logits` (and `probs` when given, else a null pointer with
    // write_probs = 0, as the ABI allows) hold rows*classes elements; the top-k buffers hold
    // rows_capacity * ALEXNET_TOPK_MAX >= rows*k; one block per row.
    unsafe { launch.launch(cfg) }?;
    out.filled = Some((rows, k));
    Ok(())
}
