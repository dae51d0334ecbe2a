//! Thin owners of raw cuDNN objects (handle and descriptors) with `Drop`, and the
//! algorithm search. cudarc's safe cuDNN types keep their raw descriptors private, and
//! `cudnnFind*` needs them, so the convolution layer uses these instead.

use std::ffi::c_void;

use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;

use super::ops::ConvCall;
use crate::error::{Error, Result};

fn err(op: &str) -> impl Fn(result::CudnnError) -> Error + '_ {
    move |e| Error::cuda(op, e)
}

/// A cuDNN handle bound to one stream.
#[derive(Debug)]
pub(crate) struct CudnnHandle(pub(crate) sys::cudnnHandle_t);

// SAFETY: cuDNN handles may be used from any thread as long as no two threads use one at the
// same time; the owner keeps it behind a `Mutex` (see `Gpu`), so it is sent, never shared.
unsafe impl Send for CudnnHandle {}

impl CudnnHandle {
    /// Creates a handle whose work goes to `stream`. The stream's context must be current.
    pub fn new(stream: &CudaStream) -> Result<Self> {
        let handle = CudnnHandle(result::create_handle().map_err(err("cudnnCreate"))?);
        // SAFETY: the handle was just created; the stream is alive for as long as the `Gpu`
        // that owns both (the handle is dropped before the stream, see `Gpu`'s field order).
        unsafe { result::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t) }
            .map_err(err("cudnnSetStream"))?;
        Ok(handle)
    }
}

impl Drop for CudnnHandle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate, destroyed only here.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// A 4-D tensor descriptor.
#[derive(Debug)]
pub(crate) struct TensorDesc(pub(crate) sys::cudnnTensorDescriptor_t);

// SAFETY: a descriptor is a host-side parameter block with no thread affinity.
unsafe impl Send for TensorDesc {}

impl TensorDesc {
    pub fn new(
        dtype: sys::cudnnDataType_t,
        format: sys::cudnnTensorFormat_t,
        nchw: [i32; 4],
    ) -> Result<Self> {
        let desc = TensorDesc(
            result::create_tensor_descriptor().map_err(err("cudnnCreateTensorDescriptor"))?,
        );
        // SAFETY: the descriptor was just created and is not freed until `desc` drops.
        unsafe { result::set_tensor4d_descriptor(desc.0, format, dtype, nchw) }
            .map_err(err("cudnnSetTensor4dDescriptor"))?;
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created above, destroyed only here.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// A 4-D filter descriptor (`[k, c, r, s]`; memory KCRS for NCHW, KRSC for NHWC).
#[derive(Debug)]
pub(crate) struct FilterDesc(pub(crate) sys::cudnnFilterDescriptor_t);

// SAFETY: as for `TensorDesc`.
unsafe impl Send for FilterDesc {}

impl FilterDesc {
    pub fn new(
        dtype: sys::cudnnDataType_t,
        format: sys::cudnnTensorFormat_t,
        kcrs: [i32; 4],
    ) -> Result<Self> {
        let desc = FilterDesc(
            result::create_filter_descriptor().map_err(err("cudnnCreateFilterDescriptor"))?,
        );
        // SAFETY: the descriptor was just created and is not freed until `desc` drops.
        unsafe { result::set_filter4d_descriptor(desc.0, dtype, format, kcrs) }
            .map_err(err("cudnnSetFilter4dDescriptor"))?;
        Ok(desc)
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created above, destroyed only here.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

/// A 2-D convolution descriptor (cross-correlation, no dilation).
#[derive(Debug)]
pub(crate) struct ConvDesc(pub(crate) sys::cudnnConvolutionDescriptor_t);

// SAFETY: as for `TensorDesc`.
unsafe impl Send for ConvDesc {}

impl ConvDesc {
    /// The convolution descriptor of `call` (its padding, strides and dilations).
    pub fn new(
        call: &ConvCall,
        compute: sys::cudnnDataType_t,
        math: sys::cudnnMathType_t,
    ) -> Result<Self> {
        let desc = ConvDesc(
            result::create_convolution_descriptor()
                .map_err(err("cudnnCreateConvolutionDescriptor"))?,
        );
        // SAFETY: the descriptor was just created and is not freed until `desc` drops.
        unsafe {
            result::set_convolution2d_descriptor(
                desc.0,
                call.padding[0],
                call.padding[1],
                call.stride[0],
                call.stride[1],
                call.dilation[0],
                call.dilation[1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                compute,
            )
        }
        .map_err(err("cudnnSetConvolution2dDescriptor"))?;
        desc.set_math(math)?;
        Ok(desc)
    }

    pub fn set_math(&self, math: sys::cudnnMathType_t) -> Result<()> {
        // SAFETY: the descriptor is alive (owned by `self`).
        unsafe { result::set_convolution_math_type(self.0, math) }
            .map_err(err("cudnnSetConvolutionMathType"))
    }

    /// The output dims `[n, c, h, w]` cuDNN computes for this convolution.
    pub fn output_dims(&self, x: &TensorDesc, w: &FilterDesc) -> Result<[i32; 4]> {
        let (mut n, mut c, mut h, mut wd) = (0, 0, 0, 0);
        // SAFETY: all three descriptors are alive; the four out-pointers are valid locals.
        unsafe {
            sys::cudnnGetConvolution2dForwardOutputDim(
                self.0, x.0, w.0, &mut n, &mut c, &mut h, &mut wd,
            )
        }
        .result()
        .map_err(err("cudnnGetConvolution2dForwardOutputDim"))?;
        Ok([n, c, h, wd])
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created above, destroyed only here.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// One candidate of a `cudnnFindConvolution*AlgorithmEx` search, measured on the device: a
/// forward (`A = cudnnConvolutionFwdAlgo_t`), backward-data or backward-filter algorithm.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AlgoPerf<A> {
    pub algo: A,
    pub time_ms: f32,
    pub workspace: usize,
    pub deterministic: bool,
    pub math: sys::cudnnMathType_t,
}

/// One entry of a `cudnnFind*AlgorithmEx` result list (`cudnnConvolution{Fwd,BwdData,
/// BwdFilter}AlgoPerf_t`, one layout for all three) with its enum fields as the integers cuDNN
/// writes. Read through cudarc's Rust enums, a value missing from the headers cudarc was
/// generated from (a status code a newer cuDNN adds for a failed candidate) would be undefined
/// behaviour; as integers it is only a record that does not qualify.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RawAlgoPerf {
    pub algo: u32,
    pub status: u32,
    pub time: f32,
    pub memory: usize,
    pub determinism: u32,
    pub math_type: u32,
    pub reserved: [std::ffi::c_int; 3],
}

/// The math type of a result record, `None` for a value cudarc's headers do not list.
fn math_from_raw(raw: u32) -> Option<sys::cudnnMathType_t> {
    use sys::cudnnMathType_t::*;
    [
        CUDNN_DEFAULT_MATH,
        CUDNN_TENSOR_OP_MATH,
        CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        CUDNN_FMA_MATH,
    ]
    .into_iter()
    .find(|&math| math as u32 == raw)
}

/// The algorithms of one kind of convolution call and what the algorithm choice needs to
/// know about them.
pub(crate) trait ConvAlgorithm: Copy + std::fmt::Debug + PartialEq + 'static {
    /// cuDNN's result record for this kind of call (laid out as [`RawAlgoPerf`]).
    type Perf;
    /// Algorithms of this kind (the size of a full result list).
    const COUNT: usize;
    /// Every algorithm of this kind.
    const ALL: &'static [Self];
    /// Whether `fp32_gemm_only` may run it: GEMM-family and direct algorithms only; the
    /// transform-domain ones (FFT, Winograd) cost accuracy through their extra roundings
    /// (3.5e-3 of the largest output for the paper's conv2 on an H200).
    fn keeps_fp32_accuracy(self) -> bool;
    /// A successful record as an [`AlgoPerf`]; `None` for a failed one, or one holding an
    /// algorithm or math type this build does not know.
    fn from_record(p: &RawAlgoPerf) -> Option<AlgoPerf<Self>> {
        if p.status != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS as u32 {
            return None;
        }
        Some(AlgoPerf {
            algo: Self::ALL.iter().copied().find(|&a| a.raw() == p.algo)?,
            time_ms: p.time,
            workspace: p.memory,
            deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32,
            math: math_from_raw(p.math_type)?,
        })
    }
    /// The integer cuDNN uses for this algorithm.
    fn raw(self) -> u32;
}

macro_rules! conv_algorithm {
    ($algo:ty, $perf:ty, [$($any:ident),+ $(,)?], fp32: [$($fp32:ident),+ $(,)?]) => {
        impl ConvAlgorithm for $algo {
            type Perf = $perf;
            const ALL: &'static [Self] = &[$(<$algo>::$any),+];
            const COUNT: usize = Self::ALL.len();
            fn keeps_fp32_accuracy(self) -> bool {
                use $algo::*;
                matches!(self, $($fp32)|+)
            }
            fn raw(self) -> u32 {
                self as u32
            }
        }
    };
}

conv_algorithm!(
    sys::cudnnConvolutionFwdAlgo_t,
    sys::cudnnConvolutionFwdAlgoPerf_t,
    [
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ],
    fp32: [
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
    ]
);
conv_algorithm!(
    sys::cudnnConvolutionBwdDataAlgo_t,
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ],
    fp32: [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
    ]
);
conv_algorithm!(
    sys::cudnnConvolutionBwdFilterAlgo_t,
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ],
    fp32: [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
    ]
);

/// Which of `Find`'s candidates a convolution may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Allowed {
    /// True fp32 (`CUDNN_FMA_MATH`), only algorithms that keep fp32 accuracy
    /// ([`ConvAlgorithm::keeps_fp32_accuracy`]): `fp32_gemm_only`.
    Fp32GemmOnly,
    /// True fp32, any algorithm: FFT and Winograd too (PyTorch's fp32, TF32 off): the
    /// default for fp32.
    Fp32,
    /// Whatever cuDNN measured, tensor-op math included (TF32, fp16).
    Any,
}

impl Allowed {
    /// What a convolution computing with `math` may run: true fp32 (`CUDNN_FMA_MATH`) any
    /// algorithm without tensor ops, or only the GEMM family with `fp32_gemm_only`; TF32 and
    /// fp16 whatever cuDNN measured.
    pub fn new(math: sys::cudnnMathType_t, fp32_gemm_only: bool) -> Self {
        match (math == sys::cudnnMathType_t::CUDNN_FMA_MATH, fp32_gemm_only) {
            (false, _) => Allowed::Any,
            (true, true) => Allowed::Fp32GemmOnly,
            (true, false) => Allowed::Fp32,
        }
    }
}

/// Whether a deterministic candidate wins over a faster non-deterministic one. Forward
/// algorithms are all deterministic; the choice matters for the backward, whose fastest
/// algorithms often sum with atomics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Determinism {
    /// The fastest deterministic candidate; the fastest non-deterministic one only when none
    /// is deterministic (the crate's default: the same step gives the same weights).
    Preferred,
    /// The fastest candidate, deterministic or not (PyTorch with `cudnn.benchmark` on and
    /// `cudnn.deterministic` off, its default).
    Indifferent,
}

/// Whether a candidate was measured without tensor-op math (true fp32 arithmetic).
fn fma_math<A>(p: &AlgoPerf<A>) -> bool {
    matches!(
        p.math,
        sys::cudnnMathType_t::CUDNN_FMA_MATH | sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    )
}

/// The rules that rule `p` out, whatever its speed and determinism: none for a candidate that
/// qualifies. One list for [`ranked_candidates`] and for the reasons [`describe_choice`] gives.
fn ruled_out_by<A: ConvAlgorithm>(
    p: &AlgoPerf<A>,
    allowed: Allowed,
    max_workspace: usize,
) -> Vec<String> {
    let mut rules = Vec::new();
    if p.workspace > max_workspace {
        rules.push(format!(
            "needs {} bytes of workspace, over the {max_workspace}-byte cap",
            p.workspace
        ));
    }
    if p.math == sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION {
        // Converts fp32 data to fp16 inside the call: never asked for, whatever the precision.
        rules.push("tensor-op math converting to fp16 (ALLOW_CONVERSION)".to_string());
    }
    let true_fp32 = matches!(allowed, Allowed::Fp32GemmOnly | Allowed::Fp32);
    if true_fp32 && !fma_math(p) {
        rules.push("tensor-op math in true fp32".to_string());
    } else if allowed == Allowed::Fp32GemmOnly && !p.algo.keeps_fp32_accuracy() {
        rules.push("a transform (FFT/Winograd) with fp32_gemm_only".to_string());
    }
    rules
}

/// The candidates a convolution may run among `Find`'s successful ones (fastest first), in the
/// order they are preferred: by speed, deterministic ones first under
/// [`Determinism::Preferred`]. For true fp32 ([`Allowed::Fp32GemmOnly`], [`Allowed::Fp32`]) only
/// candidates measured without tensor-op math qualify, and for [`Allowed::Fp32GemmOnly`] only
/// the algorithms that keep fp32 accuracy. None whose measurement needed more than
/// `max_workspace` bytes qualifies.
pub(crate) fn ranked_candidates<A: ConvAlgorithm>(
    candidates: &[AlgoPerf<A>],
    allowed: Allowed,
    determinism: Determinism,
    max_workspace: usize,
) -> Vec<AlgoPerf<A>> {
    let qualifying = candidates
        .iter()
        .filter(|p| ruled_out_by(p, allowed, max_workspace).is_empty());
    match determinism {
        Determinism::Preferred => {
            let (mut ranked, rest): (Vec<_>, Vec<_>) = qualifying.partition(|p| p.deterministic);
            ranked.extend(rest);
            ranked
        }
        Determinism::Indifferent => qualifying.copied().collect(),
    }
}

/// The algorithm [`first_that_fits`] takes when every size query agrees with the
/// measurement: the first of [`ranked_candidates`].
#[cfg(test)]
pub(crate) fn choose_algorithm<A: ConvAlgorithm>(
    candidates: &[AlgoPerf<A>],
    allowed: Allowed,
    determinism: Determinism,
    max_workspace: usize,
) -> Option<AlgoPerf<A>> {
    ranked_candidates(candidates, allowed, determinism, max_workspace)
        .first()
        .copied()
}

/// Why [`first_that_fits`] passed over a candidate that `Find` measured within the cap.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PassedOverFor {
    /// cuDNN's size query for the call says it needs this many bytes, over the cap.
    Workspace(usize),
    /// cuDNN's size query failed for it (e.g. not supported with the math type it would run
    /// with): the error, as text.
    SizeQuery(String),
}

/// A better-ranked candidate [`first_that_fits`] did not take, and why.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PassedOver<A> {
    pub algo: A,
    pub math: sys::cudnnMathType_t,
    pub why: PassedOverFor,
}

/// The choice made after asking each ranked candidate's workspace.
#[derive(Clone, Debug)]
pub(crate) struct Fitted<A> {
    pub chosen: AlgoPerf<A>,
    /// What the chosen algorithm runs with: the larger of its measurement's and the size
    /// query's.
    pub workspace_bytes: usize,
    /// The better-ranked candidates passed over, and why.
    pub passed_over: Vec<PassedOver<A>>,
}

/// What [`first_that_fits`] found: a candidate, or none, with every one passed over.
#[derive(Clone, Debug)]
pub(crate) enum Fit<A> {
    Chosen(Fitted<A>),
    NoneFits(Vec<PassedOver<A>>),
}

/// The first of `ranked` (see [`ranked_candidates`]) whose workspace fits `max_workspace`,
/// asking `workspace_size` (cuDNN's `Get*WorkspaceSize` for the call) for each in turn: the
/// measurement's own figure is not the last word, and running an algorithm with more workspace
/// than the cap would silently break it. A candidate whose query fails is passed over like one
/// that does not fit (one unsupported pairing must not sink a layer another algorithm can
/// run); when every query failed, the first failure is the error returned (the device, not a
/// candidate, is wrong then).
pub(crate) fn first_that_fits<A: ConvAlgorithm>(
    ranked: &[AlgoPerf<A>],
    max_workspace: usize,
    mut workspace_size: impl FnMut(&AlgoPerf<A>) -> Result<usize>,
) -> Result<Fit<A>> {
    let mut passed_over = Vec::new();
    let mut first_error = None;
    for p in ranked {
        let why = match workspace_size(p) {
            Ok(queried) => {
                let bytes = queried.max(p.workspace);
                if bytes <= max_workspace {
                    return Ok(Fit::Chosen(Fitted {
                        chosen: *p,
                        workspace_bytes: bytes,
                        passed_over,
                    }));
                }
                PassedOverFor::Workspace(bytes)
            }
            Err(e) => {
                let why = PassedOverFor::SizeQuery(e.to_string());
                first_error.get_or_insert(e);
                why
            }
        };
        passed_over.push(PassedOver {
            algo: p.algo,
            math: p.math,
            why,
        });
    }
    let every_query_failed = passed_over
        .iter()
        .all(|p| matches!(p.why, PassedOverFor::SizeQuery(_)));
    match first_error {
        Some(e) if every_query_failed => Err(e),
        _ => Ok(Fit::NoneFits(passed_over)),
    }
}

/// The math type a convolution runs its chosen algorithm with: true fp32 (`CUDNN_FMA_MATH`)
/// keeps FMA whatever `Find` reports (an algorithm without a tensor-op version comes back as
/// `CUDNN_DEFAULT_MATH`, which on Ampere and newer would permit TF32); otherwise the math type
/// the winner was measured with, as cuDNN asks.
pub(crate) fn run_math(
    layer: sys::cudnnMathType_t,
    measured: sys::cudnnMathType_t,
) -> sys::cudnnMathType_t {
    match layer {
        sys::cudnnMathType_t::CUDNN_FMA_MATH => layer,
        _ => measured,
    }
}

/// What a choice cost, in cuDNN's own measurements: the chosen algorithm, what it is
/// (tensor-op math, a transform, non-deterministic) and its time; then the fastest candidate
/// measured if that is another one, with what passed it over (the rules of
/// [`ranked_candidates`], or [`first_that_fits`]'s size query); and how many candidates ran. One line for profiles and logs, e.g. `ALGO_1 3.210 ms;
/// fastest measured ALGO_0 1.100 ms, passed over: non-deterministic (deterministic
/// preferred); 4 candidates`.
pub(crate) fn describe_choice<A: ConvAlgorithm>(
    candidates: &[AlgoPerf<A>],
    chosen: &AlgoPerf<A>,
    allowed: Allowed,
    determinism: Determinism,
    max_workspace: usize,
    passed_over: &[PassedOver<A>],
) -> String {
    let mut traits = Vec::new();
    let default_math = chosen.math == sys::cudnnMathType_t::CUDNN_DEFAULT_MATH;
    if !fma_math(chosen) {
        traits.push("tensor-op math");
    } else if default_math && allowed == Allowed::Any {
        // Run as measured (see `run_math`): cuDNN's default math permits TF32 on Ampere+.
        traits.push("default math, tensor ops permitted");
    }
    if fma_math(chosen) && !chosen.algo.keeps_fp32_accuracy() {
        traits.push("transform");
    }
    if !chosen.deterministic {
        traits.push("non-deterministic");
    }
    let traits = match traits.is_empty() {
        true => String::new(),
        false => format!(" ({})", traits.join(", ")),
    };
    let fastest = candidates
        .iter()
        .min_by(|a, b| a.time_ms.total_cmp(&b.time_ms));
    let beaten_by = match fastest {
        Some(f) if (f.algo, f.math) != (chosen.algo, chosen.math) && f.time_ms < chosen.time_ms => {
            let mut rules = ruled_out_by(f, allowed, max_workspace);
            if let Some(o) = passed_over
                .iter()
                .find(|o| (o.algo, o.math) == (f.algo, f.math))
            {
                rules.push(match &o.why {
                    PassedOverFor::Workspace(bytes) => format!(
                        "cuDNN's size query says it needs {bytes} bytes of workspace, over the \
                         {max_workspace}-byte cap"
                    ),
                    PassedOverFor::SizeQuery(error) => {
                        format!("cuDNN's size query failed: {error}")
                    }
                });
            }
            if rules.is_empty() && !f.deterministic && determinism == Determinism::Preferred {
                rules.push("non-deterministic (deterministic preferred)".to_string());
            }
            if rules.is_empty() {
                // The fastest qualifying candidate that fits is taken: not reached.
                rules.push("no rule (measured slower when chosen?)".to_string());
            }
            format!(
                "; fastest measured {:?} {:.3} ms, passed over: {}",
                f.algo,
                f.time_ms,
                rules.join("; ")
            )
        }
        _ => "; the fastest measured".to_string(),
    };
    format!(
        "{:?} {:.3} ms{traits}{beaten_by}; {} candidates",
        chosen.algo,
        chosen.time_ms,
        candidates.len()
    )
}

/// The buffers a `Find` search measures on, in the order of the call's arguments: the two it
/// reads (forward: `x`, `w`; backward data: `w`, `dy`; backward filter: `x`, `dy`), the one it
/// writes (`y`, `dx`, `dw`: overwritten by the measurements), and the shared workspace.
pub(crate) struct FindBuffers {
    pub read: [*const c_void; 2],
    pub written: *mut c_void,
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
}

/// Twice the algorithm count: cuDNN may report an algorithm once with tensor-op math and once
/// without, and the true-fp32 rule needs the latter even when it is slow.
const fn requested(count: usize) -> usize {
    2 * count
}

/// The successful records among the first `returned` of `records`, as [`AlgoPerf`]s.
fn successes<A: ConvAlgorithm>(records: &[RawAlgoPerf], returned: i32) -> Vec<AlgoPerf<A>> {
    let returned = usize::try_from(returned).unwrap_or(0).min(records.len());
    records[..returned]
        .iter()
        .filter_map(A::from_record)
        .collect()
}

/// The three `cudnnFind*AlgorithmEx` calls differ only in the function, the kind of algorithm
/// and their descriptors (two read, one written, in the call's order); each is written once here.
macro_rules! find_algorithms {
    ($(#[$doc:meta])* $name:ident, $algo:ty, $find:ident,
     $read0:ident: $read0_desc:ty, $read1:ident: $read1_desc:ty, $written:ident: $written_desc:ty) => {
        $(#[$doc])*
        pub(crate) unsafe fn $name(
            handle: &CudnnHandle,
            $read0: &$read0_desc,
            $read1: &$read1_desc,
            conv: &ConvDesc,
            $written: &$written_desc,
            buffers: &FindBuffers,
        ) -> Result<Vec<AlgoPerf<$algo>>> {
            const REQUESTED: usize = requested(<$algo as ConvAlgorithm>::COUNT);
            let mut perf = [RawAlgoPerf::default(); REQUESTED];
            let mut returned: i32 = 0;
            // SAFETY: handle and descriptors are alive; the buffers are as the caller
            // guarantees; `perf` has room for REQUESTED entries of cuDNN's record layout
            // (`RawAlgoPerf` mirrors it field for field, checked by a unit test) and
            // `returned` is a valid out-pointer.
            unsafe {
                sys::$find(
                    handle.0,
                    $read0.0,
                    buffers.read[0],
                    $read1.0,
                    buffers.read[1],
                    conv.0,
                    $written.0,
                    buffers.written,
                    REQUESTED as i32,
                    &mut returned,
                    perf.as_mut_ptr().cast::<<$algo as ConvAlgorithm>::Perf>(),
                    buffers.workspace,
                    buffers.workspace_bytes,
                )
            }
            .result()
            .map_err(err(stringify!($find)))?;
            Ok(successes::<$algo>(&perf, returned))
        }
    };
}

find_algorithms!(
    /// Runs every forward algorithm that fits `buffers.workspace_bytes` once on the real
    /// buffers (`cudnnFindConvolutionForwardAlgorithmEx`: reads `x` and `w`, writes `y`) and
    /// returns the successful ones, fastest first.
    ///
    /// # Safety
    /// The pointers are device memory on the handle's device, matching the descriptors (the
    /// read ones readable, the written one and the workspace writable, the workspace
    /// `workspace_bytes` long), and no other work uses the written buffer or the workspace
    /// until the call returns (cuDNN synchronises it).
    find_forward_algorithms,
    sys::cudnnConvolutionFwdAlgo_t,
    cudnnFindConvolutionForwardAlgorithmEx,
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc
);

find_algorithms!(
    /// Runs every backward-data algorithm that fits once on the real buffers
    /// (`cudnnFindConvolutionBackwardDataAlgorithmEx`: reads `w` and `dy`, writes `dx`) and
    /// returns the successful ones, fastest first.
    ///
    /// # Safety
    /// As for [`find_forward_algorithms`].
    find_backward_data_algorithms,
    sys::cudnnConvolutionBwdDataAlgo_t,
    cudnnFindConvolutionBackwardDataAlgorithmEx,
    w: FilterDesc,
    dy: TensorDesc,
    dx: TensorDesc
);

find_algorithms!(
    /// Runs every backward-filter algorithm that fits once on the real buffers
    /// (`cudnnFindConvolutionBackwardFilterAlgorithmEx`: reads `x` and `dy`, writes `dw`) and
    /// returns the successful ones, fastest first.
    ///
    /// # Safety
    /// As for [`find_forward_algorithms`].
    find_backward_filter_algorithms,
    sys::cudnnConvolutionBwdFilterAlgo_t,
    cudnnFindConvolutionBackwardFilterAlgorithmEx,
    x: TensorDesc,
    dy: TensorDesc,
    dw: FilterDesc
);

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnConvolutionFwdAlgo_t::*;
    use sys::cudnnMathType_t::*;

    type FwdAlgoPerf = AlgoPerf<sys::cudnnConvolutionFwdAlgo_t>;

    fn perf(
        algo: sys::cudnnConvolutionFwdAlgo_t,
        math: sys::cudnnMathType_t,
        deterministic: bool,
    ) -> FwdAlgoPerf {
        FwdAlgoPerf {
            algo,
            time_ms: 1.0,
            workspace: 0,
            deterministic,
            math,
        }
    }

    /// The report names the choice and its time, and the faster candidate it passed over with
    /// the reason it was passed over.
    #[test]
    fn a_choice_is_described_beside_the_fastest_candidate() {
        let timed = |algo, math, deterministic, time_ms| FwdAlgoPerf {
            time_ms,
            ..perf(algo, math, deterministic)
        };
        let describe = |candidates: &[FwdAlgoPerf], allowed, determinism, cap| {
            let chosen = choose_algorithm(candidates, allowed, determinism, cap).unwrap();
            describe_choice(candidates, &chosen, allowed, determinism, cap, &[])
        };
        use Determinism::*;
        let candidates = [
            timed(CUDNN_CONVOLUTION_FWD_ALGO_FFT, CUDNN_FMA_MATH, true, 1.0),
            timed(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                CUDNN_TENSOR_OP_MATH,
                false,
                1.5,
            ),
            timed(CUDNN_CONVOLUTION_FWD_ALGO_GEMM, CUDNN_FMA_MATH, true, 4.0),
        ];
        assert_eq!(
            describe(&candidates, Allowed::Fp32GemmOnly, Preferred, usize::MAX),
            "CUDNN_CONVOLUTION_FWD_ALGO_GEMM 4.000 ms; fastest measured \
             CUDNN_CONVOLUTION_FWD_ALGO_FFT 1.000 ms, passed over: a transform (FFT/Winograd) \
             with fp32_gemm_only; 3 candidates"
        );
        // Where tensor ops are allowed only the deterministic-first rule passed it over.
        let any = &candidates[1..];
        assert_eq!(
            describe(any, Allowed::Any, Preferred, usize::MAX),
            "CUDNN_CONVOLUTION_FWD_ALGO_GEMM 4.000 ms; fastest measured \
             CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM 1.500 ms, passed over: \
             non-deterministic (deterministic preferred); 2 candidates"
        );
        assert_eq!(
            describe(any, Allowed::Any, Indifferent, usize::MAX),
            "CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM 1.500 ms (tensor-op math, \
             non-deterministic); the fastest measured; 2 candidates"
        );
        assert_eq!(
            describe(&candidates, Allowed::Fp32, Preferred, usize::MAX),
            "CUDNN_CONVOLUTION_FWD_ALGO_FFT 1.000 ms (transform); the fastest measured; \
             3 candidates"
        );
        // Tensor-op math in true fp32, and a workspace over the cap.
        assert_eq!(
            describe(any, Allowed::Fp32GemmOnly, Indifferent, usize::MAX),
            "CUDNN_CONVOLUTION_FWD_ALGO_GEMM 4.000 ms; fastest measured \
             CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM 1.500 ms, passed over: \
             tensor-op math in true fp32; 2 candidates"
        );
        let big_fft = [
            FwdAlgoPerf {
                workspace: 900 << 20,
                ..candidates[0]
            },
            candidates[2],
        ];
        assert_eq!(
            describe(&big_fft, Allowed::Fp32, Preferred, 512 << 20),
            "CUDNN_CONVOLUTION_FWD_ALGO_GEMM 4.000 ms; fastest measured \
             CUDNN_CONVOLUTION_FWD_ALGO_FFT 1.000 ms, passed over: needs 943718400 bytes of \
             workspace, over the 536870912-byte cap; 2 candidates"
        );
    }

    #[test]
    fn true_fp32_takes_no_tensor_op_algorithm_and_gemm_only_no_transform() {
        let fastest_first = [
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                CUDNN_FMA_MATH,
                true,
            ),
            perf(CUDNN_CONVOLUTION_FWD_ALGO_FFT, CUDNN_DEFAULT_MATH, true),
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                CUDNN_TENSOR_OP_MATH,
                true,
            ),
            perf(CUDNN_CONVOLUTION_FWD_ALGO_GEMM, CUDNN_FMA_MATH, false),
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                CUDNN_DEFAULT_MATH,
                true,
            ),
        ];
        let chosen = choose_algorithm(
            &fastest_first,
            Allowed::Fp32GemmOnly,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
        // Without the fp32 rule the fastest deterministic one wins.
        let chosen = choose_algorithm(
            &fastest_first,
            Allowed::Any,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED);
        // True fp32 (the default): the fastest without tensor ops, transforms included.
        let chosen = choose_algorithm(
            &fastest_first,
            Allowed::Fp32,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED);
        let chosen = choose_algorithm(
            &fastest_first[1..],
            Allowed::Fp32,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_FFT);
        let tensor_op_first = &fastest_first[2..];
        let chosen = choose_algorithm(
            tensor_op_first,
            Allowed::Fp32,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
        // No deterministic qualifier: the fastest that qualifies.
        let chosen = choose_algorithm(
            &fastest_first[..4],
            Allowed::Fp32GemmOnly,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_GEMM);
        assert!(choose_algorithm(
            &fastest_first[..3],
            Allowed::Fp32GemmOnly,
            Determinism::Preferred,
            usize::MAX
        )
        .is_none());
    }

    /// fp32 as a convolution gets it by default takes a transform when cuDNN measured one
    /// fastest, as PyTorch's fp32 does; with `fp32_gemm_only` it keeps to the GEMM family; with
    /// tensor-op math (TF32, fp16) anything goes.
    #[test]
    fn default_fp32_takes_a_transform_and_gemm_only_does_not() {
        use crate::cuda::{ConvOptions, Layout};
        let default = ConvOptions::new(1, 1, Layout::Nchw);
        let fastest_first = [
            perf(CUDNN_CONVOLUTION_FWD_ALGO_FFT, CUDNN_FMA_MATH, true),
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                CUDNN_TENSOR_OP_MATH,
                true,
            ),
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                CUDNN_FMA_MATH,
                true,
            ),
        ];
        let pick = |math, gemm_only| {
            choose_algorithm(
                &fastest_first,
                Allowed::new(math, gemm_only),
                Determinism::Preferred,
                usize::MAX,
            )
            .map(|p| p.algo)
        };
        assert_eq!(
            pick(CUDNN_FMA_MATH, default.fp32_gemm_only),
            Some(CUDNN_CONVOLUTION_FWD_ALGO_FFT)
        );
        assert_eq!(
            pick(CUDNN_FMA_MATH, true),
            Some(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM)
        );
        assert_eq!(
            Allowed::new(CUDNN_TENSOR_OP_MATH, default.fp32_gemm_only),
            Allowed::Any
        );
        assert_eq!(
            Allowed::new(CUDNN_DEFAULT_MATH, default.fp32_gemm_only),
            Allowed::Any
        );
    }

    /// The cap on the shared workspace is a hard limit: a faster algorithm needing more loses
    /// to a slower one that fits, and nothing fits below every candidate's need.
    #[test]
    fn no_algorithm_needing_more_than_the_cap_is_chosen() {
        let with_workspace = |algo, workspace| FwdAlgoPerf {
            workspace,
            ..perf(algo, CUDNN_DEFAULT_MATH, true)
        };
        let fastest_first = [
            with_workspace(CUDNN_CONVOLUTION_FWD_ALGO_FFT, 900 << 20),
            with_workspace(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, 4 << 20),
            with_workspace(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, 0),
        ];
        let pick = |cap| {
            choose_algorithm(&fastest_first, Allowed::Any, Determinism::Preferred, cap)
                .map(|p| p.algo)
        };
        assert_eq!(pick(1 << 30), Some(CUDNN_CONVOLUTION_FWD_ALGO_FFT));
        assert_eq!(pick(900 << 20), Some(CUDNN_CONVOLUTION_FWD_ALGO_FFT));
        assert_eq!(
            pick(512 << 20),
            Some(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM)
        );
        assert_eq!(pick(0), Some(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM));
        assert!(choose_algorithm(
            &fastest_first[..2],
            Allowed::Any,
            Determinism::Preferred,
            (4 << 20) - 1
        )
        .is_none());
    }

    /// Indifferent to determinism, the fastest candidate that qualifies wins, deterministic or
    /// not; the fp32, tensor-op and workspace rules hold as before.
    #[test]
    fn indifference_to_determinism_takes_the_fastest_that_qualifies() {
        use sys::cudnnConvolutionBwdFilterAlgo_t::*;
        use Allowed::*;
        use Determinism::*;
        let filter = |algo, math, deterministic, workspace| AlgoPerf {
            algo,
            time_ms: 1.0,
            workspace,
            deterministic,
            math,
        };
        let fastest_first = [
            filter(
                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                CUDNN_TENSOR_OP_MATH,
                false,
                0,
            ),
            filter(
                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                CUDNN_FMA_MATH,
                true,
                0,
            ),
            filter(
                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
                CUDNN_FMA_MATH,
                false,
                64 << 20,
            ),
            filter(
                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                CUDNN_FMA_MATH,
                false,
                0,
            ),
            filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, CUDNN_FMA_MATH, true, 0),
        ];
        let pick = |allowed, determinism, cap| {
            choose_algorithm(&fastest_first, allowed, determinism, cap).map(|p| (p.algo, p.math))
        };
        let fma = |algo| Some((algo, CUDNN_FMA_MATH));
        assert_eq!(
            pick(Fp32GemmOnly, Preferred, usize::MAX),
            fma(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1)
        );
        assert_eq!(
            pick(Fp32GemmOnly, Indifferent, usize::MAX),
            fma(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3)
        );
        assert_eq!(
            pick(Fp32GemmOnly, Indifferent, 1 << 20),
            fma(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0),
            "the workspace cap still holds"
        );
        for determinism in [Preferred, Indifferent] {
            assert_eq!(
                pick(Fp32, determinism, usize::MAX),
                fma(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT)
            );
        }
        assert_eq!(
            pick(Any, Preferred, usize::MAX),
            fma(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT)
        );
        assert_eq!(
            pick(Any, Indifferent, usize::MAX),
            Some((CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, CUDNN_TENSOR_OP_MATH))
        );
    }

    /// The backward kinds follow the same rules: no transform-domain algorithm for GEMM-only
    /// fp32, deterministic ones first.
    #[test]
    fn backward_choices_follow_the_same_rules() {
        use sys::cudnnConvolutionBwdDataAlgo_t::*;
        use sys::cudnnConvolutionBwdFilterAlgo_t::*;
        let data = |algo, deterministic| AlgoPerf {
            algo,
            time_ms: 1.0,
            workspace: 0,
            deterministic,
            math: CUDNN_DEFAULT_MATH,
        };
        let fastest_first = [
            data(CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED, true),
            data(CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, false),
            data(CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, true),
        ];
        let pick = |allowed| {
            choose_algorithm(&fastest_first, allowed, Determinism::Preferred, usize::MAX)
                .map(|p| p.algo)
        };
        assert_eq!(
            pick(Allowed::Fp32GemmOnly),
            Some(CUDNN_CONVOLUTION_BWD_DATA_ALGO_1)
        );
        for allowed in [Allowed::Fp32, Allowed::Any] {
            assert_eq!(
                pick(allowed),
                Some(CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED)
            );
        }
        let filter = |algo, deterministic| AlgoPerf {
            algo,
            time_ms: 1.0,
            workspace: 0,
            deterministic,
            math: CUDNN_FMA_MATH,
        };
        let fastest_first = [
            filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT, true),
            filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, false),
            filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, false),
        ];
        let chosen = choose_algorithm(
            &fastest_first,
            Allowed::Fp32GemmOnly,
            Determinism::Preferred,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(chosen.algo, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3);
        assert!(choose_algorithm(
            &fastest_first[..1],
            Allowed::Fp32GemmOnly,
            Determinism::Preferred,
            usize::MAX
        )
        .is_none());
    }

    /// Deterministic candidates first (each group by speed) when preferred; by speed alone
    /// otherwise; candidates that do not qualify are left out of both.
    #[test]
    fn candidates_are_ranked_deterministic_first_when_preferred() {
        let fastest_first = [
            perf(CUDNN_CONVOLUTION_FWD_ALGO_FFT, CUDNN_FMA_MATH, false),
            perf(CUDNN_CONVOLUTION_FWD_ALGO_GEMM, CUDNN_TENSOR_OP_MATH, true),
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                CUDNN_FMA_MATH,
                true,
            ),
            perf(CUDNN_CONVOLUTION_FWD_ALGO_DIRECT, CUDNN_FMA_MATH, false),
        ];
        let order = |allowed, determinism| {
            ranked_candidates(&fastest_first, allowed, determinism, usize::MAX)
                .iter()
                .map(|p| p.algo)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            order(Allowed::Fp32, Determinism::Preferred),
            [
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            ]
        );
        assert_eq!(
            order(Allowed::Any, Determinism::Indifferent),
            fastest_first.map(|p| p.algo)
        );
    }

    /// cuDNN's size query for the call, not only the measurement's figure, decides whether a
    /// candidate fits the cap: a faster one whose query says more than the cap is passed over
    /// (and said so), the one chosen runs with the larger of the two figures.
    #[test]
    fn a_candidate_whose_queried_workspace_is_over_the_cap_is_passed_over() {
        let measured = |algo, workspace, time_ms| FwdAlgoPerf {
            workspace,
            time_ms,
            ..perf(algo, CUDNN_FMA_MATH, true)
        };
        let fastest_first = [
            measured(CUDNN_CONVOLUTION_FWD_ALGO_FFT, 100 << 20, 1.0),
            measured(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                8 << 20,
                2.0,
            ),
            measured(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, 0, 3.0),
        ];
        let cap = 512 << 20;
        // The FFT's query says more than its measurement, over the cap; the GEMM's says less
        // than its measurement.
        let queried = |p: &FwdAlgoPerf| {
            Ok(match p.algo {
                CUDNN_CONVOLUTION_FWD_ALGO_FFT => 600 << 20,
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => 4 << 20,
                _ => 0,
            })
        };
        let ranked = ranked_candidates(&fastest_first, Allowed::Fp32, Determinism::Preferred, cap);
        let Fit::Chosen(fitted) = first_that_fits(&ranked, cap, queried).unwrap() else {
            panic!("a candidate fits");
        };
        assert_eq!(
            fitted.chosen.algo,
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        );
        assert_eq!(fitted.workspace_bytes, 8 << 20);
        assert_eq!(
            fitted.passed_over,
            [PassedOver {
                algo: CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                math: CUDNN_FMA_MATH,
                why: PassedOverFor::Workspace(600 << 20)
            }]
        );
        assert_eq!(
            describe_choice(
                &fastest_first,
                &fitted.chosen,
                Allowed::Fp32,
                Determinism::Preferred,
                cap,
                &fitted.passed_over
            ),
            "CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM 2.000 ms; fastest measured \
             CUDNN_CONVOLUTION_FWD_ALGO_FFT 1.000 ms, passed over: cuDNN's size query says it \
             needs 629145600 bytes of workspace, over the 536870912-byte cap; 3 candidates"
        );
        // Nothing fits: no choice, and every candidate said why.
        let Fit::NoneFits(passed_over) = first_that_fits(&ranked, 0, |_| Ok(1)).unwrap() else {
            panic!("nothing fits a 0-byte cap");
        };
        assert_eq!(passed_over.len(), ranked.len());
    }

    /// A candidate whose size query fails (cuDNN: not supported with that math type) is passed
    /// over like one that does not fit, and the choice says so; when every query fails, the
    /// first failure is the error (the device is wrong, not a candidate).
    #[test]
    fn a_candidate_whose_size_query_fails_is_passed_over() {
        let fastest_first = [
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                CUDNN_FMA_MATH,
                true,
            ),
            FwdAlgoPerf {
                time_ms: 2.0,
                ..perf(
                    CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                    CUDNN_FMA_MATH,
                    true,
                )
            },
        ];
        let cap = 64 << 20;
        let ranked = ranked_candidates(&fastest_first, Allowed::Any, Determinism::Preferred, cap);
        let queried = |p: &FwdAlgoPerf| match p.algo {
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => {
                Err(Error::invalid("size query", "not supported"))
            }
            _ => Ok(0),
        };
        let Fit::Chosen(fitted) = first_that_fits(&ranked, cap, queried).unwrap() else {
            panic!("the GEMM fits");
        };
        assert_eq!(fitted.chosen.algo, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
        assert!(matches!(
            &fitted.passed_over[..],
            [PassedOver {
                algo: CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                why: PassedOverFor::SizeQuery(error),
                ..
            }] if error.contains("not supported")
        ));
        let line = describe_choice(
            &fastest_first,
            &fitted.chosen,
            Allowed::Any,
            Determinism::Preferred,
            cap,
            &fitted.passed_over,
        );
        assert!(
            line.contains("passed over: cuDNN's size query failed:")
                && line.contains("not supported"),
            "{line}"
        );
        let failed = first_that_fits(&ranked, cap, |_| Err(Error::invalid("query", "failed")));
        assert!(matches!(failed, Err(e) if e.to_string().contains("failed")));
    }

    /// True fp32 keeps FMA math whatever `Find` reports (default math would permit TF32 on
    /// Ampere and newer); TF32 and fp16 layers run the math type measured.
    #[test]
    fn true_fp32_runs_fma_math_whatever_find_reports() {
        for measured in [CUDNN_DEFAULT_MATH, CUDNN_TENSOR_OP_MATH, CUDNN_FMA_MATH] {
            assert_eq!(run_math(CUDNN_FMA_MATH, measured), CUDNN_FMA_MATH);
            assert_eq!(run_math(CUDNN_DEFAULT_MATH, measured), measured);
            assert_eq!(run_math(CUDNN_TENSOR_OP_MATH, measured), measured);
        }
    }

    /// A default-math winner where tensor ops are allowed is said to permit them.
    #[test]
    fn a_default_math_choice_says_tensor_ops_are_permitted_where_allowed() {
        let candidates = [perf(
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            CUDNN_DEFAULT_MATH,
            true,
        )];
        let describe = |allowed| {
            describe_choice(
                &candidates,
                &candidates[0],
                allowed,
                Determinism::Preferred,
                usize::MAX,
                &[],
            )
        };
        assert_eq!(
            describe(Allowed::Any),
            "CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM 1.000 ms (default math, tensor ops \
             permitted); the fastest measured; 1 candidates"
        );
        assert_eq!(
            describe(Allowed::Fp32),
            "CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM 1.000 ms; the fastest measured; \
             1 candidates"
        );
    }

    /// A candidate measured with ALLOW_CONVERSION (fp32 data computed in fp16) never
    /// qualifies, at any precision, while the same algorithm measured with tensor-op math does.
    #[test]
    fn a_candidate_converting_to_fp16_is_never_chosen() {
        let fastest_first = [
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
                true,
            ),
            perf(
                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                CUDNN_TENSOR_OP_MATH,
                true,
            ),
        ];
        for determinism in [Determinism::Preferred, Determinism::Indifferent] {
            let ranked = ranked_candidates(&fastest_first, Allowed::Any, determinism, usize::MAX);
            assert_eq!(
                ranked.iter().map(|p| p.math).collect::<Vec<_>>(),
                [CUDNN_TENSOR_OP_MATH],
                "{determinism:?}"
            );
        }
        assert_eq!(
            ruled_out_by(&fastest_first[0], Allowed::Any, usize::MAX),
            ["tensor-op math converting to fp16 (ALLOW_CONVERSION)"]
        );
    }

    /// `RawAlgoPerf` is cuDNN's record for all three kinds of call, field for field: `Find`
    /// writes up to REQUESTED of them into an array of it.
    #[test]
    fn the_raw_record_has_the_layout_of_cudnns_three_records() {
        use std::mem::{align_of, offset_of, size_of};
        macro_rules! same_layout {
            ($perf:ty) => {
                assert_eq!(size_of::<RawAlgoPerf>(), size_of::<$perf>());
                assert_eq!(align_of::<RawAlgoPerf>(), align_of::<$perf>());
                assert_eq!(offset_of!(RawAlgoPerf, algo), offset_of!($perf, algo));
                assert_eq!(offset_of!(RawAlgoPerf, status), offset_of!($perf, status));
                assert_eq!(offset_of!(RawAlgoPerf, time), offset_of!($perf, time));
                assert_eq!(offset_of!(RawAlgoPerf, memory), offset_of!($perf, memory));
                assert_eq!(
                    offset_of!(RawAlgoPerf, determinism),
                    offset_of!($perf, determinism)
                );
                assert_eq!(
                    offset_of!(RawAlgoPerf, math_type),
                    offset_of!($perf, mathType)
                );
                assert_eq!(
                    offset_of!(RawAlgoPerf, reserved),
                    offset_of!($perf, reserved)
                );
            };
        }
        same_layout!(sys::cudnnConvolutionFwdAlgoPerf_t);
        same_layout!(sys::cudnnConvolutionBwdDataAlgoPerf_t);
        same_layout!(sys::cudnnConvolutionBwdFilterAlgoPerf_t);
    }

    /// Each kind lists all its algorithms, with cuDNN's numbers 0..COUNT (COUNT sizes the
    /// result list).
    #[test]
    fn every_algorithm_of_each_kind_is_listed() {
        fn numbers<A: ConvAlgorithm>() -> Vec<u32> {
            A::ALL.iter().map(|a| a.raw()).collect()
        }
        use sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as DATA;
        use sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as FILTER;
        assert_eq!(
            numbers::<sys::cudnnConvolutionFwdAlgo_t>(),
            (0..CUDNN_CONVOLUTION_FWD_ALGO_COUNT as u32).collect::<Vec<_>>()
        );
        assert_eq!(
            numbers::<sys::cudnnConvolutionBwdDataAlgo_t>(),
            (0..DATA as u32).collect::<Vec<_>>()
        );
        assert_eq!(
            numbers::<sys::cudnnConvolutionBwdFilterAlgo_t>(),
            (0..FILTER as u32).collect::<Vec<_>>()
        );
    }

    /// Records as cuDNN writes them: a success becomes a candidate with its figures; a failed
    /// one, and one holding a status, algorithm or math type this build does not know, does
    /// not (no undefined enum value is ever made).
    #[test]
    fn only_successful_records_of_known_values_become_candidates() {
        let record = RawAlgoPerf {
            algo: CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD as u32,
            status: 0,
            time: 0.25,
            memory: 4096,
            determinism: sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32,
            math_type: CUDNN_FMA_MATH as u32,
            reserved: [0; 3],
        };
        let records = [
            record,
            RawAlgoPerf {
                status: sys::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM as u32,
                ..record
            },
            RawAlgoPerf {
                status: 987_654,
                ..record
            },
            RawAlgoPerf { algo: 8, ..record },
            RawAlgoPerf {
                math_type: 4,
                ..record
            },
            RawAlgoPerf {
                determinism: 0,
                math_type: CUDNN_TENSOR_OP_MATH as u32,
                ..record
            },
        ];
        let found = successes::<sys::cudnnConvolutionFwdAlgo_t>(&records, records.len() as i32);
        let seen: Vec<_> = found
            .iter()
            .map(|p| (p.algo, p.time_ms, p.workspace, p.deterministic, p.math))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                    0.25,
                    4096,
                    true,
                    CUDNN_FMA_MATH
                ),
                (
                    CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                    0.25,
                    4096,
                    false,
                    CUDNN_TENSOR_OP_MATH
                ),
            ]
        );
        // Only the first `returned` are read.
        assert_eq!(
            successes::<sys::cudnnConvolutionFwdAlgo_t>(&records, 0).len(),
            0
        );
    }
}
