//! The next batch on its way while a step computes ([`Prefetch`]): a page-locked
//! [`BatchBuffer`] goes up on the copy stream into a device staging buffer during one step, and
//! the next step on that buffer reads the staged copy ([`StagedBatch`]) instead of uploading.
//!
//! cudarc's per-buffer events are off (see `Gpu::new`), so the two streams are ordered here:
//! the compute stream waits for `uploaded` (recorded on the copy stream after the upload)
//! before it reads the staging buffer, and records `consumed` right after that read; the copy
//! stream waits for `consumed` before it writes the staging buffer again. The page-locked
//! memory has no guard of its own (with tracking off cudarc records no event on it either):
//! the step that sends a batch ahead waits for the copy stream before it returns
//! ([`Prefetch::wait_for_uploads`]), so the caller may refill or free that buffer after.

use cudarc::driver::{CudaEvent, CudaSlice, CudaView};

use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::events::{new_event, record, wait_for_stream};
use crate::error::{Error, Result};
use crate::train::{BatchBuffer, ContentsKey};

/// A batch uploaded ahead of its step, and the events that order its staging buffer.
pub(super) struct Prefetch {
    staging: Option<Staging>,
    /// Recorded on the copy stream after the upload into the staging buffer.
    uploaded: CudaEvent,
    /// Recorded on the compute stream after the staging buffer was last read.
    consumed: CudaEvent,
    /// Recorded on the copy stream when a step waits for its uploads (blocking sync: the
    /// host sleeps rather than spins).
    drained: CudaEvent,
}

/// The device buffer a batch is uploaded into ahead of its step.
struct Staging {
    /// Room for the largest batch staged so far: a smaller one (an epoch's short last batch)
    /// takes its first values, so the buffer is not swapped out, and the batch it holds
    /// dropped, each time the batch size changes.
    data: CudaSlice<f32>,
    /// `[N, C, H, W]` of the batch it holds or last held.
    shape: [usize; 4],
    /// The buffer and filling it holds (once `uploaded` completes); `None` once a step has
    /// taken it, or before the first upload.
    holds: Option<ContentsKey>,
}

/// A staged copy of a step's batch for [`super::precision::BatchSource::Staged`]: read it on the
/// compute stream only through [`StagedBatch::read`].
#[derive(Clone, Copy)]
pub(super) struct StagedBatch<'a> {
    data: &'a CudaSlice<f32>,
    /// The batch's values, the first of `data`'s.
    len: usize,
    uploaded: &'a CudaEvent,
    consumed: &'a CudaEvent,
}

impl StagedBatch<'_> {
    /// Runs `read` (which queues work on the compute stream reading the staged batch) after
    /// the upload has completed, and marks the staging buffer free for the next upload.
    pub fn read(self, gpu: &Gpu, read: impl FnOnce(&CudaView<f32>) -> Result<()>) -> Result<()> {
        let stream = gpu.stream();
        stream
            .wait(self.uploaded)
            .map_err(driver_err("cuStreamWaitEvent (staged batch)"))?;
        // Always in range: `Prefetch::send` stages only a batch the buffer has room for.
        let batch = self.data.try_slice(..self.len).ok_or_else(|| {
            Error::invalid(
                "CudaTrainer",
                "a staged batch larger than its staging buffer",
            )
        })?;
        read(&batch)?;
        record(self.consumed, stream)
    }
}

/// Whether staging that holds `holds` for batches of `staged_shape` is a copy of `buffer` as
/// it is now: the same buffer, not written since, of the same shape.
fn is_copy_of(holds: Option<ContentsKey>, staged_shape: [usize; 4], buffer: &BatchBuffer) -> bool {
    holds == Some(buffer.contents()) && staged_shape == buffer.shape()
}

impl Prefetch {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Prefetch {
            staging: None,
            uploaded: new_event(gpu)?,
            consumed: new_event(gpu)?,
            drained: new_event(gpu)?,
        })
    }

    /// The staged copy of `buffer` if the last [`Prefetch::send`] uploaded this buffer as it
    /// is now; taken, so a second step on the same buffer uploads it again.
    pub fn take(&mut self, buffer: &BatchBuffer) -> Option<StagedBatch<'_>> {
        let staging = self.staging.as_mut()?;
        if !is_copy_of(staging.holds, staging.shape, buffer) {
            return None;
        }
        staging.holds = None;
        Some(StagedBatch {
            data: &staging.data,
            len: element_count(staging.shape),
            uploaded: &self.uploaded,
            consumed: &self.consumed,
        })
    }

    /// A staging buffer with room for `next`, allocated if there is none (before a step is
    /// queued, so that the allocation's sync finds the compute stream idle; [`Prefetch::send`]
    /// does it otherwise). A staging buffer too small for it is freed after its last upload,
    /// and the batch it held with it; one large enough keeps the batch it holds for the step
    /// about to take it.
    pub fn prepare(&mut self, gpu: &Gpu, next: &BatchBuffer) -> Result<()> {
        if !next.is_page_locked() {
            return Ok(()); // never sent (see `send`): no staging buffer for it
        }
        staging_for(&mut self.staging, &self.uploaded, gpu, next.shape()).map(|_| ())
    }

    /// Waits until every upload [`Prefetch::send`] queued has finished reading its host
    /// memory (all the copy stream's work: also an upload whose `uploaded` record failed).
    /// Called before a step that sent a batch ahead returns; by then the upload has had the
    /// whole step to run beside it.
    ///
    /// If the event cannot be recorded or waited on, the whole copy stream is waited for
    /// before the error returns: the caller may free or refill the host memory an upload is
    /// still reading.
    pub fn wait_for_uploads(&self, gpu: &Gpu) -> Result<()> {
        wait_for_stream(
            &self.drained,
            gpu.copy_stream(),
            "cuEventSynchronize (the next batch's upload)",
        )
    }

    /// Starts uploading `next` on the copy stream, after any step still reading the staging
    /// buffer has read it. Only page-locked buffers go ahead (any other is uploaded by its
    /// own step, through the driver's staging copy); a buffer already staged as it is now is
    /// not sent twice.
    pub fn send(&mut self, gpu: &Gpu, next: &BatchBuffer) -> Result<()> {
        let Some(memory) = next.page_locked_images() else {
            return Ok(());
        };
        let Prefetch {
            staging,
            uploaded,
            consumed,
            ..
        } = self;
        let staging = staging_for(staging, uploaded, gpu, next.shape())?;
        if is_copy_of(staging.holds, staging.shape, next) {
            return Ok(());
        }
        let copy = gpu.copy_stream();
        copy.wait(consumed)
            .map_err(driver_err("cuStreamWaitEvent (staging buffer free)"))?;
        // Until `uploaded` completes the staging buffer holds nothing a step may use: mark it
        // before the copy, so a failed copy leaves nothing to take.
        staging.holds = None;
        staging.shape = next.shape();
        let mut room = staging.data.try_slice_mut(..memory.len()).ok_or_else(|| {
            Error::invalid("CudaTrainer", "a batch larger than its staging buffer")
        })?;
        copy.memcpy_htod(memory, &mut room)
            .map_err(driver_err("cuMemcpyHtoDAsync (next batch, copy stream)"))?;
        record(uploaded, copy)?;
        staging.holds = Some(next.contents());
        Ok(())
    }
}

/// The staging buffer in `slot` if it has room for a batch of `shape`, else a new one in its
/// place (the old one freed once `uploaded`, its last upload, has completed).
fn staging_for<'a>(
    slot: &'a mut Option<Staging>,
    uploaded: &CudaEvent,
    gpu: &Gpu,
    shape: [usize; 4],
) -> Result<&'a mut Staging> {
    let staging = match slot.take() {
        Some(staging) if staging.data.len() >= element_count(shape) => staging,
        old => {
            if old.is_some() {
                // Freed on the compute stream: its last upload must be done first. If that
                // cannot be known, the old buffer stays in its slot rather than be freed under
                // a copy that may still write it (see `Drop`).
                if let Err(error) = uploaded.synchronize() {
                    *slot = old;
                    return Err(driver_err("cuEventSynchronize (staging buffer)")(error));
                }
            }
            drop(old);
            Staging::new(gpu, shape)?
        }
    };
    Ok(slot.insert(staging))
}

impl Staging {
    /// A device buffer with room for a batch of `shape` (and any smaller one), holding nothing
    /// yet.
    fn new(gpu: &Gpu, shape: [usize; 4]) -> Result<Self> {
        let len = element_count(shape);
        let stream = gpu.stream();
        // Zeroed, though every element is uploaded before a step reads it: a memset per
        // allocation (the first batch, then only a larger one) keeps compute-sanitizer's
        // initcheck quiet.
        let data = stream
            .alloc_zeros::<f32>(len)
            .map_err(driver_err("allocate the staging buffer for the next batch"))?;
        // Allocated in the compute stream's order, written on the copy stream: the allocation
        // must be complete first.
        stream
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize (staging buffer)"))?;
        Ok(Staging {
            data,
            shape,
            holds: None,
        })
    }
}

/// The values of a batch of `shape` (a `BatchBuffer`'s shape: its product was checked when
/// the buffer was made).
fn element_count(shape: [usize; 4]) -> usize {
    shape.iter().product()
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // The staging buffer is freed on the compute stream, which knows nothing of the copy
        // stream: an upload still writing it must finish first. If that wait fails (a broken
        // context) the buffer is leaked rather than freed under a copy that may still write it.
        if self.staging.is_some() && self.uploaded.synchronize().is_err() {
            std::mem::forget(self.staging.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staged copy serves only the buffer it was made from, as it was then, at its shape.
    #[test]
    fn a_staged_copy_serves_only_its_buffer_unchanged() {
        let mut buffer = BatchBuffer::on_heap([2, 3, 4, 4]).unwrap();
        let other = BatchBuffer::on_heap([2, 3, 4, 4]).unwrap();
        let staged = Some(buffer.contents());
        let shape = buffer.shape();
        assert!(is_copy_of(staged, shape, &buffer));
        assert!(!is_copy_of(None, shape, &buffer), "nothing staged");
        assert!(!is_copy_of(staged, shape, &other), "another buffer");
        assert!(!is_copy_of(staged, [1, 3, 4, 4], &buffer), "another shape");
        buffer.images_mut().unwrap()[0] = 1.0;
        assert!(!is_copy_of(staged, shape, &buffer), "written since");
        assert!(is_copy_of(Some(buffer.contents()), shape, &buffer));
    }
}
