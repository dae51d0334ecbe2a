//! CUDA events around the three phases of one batch (upload, compute, download), shared by the
//! model's plain path and the overlapped [`super::Pipeline`]. They are also what the host waits
//! on before it touches page-locked memory (cudarc's own per-buffer events are off, see
//! `Gpu::new`), so they are created with blocking sync: a wait sleeps instead of spinning a core
//! the image loader needs.

use cudarc::driver::{CudaEvent, CudaStream};

use super::device::{driver_err, Gpu};
use crate::backend::StageTimings;
use crate::error::Result;

/// CUDA events (with timing) around the three phases of one batch.
pub(crate) struct StageEvents {
    pub h2d_start: CudaEvent,
    pub h2d_end: CudaEvent,
    pub compute_start: CudaEvent,
    pub compute_end: CudaEvent,
    pub d2h_end: CudaEvent,
}

/// A CUDA event on `gpu` that can time (no `DISABLE_TIMING`) and that a host wait sleeps on
/// rather than spins (`BLOCKING_SYNC`): the crate's one kind of event (cudarc takes a single
/// flag, so timing cannot be turned off for the events only waited on).
pub(crate) fn new_event(gpu: &Gpu) -> Result<CudaEvent> {
    gpu.context()
        .new_event(Some(
            cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC,
        ))
        .map_err(driver_err("cuEventCreate"))
}

impl StageEvents {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let event = || new_event(gpu);
        Ok(StageEvents {
            h2d_start: event()?,
            h2d_end: event()?,
            compute_start: event()?,
            compute_end: event()?,
            d2h_end: event()?,
        })
    }

    /// The three durations; waits for the last event.
    pub fn timings(&self) -> Result<StageTimings> {
        let ms = |a: &CudaEvent, b: &CudaEvent| {
            a.elapsed_ms(b)
                .map(f64::from)
                .map_err(driver_err("cuEventElapsedTime"))
        };
        Ok(StageTimings {
            h2d_ms: ms(&self.h2d_start, &self.h2d_end)?,
            compute_ms: ms(&self.compute_start, &self.compute_end)?,
            d2h_ms: ms(&self.compute_end, &self.d2h_end)?,
        })
    }
}

/// Records `event` on `stream`.
pub(crate) fn record(event: &CudaEvent, stream: &CudaStream) -> Result<()> {
    event.record(stream).map_err(driver_err("cuEventRecord"))
}

/// Waits until everything queued on `stream` so far has run, sleeping on `event` (recorded
/// here) rather than spinning on the stream. If the event cannot be recorded or waited on,
/// waits for the whole stream before returning that error: the caller may next free or
/// rewrite host memory a queued copy still uses (that sync's own error is the same failure
/// seen again). `what` names the wait in the error.
pub(crate) fn wait_for_stream(
    event: &CudaEvent,
    stream: &CudaStream,
    what: &'static str,
) -> Result<()> {
    let waited = record(event, stream).and_then(|()| event.synchronize().map_err(driver_err(what)));
    if waited.is_err() {
        let _ = stream.synchronize();
    }
    waited
}
