//! Fully connected layers in cuBLAS (then `bias_act`); CPU twin [`crate::cpu::Linear`].

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut};
use ndarray::{ArrayView1, ArrayView2};

use super::calls::{GemmCall, LinearBuffer};
use super::{bias_act, bias_grad, shape_err, upload, upload_into};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::to_i32;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};

/// Fully connected layer `y = x W^T + b` (+ ReLU): one cuBLAS GEMM (`cublasGemmEx`, f32
/// compute) and the `bias_act` kernel. fp32 is true fp32 (`CUBLAS_COMPUTE_32F` with the
/// default math mode) unless `allow_tf32` (`CUBLAS_COMPUTE_32F_FAST_TF32`); fp16 stores f16
/// and accumulates in f32 on the tensor cores.
#[derive(Debug)]
pub struct LinearGpu<T: GpuFloat> {
    weight: CudaSlice<T>,
    bias: CudaSlice<T>,
    in_features: usize,
    out_features: usize,
    allow_tf32: bool,
}

impl<T: GpuFloat> LinearGpu<T> {
    /// `weight` is `[out, in]` (PyTorch's layout), `bias` is `[out]`.
    pub fn new(
        gpu: &Gpu,
        weight: ArrayView2<'_, f32>,
        bias: ArrayView1<'_, f32>,
        allow_tf32: bool,
    ) -> Result<Self> {
        const OP: &str = "LinearGpu::new";
        let (out_features, in_features) = weight.dim();
        if bias.len() != out_features {
            return Err(shape_err(
                OP,
                format!("a bias of {out_features}"),
                bias.shape(),
            ));
        }
        to_i32(OP, "out_features", out_features)?;
        to_i32(OP, "in_features", in_features)?;
        let w: Vec<T> = weight.iter().map(|&v| T::from_f32(v)).collect();
        let b: Vec<T> = bias.iter().map(|&v| T::from_f32(v)).collect();
        Ok(LinearGpu {
            weight: upload(gpu, &w, "linear weights")?,
            bias: upload(gpu, &b, "linear bias")?,
            in_features,
            out_features,
            allow_tf32,
        })
    }

    /// Replaces the weight and the bias (shaped as for [`LinearGpu::new`]) in place: the
    /// buffers keep their addresses.
    pub(crate) fn load(
        &mut self,
        gpu: &Gpu,
        weight: ArrayView2<'_, f32>,
        bias: ArrayView1<'_, f32>,
    ) -> Result<()> {
        if weight.dim() != (self.out_features, self.in_features) {
            return Err(shape_err(
                "LinearGpu::load",
                format!(
                    "[{}, {}] as the layer's",
                    self.out_features, self.in_features
                ),
                weight.shape(),
            ));
        }
        let w: Vec<T> = weight.iter().map(|&v| T::from_f32(v)).collect();
        let b: Vec<T> = bias.iter().map(|&v| T::from_f32(v)).collect();
        upload_into(gpu, &w, &mut self.weight, "linear weights")?;
        upload_into(gpu, &b, &mut self.bias, "linear bias")
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight (row-major `[out, in]`) and the bias on the device, for reading them back.
    pub(crate) fn parameters(&self) -> [&CudaSlice<T>; 2] {
        [&self.weight, &self.bias]
    }

    /// The weight and the bias for an optimiser to update in place.
    pub(crate) fn parameters_mut(&mut self) -> [&mut CudaSlice<T>; 2] {
        [&mut self.weight, &mut self.bias]
    }

    /// The cuBLAS call for `rows` inputs, as data (replayed on the CPU by
    /// `tests/library_calls.rs`).
    #[doc(hidden)]
    pub fn call(&self, rows: usize) -> Result<GemmCall> {
        GemmCall::linear(self.out_features, self.in_features, rows)
    }

    /// `x` is any tensor of `rows = shape[0]` rows holding `rows * in_features` elements, read
    /// as `[rows, in_features]` in memory order (an NCHW activation flattens in (C, H, W) order,
    /// an NHWC one in (H, W, C) order); `y` is `[rows, out_features]`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
        relu: bool,
    ) -> Result<()> {
        const OP: &str = "LinearGpu::forward";
        let rows = x.shape()[0];
        if rows.checked_mul(self.in_features) != Some(x.len()) {
            return Err(shape_err(
                OP,
                format!(
                    "[N, {}] (any shape with N * {} elements)",
                    self.in_features, self.in_features
                ),
                x.shape(),
            ));
        }
        let want = [rows, self.out_features];
        if y.shape() != want.as_slice() || y.layout() != Layout::Nchw {
            return Err(shape_err(
                OP,
                format!("output {want:?} (row-major)"),
                y.shape(),
            ));
        }
        let call = self.call(rows)?;
        {
            let stream = gpu.stream();
            let (w_ptr, _w_done) = self.weight.device_ptr(stream);
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (y_ptr, _y_done) = y.data_mut().device_ptr_mut(stream);
            // Column-major view: y^T [out, rows] = W [out, in] * x^T [in, rows] (see
            // GemmCall::linear, whose arguments and operand roles tests/library_calls.rs
            // replays on the CPU).
            let buffers = [
                (LinearBuffer::Weight, w_ptr),
                (LinearBuffer::Input, x_ptr),
                (LinearBuffer::Output, y_ptr),
            ];
            // SAFETY: the weight holds out*in, `x` rows*in and `y` rows*out elements of T
            // (checked above and at construction), what the call reads and writes; all on the
            // compute stream, where the call runs.
            unsafe { self.gemm(gpu, &call, &buffers) }?;
        }
        bias_act(gpu, y, &self.bias, relu)
    }

    /// The gradients of the linear map of [`LinearGpu::forward`] (before any ReLU: `dy` is the
    /// gradient after the ReLU's backward) at the input `x` (read as `[rows, in]` in memory
    /// order, as the forward reads it), every output overwritten: the weight's into `dw`
    /// (row-major `[out, in]`, the weight's own layout, summed over the rows), the bias's into
    /// `db` (f32, the `bias_grad` kernel), the input's into `dx` (shaped like `x`) unless
    /// `None`. Two cuBLAS GEMMs ([`GemmCall::linear_backward_weight`] and
    /// [`GemmCall::linear_backward_input`], replayed on the CPU by `tests/library_calls.rs`).
    pub fn backward(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        dy: &GpuTensor<T>,
        dx: Option<&mut GpuTensor<T>>,
        dw: &mut CudaViewMut<'_, T>,
        db: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "LinearGpu::backward";
        let rows = x.shape()[0];
        let (inputs, outputs) = (self.in_features, self.out_features);
        let dx_ok = dx
            .as_deref()
            .is_none_or(|dx| dx.shape() == x.shape() && dx.layout() == x.layout());
        if rows.checked_mul(inputs) != Some(x.len())
            || dy.shape() != [rows, outputs].as_slice()
            || dy.layout() != Layout::Nchw
            || !dx_ok
            || dw.len() != outputs * inputs
            || db.len() != outputs
        {
            return Err(shape_err(
                OP,
                format!(
                    "x [N, {inputs}] (any shape with N * {inputs} elements), dy [N, {outputs}] \
                     (row-major), dx shaped like x, {} weight and {outputs} bias gradients",
                    outputs * inputs
                ),
                &[x.shape(), dy.shape(), &[dw.len(), db.len()]].concat(),
            ));
        }
        {
            let stream = gpu.stream();
            let call = GemmCall::linear_backward_weight(outputs, inputs, rows)?;
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (dy_ptr, _dy_done) = dy.data().device_ptr(stream);
            let (dw_ptr, _dw_done) = dw.device_ptr_mut(stream);
            // dW^T [in, out] = x^T [in, rows] * dy [rows, out] in column-major terms.
            let buffers = [
                (LinearBuffer::Input, x_ptr),
                (LinearBuffer::OutputGrad, dy_ptr),
                (LinearBuffer::WeightGrad, dw_ptr),
            ];
            // SAFETY: `x` holds rows*in, `dy` rows*out and `dw` out*in elements of T (checked
            // above), what the call reads and writes.
            unsafe { self.gemm(gpu, &call, &buffers) }?;
            if let Some(dx) = dx {
                let call = GemmCall::linear_backward_input(outputs, inputs, rows)?;
                let (w_ptr, _w_done) = self.weight.device_ptr(stream);
                let (dx_ptr, _dx_done) = dx.data_mut().device_ptr_mut(stream);
                // dx^T [in, rows] = W^T [in, out] * dy^T [out, rows] in column-major terms.
                let buffers = [
                    (LinearBuffer::Weight, w_ptr),
                    (LinearBuffer::OutputGrad, dy_ptr),
                    (LinearBuffer::InputGrad, dx_ptr),
                ];
                // SAFETY: the weight holds out*in, `dy` rows*out and `dx` rows*in elements of
                // T (checked above).
                unsafe { self.gemm(gpu, &call, &buffers) }?;
            }
        }
        bias_grad(gpu, dy, db)
    }

    /// `C = op(A) op(B)` as `call` says (alpha 1, beta 0) in the layer's storage type with f32
    /// compute (TF32 where allowed), on the compute stream, with `A`, `B` and `C` taken from
    /// `buffers` by the roles `call` gives them.
    ///
    /// # Safety
    /// Each pointer of `buffers` is a device pointer on this GPU, ready on the compute stream,
    /// to the buffer its role names, holding at least what `call`'s dimensions and leading
    /// dimensions make cuBLAS read (`A`, `B`) and write (`C`) in `T`; `C` overlaps neither
    /// input.
    unsafe fn gemm(
        &self,
        gpu: &Gpu,
        call: &GemmCall,
        buffers: &[(LinearBuffer, CUdeviceptr)],
    ) -> Result<()> {
        let (a, b, c) = call.operands(buffers)?;
        let op = |transpose| match transpose {
            true => cublasOperation_t::CUBLAS_OP_T,
            false => cublasOperation_t::CUBLAS_OP_N,
        };
        let compute = match (T::DTYPE, self.allow_tf32) {
            (GpuDtype::F32, true) => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let dtype = T::DTYPE.cublas();
        gpu.bind()?;
        let blas = gpu.blas()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the cuBLAS handle runs on the compute stream; the buffers are as the caller
        // guarantees; alpha/beta are host f32 values matching the f32 compute type.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                blas.0,
                op(call.transa),
                op(call.transb),
                call.m,
                call.n,
                call.k,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                dtype,
                call.lda,
                b as *const c_void,
                dtype,
                call.ldb,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                dtype,
                call.ldc,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::cuda("cublasGemmEx", e))
    }
}
