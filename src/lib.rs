//! AlexNet — the 2012 paper's network and torchvision's variant — on NVIDIA GPUs ([`cuda`]:
//! kernels compiled to PTX by build.rs or NVRTC, cuDNN and cuBLAS through cudarc, fp32, TF32,
//! fp16 and bf16) with a CPU reference backend ([`cpu`]: ndarray and our own fp32 and bf16 micro-kernels
//! or the `gemm` crate's, threaded with rayon; fp32, fp16 (f16-rounded) and bf16) that every GPU result is checked against and that runs where no GPU is usable
//! ([`open_backend`]).
//!
//! Data flows one way: files -> [`Weights`] / image batch -> a backend's model -> logits -> top-k.
//!
//! ```
//! use alexnet_cuda::cpu::CpuModel;
//! use alexnet_cuda::postprocess::{softmax, top_k};
//! use alexnet_cuda::timing::synthetic_batch;
//! use alexnet_cuda::{AlexNetConfig, Precision, Weights};
//!
//! # fn main() -> alexnet_cuda::Result<()> {
//! // The paper's architecture with the paper's seeded initialisation (or `Weights::load` a
//! // safetensors file, e.g. torchvision's pretrained weights).
//! let config = AlexNetConfig::paper();
//! assert_eq!(config.param_count()?, 62_378_344);
//! let weights = Weights::paper_init(&config, 0)?;
//! let model = CpuModel::new(&weights, Precision::Fp32)?;
//!
//! // A normalised NCHW batch; `image::Preprocess` makes one from photos.
//! let input = synthetic_batch(2, config.input, 42);
//! let logits = model.forward(input.view())?;
//! assert_eq!(logits.dim(), (2, 1000));
//! let probabilities = softmax(logits.view());
//! let best = top_k(probabilities.row(0), 5)?;
//! println!("class {} with p = {:.3}", best[0].0, best[0].1);
//! # Ok(())
//! # }
//! ```
//!
//! # Conventions
//! - Layouts are PyTorch's: conv weights OIHW, linear weights `[out, in]`, activations NCHW;
//!   flatten before FC1 in (C, H, W) order.
//! - LRN is the paper's (alpha **not** divided by n): PyTorch's equivalent is
//!   `LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)`. See [`config::LrnParams`].
//! - Dropout is inverted by default (identity at inference); the paper's classic form (x0.5 at
//!   inference) is [`config::DropoutMode::Classic`].
//! - Preprocessing is torchvision's eval transform, bit-exact with Pillow's resize
//!   ([`image::Preprocess`]).
//! - fp16 on the CPU rounds weights, the input and every layer's output to f16 while computing
//!   in f32 (the same contract as f16 storage with f32 accumulation on a GPU).

/// Compiles the README's Rust examples as doc tests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod backend;
pub mod classify;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod diagnose;
pub mod error;
pub mod image;
pub mod labels;
pub mod peak;
pub mod postprocess;
pub mod stream;
pub mod timing;
pub mod train;
pub mod weights;

pub use crate::image::{collect_image_paths, load_batch, LoadedBatch, Preprocess, U8Batch};
pub use backend::{
    open_backend, open_backend_with, Backend, BackendOptions, DeviceChoice, OpenedBackend,
};
pub use config::AlexNetConfig;
pub use config::Precision;
pub use error::{CudaError, Error, Result};
pub use labels::{class_name, imagenet_classes};
pub use weights::Weights;
