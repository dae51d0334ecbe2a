//! The one list of the crate's CUDA kernels. Each entry says which `.cu` module (file stem
//! under `kernels/`) defines the family, for which storage types (the `extern "C"` name is the
//! family name plus `_f32` / `_f16` / `_bf16`) and which parameters its launcher passes, in order (each
//! pointer with the type it points to, each struct by name). Everything else is derived from
//! it: [`Kernel`], [`MODULES`], [`KERNELS`], the lookup at load time (`Gpu::new` finds every
//! entry in its module) and the argument check of every launch. `tests/kernel_signatures.rs`
//! checks it against the kernels' C signatures (every parameter's type, from the source);
//! `tests/ptx_kernels.rs` and `tests/nvrtc_compile.rs` check the compiled PTX against it (names,
//! parameter counts, struct sizes) and that [`MODULES`] are exactly the `kernels/*.cu` files.
//!
//! Adding a kernel: write it in `kernels/<module>.cu`, add its line here, its launcher in
//! `src/cuda/ops/`, and its host-executed test.

use std::mem::size_of;

use super::abi::*;
use super::dtype::GpuDtype;

/// What a pointer parameter points to, as the kernel's C signature declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointee {
    /// The kernel's storage type: `float` in its `_f32` entry, `unsigned short` (f16 bits) in
    /// its `_f16` one, `alexnet_bf16` (bfloat16 bits) in its `_bf16` one.
    Storage,
    F32,
    /// f16 bits, `unsigned short` in C.
    F16,
    /// bfloat16 bits, `alexnet_bf16` in C (a struct of one `unsigned short`, so that the
    /// kernels' overloads tell it from f16).
    Bf16,
    F64,
    U8,
    U32,
    U64,
    /// `AlexnetStepSettings`.
    StepSettings,
}

impl Pointee {
    /// [`Pointee::Storage`] made concrete for a kernel of storage type `dtype`.
    pub fn resolved(self, dtype: GpuDtype) -> Pointee {
        match (self, dtype) {
            (Pointee::Storage, GpuDtype::F32) => Pointee::F32,
            (Pointee::Storage, GpuDtype::F16) => Pointee::F16,
            (Pointee::Storage, GpuDtype::Bf16) => Pointee::Bf16,
            (other, _) => other,
        }
    }

    /// The C type pointed to, as the kernels' signatures spell it (`None` for
    /// [`Pointee::Storage`], which depends on the entry).
    pub fn c_type(self) -> Option<&'static str> {
        Some(match self {
            Pointee::Storage => return None,
            Pointee::F32 => "float",
            Pointee::F16 => "unsigned short",
            Pointee::Bf16 => "alexnet_bf16",
            Pointee::F64 => "double",
            Pointee::U8 => "unsigned char",
            Pointee::U32 => "unsigned int",
            Pointee::U64 => "unsigned long long",
            Pointee::StepSettings => "AlexnetStepSettings",
        })
    }
}

/// One kernel parameter as the launcher passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// A device pointer (`.u64` in PTX) to this type.
    Ptr(Pointee),
    /// A struct from `kernels/alexnet_abi.h` passed by value: its name and size in bytes
    /// (`.b8 name[size]` in PTX).
    Struct(&'static str, usize),
}

impl Param {
    /// This parameter in the entry of storage type `dtype` ([`Pointee::resolved`]).
    pub fn resolved(self, dtype: GpuDtype) -> Param {
        match self {
            Param::Ptr(pointee) => Param::Ptr(pointee.resolved(dtype)),
            other => other,
        }
    }
}

/// A parameter struct of `kernels/alexnet_abi.h` passed by value: [`Param::Struct`] with its
/// name and size.
macro_rules! by_value {
    ($abi:ident) => {
        Param::Struct(stringify!($abi), size_of::<$abi>())
    };
}

/// One compiled kernel: its family, storage type, module, `extern "C"` name and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    pub kernel: Kernel,
    pub dtype: GpuDtype,
    pub module: &'static str,
    pub name: &'static str,
    pub params: &'static [Param],
}

macro_rules! dtype {
    (f32) => {
        GpuDtype::F32
    };
    (f16) => {
        GpuDtype::F16
    };
    (bf16) => {
        GpuDtype::Bf16
    };
}

macro_rules! kernel_registry {
    ($(
        $module:literal => {$(
            $(#[$doc:meta])*
            $kernel:ident = $family:literal for [$($dtype:ident),+] $params:expr;
        )+}
    )+) => {
        /// A kernel family: one operation, compiled once per storage type it supports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {$($(
            $(#[$doc])*
            $kernel,
        )+)+}

        /// The `.cu` modules (file stems under `kernels/`), in load order.
        pub const MODULES: &[&str] = &[$($module),+];

        /// Every compiled kernel.
        pub const KERNELS: &[KernelSpec] = &[$($($(
            KernelSpec {
                kernel: Kernel::$kernel,
                dtype: dtype!($dtype),
                module: $module,
                name: concat!($family, "_", stringify!($dtype)),
                params: &$params,
            },
        )+)+)+];
    };
}

use Param::Ptr;
use Pointee::{Bf16, StepSettings, Storage, F16, F32, F64, U32, U64, U8};

kernel_registry! {
    "prepare" => {
        /// u8 HWC images to the normalised input tensor (`ops::prepare`).
        PrepareInput = "prepare_input" for [f32, f16, bf16]
            [Ptr(U8), Ptr(Storage), by_value!(AlexnetPrepareParams)];
        /// An f32 NCHW batch into the input tensor's type, layout and channels
        /// (`ops::prepare`).
        RelayoutF32To = "relayout_f32_to" for [f32, f16, bf16]
            [Ptr(F32), Ptr(Storage), by_value!(AlexnetRelayoutParams)];
    }
    "bias_act" => {
        /// Bias + optional ReLU in place (`ops::bias_act`).
        BiasAct = "bias_act" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(Storage), by_value!(AlexnetBiasActParams)];
        /// The ReLU's backward in place (`ops::bias_act`, training).
        ReluBackward = "relu_backward" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(Storage), by_value!(AlexnetReluBackwardParams)];
        /// A bias's gradient, summed per channel into f32 (`ops::bias_act`, training).
        BiasGrad = "bias_grad" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(F32), by_value!(AlexnetBiasGradParams)];
        /// A bias's gradient where the channel axis is innermost, first as per-split f64
        /// partial sums (`ops::bias_act`, training)...
        BiasGradColumns = "bias_grad_columns" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(F64), by_value!(AlexnetBiasColumnsParams)];
        /// ...then each channel's partials added into f32.
        BiasGradFinish = "bias_grad_finish" for [f32]
            [Ptr(F64), Ptr(Storage), by_value!(AlexnetBiasColumnsParams)];
    }
    "dropout" => {
        /// Training-mode dropout in place with the CPU's mask (`ops::dropout`).
        Dropout = "dropout" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(U64), by_value!(AlexnetDropoutParams)];
    }
    "convert" => {
        /// f16 to the named type: `convert_f16_to_f32` widens f16 logits (`ops::convert`).
        ConvertF16To = "convert_f16_to" for [f32]
            [Ptr(F16), Ptr(Storage), by_value!(AlexnetConvertParams)];
        /// bf16 to the named type: `convert_bf16_to_f32` widens bf16 logits (`ops::convert`).
        ConvertBf16To = "convert_bf16_to" for [f32]
            [Ptr(Bf16), Ptr(Storage), by_value!(AlexnetConvertParams)];
        /// f32 times a scale to the named type: `convert_f32_to_f16`, `convert_f32_to_bf16`
        /// (`ops::convert`, training).
        ConvertF32To = "convert_f32_to" for [f16, bf16]
            [Ptr(F32), Ptr(Storage), Ptr(StepSettings), by_value!(AlexnetConvertParams)];
    }
    "lrn" => {
        /// The paper's LRN, optionally after a fused ReLU (`ops::lrn`).
        Lrn = "lrn" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(Storage), by_value!(AlexnetLrnParams)];
        /// The LRN's backward (`ops::lrn`, training).
        LrnBackward = "lrn_backward" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(Storage), Ptr(Storage), by_value!(AlexnetLrnParams)];
    }
    "pool" => {
        /// Max-pooling, no padding, floor mode (`ops::pool`).
        MaxPool = "maxpool" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(Storage), by_value!(AlexnetPoolParams)];
        /// Max-pooling's backward, gathered per input element, optionally with the ReLU's
        /// before it (`ops::pool`, training).
        MaxPoolBackward = "maxpool_backward" for [f32, f16, bf16]
            [
                Ptr(Storage),
                Ptr(Storage),
                Ptr(Storage),
                Ptr(Storage),
                by_value!(AlexnetPoolBackwardParams),
            ];
    }
    "conv_epilogue" => {
        /// Bias, ReLU, optional LRN and max-pooling after a convolution in one pass
        /// (`ops::conv_epilogue`).
        ConvEpilogue = "conv_epilogue" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(Storage), Ptr(Storage), by_value!(AlexnetConvEpilogueParams)];
    }
    "softmax" => {
        /// Row-wise softmax and top-k (`ops::softmax`).
        SoftmaxTopk = "softmax_topk" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(F32), Ptr(U32), Ptr(F32), by_value!(AlexnetSoftmaxParams)];
    }
    "loss" => {
        /// Softmax cross-entropy and its gradient (`ops::loss`, training).
        SoftmaxXent = "softmax_xent" for [f32]
            [Ptr(F32), Ptr(U32), Ptr(F32), Ptr(F64), by_value!(AlexnetSoftmaxXentParams)];
    }
    "grad_scale" => {
        /// Mixed precision: gradients times 1/scale into f32, with the overflow check
        /// (`ops::grad_scale`, training).
        GradUnscale = "grad_unscale" for [f32, f16, bf16]
            [Ptr(Storage), Ptr(F32), Ptr(U32), Ptr(StepSettings), by_value!(AlexnetGradUnscaleParams)];
    }
    "sgd" => {
        /// One SGD step over every parameter (`ops::sgd`, training).
        Sgd = "sgd" for [f32]
            [Ptr(F32), Ptr(F32), Ptr(U32), Ptr(StepSettings), by_value!(AlexnetSgdParams)];
    }
}

impl Kernel {
    /// The entry of this family for `dtype`, or `None` when it is not compiled for it.
    pub fn spec(self, dtype: GpuDtype) -> Option<&'static KernelSpec> {
        KERNELS
            .iter()
            .find(|k| k.kernel == self && k.dtype == dtype)
    }
}

/// The entry named `name` (e.g. `"lrn_f16"`).
pub fn kernel(name: &str) -> Option<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_family_and_dtype_convention() {
        let lrn = Kernel::Lrn.spec(GpuDtype::F16).unwrap();
        assert_eq!((lrn.name, lrn.module), ("lrn_f16", "lrn"));
        assert_eq!(
            Kernel::ConvertF16To.spec(GpuDtype::F32).unwrap().name,
            "convert_f16_to_f32"
        );
        assert!(Kernel::ConvertF16To.spec(GpuDtype::F16).is_none());
        let bf = Kernel::MaxPool.spec(GpuDtype::Bf16).unwrap();
        assert_eq!(bf.name, "maxpool_bf16");
        assert_eq!(bf.params[0].resolved(GpuDtype::Bf16), Ptr(Bf16));
        assert_eq!(Bf16.c_type(), Some("alexnet_bf16"));
        assert_eq!(kernel("maxpool_f32").unwrap().kernel, Kernel::MaxPool);
    }

    #[test]
    fn every_entry_is_unique_and_in_a_listed_module() {
        for (i, a) in KERNELS.iter().enumerate() {
            assert!(MODULES.contains(&a.module), "{}", a.name);
            for b in &KERNELS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert!((a.kernel, a.dtype) != (b.kernel, b.dtype), "{}", a.name);
            }
        }
    }
}
