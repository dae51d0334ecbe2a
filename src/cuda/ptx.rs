//! The CUDA kernels as embedded by `build.rs`: every module's source (for NVRTC) and, when nvcc
//! was found at build time, its fatbin (machine code for today's cards plus compute_75 PTX) and
//! its PTX for `compute_75` alone.
//!
//! A module is a `.cu` file under `kernels/`, named by its stem (`"lrn"` for `kernels/lrn.cu`);
//! [`super::registry::MODULES`] lists them. The runtime loads [`module_ptx`] when present
//! and otherwise compiles [`module_source`] with NVRTC (see [`NVRTC_ARCH`]).

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The virtual architecture the embedded PTX targets; NVRTC compiles for the same by default
/// (`--gpu-architecture=compute_75`), or for the device's own `compute_XY`.
pub const NVRTC_ARCH: &str = "compute_75";

fn lookup(table: &'static [(&'static str, &'static str)], key: &str) -> Option<&'static str> {
    table.iter().find(|(k, _)| *k == key).map(|&(_, v)| v)
}

/// The source of `module`, self-contained: the `kernels/` headers it includes (`alexnet_abi.h`,
/// `alexnet_half.cuh`, `alexnet_lrn.cuh`, `alexnet_reduce.cuh`) are inlined, with `#line`
/// markers so compiler messages name the original files. Compile it with NVRTC as it is, no include path or header list
/// needed. `None` for an unknown module.
pub fn module_source(module: &str) -> Option<&'static str> {
    lookup(generated::SOURCES, module)
}

/// The PTX nvcc produced for `module` at build time (`nvcc --ptx -arch=compute_75 -O3`).
/// `None` for an unknown module, and for every module when the crate was built without nvcc
/// (see [`has_prebuilt_ptx`]); then compile [`module_source`] with NVRTC.
pub fn module_ptx(module: &str) -> Option<&'static str> {
    lookup(generated::PTX, module)
}

/// The fatbin nvcc produced for `module` at build time: machine code for every architecture of
/// [`fatbin_sass`] plus compute_75 PTX. `None` without nvcc at build time.
pub fn module_fatbin(module: &str) -> Option<&'static [u8]> {
    generated::FATBIN
        .iter()
        .find(|(k, _)| *k == module)
        .map(|&(_, v)| v)
}

/// The architectures the embedded fatbins carry machine code for (`sm_75`, ...).
pub fn fatbin_sass() -> &'static [&'static str] {
    generated::FATBIN_SASS
}

/// Whether the build found nvcc and embedded PTX for every module.
pub fn has_prebuilt_ptx() -> bool {
    !generated::PTX.is_empty()
}

/// The release of the nvcc that produced the embedded PTX (e.g. `"13.0"`), if any.
pub fn nvcc_version() -> Option<&'static str> {
    generated::NVCC_VERSION
}

/// The modules embedded (stems of `kernels/*.cu`), in name order.
pub fn modules() -> impl Iterator<Item = &'static str> {
    generated::SOURCES.iter().map(|&(module, _)| module)
}

/// The `kernels/` headers as (file name, text), e.g. `("alexnet_abi.h", "...")`, in the form
/// `nvrtcCreateProgram` takes (`headers` / `includeNames`) for a source that `#include`s them,
/// such as a test kernel. [`module_source`] needs none of this: it has them inlined.
pub fn headers() -> &'static [(&'static str, &'static str)] {
    generated::HEADERS
}

/// A kernel parameter as PTX declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtxParam {
    /// `.param .u64 NAME` (a pointer, or a 64-bit integer).
    U64,
    /// `.param .align ALIGN .b8 NAME[SIZE]` (a struct passed by value).
    Bytes { align: usize, size: usize },
    /// Anything else, as written.
    Other(String),
}

/// A kernel (`.visible .entry`) of a PTX module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxEntry {
    pub name: String,
    pub params: Vec<PtxParam>,
}

/// The kernels a PTX module defines, in order, with their parameters.
pub fn ptx_entries(ptx: &str) -> Vec<PtxEntry> {
    let mut entries = Vec::new();
    let mut rest = ptx;
    while let Some(start) = rest.find(".entry ") {
        rest = &rest[start + ".entry ".len()..];
        let Some(open) = rest.find('(') else { break };
        let name = rest[..open].trim().to_string();
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        let params = rest[open + 1..open + close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(parse_param)
            .collect();
        entries.push(PtxEntry { name, params });
        rest = &rest[open + close..];
    }
    entries
}

fn parse_param(text: &str) -> PtxParam {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    match tokens.as_slice() {
        [".param", ".u64", ..] => PtxParam::U64,
        [".param", ".align", align, ".b8", array] => {
            let size = array
                .split_once('[')
                .and_then(|(_, s)| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok());
            match (align.parse(), size) {
                (Ok(align), Some(size)) => PtxParam::Bytes { align, size },
                _ => PtxParam::Other(text.to_string()),
            }
        }
        _ => PtxParam::Other(text.to_string()),
    }
}

/// The PTX ISA version a module declares (`.version 9.0` -> `(9, 0)`). CUDA 13.0 writes 9.0; a
/// driver rejects a version newer than its own toolkit's (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
pub fn ptx_isa_version(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))?;
    let (major, minor) = line.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Checks a compiled module against [`super::registry::KERNELS`]: every kernel of `module`
/// is defined, with as many parameters as its launcher passes, a `.u64` for each
/// [`Param::Ptr`](super::registry::Param::Ptr) and a byte array of exactly the struct's size
/// for each [`Param::Struct`](super::registry::Param::Struct); and the module defines no
/// kernel the table lacks (a kernel nothing can launch). Returns every problem found.
pub fn check_module(module: &str, ptx: &str) -> Result<(), Vec<String>> {
    use super::registry::{Param, KERNELS};
    let entries = ptx_entries(ptx);
    let mut problems = Vec::new();
    for spec in KERNELS.iter().filter(|k| k.module == module) {
        let Some(entry) = entries.iter().find(|e| e.name == spec.name) else {
            problems.push(format!("{module}: kernel {} is missing", spec.name));
            continue;
        };
        if entry.params.len() != spec.params.len() {
            problems.push(format!(
                "{module}: {} takes {} parameters in PTX, the launcher passes {}",
                spec.name,
                entry.params.len(),
                spec.params.len()
            ));
            continue;
        }
        for (index, (want, got)) in spec.params.iter().zip(&entry.params).enumerate() {
            let ok = match (want, got) {
                (Param::Ptr(_), PtxParam::U64) => true,
                (Param::Struct(_, size), PtxParam::Bytes { size: got, .. }) => size == got,
                _ => false,
            };
            if !ok {
                problems.push(format!(
                    "{module}: {} parameter {index}: the launcher passes {want:?}, PTX declares {got:?}",
                    spec.name
                ));
            }
        }
    }
    for entry in &entries {
        if !KERNELS
            .iter()
            .any(|k| k.module == module && k.name == entry.name)
        {
            problems.push(format!(
                "{module}: kernel {} is not in the registry (src/cuda/registry.rs: add it, or make it a \
                 __device__ function)",
                entry.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
