//! The paper's inter-channel LRN: launcher of `kernels/lrn.cu`; CPU twin [`crate::cpu::Lrn`].

use super::{expect_like, layout_err, shape_err};
use crate::config::LrnParams;
use crate::cuda::abi::{AlexnetLrnParams, ALEXNET_LRN_BACKWARD_CHUNK, ALEXNET_LRN_BACKWARD_RING};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{abi_shape, element_count, grid_1d, to_u32, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};

/// The paper's inter-channel LRN (see [`LrnParams`]) with the `lrn` kernel; optionally applies
/// the ReLU before it (so the convolution in front can skip its own).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrnGpu {
    pub params: LrnParams,
}

impl LrnGpu {
    pub fn new(params: LrnParams) -> Result<Self> {
        if params.size == 0 {
            return Err(Error::invalid("LRN size", "must be positive"));
        }
        Ok(LrnGpu { params })
    }

    /// The kernel's parameters and launch shape for a `[n, c, h, w]` input in `layout`: what
    /// [`LrnGpu::forward`] passes (the host-executed tests run the kernel with exactly these).
    #[doc(hidden)]
    pub fn args(
        &self,
        dims: [usize; 4],
        layout: Layout,
        relu_first: bool,
    ) -> Result<(AlexnetLrnParams, LaunchConfig)> {
        self.launch_args("LrnGpu::forward", dims, layout, relu_first)
    }

    /// [`LrnGpu::args`], with errors naming `op`.
    fn launch_args(
        &self,
        op: &'static str,
        dims: [usize; 4],
        layout: Layout,
        relu_first: bool,
    ) -> Result<(AlexnetLrnParams, LaunchConfig)> {
        let params = AlexnetLrnParams {
            shape: abi_shape(op, dims, layout == Layout::Nhwc)?,
            size: to_u32(op, "size", self.params.size)?,
            k: self.params.k,
            alpha: self.params.alpha,
            beta: self.params.beta,
            relu_first: u32::from(relu_first),
        };
        Ok((params, grid_1d(op, element_count(&dims)?)?))
    }

    /// `y = lrn(relu_first ? max(x, 0) : x)`; `x` and `y` have the same 4-D shape and layout.
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
        relu_first: bool,
    ) -> Result<()> {
        const OP: &str = "LrnGpu::forward";
        if y.shape() != x.shape() {
            return Err(shape_err(OP, format!("output {:?}", x.shape()), y.shape()));
        }
        if y.layout() != x.layout() {
            return Err(layout_err(OP, x.layout(), y.layout()));
        }
        let (params, cfg) = self.args(x.dims4(OP)?, x.layout(), relu_first)?;
        // SAFETY: lrn(const T *src, T *dst, AlexnetLrnParams); `x` and `y` both hold
        // n*c*h*w elements of `params.shape` (checked above) and are distinct buffers (one is
        // borrowed shared, the other exclusively); one thread per element.
        unsafe {
            Launch::new(gpu, Kernel::Lrn, T::DTYPE)?
                .buffer(x.data())
                .buffer(y.data_mut())
                .params(&params)
                .launch(cfg)
        }
    }
}

impl LrnGpu {
    /// The `lrn_backward` kernel's parameters and launch shape for an input of `[n, c, h, w]`
    /// in `layout` (`relu_first`: as for [`LrnGpu::backward`]): what it passes. A window of at most
    /// `ALEXNET_LRN_BACKWARD_RING` channels takes one thread per pixel and run of
    /// `ALEXNET_LRN_BACKWARD_CHUNK` channels, a wider one a thread per element.
    #[doc(hidden)]
    pub fn backward_args(
        &self,
        dims: [usize; 4],
        layout: Layout,
        relu_first: bool,
    ) -> Result<(AlexnetLrnParams, LaunchConfig)> {
        const OP: &str = "LrnGpu::backward";
        let (params, per_element) = self.launch_args(OP, dims, layout, relu_first)?;
        if params.size > ALEXNET_LRN_BACKWARD_RING {
            return Ok((params, per_element));
        }
        let [n, c, h, w] = dims;
        let chunks = c.div_ceil(ALEXNET_LRN_BACKWARD_CHUNK as usize);
        Ok((params, grid_1d(OP, element_count(&[n, chunks, h, w])?)?))
    }

    /// The backward of [`LrnGpu::forward`] for training (f32, or f16 with f32 arithmetic):
    /// `dx` from the LRN's input `x` and the output's gradient `dy`, all three the same shape
    /// and layout, as [`crate::cpu::Lrn::backward`] computes it. With `relu_first`, the
    /// backward of `lrn(max(x, 0))`: also the ReLU's, `dx` 0 where `x` is not positive (as
    /// [`crate::cpu::relu_backward`] on the ReLU's output), so the ReLU before an LRN needs no
    /// backward pass of its own. `x` may be the ReLU's output (what the trainer keeps): the
    /// ReLU of it is itself.
    pub fn backward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        dy: &GpuTensor<T>,
        dx: &mut GpuTensor<T>,
        relu_first: bool,
    ) -> Result<()> {
        const OP: &str = "LrnGpu::backward";
        for tensor in [(dy.shape(), dy.layout()), (dx.shape(), dx.layout())] {
            expect_like(OP, x.shape(), x.layout(), tensor)?;
        }
        let (params, cfg) = self.backward_args(x.dims4(OP)?, x.layout(), relu_first)?;
        // SAFETY: lrn_backward(const T *src, const T *grad_out, T *grad_in, AlexnetLrnParams);
        // all three hold n*c*h*w elements of `params.shape` (checked above), `dx` is borrowed
        // exclusively so it overlaps neither input; the kernel's
        // threads cover every element however many it is given (grid-stride loops).
        unsafe {
            Launch::new(gpu, Kernel::LrnBackward, T::DTYPE)?
                .buffer(x.data())
                .buffer(dy.data())
                .buffer(dx.data_mut())
                .params(&params)
                .launch(cfg)
        }
    }
}
