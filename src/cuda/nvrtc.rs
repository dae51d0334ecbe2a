//! Run-time compilation of the kernel sources with NVRTC, for builds that have no PTX (nvcc was
//! not found at build time) or whose PTX the driver rejects (PTX newer than the driver).
//!
//! Goes through `nvrtcCreateProgram` (cudarc's safe `compile_ptx` cannot pass headers) with the
//! `kernels/` headers given in memory, so no include directory is needed either way.

use std::ffi::{c_char, c_int, CString};
use std::mem::MaybeUninit;

use cudarc::nvrtc::{result, sys};

use super::ptx;
use crate::error::{CudaError, Error, Result};

/// The headers the kernel sources may `#include`, as `(include name, contents)`. The embedded
/// module sources have them inlined already ([`ptx::module_source`]); passing them as well
/// costs nothing and keeps sources that still include them compilable.
pub fn kernel_headers() -> &'static [(&'static str, &'static str)] {
    ptx::headers()
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `self.0` was created by nvrtcCreateProgram and is destroyed only here.
        let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

/// Compiles `source` (the `.cu` text of `module`) to PTX for compute capability
/// `(major, minor)`, with `headers` resolvable by `#include "name"`. Falls back to NVRTC's
/// default architecture when this NVRTC does not know the device's.
pub fn compile(
    module: &str,
    source: &str,
    headers: &[(&str, &str)],
    arch: (i32, i32),
) -> Result<String> {
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
    // the program (NVRTC copies the sources at creation); the two header arrays have `count`
    // entries each; `raw` is written by NVRTC on success only and read only then.
    let program = unsafe {
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
        Program(raw.assume_init())
    };

    let (major, minor) = arch;
    let with_arch = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    let attempt = |options: &[String]| -> std::result::Result<(), CudaError> {
        // SAFETY: `program.0` is a live program (destroyed only by `Program::drop`).
        unsafe { result::compile_program(program.0, options) }.map_err(|source| {
            CudaError::NvrtcCompile {
                source,
                log: log(&program),
            }
        })
    };
    if let Err(first) = attempt(&with_arch) {
        // An NVRTC older than the GPU does not know its architecture: the crate's baseline
        // target is still loadable (the driver JIT-compiles PTX forward).
        let baseline = vec![format!("--gpu-architecture={}", ptx::NVRTC_ARCH)];
        attempt(&baseline).map_err(|second| {
            Error::cuda(
                format!(
                    "{op} (for compute_{major}{minor}: {first}; then for {})",
                    ptx::NVRTC_ARCH
                ),
                second,
            )
        })?;
    }
    // SAFETY: the program compiled successfully just above and is still alive.
    let ptx = unsafe { result::get_ptx(program.0) }
        .map_err(|e| Error::cuda(format!("{op}: nvrtcGetPTX"), e))?;
    let bytes: Vec<u8> = ptx
        .into_iter()
        .map(|c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8(bytes).map_err(|e| Error::cuda(op, format!("PTX is not UTF-8: {e}")))
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
