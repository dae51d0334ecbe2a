//! The CUDA backend: AlexNet on an NVIDIA GPU through cudarc — cuDNN convolutions, cuBLAS
//! GEMMs and the crate's kernels (`kernels/*.cu`, PTX built by `build.rs` or compiled at run
//! time with NVRTC).
//!
//! Everything is loaded at run time: a build of this crate runs on machines without a GPU, and
//! there [`Gpu::new`] / [`CudaModel::new`] return [`Error::DeviceUnavailable`] saying what is
//! missing (driver, GPU, cuBLAS, cuDNN 9, kernels) instead of panicking.
//! [`crate::open_backend`] with [`crate::DeviceChoice::Auto`] then falls back to the CPU.
//!
//! # Pieces
//! - [`Gpu`]: one device — context, a compute stream and a copy stream, cuBLAS and cuDNN
//!   handles, every kernel looked up once.
//! - [`GpuTensor`]: a device buffer with its logical shape (PyTorch order) and [`Layout`].
//! - Layers, each usable on its own and generic over `f32`, `half::f16` and `half::bf16`
//!   ([`GpuFloat`]):
//!   [`Conv2dGpu`] (cuDNN, algorithm measured once per shape and cached), [`LrnGpu`],
//!   [`MaxPoolGpu`], [`LinearGpu`] (cuBLAS), [`DropoutGpu`] (the CPU's mask),
//!   [`softmax_top_k`], [`PrepareInput`] (u8 HWC images to normalised tensors), [`bias_act`].
//! - [`CudaModel`]: the whole network from the same [`crate::Weights`] as the CPU model;
//!   [`Pipeline`]: two page-locked slots, uploads overlapping compute, CUDA-event timings.
//!
//! # Numerics
//! - fp32 is true fp32 by default: cuDNN with `CUDNN_FMA_MATH` (any algorithm without tensor
//!   cores, FFT and Winograd included, as PyTorch's fp32; [`CudaOptions::fp32_gemm_only`]
//!   keeps to the GEMM family, closer to the CPU), cuBLAS with `CUBLAS_COMPUTE_32F` in the
//!   default math mode. [`CudaOptions::allow_tf32`] opts into TF32 tensor cores (about 1e-3
//!   relative error).
//! - fp16 stores weights and activations as f16 and accumulates in f32 (tensor cores), NHWC,
//!   the RGB input padded to 8 channels — the contract the CPU model's fp16 mode emulates.
//! - bf16 is fp16's contract with bfloat16 storage (f32's range, 8 significant bits), on
//!   compute capability 8.0 and newer; it trains as mixed precision as fp16 does.
//!
//! # Example
//!
//! ```no_run
//! use alexnet_cuda::cuda::{CudaModel, CudaOptions};
//! use alexnet_cuda::image::{load_batch, Preprocess};
//! use alexnet_cuda::{AlexNetConfig, Precision, Weights};
//! use std::path::PathBuf;
//!
//! fn main() -> alexnet_cuda::Result<()> {
//!     let weights = Weights::paper_init(&AlexNetConfig::paper(), 0)?;
//!     let mut model = CudaModel::new(&weights, Precision::Fp16, CudaOptions::default())?;
//!     println!("running on {}", model.device_name());
//!
//!     let paths = vec![PathBuf::from("cat.jpg"), PathBuf::from("dog.jpg")];
//!     let loaded = load_batch(&paths, &Preprocess::default());
//!     // Softmax and top-k on the GPU: only 5 (class, probability) pairs per image come back.
//!     for (path, top) in paths.iter().zip(model.top_k_u8(&loaded.batch, 5)?) {
//!         println!("{}: class {} ({:.1}%)", path.display(), top[0].0, top[0].1 * 100.0);
//!     }
//!
//!     // Overlapped batches: the next upload runs while the GPU computes.
//!     let mut pipeline = model.pipeline(loaded.batch.len())?;
//!     pipeline.submit(&loaded.batch)?;
//!     pipeline.submit(&loaded.batch)?;
//!     for _ in 0..2 {
//!         let out = pipeline.finish()?;
//!         println!(
//!             "logits {:?}: upload {:.3} ms, compute {:.3} ms, download {:.3} ms",
//!             out.logits.dim(),
//!             out.timings.h2d_ms,
//!             out.timings.compute_ms,
//!             out.timings.d2h_ms
//!         );
//!     }
//!     Ok(())
//! }
//! ```

#[doc(hidden)]
pub mod abi;
#[doc(hidden)]
pub mod nvrtc;
#[doc(hidden)]
pub mod ptx;
pub mod registry;

mod blas;
mod cudnn;
mod device;
mod discovery;
mod dtype;
mod events;
mod graph;
mod launch;
mod libraries;
mod loader;
mod model;
mod ops;
mod pinned;
mod pipeline;
mod self_test;
mod tensor;
mod trainer;
mod workspace;

pub(crate) use device::driver_err;
pub use device::{Gpu, KernelOrigin};
pub use discovery::{search_dirs, Discovery, SearchDir, SearchEnv};
pub use dtype::{GpuDtype, GpuFloat};
pub use graph::GraphStatus;
pub use libraries::{
    driver_version, probe_libraries, CudaLibrary, LibraryVersions, MIN_DRIVER_VERSION,
};
pub use model::{CudaModel, CudaOptions};
pub use ops::{
    bias_act, bias_grad, convert_bf16_to_f32, convert_f16_to_f32, convert_f32_to_bf16,
    convert_f32_to_f16, relayout_f32_input, relu_backward, sgd_step, softmax_cross_entropy,
    softmax_top_k, unscale_gradients, Conv2dGpu, ConvChoice, ConvEpilogueGpu, ConvOptions,
    ConvPlanInfo, DropoutGpu, LinearGpu, LrnGpu, MaxPoolGpu, PrepareInput, Scale, SgdBuffers,
    SgdSegment, StepSettings, TopK,
};
pub use trainer::{CudaTrainOptions, CudaTrainer, StepPhase, StepProfile};

/// The kernels' arguments exactly as the launchers build them (parameter structs and launch
/// shapes), for the tests that run the kernels' own source on the CPU (`tests/host_kernels.rs`).
#[doc(hidden)]
pub mod kernel_args {
    /// What each host buffer type is in the kernels' C signatures, for checking a test's
    /// arguments against the registry as a launcher's are.
    pub use super::launch::KernelElem;
    pub use super::ops::{
        bias_act_args, bias_grad_args, bias_grad_columns_args, convert_args, grad_unscale_args,
        relayout_args, relu_backward_args, sgd_args, softmax_top_k_args, softmax_xent_args,
        step_settings_args,
    };
}

/// The cuDNN and cuBLAS calls' arguments as data, for `tests/library_calls.rs`.
#[doc(hidden)]
pub mod library_calls {
    pub use super::ops::{
        chw_columns_to_hwc, pack_conv_weights, unpack_conv_weights, ConvCall, GemmCall,
        LinearBuffer,
    };
}
pub use pinned::{alloc_readback, alloc_upload};
pub use pipeline::{Pipeline, PipelineOutput};
pub use tensor::{GpuTensor, Layout};
pub use workspace::DEFAULT_CONV_WORKSPACE_LIMIT;

pub use crate::backend::StageTimings;

#[cfg(doc)]
use crate::error::Error;
