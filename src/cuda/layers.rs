//! The layers on the GPU, each usable on its own, generic over `f32` and `f16` storage.
//!
//! Every launcher checks shapes, layouts and buffer lengths before it launches; a mismatch is
//! an [`Error::Shape`], never an out-of-bounds access. Convolutions run in cuDNN, linear layers
//! in cuBLAS, everything else in the crate's kernels (`kernels/*.cu`).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::cudnn::sys::{
    cudnnConvolutionFwdAlgo_t, cudnnDataType_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, PinnedHostSlice, PushKernelArg,
};
use ndarray::{ArrayView1, ArrayView2, ArrayView4};

use super::abi::*;
use super::cudnn::{find_forward_algorithms, ConvDesc, FilterDesc, FwdAlgoPerf, TensorDesc};
use super::device::{driver_err, Gpu};
use super::dtype::{GpuDtype, GpuFloat};
use super::launch::{abi_shape, grid_1d, grid_rows, to_i32, to_u32};
use super::pinned::alloc_readback;
use super::tensor::{GpuTensor, Layout};
use crate::config::{window_output, DropoutMode, LrnParams};
use crate::error::{Error, Result};

fn shape_err(op: &'static str, expected: impl Into<String>, found: &[usize]) -> Error {
    Error::Shape {
        op,
        expected: expected.into(),
        found: found.to_vec(),
    }
}

fn layout_err(op: &'static str, expected: Layout, found: Layout) -> Error {
    Error::invalid(
        "tensor layout",
        format!("{op}: expected {expected:?}, found {found:?}"),
    )
}

fn upload<T: GpuFloat>(gpu: &Gpu, values: &[T], what: &str) -> Result<CudaSlice<T>> {
    if values.is_empty() {
        return Err(Error::invalid("upload", format!("{what} is empty")));
    }
    gpu.stream()
        .clone_htod(values)
        .map_err(|e| Error::cuda(format!("uploading {what}"), e))
}

/// `x += bias[channel]`, then ReLU if `relu`, in place, with the `bias_act` kernel. The channel
/// axis is C of a 4-D tensor (either layout) or the columns of a 2-D `[rows, cols]` tensor.
pub fn bias_act<T: GpuFloat>(
    gpu: &Gpu,
    x: &mut GpuTensor<T>,
    bias: &CudaSlice<T>,
    relu: bool,
) -> Result<()> {
    const OP: &str = "bias_act";
    let (channels, inner) = match (x.shape(), x.layout()) {
        (&[_, c, h, w], Layout::Nchw) => (c, h * w),
        (&[_, c, _, _], Layout::Nhwc) => (c, 1),
        (&[_, cols], Layout::Nchw) => (cols, 1),
        (other, _) => return Err(shape_err(OP, "[N, C, H, W] or [rows, cols]", other)),
    };
    if bias.len() != channels {
        return Err(shape_err(
            OP,
            format!("a bias of {channels}"),
            &[bias.len()],
        ));
    }
    let params = AlexnetBiasActParams {
        len: x.len() as u64,
        channels: to_u32(OP, "channels", channels)?,
        inner: to_u32(OP, "inner", inner)?,
        relu: u32::from(relu),
    };
    let cfg = grid_1d(OP, params.len)?;
    let f = &gpu.kernels(T::DTYPE).bias_act;
    // SAFETY: bias_act(T *x, const T *bias, AlexnetBiasActParams) — argument order and types as
    // in alexnet_abi.h (checked against the kernel table at load); `x` holds `len` elements and
    // `bias` holds `channels` (checked above), and the grid has one thread per element.
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x.data_mut())
            .arg(bias)
            .arg(&params)
            .launch(cfg)
    }
    .map_err(driver_err("launching bias_act"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Convolution (cuDNN)
// ---------------------------------------------------------------------------------------------

/// Settings of a [`Conv2dGpu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvOptions {
    pub stride: usize,
    pub padding: usize,
    /// Layout of the input and output (the weights are stored to match: OIHW for NCHW, OHWI
    /// for NHWC).
    pub layout: Layout,
    /// Input channels the layer accepts, at least the weights' own: the extra ones get zero
    /// filters (e.g. 8 for conv1 in fp16 NHWC, whose RGB input is padded to 8 channels for the
    /// tensor cores). `None`: the weights' own.
    pub in_channels: Option<usize>,
    /// fp32 only: let cuDNN use TF32 tensor cores (about 1e-3 relative error). Off by default:
    /// fp32 convolutions run with `CUDNN_FMA_MATH`, true fp32. fp16 always uses tensor cores
    /// with f32 accumulation.
    pub allow_tf32: bool,
}

impl ConvOptions {
    /// `stride`, `padding` and `layout`; no channel padding, no TF32.
    pub fn new(stride: usize, padding: usize, layout: Layout) -> Self {
        ConvOptions {
            stride,
            padding,
            layout,
            in_channels: None,
            allow_tf32: false,
        }
    }
}

/// A chosen algorithm for one input shape, with its descriptors and workspace.
#[derive(Debug)]
struct ConvPlan {
    conv: ConvDesc,
    x: TensorDesc,
    y: TensorDesc,
    algo: cudnnConvolutionFwdAlgo_t,
    workspace: Option<CudaSlice<u8>>,
}

/// 2-D convolution + bias (+ ReLU) in cuDNN: cross-correlation with square kernels, zero
/// padding, PyTorch's output size. The algorithm is chosen once per input shape by measuring
/// them all (`cudnnFindConvolutionForwardAlgorithm`, deterministic ones preferred) and cached
/// with its workspace; [`Conv2dGpu::prepare`] does that ahead of time.
///
/// Math: fp16 uses tensor cores (`CUDNN_TENSOR_OP_MATH`) with f32 accumulation; fp32 is true
/// fp32 (`CUDNN_FMA_MATH`, GEMM-family algorithms only: no FFT or Winograd) unless
/// [`ConvOptions::allow_tf32`].
#[derive(Debug)]
pub struct Conv2dGpu<T: GpuFloat> {
    weight: CudaSlice<T>,
    bias: CudaSlice<T>,
    filter: FilterDesc,
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    options: ConvOptions,
    math: cudnnMathType_t,
    plans: HashMap<[usize; 3], ConvPlan>,
}

impl<T: GpuFloat> Conv2dGpu<T> {
    /// `weight` is OIHW `[out, in, k, k]`, `bias` is `[out]` (PyTorch's layout, as in
    /// [`crate::weights::ConvParams`]); both are rounded to `T`.
    pub fn new(
        gpu: &Gpu,
        weight: ArrayView4<'_, f32>,
        bias: ArrayView1<'_, f32>,
        options: ConvOptions,
    ) -> Result<Self> {
        const OP: &str = "Conv2dGpu::new";
        let (out_channels, weight_in, kh, kw) = weight.dim();
        if kh != kw || kh == 0 || out_channels == 0 || weight_in == 0 {
            return Err(shape_err(
                OP,
                "a square, non-empty kernel [out, in, k, k]",
                weight.shape(),
            ));
        }
        if bias.len() != out_channels {
            return Err(shape_err(
                OP,
                format!("a bias of {out_channels}"),
                bias.shape(),
            ));
        }
        if options.stride == 0 {
            return Err(Error::invalid("Conv2d stride", "must be positive"));
        }
        let in_channels = options.in_channels.unwrap_or(weight_in);
        if in_channels < weight_in {
            return Err(Error::invalid(
                "Conv2d in_channels",
                format!("{in_channels} is fewer than the weights' {weight_in}"),
            ));
        }
        let k = kh;
        // Every size handed to cuDNN must fit an i32.
        for (what, v) in [
            ("out channels", out_channels),
            ("in channels", in_channels),
            ("kernel", k),
            ("stride", options.stride),
            ("padding", options.padding),
        ] {
            to_i32(OP, what, v)?;
        }
        let mut host = vec![T::from_f32(0.0); out_channels * in_channels * k * k];
        for ((o, c, i, j), &v) in weight.indexed_iter() {
            let index = match options.layout {
                Layout::Nchw => ((o * in_channels + c) * k + i) * k + j,
                Layout::Nhwc => ((o * k + i) * k + j) * in_channels + c,
            };
            host[index] = T::from_f32(v);
        }
        let bias_host: Vec<T> = bias.iter().map(|&v| T::from_f32(v)).collect();
        let math = match (T::DTYPE, options.allow_tf32) {
            (GpuDtype::F16, _) => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            (GpuDtype::F32, false) => cudnnMathType_t::CUDNN_FMA_MATH,
            (GpuDtype::F32, true) => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        };
        gpu.bind()?;
        let filter = FilterDesc::new(
            T::DTYPE.cudnn(),
            cudnn_format(options.layout),
            [out_channels, in_channels, k, k].map(|v| v as i32),
        )?;
        Ok(Conv2dGpu {
            weight: upload(gpu, &host, "convolution weights")?,
            bias: upload(gpu, &bias_host, "convolution bias")?,
            filter,
            out_channels,
            in_channels,
            kernel: k,
            options,
            math,
            plans: HashMap::new(),
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Input channels accepted (the weights' own, or the padded count).
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    pub fn options(&self) -> ConvOptions {
        self.options
    }

    /// Output `(height, width)` for an input of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.options.stride, self.options.padding);
        let out = |len| window_output(len, k, s, p);
        match (out(height), out(width)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(shape_err(
                "Conv2dGpu",
                format!("spatial size >= {k} after padding {p}"),
                &[height, width],
            )),
        }
    }

    /// Chooses and caches the algorithm (and allocates its workspace) for inputs
    /// `[n, in_channels, height, width]`. Runs every candidate once on the GPU; called by
    /// [`Conv2dGpu::forward`] on a new shape, or ahead of time to keep that out of the timed
    /// loop.
    pub fn prepare(&mut self, gpu: &Gpu, n: usize, height: usize, width: usize) -> Result<()> {
        const OP: &str = "Conv2dGpu::prepare";
        if self.plans.contains_key(&[n, height, width]) {
            return Ok(());
        }
        let (oh, ow) = self.output_size(height, width)?;
        let dims = |v: [usize; 4]| -> Result<[i32; 4]> {
            Ok([
                to_i32(OP, "n", v[0])?,
                to_i32(OP, "c", v[1])?,
                to_i32(OP, "h", v[2])?,
                to_i32(OP, "w", v[3])?,
            ])
        };
        let x_dims = dims([n, self.in_channels, height, width])?;
        let y_dims = dims([n, self.out_channels, oh, ow])?;
        gpu.bind()?;
        let format = cudnn_format(self.options.layout);
        let x = TensorDesc::new(T::DTYPE.cudnn(), format, x_dims)?;
        let y = TensorDesc::new(T::DTYPE.cudnn(), format, y_dims)?;
        // Accumulation is f32 for both storage types (fp16: cuDNN's "pseudo-half" config).
        let conv = ConvDesc::new(
            self.options.padding as i32,
            self.options.stride as i32,
            cudnnDataType_t::CUDNN_DATA_FLOAT,
            self.math,
        )?;
        let cudnn_dims = conv.output_dims(&x, &self.filter)?;
        if cudnn_dims != y_dims {
            return Err(Error::cuda(
                OP,
                format!("cuDNN computes an output of {cudnn_dims:?}, the layer expects {y_dims:?}"),
            ));
        }
        let handle = gpu.cudnn()?;
        let candidates = find_forward_algorithms(&handle, &x, &self.filter, &conv, &y)?;
        // True fp32 also rules out the transform-domain algorithms (FFT, Winograd), whose
        // extra roundings cost about an order of magnitude of accuracy.
        let true_fp32 = self.math == cudnnMathType_t::CUDNN_FMA_MATH;
        let allowed = |p: &&FwdAlgoPerf| {
            use cudnnConvolutionFwdAlgo_t::*;
            !true_fp32
                || (matches!(
                    p.math,
                    cudnnMathType_t::CUDNN_FMA_MATH | cudnnMathType_t::CUDNN_DEFAULT_MATH
                ) && matches!(
                    p.algo,
                    CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM
                        | CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
                        | CUDNN_CONVOLUTION_FWD_ALGO_GEMM
                        | CUDNN_CONVOLUTION_FWD_ALGO_DIRECT
                ))
        };
        let best = candidates
            .iter()
            .filter(allowed)
            .find(|p| p.deterministic)
            .or_else(|| candidates.iter().find(allowed))
            .copied()
            .ok_or_else(|| {
                Error::cuda(
                    OP,
                    format!(
                        "cuDNN has no usable forward algorithm for input {x_dims:?} \
                         ({:?}, {:?}); candidates: {candidates:?}",
                        T::DTYPE,
                        self.options.layout
                    ),
                )
            })?;
        if !true_fp32 {
            // The math type Find measured the winner with (tensor ops or not) is the one to run.
            conv.set_math(best.math)?;
        }
        // SAFETY: handle and descriptors are alive; the call only computes a size.
        let needed = unsafe {
            cudarc::cudnn::result::get_convolution_forward_workspace_size(
                handle.0,
                x.0,
                self.filter.0,
                conv.0,
                y.0,
                best.algo,
            )
        }
        .map_err(|e| Error::cuda("cudnnGetConvolutionForwardWorkspaceSize", e))?;
        drop(handle);
        let bytes = needed.max(best.workspace);
        let workspace = if bytes > 0 {
            Some(gpu.stream().alloc_zeros::<u8>(bytes).map_err(|e| {
                Error::cuda(format!("allocating a {bytes}-byte cuDNN workspace"), e)
            })?)
        } else {
            None
        };
        self.plans.insert(
            [n, height, width],
            ConvPlan {
                conv,
                x,
                y,
                algo: best.algo,
                workspace,
            },
        );
        Ok(())
    }

    /// The cuDNN algorithm chosen for inputs `[n, in_channels, height, width]`, if prepared.
    pub fn algorithm(&self, n: usize, height: usize, width: usize) -> Option<String> {
        self.plans
            .get(&[n, height, width])
            .map(|p| format!("{:?}", p.algo))
    }

    /// `y = conv(x) + bias`, then ReLU if `relu`. `x` is `[n, in_channels, h, w]`, `y` is
    /// `[n, out_channels, oh, ow]`, both in the layer's layout.
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
        relu: bool,
    ) -> Result<()> {
        const OP: &str = "Conv2dGpu::forward";
        let layout = self.options.layout;
        if x.layout() != layout {
            return Err(layout_err(OP, layout, x.layout()));
        }
        if y.layout() != layout {
            return Err(layout_err(OP, layout, y.layout()));
        }
        let [n, c, h, w] = x.dims4(OP)?;
        if c != self.in_channels {
            return Err(shape_err(
                OP,
                format!("input [N, {}, H, W]", self.in_channels),
                x.shape(),
            ));
        }
        let (oh, ow) = self.output_size(h, w)?;
        let want = [n, self.out_channels, oh, ow];
        if y.shape() != want.as_slice() {
            return Err(shape_err(OP, format!("output {want:?}"), y.shape()));
        }
        self.prepare(gpu, n, h, w)?;
        let plan = self
            .plans
            .get_mut(&[n, h, w])
            .ok_or_else(|| Error::cuda(OP, "no plan after prepare"))?;
        gpu.bind()?;
        {
            let handle = gpu.cudnn()?;
            let stream = gpu.stream();
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (w_ptr, _w_done) = self.weight.device_ptr(stream);
            let (y_ptr, _y_done) = y.data_mut().device_ptr_mut(stream);
            let (ws_ptr, ws_bytes, _ws_done) = match plan.workspace.as_mut() {
                Some(ws) => {
                    let bytes = ws.len();
                    let (ptr, done) = ws.device_ptr_mut(stream);
                    (ptr as *mut c_void, bytes, Some(done))
                }
                None => (std::ptr::null_mut(), 0, None),
            };
            // Scaling factors are f32 for both storage types (f32 compute).
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: the handle runs on `stream`, where the pointers were made ready
            // (device_ptr waits for earlier writers); `x`, `y`, the weights and the workspace
            // match the plan's descriptors (shapes, dtype and layout checked above, the
            // workspace sized by cuDNN for this algorithm); alpha and beta are host f32 values
            // alive for the call; the guards record the uses when they drop after it.
            unsafe {
                cudarc::cudnn::result::convolution_forward(
                    handle.0,
                    (&alpha as *const f32).cast(),
                    plan.x.0,
                    x_ptr as *const c_void,
                    self.filter.0,
                    w_ptr as *const c_void,
                    plan.conv.0,
                    plan.algo,
                    ws_ptr,
                    ws_bytes,
                    (&beta as *const f32).cast(),
                    plan.y.0,
                    y_ptr as *mut c_void,
                )
            }
            .map_err(|e| Error::cuda("cudnnConvolutionForward", e))?;
        }
        bias_act(gpu, y, &self.bias, relu)
    }
}

fn cudnn_format(layout: Layout) -> cudnnTensorFormat_t {
    match layout {
        Layout::Nchw => cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout::Nhwc => cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

// ---------------------------------------------------------------------------------------------
// LRN, max-pooling
// ---------------------------------------------------------------------------------------------

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

    /// `y = lrn(relu_first ? max(x, 0) : x)`; `x` and `y` have the same 4-D shape and layout.
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
        relu_first: bool,
    ) -> Result<()> {
        const OP: &str = "LrnGpu::forward";
        let dims = x.dims4(OP)?;
        if y.shape() != x.shape() {
            return Err(shape_err(OP, format!("output {:?}", x.shape()), y.shape()));
        }
        if y.layout() != x.layout() {
            return Err(layout_err(OP, x.layout(), y.layout()));
        }
        let params = AlexnetLrnParams {
            shape: abi_shape(OP, dims, x.layout() == Layout::Nhwc)?,
            size: to_u32(OP, "size", self.params.size)?,
            k: self.params.k,
            alpha: self.params.alpha,
            beta: self.params.beta,
            relu_first: u32::from(relu_first),
        };
        let cfg = grid_1d(OP, x.len() as u64)?;
        let f = &gpu.kernels(T::DTYPE).lrn;
        // SAFETY: lrn(const T *src, T *dst, AlexnetLrnParams); `x` and `y` both hold
        // n*c*h*w elements of `params.shape` (checked above) and are distinct buffers (one is
        // borrowed shared, the other exclusively); one thread per element.
        unsafe {
            gpu.stream()
                .launch_builder(f)
                .arg(x.data())
                .arg(y.data_mut())
                .arg(&params)
                .launch(cfg)
        }
        .map_err(driver_err("launching lrn"))?;
        Ok(())
    }
}

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

    /// `x` `[n, c, h, w]` to `y` `[n, c, oh, ow]`, same layout.
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
    ) -> Result<()> {
        const OP: &str = "MaxPoolGpu::forward";
        let [n, c, h, w] = x.dims4(OP)?;
        let (oh, ow) = self.output_size(h, w)?;
        let want = [n, c, oh, ow];
        if y.shape() != want.as_slice() {
            return Err(shape_err(OP, format!("output {want:?}"), y.shape()));
        }
        if y.layout() != x.layout() {
            return Err(layout_err(OP, x.layout(), y.layout()));
        }
        let params = AlexnetPoolParams {
            in_: abi_shape(OP, [n, c, h, w], x.layout() == Layout::Nhwc)?,
            out_h: to_u32(OP, "out_h", oh)?,
            out_w: to_u32(OP, "out_w", ow)?,
            kernel: to_u32(OP, "kernel", self.kernel)?,
            stride: to_u32(OP, "stride", self.stride)?,
        };
        let cfg = grid_1d(OP, y.len() as u64)?;
        let f = &gpu.kernels(T::DTYPE).maxpool;
        // SAFETY: maxpool(const T *src, T *dst, AlexnetPoolParams); `x` holds n*c*h*w and `y`
        // n*c*oh*ow elements with oh, ow the floor-mode sizes for the window (checked above),
        // so every window lies inside `x`; one thread per output element; distinct buffers.
        unsafe {
            gpu.stream()
                .launch_builder(f)
                .arg(x.data())
                .arg(y.data_mut())
                .arg(&params)
                .launch(cfg)
        }
        .map_err(driver_err("launching maxpool"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Linear (cuBLAS)
// ---------------------------------------------------------------------------------------------

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
        let m = to_i32(OP, "out_features", self.out_features)?;
        let n = to_i32(OP, "rows", rows)?;
        let k = to_i32(OP, "in_features", self.in_features)?;
        let compute = match (T::DTYPE, self.allow_tf32) {
            (GpuDtype::F32, true) => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let dtype = T::DTYPE.cublas();
        gpu.bind()?;
        {
            let stream = gpu.stream();
            let (w_ptr, _w_done) = self.weight.device_ptr(stream);
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (y_ptr, _y_done) = y.data_mut().device_ptr_mut(stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Column-major view: y^T [out, rows] = W [out, in] * x^T [in, rows], where W is the
            // row-major [out, in] buffer read transposed (lda = in), x^T is the row-major
            // [rows, in] buffer as is (ldb = in), and y^T is the row-major [rows, out] output
            // (ldc = out).
            // SAFETY: the cuBLAS handle runs on `stream`, where the pointers were made ready;
            // the weight holds out*in, `x` rows*in and `y` rows*out elements of `dtype`
            // (checked above and at construction); alpha/beta are host f32 values matching the
            // f32 compute type; the guards record the uses after the call.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *gpu.blas().handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    (&alpha as *const f32).cast(),
                    w_ptr as *const c_void,
                    dtype,
                    k,
                    x_ptr as *const c_void,
                    dtype,
                    k,
                    (&beta as *const f32).cast(),
                    y_ptr as *mut c_void,
                    dtype,
                    m,
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| Error::cuda("cublasGemmEx", e))?;
        }
        bias_act(gpu, y, &self.bias, relu)
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

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
    let f = &gpu.kernels(T::DTYPE).dropout;
    // SAFETY: dropout(T *x, AlexnetDropoutParams); `x` holds `len` elements; one thread per
    // element.
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x.data_mut())
            .arg(&params)
            .launch(cfg)
    }
    .map_err(driver_err("launching dropout"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Softmax + top-k
// ---------------------------------------------------------------------------------------------

/// Device and page-locked host buffers for the `k <= ALEXNET_TOPK_MAX` best classes of up to
/// `rows` rows, filled by [`softmax_top_k`]: only these leave the GPU.
#[derive(Debug)]
pub struct TopK {
    class: CudaSlice<u32>,
    prob: CudaSlice<f32>,
    host_class: PinnedHostSlice<u32>,
    host_prob: PinnedHostSlice<f32>,
    rows: usize,
    /// `(rows, k)` of the last launch.
    filled: Option<(usize, usize)>,
}

impl TopK {
    /// The largest `k` the kernel returns.
    pub const MAX_K: usize = ALEXNET_TOPK_MAX as usize;

    /// Buffers for up to `rows` rows.
    pub fn new(gpu: &Gpu, rows: usize) -> Result<Self> {
        let len = rows
            .checked_mul(Self::MAX_K)
            .filter(|&l| l > 0)
            .ok_or_else(|| Error::invalid("top-k rows", format!("{rows}")))?;
        let stream = gpu.stream();
        Ok(TopK {
            class: stream
                .alloc_zeros(len)
                .map_err(driver_err("allocating top-k classes"))?,
            prob: stream
                .alloc_zeros(len)
                .map_err(driver_err("allocating top-k probabilities"))?,
            host_class: alloc_readback(gpu.context(), len)?,
            host_prob: alloc_readback(gpu.context(), len)?,
            rows,
            filled: None,
        })
    }

    /// Row capacity.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Fills the device buffers with 0xFF bytes (class `u32::MAX`, probability NaN), so slots
    /// the kernel does not write show up.
    pub fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        let stream = gpu.stream();
        for (ptr, bytes, _done) in [
            {
                let bytes = self.class.num_bytes();
                let (p, d) = self.class.device_ptr_mut(stream);
                (p, bytes, d)
            },
            {
                let bytes = self.prob.num_bytes();
                let (p, d) = self.prob.device_ptr_mut(stream);
                (p, bytes, d)
            },
        ] {
            // SAFETY: `ptr` addresses `bytes` bytes of a live buffer, ordered on `stream`; any
            // bit pattern is a valid u32 / f32.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream())
            }
            .map_err(driver_err("cuMemsetD8Async"))?;
        }
        Ok(())
    }

    /// Copies the last launch's `(class, probability)` lists to the host, one per row, most
    /// probable first. Waits for the GPU.
    pub fn to_host(&mut self, gpu: &Gpu) -> Result<Vec<Vec<(usize, f32)>>> {
        self.start_download(gpu)?;
        self.read_downloaded()
    }

    /// Queues the copies of the last launch's results into the page-locked host buffers.
    pub(crate) fn start_download(&mut self, gpu: &Gpu) -> Result<()> {
        let (rows, k) = self.filled.ok_or_else(|| {
            Error::invalid("top-k", "no softmax_top_k has run into these buffers")
        })?;
        let len = rows * k;
        let stream = gpu.stream();
        let class = self
            .class
            .try_slice(..len)
            .ok_or_else(|| Error::cuda("TopK::to_host", "class buffer too short"))?;
        let prob = self
            .prob
            .try_slice(..len)
            .ok_or_else(|| Error::cuda("TopK::to_host", "probability buffer too short"))?;
        // The host buffers hold rows * MAX_K >= len elements.
        stream
            .memcpy_dtoh(&class, &mut self.host_class)
            .map_err(driver_err("cuMemcpyDtoH (top-k classes)"))?;
        stream
            .memcpy_dtoh(&prob, &mut self.host_prob)
            .map_err(driver_err("cuMemcpyDtoH (top-k probabilities)"))
    }

    /// Waits for [`TopK::start_download`]'s copies and reads them.
    pub(crate) fn read_downloaded(&self) -> Result<Vec<Vec<(usize, f32)>>> {
        let (rows, k) = self.filled.ok_or_else(|| {
            Error::invalid("top-k", "no softmax_top_k has run into these buffers")
        })?;
        let classes = self
            .host_class
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        let probs = self
            .host_prob
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))?;
        Ok((0..rows)
            .map(|r| {
                (0..k)
                    .map(|j| (classes[r * k + j] as usize, probs[r * k + j]))
                    .collect()
            })
            .collect())
    }
}

/// Row-wise softmax of `logits` `[rows, classes]` and its `k` most probable classes (ties to
/// the lower index) into `out`, with the `softmax_topk` kernel. `probs` (`[rows, classes]`,
/// f32) receives the full softmax when given; otherwise only the top-k are written.
pub fn softmax_top_k<T: GpuFloat>(
    gpu: &Gpu,
    logits: &GpuTensor<T>,
    k: usize,
    probs: Option<&mut GpuTensor<f32>>,
    out: &mut TopK,
) -> Result<()> {
    const OP: &str = "softmax_top_k";
    let &[rows, classes] = logits.shape() else {
        return Err(shape_err(OP, "logits [rows, classes]", logits.shape()));
    };
    if logits.layout() != Layout::Nchw {
        return Err(layout_err(OP, Layout::Nchw, logits.layout()));
    }
    if k == 0 || k > TopK::MAX_K || k > classes {
        return Err(Error::invalid(
            "top-k",
            format!(
                "k = {k} with {classes} classes (need 1 <= k <= min(classes, {}))",
                TopK::MAX_K
            ),
        ));
    }
    if rows > out.rows {
        return Err(shape_err(
            OP,
            format!("at most {} rows (the TopK buffers' capacity)", out.rows),
            logits.shape(),
        ));
    }
    if let Some(p) = &probs {
        if p.shape() != logits.shape() || p.layout() != Layout::Nchw {
            return Err(shape_err(
                OP,
                format!("probabilities {:?}", logits.shape()),
                p.shape(),
            ));
        }
    }
    let params = AlexnetSoftmaxParams {
        rows: to_u32(OP, "rows", rows)?,
        classes: to_u32(OP, "classes", classes)?,
        k: k as u32,
        write_probs: u32::from(probs.is_some()),
    };
    let cfg = grid_rows(OP, params.rows)?;
    let f = &gpu.kernels(T::DTYPE).softmax_topk;
    let null_probs: u64 = 0;
    let stream = gpu.stream();
    let mut launch = stream.launch_builder(f);
    launch.arg(logits.data());
    match probs {
        Some(p) => launch.arg(p.data_mut()),
        None => launch.arg(&null_probs),
    };
    launch.arg(&mut out.class).arg(&mut out.prob).arg(&params);
    // SAFETY: softmax_topk(const T *logits, float *probs, unsigned *top_class, float *top_prob,
    // AlexnetSoftmaxParams); `logits` (and `probs` when given, else a null pointer with
    // write_probs = 0, as the ABI allows) hold rows*classes elements; the top-k buffers hold
    // rows_capacity * ALEXNET_TOPK_MAX >= rows*k; one block per row.
    unsafe { launch.launch(cfg) }.map_err(driver_err("launching softmax_topk"))?;
    out.filled = Some((rows, k));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Input preparation
// ---------------------------------------------------------------------------------------------

/// u8 HWC images (a [`crate::image::U8Batch`]'s pixels) to a normalised tensor with the
/// `prepare_input` kernel: `(x / 255 - mean[c]) / std[c]`, into NCHW or NHWC of any `C >= 3`
/// (channels past 3 are written as zeros: e.g. 8 for the fp16 tensor-core path).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrepareInput {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for PrepareInput {
    /// torchvision's ImageNet normalisation.
    fn default() -> Self {
        PrepareInput {
            mean: crate::image::IMAGENET_MEAN,
            std: crate::image::IMAGENET_STD,
        }
    }
}

impl PrepareInput {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(Error::invalid(
                "normalisation",
                format!("mean {mean:?} must be finite, std {std:?} finite and non-zero"),
            ));
        }
        Ok(PrepareInput { mean, std })
    }

    /// `src` holds `n` images of `h x w x 3` bytes, where `dst` is `[n, c, h, w]` (`c >= 3`).
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        src: &CudaView<'_, u8>,
        dst: &mut GpuTensor<T>,
    ) -> Result<()> {
        const OP: &str = "PrepareInput::forward";
        let [n, c, h, w] = dst.dims4(OP)?;
        if c < 3 {
            return Err(shape_err(
                OP,
                "an output of at least 3 channels",
                dst.shape(),
            ));
        }
        let want = n * h * w * 3;
        if src.len() != want {
            return Err(shape_err(
                OP,
                format!("{n} images of {h}x{w}x3 bytes = {want} bytes"),
                &[src.len()],
            ));
        }
        let params = AlexnetPrepareParams {
            out: abi_shape(OP, [n, c, h, w], dst.layout() == Layout::Nhwc)?,
            mean: self.mean,
            std: self.std,
        };
        let cfg = grid_1d(OP, dst.len() as u64)?;
        let f = &gpu.kernels(T::DTYPE).prepare_input;
        // SAFETY: prepare_input(const unsigned char *src, T *dst, AlexnetPrepareParams); `src`
        // holds n*h*w*3 bytes and `dst` n*c*h*w elements of `params.out` (checked above); one
        // thread per output element.
        unsafe {
            gpu.stream()
                .launch_builder(f)
                .arg(src)
                .arg(dst.data_mut())
                .arg(&params)
                .launch(cfg)
        }
        .map_err(driver_err("launching prepare_input"))?;
        Ok(())
    }
}

/// `src` (f32) to f16 in `dst` (round to nearest even) with the `convert_f32_to_f16` kernel;
/// `dst` must hold at least `src.len()` values.
pub fn convert_f32_to_f16(
    gpu: &Gpu,
    src: &CudaView<'_, f32>,
    dst: &mut CudaSlice<half::f16>,
) -> Result<()> {
    const OP: &str = "convert_f32_to_f16";
    if dst.len() < src.len() {
        return Err(shape_err(
            OP,
            format!("at least {} outputs", src.len()),
            &[dst.len()],
        ));
    }
    let params = AlexnetConvertParams {
        len: src.len() as u64,
    };
    let cfg = grid_1d(OP, params.len)?;
    let f = &gpu.all_kernels().convert_f32_to_f16;
    // SAFETY: convert_f32_to_f16(const float *src, unsigned short *dst, AlexnetConvertParams);
    // `src` holds `len` floats and `dst` at least `len` f16 values (checked above).
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(src)
            .arg(dst)
            .arg(&params)
            .launch(cfg)
    }
    .map_err(driver_err("launching convert_f32_to_f16"))?;
    Ok(())
}

/// `src` (f16) to f32 in `dst` (exact) with the `convert_f16_to_f32` kernel; `dst` must hold
/// at least `src.len()` values.
pub fn convert_f16_to_f32(
    gpu: &Gpu,
    src: &CudaView<'_, half::f16>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "convert_f16_to_f32";
    if dst.len() < src.len() {
        return Err(shape_err(
            OP,
            format!("at least {} outputs", src.len()),
            &[dst.len()],
        ));
    }
    let params = AlexnetConvertParams {
        len: src.len() as u64,
    };
    let cfg = grid_1d(OP, params.len)?;
    let f = &gpu.all_kernels().convert_f16_to_f32;
    // SAFETY: convert_f16_to_f32(const unsigned short *src, float *dst, AlexnetConvertParams);
    // `src` holds `len` f16 values and `dst` at least `len` floats (checked above).
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(src)
            .arg(dst)
            .arg(&params)
            .launch(cfg)
    }
    .map_err(driver_err("launching convert_f16_to_f32"))?;
    Ok(())
}
