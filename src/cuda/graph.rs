//! The network's forward as a CUDA graph: run eagerly once for a batch size (algorithms chosen,
//! workspaces sized), captured on the second run, replayed from the third on as one launch
//! instead of ~20. What the graph bakes in — buffer addresses, the workspace's — must not
//! move while it is replayed: buffers live with the graph (one batch size), and the shared
//! convolution workspace's generation is checked before each replay.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags_enum, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

use crate::error::{Error, Result};

/// Where a batch size's graph stands.
pub(crate) enum GraphState {
    /// Not run yet at this size: the next forward runs eagerly.
    Fresh,
    /// Ran eagerly once: the next forward is captured (and run).
    Warm,
    /// Captured with the convolution workspace at `workspace_generation`.
    Ready {
        graph: SendGraph,
        workspace_generation: u64,
    },
    /// The capture failed (an operation that cannot be captured): eager from now on.
    Unsupported(String),
}

/// What [`crate::cuda::CudaModel::graph_status`] reports for the current batch size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphStatus {
    /// [`crate::cuda::CudaOptions::eager`]: every forward launches its kernels one by one.
    Disabled,
    /// No graph yet for this batch size (the first two forwards run eagerly and capture).
    NotCaptured,
    /// Forwards replay the captured graph.
    Replaying,
    /// Capturing failed; forwards run eagerly. The reason.
    Unsupported(String),
}

impl GraphState {
    pub fn status(&self) -> GraphStatus {
        match self {
            GraphState::Fresh | GraphState::Warm => GraphStatus::NotCaptured,
            GraphState::Ready { .. } => GraphStatus::Replaying,
            GraphState::Unsupported(why) => GraphStatus::Unsupported(why.clone()),
        }
    }
}

/// A captured graph that may move to another thread with its model.
pub(crate) struct SendGraph(CudaGraph);

// SAFETY: a CUDA graph and its executable are plain driver handles; the driver allows using
// them from any thread as long as no two threads use one at the same time. The graph lives in
// a model's buffers and is only launched through `&mut` access to the model, and `launch`
// binds the graph's context to the calling thread first.
unsafe impl Send for SendGraph {}

impl SendGraph {
    pub fn launch(&self) -> Result<()> {
        self.0.launch().map_err(|e| Error::cuda("cuGraphLaunch", e))
    }
}

/// Records what `record` queues on `stream` into a graph instead of running it. The capture is
/// ended whatever `record` returns (a stream left capturing would fail every later call). The
/// thread-local mode makes only this thread's capture-unsafe calls (allocations,
/// synchronisation) errors; nothing else may queue work on the compute stream meanwhile (the
/// model is borrowed mutably).
///
/// The outer error is one an earlier asynchronous call left pending (reading it clears it, so
/// the caller must return it, not take it for this capture's failure); the inner result is the
/// capture's own.
pub(crate) fn capture(
    stream: &Arc<CudaStream>,
    record: impl FnOnce() -> Result<()>,
) -> Result<Result<SendGraph>> {
    // A pending error from an earlier asynchronous failure would make cudarc's end_capture
    // fail before it ends the capture: surface it now, before capturing.
    stream
        .context()
        .check_err()
        .map_err(|e| Error::cuda("an earlier CUDA call", e))?;
    Ok(capture_clean(stream, record))
}

/// [`capture`] on a context with no pending error.
fn capture_clean(
    stream: &Arc<CudaStream>,
    record: impl FnOnce() -> Result<()>,
) -> Result<SendGraph> {
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| Error::cuda("cuStreamBeginCapture", e))?;
    let recorded = record();
    let ended = stream.end_capture(CUgraphInstantiate_flags_enum(0));
    if ended.is_err() {
        end_abandoned_capture(stream);
    }
    recorded?;
    match ended {
        Ok(Some(graph)) => Ok(SendGraph(graph)),
        Ok(None) => Err(Error::cuda(
            "cuStreamEndCapture",
            "the capture recorded nothing",
        )),
        Err(e) => Err(Error::cuda("cuStreamEndCapture", e)),
    }
}

/// Ends a capture cudarc's `end_capture` may have left open (it can return before ending it)
/// and destroys what was recorded, so that the stream runs work again. Errors are ignored:
/// this only cleans up after one that is already being returned.
fn end_abandoned_capture(stream: &CudaStream) {
    use cudarc::driver::result;
    use cudarc::driver::sys::CUstreamCaptureStatus;
    // SAFETY: the stream handle is alive (borrowed); these calls only query and end its
    // capture, and destroy the graph handle that ending returns, which nothing else holds.
    unsafe {
        let capturing = result::stream::is_capturing(stream.cu_stream())
            .is_ok_and(|s| s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
        if capturing {
            if let Ok(graph) = result::stream::end_capture(stream.cu_stream()) {
                if !graph.is_null() {
                    let _ = result::graph::destroy(graph);
                }
            }
        }
    }
}
