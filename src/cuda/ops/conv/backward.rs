//! The convolution's backward in cuDNN: `cudnnConvolutionBackwardFilter` for the filter's
//! gradient, `cudnnConvolutionBackwardData` for the input's (skipped for the first layer), the
//! `bias_grad` kernel for the bias's; CPU twin [`crate::cpu::Conv2d::backward`]. Both calls use
//! the forward plan's tensor and filter descriptors (one [`ConvCall`] describes all three calls;
//! `tests/library_calls.rs` replays them on the CPU), each with its own convolution descriptor
//! carrying the math type its algorithm was measured with.

use std::ffi::c_void;

use cudarc::cudnn::sys::{cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdFilterAlgo_t};
use cudarc::driver::{CudaViewMut, DevicePtr, DevicePtrMut};

use super::{Chosen, Conv2dGpu, ConvPlan};
use crate::cuda::cudnn::{
    find_backward_data_algorithms, find_backward_filter_algorithms, FindBuffers,
};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use crate::cuda::ops::{bias_grad, shape_err};
use crate::cuda::tensor::GpuTensor;
use crate::error::{Error, Result};

/// The backward algorithms chosen for one input shape, each chosen on first use.
#[derive(Debug, Default)]
pub(super) struct BackwardPlan {
    filter: Option<Chosen<cudnnConvolutionBwdFilterAlgo_t>>,
    data: Option<Chosen<cudnnConvolutionBwdDataAlgo_t>>,
}

impl BackwardPlan {
    /// The measurements behind the filter gradient's algorithm, once chosen.
    pub(super) fn filter_measured(&self) -> Option<&str> {
        self.filter.as_ref().map(|c| c.measured.as_str())
    }

    /// The measurements behind the input gradient's algorithm, once chosen.
    pub(super) fn data_measured(&self) -> Option<&str> {
        self.data.as_ref().map(|c| c.measured.as_str())
    }
}

impl<T: GpuFloat> Conv2dGpu<T> {
    /// The gradients of the convolution plus bias of [`Conv2dGpu::forward`] (before any ReLU:
    /// `dy` is the gradient after the ReLU's backward) at the input `x`, every output
    /// overwritten:
    /// - `dw`: the filter's, in the layer's own filter layout (KCRS for NCHW, KRSC for NHWC,
    ///   with any padded input channels; `cuda::library_calls::unpack_conv_weights` gives OIHW),
    ///   summed over the batch;
    /// - `db`: the bias's, in f32 (the `bias_grad` kernel);
    /// - `dx`: the input's, unless `None` (the first layer, whose input is the data).
    ///
    /// The algorithms are chosen per input shape on first use by measuring on these buffers,
    /// as for the forward, under the same rules (with `fp32_gemm_only`, no FFT or Winograd).
    pub fn backward(
        &mut self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        dy: &GpuTensor<T>,
        dx: Option<&mut GpuTensor<T>>,
        dw: &mut CudaViewMut<'_, T>,
        db: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "Conv2dGpu::backward";
        let key = self.check_shapes(OP, x, dy)?;
        if let Some(dx) = dx.as_deref() {
            if dx.shape() != x.shape() || dx.layout() != x.layout() {
                return Err(shape_err(
                    OP,
                    format!("an input gradient shaped like the input {:?}", x.shape()),
                    dx.shape(),
                ));
            }
        }
        if dw.len() != self.weight.len() || db.len() != self.out_channels {
            return Err(shape_err(
                OP,
                format!(
                    "{} filter and {} bias gradients",
                    self.weight.len(),
                    self.out_channels
                ),
                &[dw.len(), db.len()],
            ));
        }
        let [n, h, w] = key;
        self.prepare(gpu, n, h, w)?; // the descriptors, if no forward ran on this shape yet
        let mut plan = self
            .plans
            .remove(&key)
            .ok_or_else(|| Error::invalid(OP, "no plan after prepare"))?;
        let result = self.run_backward(gpu, &mut plan, x, dy, dx, dw);
        self.plans.insert(key, plan);
        result?;
        bias_grad(gpu, dy, db)
    }

    /// The filter's and (if asked) the input's gradient with `plan`'s descriptors, choosing the
    /// algorithms first where this shape has none yet.
    fn run_backward(
        &self,
        gpu: &Gpu,
        plan: &mut ConvPlan,
        x: &GpuTensor<T>,
        dy: &GpuTensor<T>,
        dx: Option<&mut GpuTensor<T>>,
        dw: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let [n, h, w] = self.check_shapes("Conv2dGpu::backward", x, dy)?;
        let call = self.call(n, h, w)?;
        gpu.bind()?; // this thread may not have made the context current yet
        let stream = gpu.stream();
        let ConvPlan {
            x: x_desc,
            y: dy_desc,
            backward,
            ..
        } = plan;
        if backward.filter.is_none() {
            let chosen = self.measure(
                gpu,
                "backward filter",
                &call,
                |handle, conv, workspace, workspace_bytes| {
                    let (x_ptr, _x_done) = x.data().device_ptr(stream);
                    let (dy_ptr, _dy_done) = dy.data().device_ptr(stream);
                    let (dw_ptr, _dw_done) = dw.device_ptr_mut(stream);
                    let buffers = FindBuffers {
                        read: [x_ptr as *const c_void, dy_ptr as *const c_void],
                        written: dw_ptr as *mut c_void,
                        workspace,
                        workspace_bytes,
                    };
                    // SAFETY: `x` and `dy` match the plan's descriptors (shapes checked above)
                    // and `dw` the filter's (length checked by the caller); the workspace is
                    // `workspace_bytes` long; the stream is idle and cuDNN is done with them
                    // when the call returns.
                    unsafe {
                        find_backward_filter_algorithms(
                            handle,
                            x_desc,
                            dy_desc,
                            conv,
                            &self.filter,
                            &buffers,
                        )
                    }
                },
                |handle, conv, algo| {
                    // SAFETY: handle and descriptors are alive; the call only computes a size.
                    unsafe {
                        cudarc::cudnn::result::get_convolution_backward_filter_workspace_size(
                            handle.0,
                            x_desc.0,
                            dy_desc.0,
                            conv.0,
                            self.filter.0,
                            algo,
                        )
                    }
                    .map_err(|e| Error::cuda("cudnnGetConvolutionBackwardFilterWorkspaceSize", e))
                },
            )?;
            backward.filter = Some(chosen);
        }
        let Some(filter) = &backward.filter else {
            return Err(Error::invalid("Conv2dGpu::backward", "no filter algorithm"));
        };
        {
            let handle = gpu.cudnn()?;
            let mut workspace = gpu.conv_workspace()?;
            workspace.ensure(stream, filter.workspace_bytes)?;
            let (ws_ptr, ws_bytes, _ws_done) = workspace.device_ptr(stream);
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (dy_ptr, _dy_done) = dy.data().device_ptr(stream);
            let (dw_ptr, _dw_done) = dw.device_ptr_mut(stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: the handle runs on `stream`, where the pointers were made ready; `x`,
            // `dy` and `dw` match the plan's and the filter's descriptors (shapes and lengths
            // checked), the workspace is at least what cuDNN asked for this algorithm; alpha
            // and beta are host f32 values (f32 compute) alive for the call.
            unsafe {
                cudarc::cudnn::result::convolution_backward_filter(
                    handle.0,
                    (&alpha as *const f32).cast(),
                    x_desc.0,
                    x_ptr as *const c_void,
                    dy_desc.0,
                    dy_ptr as *const c_void,
                    filter.conv.0,
                    filter.algo,
                    ws_ptr,
                    ws_bytes,
                    (&beta as *const f32).cast(),
                    self.filter.0,
                    dw_ptr as *mut c_void,
                )
            }
            .map_err(|e| Error::cuda("cudnnConvolutionBackwardFilter", e))?;
        }
        let Some(dx) = dx else {
            return Ok(());
        };
        if backward.data.is_none() {
            let chosen = self.measure(
                gpu,
                "backward data",
                &call,
                |handle, conv, workspace, workspace_bytes| {
                    let (w_ptr, _w_done) = self.weight.device_ptr(stream);
                    let (dy_ptr, _dy_done) = dy.data().device_ptr(stream);
                    let (dx_ptr, _dx_done) = dx.data_mut().device_ptr_mut(stream);
                    let buffers = FindBuffers {
                        read: [w_ptr as *const c_void, dy_ptr as *const c_void],
                        written: dx_ptr as *mut c_void,
                        workspace,
                        workspace_bytes,
                    };
                    // SAFETY: the weights match the filter descriptor, `dy` and `dx` the
                    // plan's (shapes checked above); otherwise as for the filter's search.
                    unsafe {
                        find_backward_data_algorithms(
                            handle,
                            &self.filter,
                            dy_desc,
                            conv,
                            x_desc,
                            &buffers,
                        )
                    }
                },
                |handle, conv, algo| {
                    // SAFETY: handle and descriptors are alive; the call only computes a size.
                    unsafe {
                        cudarc::cudnn::result::get_convolution_backward_data_workspace_size(
                            handle.0,
                            self.filter.0,
                            dy_desc.0,
                            conv.0,
                            x_desc.0,
                            algo,
                        )
                    }
                    .map_err(|e| Error::cuda("cudnnGetConvolutionBackwardDataWorkspaceSize", e))
                },
            )?;
            backward.data = Some(chosen);
        }
        let Some(data) = &backward.data else {
            return Err(Error::invalid("Conv2dGpu::backward", "no data algorithm"));
        };
        let handle = gpu.cudnn()?;
        let mut workspace = gpu.conv_workspace()?;
        workspace.ensure(stream, data.workspace_bytes)?;
        let (ws_ptr, ws_bytes, _ws_done) = workspace.device_ptr(stream);
        let (w_ptr, _w_done) = self.weight.device_ptr(stream);
        let (dy_ptr, _dy_done) = dy.data().device_ptr(stream);
        let (dx_ptr, _dx_done) = dx.data_mut().device_ptr_mut(stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: as for the filter's gradient: the weights, `dy` and `dx` match the filter and
        // plan descriptors, the workspace is large enough, alpha and beta are host f32 values.
        unsafe {
            cudarc::cudnn::result::convolution_backward_data(
                handle.0,
                (&alpha as *const f32).cast(),
                self.filter.0,
                w_ptr as *const c_void,
                dy_desc.0,
                dy_ptr as *const c_void,
                data.conv.0,
                data.algo,
                ws_ptr,
                ws_bytes,
                (&beta as *const f32).cast(),
                x_desc.0,
                dx_ptr as *mut c_void,
            )
        }
        .map_err(|e| Error::cuda("cudnnConvolutionBackwardData", e))?;
        Ok(())
    }
}
