//! The crate's one error type.
//!
//! Every variant names what went wrong in the user's terms: the file, the tensor, the shape that
//! was expected and the one that was found.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything this crate can report instead of panicking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The weights file is not a valid safetensors file (truncated, corrupt header, bad offsets).
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    WeightsFormat { path: PathBuf, message: String },

    /// A tensor the architecture needs is not in the weights file.
    #[error("{}: missing tensor `{name}` (expected shape {expected:?})", path.display())]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },

    /// The weights file holds a tensor the architecture has no place for.
    #[error("{}: unexpected tensor `{name}` (shape {shape:?}); the {config} architecture has no such parameter", path.display())]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
        config: String,
    },

    /// A tensor has the wrong shape for the architecture; `hint` says what the shape looks like
    /// when it is recognisable (transposed, another framework's layout).
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}{}", path.display(), suffix(hint))]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        hint: Option<String>,
    },

    /// A tensor is stored in a dtype this crate does not read.
    #[error("{}: tensor `{name}` has dtype {found}, expected one of F32, F16, BF16", path.display())]
    TensorDtype {
        path: PathBuf,
        name: String,
        found: String,
    },

    /// The architecture could not be read off the tensor shapes, or disagrees with the one asked for.
    #[error("{}: {message}", path.display())]
    Architecture { path: PathBuf, message: String },

    /// An image could not be decoded.
    #[error("{}: cannot decode image: {message}", path.display())]
    ImageDecode { path: PathBuf, message: String },

    /// An image is larger than the decoder is allowed to allocate for.
    #[error("{}: image too large: {message}", path.display())]
    ImageTooLarge { path: PathBuf, message: String },

    /// A tensor handed to a layer or model has the wrong shape.
    #[error("{op}: input has shape {found:?}, expected {expected}")]
    Shape {
        op: &'static str,
        expected: String,
        found: Vec<usize>,
    },

    /// A configuration or argument is out of range (zero batch, kernel larger than the input, ...).
    #[error("invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },

    /// The requested device cannot be used; the message says what is missing.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    /// A CUDA call (driver, cuBLAS, cuDNN, NVRTC or a kernel launch) failed on a usable device;
    /// `op` names the operation (layer, kernel or library call), `source` is the library's error.
    #[error("CUDA error in {op}: {source}")]
    Cuda {
        op: String,
        #[source]
        source: CudaError,
    },

    /// The GPU ran out of memory in `op` (an allocation, or a library that needed workspace).
    /// The model stays usable: free memory or run a smaller batch.
    #[error(
        "out of GPU memory in {op}: {source} (`nvidia-smi` shows what holds the GPU's memory; \
         a smaller batch needs less)"
    )]
    OutOfMemory {
        op: String,
        #[source]
        source: CudaError,
    },
}

/// What a CUDA library reported, kept as the library's own error value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    #[cfg(feature = "cuda")]
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[cfg(feature = "cuda")]
    #[error("cuBLAS: {:?}", .0.0)]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    #[cfg(feature = "cuda")]
    #[error("cuDNN: {:?}", .0.0)]
    Cudnn(#[from] cudarc::cudnn::result::CudnnError),
    #[cfg(feature = "cuda")]
    #[error("NVRTC: {:?}", .0.0)]
    Nvrtc(#[from] cudarc::nvrtc::result::NvrtcError),
    #[cfg(feature = "cuda")]
    /// NVRTC rejected a kernel source; `log` is the compiler's output.
    #[error("NVRTC: {:?}: {log}", .source.0)]
    NvrtcCompile {
        source: cudarc::nvrtc::result::NvrtcError,
        log: String,
    },
    /// A check of the crate's own on what a library or the device returned (e.g. cuDNN's output
    /// shape disagreeing with the layer's, a kernel missing from a module).
    #[error("{0}")]
    Check(String),
}

impl CudaError {
    /// Whether the library ran out of device (or pinned host) memory.
    pub fn is_out_of_memory(&self) -> bool {
        #[cfg(feature = "cuda")]
        use cudarc::cublas::sys::cublasStatus_t;
        #[cfg(feature = "cuda")]
        use cudarc::cudnn::sys::cudnnStatus_t;
        #[cfg(feature = "cuda")]
        use cudarc::driver::sys::CUresult;
        match self {
            #[cfg(feature = "cuda")]
            CudaError::Driver(e) => e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            #[cfg(feature = "cuda")]
            CudaError::Cublas(e) => e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            #[cfg(feature = "cuda")]
            CudaError::Cudnn(e) => matches!(
                e.0,
                cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED
                    | cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED
            ),
            _ => false,
        }
    }
}

impl From<String> for CudaError {
    fn from(message: String) -> Self {
        CudaError::Check(message)
    }
}

impl From<&str> for CudaError {
    fn from(message: &str) -> Self {
        CudaError::Check(message.to_string())
    }
}

/// `": hint"`, or nothing.
fn suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(": {h}")).unwrap_or_default()
}

impl Error {
    /// [`Error::Io`] on `path` (also for programs built on the crate, such as its binaries).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// [`Error::Invalid`]: `what` was given a value it cannot take, `message` says why.
    pub fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            message: message.into(),
        }
    }

    /// A CUDA failure in `op`; [`Error::OutOfMemory`] when the library ran out of memory.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(op: impl Into<String>, source: impl Into<CudaError>) -> Self {
        let (op, source) = (op.into(), source.into());
        if source.is_out_of_memory() {
            Error::OutOfMemory { op, source }
        } else {
            Error::Cuda { op, source }
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use cudarc::cublas::result::CublasError;
    use cudarc::cublas::sys::cublasStatus_t;
    use cudarc::cudnn::result::CudnnError;
    use cudarc::cudnn::sys::cudnnStatus_t;
    use cudarc::driver::sys::CUresult;
    use cudarc::driver::DriverError;

    // No error here is formatted: a DriverError's Display asks the driver for its text.
    #[test]
    fn out_of_memory_from_any_library_is_its_own_variant() {
        let oom: [CudaError; 3] = [
            DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY).into(),
            CublasError(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED).into(),
            CudnnError(cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED).into(),
        ];
        for source in oom {
            assert!(matches!(
                Error::cuda("op", source),
                Error::OutOfMemory { .. }
            ));
        }
        let other: [CudaError; 3] = [
            DriverError(CUresult::CUDA_ERROR_INVALID_VALUE).into(),
            CublasError(cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE).into(),
            "a check".into(),
        ];
        for source in other {
            assert!(matches!(Error::cuda("op", source), Error::Cuda { .. }));
        }
    }

    #[test]
    fn the_source_is_kept_not_stringified() {
        let error = Error::cuda(
            "cublasGemmEx",
            CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED),
        );
        let source = std::error::Error::source(&error).expect("a source");
        assert!(matches!(
            source.downcast_ref::<CudaError>(),
            Some(CudaError::Cublas(CublasError(
                cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
            )))
        ));
        assert_eq!(
            error.to_string(),
            "CUDA error in cublasGemmEx: cuBLAS: CUBLAS_STATUS_NOT_SUPPORTED"
        );
    }
}
