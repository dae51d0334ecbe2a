//! CUDA graphs for the network's forward and the training step: run eagerly once for a batch
//! size (algorithms chosen, workspaces sized), captured on the second run, replayed from the
//! third on as one launch instead of dozens. One state machine ([`GraphState::run`]) serves
//! both. What a graph bakes in — buffer addresses, the workspace's, a step's optimiser
//! settings — must not move while it is replayed: buffers live with the graph (one batch
//! size), and the rest is compared before each replay.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags_enum, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

use crate::error::{Error, Result};

/// Where a batch size's graph stands. `K` is what the captured work bakes in besides buffer
/// addresses (which live with the graph): the shared convolution workspace's generation, and for
/// a training step its optimiser settings. `G` is the graph (a stand-in in the tests).
pub(crate) enum GraphState<K, G = SendGraph> {
    /// Not run yet at this size: the next run is eager.
    Fresh,
    /// Ran eagerly once: the next run is captured (and launched).
    Warm,
    /// Captured with `baked`; replayed while the run's own values equal them.
    Ready { graph: G, baked: K },
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

/// The work a graph records, as [`GraphState::run`] drives it.
pub(crate) trait GraphWork {
    type Graph;
    /// Queues the work as it is, launch by launch.
    fn run_eagerly(&mut self) -> Result<()>;
    /// Records the work into a graph without running it. The outer error is one an earlier
    /// asynchronous call left pending (the caller must see it); the inner one, the capture's.
    fn capture(&mut self) -> Result<Result<Self::Graph>>;
    /// Launches a captured graph.
    fn replay(&mut self, graph: &Self::Graph) -> Result<()>;
}

impl<K: PartialEq, G> GraphState<K, G> {
    pub fn status(&self) -> GraphStatus {
        match self {
            GraphState::Fresh | GraphState::Warm => GraphStatus::NotCaptured,
            GraphState::Ready { .. } => GraphStatus::Replaying,
            GraphState::Unsupported(why) => GraphStatus::Unsupported(why.clone()),
        }
    }

    /// Runs `work` once, the way its graph stands: eager on the first run, captured and launched
    /// on the second, replayed after while `baked` stays what the graph was captured with. A run
    /// with other values is eager and the next one captures again (after an eager run that
    /// succeeded: a failed one leaves the next run eager too); a failed capture leaves the work
    /// eager for good. A pending earlier error is returned before anything runs, and the
    /// state starts over (that context is not expected to run anything again).
    pub fn run<W: GraphWork<Graph = G>>(&mut self, baked: K, work: &mut W) -> Result<()> {
        let (next, result) = match std::mem::replace(self, GraphState::Fresh) {
            GraphState::Ready { graph, baked: held } if held == baked => {
                let replayed = work.replay(&graph);
                (GraphState::Ready { graph, baked }, replayed)
            }
            GraphState::Unsupported(why) => (GraphState::Unsupported(why), work.run_eagerly()),
            GraphState::Warm => match work.capture()? {
                Ok(graph) => {
                    // Capturing recorded the work without running it.
                    let launched = work.replay(&graph);
                    (GraphState::Ready { graph, baked }, launched)
                }
                Err(e) => (GraphState::Unsupported(e.to_string()), work.run_eagerly()),
            },
            // The first run at this size, or the graph holds other values. Only a run that
            // went through makes the next one capture: a failed one (an algorithm search out of
            // memory, say) may have left set-up undone that a capture would then refuse.
            GraphState::Fresh | GraphState::Ready { .. } => match work.run_eagerly() {
                Ok(()) => (GraphState::Warm, Ok(())),
                Err(e) => (GraphState::Fresh, Err(e)),
            },
        };
        *self = next;
        result
    }
}

/// Work that a closure queues on `stream`, captured with [`capture`].
pub(crate) struct StreamWork<'a, F> {
    pub stream: &'a Arc<CudaStream>,
    pub queue: F,
}

impl<F: FnMut() -> Result<()>> GraphWork for StreamWork<'_, F> {
    type Graph = SendGraph;

    fn run_eagerly(&mut self) -> Result<()> {
        (self.queue)()
    }

    fn capture(&mut self) -> Result<Result<SendGraph>> {
        capture(self.stream, &mut self.queue)
    }

    fn replay(&mut self, graph: &SendGraph) -> Result<()> {
        graph.launch()
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
/// thread-local mode makes only this thread's capture-unsafe calls (synchronisation,
/// synchronous allocations) errors; nothing else may queue work on the compute stream meanwhile
/// (the model is borrowed mutably). Stream-ordered allocations (`cuMemAllocAsync`, which cudarc
/// uses where the device has memory pools) are not refused but recorded as graph memory nodes:
/// code that must not allocate under capture says so itself (the cuDNN workspace refuses to
/// resize, and the algorithm search to run, during a capture).
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

#[cfg(test)]
mod tests {
    //! The state machine on the host, with a scripted stand-in for the stream: what it runs,
    //! captures and replays on each call, and what it reports.
    use super::*;

    /// Logs every call; a captured "graph" is the number of the capture.
    #[derive(Default)]
    struct Scripted {
        log: Vec<String>,
        captures: u32,
        capture_fails: bool,
        pending_error: bool,
        replay_fails: bool,
        eager_fails: bool,
    }

    impl GraphWork for Scripted {
        type Graph = u32;

        fn run_eagerly(&mut self) -> Result<()> {
            self.log.push("eager".into());
            match self.eager_fails {
                true => Err(Error::cuda(
                    "cudnnFindConvolutionForwardAlgorithmEx",
                    "search failed",
                )),
                false => Ok(()),
            }
        }

        fn capture(&mut self) -> Result<Result<u32>> {
            if self.pending_error {
                return Err(Error::cuda("an earlier CUDA call", "pending"));
            }
            self.captures += 1;
            self.log.push(format!("capture {}", self.captures));
            Ok(match self.capture_fails {
                true => Err(Error::cuda("cuStreamEndCapture", "not capturable")),
                false => Ok(self.captures),
            })
        }

        fn replay(&mut self, graph: &u32) -> Result<()> {
            self.log.push(format!("replay {graph}"));
            match self.replay_fails {
                true => Err(Error::cuda("cuGraphLaunch", "launch failed")),
                false => Ok(()),
            }
        }
    }

    /// Runs `state` once at `baked` and returns what the work saw and the status after it.
    fn step(state: &mut GraphState<u64, u32>, baked: u64, work: &mut Scripted) -> String {
        work.log.clear();
        let result = state.run(baked, work);
        assert!(result.is_ok(), "{result:?}");
        work.log.join(", ")
    }

    #[test]
    fn eager_first_then_captured_then_replayed() {
        let (mut state, mut work) = (GraphState::Fresh, Scripted::default());
        assert_eq!(state.status(), GraphStatus::NotCaptured);
        assert_eq!(step(&mut state, 7, &mut work), "eager");
        assert_eq!(state.status(), GraphStatus::NotCaptured);
        // Capturing does not run the work: the new graph is launched at once.
        assert_eq!(step(&mut state, 7, &mut work), "capture 1, replay 1");
        assert_eq!(state.status(), GraphStatus::Replaying);
        for _ in 0..3 {
            assert_eq!(step(&mut state, 7, &mut work), "replay 1");
        }
        assert_eq!(state.status(), GraphStatus::Replaying);
    }

    #[test]
    fn other_baked_values_run_eagerly_then_capture_again() {
        let (mut state, mut work) = (GraphState::Fresh, Scripted::default());
        step(&mut state, 7, &mut work);
        step(&mut state, 7, &mut work);
        assert_eq!(step(&mut state, 8, &mut work), "eager");
        assert_eq!(state.status(), GraphStatus::NotCaptured);
        assert_eq!(step(&mut state, 8, &mut work), "capture 2, replay 2");
        assert_eq!(step(&mut state, 8, &mut work), "replay 2");
        // The values it was captured with are the new ones: the old ones are stale now.
        assert_eq!(step(&mut state, 7, &mut work), "eager");
    }

    #[test]
    fn a_failed_capture_leaves_the_work_eager_for_good() {
        let mut work = Scripted {
            capture_fails: true,
            ..Scripted::default()
        };
        let mut state = GraphState::Fresh;
        step(&mut state, 7, &mut work);
        // The failed capture ran nothing, so the work runs eagerly in the same call.
        assert_eq!(step(&mut state, 7, &mut work), "capture 1, eager");
        let GraphStatus::Unsupported(why) = state.status() else {
            panic!("expected Unsupported, got {:?}", state.status());
        };
        assert!(why.contains("not capturable"), "{why}");
        work.capture_fails = false;
        for baked in [7, 8, 8] {
            assert_eq!(step(&mut state, baked, &mut work), "eager");
        }
        assert!(matches!(state.status(), GraphStatus::Unsupported(_)));
    }

    #[test]
    fn a_pending_error_is_returned_before_anything_runs() {
        let (mut state, mut work) = (GraphState::Fresh, Scripted::default());
        step(&mut state, 7, &mut work);
        work.pending_error = true;
        work.log.clear();
        let err = state.run(7, &mut work).expect_err("the pending error");
        assert!(err.to_string().contains("pending"), "{err}");
        assert!(work.log.is_empty(), "ran {:?}", work.log);
        // Nothing was captured: the next run starts over.
        work.pending_error = false;
        assert_eq!(step(&mut state, 7, &mut work), "eager");
        assert_eq!(step(&mut state, 7, &mut work), "capture 1, replay 1");
    }

    #[test]
    fn a_failed_eager_run_is_not_followed_by_a_capture() {
        let (mut state, mut work) = (GraphState::Fresh, Scripted::default());
        work.eager_fails = true;
        let err = state.run(7, &mut work).expect_err("the failed run");
        assert!(err.to_string().contains("search failed"), "{err}");
        assert_eq!(state.status(), GraphStatus::NotCaptured);
        // The retry runs eagerly again (finishing the set-up), and only then captures.
        work.eager_fails = false;
        assert_eq!(step(&mut state, 7, &mut work), "eager");
        assert_eq!(step(&mut state, 7, &mut work), "capture 1, replay 1");
        // The same after a change of the baked values.
        work.eager_fails = true;
        assert!(state.run(8, &mut work).is_err());
        work.eager_fails = false;
        assert_eq!(step(&mut state, 8, &mut work), "eager");
        assert_eq!(step(&mut state, 8, &mut work), "capture 2, replay 2");
    }

    #[test]
    fn a_failed_replay_is_returned_and_the_graph_kept() {
        let (mut state, mut work) = (GraphState::Fresh, Scripted::default());
        step(&mut state, 7, &mut work);
        step(&mut state, 7, &mut work);
        work.replay_fails = true;
        let err = state.run(7, &mut work).expect_err("the failed launch");
        assert!(err.to_string().contains("launch failed"), "{err}");
        assert_eq!(state.status(), GraphStatus::Replaying);
        work.replay_fails = false;
        assert_eq!(step(&mut state, 7, &mut work), "replay 1");
    }
}
