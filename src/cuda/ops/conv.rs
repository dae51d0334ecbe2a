//! 2-D convolutions in cuDNN (then `bias_act`, or a fused epilogue); CPU twin
//! [`crate::cpu::Conv2d`].
//!
//! Over 400 lines on purpose: the layer owns its cuDNN descriptors, its per-shape plan cache and
//! the algorithm choice, which only make sense together; the pure description of the call (what
//! the tests replay on the CPU) already lives in `calls.rs`.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cudnn::sys::{
    cudnnConvolutionFwdAlgo_t, cudnnDataType_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use ndarray::{ArrayView1, ArrayView4};

mod backward;

use backward::BackwardPlan;

use super::calls::{pack_conv_weights, ConvCall};
use super::{bias_act, layout_err, shape_err, upload, upload_into};
use crate::config::window_output;
use crate::cuda::cudnn::{
    describe_choice, find_forward_algorithms, first_that_fits, ranked_candidates, run_math,
    AlgoPerf, Allowed, ConvAlgorithm, ConvDesc, CudnnHandle, Determinism, FilterDesc, FindBuffers,
    Fit, TensorDesc,
};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::to_i32;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::cuda::workspace::refuse_during_capture;
use crate::error::{Error, Result};

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
    /// True fp32 only: keep to the GEMM-family and direct algorithms, no FFT or Winograd.
    /// Their transforms cost accuracy (on an H200 the paper network's conv2 came within 3.5e-3
    /// of the CPU with them, 1e-4 without) and the GEMM family costs speed (the paper network
    /// at batch 128: 10.40 ms a batch against 4.97 ms). Off by default: cuDNN picks among
    /// every algorithm without tensor cores, as PyTorch's fp32 (TF32 off) does.
    pub fp32_gemm_only: bool,
    /// Prefer deterministic algorithms: the fastest deterministic one even when a
    /// non-deterministic one (summing with atomics) measured faster, so the same step gives
    /// the same gradients within a process. On by default. Which algorithm is fastest is
    /// measured anew in each process, so another run (or a resumed one) may choose another
    /// deterministic algorithm, which rounds differently: two runs agree bit for bit only
    /// where they chose the same algorithms (`Conv2dGpu::choices` lists them). Off: the
    /// fastest measured, as PyTorch with `cudnn.benchmark` on does by default. Forward
    /// algorithms are deterministic either way; this matters for the backward.
    pub deterministic: bool,
}

impl ConvOptions {
    /// The cuDNN call of a layer with these options, `out_channels` square `kernel` filters
    /// over `in_channels` (the weights' own or the padded count), on inputs
    /// `[n, in_channels, height, width]`: what [`Conv2dGpu`] passes (`tests/library_calls.rs`
    /// replays it on the CPU).
    #[doc(hidden)]
    pub fn call(
        &self,
        out_channels: usize,
        in_channels: usize,
        kernel: usize,
        [n, height, width]: [usize; 3],
    ) -> Result<ConvCall> {
        ConvCall::new(
            self.layout,
            [n, height, width],
            in_channels,
            out_channels,
            kernel,
            self.stride,
            self.padding,
        )
    }

    /// The math settings refused, not ignored, where they cannot apply: TF32 and GEMM-only are
    /// settings of f32 storage (an f16 or bf16 convolution always runs on the tensor cores), and
    /// GEMM-only restricts true fp32, which TF32 math is not.
    pub(crate) fn check_math(&self, dtype: GpuDtype) -> Result<()> {
        let fp32_setting = match (self.allow_tf32, self.fp32_gemm_only) {
            (true, true) => {
                return Err(Error::invalid(
                    "ConvOptions",
                    "fp32_gemm_only restricts true fp32; with allow_tf32 (TF32 math) cuDNN \
                     picks among every algorithm",
                ))
            }
            (true, false) => Some("allow_tf32"),
            (false, true) => Some("fp32_gemm_only"),
            (false, false) => None,
        };
        match (dtype, fp32_setting) {
            (GpuDtype::F16 | GpuDtype::Bf16, Some(name)) => Err(Error::invalid(
                "ConvOptions",
                format!(
                    "{name} applies to f32 convolutions only, not {dtype:?} (tensor cores always)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// `stride`, `padding` and `layout`; no channel padding, no TF32, every algorithm without
    /// tensor cores in true fp32 (FFT and Winograd too), deterministic algorithms first.
    pub fn new(stride: usize, padding: usize, layout: Layout) -> Self {
        ConvOptions {
            stride,
            padding,
            layout,
            in_channels: None,
            allow_tf32: false,
            fp32_gemm_only: false,
            deterministic: true,
        }
    }
}

/// A chosen algorithm for one input shape, with its descriptors and the bytes of the shared
/// workspace it needs, and the backward's algorithms once chosen.
#[derive(Debug)]
struct ConvPlan {
    conv: ConvDesc,
    x: TensorDesc,
    y: TensorDesc,
    algo: cudnnConvolutionFwdAlgo_t,
    workspace_bytes: usize,
    /// cuDNN's measurements behind the choice ([`describe_choice`]).
    measured: String,
    backward: BackwardPlan,
}

/// One call's chosen algorithm, the convolution descriptor to run it with (carrying the math
/// type it was measured with) and the bytes of the shared workspace it needs.
#[derive(Debug)]
struct Chosen<A> {
    conv: ConvDesc,
    algo: A,
    workspace_bytes: usize,
    /// cuDNN's measurements behind the choice ([`describe_choice`]).
    measured: String,
}

/// One of a [`Conv2dGpu`]'s algorithm choices with cuDNN's measurements behind it
/// ([`Conv2dGpu::choices`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvChoice {
    /// The input shape it was chosen for, `[n, height, width]`.
    pub input: [usize; 3],
    /// `forward`, `backward data` or `backward filter`.
    pub call: &'static str,
    /// The chosen algorithm and its measured time, and the fastest candidate if another one
    /// (with the rules that passed it over), e.g. `CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1 3.210
    /// ms; fastest measured CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 1.100 ms, passed over:
    /// non-deterministic (deterministic preferred); 4 candidates`.
    pub measured: String,
}

/// One algorithm a [`Conv2dGpu`] chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvPlanInfo {
    /// The input shape it was chosen for, `[n, height, width]`.
    pub input: [usize; 3],
    /// cuDNN's name for it, e.g. `CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM`.
    pub algorithm: String,
    /// Bytes of the shared workspace it needs.
    pub workspace_bytes: usize,
    /// cuDNN's measurements behind the choice, as in [`ConvChoice::measured`].
    pub measured: String,
}

/// 2-D convolution + bias (+ ReLU) in cuDNN: cross-correlation with square kernels, zero
/// padding, PyTorch's output size. The algorithm is chosen once per input shape by measuring
/// them all on the real buffers (`cudnnFindConvolutionForwardAlgorithmEx`, deterministic ones
/// preferred, none needing more workspace than the GPU's cap, see
/// [`Gpu::set_conv_workspace_limit`]) and cached; [`Conv2dGpu::prepare`] does that ahead of
/// time, [`Conv2dGpu::clear_plans`] forgets the choices. Every convolution on a GPU runs with
/// the one workspace the [`Gpu`] holds, sized to the most any chosen algorithm needs.
///
/// Math: fp16 uses tensor cores (`CUDNN_TENSOR_OP_MATH`) with f32 accumulation; fp32 is true
/// fp32 (`CUDNN_FMA_MATH`: any algorithm without tensor cores, FFT and Winograd included, or the
/// GEMM family only with [`ConvOptions::fp32_gemm_only`]) unless [`ConvOptions::allow_tf32`].
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

/// The weights in `layout`'s filter order, padded to `in_channels`, and the bias, rounded to `T`.
fn packed_parameters<T: GpuFloat>(
    weight: ArrayView4<'_, f32>,
    bias: ArrayView1<'_, f32>,
    in_channels: usize,
    layout: Layout,
) -> Result<(Vec<T>, Vec<T>)> {
    let weight = pack_conv_weights(weight, in_channels, layout)?
        .into_iter()
        .map(T::from_f32)
        .collect();
    let bias = bias.iter().map(|&v| T::from_f32(v)).collect();
    Ok((weight, bias))
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
        options.check_math(T::DTYPE)?;
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
        let (host, bias_host) = packed_parameters(weight, bias, in_channels, options.layout)?;
        let math = match (T::DTYPE, options.allow_tf32) {
            (GpuDtype::F16 | GpuDtype::Bf16, _) => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            (GpuDtype::F32, false) => cudnnMathType_t::CUDNN_FMA_MATH,
            (GpuDtype::F32, true) => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        };
        gpu.bind()?;
        let filter = FilterDesc::new(
            T::DTYPE.cudnn(),
            cudnn_format(options.layout),
            ConvCall::new(
                options.layout,
                [1, k, k],
                in_channels,
                out_channels,
                k,
                1,
                0,
            )?
            .filter,
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

    /// Replaces the weights and the bias (shaped as for [`Conv2dGpu::new`]) in place: the
    /// buffers keep their addresses and the algorithm choices stay.
    pub(crate) fn load(
        &mut self,
        gpu: &Gpu,
        weight: ArrayView4<'_, f32>,
        bias: ArrayView1<'_, f32>,
    ) -> Result<()> {
        let (out_channels, _, kh, kw) = weight.dim();
        if (out_channels, kh, kw) != (self.out_channels, self.kernel, self.kernel) {
            return Err(shape_err(
                "Conv2dGpu::load",
                format!(
                    "[{}, in, {k}, {k}] as the layer's",
                    self.out_channels,
                    k = self.kernel
                ),
                weight.shape(),
            ));
        }
        let (host, bias_host) =
            packed_parameters(weight, bias, self.in_channels, self.options.layout)?;
        upload_into(gpu, &host, &mut self.weight, "convolution weights")?;
        upload_into(gpu, &bias_host, &mut self.bias, "convolution bias")
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

    /// The filters' side length.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// The weights (in the filter layout, see [`Conv2dGpu::backward`]) and the bias on the
    /// device, for reading them back.
    pub(crate) fn parameters(&self) -> [&CudaSlice<T>; 2] {
        [&self.weight, &self.bias]
    }

    /// The weights and the bias for an optimiser to update in place.
    pub(crate) fn parameters_mut(&mut self) -> [&mut CudaSlice<T>; 2] {
        [&mut self.weight, &mut self.bias]
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

    /// Chooses and caches the algorithm for inputs `[n, in_channels, height, width]`, measured
    /// on scratch tensors of that shape. Called ahead of time to keep the measuring out of a
    /// timed loop; [`Conv2dGpu::prepare_on`] measures on the buffers the layer will run on.
    pub fn prepare(&mut self, gpu: &Gpu, n: usize, height: usize, width: usize) -> Result<()> {
        if self.plans.contains_key(&[n, height, width]) {
            return Ok(());
        }
        let layout = self.options.layout;
        let x = GpuTensor::zeros(gpu, &[n, self.in_channels, height, width], layout)?;
        let (oh, ow) = self.output_size(height, width)?;
        let mut y = GpuTensor::zeros(gpu, &[n, self.out_channels, oh, ow], layout)?;
        self.prepare_on(gpu, &x, &mut y)
    }

    /// Chooses and caches the algorithm for `x`'s shape, measured on `x` and `y` themselves
    /// (`y` is overwritten). Shapes as for [`Conv2dGpu::forward`].
    pub fn prepare_on(&mut self, gpu: &Gpu, x: &GpuTensor<T>, y: &mut GpuTensor<T>) -> Result<()> {
        let [n, h, w] = self.check_shapes("Conv2dGpu::prepare_on", x, y)?;
        if !self.plans.contains_key(&[n, h, w]) {
            let plan = self.make_plan(gpu, x, y)?;
            self.plans.insert([n, h, w], plan);
        }
        Ok(())
    }

    /// Forgets every chosen algorithm; the next forward of a shape measures again.
    pub fn clear_plans(&mut self) {
        self.plans.clear();
    }

    /// Forgets the algorithms chosen for batch size `n`.
    pub fn forget_plans(&mut self, n: usize) {
        self.plans.retain(|&[batch, _, _], _| batch != n);
    }

    /// Every algorithm chosen so far, one per input shape, sorted by shape.
    pub fn plans(&self) -> Vec<ConvPlanInfo> {
        let mut plans: Vec<ConvPlanInfo> = self
            .plans
            .iter()
            .map(|(&input, plan)| ConvPlanInfo {
                input,
                algorithm: format!("{:?}", plan.algo),
                workspace_bytes: plan.workspace_bytes,
                measured: plan.measured.clone(),
            })
            .collect();
        plans.sort_by_key(|p| p.input);
        plans
    }

    /// Every algorithm chosen so far (forward, and backward data and filter where a backward
    /// ran) with cuDNN's measurements behind each, sorted by input shape: what the time of a
    /// profiled step's convolutions comes from.
    pub fn choices(&self) -> Vec<ConvChoice> {
        let mut shapes: Vec<&[usize; 3]> = self.plans.keys().collect();
        shapes.sort();
        let mut choices = Vec::new();
        for input in shapes {
            let Some(plan) = self.plans.get(input) else {
                continue;
            };
            let mut add = |call, measured: &str| {
                choices.push(ConvChoice {
                    input: *input,
                    call,
                    measured: measured.to_string(),
                })
            };
            add("forward", &plan.measured);
            if let Some(data) = plan.backward.data_measured() {
                add("backward data", data);
            }
            if let Some(filter) = plan.backward.filter_measured() {
                add("backward filter", filter);
            }
        }
        choices
    }

    /// The cuDNN call for inputs `[n, in_channels, height, width]`, as data (replayed on the CPU
    /// by `tests/library_calls.rs`).
    #[doc(hidden)]
    pub fn call(&self, n: usize, height: usize, width: usize) -> Result<ConvCall> {
        self.options.call(
            self.out_channels,
            self.in_channels,
            self.kernel,
            [n, height, width],
        )
    }

    /// Chooses the algorithm for `x`'s shape by measuring the candidates on `x`, the weights,
    /// `y` and the shared workspace (see [`Conv2dGpu::measure`]).
    fn make_plan(&self, gpu: &Gpu, x: &GpuTensor<T>, y: &mut GpuTensor<T>) -> Result<ConvPlan> {
        const OP: &str = "Conv2dGpu::prepare";
        let [n, height, width] = self.check_shapes(OP, x, y)?;
        let call = self.call(n, height, width)?;
        gpu.bind()?;
        let format = cudnn_format(call.layout);
        let x_desc = TensorDesc::new(T::DTYPE.cudnn(), format, call.x)?;
        let y_desc = TensorDesc::new(T::DTYPE.cudnn(), format, call.y)?;
        // cuDNN's own output size must be the layer's, checked before any workspace grows.
        let cudnn_dims = ConvDesc::new(&call, cudnnDataType_t::CUDNN_DATA_FLOAT, self.math)?
            .output_dims(&x_desc, &self.filter)?;
        if cudnn_dims != call.y {
            return Err(Error::cuda(
                OP,
                format!(
                    "cuDNN computes an output of {cudnn_dims:?}, the layer expects {:?}",
                    call.y
                ),
            ));
        }
        let chosen = self.measure(
            gpu,
            "forward",
            &call,
            |handle, conv, workspace, workspace_bytes| {
                let stream = gpu.stream();
                let (x_ptr, _x_done) = x.data().device_ptr(stream);
                let (w_ptr, _w_done) = self.weight.device_ptr(stream);
                let (y_ptr, _y_done) = y.data_mut().device_ptr_mut(stream);
                let buffers = FindBuffers {
                    read: [x_ptr as *const c_void, w_ptr as *const c_void],
                    written: y_ptr as *mut c_void,
                    workspace,
                    workspace_bytes,
                };
                // SAFETY: `x`, the weights and `y` match the descriptors (shapes checked above,
                // dtype and layout are the layer's), the workspace is `workspace_bytes` long,
                // all on this GPU; the stream is idle and the call returns only once cuDNN is
                // done with them.
                unsafe {
                    find_forward_algorithms(handle, &x_desc, &self.filter, conv, &y_desc, &buffers)
                }
            },
            |handle, conv, algo| {
                // SAFETY: handle and descriptors are alive; the call only computes a size.
                unsafe {
                    cudarc::cudnn::result::get_convolution_forward_workspace_size(
                        handle.0,
                        x_desc.0,
                        self.filter.0,
                        conv.0,
                        y_desc.0,
                        algo,
                    )
                }
                .map_err(|e| Error::cuda("cudnnGetConvolutionForwardWorkspaceSize", e))
            },
        )?;
        Ok(ConvPlan {
            conv: chosen.conv,
            x: x_desc,
            y: y_desc,
            algo: chosen.algo,
            workspace_bytes: chosen.workspace_bytes,
            measured: chosen.measured,
            backward: BackwardPlan::default(),
        })
    }

    /// Chooses the algorithm of one of the layer's calls (`what`: "forward", "backward data",
    /// "backward filter", for messages) on `call`'s shapes: `search` runs
    /// cuDNN's `Find` for that call on the real buffers (given the handle, a fresh convolution
    /// descriptor with the layer's math type, and the shared workspace made as large as the cap
    /// allows), the rules of [`ranked_candidates`] order the candidates, the first whose
    /// `workspace_size` fits the cap wins, and the workspace shrinks to the most any chosen
    /// algorithm needs (also when no choice is made). The descriptor returned carries the math
    /// type the winner runs with ([`run_math`]).
    fn measure<A: ConvAlgorithm>(
        &self,
        gpu: &Gpu,
        what: &str,
        call: &ConvCall,
        search: impl FnOnce(&CudnnHandle, &ConvDesc, *mut c_void, usize) -> Result<Vec<AlgoPerf<A>>>,
        workspace_size: impl Fn(&CudnnHandle, &ConvDesc, A) -> Result<usize>,
    ) -> Result<Chosen<A>> {
        const OP: &str = "Conv2dGpu (algorithm choice)";
        gpu.bind()?;
        // Accumulation is f32 for both storage types (fp16: cuDNN's "pseudo-half" config).
        let conv = ConvDesc::new(call, cudnnDataType_t::CUDNN_DATA_FLOAT, self.math)?;
        let stream = gpu.stream();
        // Measuring synchronises and allocates: never inside a CUDA graph capture (the eager
        // run before a capture chooses every algorithm).
        refuse_during_capture(stream, "choosing a convolution algorithm")?;
        let handle = gpu.cudnn()?;
        let mut workspace = gpu.conv_workspace()?;
        let allowed = Allowed::new(self.math, self.options.fp32_gemm_only);
        let determinism = match self.options.deterministic {
            true => Determinism::Preferred,
            false => Determinism::Indifferent,
        };
        let search_bytes = workspace.for_search(stream)?;
        let outcome = (|| {
            // Measured on an idle device: nothing queued before may still use these buffers or
            // slow the candidates down.
            stream
                .synchronize()
                .map_err(|e| Error::cuda("cuStreamSynchronize", e))?;
            let candidates = {
                let (ws_ptr, ws_bytes, _ws_done) = workspace.device_ptr(stream);
                search(&handle, &conv, ws_ptr, ws_bytes)?
            };
            let ranked = ranked_candidates(&candidates, allowed, determinism, search_bytes);
            // Each candidate's size is asked with the math type it would run with.
            let fit = first_that_fits(&ranked, search_bytes, |p| {
                conv.set_math(run_math(self.math, p.math))?;
                workspace_size(&handle, &conv, p.algo)
            })?;
            let fitted = match fit {
                Fit::Chosen(fitted) => fitted,
                Fit::NoneFits(passed_over) => {
                    return Err(Error::cuda(
                        OP,
                        format!(
                            "cuDNN has no usable {what} algorithm for input {:?} ({:?}, {:?}) \
                             within a {search_bytes}-byte workspace; candidates: \
                             {candidates:?}; passed over after the size query: {passed_over:?}",
                            call.x,
                            T::DTYPE,
                            self.options.layout
                        ),
                    ))
                }
            };
            // The descriptor runs with the chosen candidate's math type, whatever was asked
            // last.
            conv.set_math(run_math(self.math, fitted.chosen.math))?;
            Ok((candidates, fitted))
        })();
        let (candidates, fitted) = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                // Back to what the algorithms chosen before need; the search's error is the
                // one to report, whatever the shrink says.
                let _ = workspace.settle(stream, 0);
                return Err(e);
            }
        };
        workspace.settle(stream, fitted.workspace_bytes)?;
        Ok(Chosen {
            conv,
            algo: fitted.chosen.algo,
            workspace_bytes: fitted.workspace_bytes,
            measured: describe_choice(
                &candidates,
                &fitted.chosen,
                allowed,
                determinism,
                search_bytes,
                &fitted.passed_over,
            ),
        })
    }

    /// Checks `x` and `y` against the layer (layout, channels, output size) and returns the
    /// input's `[n, height, width]`.
    fn check_shapes(
        &self,
        op: &'static str,
        x: &GpuTensor<T>,
        y: &GpuTensor<T>,
    ) -> Result<[usize; 3]> {
        let layout = self.options.layout;
        if x.layout() != layout {
            return Err(layout_err(op, layout, x.layout()));
        }
        if y.layout() != layout {
            return Err(layout_err(op, layout, y.layout()));
        }
        let [n, c, h, w] = x.dims4(op)?;
        if c != self.in_channels {
            return Err(shape_err(
                op,
                format!("input [N, {}, H, W]", self.in_channels),
                x.shape(),
            ));
        }
        let (oh, ow) = self.output_size(h, w)?;
        let want = [n, self.out_channels, oh, ow];
        if y.shape() != want.as_slice() {
            return Err(shape_err(op, format!("output {want:?}"), y.shape()));
        }
        Ok([n, h, w])
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
        self.forward_unbiased(gpu, x, y)?;
        bias_act(gpu, y, &self.bias, relu)
    }

    /// The layer's bias on the device (for an epilogue that adds it, see
    /// [`Conv2dGpu::forward_unbiased`]).
    pub fn bias(&self) -> &CudaSlice<T> {
        &self.bias
    }

    /// `y = conv(x)` without the bias: for a fused epilogue that adds it
    /// ([`super::ConvEpilogueGpu`]). Shapes as for [`Conv2dGpu::forward`].
    pub fn forward_unbiased(
        &mut self,
        gpu: &Gpu,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
    ) -> Result<()> {
        let [n, h, w] = self.check_shapes("Conv2dGpu::forward", x, y)?;
        // The plan leaves the cache while it runs (made on first use) and goes back either way.
        let key = [n, h, w];
        let mut plan = match self.plans.remove(&key) {
            Some(plan) => plan,
            None => self.make_plan(gpu, x, y)?,
        };
        let result = self.run_plan(gpu, &mut plan, x, y);
        self.plans.insert(key, plan);
        result
    }

    /// `y = conv(x)` with `plan` (shapes already checked against it).
    fn run_plan(
        &self,
        gpu: &Gpu,
        plan: &mut ConvPlan,
        x: &GpuTensor<T>,
        y: &mut GpuTensor<T>,
    ) -> Result<()> {
        gpu.bind()?;
        {
            let handle = gpu.cudnn()?;
            let stream = gpu.stream();
            let (x_ptr, _x_done) = x.data().device_ptr(stream);
            let (w_ptr, _w_done) = self.weight.device_ptr(stream);
            let (y_ptr, _y_done) = y.data_mut().device_ptr_mut(stream);
            let mut workspace = gpu.conv_workspace()?;
            // Another shape's plan or a reset may have left it smaller (grown only then).
            workspace.ensure(stream, plan.workspace_bytes)?;
            let (ws_ptr, ws_bytes, _ws_done) = workspace.device_ptr(stream);
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
        Ok(())
    }
}

fn cudnn_format(layout: Layout) -> cudnnTensorFormat_t {
    match layout {
        Layout::Nchw => cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout::Nhwc => cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A math setting that cannot apply is an error naming it, never ignored.
    #[test]
    fn math_settings_that_cannot_apply_are_refused() {
        let plain = ConvOptions::new(1, 1, Layout::Nchw);
        let tf32 = ConvOptions {
            allow_tf32: true,
            ..plain
        };
        let gemm_only = ConvOptions {
            fp32_gemm_only: true,
            ..plain
        };
        let both = ConvOptions {
            allow_tf32: true,
            ..gemm_only
        };
        for options in [plain, tf32, gemm_only] {
            assert!(options.check_math(GpuDtype::F32).is_ok(), "{options:?}");
        }
        assert!(plain.check_math(GpuDtype::F16).is_ok());
        assert!(plain.check_math(GpuDtype::Bf16).is_ok());
        for (options, dtype, name) in [
            (tf32, GpuDtype::F16, "allow_tf32"),
            (gemm_only, GpuDtype::F16, "fp32_gemm_only"),
            (tf32, GpuDtype::Bf16, "allow_tf32"),
            (gemm_only, GpuDtype::Bf16, "fp32_gemm_only"),
            (both, GpuDtype::F32, "fp32_gemm_only"),
        ] {
            match options.check_math(dtype) {
                Err(Error::Invalid { message, .. }) => assert!(message.contains(name), "{message}"),
                other => panic!("{options:?} {dtype:?}: {other:?}"),
            }
        }
    }
}
