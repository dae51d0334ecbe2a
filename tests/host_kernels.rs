//! Every CUDA kernel's own source, compiled as host C++ (`kernels/alexnet_host.h`, built by the
//! `alexnet-host-kernels` dev-dependency), run on the CPU against the CPU backend: the kernels'
//! arithmetic and indexing executed on every CI run, without a GPU. Each kernel gets exactly the
//! parameter struct and launch shape its Rust launcher builds (`cuda::kernel_args` and the layers'
//! `args` methods), and then a small grid of odd-sized blocks too, so grid-stride loops wrap.
//! Outputs are poisoned (all bits set: NaN) before every launch, so an unwritten element shows.
//! Every buffer runs between guards that catch reads and writes outside it, and every launch
//! runs twice, the first time with 64-bit indices (the path a GPU takes only past 2^31
//! elements): both must write the same bits.
//!
//! Shapes are chosen to break indexing: channel edges for LRN, ragged and gapped pooling
//! windows, batch 1 and 3, sizes that are not multiples of the block, NHWC and NCHW, top-k ties
//! and NaN. What this does not prove: speed, and the GPU memory model.
//!
//! Needs a C++20 compiler (g++ or clang++): without one these tests are ignored with that reason,
//! and with `ALEXNET_REQUIRE_CUDA_TOOLS=1` (tools/test.sh, CI) they fail instead.

#![cfg(feature = "cuda")]

mod common;

use std::ffi::c_void;

use alexnet_cuda::config::{DropoutMode, LrnParams, PoolSpec};
use alexnet_cuda::cpu::{
    bias_act_inplace, relu_backward, relu_inplace, softmax_cross_entropy, Conv2d, Dropout,
    InputGradient, Linear, Lrn, MaxPool2d,
};
use alexnet_cuda::cuda::abi::{
    AlexnetDropoutParams, AlexnetStepSettings, ALEXNET_BIAS_COLUMNS_BLOCK,
    ALEXNET_BIAS_COLUMNS_TILE, ALEXNET_BIAS_GRAD_BLOCK, ALEXNET_BIAS_PARTIALS,
    ALEXNET_SGD_COPY_BF16, ALEXNET_SGD_COPY_F16, ALEXNET_SGD_SEGMENTS, ALEXNET_SOFTMAX_BLOCK,
    ALEXNET_TOPK_MAX,
};
use alexnet_cuda::cuda::kernel_args::{
    bias_act_args, bias_grad_args, bias_grad_columns_args, convert_args, grad_unscale_args,
    relayout_args, relu_backward_args, sgd_args, softmax_top_k_args, softmax_xent_args,
    step_settings_args, KernelElem,
};
use alexnet_cuda::cuda::registry::{kernel as registry_kernel, Param, Pointee, KERNELS};
use alexnet_cuda::cuda::{
    ConvEpilogueGpu, DropoutGpu, Layout, LrnGpu, MaxPoolGpu, PrepareInput, SgdSegment,
};
use alexnet_cuda::image::{Preprocess, U8Batch};
use alexnet_cuda::postprocess::{softmax, top_k};
use alexnet_cuda::train::{unscale_gradients, Sgd, SgdConfig, UpdateRule};
use alexnet_host_kernels::Indices;
use common::formula_values;
use cudarc::driver::LaunchConfig;
use half::{bf16, f16};
use ndarray::{Array, Array2, Array4, ArrayD, Dimension, IxDyn, ShapeBuilder};

/// The kernels these tests run; a kernel added to the registry must be added here with its test.
const COVERED: &[&str] = &[
    "prepare_input_f32",
    "prepare_input_f16",
    "prepare_input_bf16",
    "relayout_f32_to_f32",
    "relayout_f32_to_f16",
    "relayout_f32_to_bf16",
    "bias_act_f32",
    "bias_act_f16",
    "bias_act_bf16",
    "dropout_f32",
    "dropout_f16",
    "dropout_bf16",
    "convert_f16_to_f32",
    "convert_f32_to_f16",
    "convert_bf16_to_f32",
    "convert_f32_to_bf16",
    "lrn_f32",
    "lrn_f16",
    "lrn_bf16",
    "maxpool_f32",
    "maxpool_f16",
    "maxpool_bf16",
    "conv_epilogue_f32",
    "conv_epilogue_f16",
    "conv_epilogue_bf16",
    "softmax_topk_f32",
    "softmax_topk_f16",
    "softmax_topk_bf16",
    "maxpool_backward_f32",
    "maxpool_backward_f16",
    "maxpool_backward_bf16",
    "lrn_backward_f32",
    "lrn_backward_f16",
    "lrn_backward_bf16",
    "relu_backward_f32",
    "relu_backward_f16",
    "relu_backward_bf16",
    "softmax_xent_f32",
    "sgd_f32",
    "bias_grad_f32",
    "bias_grad_f16",
    "bias_grad_bf16",
    "bias_grad_columns_f32",
    "bias_grad_columns_f16",
    "bias_grad_columns_bf16",
    "bias_grad_finish_f32",
    "grad_unscale_f32",
    "grad_unscale_f16",
    "grad_unscale_bf16",
];

fn require_host_kernels() {
    if let Some(why) = alexnet_host_kernels::unavailable() {
        panic!("the host-compiled kernels are not available: {why}");
    }
}

// --- buffers and launches ------------------------------------------------------------------

/// A storage type the kernels read and write: f32, or f16 or bf16 bits.
trait Elem: Copy + std::fmt::Debug + KernelElem {
    const SUFFIX: &'static str;
    /// All bits set: NaN in every type.
    const POISON: Self;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const POISON: Self = f32::from_bits(u32::MAX);
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    const SUFFIX: &'static str = "f16";
    const POISON: Self = f16::from_bits(u16::MAX);
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Elem for bf16 {
    const SUFFIX: &'static str = "bf16";
    const POISON: Self = bf16::from_bits(u16::MAX);
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// One kernel argument as cuLaunchKernel takes it: a pointer to the value passed.
enum Arg<'a> {
    /// A device buffer of `bytes` bytes of `Pointee` values: the kernel receives its address,
    /// and must stay inside.
    Buffer(
        *mut c_void,
        usize,
        Pointee,
        std::marker::PhantomData<&'a mut ()>,
    ),
    /// A parameter struct passed by value: its address, C name and size.
    Params(*mut c_void, &'static str, usize),
}

fn buf<T: KernelElem>(data: &mut [T]) -> Arg<'_> {
    Arg::Buffer(
        data.as_mut_ptr().cast(),
        std::mem::size_of_val(data),
        T::POINTEE,
        std::marker::PhantomData,
    )
}

fn null<'a, T: KernelElem>() -> Arg<'a> {
    Arg::Buffer(
        std::ptr::null_mut(),
        0,
        T::POINTEE,
        std::marker::PhantomData,
    )
}

/// Bytes of guard before and after each buffer while a kernel runs.
const GUARD_BYTES: usize = 256;
/// The guard, repeated: as an f32 a signalling NaN (0x7fa5a5a5), so a read outside a buffer
/// shows in the results, and arithmetic on it writes a quiet NaN, another pattern, so a
/// result written outside a buffer shows in the guard even where it came from one.
const GUARD: [u8; 4] = 0x7fa5_a5a5_u32.to_le_bytes();

/// A copy of one test buffer between guards, where the kernel works while it runs: what it
/// writes outside the buffer lands in a guard, which [`Guarded::finish`] checks.
struct Guarded {
    /// 16-byte words, so the copy is aligned for any element type.
    words: Vec<u128>,
    original: *mut c_void,
    bytes: usize,
}

impl Guarded {
    fn new(original: *mut c_void, bytes: usize) -> Self {
        let words = (2 * GUARD_BYTES + bytes).div_ceil(16);
        let word = u128::from_le_bytes(std::array::from_fn(|i| GUARD[i % 4]));
        let mut guarded = Guarded {
            words: vec![word; words],
            original,
            bytes,
        };
        // SAFETY: `original` holds `bytes` bytes (from `buf`, a live slice); the copy has room
        // for them after the leading guard, and the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                original.cast::<u8>(),
                guarded.start().cast::<u8>(),
                bytes,
            );
        }
        guarded
    }

    /// Where the buffer's copy starts: what the kernel is given.
    fn start(&mut self) -> *mut c_void {
        // SAFETY: GUARD_BYTES is inside the allocation (it is at least 2 * GUARD_BYTES long).
        unsafe { self.words.as_mut_ptr().cast::<u8>().add(GUARD_BYTES).cast() }
    }

    /// Copies the kernel's result back into the test's buffer; an error naming how many
    /// guard bytes before and after it the kernel changed.
    fn finish(mut self) -> Result<(), String> {
        let start = self.start();
        // SAFETY: the reverse of the copy in `new`: `bytes` bytes, both live, not overlapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                start.cast::<u8>(),
                self.original.cast::<u8>(),
                self.bytes,
            );
        }
        self.check_guards()
    }

    /// The guards and the buffer's copy, as bytes.
    fn all_bytes(&self) -> &[u8] {
        // SAFETY: the words are plain bytes; the slice covers exactly their allocation.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.words.len() * 16)
        }
    }

    /// An error naming how many guard bytes before and after the buffer were changed.
    fn check_guards(&self) -> Result<(), String> {
        let all = self.all_bytes();
        // Guard bytes that differ from the pattern at their offset.
        let changed =
            |range: std::ops::Range<usize>| range.filter(|&at| all[at] != GUARD[at % 4]).count();
        let (before, after) = (
            changed(0..GUARD_BYTES),
            changed(GUARD_BYTES + self.bytes..all.len()),
        );
        if before + after > 0 {
            return Err(format!(
                "wrote outside a {}-byte buffer: {before} guard bytes before it and {after} \
                 after it changed",
                self.bytes
            ));
        }
        Ok(())
    }
}

fn params<P>(p: &mut P) -> Arg<'_> {
    // The struct's C name is its Rust name (src/cuda/abi.rs is bindgen's output).
    let path = std::any::type_name::<P>();
    let name = path.rsplit("::").next().unwrap_or(path);
    Arg::Params((p as *mut P).cast(), name, std::mem::size_of::<P>())
}

/// `args` against the registry entry `name` (src/cuda/registry.rs), as every launcher's are
/// (`Launch`): the same count, each buffer's element type, each struct's name and size. The
/// registry is checked against the kernels' C signatures by `tests/kernel_signatures.rs`, so a
/// test passing a wrong buffer to the host-compiled kernel (which takes `void **` and cannot
/// tell) fails here.
fn check_against_registry(name: &str, args: &[Arg<'_>]) -> Result<(), String> {
    let Some(spec) = registry_kernel(name) else {
        // The emulation's own deliberately wrong kernels (host-kernels/checks/) are never
        // built for a GPU and have no entry.
        return match name.starts_with("check_") {
            true => Ok(()),
            false => Err(format!("{name} is not in the registry")),
        };
    };
    let passed: Vec<Param> = args
        .iter()
        .map(|a| match *a {
            Arg::Buffer(_, _, pointee, _) => Param::Ptr(pointee),
            Arg::Params(_, name, size) => Param::Struct(name, size),
        })
        .collect();
    let declared: Vec<Param> = spec.params.iter().map(|p| p.resolved(spec.dtype)).collect();
    if passed == declared {
        Ok(())
    } else {
        Err(format!(
            "{name}: the test passes {passed:?}, src/cuda/registry.rs declares {declared:?}"
        ))
    }
}

/// Runs `name` with `args` over the launcher's grid and block.
fn launch(name: &str, cfg: LaunchConfig, args: Vec<Arg<'_>>) {
    launch_grid(name, cfg.grid_dim.0, cfg.block_dim.0, args)
}

fn launch_grid(name: &str, grid: u32, block: u32, args: Vec<Arg<'_>>) {
    try_launch_grid(name, grid, block, args, &mut []).unwrap_or_else(|e| panic!("{e}"));
}

/// [`launch`] for a kernel that also reaches buffers through its parameters (SGD's per-tensor
/// weights): `reached` are guarded copies the caller made, put in the parameters, and checks
/// and copies back itself after the launch.
fn launch_reaching(name: &str, cfg: LaunchConfig, args: Vec<Arg<'_>>, reached: &mut [Guarded]) {
    try_launch_grid(name, cfg.grid_dim.0, cfg.block_dim.0, args, reached)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// [`launch_grid`], with a refused launch, a misuse of barriers or shuffles, or a write
/// outside a buffer as an error. `reached`: as for [`launch_reaching`].
fn try_launch_grid(
    name: &str,
    grid: u32,
    block: u32,
    args: Vec<Arg<'_>>,
    reached: &mut [Guarded],
) -> Result<(), String> {
    check_against_registry(name, &args)?;
    // Each buffer runs as a guarded copy (one per distinct buffer: an argument passed twice,
    // as an in-place launch does, is one copy).
    let mut copies: Vec<Guarded> = Vec::new();
    let mut addresses: Vec<*mut c_void> = args
        .iter()
        .map(|a| match *a {
            Arg::Buffer(ptr, _, _, _) if ptr.is_null() => ptr,
            Arg::Buffer(ptr, bytes, _, _) => {
                // Separate copies of overlapping buffers would no longer alias: only the very
                // same buffer may come twice.
                let start = ptr as usize;
                let overlaps = |c: &Guarded| {
                    let other = c.original as usize;
                    start < other + c.bytes && other < start + bytes
                };
                assert!(
                    copies
                        .iter()
                        .all(|c| !overlaps(c) || (c.original == ptr && c.bytes == bytes)),
                    "{name}: two buffer arguments overlap without being the same buffer"
                );
                let at = match copies.iter().position(|c| c.original == ptr) {
                    Some(at) => at,
                    None => {
                        copies.push(Guarded::new(ptr, bytes));
                        copies.len() - 1
                    }
                };
                copies[at].start()
            }
            Arg::Params(..) => std::ptr::null_mut(),
        })
        .collect();
    // The addresses live here while the kernel runs; each argument slot points at one of them
    // (buffers) or at the caller's struct (parameters).
    let mut slots: Vec<*mut c_void> = args
        .iter()
        .zip(addresses.iter_mut())
        .map(|(a, address)| match a {
            Arg::Buffer(..) => (address as *mut *mut c_void).cast(),
            Arg::Params(p, _, _) => *p,
        })
        .collect();
    // Every launch runs twice from the same inputs: first with 64-bit indices (the path a GPU
    // takes only past 2^31 elements, which no test tensor reaches), then as on the GPU; the
    // two must write the same bits, and the second run's results are the test's.
    let words = |copies: &[Guarded], reached: &[Guarded]| -> Vec<Vec<u128>> {
        copies
            .iter()
            .chain(reached)
            .map(|c| c.words.clone())
            .collect()
    };
    let inputs = words(&copies, reached);
    let mut run = |indices| {
        // SAFETY: every slot points to a live value of the kernel's parameter type, in order
        // (the structs come from the same builders the Rust launchers use), and every buffer
        // is sized by the test for what the kernel touches with these parameters (a stray
        // write lands in a guard, checked after each run). Restoring a copy's words between
        // the runs keeps their allocation, so the addresses in `slots` stay valid.
        unsafe { alexnet_host_kernels::launch(name, grid, block, indices, &mut slots) }
    };
    let wide = run(Indices::Wide);
    let wide_guards = copies
        .iter()
        .chain(&*reached)
        .try_for_each(Guarded::check_guards);
    let wide_results = words(&copies, reached);
    for (copy, input) in copies.iter_mut().chain(reached.iter_mut()).zip(&inputs) {
        copy.words.copy_from_slice(input);
    }
    let launched = run(Indices::AsOnTheGpu);
    let differs = copies
        .iter()
        .chain(&*reached)
        .zip(&wide_results)
        .enumerate()
        .find_map(|(i, (copy, wide))| {
            let at = copy.words.iter().zip(wide).position(|(a, b)| a != b)?;
            Some(format!(
                "{name}: with 64-bit indices, buffer {i} (in argument order, then those \
                 reached through the parameters) differs in bytes {}..{} of {} from the run \
                 as on the GPU",
                (16 * at) as isize - GUARD_BYTES as isize,
                (16 * at + 16) as isize - GUARD_BYTES as isize,
                copy.bytes
            ))
        });
    let guards = copies
        .into_iter()
        .map(Guarded::finish)
        .collect::<Result<Vec<()>, String>>();
    launched?;
    guards.map_err(|e| format!("{name} {e}"))?;
    wide.map_err(|e| format!("with 64-bit indices: {e}"))?;
    wide_guards.map_err(|e| format!("{name} with 64-bit indices {e}"))?;
    differs.map_or(Ok(()), Err)
}

/// A launch shape with few, odd-sized blocks: grid-stride loops go round several times.
fn small_grid(block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (3, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn random<Sh: ShapeBuilder>(shape: Sh, stream: u64, scale: f64) -> Array<f32, Sh::Dim> {
    let zeros = Array::<f32, _>::zeros(shape);
    Array::from_shape_vec(zeros.raw_dim(), formula_values(stream, zeros.len(), scale)).unwrap()
}

/// Values rounded to `T` and back: what the kernel actually reads.
fn rounded<T: Elem, D: Dimension>(a: &Array<f32, D>) -> Array<f32, D> {
    a.mapv(|v| T::from_f32(v).to_f32())
}

/// Logical NCHW `a` in `layout`'s memory order, as `T`.
fn physical<T: Elem>(a: &Array4<f32>, layout: Layout) -> Vec<T> {
    let view = match layout {
        Layout::Nchw => a.view(),
        Layout::Nhwc => a.view().permuted_axes([0, 2, 3, 1]),
    };
    view.iter().map(|&v| T::from_f32(v)).collect()
}

/// `values` in `layout`'s memory order back to logical NCHW `[n, c, h, w]`.
fn logical<T: Elem>(values: &[T], [n, c, h, w]: [usize; 4], layout: Layout) -> Array4<f32> {
    let f: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
    match layout {
        Layout::Nchw => Array4::from_shape_vec((n, c, h, w), f).unwrap(),
        Layout::Nhwc => Array4::from_shape_vec((n, h, w, c), f)
            .unwrap()
            .permuted_axes([0, 3, 1, 2])
            .as_standard_layout()
            .into_owned(),
    }
}

/// Bit-for-bit equality, NaN matching NaN; names the first difference.
fn assert_same(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        assert!(same, "{what}: element {i} is {g:e}, expected {w:e}");
    }
}

/// max |got - want| / max |want|; infinite on NaN in `got`.
fn rel_err(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f64 {
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    common::rel_max_error(got.as_standard_layout().as_slice().unwrap(), &want64)
}

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

// --- the kernels ---------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn every_registry_kernel_is_host_compiled_and_tested_here() {
    require_host_kernels();
    let host: Vec<&str> = alexnet_host_kernels::kernels().map(|(_, n)| n).collect();
    for spec in KERNELS {
        assert!(
            host.contains(&spec.name),
            "{} is not host-compiled",
            spec.name
        );
        assert!(
            COVERED.contains(&spec.name),
            "{} has no host-executed test in tests/host_kernels.rs",
            spec.name
        );
    }
    assert_eq!(
        COVERED.len(),
        KERNELS.len(),
        "COVERED lists a kernel the registry lacks"
    );
}

/// The emulation fails a launch whose threads meet at different barriers (some return before
/// a `__syncthreads`, or wait at two different ones) or shuffle without the whole warp, where
/// a GPU would hang or leave the result undefined; the correct twins pass and compute. The
/// kernels are deliberately wrong ones in `host-kernels/checks/`, never built for a GPU.
#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn the_emulation_fails_divergent_barriers_and_partial_shuffles() {
    require_host_kernels();
    let run = |name: &str, grid: u32, block: u32| {
        let mut out = vec![u32::MAX; (grid * block) as usize];
        let result = try_launch_grid(name, grid, block, vec![buf(&mut out)], &mut []);
        (result, out)
    };
    let (result, out) = run("check_uniform_barrier", 3, 64);
    assert_eq!(result, Ok(()));
    assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32 % 64));
    let (result, out) = run("check_full_shuffle", 2, 64);
    assert_eq!(result, Ok(()));
    assert!(out
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i as u32 % 64) ^ 1));

    for (name, grid, block, says) in [
        ("check_divergent_barrier", 1, 64, "the end of the block"),
        ("check_divergent_barrier", 3, 64, "the end of the block"),
        ("check_split_barrier", 2, 32, "emulation_checks.cu:"),
        ("check_partial_mask_shuffle", 1, 64, "mask 65535"),
        ("check_full_shuffle", 1, 48, "block of 48 threads"),
    ] {
        let (result, _) = run(name, grid, block);
        let error = result.expect_err(name);
        assert!(error.contains(says), "{name}: {error}");
    }
}

fn bias_act_case<T: Elem>(shape: &[usize], layout: Layout, relu: bool, seed: u64) {
    let name = format!("bias_act_{}", T::SUFFIX);
    let logical_x = rounded::<T, _>(&random(IxDyn(shape), seed, 2.0));
    let bias: Vec<f32> = formula_values(seed + 1, shape[1], 1.0)
        .into_iter()
        .map(|v| T::from_f32(v).to_f32())
        .collect();
    // The CPU twin, on the same rounded inputs, rounded like the kernel's store.
    let mut want = logical_x.clone();
    bias_act_inplace(want.view_mut(), &bias, relu).unwrap();
    let want = rounded::<T, _>(&want);
    let (mut p, cfg) = bias_act_args(shape, layout, bias.len(), relu).unwrap();
    let to_phys = |a: &ArrayD<f32>| -> Vec<T> {
        match shape {
            &[n, c, h, w] => physical::<T>(
                &a.clone().into_shape_with_order((n, c, h, w)).unwrap(),
                layout,
            ),
            _ => a.iter().map(|&v| T::from_f32(v)).collect(),
        }
    };
    let mut bias_t: Vec<T> = bias.iter().map(|&v| T::from_f32(v)).collect();
    for grid in [cfg, small_grid(96)] {
        let mut x = to_phys(&logical_x);
        launch(
            &name,
            grid,
            vec![buf(&mut x), buf(&mut bias_t), params(&mut p)],
        );
        let got = match shape {
            &[n, c, h, w] => logical(&x, [n, c, h, w], layout).into_dyn(),
            _ => ArrayD::from_shape_vec(IxDyn(shape), x.iter().map(|v| v.to_f32()).collect())
                .unwrap(),
        };
        assert_same(
            &format!("{name} {shape:?} {layout:?} relu={relu} grid={grid:?}"),
            &got,
            &want,
        );
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn bias_act_matches_the_cpu_bit_for_bit() {
    require_host_kernels();
    for (i, shape) in [vec![3, 5, 7, 9], vec![1, 96, 3, 3], vec![4, 37]]
        .iter()
        .enumerate()
    {
        for layout in LAYOUTS {
            if shape.len() == 2 && layout == Layout::Nhwc {
                continue;
            }
            for relu in [false, true] {
                bias_act_case::<f32>(shape, layout, relu, 10 + i as u64);
                bias_act_case::<f16>(shape, layout, relu, 20 + i as u64);
                bias_act_case::<bf16>(shape, layout, relu, 30 + i as u64);
            }
        }
    }
}

/// Dropout with drop probability `prob` in `mode` against the CPU layer on `x`: training mode's
/// mask and scale (the seed passed as a parameter and read from the device) and, in classic
/// mode, the eval scaling by `1 - prob`, in f32 and f16 storage, over the launcher's grid and a
/// small one.
fn dropout_case(x: &ArrayD<f32>, prob: f32, mode: DropoutMode) {
    let len = x.len();
    let cpu = Dropout::new(prob, mode).unwrap();
    let gpu = DropoutGpu::new(prob, mode).unwrap();
    let seed = 0xA1E7_2012;
    let want_train = cpu.forward_train(x.view(), seed);
    let want_eval = cpu.forward_eval(x.view());
    let (mut p, cfg) = gpu.train_args(len, seed).unwrap();
    for grid in [cfg, small_grid(100)] {
        let mut data: Vec<f32> = x.iter().copied().collect();
        launch(
            "dropout_f32",
            grid,
            vec![buf(&mut data), null::<u64>(), params(&mut p)],
        );
        let got = ArrayD::from_shape_vec(IxDyn(&[len]), data).unwrap();
        assert_same(
            &format!("dropout_f32 train p={prob} {mode:?}"),
            &got,
            &want_train,
        );
        // The seed read from the device (a captured step's): the parameter's is ignored.
        let (mut no_seed, _) = gpu.train_args(len, seed ^ 0xFFFF).unwrap();
        let mut seed_on_device = vec![seed];
        let mut data: Vec<f32> = x.iter().copied().collect();
        launch(
            "dropout_f32",
            grid,
            vec![
                buf(&mut data),
                buf(&mut seed_on_device),
                params(&mut no_seed),
            ],
        );
        let got = ArrayD::from_shape_vec(IxDyn(&[len]), data).unwrap();
        assert_same(
            &format!("dropout_f32 device seed p={prob} {mode:?}"),
            &got,
            &want_train,
        );
        // f16 and bf16 storage: the same mask, the product rounded once.
        let args = (&mut p, &mut no_seed);
        dropout_train_narrow::<f16>(x, &cpu, seed, grid, args, (prob, mode));
        let args = (&mut p, &mut no_seed);
        dropout_train_narrow::<bf16>(x, &cpu, seed, grid, args, (prob, mode));
    }
    match (mode, gpu.eval_args(len).unwrap()) {
        (DropoutMode::Inverted, None) => {} // the identity: nothing is launched
        (DropoutMode::Classic, Some((mut p, cfg))) => {
            for grid in [cfg, small_grid(100)] {
                let mut data: Vec<f32> = x.iter().copied().collect();
                launch(
                    "dropout_f32",
                    grid,
                    vec![buf(&mut data), null::<u64>(), params(&mut p)],
                );
                let got = ArrayD::from_shape_vec(IxDyn(&[len]), data).unwrap();
                assert_same(
                    &format!("dropout_f32 eval (classic) p={prob}"),
                    &got,
                    &want_eval,
                );
                // f16 and bf16 eval (the narrow networks' classic dropout at inference):
                // x (1 - p) in f32, rounded once.
                dropout_eval_narrow::<f16>(x, &cpu, grid, &mut p, prob);
                dropout_eval_narrow::<bf16>(x, &cpu, grid, &mut p, prob);
            }
        }
        (mode, other) => panic!("{mode:?} p={prob}: unexpected eval launch {other:?}"),
    }
}

/// [`dropout_case`]'s training mode in a 2-byte storage type: the mask drawn from the seed
/// passed as a parameter and from the one read on the device gives the same bits, and the CPU
/// layer's result on the rounded input, rounded once.
fn dropout_train_narrow<T: Elem + PartialEq>(
    x: &ArrayD<f32>,
    cpu: &Dropout,
    seed: u64,
    grid: LaunchConfig,
    (p, no_seed): (&mut AlexnetDropoutParams, &mut AlexnetDropoutParams),
    (prob, mode): (f32, DropoutMode),
) {
    let name = format!("dropout_{}", T::SUFFIX);
    let len = x.len();
    let mut narrow: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let want = rounded::<T, _>(&cpu.forward_train(rounded::<T, _>(x).view(), seed));
    launch(
        &name,
        grid,
        vec![buf(&mut narrow), null::<u64>(), params(p)],
    );
    let mut seeded: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut seed_on_device = vec![seed];
    launch(
        &name,
        grid,
        vec![buf(&mut seeded), buf(&mut seed_on_device), params(no_seed)],
    );
    assert!(seeded == narrow, "{name} device seed p={prob} {mode:?}");
    let got =
        ArrayD::from_shape_vec(IxDyn(&[len]), narrow.iter().map(|v| v.to_f32()).collect()).unwrap();
    assert_same(&format!("{name} train p={prob} {mode:?}"), &got, &want);
}

/// [`dropout_case`]'s classic eval scaling in a 2-byte storage type.
fn dropout_eval_narrow<T: Elem>(
    x: &ArrayD<f32>,
    cpu: &Dropout,
    grid: LaunchConfig,
    p: &mut AlexnetDropoutParams,
    prob: f32,
) {
    let name = format!("dropout_{}", T::SUFFIX);
    let mut narrow: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let want = rounded::<T, _>(&cpu.forward_eval(rounded::<T, _>(x).view()));
    launch(
        &name,
        grid,
        vec![buf(&mut narrow), null::<u64>(), params(p)],
    );
    let got = ArrayD::from_shape_vec(
        IxDyn(&[x.len()]),
        narrow.iter().map(|v| v.to_f32()).collect(),
    )
    .unwrap();
    assert_same(&format!("{name} eval (classic) p={prob}"), &got, &want);
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn dropout_draws_the_cpu_mask_in_both_modes() {
    require_host_kernels();
    let len = 12_347; // not a multiple of any block size
    let x = random(IxDyn(&[len]), 31, 3.0);
    // Besides the paper's 0.5, p = 0.1 and 0.3: the threshold p * 2^32 and the scales are
    // computed twice (cpu/dropout.rs, cuda/ops/dropout.rs), and 0.5 alone hides a disagreement.
    for prob in [0.5, 0.1, 0.3] {
        for mode in [DropoutMode::Inverted, DropoutMode::Classic] {
            dropout_case(&x, prob, mode);
        }
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn convert_widens_every_f16_exactly() {
    require_host_kernels();
    // Every bit pattern: zeros, subnormals, normals, infinities, NaNs.
    let mut src: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let want = ArrayD::from_shape_vec(
        IxDyn(&[src.len()]),
        src.iter().map(|v| v.to_f32()).collect(),
    )
    .unwrap();
    let (mut p, cfg) = convert_args(src.len(), 1.0).unwrap();
    for grid in [cfg, small_grid(33)] {
        let mut dst = vec![f32::POISON; src.len()];
        launch(
            "convert_f16_to_f32",
            grid,
            vec![buf(&mut src), buf(&mut dst), params(&mut p)],
        );
        let got = ArrayD::from_shape_vec(IxDyn(&[dst.len()]), dst).unwrap();
        assert_same("convert_f16_to_f32", &got, &want);
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn convert_narrows_the_scaled_f32_as_half_rounds_it() {
    require_host_kernels();
    // Every f16 value widened, each f16 midpoint (ties to even) and its neighbours, values
    // beyond f16's range and below its subnormals, infinities and NaN.
    let mut values: Vec<f32> = (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect();
    for b in (0..0x7c00u16).step_by(97) {
        let (lo, hi) = (f16::from_bits(b).to_f32(), f16::from_bits(b + 1).to_f32());
        let mid = lo + (hi - lo) / 2.0;
        values.extend([
            mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        ]);
    }
    values.extend([65520.0, 1e6, -1e6, 1e-9, -3e-8, f32::INFINITY, f32::NAN]);
    for scale in [1.0f32, 1024.0, 0.5] {
        let want: Vec<f32> = values
            .iter()
            .map(|&v| f16::from_f32(v * scale).to_f32())
            .collect();
        // The scale in the parameters, or (a captured training step) read from the step
        // settings.
        for (on_device, dst) in narrowed::<f16>(&values, scale) {
            let got: Vec<f32> = dst.iter().map(|h| h.to_f32()).collect();
            let as_array = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap();
            assert_same(
                &format!("convert_f32_to_f16 scale {scale} on_device={on_device}"),
                &as_array(got),
                &as_array(want.clone()),
            );
        }
    }
    assert!(convert_args(4, f32::INFINITY).is_err());
}

/// `convert_f32_to_f16` or `_bf16` (by `T`) on `values` times `scale`, in each of
/// [`scale_runs`]: the scale by value or read from the step settings, over the launcher's grid
/// and a small one. Gives each run's `on_device` and output.
fn narrowed<T: Elem>(values: &[f32], scale: f32) -> Vec<(bool, Vec<T>)> {
    let kernel = format!("convert_f32_to_{}", T::SUFFIX);
    let runs = scale_runs(small_grid(33));
    runs.into_iter()
        .map(|(on_device, grid)| {
            let mut settings = AlexnetStepSettings::default();
            let (settings, by_value) = scale_source(on_device, scale, &mut settings);
            let (mut p, cfg) = convert_args(values.len(), by_value).unwrap();
            let mut src = values.to_vec();
            let mut dst = vec![T::POISON; values.len()];
            launch(
                &kernel,
                grid.unwrap_or(cfg),
                vec![buf(&mut src), buf(&mut dst), settings, params(&mut p)],
            );
            (on_device, dst)
        })
        .collect()
}

/// bf16 both ways, bit for bit against `half::bf16` (the CPU's bf16 rounding): every bf16
/// pattern widened; every bf16 value, each midpoint between neighbours (ties to even) and its
/// two f32 neighbours, the largest finite f32 values (which round to infinity), subnormals,
/// infinities and NaNs of both signs narrowed, at scales 1, 1024 and 0.5. The NaNs must come
/// out of the narrowing as the same quiet NaN bits; widened, a NaN stays a NaN.
#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn convert_takes_bf16_both_ways_as_half_does() {
    require_host_kernels();
    let mut every: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let (mut p, cfg) = convert_args(every.len(), 1.0).unwrap();
    for grid in [cfg, small_grid(33)] {
        let mut dst = vec![f32::POISON; every.len()];
        launch(
            "convert_bf16_to_f32",
            grid,
            vec![buf(&mut every), buf(&mut dst), params(&mut p)],
        );
        for (b, got) in every.iter().zip(&dst) {
            // A NaN stays NaN (half also quiets a signalling one, the plain shift does not:
            // nothing relies on either, as for f16); every other pattern is exact.
            match b.is_nan() {
                true => assert!(got.is_nan(), "{:#06x}: {got}", b.to_bits()),
                false => assert_eq!(got.to_bits(), b.to_f32().to_bits(), "{:#06x}", b.to_bits()),
            }
        }
    }
    let mut values: Vec<f32> = every.iter().map(|b| b.to_f32()).collect();
    for bits in (0..0x7f80u32).step_by(37) {
        let mid = f32::from_bits((bits << 16) | 0x8000); // halfway to the next bf16
        values.extend([
            mid,
            -mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        ]);
    }
    values.extend([
        f32::MAX,
        -f32::MAX,
        f32::from_bits(0x7f7f_8000),
        1e-40,
        -1e-45,
        f32::from_bits(0x7fc0_0001),
        f32::from_bits(0xff80_0001), // a signalling NaN: made quiet
    ]);
    for scale in [1.0f32, 1024.0, 0.5] {
        let want: Vec<u16> = values
            .iter()
            .map(|&v| bf16::from_f32(v * scale).to_bits())
            .collect();
        for (on_device, dst) in narrowed::<bf16>(&values, scale) {
            for ((v, got), want) in values.iter().zip(&dst).zip(&want) {
                assert_eq!(
                    got.to_bits(),
                    *want,
                    "convert_f32_to_bf16 {v:e} ({:#010x}) scale {scale} on_device={on_device}",
                    v.to_bits()
                );
            }
        }
    }
}

/// LRN shapes and parameters that break indexing: the window clipped at both channel edges,
/// an even window (PyTorch's asymmetric rule), AlexNet's 96 channels, a one-channel window with
/// another beta (powf instead of the square roots).
fn lrn_cases() -> [([usize; 4], LrnParams); 4] {
    let even = LrnParams {
        size: 4,
        ..LrnParams::PAPER
    };
    let one = LrnParams {
        size: 1,
        beta: 0.5,
        ..LrnParams::PAPER
    };
    [
        ([1, 5, 3, 4], LrnParams::PAPER),
        ([3, 7, 5, 2], even),
        ([2, 96, 3, 5], LrnParams::PAPER),
        ([1, 3, 2, 2], one),
    ]
}

fn lrn_case<T: Elem>(
    dims: [usize; 4],
    layout: Layout,
    lrn: LrnParams,
    relu_first: bool,
    seed: u64,
) {
    let name = format!("lrn_{}", T::SUFFIX);
    let [n, c, h, w] = dims;
    let x = rounded::<T, _>(&random((n, c, h, w), seed, 3.0));
    let cpu_in = if relu_first {
        x.mapv(|v| if v < 0.0 { 0.0 } else { v })
    } else {
        x.clone()
    };
    let want = rounded::<T, _>(&Lrn::new(lrn).unwrap().forward(cpu_in.view()).unwrap()).into_dyn();
    let layer = LrnGpu::new(lrn).unwrap();
    let (mut p, cfg) = layer.args(dims, layout, relu_first).unwrap();
    for grid in [cfg, small_grid(128)] {
        let mut src = physical::<T>(&x, layout);
        let mut dst = vec![T::POISON; src.len()];
        launch(
            &name,
            grid,
            vec![buf(&mut src), buf(&mut dst), params(&mut p)],
        );
        let got = logical(&dst, dims, layout).into_dyn();
        let what = format!(
            "{name} {dims:?} {layout:?} size={} relu_first={relu_first}",
            lrn.size
        );
        if lrn.beta == 0.75 {
            // The kernel computes in the CPU's order with the CPU's two square roots.
            assert_same(&what, &got, &want);
        } else {
            let err = rel_err(&got, &want);
            assert!(err <= 1e-6, "{what}: relative error {err:e}");
        }
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn lrn_matches_the_cpu_at_the_channel_edges() {
    require_host_kernels();
    let cases = lrn_cases();
    for (i, (dims, lrn)) in cases.into_iter().enumerate() {
        for layout in LAYOUTS {
            for relu_first in [false, true] {
                lrn_case::<f32>(dims, layout, lrn, relu_first, 40 + i as u64);
                lrn_case::<f16>(dims, layout, lrn, relu_first, 50 + i as u64);
                lrn_case::<bf16>(dims, layout, lrn, relu_first, 60 + i as u64);
            }
        }
    }
}

/// Pooling shapes that break indexing: overlapping windows with a ragged last one, gaps between
/// windows (some inputs in none), a single window, and AlexNet's pool2 plane.
fn pool_cases() -> [([usize; 4], PoolSpec); 4] {
    let gapped = PoolSpec {
        kernel: 2,
        stride: 3,
    };
    let single = PoolSpec {
        kernel: 3,
        stride: 1,
    };
    [
        ([3, 5, 13, 11], PoolSpec::OVERLAPPING),
        ([1, 4, 10, 9], gapped),
        ([2, 3, 3, 3], single),
        ([2, 2, 27, 27], PoolSpec::OVERLAPPING),
    ]
}

fn pool_case<T: Elem>(dims: [usize; 4], spec: PoolSpec, layout: Layout, seed: u64, nan: bool) {
    let name = format!("maxpool_{}", T::SUFFIX);
    let [n, c, h, w] = dims;
    let mut x = rounded::<T, _>(&random((n, c, h, w), seed, 5.0));
    if nan {
        x[[n - 1, c - 1, h / 2, w / 2]] = f32::NAN;
    }
    let want = MaxPool2d::from(spec).forward(x.view()).unwrap().into_dyn();
    let layer = MaxPoolGpu::new(spec.kernel, spec.stride).unwrap();
    let (mut p, cfg, out) = layer.args(dims, layout).unwrap();
    assert_eq!(&out[..], want.shape(), "{name}: output dims");
    for grid in [cfg, small_grid(64)] {
        let mut src = physical::<T>(&x, layout);
        let mut dst = vec![T::POISON; out.iter().product()];
        launch(
            &name,
            grid,
            vec![buf(&mut src), buf(&mut dst), params(&mut p)],
        );
        let got = logical(&dst, out, layout).into_dyn();
        assert_same(
            &format!("{name} {dims:?} {spec:?} {layout:?} nan={nan}"),
            &got,
            &want,
        );
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn maxpool_matches_the_cpu_on_ragged_and_gapped_windows() {
    require_host_kernels();
    let cases = pool_cases();
    for (i, (dims, spec)) in cases.into_iter().enumerate() {
        for layout in LAYOUTS {
            for nan in [false, true] {
                pool_case::<f32>(dims, spec, layout, 60 + i as u64, nan);
                pool_case::<f16>(dims, spec, layout, 70 + i as u64, nan);
                pool_case::<bf16>(dims, spec, layout, 80 + i as u64, nan);
            }
        }
    }
}

fn conv_epilogue_case<T: Elem>(
    dims: [usize; 4],
    lrn: Option<LrnParams>,
    spec: PoolSpec,
    layout: Layout,
    seed: u64,
    nan: bool,
) {
    let name = format!("conv_epilogue_{}", T::SUFFIX);
    let [n, c, h, w] = dims;
    // Raw convolution outputs of both signs, so the ReLU matters.
    let mut x = rounded::<T, _>(&random((n, c, h, w), seed, 4.0));
    if nan {
        x[[n - 1, c / 2, h / 2, w / 2]] = f32::NAN;
    }
    let bias: Vec<f32> = formula_values(seed + 1, c, 1.0)
        .into_iter()
        .map(|v| T::from_f32(v).to_f32())
        .collect();
    // The CPU's stages one after another, each result rounded where its kernel stores it.
    let mut biased = x.clone().into_dyn();
    bias_act_inplace(biased.view_mut(), &bias, true).unwrap();
    let mut staged = rounded::<T, _>(&biased)
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap();
    if let Some(lrn) = lrn {
        staged = rounded::<T, _>(&Lrn::new(lrn).unwrap().forward(staged.view()).unwrap());
    }
    let want = MaxPool2d::from(spec)
        .forward(staged.view())
        .unwrap()
        .into_dyn();
    let layer = ConvEpilogueGpu {
        lrn: lrn.map(|p| LrnGpu::new(p).unwrap()),
        pool: MaxPoolGpu::new(spec.kernel, spec.stride).unwrap(),
    };
    let (mut p, cfg, out) = layer.args(dims, layout).unwrap();
    assert_eq!(&out[..], want.shape(), "{name}: output dims");
    let mut bias_t: Vec<T> = bias.iter().map(|&v| T::from_f32(v)).collect();
    for grid in [cfg, small_grid(96)] {
        let mut src = physical::<T>(&x, layout);
        let mut dst = vec![T::POISON; out.iter().product()];
        launch(
            &name,
            grid,
            vec![
                buf(&mut src),
                buf(&mut bias_t),
                buf(&mut dst),
                params(&mut p),
            ],
        );
        let got = logical(&dst, out, layout).into_dyn();
        let what = format!(
            "{name} {dims:?} lrn={:?} {spec:?} {layout:?} nan={nan}",
            lrn.map(|l| (l.size, l.beta))
        );
        if lrn.is_none_or(|l| l.beta == 0.75) {
            assert_same(&what, &got, &want);
        } else {
            // powf (beta != 0.75), as in `lrn_case`: NaN where the CPU has it, the rest within
            // the LRN forward's tolerance.
            let nan_at = |a: &ArrayD<f32>| a.iter().map(|v| v.is_nan()).collect::<Vec<bool>>();
            assert_eq!(nan_at(&got), nan_at(&want), "{what}: NaN positions");
            let zero_nan = |a: &ArrayD<f32>| a.mapv(|v| if v.is_nan() { 0.0 } else { v });
            let err = rel_err(&zero_nan(&got), &zero_nan(&want));
            assert!(err <= 1e-6, "{what}: relative error {err:e}");
        }
    }
}

/// The fused epilogue is the CPU's bias + ReLU (+ LRN) + max-pool combined, bit for bit: after
/// conv1/conv2 (with the LRN, channel edges included) and after conv5 (without), ragged pooling
/// windows, both layouts, both storage types, and a NaN that must reach the output.
#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn conv_epilogue_is_the_cpu_stages_combined() {
    require_host_kernels();
    let gapped = PoolSpec {
        kernel: 2,
        stride: 3,
    };
    let even_lrn = LrnParams {
        size: 4,
        ..LrnParams::PAPER
    };
    let beta_half = LrnParams {
        beta: 0.5,
        ..LrnParams::PAPER
    };
    let cases = [
        (
            [2, 7, 13, 11],
            Some(LrnParams::PAPER),
            PoolSpec::OVERLAPPING,
        ),
        ([1, 3, 7, 7], Some(LrnParams::PAPER), PoolSpec::OVERLAPPING), // fewer channels than the window
        ([3, 5, 9, 10], None, PoolSpec::OVERLAPPING),
        ([1, 4, 10, 9], None, gapped),
        // An even window (PyTorch's asymmetric rule) and beta 0.5 (powf, not the square
        // roots), as `lrn_cases` gives the separate LRN kernel.
        ([2, 6, 9, 7], Some(even_lrn), PoolSpec::OVERLAPPING),
        ([1, 5, 7, 8], Some(beta_half), PoolSpec::OVERLAPPING),
    ];
    for (i, (dims, lrn, spec)) in cases.into_iter().enumerate() {
        for layout in LAYOUTS {
            for nan in [false, true] {
                conv_epilogue_case::<f32>(dims, lrn, spec, layout, 90 + i as u64, nan);
                conv_epilogue_case::<f16>(dims, lrn, spec, layout, 95 + i as u64, nan);
                conv_epilogue_case::<bf16>(dims, lrn, spec, layout, 195 + i as u64, nan);
            }
        }
    }
}

fn prepare_case<T: Elem>(n: usize, channels: usize, side: u32, layout: Layout, pre: &Preprocess) {
    let name = format!("prepare_input_{}", T::SUFFIX);
    let batch: U8Batch = common::random_u8_batch(n, side, 80 + n as u64);
    let s = side as usize;
    let mut want = Array4::<f32>::zeros((n, channels, s, s));
    want.slice_mut(ndarray::s![.., ..3, .., ..])
        .assign(&batch.to_nchw_f32(pre));
    let want = rounded::<T, _>(&want).into_dyn();
    let norm = PrepareInput::new(pre.mean, pre.std).unwrap();
    let dims = [n, channels, s, s];
    let (mut p, cfg) = norm.args(dims, layout, batch.as_slice().len()).unwrap();
    let what = format!("{name} n={n} c={channels} {side}x{side} {layout:?}");
    check_input_kernel::<_, T, _>(
        (&name, &what),
        cfg,
        batch.as_slice(),
        &mut p,
        (dims, layout),
        &want,
    );
}

/// `n` non-square `h x w` u8 HWC images (bytes stepping through 0..=255 by 37) into
/// `[n, channels, h, w]` against a per-pixel reference written here from the kernel's formula,
/// `(byte / 255 - mean[c]) / std[c]` in f32 (the CPU's order), rounded once to `T`, 0 in the
/// padding channels.
fn prepare_rect_case<T: Elem>(n: usize, channels: usize, (h, w): (usize, usize), layout: Layout) {
    let name = format!("prepare_input_{}", T::SUFFIX);
    let (mean, stdev) = ([0.5f32, 0.25, 0.75], [0.3f32, 0.6, 0.9]);
    let bytes: Vec<u8> = (0..n * h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
    let want = Array4::from_shape_fn((n, channels, h, w), |(i, c, y, x)| {
        if c < 3 {
            (bytes[((i * h + y) * w + x) * 3 + c] as f32 / 255.0 - mean[c]) / stdev[c]
        } else {
            0.0
        }
    });
    let want = rounded::<T, _>(&want).into_dyn();
    let norm = PrepareInput::new(mean, stdev).unwrap();
    let dims = [n, channels, h, w];
    let (mut p, cfg) = norm.args(dims, layout, bytes.len()).unwrap();
    let what = format!("{name} n={n} c={channels} {h}x{w} {layout:?}");
    check_input_kernel::<_, T, _>((&name, &what), cfg, &bytes, &mut p, (dims, layout), &want);
}

/// Runs the input kernel `name` from `src` into a poisoned `dims` output in `layout`, over the
/// launcher's grid and a small wrapping one, and checks every element against `want` bit for
/// bit (`what` names the case in a failure).
fn check_input_kernel<S: Clone + KernelElem, T: Elem, P>(
    (name, what): (&str, &str),
    cfg: LaunchConfig,
    src: &[S],
    p: &mut P,
    (dims, layout): ([usize; 4], Layout),
    want: &ArrayD<f32>,
) {
    for grid in [cfg, small_grid(160)] {
        let mut src = src.to_vec();
        let mut dst = vec![T::POISON; dims.iter().product()];
        launch(name, grid, vec![buf(&mut src), buf(&mut dst), params(p)]);
        let got = logical(&dst, dims, layout).into_dyn();
        assert_same(what, &got, want);
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn prepare_input_matches_the_cpu_normalisation_bit_for_bit() {
    require_host_kernels();
    let odd = Preprocess {
        mean: [0.5, 0.25, 0.75],
        std: [0.3, 0.6, 0.9],
        ..Preprocess::default()
    };
    for pre in [Preprocess::default(), odd] {
        for layout in LAYOUTS {
            for (n, channels) in [(1, 3), (3, 8)] {
                prepare_case::<f32>(n, channels, 7, layout, &pre);
                prepare_case::<f16>(n, channels, 7, layout, &pre);
                prepare_case::<bf16>(n, channels, 7, layout, &pre);
            }
        }
    }
    // Non-square images (U8Batch's are square): a swapped height and width shows.
    for layout in LAYOUTS {
        for (n, channels, hw) in [(2, 3, (5, 3)), (1, 8, (3, 7)), (3, 4, (4, 9))] {
            prepare_rect_case::<f32>(n, channels, hw, layout);
            prepare_rect_case::<f16>(n, channels, hw, layout);
            prepare_rect_case::<bf16>(n, channels, hw, layout);
        }
    }
    // Malformed byte counts are refused before any launch.
    let norm = PrepareInput::default();
    assert!(norm
        .args([2, 3, 7, 7], Layout::Nchw, 2 * 7 * 7 * 3 - 1)
        .is_err());
    assert!(norm
        .args([2, 2, 7, 7], Layout::Nchw, 2 * 7 * 7 * 3)
        .is_err());
}

/// An f32 NCHW batch of `src_channels` into `channels` in `layout`, rounded to `T`: the
/// CPU's zero-padded, reordered batch exactly (values that f16 rounds, overflows or keeps as a
/// signed zero included).
fn relayout_case<T: Elem>(n: usize, src_channels: usize, channels: usize, layout: Layout) {
    let name = format!("relayout_f32_to_{}", T::SUFFIX);
    let (h, w) = (5, 3);
    let mut values = formula_values(90 + n as u64, n * src_channels * h * w, 4.0);
    for (i, v) in [(0, -0.0), (1, 70000.0), (2, 1e-6), (3, f32::NAN)] {
        if let Some(slot) = values.get_mut(i * 7) {
            *slot = v;
        }
    }
    let source = Array4::from_shape_vec((n, src_channels, h, w), values.clone()).unwrap();
    let mut want = Array4::<f32>::zeros((n, channels, h, w));
    want.slice_mut(ndarray::s![.., ..src_channels, .., ..])
        .assign(&source);
    let want = rounded::<T, _>(&want).into_dyn();
    let dims = [n, channels, h, w];
    let (mut p, cfg) = relayout_args(dims, layout, src_channels, values.len()).unwrap();
    let what = format!("{name} n={n} {src_channels}->{channels} {layout:?}");
    check_input_kernel::<_, T, _>((&name, &what), cfg, &values, &mut p, (dims, layout), &want);
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn relayout_pads_and_reorders_an_f32_batch_exactly() {
    require_host_kernels();
    for layout in LAYOUTS {
        for (n, src_channels, channels) in [(1, 3, 3), (3, 3, 8), (2, 1, 4)] {
            relayout_case::<f32>(n, src_channels, channels, layout);
            relayout_case::<f16>(n, src_channels, channels, layout);
            relayout_case::<bf16>(n, src_channels, channels, layout);
        }
    }
    // A source of another size, or more channels than the output, is refused before a launch.
    assert!(relayout_args([2, 8, 5, 3], Layout::Nhwc, 3, 2 * 3 * 5 * 3 - 1).is_err());
    assert!(relayout_args([2, 2, 5, 3], Layout::Nhwc, 3, 2 * 3 * 5 * 3).is_err());
    assert!(relayout_args([2, 8, 5, 3], Layout::Nhwc, 0, 0).is_err());
}

fn softmax_case<T: Elem>(logits: &Array2<f32>, k: usize, block: u32) {
    let name = format!("softmax_topk_{}", T::SUFFIX);
    let (rows, classes) = logits.dim();
    let x = rounded::<T, _>(logits);
    let want_probs = softmax(x.view());
    let (mut p, cfg) = softmax_top_k_args(rows, classes, k, true).unwrap();
    let grid = LaunchConfig {
        block_dim: (block, 1, 1),
        ..cfg
    };
    let mut src: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut probs = vec![f32::POISON; rows * classes];
    let slots = rows * ALEXNET_TOPK_MAX as usize;
    let mut top_class = vec![u32::MAX; slots];
    let mut top_prob = vec![f32::POISON; slots];
    launch(
        &name,
        grid,
        vec![
            buf(&mut src),
            buf(&mut probs),
            buf(&mut top_class),
            buf(&mut top_prob),
            params(&mut p),
        ],
    );
    let probs = Array2::from_shape_vec((rows, classes), probs).unwrap();
    let what = format!("{name} {rows}x{classes} k={k} block={block}");
    // Probabilities: the CPU's softmax up to the host's expf.
    let finite_rows: Vec<usize> = (0..rows)
        .filter(|&r| x.row(r).iter().all(|v| !v.is_nan()))
        .collect();
    for &r in &finite_rows {
        let err = rel_err(
            &probs.row(r).to_owned().into_dyn(),
            &want_probs.row(r).to_owned().into_dyn(),
        );
        assert!(err <= 1e-6, "{what}: row {r} probabilities off by {err:e}");
    }
    // A row with a NaN logit: every probability NaN, on the CPU and in the kernel.
    for r in (0..rows).filter(|r| !finite_rows.contains(r)) {
        assert!(
            want_probs.row(r).iter().all(|v| v.is_nan()),
            "{what}: row {r}: the CPU's softmax of a NaN row"
        );
        assert!(
            probs.row(r).iter().all(|v| v.is_nan()),
            "{what}: row {r} probabilities not all NaN"
        );
    }
    // Top-k: exactly the CPU's top_k of the probabilities the kernel computed (order, ties to
    // the lower index, NaN first).
    for r in 0..rows {
        let want = top_k(probs.row(r), k).unwrap();
        for (j, &(class, prob)) in want.iter().enumerate() {
            let slot = r * k + j;
            assert_eq!(
                top_class[slot] as usize, class,
                "{what}: row {r} rank {j} class"
            );
            assert!(
                top_prob[slot].to_bits() == prob.to_bits()
                    || (top_prob[slot].is_nan() && prob.is_nan()),
                "{what}: row {r} rank {j} probability {} vs {prob}",
                top_prob[slot]
            );
        }
    }
    // Without probabilities (the model's path): the same top-k, probs left untouched.
    let (mut p, _) = softmax_top_k_args(rows, classes, k, false).unwrap();
    let mut class2 = vec![u32::MAX; slots];
    let mut prob2 = vec![f32::POISON; slots];
    launch(
        &name,
        grid,
        vec![
            buf(&mut src),
            null::<f32>(),
            buf(&mut class2),
            buf(&mut prob2),
            params(&mut p),
        ],
    );
    assert_eq!(
        class2[..rows * k],
        top_class[..rows * k],
        "{what}: top-k without probabilities"
    );
    // Its probabilities too, bit for bit: those checked above against the CPU's top_k.
    for (slot, (&got, &want)) in prob2[..rows * k]
        .iter()
        .zip(&top_prob[..rows * k])
        .enumerate()
    {
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{what}: slot {slot} probability without probabilities {got} vs {want}"
        );
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn softmax_topk_matches_the_cpu_with_ties_and_nan() {
    require_host_kernels();
    // Batch 3 of 1000 classes, scaled like logits.
    let wide = random((3, 1000), 90, 8.0);
    // Ties: every class value appears twice; the lower index must win.
    let mut ties = Array2::<f32>::zeros((1, 37));
    for (j, v) in ties.iter_mut().enumerate() {
        *v = (j / 2) as f32 * 0.25;
    }
    // A NaN logit ranks first; the row's other probabilities are NaN too, as on the CPU.
    let mut nan = random((2, 37), 91, 2.0);
    nan[[1, 5]] = f32::NAN;
    for block in [256, 64] {
        for k in [1, 5, 32] {
            softmax_case::<f32>(&wide, k, block);
            softmax_case::<f16>(&wide, k, block);
            softmax_case::<bf16>(&wide, k, block);
            softmax_case::<f32>(&ties, k, block);
            softmax_case::<f16>(&ties, k, block);
            softmax_case::<bf16>(&ties, k, block);
            softmax_case::<f32>(&nan, k, block);
            softmax_case::<f16>(&nan, k, block); // f16 NaN logits: loaded as NaN, ranked first
            softmax_case::<bf16>(&nan, k, block);
        }
    }
}

// --- training kernels (f32 and f16; the loss and SGD f32 only) -----------------------------

/// `maxpool_backward` in `T` against the CPU layer on the values rounded to `T`, its result
/// rounded once to `T` (the kernel sums in f32 and stores once). With `relu_first`, the kernel
/// gets the ReLU's input (negative values too) and, a second time, its output (what the trainer
/// passes), and is held to the CPU's `relu_backward` on the ReLU's output after the pooling's
/// backward.
fn pool_backward_case<T: Elem>(
    dims: [usize; 4],
    spec: PoolSpec,
    layout: Layout,
    seed: u64,
    ties: bool,
    relu_first: bool,
) {
    let name = format!("maxpool_backward_{}", T::SUFFIX);
    let [n, c, h, w] = dims;
    let mut x = random((n, c, h, w), seed, 5.0);
    if ties {
        // Exact ties (the first maximum takes the gradient), a NaN (the last NaN takes it) and
        // a -infinity plane (nothing beats it: the window's first element takes it).
        x.slice_mut(ndarray::s![0, 0, .., ..]).fill(1.5);
        x[[n - 1, c - 1, h / 2, w / 2]] = f32::NAN;
        x.slice_mut(ndarray::s![n - 1, 0, .., ..])
            .fill(f32::NEG_INFINITY);
        // A zero plane of both signs, as after a ReLU (-0 and +0 tie: the first zero takes
        // it), and NaNs side by side in the last plane (windows holding two: the later).
        if n > 1 {
            let mut zeros = x.slice_mut(ndarray::s![1, 0, .., ..]);
            zeros.fill(0.0);
            zeros.slice_mut(ndarray::s![..;2, ..;3]).fill(-0.0);
        }
        x[[n - 1, c - 1, h / 2, (w / 2 + 1).min(w - 1)]] = f32::NAN;
        x[[n - 1, c - 1, (h / 2 + 1).min(h - 1), w / 2]] = f32::NAN;
    }
    let x = rounded::<T, _>(&x);
    // What the pooling sees: the ReLU's output (NaN stays NaN) when it is fused in.
    let pooled = match relu_first {
        true => {
            let mut relu = x.clone().into_dyn();
            relu_inplace(relu.view_mut());
            relu.into_dimensionality().unwrap()
        }
        false => x.clone(),
    };
    let pool = MaxPool2d::from(spec);
    let (oh, ow) = pool.output_size(h, w).unwrap();
    let dy = rounded::<T, _>(&random((n, c, oh, ow), seed + 500, 1.0));
    let pool_grad = pool.backward(pooled.view(), dy.view()).unwrap().into_dyn();
    let exact = match relu_first {
        true => relu_backward(pooled.view().into_dyn(), pool_grad.view()).unwrap(),
        false => pool_grad,
    };
    let want = rounded::<T, _>(&exact);
    let layer = MaxPoolGpu::new(spec.kernel, spec.stride).unwrap();
    let (mut p, cfg, out) = layer.backward_args(dims, layout, relu_first).unwrap();
    assert_eq!(out, [n, c, oh, ow]);
    // Each window's maximum as the forward writes it: the CPU forward's output (max only
    // selects, so the same bits in f32 and f16; the host-executed forward test holds the
    // kernel to it).
    let forward = rounded::<T, _>(&pool.forward(pooled.view()).unwrap());
    let sources = match relu_first {
        true => vec![("relu input", &x), ("relu output", &pooled)],
        false => vec![("input", &x)],
    };
    for ((given, source), grid) in sources
        .into_iter()
        .flat_map(|source| [(source, cfg), (source, small_grid(64))])
    {
        let mut src = physical::<T>(source, layout);
        let mut out = physical::<T>(&forward, layout);
        let mut grad_out = physical::<T>(&dy, layout);
        let mut grad_in = vec![T::POISON; src.len()];
        launch(
            &name,
            grid,
            vec![
                buf(&mut src),
                buf(&mut out),
                buf(&mut grad_out),
                buf(&mut grad_in),
                params(&mut p),
            ],
        );
        let got = logical(&grad_in, dims, layout).into_dyn();
        assert_same(
            &format!(
                "{name} {dims:?} {spec:?} {layout:?} ties={ties} relu_first={relu_first} \
                 from the {given}"
            ),
            &got,
            &want,
        );
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn maxpool_backward_matches_the_cpu_with_overlaps_ties_and_nan() {
    require_host_kernels();
    let cases = pool_cases();
    for (i, (dims, spec)) in cases.into_iter().enumerate() {
        for layout in LAYOUTS {
            for ties in [false, true] {
                for relu_first in [false, true] {
                    let seed = 200 + i as u64;
                    pool_backward_case::<f32>(dims, spec, layout, seed, ties, relu_first);
                    pool_backward_case::<f16>(dims, spec, layout, seed, ties, relu_first);
                    pool_backward_case::<bf16>(dims, spec, layout, seed, ties, relu_first);
                }
            }
        }
    }
}

/// `lrn_backward` in `T` against the CPU layer on the values rounded to `T`, its result rounded
/// once to `T` (the kernel computes in f32 and stores once). With `relu_first`, the kernel gets
/// the ReLU's input (negative values too) and is held to the CPU's `relu_backward` on the
/// ReLU's output after the LRN's backward.
fn lrn_backward_case<T: Elem>(
    dims: [usize; 4],
    layout: Layout,
    lrn: LrnParams,
    seed: u64,
    relu_first: bool,
) {
    let name = format!("lrn_backward_{}", T::SUFFIX);
    let [n, c, h, w] = dims;
    // The LRN follows a ReLU: non-negative inputs with exact zeros, as in the network; the
    // ReLU's input for the fused backward.
    let before_relu = rounded::<T, _>(&random((n, c, h, w), seed, 3.0));
    let relu = before_relu.mapv(|v| v.max(0.0));
    let x = if relu_first {
        before_relu
    } else {
        relu.clone()
    };
    let dy = rounded::<T, _>(&random((n, c, h, w), seed + 500, 1.0));
    let lrn_grad = Lrn::new(lrn)
        .unwrap()
        .backward(relu.view(), dy.view())
        .unwrap();
    let exact = match relu_first {
        true => relu_backward(relu.view().into_dyn(), lrn_grad.view().into_dyn()).unwrap(),
        false => lrn_grad.into_dyn(),
    };
    let want = rounded::<T, _>(&exact);
    let layer = LrnGpu::new(lrn).unwrap();
    let (mut p, cfg) = layer.backward_args(dims, layout, relu_first).unwrap();
    for grid in [cfg, small_grid(128)] {
        let mut src = physical::<T>(&x, layout);
        let mut grad_out = physical::<T>(&dy, layout);
        let mut grad_in = vec![T::POISON; src.len()];
        launch(
            &name,
            grid,
            vec![
                buf(&mut src),
                buf(&mut grad_out),
                buf(&mut grad_in),
                params(&mut p),
            ],
        );
        let got = logical(&grad_in, dims, layout).into_dyn();
        let what = format!(
            "{name} {dims:?} {layout:?} size={} relu_first={relu_first}",
            lrn.size
        );
        if lrn.beta == 0.75 {
            // The CPU's order and its square roots: the same bits.
            assert_same(&what, &got, &want);
        } else {
            // powf may differ from the CPU's in the last bit, which f16 rounding can carry
            // into one f16 step: measured against the unrounded CPU result.
            let tol = match T::SUFFIX {
                "f16" => 1e-3,
                "bf16" => 8e-3, // bf16's step is 8 times f16's
                _ => 1e-6,
            };
            let err = rel_err(&got, &exact);
            assert!(err <= tol, "{what}: relative error {err:e}");
        }
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn lrn_backward_matches_the_cpu_at_the_channel_edges() {
    require_host_kernels();
    // Beside the forward's cases, the backward's two paths at their edges: runs of 32 channels
    // with a short last one (70, 33, 40 channels), whose windows reach across a run's ends; the
    // widest window kept in the per-thread ring (16, even) and the narrowest not (17), which
    // takes the per-element path.
    let sized = |size, beta| LrnParams {
        size,
        beta,
        ..LrnParams::PAPER
    };
    let cases = lrn_cases().into_iter().chain([
        ([2, 70, 3, 2], LrnParams::PAPER),
        ([1, 33, 2, 3], sized(4, 0.75)),
        ([2, 40, 2, 2], sized(16, 0.75)),
        ([1, 40, 3, 1], sized(17, 0.75)),
        ([1, 40, 2, 2], sized(16, 0.6)),
    ]);
    for (i, (dims, lrn)) in cases.enumerate() {
        for layout in LAYOUTS {
            for relu_first in [false, true] {
                lrn_backward_case::<f32>(dims, layout, lrn, 220 + i as u64, relu_first);
                lrn_backward_case::<f16>(dims, layout, lrn, 220 + i as u64, relu_first);
                lrn_backward_case::<bf16>(dims, layout, lrn, 230 + i as u64, relu_first);
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn relu_backward_matches_the_cpu() {
    require_host_kernels();
    let mut output = random((3, 7, 5, 3), 240, 2.0).mapv(|v| v.max(0.0));
    output[[0, 0, 0, 0]] = f32::NAN;
    output[[2, 6, 4, 2]] = -0.0;
    // A value that f16 flushes to zero: its gradient must be blocked in f16 but not in f32.
    output[[1, 3, 2, 1]] = 1e-9;
    relu_backward_case::<f32>(&output, 241);
    relu_backward_case::<f16>(&output, 241);
    relu_backward_case::<bf16>(&output, 242);
}

/// `relu_backward` in `T` against the CPU on the values rounded to `T` (the kernel only
/// zeroes or keeps, so no rounding of its own).
fn relu_backward_case<T: Elem>(output: &Array4<f32>, seed: u64) {
    let name = format!("relu_backward_{}", T::SUFFIX);
    let output = rounded::<T, _>(output);
    let grad = rounded::<T, _>(&random(output.raw_dim(), seed, 1.0));
    let want = relu_backward(output.view().into_dyn(), grad.view().into_dyn()).unwrap();
    let (mut p, cfg) = relu_backward_args(output.len()).unwrap();
    for grid in [cfg, small_grid(32)] {
        let mut y: Vec<T> = output.iter().map(|&v| T::from_f32(v)).collect();
        let mut g: Vec<T> = grad.iter().map(|&v| T::from_f32(v)).collect();
        launch(&name, grid, vec![buf(&mut y), buf(&mut g), params(&mut p)]);
        let got: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
        let got = ArrayD::from_shape_vec(IxDyn(output.shape()), got).unwrap();
        assert_same(&name, &got, &want);
    }
}

/// `bias_grad` on the gradient `grad` (logical shape `shape`, stored in `layout`) against
/// `want`, the CPU layer's bias gradient, with the launcher's grid and a small one (64 threads
/// a block), within f16's rounding of the gradient for f16 and 1e-6 for f32.
fn bias_grad_case<T: Elem>(grad: &ArrayD<f32>, layout: Layout, want: &ArrayD<f32>) {
    // The f16 kernel sums what it reads: the gradient rounded to f16 (the CPU twin is f32).
    let tolerance = match T::SUFFIX {
        "f16" => 2e-3,
        "bf16" => 1.6e-2, // bf16's step is 8 times f16's
        _ => 1e-6,
    };
    bias_grad_within::<T>(grad, layout, want, tolerance);
}

/// [`bias_grad_case`] within `tolerance`.
fn bias_grad_within<T: Elem>(
    grad: &ArrayD<f32>,
    layout: Layout,
    want: &ArrayD<f32>,
    tolerance: f64,
) {
    let name = format!("bias_grad_{}", T::SUFFIX);
    let stored: Vec<T> = match grad.ndim() {
        4 => physical::<T>(&grad.clone().into_dimensionality().unwrap(), layout),
        _ => grad.iter().map(|&v| T::from_f32(v)).collect(),
    };
    let (mut p, cfg) = bias_grad_args(grad.shape(), layout).unwrap();
    let positions = grad.len() / want.len();
    // The launcher's block: a power of two of at most 1,024 threads, each summing at most 8
    // positions unless the block is already the largest, and no larger than that calls for.
    let block = cfg.block_dim.0;
    assert!(
        block.is_power_of_two() && (32..=ALEXNET_BIAS_GRAD_BLOCK).contains(&block),
        "{name}: block of {block}"
    );
    assert!(
        positions <= 8 * block as usize || block == ALEXNET_BIAS_GRAD_BLOCK,
        "{name}: {block} threads for {positions} positions a channel"
    );
    assert!(
        block == 32 || positions > 8 * (block as usize / 2),
        "{name}: {block} threads for only {positions} positions a channel"
    );
    for grid in [cfg, small_grid(64)] {
        let mut g = stored.clone();
        let mut out = vec![f32::POISON; want.len()];
        launch(
            &name,
            grid,
            vec![buf(&mut g), buf(&mut out), params(&mut p)],
        );
        let got = ArrayD::from_shape_vec(IxDyn(&[out.len()]), out).unwrap();
        let err = rel_err(&got, want);
        let what = format!(
            "{name} {:?} {layout:?} blocks={}",
            grad.shape(),
            grid.grid_dim.0
        );
        assert!(err <= tolerance, "{what}: off by {err:e}");
    }
    let columns = bias_grad_columns_within(&stored, grad.shape(), layout, want, tolerance);
    // The launcher takes the split path exactly where the channel axis is innermost.
    let innermost = layout == Layout::Nhwc || grad.ndim() == 2;
    assert_eq!(columns, innermost, "{name} {:?} {layout:?}", grad.shape());
}

/// `bias_grad_columns` then `bias_grad_finish` on `stored` (a gradient of logical `shape` in
/// `layout`'s memory order) against `want` within `tolerance`, with the launcher's grids and
/// small ones (the sums in 64-thread blocks: two warps). The partial sums get exactly the room
/// the launcher's parameters call for, guarded, so a write past the last split shows. Whether
/// the launcher sums this gradient by columns at all (false: nothing ran).
fn bias_grad_columns_within<T: Elem>(
    stored: &[T],
    shape: &[usize],
    layout: Layout,
    want: &ArrayD<f32>,
    tolerance: f64,
) -> bool {
    let name = format!("bias_grad_columns_{}", T::SUFFIX);
    let Some((mut p, sums, finish)) = bias_grad_columns_args(shape, layout).unwrap() else {
        return false;
    };
    let (rows, split, splits) = (
        p.rows as usize,
        p.rows_per_split as usize,
        p.splits as usize,
    );
    let channels = p.channels as usize;
    assert_eq!(rows * channels, stored.len(), "{name} {shape:?}");
    // Every row in exactly one split, none empty, and the partial sums within the GPU's room.
    assert!(
        splits * split >= rows && (splits - 1) * split < rows.max(1),
        "{name} {shape:?}: {splits} splits of {split} rows for {rows}"
    );
    assert!(splits * channels <= ALEXNET_BIAS_PARTIALS as usize);
    assert_eq!(sums.block_dim.0, ALEXNET_BIAS_COLUMNS_BLOCK);
    assert_eq!(
        sums.grid_dim.0 as usize,
        splits * channels.div_ceil(ALEXNET_BIAS_COLUMNS_TILE as usize),
        "{name} {shape:?}: one block per split and tile of channels"
    );
    // The launcher's grid, a small one of its blocks (the result must not change, bit for
    // bit: the grid only shares the work items out), and small blocks (two warps).
    let mut bits: Option<Vec<u32>> = None;
    let few_blocks = LaunchConfig {
        grid_dim: (3, 1, 1),
        ..sums
    };
    for (sums_grid, finish_grid) in [
        (sums, finish),
        (few_blocks, small_grid(32)),
        (small_grid(64), small_grid(32)),
    ] {
        let mut g = stored.to_vec();
        let mut partials = vec![f64::from_bits(u64::MAX); splits * channels];
        launch(
            &name,
            sums_grid,
            vec![buf(&mut g), buf(&mut partials), params(&mut p)],
        );
        let mut out = vec![f32::POISON; channels];
        launch(
            "bias_grad_finish_f32",
            finish_grid,
            vec![buf(&mut partials), buf(&mut out), params(&mut p)],
        );
        let what = format!(
            "{name} {shape:?} {layout:?} {splits} splits, {} blocks of {}",
            sums_grid.grid_dim.0, sums_grid.block_dim.0
        );
        if sums_grid.block_dim == sums.block_dim {
            let out_bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            let first = bits.get_or_insert_with(|| out_bits.clone());
            assert_eq!(*first, out_bits, "{what}: not the launcher grid's bits");
        }
        let got = ArrayD::from_shape_vec(IxDyn(&[channels]), out).unwrap();
        let err = rel_err(&got, want);
        assert!(err <= tolerance, "{what}: off by {err:e}");
    }
    true
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn bias_gradients_match_the_cpu_layers() {
    require_host_kernels();
    // A convolution's: Conv2d::backward on a [3, 4, 9, 7] input, 5 filters, 3x3 pad 1.
    let input = random((3, 4, 9, 7), 260, 1.0);
    let weight = random((5, 4, 3, 3), 261, 0.5);
    let conv = Conv2d::new(weight.view(), &random(5, 262, 0.1), 1, 1).unwrap();
    // Gradients of one sign in a channel, so a dropped position shows.
    let grad_out = random((3, 5, 9, 7), 263, 1.0).mapv(|v| v.abs() + 0.25);
    let cpu = conv
        .backward(input.view(), grad_out.view(), InputGradient::Skip)
        .unwrap();
    let want = cpu.bias.into_dyn();
    for layout in LAYOUTS {
        bias_grad_case::<f32>(&grad_out.clone().into_dyn(), layout, &want);
        bias_grad_case::<f16>(&grad_out.clone().into_dyn(), layout, &want);
        bias_grad_case::<bf16>(&grad_out.clone().into_dyn(), layout, &want);
    }
    // Gradients large enough that every thread sums several positions, stepping across image
    // boundaries: a plane wider than the block (inner 510), one narrower (inner 77), one as wide
    // as the small grid's 64-thread block, one whose 8,815 positions a channel take the
    // launcher's largest block (1,024 threads, a plane of 1,763 wider than it), and NHWC (inner
    // 1); against the plain f64 sum over images and pixels of what each kernel reads (f16: the
    // rounded gradient), within 1e-6, so one dropped or repeated position shows.
    let plain_sum = |grad: &Array4<f32>| {
        grad.mapv(f64::from)
            .sum_axis(ndarray::Axis(3))
            .sum_axis(ndarray::Axis(2))
            .sum_axis(ndarray::Axis(0))
            .mapv(|v| v as f32)
            .into_dyn()
    };
    // In NHWC the columns path splits their rows: 32, 11, 3, 138 and 4 splits, the first's and
    // the fourth's last one short; the fifth's 70 channels take three tiles of 32, the last one
    // partly filled.
    for (shape, stream) in [
        ([4, 3, 30, 17], 268),
        ([9, 2, 7, 11], 269),
        ([3, 2, 8, 8], 270),
        ([5, 2, 41, 43], 271),
        ([2, 70, 9, 13], 272),
    ] {
        let grad = random(shape, stream, 1.0).mapv(|v| v.abs() + 0.25);
        let grad16 = rounded::<f16, _>(&grad);
        let grad_bf16 = rounded::<bf16, _>(&grad);
        for layout in LAYOUTS {
            bias_grad_within::<f32>(&grad.clone().into_dyn(), layout, &plain_sum(&grad), 1e-6);
            bias_grad_within::<f16>(
                &grad16.clone().into_dyn(),
                layout,
                &plain_sum(&grad16),
                1e-6,
            );
            bias_grad_within::<bf16>(
                &grad_bf16.clone().into_dyn(),
                layout,
                &plain_sum(&grad_bf16),
                1e-6,
            );
        }
    }
    // A linear layer's: Linear::backward, 6 rows of 37 outputs.
    let x = random((6, 11), 264, 1.0);
    let linear = Linear::new(random((37, 11), 265, 0.5).view(), &random(37, 266, 0.1)).unwrap();
    let grad_rows = random((6, 37), 267, 1.0).mapv(|v| v.abs() + 0.25);
    let want = linear
        .backward(x.view(), grad_rows.view())
        .unwrap()
        .bias
        .into_dyn();
    bias_grad_case::<f32>(&grad_rows.clone().into_dyn(), Layout::Nchw, &want);
    bias_grad_case::<f16>(&grad_rows.clone().into_dyn(), Layout::Nchw, &want);
    bias_grad_case::<bf16>(&grad_rows.into_dyn(), Layout::Nchw, &want);
    // Longer linear gradients, split into 5 and 9 row ranges over two and four tiles, and an
    // empty one (no rows: one empty split, every channel's gradient 0).
    for (shape, stream) in [([300, 37], 273), ([520, 100], 274), ([0, 10], 275)] {
        let grad = random(shape, stream, 1.0).mapv(|v| v.abs() + 0.25);
        let grad16 = grad.mapv(|v| f16::from_f32(v).to_f32());
        let plain_sum = |g: &Array2<f32>| {
            g.mapv(f64::from)
                .sum_axis(ndarray::Axis(0))
                .mapv(|v| v as f32)
                .into_dyn()
        };
        bias_grad_within::<f32>(
            &grad.clone().into_dyn(),
            Layout::Nchw,
            &plain_sum(&grad),
            1e-6,
        );
        bias_grad_within::<f16>(
            &grad16.clone().into_dyn(),
            Layout::Nchw,
            &plain_sum(&grad16),
            1e-6,
        );
        let grad_bf16 = rounded::<bf16, _>(&grad);
        bias_grad_within::<bf16>(
            &grad_bf16.clone().into_dyn(),
            Layout::Nchw,
            &plain_sum(&grad_bf16),
            1e-6,
        );
    }
}

fn softmax_xent_case(logits: &Array2<f32>, labels: &[usize], block: u32) {
    let name = "softmax_xent_f32";
    let (rows, classes) = logits.dim();
    let want = softmax_cross_entropy(logits.view(), labels).unwrap();
    let (mut p, cfg) = softmax_xent_args(rows, classes).unwrap();
    let grid = LaunchConfig {
        block_dim: (block, 1, 1),
        ..cfg
    };
    let mut z: Vec<f32> = logits.iter().copied().collect();
    let mut label_buf: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let mut grad = vec![f32::POISON; rows * classes];
    let mut row_loss = vec![f64::NAN; rows];
    launch(
        name,
        grid,
        vec![
            buf(&mut z),
            buf(&mut label_buf),
            buf(&mut grad),
            buf(&mut row_loss),
            params(&mut p),
        ],
    );
    let what = format!("{name} {rows}x{classes} block={block}");
    let got = Array2::from_shape_vec((rows, classes), grad)
        .unwrap()
        .into_dyn();
    // f64 throughout like the CPU; only the order of the sums of exponentials differs.
    let err = rel_err(&got, &want.grad.clone().into_dyn());
    assert!(err <= 1e-6, "{what}: gradient off by {err:e}");
    let loss = (row_loss.iter().sum::<f64>() / rows as f64) as f32;
    let loss_err = ((loss - want.loss) / want.loss).abs();
    assert!(
        loss_err <= 1e-6,
        "{what}: loss {loss} against {}",
        want.loss
    );
    // Each row's loss, not only their mean (a swapped or repeated row would keep the mean
    // close): log-sum-exp in f64 written here, minus the label's logit.
    for (r, (row, &label)) in logits.outer_iter().zip(labels).enumerate() {
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        let want_row = max + sum.ln() - f64::from(row[label]);
        let err = ((row_loss[r] - want_row) / want_row.abs().max(f64::MIN_POSITIVE)).abs();
        assert!(
            err <= 1e-6,
            "{what}: row {r} loss {} against {want_row}",
            row_loss[r]
        );
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn softmax_cross_entropy_matches_the_cpu() {
    require_host_kernels();
    let wide = random((3, 1000), 250, 8.0);
    softmax_xent_case(&wide, &[0, 999, 517], ALEXNET_SOFTMAX_BLOCK);
    softmax_xent_case(&wide, &[5, 6, 7], 64);
    // Fewer classes than threads, and a row far from 0 (the maximum is subtracted first).
    let mut narrow = random((4, 7), 251, 3.0);
    narrow.row_mut(2).mapv_inplace(|v| v + 300.0);
    softmax_xent_case(&narrow, &[6, 0, 3, 3], 32);
    // A label the launcher's caller failed to check: NaN, not a read out of bounds.
    let (mut p, cfg) = softmax_xent_args(1, 4).unwrap();
    let mut z = vec![0.0f32; 4];
    let mut labels = vec![4u32];
    let mut grad = vec![0.0f32; 4];
    let mut row_loss = vec![0.0f64];
    launch(
        "softmax_xent_f32",
        cfg,
        vec![
            buf(&mut z),
            buf(&mut labels),
            buf(&mut grad),
            buf(&mut row_loss),
            params(&mut p),
        ],
    );
    assert!(row_loss[0].is_nan() && grad.iter().all(|g| g.is_nan()));
}

/// The parameter tensors of a tiny network (name, length): weights and biases alternating.
const SGD_TENSORS: [(&str, usize); 4] = [
    ("conv1.weight", 37),
    ("conv1.bias", 5),
    ("fc1.weight", 300),
    ("fc1.bias", 11),
];

/// Three SGD steps against the CPU optimiser, each tensor in its own allocation with an f16
/// copy (mixed precision's layer weights) on every step but the first, the learning rate a
/// tenth from the third (a schedule); then a step under a set overflow flag, which must change
/// nothing. The learning rate and first-step flag in the parameters, and read from the step
/// settings.
fn sgd_case(config: SgdConfig, seed: u64) {
    sgd_steps::<f16>(&SGD_TENSORS, config, seed, false, false);
    sgd_steps::<f16>(&SGD_TENSORS, config, seed, false, true);
}

/// The name that makes an entry of [`sgd_steps`]' tensors a padding segment: a gap the kernel
/// must neither read nor write, with no weights or copy.
const SGD_PADDING: &str = "(padding)";

/// The tensors of [`SGD_TENSORS`] with padding segments around and between them, of arbitrary
/// lengths (the trainer's gaps align each weight; the kernel only sees segments to skip): one
/// at either end of the launch's range and one between the layers.
const SGD_PADDED_TENSORS: [(&str, usize); 7] = [
    (SGD_PADDING, 3),
    ("conv1.weight", 37),
    ("conv1.bias", 5),
    (SGD_PADDING, 22),
    ("fc1.weight", 300),
    ("fc1.bias", 11),
    (SGD_PADDING, 1),
];

/// [`sgd_case`] over `tensors` (name, length; [`SGD_PADDING`] for a gap); with `mixed`, the copies (of type `C`, f16 or
/// bf16) and the skip flag (0 unless skipped) passed on every step, the first included, as the
/// trainer does under mixed precision (src/cuda/trainer/net.rs); without, copies of type `C`
/// are passed from the second step on. With `on_device` the learning rate and first-step flag are read
/// from the step settings, the parameters holding the trainer's learning rate of 0 and no
/// first step.
fn sgd_steps<C: Elem>(
    tensors: &[(&str, usize)],
    config: SgdConfig,
    seed: u64,
    mixed: bool,
    on_device: bool,
) {
    let what = format!(
        "sgd_f32 {} tensors mixed={mixed} {} copies on_device={on_device} {config:?}",
        tensors.len(),
        C::SUFFIX
    );
    let segments: Vec<SgdSegment> = tensors
        .iter()
        .map(|&(name, len)| match name {
            SGD_PADDING => SgdSegment::padding(len),
            _ => SgdSegment::named(name, len, &config),
        })
        .collect();
    // The flat layout (gaps included), and the parameter tensors alone.
    let flat_total: usize = tensors.iter().map(|t| t.1).sum();
    let in_gap: Vec<bool> = segments
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.padding, s.len))
        .collect();
    let parameters: Vec<(&str, usize)> = tensors
        .iter()
        .copied()
        .filter(|&(name, _)| name != SGD_PADDING)
        .collect();
    let lens: Vec<usize> = parameters.iter().map(|t| t.1).collect();
    let total: usize = lens.iter().sum();
    let without_gaps = |flat: &[f32]| -> Vec<f32> {
        flat.iter()
            .zip(&in_gap)
            .filter(|(_, &gap)| !gap)
            .map(|(&v, _)| v)
            .collect()
    };
    let mut cpu_weights = common::split_flat(&formula_values(seed, total, 0.5), &lens);
    let mut sgd = Sgd::new(config).unwrap();
    // Each tensor in its own allocation, as layers keep them; the kernel gets their addresses.
    let mut gpu_weights = common::split_flat(&formula_values(seed, total, 0.5), &lens);
    let mut copies: Vec<Vec<C>> = lens.iter().map(|&len| vec![C::POISON; len]).collect();
    // The first step must not read it; the gaps are never written.
    let mut velocity = vec![f32::POISON; flat_total];
    let as_array = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap();
    let mut learning_rate = config.learning_rate;
    for step in 0..4u64 {
        // Values in the gaps too: an update that read them would show.
        let flat_grads = formula_values(seed + 1 + step, flat_total, 2.0);
        let skipped = step == 3;
        if step == 2 {
            learning_rate = config.learning_rate / 10.0;
            sgd.set_learning_rate(learning_rate).unwrap();
        }
        if !skipped {
            let grads = common::flat_gradients(&parameters, &without_gaps(&flat_grads));
            sgd.step(cpu_weights.iter_mut().map(|w| &mut w[..]).collect(), &grads)
                .unwrap();
        }
        let now = SgdConfig {
            learning_rate,
            ..config
        };
        let mut settings = step_settings_args(learning_rate, 1.0, step == 0).unwrap();
        let (mut p, cfg) = match on_device {
            true => sgd_args(
                &SgdConfig {
                    learning_rate: 0.0,
                    ..config
                },
                &segments,
                false,
            ),
            false => sgd_args(&now, &segments, step == 0),
        }
        .unwrap();
        // The per-tensor buffers travel in the parameters, not as arguments: guarded here.
        let guard = |data: *mut c_void, bytes: usize| Guarded::new(data, bytes);
        let mut guarded: Vec<Guarded> = Vec::new();
        // A padding segment's addresses stay 0.
        let tensor_slots = || segments.iter().enumerate().filter(|(_, s)| !s.padding);
        for ((index, _), w) in tensor_slots().zip(gpu_weights.iter_mut()) {
            guarded.push(guard(
                w.as_mut_ptr().cast(),
                std::mem::size_of_val(w.as_slice()),
            ));
            p.weights[index] = guarded.last_mut().map_or(0, |g| g.start() as u64);
        }
        let with_copies = mixed || step > 0;
        if with_copies {
            p.copy_format = match C::SUFFIX {
                "f16" => ALEXNET_SGD_COPY_F16,
                "bf16" => ALEXNET_SGD_COPY_BF16,
                other => panic!("no {other} copies"),
            };
            for ((index, _), c) in tensor_slots().zip(copies.iter_mut()) {
                guarded.push(guard(
                    c.as_mut_ptr().cast(),
                    std::mem::size_of_val(c.as_slice()),
                ));
                p.copies[index] = guarded.last_mut().map_or(0, |g| g.start() as u64);
            }
        }
        let mut g = flat_grads.clone();
        let grid = if step == 1 { small_grid(32) } else { cfg };
        let mut flag = vec![u32::from(skipped)];
        let skip = if with_copies {
            buf(&mut flag)
        } else {
            null::<u32>()
        };
        let settings = match on_device {
            true => buf(std::slice::from_mut(&mut settings)),
            false => null::<AlexnetStepSettings>(),
        };
        launch_reaching(
            "sgd_f32",
            grid,
            vec![
                buf(&mut g),
                buf(&mut velocity),
                skip,
                settings,
                params(&mut p),
            ],
            &mut guarded,
        );
        let what = format!("{what} step {step} skipped={skipped}");
        for tensor in guarded {
            tensor
                .finish()
                .unwrap_or_else(|e| panic!("{what}: a weight or copy: {e}"));
        }
        let want_w = as_array(cpu_weights.concat());
        assert_same(
            &format!("{what} weights"),
            &as_array(gpu_weights.concat()),
            &want_w,
        );
        let want_v = as_array(sgd.velocity().concat());
        assert_same(
            &format!("{what} velocity"),
            &as_array(without_gaps(&velocity)),
            &want_v,
        );
        let gaps_written = velocity
            .iter()
            .zip(&in_gap)
            .filter(|(v, &gap)| gap && v.to_bits() != f32::POISON.to_bits())
            .count();
        assert_eq!(gaps_written, 0, "{what}: velocities written in the padding");
        if with_copies {
            let got_copies: Vec<f32> = copies.iter().flatten().map(|h| h.to_f32()).collect();
            let want_copies = want_w.mapv(|w| C::from_f32(w).to_f32());
            assert_same(
                &format!("{what} copies"),
                &as_array(got_copies),
                &want_copies,
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn sgd_matches_the_cpu_optimiser_in_both_rules() {
    require_host_kernels();
    for (i, rule) in [UpdateRule::PyTorch, UpdateRule::Paper]
        .into_iter()
        .enumerate()
    {
        for decay_biases in [true, false] {
            let config = SgdConfig {
                learning_rate: 0.05,
                momentum: 0.9,
                weight_decay: 0.01,
                rule,
                decay_biases,
            };
            sgd_case(config, 260 + 10 * i as u64);
            // Mixed precision's first step: first_step set, copies present, a skip flag of 0.
            sgd_steps::<f16>(&SGD_TENSORS, config, 300 + 10 * i as u64, true, false);
            // As the trainer launches it under f16 and bf16.
            sgd_steps::<f16>(&SGD_TENSORS, config, 305 + 10 * i as u64, true, true);
            sgd_steps::<bf16>(&SGD_TENSORS, config, 307 + 10 * i as u64, true, true);
            // With the gaps that keep each weight aligned, in both modes.
            sgd_steps::<f16>(
                &SGD_PADDED_TENSORS,
                config,
                309 + 10 * i as u64,
                false,
                true,
            );
            sgd_steps::<bf16>(&SGD_PADDED_TENSORS, config, 311 + 10 * i as u64, true, true);
        }
    }
    // The most tensors one launch takes (ALEXNET_SGD_SEGMENTS = 32): accepted, and every
    // segment's end, decay and addresses used; and a single tensor (no segment boundary).
    let names: Vec<String> = (0..32)
        .map(|i| {
            let kind = if i % 2 == 0 { "weight" } else { "bias" };
            format!("layer{}.{kind}", i / 2)
        })
        .collect();
    let tensors: Vec<(&str, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), 1 + i * 7 % 13))
        .collect();
    assert_eq!(tensors.len(), ALEXNET_SGD_SEGMENTS as usize);
    let config = SgdConfig {
        learning_rate: 0.05,
        momentum: 0.9,
        weight_decay: 0.01,
        rule: UpdateRule::PyTorch,
        decay_biases: false,
    };
    sgd_steps::<f16>(&tensors, config, 320, true, false);
    sgd_steps::<bf16>(&tensors, config, 324, true, false);
    sgd_steps::<f16>(&tensors, config, 321, false, false);
    sgd_steps::<f16>(&tensors, config, 323, false, true);
    sgd_steps::<f16>(&[("fc.weight", 129)], config, 322, true, false);
    // Too many tensors for one launch is an error, not a truncated update.
    let many = vec![
        SgdSegment {
            len: 1,
            decayed: true,
            padding: false,
        };
        33
    ];
    assert!(sgd_args(&SgdConfig::default(), &many, false).is_err());
}

/// The four runs of a kernel taking a loss scale: given by value, then read from the step
/// settings (`true`), each over the launcher's grid (`None`) and `small`.
fn scale_runs(small: LaunchConfig) -> [(bool, Option<LaunchConfig>); 4] {
    [
        (false, None),
        (false, Some(small)),
        (true, None),
        (true, Some(small)),
    ]
}

/// The step settings argument for a launch taking the loss scale `scale` from them
/// (`on_device`), with the parameters' scale at the launcher's 1; or null, with the scale in
/// the parameters. Gives the scale for the parameters.
fn scale_source(on_device: bool, scale: f32, settings: &mut AlexnetStepSettings) -> (Arg<'_>, f32) {
    *settings = step_settings_args(0.01, scale, false).unwrap();
    match on_device {
        true => (buf(std::slice::from_mut(settings)), 1.0),
        false => (null::<AlexnetStepSettings>(), scale),
    }
}

/// `grad_unscale` on `values` (rounded to `T` first: what a `T` backward produces) against the
/// CPU twin, with the launcher's grid and a small one, the scale given by value and read from
/// the step settings; `flag_before` is the flag's value going in (it is only ever set).
fn grad_unscale_case<T: Elem>(values: &[f32], scale: f32, flag_before: u32) {
    let name = format!("grad_unscale_{}", T::SUFFIX);
    let stored: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
    let read: Vec<f32> = stored.iter().map(|v| v.to_f32()).collect();
    let (want, overflowed) = unscale_gradients(&read, scale);
    for (on_device, grid) in scale_runs(small_grid(32)) {
        let mut settings = AlexnetStepSettings::default();
        let (settings, by_value) = scale_source(on_device, scale, &mut settings);
        let (mut p, cfg) = grad_unscale_args(values.len(), by_value).unwrap();
        let grid = grid.unwrap_or(cfg);
        let mut src = stored.clone();
        let mut dst = vec![f32::POISON; values.len()];
        let mut flag = vec![flag_before];
        launch(
            &name,
            grid,
            vec![
                buf(&mut src),
                buf(&mut dst),
                buf(&mut flag),
                settings,
                params(&mut p),
            ],
        );
        let what = format!(
            "{name} scale {scale} on_device={on_device} blocks={}",
            grid.grid_dim.0
        );
        let as_array = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap();
        assert_same(&what, &as_array(dst), &as_array(want.clone()));
        let want_flag = u32::from(overflowed) | flag_before;
        assert_eq!(flag[0], want_flag, "{what}: overflow flag");
    }
}

/// `grad_unscale_f32` with one buffer as both source and destination (the launch of
/// `unscale_gradients_in_place`), against the CPU twin, with the launcher's grid and a small one.
fn grad_unscale_in_place_case(values: &[f32], scale: f32) {
    let (want, overflowed) = unscale_gradients(values, scale);
    for (on_device, grid) in scale_runs(small_grid(32)) {
        let mut settings = AlexnetStepSettings::default();
        let (settings, by_value) = scale_source(on_device, scale, &mut settings);
        let (mut p, cfg) = grad_unscale_args(values.len(), by_value).unwrap();
        let grid = grid.unwrap_or(cfg);
        let mut grads = values.to_vec();
        let mut flag = vec![0u32];
        let grads_bytes = std::mem::size_of_val(grads.as_slice());
        let grads_ptr: *mut c_void = grads.as_mut_ptr().cast();
        launch(
            "grad_unscale_f32",
            grid,
            vec![
                Arg::Buffer(
                    grads_ptr,
                    grads_bytes,
                    Pointee::F32,
                    std::marker::PhantomData,
                ),
                Arg::Buffer(
                    grads_ptr,
                    grads_bytes,
                    Pointee::F32,
                    std::marker::PhantomData,
                ),
                buf(&mut flag),
                settings,
                params(&mut p),
            ],
        );
        let what = format!(
            "grad_unscale_f32 in place, scale {scale} on_device={on_device} blocks={}",
            grid.grid_dim.0
        );
        let as_array = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap();
        assert_same(&what, &as_array(grads), &as_array(want.clone()));
        assert_eq!(flag[0], u32::from(overflowed), "{what}: overflow flag");
    }
}

#[test]
#[cfg_attr(
    not(alexnet_cxx),
    ignore = "needs a C++20 compiler to build the kernels as host code, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn gradient_unscaling_matches_the_cpu_and_flags_overflow() {
    require_host_kernels();
    // Scaled gradients as a backward under loss scale 2^16 gives them, 1000 of them (several
    // blocks' worth for the small grid); then the same with an overflow at each end.
    let values = formula_values(280, 1000, 60000.0);
    for scale in [65536.0, 3.0] {
        grad_unscale_case::<f32>(&values, scale, 0);
        grad_unscale_case::<f16>(&values, scale, 0);
        grad_unscale_case::<bf16>(&values, scale, 0);
    }
    let mut overflowing = values.clone();
    overflowing[0] = f32::INFINITY;
    overflowing[999] = f32::NAN;
    grad_unscale_case::<f32>(&overflowing, 65536.0, 0);
    // f16 overflows where f32 does not: 70000 is beyond f16's largest finite value.
    let mut beyond_f16 = values.clone();
    beyond_f16[500] = 70000.0;
    grad_unscale_case::<f16>(&beyond_f16, 65536.0, 0);
    // bf16 keeps f32's range: 70000 is finite there, and bf16 infinities and NaNs are flagged.
    grad_unscale_case::<bf16>(&beyond_f16, 65536.0, 0);
    grad_unscale_case::<bf16>(&overflowing, 65536.0, 0);
    // A scale backed off below 1 can take a finite gradient past f32's range: flagged too.
    let mut past_f32 = values.clone();
    past_f32[300] = 3.0e38;
    grad_unscale_case::<f32>(&past_f32, 0.5, 0);
    grad_unscale_in_place_case(&past_f32, 0.5);
    grad_unscale_case::<f16>(&values, f32::MIN_POSITIVE, 0);
    grad_unscale_case::<bf16>(&past_f32, 0.5, 0);
    // A flag set by an earlier launch of the same step stays set.
    grad_unscale_case::<f32>(&values, 65536.0, 1);
    // In place, as `unscale_gradients_in_place` launches it for the biases: src == dst.
    grad_unscale_in_place_case(&values, 65536.0);
    grad_unscale_in_place_case(&overflowing, 3.0);
    assert!(grad_unscale_args(10, 0.0).is_err());
    assert!(grad_unscale_args(10, f32::INFINITY).is_err());
}
