//! The CPU backend on ndarray: every layer on its own, and the whole model. It is the reference
//! the GPU backend is checked against and the fallback on machines without a GPU. The layers on
//! their own (and the training backward) run convolutions and linear layers as GEMMs (the
//! `gemm` crate, threaded with rayon). `CpuModel` runs them on micro-kernels of our own where
//! the CPU allows: fp32 and fp16 modes on AVX-512F or AVX2 kernels (`f32_panels.rs`), bf16
//! mode on bf16 kernels (our AVX512-BF16 micro-kernel, or numkong's AMX tiles) with
//! activations kept as HWC bf16 between layers.

mod bf16;
mod bf16_layers;
mod bf16_panels;
mod bias_act;
mod conv;
mod dropout;
mod f32_panels;
mod gemm;
mod hwc;
mod linear;
mod linear_rows;
mod loss;
mod lrn;
mod model;
mod pool;
mod training;

pub use bf16::{bf16_hardware, Bf16Kernels};
pub use bias_act::{bias_act_inplace, relu_backward, relu_inplace};
pub use conv::{Conv2d, Conv2dGrads, InputGradient};
pub use dropout::{keep_draw, layer_seed, Dropout};
pub use linear::{Linear, LinearGrads};
pub use loss::{softmax_cross_entropy, CrossEntropy};
pub use lrn::Lrn;
pub use model::{CpuModel, CHUNK_IMAGES};
pub use pool::MaxPool2d;
pub use training::{Gradient, Gradients, Tape};
