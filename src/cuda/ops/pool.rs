//! Max-pooling: launcher of `kernels/pool.cu`; CPU twin [`crate::cpu::MaxPool2d`].

use super::{expect_like, layout_err, shape_err};
use crate::config::window_output;
use crate::cuda::abi::{AlexnetPoolBackwardParams, AlexnetPoolParams};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{abi_shape, element_count, grid_1d, to_u32, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};

/// Max-pooling over square windows (no padding, floor mode; NaN propagates) with the `maxpool`
/// kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPoolGpu {
    pub kernel: usize,
    pub stride: usize,
}

impl MaxPoolGpu {
    pub fn new(kernel: usize, stride: usize) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            return Err(Error::invalid(
                "max-pool",
                "kernel and stride must be positive",
            ));
        }
        Ok(MaxPoolGpu { kernel, stride })
    }

    pub fn output_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let out = |len| window_output(len, self.kernel, self.stride, 0);
        match (out(height), out(width)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(shape_err(
                "MaxPoolGpu",
                format!("spatial size >= kernel {}", self.kernel),
                &[height, width],
            )),
        }
    }

    /// The kernel's parameters, launch shape and output dims for a `[n, c, h, w]` input in
    /// `layout`: what [`MaxPoolGpu::forward`] passes.
    #[doc(hidden)]
    pub fn args(
        &self,
        [n, c, h, w]: [usize; 4],
        layout: Layout,
    ) -> Result<(AlexnetPoolParams, LaunchConfig, [usize; 4])> {
        const OP: &str = "MaxPoolGpu::forward";
        let (oh, ow) = self.output_size(h, w)?;
        let out = [n, c, oh, ow];
        let params = AlexnetPoolParams {
            in_: abi_shape(OP, [n, c, h, w], layout == Layout::Nhwc)?,
            out_h: to_u32(OP, "out_h", oh)?,
            out_w: to_u32(OP, "out_w", ow)?,
            kernel: to_u32(OP, "kernel", self.kernel)?,
            stride: to_u32(OP, "stride", self.stride)?,
        };
        Ok((params, grid_1d(OP, element_count(&out)?)?, out))
    }

    /// `x` `[n, c, h, w]` to `y` `[n, c, oh, ow]`, same layout.
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
    ) -> Result<()> {
        const OP: &str = "MaxPoolGpu::forward";
        let (params, cfg, want) = self.args(x.dims4(OP)?, x.layout())?;
        if y.shape() != want.as_slice() {
            return Err(shape_err(OP, format!("output {want:?}"), y.shape()));
        }
        if y.layout() != x.layout() {
            return Err(layout_err(OP, x.layout(), y.layout()));
        }
        // SAFETY: maxpool(const T *src, T *dst, AlexnetPoolParams); `x` holds n*c*h*w and `y`
        // n*c*oh*ow elements with oh, ow the floor-mode sizes for the window (checked above),
        // so every window lies inside `x`; one thread per output element; distinct buffers.
        unsafe {
            Launch::new(gpu, Kernel::MaxPool, T::DTYPE)?
                .buffer(x.data())
                .buffer(y.data_mut())
                .params(&params)
                .launch(cfg)
        }
    }
}

impl MaxPoolGpu {
    /// The `maxpool_backward` kernel's parameters and launch shape (one thread per input
    /// element) for a forward input of `[n, c, h, w]` in `layout` (`relu_first`: as for
    /// [`MaxPoolGpu::backward`]): what [`MaxPoolGpu::backward`] passes.
    #[doc(hidden)]
    pub fn backward_args(
        &self,
        dims: [usize; 4],
        layout: Layout,
        relu_first: bool,
    ) -> Result<(AlexnetPoolBackwardParams, LaunchConfig, [usize; 4])> {
        let (pool, _, out) = self.args(dims, layout)?;
        let params = AlexnetPoolBackwardParams {
            pool,
            relu_first: u32::from(relu_first),
        };
        Ok((
            params,
            grid_1d("MaxPoolGpu::backward", element_count(&dims)?)?,
            out,
        ))
    }

    /// The backward of [`MaxPoolGpu::forward`] for training (f32, or f16 with f32 sums): `dx`,
    /// shaped like the forward's input `x`, gets every output gradient of `dy` at its window's
    /// maximum, as [`crate::cpu::MaxPool2d::backward`] does (the same rule for ties and NaN, the
    /// same sums).
    ///
    /// `y` is the forward's output for this `x`, which the kernel reads as each window's
    /// maximum, so that only an element equal to it looks at the rest of the window; another
    /// tensor of `y`'s shape gives wrong gradients, not an error.
    ///
    /// With `relu_first` it is the backward of a ReLU and this pooling together (`y` the
    /// pooling of `max(x, 0)`; `x` may be the ReLU's input or its output): `dx` is also 0
    /// wherever `x` is not positive (or NaN), as [`crate::cpu::relu_backward`] would make it,
    /// so the ReLU before a pooling needs no backward pass of its own.
    pub fn backward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &GpuTensor<T>,
        dy: &GpuTensor<T>,
        dx: &mut GpuTensor<T>,
        relu_first: bool,
    ) -> Result<()> {
        const OP: &str = "MaxPoolGpu::backward";
        let (params, cfg, out) = self.backward_args(x.dims4(OP)?, x.layout(), relu_first)?;
        expect_like(OP, &out, x.layout(), (y.shape(), y.layout()))?;
        expect_like(OP, &out, x.layout(), (dy.shape(), dy.layout()))?;
        expect_like(OP, x.shape(), x.layout(), (dx.shape(), dx.layout()))?;
        // SAFETY: maxpool_backward(const T *src, const T *out, const T *grad_out, T *grad_in,
        // AlexnetPoolBackwardParams); `x` and `dx` hold n*c*h*w elements, `y` and `dy`
        // n*c*oh*ow (checked above), the windows lie inside `x` (floor-mode sizes); `dx` is
        // borrowed exclusively, so it overlaps none of the inputs; one thread per input element.
        unsafe {
            Launch::new(gpu, Kernel::MaxPoolBackward, T::DTYPE)?
                .buffer(x.data())
                .buffer(y.data())
                .buffer(dy.data())
                .buffer(dx.data_mut())
                .params(&params)
                .launch(cfg)
        }
    }
}
