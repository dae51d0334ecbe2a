//! Fully connected layers in cuBLAS (then `bias_act`); CPU twin [`crate::cpu::Linear`].

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use ndarray::{ArrayView1, ArrayView2};

use super::calls::GemmCall;
use super::{bias_act, shape_err, upload};
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

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
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
        {
            let blas = gpu.blas()?;
            let stream = gpu.stream();
            let (w_ptr, _w_done) = self.weight.device_ptr(stream);
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (y_ptr, _y_done) = y.data_mut().device_ptr_mut(stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Column-major view: y^T [out, rows] = W [out, in] * x^T [in, rows] (see
            // GemmCall::linear, whose arguments tests/library_calls.rs replays on the CPU).
            // SAFETY: the cuBLAS handle runs on `stream`, where the pointers were made ready;
            // the weight holds out*in, `x` rows*in and `y` rows*out elements of `dtype`
            // (checked above and at construction); alpha/beta are host f32 values matching the
            // f32 compute type; the guards record the uses after the call.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    blas.0,
                    op(call.transa),
                    op(call.transb),
                    call.m,
                    call.n,
                    call.k,
                    (&alpha as *const f32).cast(),
                    w_ptr as *const c_void,
                    dtype,
                    call.lda,
                    x_ptr as *const c_void,
                    dtype,
                    call.ldb,
                    (&beta as *const f32).cast(),
                    y_ptr as *mut c_void,
                    dtype,
                    call.ldc,
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| Error::cuda("cublasGemmEx", e))?;
        }
        bias_act(gpu, y, &self.bias, relu)
    }
}
