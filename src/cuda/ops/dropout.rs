//! Dropout with the CPU's counter-based mask: launcher of `kernels/dropout.cu`; CPU twin
//! [`crate::cpu::Dropout`].

use crate::config::DropoutMode;
use crate::cuda::abi::AlexnetDropoutParams;
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
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

    /// Training mode, in place: zero with probability `p`, scale survivors by `1/(1-p)`
    /// (inverted) or keep them (classic).
    pub fn forward_train<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &mut GpuTensor<T>,
        seed: u64,
    ) -> Result<()> {
        let scale = match self.mode {
            DropoutMode::Inverted => 1.0 / (1.0 - self.p),
            DropoutMode::Classic => 1.0,
        };
        launch_dropout(gpu, x, seed, self.threshold(), scale)
    }

    /// Inference mode, in place: the identity (inverted; nothing is launched) or a
    /// multiplication by `1 - p` (classic: the kernel with threshold 0 keeps every element).
    pub fn forward_eval<T: GpuFloat>(&self, gpu: &Gpu, x: &mut GpuTensor<T>) -> Result<()> {
        match self.mode {
            DropoutMode::Inverted => Ok(()),
            DropoutMode::Classic => launch_dropout(gpu, x, 0, 0, 1.0 - self.p),
        }
    }
}

fn launch_dropout<T: GpuFloat>(
    gpu: &Gpu,
    x: &mut GpuTensor<T>,
    seed: u64,
    threshold: u32,
    scale: f32,
) -> Result<()> {
    const OP: &str = "DropoutGpu";
    let params = AlexnetDropoutParams {
        len: x.len() as u64,
        seed,
        threshold,
        scale,
    };
    let cfg = grid_1d(OP, params.len)?;
    // SAFETY: dropout(T *x, AlexnetDropoutParams); `x` holds `len` elements; one thread per
    // element.
    unsafe {
        Launch::new(gpu, Kernel::Dropout, T::DTYPE)?
            .buffer(x.data_mut())
            .params(&params)
            .launch(cfg)
    }
}
