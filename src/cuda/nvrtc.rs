//! Run-time compilation of the kernel sources with NVRTC, for builds that have no machine code
//! and no PTX (nvcc was not found at build time) or whose code the driver rejects: machine code
//! (CUBIN) for the device's own architecture where NVRTC knows it, PTX otherwise, compiled once
//! per process.
//!
//! Goes through `nvrtcCreateProgram` (cudarc's safe `compile_ptx` cannot pass headers) with the
//! `kernels/` headers given in memory, so no include directory is needed either way.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use super::ptx;
use crate::error::{CudaError, Error, Result};

/// The headers the kernel sources may `#include`, as `(include name, contents)`. The embedded
/// module sources have them inlined already ([`ptx::module_source`]); passing them as well
/// costs nothing and keeps sources that still include them compilable.
pub fn kernel_headers() -> &'static [(&'static str, &'static str)] {
    ptx::headers()
}

/// An NVRTC program (destroyed on drop) and the operation name for its errors.
struct Program(sys::nvrtcProgram, String);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `self.0` was created by nvrtcCreateProgram and is destroyed only here.
        let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

/// Creates the NVRTC program of `source` (the `.cu` text of `module`) with `headers`
/// resolvable by `#include "name"`.
fn program(module: &str, source: &str, headers: &[(&str, &str)]) -> Result<Program> {
    let op = format!("NVRTC compiling kernels/{module}.cu");
    let cstring = |what: &str, s: &str| {
        CString::new(s).map_err(|_| Error::cuda(op.clone(), format!("{what} contains a NUL byte")))
    };
    let src = cstring("the source", source)?;
    let name = cstring("the file name", &format!("{module}.cu"))?;
    let header_texts = headers
        .iter()
        .map(|(_, text)| cstring("a header", text))
        .collect::<Result<Vec<_>>>()?;
    let header_names = headers
        .iter()
        .map(|(n, _)| cstring("a header name", n))
        .collect::<Result<Vec<_>>>()?;
    let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let count =
        c_int::try_from(headers.len()).map_err(|_| Error::cuda(op.clone(), "too many headers"))?;

    let mut raw = MaybeUninit::uninit();
    // SAFETY: every pointer is a NUL-terminated string owned by a CString above that outlives
    // the call (NVRTC copies the sources at creation); the two header arrays have `count`
    // entries each; `raw` is written by NVRTC on success only and read only then.
    unsafe {
        sys::nvrtcCreateProgram(
            raw.as_mut_ptr(),
            src.as_ptr(),
            name.as_ptr(),
            count,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
        .result()
        .map_err(|e| Error::cuda(format!("{op}: nvrtcCreateProgram"), e))?;
        Ok(Program(raw.assume_init(), op))
    }
}

impl Program {
    /// Compiles with `options`; the error carries the compiler's log.
    fn compile(&self, options: &[String]) -> std::result::Result<(), CudaError> {
        // SAFETY: `self.0` is a live program (destroyed only by `Program::drop`).
        unsafe { result::compile_program(self.0, options) }.map_err(|source| {
            CudaError::NvrtcCompile {
                source,
                log: log(self),
            }
        })
    }

    /// The PTX of a successful compilation.
    fn ptx(&self) -> Result<String> {
        // SAFETY: the program compiled successfully and is still alive.
        let ptx = unsafe { result::get_ptx(self.0) }
            .map_err(|e| Error::cuda(format!("{}: nvrtcGetPTX", self.1), e))?;
        let bytes: Vec<u8> = ptx
            .into_iter()
            .map(|c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8(bytes)
            .map_err(|e| Error::cuda(self.1.clone(), format!("PTX is not UTF-8: {e}")))
    }

    /// The CUBIN (machine code) of a successful compilation for a real `sm_XY` architecture.
    fn cubin(&self) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: the program compiled successfully and is alive; `size` is a valid out-pointer.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }
            .result()
            .map_err(|e| Error::cuda(format!("{}: nvrtcGetCUBINSize", self.1), e))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC reported for this program's CUBIN.
        unsafe { sys::nvrtcGetCUBIN(self.0, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| Error::cuda(format!("{}: nvrtcGetCUBIN", self.1), e))?;
        Ok(cubin)
    }
}

/// Compiles `source` (the `.cu` text of `module`) to PTX for compute capability
/// `(major, minor)`, with `headers` resolvable by `#include "name"`. Falls back to the crate's
/// baseline (`compute_75`) when this NVRTC does not know the device's architecture.
pub fn compile(
    module: &str,
    source: &str,
    headers: &[(&str, &str)],
    arch: (i32, i32),
) -> Result<String> {
    let program = program(module, source, headers)?;
    let (major, minor) = arch;
    let with_arch = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    if let Err(first) = program.compile(&with_arch) {
        // An NVRTC older than the GPU does not know its architecture: the crate's baseline
        // target is still loadable (the driver JIT-compiles PTX forward).
        let baseline = vec![format!("--gpu-architecture={}", ptx::NVRTC_ARCH)];
        program.compile(&baseline).map_err(|second| {
            Error::cuda(
                format!(
                    "{} (for compute_{major}{minor}: {first}; then for {})",
                    program.1,
                    ptx::NVRTC_ARCH
                ),
                second,
            )
        })?;
    }
    program.ptx()
}

/// Compiles `source` to machine code (CUBIN) for the real architecture `sm_{major}{minor}`:
/// nothing left for the driver to JIT. Fails where this NVRTC does not know the architecture.
pub fn compile_cubin(
    module: &str,
    source: &str,
    headers: &[(&str, &str)],
    (major, minor): (i32, i32),
) -> Result<Vec<u8>> {
    let program = program(module, source, headers)?;
    program
        .compile(&[format!("--gpu-architecture=sm_{major}{minor}")])
        .map_err(|e| Error::cuda(format!("{} for sm_{major}{minor}", program.1), e))?;
    program.cubin()
}

/// What NVRTC made of one module for one device.
#[derive(Clone, Debug)]
pub(crate) enum Compiled {
    /// Machine code for the device's own architecture.
    Cubin(Vec<u8>),
    /// PTX (the device's architecture unknown to this NVRTC): the driver JIT-compiles it.
    Ptx(String),
}

/// The embedded source of `module` compiled for a device of compute capability `arch`: CUBIN
/// where NVRTC knows the architecture, PTX otherwise. Compiled once per process and
/// architecture: later devices and `Gpu`s reuse the result.
pub(crate) fn compile_for_device(module: &'static str, arch: (i32, i32)) -> Result<Arc<Compiled>> {
    /// (module, compute capability) -> what NVRTC made of it.
    type Cache = Mutex<HashMap<(&'static str, (i32, i32)), Arc<Compiled>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let lookup = |cache: &Cache| {
        cache
            .lock()
            .map(|map| map.get(&(module, arch)).cloned())
            .unwrap_or(None)
    };
    if let Some(done) = lookup(cache) {
        return Ok(done);
    }
    let source = ptx::module_source(module).ok_or_else(|| {
        Error::cuda(
            format!("kernels/{module}.cu"),
            "its source is not embedded in this build",
        )
    })?;
    let compiled = match compile_cubin(module, source, kernel_headers(), arch) {
        Ok(cubin) => Compiled::Cubin(cubin),
        Err(_) => Compiled::Ptx(compile(module, source, kernel_headers(), arch)?),
    };
    let compiled = Arc::new(compiled);
    if let Ok(mut map) = cache.lock() {
        map.insert((module, arch), compiled.clone());
    }
    Ok(compiled)
}

/// The compilation log of `program` (empty if it cannot be read).
fn log(program: &Program) -> String {
    // SAFETY: `program.0` is a live program.
    match unsafe { result::get_program_log(program.0) } {
        Ok(chars) => {
            let bytes: Vec<u8> = chars
                .into_iter()
                .map(|c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::libraries::CudaLibrary;
    use super::super::registry::MODULES;
    use super::*;

    /// Needs NVRTC (not a GPU): ignored with the reason where there is none, and failing with
    /// it under ALEXNET_REQUIRE_CUDA_TOOLS=1.
    #[test]
    #[cfg_attr(
        not(alexnet_nvrtc),
        ignore = "needs NVRTC (libnvrtc.so.13) on the loader path, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
    )]
    fn the_header_aware_path_compiles_every_module() {
        assert!(
            CudaLibrary::Nvrtc.is_present(),
            "NVRTC (libnvrtc.so.13) cannot be loaded: install it (tools/cuda-env.sh does) and \
             put it on LD_LIBRARY_PATH"
        );
        for module in MODULES {
            let source = ptx::module_source(module).expect("embedded source");
            let text = compile(module, source, kernel_headers(), (9, 0)).unwrap();
            ptx::check_module(module, &text).unwrap();
        }
        // Machine code for a real architecture: an ELF image.
        let source = ptx::module_source("lrn").expect("embedded source");
        let cubin = compile_cubin("lrn", source, kernel_headers(), (9, 0)).unwrap();
        assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF file");
        assert!(compile_cubin("lrn", source, kernel_headers(), (99, 9)).is_err());
        // A source that still includes the ABI header compiles: the headers are passed.
        let include = "#include \"alexnet_abi.h\"\n\
                       extern \"C\" __global__ void probe(AlexnetConvertParams p) {}\n";
        compile("probe", include, kernel_headers(), (9, 0)).unwrap();
        // An architecture this NVRTC does not know falls back to the baseline.
        compile("probe", include, kernel_headers(), (99, 9)).unwrap();
        // A broken source is a typed error carrying the compiler's log.
        match compile("broken", "this is not CUDA", kernel_headers(), (9, 0)) {
            Err(Error::Cuda {
                source: CudaError::NvrtcCompile { log, .. },
                ..
            }) => assert!(log.contains("error"), "{log}"),
            other => panic!("expected a compile error, got {other:?}"),
        }
    }
}
