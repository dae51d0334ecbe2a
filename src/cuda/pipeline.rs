//! Overlapped batches: while the GPU computes one batch, the next one's pixels go up on the
//! copy stream, and the host fills the other page-locked slot.

use std::collections::VecDeque;
use std::mem::ManuallyDrop;

use cudarc::driver::{CudaSlice, PinnedHostSlice};
use ndarray::Array2;

use super::device::driver_err;
use super::events::{record, StageEvents};
use super::model::CudaModel;
use super::ops::PrepareInput;
use super::pinned::{alloc_readback, alloc_upload};
use crate::backend::StageTimings;
use crate::error::{Error, Result};
use crate::image::U8Batch;
use crate::stream::BatchQueue;

/// One of the two buffers sets a batch travels through.
struct Slot {
    /// Write-combined page-locked pixels: written by the host, read only by the upload.
    host_input: PinnedHostSlice<u8>,
    device_input: CudaSlice<u8>,
    /// Cached page-locked logits: fast for the host to read.
    host_logits: PinnedHostSlice<f32>,
    events: StageEvents,
    /// Images of the batch in flight in this slot.
    n: usize,
}

/// What [`Pipeline::finish`] hands back for one batch.
#[derive(Clone, Debug)]
pub struct PipelineOutput {
    /// `[N, classes]`, one row per image of the batch, in order.
    pub logits: Array2<f32>,
    /// CUDA-event timings of this batch's upload, compute and download.
    pub timings: StageTimings,
}

/// Two-slot overlapped inference over a [`CudaModel`] (from [`CudaModel::pipeline`]).
///
/// ```text
/// submit(b0)                  upload b0 | compute b0 | download b0
/// submit(b1)                              upload b1  | compute b1 | download b1
/// finish() -> b0              (the host fills slot 0 for b2 meanwhile)
/// submit(b2) ...
/// ```
///
/// At most two batches are in flight; [`Pipeline::finish`] returns the oldest. Every batch
/// runs at `max_batch` images (a smaller one is padded with whatever the slot held before, and
/// only its own rows come back), so the model keeps one batch size: results are the logits
/// [`CudaModel::forward_u8`] gives those images in a batch of `max_batch`. The host can write a
/// batch straight into the next slot's page-locked buffer ([`Pipeline::input_buffer`], e.g.
/// from the image loader) instead of copying a [`U8Batch`] in.
pub struct Pipeline<'m> {
    /// Freed in `Drop` only once their copies are known to be done (see there).
    slots: ManuallyDrop<[Slot; 2]>,
    model: &'m mut CudaModel,
    max_batch: usize,
    image_bytes: usize,
    classes: usize,
    /// The slot the next batch goes into.
    next: usize,
    /// Slots with a batch in flight, oldest first.
    in_flight: VecDeque<usize>,
    /// The normalisation applied on the GPU to every batch.
    norm: PrepareInput,
}

impl CudaModel {
    /// An overlapped pipeline for batches of up to `max_batch` images: two page-locked input
    /// slots, uploads on the copy stream overlapping the previous batch's compute.
    pub fn pipeline(&mut self, max_batch: usize) -> Result<Pipeline<'_>> {
        let norm = self.options().normalization;
        Pipeline::new(self, max_batch, norm)
    }

    /// [`CudaModel::pipeline`] normalising with `norm` instead of
    /// [`CudaOptions::normalization`](super::CudaOptions::normalization).
    pub fn pipeline_with(&mut self, max_batch: usize, norm: PrepareInput) -> Result<Pipeline<'_>> {
        Pipeline::new(self, max_batch, norm)
    }
}

impl<'m> Pipeline<'m> {
    fn new(model: &'m mut CudaModel, max_batch: usize, norm: PrepareInput) -> Result<Self> {
        if max_batch == 0 {
            return Err(Error::invalid("pipeline batch", "must be at least 1"));
        }
        let input = model.config().input;
        if input.channels != 3 {
            return Err(Error::invalid(
                "pipeline",
                format!(
                    "u8 RGB input needs a 3-channel model, not {}",
                    input.channels
                ),
            ));
        }
        let image_bytes = input.height * input.width * 3;
        let classes = model.config().num_classes();
        let bytes = max_batch
            .checked_mul(image_bytes)
            .ok_or_else(|| Error::invalid("pipeline batch", format!("{max_batch} overflows")))?;
        let logit_count = max_batch
            .checked_mul(classes)
            .ok_or_else(|| Error::invalid("pipeline batch", format!("{max_batch} overflows")))?;
        let gpu = model.gpu();
        let slot = || -> Result<Slot> {
            Ok(Slot {
                host_input: alloc_upload(gpu.context(), bytes)?,
                device_input: gpu
                    .stream()
                    .alloc_zeros::<u8>(bytes)
                    .map_err(driver_err("allocating a pipeline input slot"))?,
                host_logits: alloc_readback(gpu.context(), logit_count)?,
                events: StageEvents::new(gpu)?,
                n: 0,
            })
        };
        let slots = ManuallyDrop::new([slot()?, slot()?]);
        // The slots' device inputs were allocated (and zeroed) on the compute stream and are
        // written on the copy stream: nothing orders the two but this wait (no event tracking).
        gpu.stream()
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))?;
        Ok(Pipeline {
            slots,
            model,
            max_batch,
            image_bytes,
            classes,
            next: 0,
            in_flight: VecDeque::with_capacity(2),
            norm,
        })
    }

    /// Largest batch a slot holds.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Bytes per image in [`Pipeline::input_buffer`] (`height * width * 3`, HWC RGB).
    pub fn image_bytes(&self) -> usize {
        self.image_bytes
    }

    /// Batches submitted and not yet finished (0, 1 or 2).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn free_slot(&self) -> Result<usize> {
        if self.in_flight.contains(&self.next) {
            return Err(Error::invalid(
                "pipeline",
                "both slots hold a batch in flight: call finish() first",
            ));
        }
        Ok(self.next)
    }

    /// The next slot's page-locked input: `max_batch * image_bytes()` bytes, image `i` at
    /// `i * image_bytes()` (HWC RGB, as in [`U8Batch`]). Write-combined memory: write it
    /// sequentially, do not read it. Then call [`Pipeline::submit_written`].
    pub fn input_buffer(&mut self) -> Result<&mut [u8]> {
        let index = self.free_slot()?;
        let slot = &mut self.slots[index];
        // The slot is free, so its last upload was waited for in `finish`; wait again anyway:
        // the host must never write while a DMA reads this memory.
        slot.events
            .h2d_end
            .synchronize()
            .map_err(driver_err("cuEventSynchronize"))?;
        slot.host_input
            .as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))
    }

    /// Copies `batch` into the next slot and submits it.
    pub fn submit(&mut self, batch: &U8Batch) -> Result<()> {
        let n = self.model.check_u8_batch(batch, "Pipeline::submit")?;
        if n > self.max_batch {
            return Err(Error::Shape {
                op: "Pipeline::submit",
                expected: format!("at most {} images", self.max_batch),
                found: batch.shape().to_vec(),
            });
        }
        let bytes = batch.as_slice().len();
        self.input_buffer()?[..bytes].copy_from_slice(batch.as_slice());
        self.submit_written(n)
    }

    /// Submits the first `n` images written into [`Pipeline::input_buffer`]: queues their
    /// upload on the copy stream, then the network and the logits' download on the compute
    /// stream (after the upload and the previous batch), and returns without waiting.
    pub fn submit_written(&mut self, n: usize) -> Result<()> {
        if n == 0 || n > self.max_batch {
            return Err(Error::invalid(
                "pipeline batch",
                format!("{n} images (need 1 ..= {})", self.max_batch),
            ));
        }
        let index = self.free_slot()?;
        // Every batch runs at the slot's full size; the rows past `n` hold earlier images and
        // their logits are never read. One batch size means one set of buffers, algorithms and
        // CUDA graph: a partial last batch, or one with failed images, costs the time of a full
        // batch instead of new buffers, new measurements and a new capture. (Each image's
        // logits depend on its own row only.)
        let run = self.max_batch;
        // Buffers and algorithms first: allocation is not to be overlapped.
        self.model.prepare(run)?;
        let queued = self.queue_batch(index, n, run);
        if queued.is_err() {
            // Part of the batch may be queued: its upload (the next submit into this slot
            // would overwrite the device input under the network's read, ordered only by
            // events recorded on success), the network, or the download into the slot's
            // page-locked logits. Both streams idle, the slot is free again. A failed wait
            // adds nothing to the first error.
            let gpu = self.model.gpu();
            let _ = gpu.copy_stream().synchronize();
            let _ = gpu.stream().synchronize();
        }
        queued
    }

    /// Queues the upload of slot `index`'s first `n` images, the network at batch `run` and
    /// the logits' download, and marks the slot in flight.
    fn queue_batch(&mut self, index: usize, n: usize, run: usize) -> Result<()> {
        let bytes = n * self.image_bytes;
        let slot = &mut self.slots[index];
        let gpu = self.model.gpu();
        let copy = gpu.copy_stream();
        let stream = gpu.stream();

        record(&slot.events.h2d_start, copy)?;
        {
            // A sub-slice of page-locked memory: the driver recognises it and copies
            // asynchronously. The host does not touch it again before `finish` has waited for
            // this batch (and `Drop` waits for both streams).
            let src = &slot
                .host_input
                .as_slice()
                .map_err(driver_err("cuEventSynchronize"))?[..bytes];
            let mut dst = slot
                .device_input
                .try_slice_mut(..bytes)
                .ok_or_else(|| Error::invalid("pipeline batch", "larger than the input slot"))?;
            copy.memcpy_htod(src, &mut dst)
                .map_err(driver_err("cuMemcpyHtoDAsync (images)"))?;
        }
        record(&slot.events.h2d_end, copy)?;
        stream
            .wait(&slot.events.h2d_end)
            .map_err(driver_err("cuStreamWaitEvent"))?;
        record(&slot.events.compute_start, stream)?;
        let src = slot.device_input.as_view();
        let dst = slot
            .host_logits
            .as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        self.model
            .compute_device_u8(&src, run, &self.norm, dst, &slot.events.compute_end)?;
        record(&slot.events.d2h_end, self.model.gpu().stream())?;
        slot.n = n;
        self.in_flight.push_back(index);
        self.next = 1 - index;
        Ok(())
    }

    /// Waits for the oldest batch in flight and returns its logits and timings.
    pub fn finish(&mut self) -> Result<PipelineOutput> {
        let index = *self
            .in_flight
            .front()
            .ok_or_else(|| Error::invalid("pipeline", "finish() with no batch in flight"))?;
        let slot = &self.slots[index];
        slot.events
            .d2h_end
            .synchronize()
            .map_err(driver_err("cuEventSynchronize"))?;
        // Only a batch known to be done leaves the flight list: a slot whose wait failed is
        // never handed to the next upload.
        self.in_flight.pop_front();
        let n = slot.n;
        let values = slot
            .host_logits
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))?[..n * self.classes]
            .to_vec();
        let timings = slot.events.timings()?;
        self.model.set_last_timings(timings);
        let logits = Array2::from_shape_vec((n, self.classes), values)
            .map_err(|e| Error::invalid("logits", e.to_string()))?;
        Ok(PipelineOutput { logits, timings })
    }
}

/// The pipeline drives [`crate::Backend::run_stream`] on a GPU: two page-locked slots.
impl BatchQueue for Pipeline<'_> {
    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn image_bytes(&self) -> usize {
        self.image_bytes
    }

    fn depth(&self) -> usize {
        self.slots.len()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn next_input(&mut self) -> Result<(usize, &mut [u8])> {
        let slot = self.free_slot()?;
        Ok((slot, self.input_buffer()?))
    }

    fn submit(&mut self, n: usize) -> Result<()> {
        self.submit_written(n)
    }

    fn finish(&mut self) -> Result<(Array2<f32>, Option<StageTimings>)> {
        let out = Pipeline::finish(self)?;
        Ok((out.logits, Some(out.timings)))
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Copies into and out of the slots' page-locked memory are not tracked by cudarc: a
        // slot's memory may be freed only once its last upload and download are done. Wait on
        // exactly those events; if a wait fails (a device error), the copies' state is unknown,
        // so the slots are leaked rather than freed under a DMA. Never panics.
        let done = self.slots.iter().all(|slot| {
            slot.events.h2d_end.synchronize().is_ok() && slot.events.d2h_end.synchronize().is_ok()
        });
        if done {
            // SAFETY: the slots are dropped exactly once, here, and no copy uses them any more
            // (both of each slot's last copies completed above).
            unsafe { ManuallyDrop::drop(&mut self.slots) };
        }
    }
}
