//! The CUDA libraries this backend loads at run time, probed before anything calls into them
//! (cudarc panics on the first call into a library it cannot load), and what to install when
//! one is missing.

use crate::error::{Error, Result};

/// The CUDA libraries this backend loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLibrary {
    /// `libcuda.so`, installed with the NVIDIA driver.
    Driver,
    Cublas,
    CublasLt,
    Cudnn,
    Nvrtc,
}

impl CudaLibrary {
    /// Whether the shared library can be loaded. Only tries to open it: calls nothing in it,
    /// so it cannot panic the way a call into a missing library does.
    pub fn is_present(self) -> bool {
        // SAFETY: each `is_culib_present` only attempts `dlopen` on candidate file names and
        // drops the handle; no symbol of the library is called.
        unsafe {
            match self {
                CudaLibrary::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLibrary::Cublas => cudarc::cublas::sys::is_culib_present(),
                CudaLibrary::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                CudaLibrary::Cudnn => cudarc::cudnn::sys::is_culib_present(),
                CudaLibrary::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            }
        }
    }

    /// What to install when the library is missing.
    pub fn install_hint(self) -> &'static str {
        match self {
            CudaLibrary::Driver => {
                "no NVIDIA driver: libcuda.so could not be loaded. Run on a machine with an NVIDIA \
                 GPU and its driver installed (nvidia-smi should list the GPU), or use --device cpu"
            }
            CudaLibrary::Cublas => {
                "cuBLAS (libcublas.so.13 or .12) could not be loaded: install the CUDA toolkit's \
                 cuBLAS (e.g. `apt install libcublas-13-0`, or `pip install nvidia-cublas-cu12`) \
                 and put its lib directory on LD_LIBRARY_PATH"
            }
            CudaLibrary::CublasLt => {
                "cuBLASLt (libcublasLt.so.13 or .12, needed by cuBLAS) could not be loaded: \
                 install the CUDA toolkit's cuBLAS (it ships both libraries) and put its lib \
                 directory on LD_LIBRARY_PATH"
            }
            CudaLibrary::Cudnn => {
                "cuDNN 9 (libcudnn.so.9) could not be loaded: install cuDNN 9 for your CUDA \
                 version (e.g. `apt install libcudnn9-cuda-12`, or `pip install \
                 nvidia-cudnn-cu12`) and put its lib directory on LD_LIBRARY_PATH"
            }
            CudaLibrary::Nvrtc => "NVRTC (libnvrtc.so) could not be loaded",
        }
    }
}

/// Checks, without touching any GPU, that the driver, cuBLAS(Lt) and cuDNN can be loaded;
/// [`Error::DeviceUnavailable`] naming the first that cannot. (NVRTC is only needed when a
/// build has no PTX; [`Gpu::new`] checks it then.)
pub fn probe_libraries() -> Result<()> {
    for lib in [
        CudaLibrary::Driver,
        CudaLibrary::Cublas,
        CudaLibrary::CublasLt,
        CudaLibrary::Cudnn,
    ] {
        if !lib.is_present() {
            return Err(Error::DeviceUnavailable(lib.install_hint().to_string()));
        }
    }
    Ok(())
}

/// The oldest driver this build runs on (as `cuDriverGetVersion` reports it): cudarc's
/// CUDA 13.0 bindings load entry points older drivers lack (e.g. `cuEventElapsedTime_v2`,
/// whose absence would be a panic, not an error), and the PTX is ISA 9.0.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// The CUDA version the installed driver supports (e.g. 13000 for 13.0), or
/// [`Error::DeviceUnavailable`] when there is no driver.
pub fn driver_version() -> Result<i32> {
    if !CudaLibrary::Driver.is_present() {
        return Err(unavailable(CudaLibrary::Driver.install_hint()));
    }
    let mut version = 0;
    // SAFETY: the driver library loads (checked above) and exports cuDriverGetVersion in every
    // release; it needs no cuInit and writes one int through a valid pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| unavailable(format!("cuDriverGetVersion failed ({e:?})")))?;
    Ok(version)
}

pub(crate) fn unavailable(message: impl Into<String>) -> Error {
    Error::DeviceUnavailable(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_library_has_an_install_hint() {
        for lib in [
            CudaLibrary::Driver,
            CudaLibrary::Cublas,
            CudaLibrary::CublasLt,
            CudaLibrary::Cudnn,
            CudaLibrary::Nvrtc,
        ] {
            assert!(!lib.install_hint().is_empty());
            let _ = lib.is_present(); // must not panic either way
        }
    }
}
