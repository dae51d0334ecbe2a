//! The cuBLAS handle, owned directly rather than through cudarc's `CudaBlas`, whose destructor
//! unwraps: after a sticky device error that would panic inside `Drop` (an abort if it happens
//! while unwinding). This one ignores a failure to destroy.

use cudarc::cublas::{result, sys};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use crate::error::{Error, Result};

/// A cuBLAS handle bound to one stream, in the default (true fp32) math mode.
#[derive(Debug)]
pub(crate) struct BlasHandle(pub(crate) sys::cublasHandle_t);

// SAFETY: a cuBLAS handle may be used from any thread as long as no two threads use it at the
// same time; the owner keeps it behind a `Mutex` (see `Gpu`), so it is sent, never shared.
unsafe impl Send for BlasHandle {}

impl BlasHandle {
    /// Creates a handle whose work goes to `stream`. The stream's context must be current.
    pub fn new(stream: &CudaStream) -> Result<Self> {
        let handle =
            BlasHandle(result::create_handle().map_err(|e| Error::cuda("cublasCreate", e))?);
        // SAFETY: the handle was just created; the stream outlives it (the `Gpu` drops the
        // handle before its streams).
        unsafe { result::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t) }
            .map_err(|e| Error::cuda("cublasSetStream", e))?;
        // True fp32 unless a layer asks for TF32 explicitly (through its compute type): the
        // default math mode never lowers fp32 precision; f16 GEMMs still use tensor cores.
        // SAFETY: the handle is alive (owned by `handle`).
        unsafe { sys::cublasSetMathMode(handle.0, sys::cublasMath_t::CUBLAS_DEFAULT_MATH) }
            .result()
            .map_err(|e| Error::cuda("cublasSetMathMode", e))?;
        Ok(handle)
    }
}

/// The workspace cuBLAS gets up front, so that it never allocates one itself: its own
/// allocations are not allowed while a CUDA graph is captured. NVIDIA's recommendation: 32 MiB
/// from Hopper (compute capability 9) on, 4 MiB before.
pub(crate) fn blas_workspace_bytes(compute_major: i32) -> usize {
    if compute_major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

impl BlasHandle {
    /// Hands cuBLAS `workspace` for every call on this handle. The buffer must outlive the
    /// handle (the `Gpu` owns both and drops the handle first).
    pub fn set_workspace(
        &self,
        workspace: &mut CudaSlice<u8>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let bytes = workspace.len();
        let (ptr, _done) = workspace.device_ptr_mut(stream);
        // SAFETY: the handle is alive; `ptr` is `bytes` of device memory on the handle's device,
        // kept alive for the handle's whole life by its owner.
        unsafe { sys::cublasSetWorkspace_v2(self.0, ptr as *mut std::ffi::c_void, bytes) }
            .result()
            .map_err(|e| Error::cuda("cublasSetWorkspace", e))
    }
}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate, destroyed only here; a failure (e.g. after a sticky
        // device error) is ignored: there is nothing left to do with the handle.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_and_later_get_the_larger_workspace() {
        assert_eq!(blas_workspace_bytes(8), 4 << 20);
        assert_eq!(blas_workspace_bytes(9), 32 << 20);
        assert_eq!(blas_workspace_bytes(12), 32 << 20);
    }
}
