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

    /// A tensor has the wrong shape for the architecture.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
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
    /// `op` names the operation (layer, kernel or library call).
    #[error("CUDA error in {op}: {message}")]
    Cuda { op: String, message: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            message: message.into(),
        }
    }

    pub(crate) fn cuda(op: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Cuda {
            op: op.into(),
            message: message.to_string(),
        }
    }
}
