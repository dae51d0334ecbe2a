//! The element types the GPU layers run on, and what each maps to: kernel names, cuDNN and
//! cuBLAS data types. Call sites never build a kernel name from pieces; they ask the type.

use std::fmt::Debug;

use cudarc::cublas::sys::cudaDataType_t;
use cudarc::cudnn::sys::cudnnDataType_t;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::f16;

/// Storage type of a GPU tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuDtype {
    /// `f32` storage and arithmetic.
    F32,
    /// IEEE binary16 storage, `f32` arithmetic and accumulation.
    F16,
}

/// The `extern "C"` names of one dtype's kernels (see `kernels/alexnet_abi.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelNames {
    pub prepare_input: &'static str,
    pub bias_act: &'static str,
    pub dropout: &'static str,
    pub lrn: &'static str,
    pub maxpool: &'static str,
    pub softmax_topk: &'static str,
}

const F32_KERNELS: KernelNames = KernelNames {
    prepare_input: "prepare_input_f32",
    bias_act: "bias_act_f32",
    dropout: "dropout_f32",
    lrn: "lrn_f32",
    maxpool: "maxpool_f32",
    softmax_topk: "softmax_topk_f32",
};

const F16_KERNELS: KernelNames = KernelNames {
    prepare_input: "prepare_input_f16",
    bias_act: "bias_act_f16",
    dropout: "dropout_f16",
    lrn: "lrn_f16",
    maxpool: "maxpool_f16",
    softmax_topk: "softmax_topk_f16",
};

/// The kernel converting `f32` to `f16` (round to nearest even).
pub const CONVERT_F32_TO_F16: &str = "convert_f32_to_f16";
/// The kernel converting `f16` to `f32` (exact).
pub const CONVERT_F16_TO_F32: &str = "convert_f16_to_f32";

impl GpuDtype {
    /// Both dtypes, in a fixed order.
    pub const ALL: [GpuDtype; 2] = [GpuDtype::F32, GpuDtype::F16];

    /// This dtype's kernel names.
    pub const fn kernels(self) -> &'static KernelNames {
        match self {
            GpuDtype::F32 => &F32_KERNELS,
            GpuDtype::F16 => &F16_KERNELS,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            GpuDtype::F32 => 4,
            GpuDtype::F16 => 2,
        }
    }

    /// cuDNN's name for the storage type.
    pub(crate) fn cudnn(self) -> cudnnDataType_t {
        match self {
            GpuDtype::F32 => cudnnDataType_t::CUDNN_DATA_FLOAT,
            GpuDtype::F16 => cudnnDataType_t::CUDNN_DATA_HALF,
        }
    }

    /// cuBLAS's name for the storage type.
    pub(crate) fn cublas(self) -> cudaDataType_t {
        match self {
            GpuDtype::F32 => cudaDataType_t::CUDA_R_32F,
            GpuDtype::F16 => cudaDataType_t::CUDA_R_16F,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// An element type the GPU layers are generic over: `f32` or [`half::f16`]. Sealed: the kernels
/// exist for these two only.
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
{
    /// The dtype tag (kernel names, library data types).
    const DTYPE: GpuDtype;

    /// Rounds an `f32` to this type (round to nearest even for `f16`).
    fn from_f32(v: f32) -> Self;

    /// Widens to `f32` (exact).
    fn to_f32(self) -> f32;

    /// This type's kernel names.
    fn kernels() -> &'static KernelNames {
        Self::DTYPE.kernels()
    }
}

impl GpuFloat for f32 {
    const DTYPE: GpuDtype = GpuDtype::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
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
}
