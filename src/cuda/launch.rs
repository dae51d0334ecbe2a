//! Kernel functions looked up once per context, the checked [`Launch`] every launcher goes
//! through, the parameter structs made passable by value, and the launch-size arithmetic.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};

use super::abi::*;
use super::device::Gpu;
use super::dtype::GpuDtype;
use super::registry::{Kernel, KernelSpec, Param, Pointee, KERNELS};
use crate::error::{Error, Result};

// SAFETY: each is a `#[repr(C)]` plain-old-data struct from `kernels/alexnet_abi.h` (integers and
// floats only, no pointers or padding-dependent invariants); the kernels take them by value with
// the same layout, which `tests/ptx_kernels.rs` checks against the PTX parameter sizes.
unsafe impl DeviceRepr for AlexnetTensorShape {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetPrepareParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetRelayoutParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetBiasActParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetLrnParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetPoolParams {}
// SAFETY: as above (two of the structs above and an integer).
unsafe impl DeviceRepr for AlexnetConvEpilogueParams {}
// SAFETY: as above (one of the structs above and an integer).
unsafe impl DeviceRepr for AlexnetPoolBackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetDropoutParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetSoftmaxParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetConvertParams {}
// SAFETY: as above: plain `repr(C)` integers and floats, no pointers or padding-sensitive fields.
unsafe impl DeviceRepr for AlexnetReluBackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetSoftmaxXentParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetSgdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetBiasGradParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetBiasColumnsParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetGradUnscaleParams {}
// SAFETY: as above (three floats and an integer). Also kept in device memory
// (`ops::StepSettings`), where the kernels read it through a pointer with this layout.
unsafe impl DeviceRepr for AlexnetStepSettings {}

/// A parameter struct of `kernels/alexnet_abi.h` passed by value, by its C name.
pub(crate) trait AbiStruct: DeviceRepr {
    const NAME: &'static str;
}

macro_rules! abi_structs {
    ($($name:ident),+ $(,)?) => {$(
        impl AbiStruct for $name {
            const NAME: &'static str = stringify!($name);
        }
    )+};
}

abi_structs!(
    AlexnetPrepareParams,
    AlexnetRelayoutParams,
    AlexnetBiasActParams,
    AlexnetLrnParams,
    AlexnetPoolParams,
    AlexnetConvEpilogueParams,
    AlexnetPoolBackwardParams,
    AlexnetDropoutParams,
    AlexnetSoftmaxParams,
    AlexnetConvertParams,
    AlexnetReluBackwardParams,
    AlexnetSoftmaxXentParams,
    AlexnetSgdParams,
    AlexnetBiasGradParams,
    AlexnetBiasColumnsParams,
    AlexnetGradUnscaleParams,
);

/// A Rust element type of device buffers and what it is in the kernels' C signatures. Public
/// as a supertrait of [`super::GpuFloat`] and for the host-executed tests
/// (`cuda::kernel_args`); implementing it for another type gives that type no launch.
pub trait KernelElem {
    const POINTEE: Pointee;
}

macro_rules! kernel_elems {
    ($($ty:ty => $pointee:ident),+ $(,)?) => {$(
        impl KernelElem for $ty {
            const POINTEE: Pointee = Pointee::$pointee;
        }
    )+};
}

kernel_elems!(
    f32 => F32,
    f16 => F16,
    bf16 => Bf16,
    f64 => F64,
    u8 => U8,
    u32 => U32,
    u64 => U64,
    AlexnetStepSettings => StepSettings,
);

/// A device buffer a launcher passes as a pointer argument, and its element's [`Pointee`].
pub(crate) trait DeviceBuffer {
    const POINTEE: Pointee;
}

impl<T: KernelElem> DeviceBuffer for &CudaSlice<T> {
    const POINTEE: Pointee = T::POINTEE;
}
impl<T: KernelElem> DeviceBuffer for &mut CudaSlice<T> {
    const POINTEE: Pointee = T::POINTEE;
}
impl<T: KernelElem> DeviceBuffer for &CudaView<'_, T> {
    const POINTEE: Pointee = T::POINTEE;
}
impl<T: KernelElem> DeviceBuffer for &mut CudaView<'_, T> {
    const POINTEE: Pointee = T::POINTEE;
}
impl<T: KernelElem> DeviceBuffer for &CudaViewMut<'_, T> {
    const POINTEE: Pointee = T::POINTEE;
}
impl<T: KernelElem> DeviceBuffer for &mut CudaViewMut<'_, T> {
    const POINTEE: Pointee = T::POINTEE;
}

/// Every kernel of the registry, looked up once per context, in [`KERNELS`] order.
#[derive(Debug)]
pub(crate) struct Kernels {
    functions: Vec<CudaFunction>,
}

impl Kernels {
    /// Looks every registry entry up in `modules` (module name -> loaded module).
    pub fn load(modules: &HashMap<&'static str, Arc<CudaModule>>) -> Result<Self> {
        let functions = KERNELS
            .iter()
            .map(|spec| {
                let op = || format!("kernel {} of kernels/{}.cu", spec.name, spec.module);
                let module = modules
                    .get(spec.module)
                    .ok_or_else(|| Error::cuda(op(), "its module was not loaded"))?;
                module
                    .load_function(spec.name)
                    .map_err(|e| Error::cuda(op(), e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Kernels { functions })
    }

    /// The registry entry and loaded function of `kernel` for `dtype`.
    pub fn get(
        &self,
        kernel: Kernel,
        dtype: GpuDtype,
    ) -> Result<(&'static KernelSpec, &CudaFunction)> {
        KERNELS
            .iter()
            .zip(&self.functions)
            .find(|(spec, _)| spec.kernel == kernel && spec.dtype == dtype)
            .ok_or_else(|| {
                Error::cuda(
                    format!("kernel {kernel:?}"),
                    format!("not compiled for {dtype:?} (see src/cuda/registry.rs)"),
                )
            })
    }
}

/// Most parameters a kernel of the registry takes.
const MAX_PARAMS: usize = 8;

/// One kernel launch on the compute stream whose arguments are checked against the registry
/// entry (count, each pointer's element type, each struct's name and size) before it runs: a
/// launcher that disagrees with the kernel's declared signature gets an error, never a launch
/// with a misread parameter block or f16 data read as f32. `tests/kernel_signatures.rs` checks
/// the registry against the kernels' C signatures.
pub(crate) struct Launch<'a> {
    args: LaunchArgs<'a>,
    spec: &'static KernelSpec,
    passed: [Param; MAX_PARAMS],
    count: usize,
}

impl<'a> Launch<'a> {
    pub fn new(gpu: &'a Gpu, kernel: Kernel, dtype: GpuDtype) -> Result<Self> {
        let (spec, function) = gpu.kernel(kernel, dtype)?;
        Ok(Launch {
            args: gpu.stream().launch_builder(function),
            spec,
            passed: [Param::Ptr(Pointee::U8); MAX_PARAMS],
            count: 0,
        })
    }

    fn record(&mut self, param: Param) {
        if let Some(slot) = self.passed.get_mut(self.count) {
            *slot = param;
        }
        self.count += 1;
    }

    /// A device buffer (a pointer parameter to its element type).
    pub fn buffer<A: DeviceBuffer>(&mut self, arg: A) -> &mut Self
    where
        LaunchArgs<'a>: PushKernelArg<A>,
    {
        self.args.arg(arg);
        self.record(Param::Ptr(A::POINTEE));
        self
    }

    /// A device address of `T` values (a buffer taken apart, e.g. to pass it twice).
    pub fn address<T: KernelElem>(&mut self, address: &'a u64) -> &mut Self {
        self.args.arg(address);
        self.record(Param::Ptr(T::POINTEE));
        self
    }

    /// A null pointer parameter to `T` (where the kernel's ABI allows one).
    pub fn null_buffer<T: KernelElem>(&mut self) -> &mut Self {
        static NULL: u64 = 0;
        self.address::<T>(&NULL)
    }

    /// A pointer parameter that the kernel's ABI lets be null: the buffer, or null for `None`.
    pub fn optional_buffer<T: KernelElem>(&mut self, arg: Option<&'a CudaSlice<T>>) -> &mut Self
    where
        LaunchArgs<'a>: PushKernelArg<&'a CudaSlice<T>>,
    {
        match arg {
            Some(buffer) => self.buffer(buffer),
            None => self.null_buffer::<T>(),
        }
    }

    /// A parameter struct passed by value.
    pub fn params<P: AbiStruct>(&mut self, params: &'a P) -> &mut Self {
        self.args.arg(params);
        self.record(Param::Struct(P::NAME, size_of::<P>()));
        self
    }

    /// Checks the arguments against the registry and launches.
    ///
    /// # Safety
    /// The caller guarantees what the registry cannot see: every buffer holds as many elements
    /// as the kernel will touch for these parameters and `cfg`, and buffers the kernel writes do
    /// not alias buffers it reads unless its ABI says they may.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        check_arguments(
            self.spec,
            &self.passed[..self.count.min(MAX_PARAMS)],
            self.count,
        )?;
        // SAFETY: the argument kinds and sizes match the kernel's declared signature (checked
        // just above; the registry is checked against the compiled PTX by the tests); the
        // caller vouches for the buffers' sizes and aliasing.
        unsafe { self.args.launch(cfg) }
            .map(|_| ())
            .map_err(|e| Error::cuda(format!("launching {}", self.spec.name), e))
    }
}

/// The registry's parameter list for `spec` against what a launcher passed (`count` arguments,
/// the first of which are `passed`).
fn check_arguments(spec: &KernelSpec, passed: &[Param], count: usize) -> Result<()> {
    // Every launch comes here: compared in place, the declared list is built only for an error.
    let agrees = count == passed.len()
        && passed.len() == spec.params.len()
        && passed
            .iter()
            .zip(spec.params)
            .all(|(passed, declared)| *passed == declared.resolved(spec.dtype));
    if agrees {
        return Ok(());
    }
    let declared: Vec<Param> = spec.params.iter().map(|p| p.resolved(spec.dtype)).collect();
    Err(Error::cuda(
        format!("launching {}", spec.name),
        format!(
            "the launcher passes {count} arguments {passed:?}, src/cuda/registry.rs declares \
             {declared:?}"
        ),
    ))
}

/// Largest grid x-dimension CUDA allows.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// One thread per element in blocks of `ALEXNET_BLOCK_1D`: the launch of every element-wise
/// kernel. `len` must be positive and the grid must fit.
pub(crate) fn grid_1d(op: &str, len: u64) -> Result<LaunchConfig> {
    if len == 0 {
        return Err(Error::invalid(
            "launch size",
            format!("{op}: nothing to do (0 elements)"),
        ));
    }
    let block = u64::from(ALEXNET_BLOCK_1D);
    let blocks = len.div_ceil(block);
    if blocks > MAX_GRID_X {
        return Err(Error::invalid(
            "launch size",
            format!("{op}: {len} elements need {blocks} blocks, more than CUDA's {MAX_GRID_X}"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ALEXNET_BLOCK_1D, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block of `ALEXNET_SOFTMAX_BLOCK` threads per row.
pub(crate) fn grid_rows(op: &str, rows: u32) -> Result<LaunchConfig> {
    if rows == 0 || u64::from(rows) > MAX_GRID_X {
        return Err(Error::invalid(
            "launch size",
            format!("{op}: {rows} rows (need 1 ..= {MAX_GRID_X})"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (ALEXNET_SOFTMAX_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The number of elements of a tensor of `dims`, as a launch size (checked: no overflow).
pub(crate) fn element_count(dims: &[usize]) -> Result<u64> {
    dims.iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| Error::invalid("launch size", format!("{dims:?} overflows")))
}

/// `v` as a `u32` kernel parameter, or an error naming `what`.
pub(crate) fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::invalid(
            "launch size",
            format!("{op}: {what} = {v} does not fit the kernel's 32-bit parameter"),
        )
    })
}

/// `v` as an `i32` library parameter (cuBLAS, cuDNN), or an error naming `what`.
pub(crate) fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(
            "launch size",
            format!("{op}: {what} = {v} does not fit the library's 32-bit int"),
        )
    })
}

/// The kernel ABI's shape struct for logical dims `[n, c, h, w]` in `layout`.
pub(crate) fn abi_shape(op: &str, dims: [usize; 4], nhwc: bool) -> Result<AlexnetTensorShape> {
    let [n, c, h, w] = dims;
    // The kernels index with 32-bit thread counts per dimension but 64-bit element offsets;
    // every dimension must fit 32 bits.
    Ok(AlexnetTensorShape {
        n: to_u32(op, "n", n)?,
        c: to_u32(op, "c", c)?,
        h: to_u32(op, "h", h)?,
        w: to_u32(op, "w", w)?,
        layout: if nhwc {
            ALEXNET_LAYOUT_NHWC
        } else {
            ALEXNET_LAYOUT_NCHW
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_every_element() {
        let cfg = grid_1d("t", 257).unwrap();
        assert!(cfg.grid_dim.0 * cfg.block_dim.0 >= 257);
        assert_eq!(cfg.grid_dim.0, 2);
        assert!(grid_1d("t", 0).is_err());
        assert!(grid_1d("t", u64::MAX).is_err());
    }

    #[test]
    fn a_launcher_that_disagrees_with_the_registry_is_refused() {
        use Param::{Ptr, Struct};
        use Pointee::{F16, F32};
        let lrn = Struct("AlexnetLrnParams", size_of::<AlexnetLrnParams>());
        let spec = Kernel::Lrn.spec(GpuDtype::F32).unwrap();
        let right = [Ptr(F32), Ptr(F32), lrn];
        assert!(check_arguments(spec, &right, 3).is_ok());
        // One pointer short, a struct of the wrong size, another struct of the same size, and
        // one argument too many.
        assert!(check_arguments(spec, &right[..2], 2).is_err());
        assert!(check_arguments(
            spec,
            &[Ptr(F32), Ptr(F32), Struct("AlexnetLrnParams", 4)],
            3
        )
        .is_err());
        let impostor = Struct("AlexnetPoolParams", size_of::<AlexnetLrnParams>());
        assert!(check_arguments(spec, &[Ptr(F32), Ptr(F32), impostor], 3).is_err());
        assert!(check_arguments(spec, &[Ptr(F32), Ptr(F32), lrn, Ptr(F32)], 4).is_err());
        assert!(check_arguments(spec, &right, 9).is_err());
        // Buffers of the other storage type: f16 data given to the f32 kernel, and the f16
        // entry (whose storage-typed pointers are f16) given f32 data.
        assert!(check_arguments(spec, &[Ptr(F16), Ptr(F32), lrn], 3).is_err());
        let lrn_f16 = Kernel::Lrn.spec(GpuDtype::F16).unwrap();
        assert!(check_arguments(lrn_f16, &[Ptr(F16), Ptr(F16), lrn], 3).is_ok());
        assert!(check_arguments(lrn_f16, &right, 3).is_err());
    }
}
