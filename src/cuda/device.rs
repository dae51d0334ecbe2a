//! The device: one context with a compute stream and a copy stream, the cuBLAS and cuDNN
//! handles, and the kernel modules, loaded once (after the libraries are probed, see
//! [`super::libraries`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use super::abi::ALEXNET_BIAS_PARTIALS;
use super::blas::{blas_workspace_bytes, BlasHandle};
use super::cudnn::CudnnHandle;
use super::dtype::GpuDtype;
use super::launch::Kernels;
use super::libraries::{
    check_versions, driver_version, probe_libraries, unavailable, CudaLibrary, LibraryVersions,
    MIN_DRIVER_VERSION,
};
use super::registry::{self, Kernel, KernelSpec};
use super::self_test;
use super::workspace::{ConvWorkspace, DEFAULT_CONV_WORKSPACE_LIMIT};
use super::{nvrtc, ptx};
use crate::error::{Error, Result};

/// Where the kernels of a [`Gpu`] came from, best first (for several modules: the furthest
/// fallback any of them needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelOrigin {
    /// nvcc's fatbin, built with the crate: machine code for this GPU if it is one of the
    /// fatbin's architectures, otherwise its compute_75 PTX JIT-compiled by the driver.
    BuildTimeFatbin,
    /// nvcc's PTX, built with the crate, JIT-compiled by the driver (the fatbin was rejected).
    BuildTimePtx,
    /// Compiled at run time by NVRTC to machine code for this GPU (no nvcc at build time).
    NvrtcCubin,
    /// Compiled at run time by NVRTC to PTX (NVRTC does not know this GPU's architecture).
    NvrtcPtx,
}

/// One CUDA device ready to run layers: a context, a compute stream (all kernels, cuBLAS and
/// cuDNN), a copy stream (overlapped uploads), the library handles and every kernel, looked up
/// once.
///
/// Creating one probes every library first, so a machine without a GPU, a driver, cuBLAS or
/// cuDNN gets [`Error::DeviceUnavailable`] saying what to install — never a panic.
pub struct Gpu {
    // Field order is drop order: handles and kernels go before the streams and the context.
    cudnn: Mutex<CudnnHandle>,
    /// Shared by every convolution on this GPU.
    conv_workspace: Mutex<ConvWorkspace>,
    /// The bias gradients' partial sums (`ops::bias_grad`), `ALEXNET_BIAS_PARTIALS` values
    /// allocated once here, so a captured training step's address for them never moves. Locked
    /// across the two launches that write and read them.
    bias_partials: Mutex<CudaSlice<f64>>,
    blas: Mutex<BlasHandle>,
    /// cuBLAS's workspace (see `blas_workspace_bytes`); freed after the handle.
    _blas_workspace: CudaSlice<u8>,
    kernels: Kernels,
    kernel_origin: KernelOrigin,
    copy_stream: Arc<CudaStream>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    name: String,
    compute_capability: (i32, i32),
    libraries: LibraryVersions,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("compute_capability", &self.compute_capability)
            .field("kernel_origin", &self.kernel_origin)
            .finish_non_exhaustive()
    }
}

/// Maps a driver error to `Error::Cuda` naming `op`. Takes a `&'static str` so that the hot path
/// (every launch builds one of these) allocates nothing unless an error actually happens.
pub(crate) fn driver_err(op: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::cuda(op, e)
}

impl Gpu {
    /// Opens CUDA device `ordinal` (0 for the first GPU).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !CudaLibrary::Driver.is_present() {
            return Err(unavailable(CudaLibrary::Driver.install_hint()));
        }
        let version = driver_version()?;
        if version < MIN_DRIVER_VERSION {
            return Err(unavailable(format!(
                "the NVIDIA driver supports CUDA {}.{}, this build needs CUDA {}.{} or newer \
                 (driver R580+: its kernels are PTX ISA 9.0 and it calls CUDA 13 entry points); \
                 update the NVIDIA driver, or run on the CPU",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER_VERSION / 1000,
                MIN_DRIVER_VERSION % 1000 / 10
            )));
        }
        let count = CudaContext::device_count().map_err(|e| {
            let stub = e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_STUB_LIBRARY;
            unavailable(if stub {
                "a stub libcuda.so (the CUDA toolkit's lib64/stubs) was loaded instead of the \
                 NVIDIA driver's: remove the stubs directory from LD_LIBRARY_PATH"
                    .to_string()
            } else {
                format!(
                    "the NVIDIA driver could not be initialised ({e:?}){}; check that \
                     `nvidia-smi` lists a GPU, or run on the CPU",
                    visible_devices_note()
                )
            })
        })?;
        if count <= 0 {
            return Err(unavailable(format!(
                "the NVIDIA driver found no CUDA device{}; check `nvidia-smi`, or run on the CPU",
                visible_devices_note()
            )));
        }
        if ordinal >= count as usize {
            return Err(unavailable(format!(
                "CUDA device {ordinal} was requested but only {count} device(s) are present \
                 (counted from 0){}",
                visible_devices_note()
            )));
        }
        probe_libraries()?;
        let libraries = check_versions()?;

        let ctx = CudaContext::new(ordinal).map_err(|e| {
            unavailable(format!(
                "cannot create a context on CUDA device {ordinal}: {e:?}"
            ))
        })?;
        // SAFETY: from here on cudarc records no event per buffer use and inserts no
        // cross-stream waits (it only affects buffers allocated afterwards: none exist yet).
        // The crate orders its two streams itself, which is all that needs:
        // - buffers are used on the compute stream only, except two written on the copy stream:
        //   a pipeline slot's device input, written after `Pipeline::new` synchronised its
        //   allocation, read on the compute stream after `cuStreamWaitEvent` on the slot's
        //   upload event, and written again only after `finish` waited for the slot's download
        //   (or, after a failed submit, both streams were synchronised); and the trainer's
        //   staging buffer for the next batch (`Prefetch`), written after its allocation was
        //   synchronised and the copy stream waited on `consumed`, read after `uploaded`
        //   (the bias gradients' partial sums are compute-stream only too);
        // - page-locked host memory is read or rewritten only after a host wait on the event
        //   recorded after its copy (`finish_logits`, `top_k_u8`, `TopK::to_host`,
        //   `Pipeline::finish` and `input_buffer`, `run_u8`), since cudarc no longer records its
        //   own, or after a stream sync where an error may have left that event unrecorded;
        // - buffers are freed on the stream they were allocated on, after their last use
        //   there; a pipeline's slots only after both of their copy events completed.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(driver_err("cuDeviceGetName"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        supported_compute_capability(&name, compute_capability)?;
        let stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;
        let copy_stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;

        ctx.bind_to_thread()
            .map_err(driver_err("cuCtxSetCurrent"))?;
        // Allocated before the handle, so that on an early return below the handle (dropped
        // first, as the later local) never outlives its workspace.
        let mut blas_workspace = stream
            .alloc_zeros::<u8>(blas_workspace_bytes(compute_capability.0))
            .map_err(driver_err("allocating the cuBLAS workspace"))?;
        let blas = BlasHandle::new(&stream)?;
        blas.set_workspace(&mut blas_workspace, &stream)?;
        let bias_partials = stream
            .alloc_zeros::<f64>(ALEXNET_BIAS_PARTIALS as usize)
            .map_err(driver_err("allocating the bias gradients' partial sums"))?;
        let cudnn = CudnnHandle::new(&stream)?;

        let (modules, kernel_origin) = load_modules(&ctx, compute_capability)?;
        let kernels = Kernels::load(&modules)?;
        let gpu = Gpu {
            cudnn: Mutex::new(cudnn),
            conv_workspace: Mutex::new(ConvWorkspace::new(DEFAULT_CONV_WORKSPACE_LIMIT)),
            bias_partials: Mutex::new(bias_partials),
            blas: Mutex::new(blas),
            _blas_workspace: blas_workspace,
            kernels,
            kernel_origin,
            copy_stream,
            stream,
            ctx,
            name,
            compute_capability,
            libraries,
        };
        // A broken install (a cuDNN engine library missing, a cuBLAS that cannot run here) shows
        // now, as a reason to fall back to the CPU, instead of inside the first forward.
        self_test::run(&gpu)?;
        Ok(gpu)
    }

    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Where the kernels came from (build-time PTX or NVRTC).
    pub fn kernel_origin(&self) -> KernelOrigin {
        self.kernel_origin
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel, cuBLAS and cuDNN call runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream the overlapped uploads of [`super::Pipeline`] run on.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy_stream
    }

    /// Waits for all work on both streams.
    pub fn synchronize(&self) -> Result<()> {
        self.copy_stream
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))
    }

    /// Copies bytes to a new device buffer (e.g. a [`crate::image::U8Batch`]'s pixels).
    pub fn upload_bytes(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return Err(Error::invalid("upload", "no bytes to upload"));
        }
        self.stream
            .clone_htod(bytes)
            .map_err(driver_err("cuMemcpyHtoD"))
    }

    /// Makes this context current on the calling thread (cuBLAS and cuDNN calls use the
    /// current context).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("cuCtxSetCurrent"))
    }

    /// The registry entry and loaded function of `kernel` for `dtype`.
    pub(crate) fn kernel(
        &self,
        kernel: Kernel,
        dtype: GpuDtype,
    ) -> Result<(&'static KernelSpec, &cudarc::driver::CudaFunction)> {
        self.kernels.get(kernel, dtype)
    }

    pub(crate) fn blas(&self) -> Result<MutexGuard<'_, BlasHandle>> {
        self.blas
            .lock()
            .map_err(|_| Error::cuda("cuBLAS handle", "poisoned by a panic on another thread"))
    }

    /// The versions of cuBLAS, cuBLASLt and cuDNN in use, and the files they were loaded from.
    pub fn libraries(&self) -> &LibraryVersions {
        &self.libraries
    }

    /// The convolution workspace every layer on this GPU shares.
    pub(crate) fn conv_workspace(&self) -> Result<MutexGuard<'_, ConvWorkspace>> {
        self.conv_workspace
            .lock()
            .map_err(|_| Error::cuda("cuDNN workspace", "poisoned by a panic on another thread"))
    }

    /// The bias gradients' partial sums, held while a bias gradient is summed through them.
    pub(crate) fn bias_partials(&self) -> Result<MutexGuard<'_, CudaSlice<f64>>> {
        self.bias_partials.lock().map_err(|_| {
            Error::cuda(
                "bias gradient partial sums",
                "poisoned by a panic on another thread",
            )
        })
    }

    /// The cap on the convolution workspace shared by every layer (default
    /// [`DEFAULT_CONV_WORKSPACE_LIMIT`]): algorithms needing more are not considered.
    pub fn conv_workspace_limit(&self) -> Result<usize> {
        Ok(self.conv_workspace()?.limit())
    }

    /// Bytes the shared convolution workspace holds now: the most any chosen algorithm needs.
    pub fn conv_workspace_bytes(&self) -> Result<usize> {
        Ok(self.conv_workspace()?.allocated())
    }

    /// Sets the cap for algorithms chosen from now on.
    pub fn set_conv_workspace_limit(&self, bytes: usize) -> Result<()> {
        self.conv_workspace()?.set_limit(bytes);
        Ok(())
    }

    pub(crate) fn cudnn(&self) -> Result<MutexGuard<'_, CudnnHandle>> {
        self.cudnn
            .lock()
            .map_err(|_| Error::cuda("cuDNN handle", "poisoned by a panic on another thread"))
    }
}

/// Loads every module of the registry, the best code first: the build's fatbin (machine code
/// for this GPU where it has it), then the build's PTX (JIT-compiled by the driver), then the
/// embedded source compiled by NVRTC for this GPU (machine code, or PTX where NVRTC does not
/// know the architecture). Returns the modules and the furthest fallback any module needed.
fn load_modules(
    ctx: &Arc<CudaContext>,
    arch: (i32, i32),
) -> Result<(HashMap<&'static str, Arc<CudaModule>>, KernelOrigin)> {
    let mut modules = HashMap::new();
    let mut origin = KernelOrigin::BuildTimeFatbin;
    for &module in registry::MODULES {
        let (loaded, from) = load_module(ctx, module, arch)?;
        modules.insert(module, loaded);
        origin = origin.max(from);
    }
    Ok((modules, origin))
}

fn load_module(
    ctx: &Arc<CudaContext>,
    module: &'static str,
    arch: (i32, i32),
) -> Result<(Arc<CudaModule>, KernelOrigin)> {
    let mut problems = Vec::new();
    match ptx::module_fatbin(module) {
        // A copy: the driver wants the image aligned, which an embedded byte string need not be.
        Some(fatbin) => match load_image(ctx, module, "fatbin", fatbin.to_vec()) {
            Ok(loaded) => return Ok((loaded, KernelOrigin::BuildTimeFatbin)),
            Err(e) => problems.push(format!("its build-time fatbin was rejected ({e})")),
        },
        None => problems.push("this build has no fatbin (nvcc was not found at build time)".into()),
    }
    if let Some(text) = ptx::module_ptx(module) {
        match load_ptx(ctx, module, text) {
            Ok(loaded) => return Ok((loaded, KernelOrigin::BuildTimePtx)),
            Err(e) => problems.push(format!("its build-time PTX was rejected ({e})")),
        }
    }
    let problems = problems.join("; ");
    if !CudaLibrary::Nvrtc.is_present() {
        return Err(unavailable(format!(
            "kernels/{module}.cu: {problems}, and NVRTC (libnvrtc.so.13) could not be loaded to \
             compile it: rebuild with the CUDA 13.0 toolkit's nvcc found (see README, \
             \"Building the CUDA kernels\"), or install NVRTC (`pip install \
             \"nvidia-cuda-nvrtc==13.0.*\"`, or `apt install cuda-nvrtc-13-0`)"
        )));
    }
    match &*nvrtc::compile_for_device(module, arch)? {
        nvrtc::Compiled::Cubin(cubin) => {
            let loaded = load_image(ctx, module, "NVRTC's CUBIN", cubin.clone())?;
            Ok((loaded, KernelOrigin::NvrtcCubin))
        }
        nvrtc::Compiled::Ptx(text) => Ok((load_ptx(ctx, module, text)?, KernelOrigin::NvrtcPtx)),
    }
}

/// Loads a binary image (fatbin or CUBIN) with `cuModuleLoadData`.
fn load_image(
    ctx: &Arc<CudaContext>,
    module: &str,
    what: &str,
    image: Vec<u8>,
) -> Result<Arc<CudaModule>> {
    ctx.load_module(Ptx::from_binary(image))
        .map_err(|e| Error::cuda(format!("loading the {what} of kernels/{module}.cu"), e))
}

fn load_ptx(ctx: &Arc<CudaContext>, module: &str, text: &str) -> Result<Arc<CudaModule>> {
    let op = format!("loading the PTX of kernels/{module}.cu");
    // cudarc turns the text into a C string (and would panic on an inner NUL): strip trailing
    // terminators some build scripts embed, reject anything else.
    let text = text.trim_end_matches('\0');
    if text.contains('\0') {
        return Err(Error::cuda(op, "the PTX text contains a NUL byte"));
    }
    ctx.load_module(Ptx::from_src(text)).map_err(|e| {
        use cudarc::driver::sys::CUresult;
        let hint = match e.0 {
            CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                " (the PTX comes from a CUDA toolkit newer than this driver supports; update the \
                 NVIDIA driver)"
            }
            CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU | CUresult::CUDA_ERROR_INVALID_PTX => {
                " (the PTX targets an architecture this GPU cannot run)"
            }
            _ => "",
        };
        Error::cuda(format!("{op}{hint}"), e)
    })
}

/// Where `CUDA_VISIBLE_DEVICES` is set, a note saying so: it hides and renumbers GPUs, the
/// likeliest reason a GPU `nvidia-smi` lists is missing.
fn visible_devices_note() -> String {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(visible) => format!(" (CUDA_VISIBLE_DEVICES=\"{visible}\" limits the GPUs CUDA sees)"),
        Err(_) => String::new(),
    }
}

/// The oldest GPUs this build runs on: Turing (compute capability 7.5). CUDA 13's compilers,
/// cuBLAS and cuDNN support none older, and the kernels' PTX targets compute_75.
const MIN_COMPUTE_CAPABILITY: (i32, i32) = (7, 5);

/// Refuses a GPU older than [`MIN_COMPUTE_CAPABILITY`] by name, before anything fails on it
/// with a message about PTX or a library.
fn supported_compute_capability(name: &str, capability: (i32, i32)) -> Result<()> {
    if capability >= MIN_COMPUTE_CAPABILITY {
        return Ok(());
    }
    let (major, minor) = capability;
    let (need_major, need_minor) = MIN_COMPUTE_CAPABILITY;
    Err(unavailable(format!(
        "{name} has compute capability {major}.{minor}; this build needs {need_major}.{need_minor} \
         or newer (Turing, 2018, and later: CUDA 13 and its cuBLAS and cuDNN support no older \
         GPU); run on the CPU instead"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_older_than_turing_are_refused_by_name() {
        for supported in [(7, 5), (8, 0), (9, 0), (12, 0)] {
            assert!(supported_compute_capability("card", supported).is_ok());
        }
        for old in [(7, 0), (6, 1), (3, 5)] {
            match supported_compute_capability("Tesla V100-SXM2-16GB", old) {
                Err(Error::DeviceUnavailable(message)) => assert!(
                    message.contains("Tesla V100")
                        && message.contains(&format!("{}.{}", old.0, old.1))
                        && message.contains("7.5"),
                    "{message}"
                ),
                other => panic!("{old:?}: {other:?}"),
            }
        }
    }

    /// Runs everywhere: without a GPU (or a library) opening one is a typed error, never a
    /// panic; with one it opens.
    #[test]
    fn opening_a_gpu_never_panics() {
        match Gpu::new(0) {
            Ok(gpu) => assert!(!gpu.name().is_empty()),
            Err(Error::DeviceUnavailable(message)) => {
                assert!(!message.is_empty());
                eprintln!("no GPU here: {message}");
            }
            Err(other) => panic!("expected DeviceUnavailable without a usable GPU, got {other}"),
        }
    }
}
