//! Bias, ReLU, optional LRN and max-pooling after a convolution in one pass: launcher of
//! `kernels/conv_epilogue.cu`; CPU twin: the CPU's same stages combined
//! ([`crate::cpu::bias_act_inplace`], [`crate::cpu::Lrn`], [`crate::cpu::MaxPool2d`]).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{layout_err, shape_err, LrnGpu, MaxPoolGpu};
use crate::cuda::abi::{AlexnetConvEpilogueParams, AlexnetLrnParams};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use crate::cuda::launch::{abi_shape, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::Result;

/// `maxpool(lrn(relu(x + bias)))` (the LRN optional) with the `conv_epilogue` kernel: bit for
/// bit what `bias_act`, `lrn` and `maxpool` give one after another, without the two full-size
/// intermediate tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvEpilogueGpu {
    pub lrn: Option<LrnGpu>,
    pub pool: MaxPoolGpu,
}

impl ConvEpilogueGpu {
    /// The kernel's parameters, launch shape and output dims for a `[n, c, h, w]` convolution
    /// output in `layout`: what [`ConvEpilogueGpu::forward`] passes.
    #[doc(hidden)]
    pub fn args(
        &self,
        dims: [usize; 4],
        layout: Layout,
    ) -> Result<(AlexnetConvEpilogueParams, LaunchConfig, [usize; 4])> {
        const OP: &str = "ConvEpilogueGpu::forward";
        let (pool, cfg, out) = self.pool.args(dims, layout)?;
        let lrn = match &self.lrn {
            Some(lrn) => lrn.args(dims, layout, true)?.0,
            None => AlexnetLrnParams {
                shape: abi_shape(OP, dims, layout == Layout::Nhwc)?,
                size: 0,
                k: 0.0,
                alpha: 0.0,
                beta: 0.0,
                relu_first: 1,
            },
        };
        let params = AlexnetConvEpilogueParams {
            lrn,
            pool,
            has_lrn: u32::from(self.lrn.is_some()),
        };
        Ok((params, cfg, out))
    }

    /// `x` `[n, c, h, w]` (a convolution's output before its bias) to `y` `[n, c, oh, ow]`,
    /// same layout; `bias` has `c` values.
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        bias: &CudaSlice<T>,
        y: &mut GpuTensor<T>,
    ) -> Result<()> {
        const OP: &str = "ConvEpilogueGpu::forward";
        let dims = x.dims4(OP)?;
        let (params, cfg, want) = self.args(dims, x.layout())?;
        if y.shape() != want.as_slice() {
            return Err(shape_err(OP, format!("output {want:?}"), y.shape()));
        }
        if y.layout() != x.layout() {
            return Err(layout_err(OP, x.layout(), y.layout()));
        }
        if bias.len() != dims[1] {
            return Err(shape_err(
                OP,
                format!("a bias of {}", dims[1]),
                &[bias.len()],
            ));
        }
        // SAFETY: conv_epilogue(const T *src, const T *bias, T *dst, AlexnetConvEpilogueParams):
        // `x` holds n*c*h*w elements of `params.pool.in` (== `params.lrn.shape`), `bias` c and
        // `y` n*c*oh*ow with oh, ow the floor-mode pooling sizes (checked above), so every
        // window and every LRN channel window lies inside `x`; one thread per output element;
        // `x` and `y` are distinct buffers (one borrowed shared, the other exclusively).
        unsafe {
            Launch::new(gpu, Kernel::ConvEpilogue, T::DTYPE)?
                .buffer(x.data())
                .buffer(bias)
                .buffer(y.data_mut())
                .params(&params)
                .launch(cfg)
        }
    }
}
