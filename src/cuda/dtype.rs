//! The element types the GPU layers run on, and what each maps to in cuDNN and cuBLAS. Kernel
//! names come from the registry (`super::registry`), keyed by [`GpuDtype`]: call sites never
//! build a kernel name from pieces.

use std::fmt::Debug;

use cudarc::cublas::sys::cudaDataType_t;
use cudarc::cudnn::sys::cudnnDataType_t;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

/// Storage type of a GPU tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuDtype {
    /// `f32` storage and arithmetic.
    F32,
    /// IEEE binary16 storage, `f32` arithmetic and accumulation.
    F16,
    /// bfloat16 storage (f32's exponent, 8 significant bits), `f32` arithmetic and
    /// accumulation. Its tensor cores need compute capability 8.0 (Ampere) or newer.
    Bf16,
}

impl GpuDtype {
    /// Every dtype, in a fixed order.
    pub const ALL: [GpuDtype; 3] = [GpuDtype::F32, GpuDtype::F16, GpuDtype::Bf16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            GpuDtype::F32 => 4,
            GpuDtype::F16 | GpuDtype::Bf16 => 2,
        }
    }

    /// cuDNN's name for the storage type.
    pub(crate) fn cudnn(self) -> cudnnDataType_t {
        match self {
            GpuDtype::F32 => cudnnDataType_t::CUDNN_DATA_FLOAT,
            GpuDtype::F16 => cudnnDataType_t::CUDNN_DATA_HALF,
            GpuDtype::Bf16 => cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        }
    }

    /// cuBLAS's name for the storage type.
    pub(crate) fn cublas(self) -> cudaDataType_t {
        match self {
            GpuDtype::F32 => cudaDataType_t::CUDA_R_32F,
            GpuDtype::F16 => cudaDataType_t::CUDA_R_16F,
            GpuDtype::Bf16 => cudaDataType_t::CUDA_R_16BF,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the GPU layers are generic over: `f32`, [`half::f16`] or [`half::bf16`].
/// Sealed: the kernels exist for these three only.
pub trait GpuFloat:
    DeviceRepr
    + ValidAsZeroBits
    + Copy
    + Default
    + Debug
    + PartialEq
    + Send
    + Sync
    + Unpin
    + 'static
    + sealed::Sealed
    + super::launch::KernelElem
{
    /// The dtype tag (registry entries, library data types).
    const DTYPE: GpuDtype;

    /// Rounds an `f32` to this type (round to nearest even for `f16` and `bf16`).
    fn from_f32(v: f32) -> Self;

    /// Widens to `f32` (exact).
    fn to_f32(self) -> f32;

    /// `values` as this type's elements without a conversion: `Some` for `f32` only (an upload
    /// of f32 data then goes straight from the caller's memory).
    fn from_f32_slice(values: &[f32]) -> Option<&[Self]>;
}

impl GpuFloat for f32 {
    const DTYPE: GpuDtype = GpuDtype::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32_slice(values: &[f32]) -> Option<&[Self]> {
        Some(values)
    }
}

impl GpuFloat for f16 {
    const DTYPE: GpuDtype = GpuDtype::F16;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32_slice(_: &[f32]) -> Option<&[Self]> {
        None
    }
}

impl GpuFloat for bf16 {
    const DTYPE: GpuDtype = GpuDtype::Bf16;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32_slice(_: &[f32]) -> Option<&[Self]> {
        None
    }
}
