//! One cuDNN workspace per GPU, shared by every convolution (they all run one after another on
//! the compute stream): as large as the cap while algorithms are measured, then only as large
//! as the most any chosen algorithm needs.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, SyncOnDrop};

use super::device::driver_err;
use crate::error::{Error, Result};

/// The default cap on the shared convolution workspace: 512 MiB.
pub const DEFAULT_CONV_WORKSPACE_LIMIT: usize = 512 << 20;

/// The shared workspace: a device buffer, its cap, and the most any algorithm chosen since the
/// last [`ConvWorkspace::reset`] needs.
#[derive(Debug)]
pub(crate) struct ConvWorkspace {
    buffer: Option<CudaSlice<u8>>,
    limit: usize,
    high_water: usize,
    /// Bumped whenever the buffer moves: a CUDA graph captured with the old address must not
    /// be replayed.
    generation: u64,
}

/// The sizes to try for measuring algorithms, largest first: the cap, then smaller ones where
/// the device has less free memory, down to no workspace at all (algorithms that need none).
pub(crate) fn search_sizes(limit: usize) -> [usize; 4] {
    [limit, limit / 4, limit / 16, 0]
}

/// One try at making room for a search: the buffer's size, and the cap a candidate's need is
/// held to: the whole buffer (earlier choices may keep it larger than the try's size, and
/// what is allocated anyway may as well be used), but never more than the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SearchAttempt {
    pub allocate: usize,
    pub cap: usize,
}

/// The tries of [`ConvWorkspace::for_search`], largest first: each of [`search_sizes`], with a
/// buffer no smaller than `high_water`; a buffer size already tried (and failed) is not tried
/// again.
pub(crate) fn search_attempts(limit: usize, high_water: usize) -> Vec<SearchAttempt> {
    let mut attempts: Vec<SearchAttempt> = Vec::new();
    for size in search_sizes(limit) {
        let allocate = size.max(high_water);
        if attempts.last().is_none_or(|a| a.allocate != allocate) {
            attempts.push(SearchAttempt {
                allocate,
                cap: allocate.min(limit),
            });
        }
    }
    attempts
}

impl ConvWorkspace {
    pub fn new(limit: usize) -> Self {
        ConvWorkspace {
            buffer: None,
            limit,
            high_water: 0,
            generation: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A new cap; algorithms chosen before keep their workspace.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Changes whenever the buffer is reallocated or freed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes allocated now.
    pub fn allocated(&self) -> usize {
        self.buffer.as_ref().map_or(0, CudaSlice::len)
    }

    /// Makes the workspace as large as the cap allows for measuring algorithms (smaller where
    /// memory is short, never below what the algorithms chosen before need) and returns the
    /// most a candidate may need to be chosen.
    pub fn for_search(&mut self, stream: &Arc<CudaStream>) -> Result<usize> {
        let mut last_error = None;
        for attempt in search_attempts(self.limit, self.high_water) {
            match self.resize(stream, attempt.allocate) {
                Ok(()) => return Ok(attempt.cap),
                Err(e @ Error::OutOfMemory { .. }) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::invalid("cuDNN workspace", "no size fits")))
    }

    /// Records that a chosen algorithm needs `need` bytes and shrinks the workspace to the most
    /// any chosen algorithm needs.
    pub fn settle(&mut self, stream: &Arc<CudaStream>, need: usize) -> Result<()> {
        self.high_water = self.high_water.max(need);
        self.resize(stream, self.high_water)
    }

    /// At least `need` bytes, for running an algorithm chosen earlier.
    pub fn ensure(&mut self, stream: &Arc<CudaStream>, need: usize) -> Result<()> {
        if self.allocated() < need {
            self.high_water = self.high_water.max(need);
            self.resize(stream, need)?;
        }
        Ok(())
    }

    /// Some choices were forgotten: `need` is the most the remaining ones need.
    pub fn shrink_to(&mut self, stream: &Arc<CudaStream>, need: usize) -> Result<()> {
        self.high_water = need;
        self.resize(stream, need)
    }

    /// The buffer's address and size for a cuDNN call on `stream` (null and 0 when empty), and
    /// the guard that must outlive the call.
    pub fn device_ptr<'a>(
        &'a mut self,
        stream: &'a Arc<CudaStream>,
    ) -> (*mut c_void, usize, Option<SyncOnDrop<'a>>) {
        match self.buffer.as_mut() {
            Some(buffer) => {
                let bytes = buffer.len();
                let (ptr, guard) = buffer.device_ptr_mut(stream);
                (ptr as *mut c_void, bytes, Some(guard))
            }
            None => (std::ptr::null_mut(), 0, None),
        }
    }

    /// Exactly `bytes` (none for 0). The old buffer is freed on the compute stream, after every
    /// convolution queued before that used it.
    fn resize(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<()> {
        if self.allocated() == bytes {
            return Ok(());
        }
        refuse_during_capture(stream, "resizing the shared cuDNN workspace")?;
        self.buffer = None;
        self.generation += 1;
        if bytes > 0 {
            // Zeroed, not left uninitialised: on the H200 compute-sanitizer's initcheck reported
            // uninitialised reads inside cuDNN's own layout-conversion kernels during algorithm
            // searches, and the workspace was the one buffer handed to cuDNN unwritten. The
            // memset is once per resize (a fraction of a millisecond at 512 MiB), never per
            // call, and keeps initcheck's output for our own kernels' reads.
            let buffer = stream
                .alloc_zeros::<u8>(bytes)
                .map_err(driver_err("allocating the shared cuDNN workspace"))?;
            self.buffer = Some(buffer);
        }
        Ok(())
    }
}

/// An error if `stream` is capturing a CUDA graph: an allocation or a free there would become
/// part of the graph (or invalidate the capture) instead of happening now.
pub(crate) fn refuse_during_capture(stream: &CudaStream, what: &str) -> Result<()> {
    let status = stream
        .capture_status()
        .map_err(|e| Error::cuda("cuStreamIsCapturing", e))?;
    if status == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        Ok(())
    } else {
        Err(Error::cuda(
            what.to_string(),
            "not allowed while a CUDA graph is being captured",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_tries_the_cap_first_and_ends_with_no_workspace() {
        let sizes = search_sizes(DEFAULT_CONV_WORKSPACE_LIMIT);
        assert_eq!(sizes[0], 512 << 20);
        assert!(sizes.windows(2).all(|w| w[0] > w[1]), "{sizes:?}");
        assert_eq!(sizes[3], 0);
        assert_eq!(search_sizes(0), [0; 4]);
    }

    /// The cap never exceeds the limit, even when earlier choices keep a larger buffer (a limit
    /// lowered after they were made), uses what earlier choices keep allocated within it, and a
    /// buffer size that failed is not tried again.
    #[test]
    fn the_search_cap_stays_within_the_limit_and_no_size_is_tried_twice() {
        const MIB: usize = 1 << 20;
        let tries = |limit, high_water| {
            search_attempts(limit, high_water)
                .iter()
                .map(|a| (a.allocate / MIB, a.cap / MIB))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            tries(512 * MIB, 0),
            [(512, 512), (128, 128), (32, 32), (0, 0)]
        );
        assert_eq!(
            tries(512 * MIB, 64 * MIB),
            [(512, 512), (128, 128), (64, 64)]
        );
        assert_eq!(tries(512 * MIB, 600 * MIB), [(600, 512)]);
        assert_eq!(tries(0, 0), [(0, 0)]);
    }
}
