//! Dropout with the CPU's counter-based mask: launcher of `kernels/dropout.cu`; CPU twin
//! [`crate::cpu::Dropout`].

use crate::config::DropoutMode;
use crate::cuda::abi::AlexnetDropoutParams;
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use cudarc::driver::{CudaView, LaunchConfig};

use crate::cuda::launch::{grid_1d, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::GpuTensor;
use crate::error::Result;

/// Dropout with the `dropout` kernel. The mask is the CPU's ([`crate::cpu::keep_draw`]):
/// element `i` (memory order) is kept when `keep_draw(seed, i) >= p * 2^32`, so a row-major or
/// NCHW tensor gets exactly the CPU's mask for the same seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutGpu {
    pub p: f32,
    pub mode: DropoutMode,
}

impl DropoutGpu {
    pub fn new(p: f32, mode: DropoutMode) -> Result<Self> {
        crate::cpu::Dropout::new(p, mode)?;
        Ok(DropoutGpu { p, mode })
    }

    /// Draws below this drop the element: `p` as a fraction of 2^32 (as the CPU computes it).
    pub fn threshold(&self) -> u32 {
        (self.p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32
    }

    /// The kernel's parameters and launch shape for training mode over `len` elements with
    /// `seed`: what [`DropoutGpu::forward_train`] passes.
    #[doc(hidden)]
    pub fn train_args(
        &self,
        len: usize,
        seed: u64,
    ) -> Result<(AlexnetDropoutParams, LaunchConfig)> {
        let scale = match self.mode {
            DropoutMode::Inverted => 1.0 / (1.0 - self.p),
            DropoutMode::Classic => 1.0,
        };
        args(len, seed, self.threshold(), scale)
    }

    /// The inference-mode parameters (classic mode: keep every element, scale by `1 - p`);
    /// `None` for inverted dropout, which launches nothing.
    #[doc(hidden)]
    pub fn eval_args(&self, len: usize) -> Result<Option<(AlexnetDropoutParams, LaunchConfig)>> {
        match self.mode {
            DropoutMode::Inverted => Ok(None),
            DropoutMode::Classic => args(len, 0, 0, 1.0 - self.p).map(Some),
        }
    }

    /// Training mode, in place: zero with probability `p`, scale survivors by `1/(1-p)`
    /// (inverted) or keep them (classic).
    pub fn forward_train<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &mut GpuTensor<T>,
        seed: u64,
    ) -> Result<()> {
        let args = self.train_args(x.len(), seed)?;
        launch_dropout(gpu, x, None, args)
    }

    /// [`DropoutGpu::forward_train`] with the seed read on the device from `seed[0]` when the
    /// kernel runs: a training step captured as a CUDA graph draws each step's mask from the
    /// seeds uploaded before its replay.
    pub fn forward_train_seeded<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &mut GpuTensor<T>,
        seed: &CudaView<'_, u64>,
    ) -> Result<()> {
        if seed.is_empty() {
            return Err(super::shape_err(
                "DropoutGpu::forward_train_seeded",
                "one seed",
                &[0],
            ));
        }
        let args = self.train_args(x.len(), 0)?;
        launch_dropout(gpu, x, Some(seed), args)
    }

    /// Inference mode, in place: the identity (inverted; nothing is launched) or a
    /// multiplication by `1 - p` (classic: the kernel with threshold 0 keeps every element).
    pub fn forward_eval<T: GpuFloat>(&self, gpu: &Gpu, x: &mut GpuTensor<T>) -> Result<()> {
        match self.eval_args(x.len())? {
            None => Ok(()),
            Some(args) => launch_dropout(gpu, x, None, args),
        }
    }
}

fn args(
    len: usize,
    seed: u64,
    threshold: u32,
    scale: f32,
) -> Result<(AlexnetDropoutParams, LaunchConfig)> {
    let params = AlexnetDropoutParams {
        len: len as u64,
        seed,
        threshold,
        scale,
    };
    Ok((params, grid_1d("DropoutGpu", params.len)?))
}

fn launch_dropout<T: GpuFloat>(
    gpu: &Gpu,
    x: &mut GpuTensor<T>,
    seed_at: Option<&CudaView<'_, u64>>,
    (params, cfg): (AlexnetDropoutParams, LaunchConfig),
) -> Result<()> {
    // SAFETY: dropout(T *x, const unsigned long long *seed_at, AlexnetDropoutParams); `x`
    // holds `len` elements (the parameters were made from its length); `seed_at` is null or
    // holds at least one u64 (checked by the caller) and is a separate buffer from `x`; one
    // thread per element.
    unsafe {
        let mut launch = Launch::new(gpu, Kernel::Dropout, T::DTYPE)?;
        launch.buffer(x.data_mut());
        match seed_at {
            Some(seed) => launch.buffer(seed),
            None => launch.null_buffer::<u64>(),
        };
        launch.params(&params).launch(cfg)
    }
}
