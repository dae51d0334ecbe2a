//! Every module's embedded source (`cuda::ptx::module_source`, headers inlined) compiles with
//! NVRTC for compute_75 through the crate's own NVRTC path (`cuda::nvrtc::compile`, the one
//! `Gpu::new` uses for builds made without nvcc), and the PTX it makes matches
//! `cuda::registry` as nvcc's does. No GPU needed, but NVRTC is: libnvrtc.so.13 and
//! libnvrtc-builtins.so.13.0 on the loader path (the `nvidia-cuda-nvrtc` wheel's
//! `nvidia/cu13/lib`; see README). Without them the test is ignored with that reason, or, with
//! `ALEXNET_REQUIRE_CUDA_TOOLS=1` (tools/test.sh, CI), fails with that message.

#![cfg(feature = "cuda")]

use alexnet_cuda::cuda::registry::MODULES;
use alexnet_cuda::cuda::{nvrtc, ptx};

fn require_nvrtc() {
    // SAFETY: only tries to dlopen libnvrtc under its usual names; no NVRTC function is called.
    // cudarc panics on the first call into a library it cannot load, so probe before any.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    assert!(
        present,
        "NVRTC (libnvrtc.so.13) cannot be loaded: this test needs it. Install it with \
         `pip install \"nvidia-cuda-nvrtc==13.0.*\"` and put the wheel's nvidia/cu13/lib on \
         LD_LIBRARY_PATH (see README, \"Building the CUDA kernels\")"
    );
}

fn compile(module: &str) -> String {
    let source = ptx::module_source(module)
        .unwrap_or_else(|| panic!("module {module:?} has no embedded source"));
    // compute_75: the crate's baseline target, as nvcc's PTX.
    nvrtc::compile(module, source, nvrtc::kernel_headers(), (7, 5))
        .unwrap_or_else(|e| panic!("NVRTC failed to compile {module}.cu: {e:?}"))
}

#[test]
#[cfg_attr(
    not(alexnet_nvrtc),
    ignore = "needs NVRTC (libnvrtc.so.13) on the loader path, and none was found at build time (tools/test.sh installs it); ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn every_module_compiles_with_nvrtc_and_matches_the_registry() {
    require_nvrtc();
    let mut problems = Vec::new();
    for module in MODULES {
        let text = compile(module);
        if let Err(found) = ptx::check_module(module, &text) {
            problems.extend(found);
        }
        if !text.lines().any(|l| l.trim() == ".target sm_75") {
            problems.push(format!("{module}: NVRTC's PTX is not for sm_75"));
        }
        match ptx::ptx_isa_version(&text) {
            Some(isa) if isa <= (9, 0) => {}
            isa => problems.push(format!(
                "{module}: NVRTC wrote PTX ISA {isa:?}; driver 580 (CUDA 13.0) takes at most \
                 9.0: use NVRTC 13.0"
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "NVRTC's PTX disagrees with src/cuda/registry.rs:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn sources_are_self_contained() {
    // NVRTC has no include path to kernels/: the embedded sources must not need one.
    for module in MODULES {
        let source = ptx::module_source(module).expect("embedded source");
        for line in source.lines() {
            let line = line.trim_start();
            assert!(
                !line.starts_with("#include"),
                "{module}: the embedded source still has `{line}`"
            );
        }
    }
    let names: Vec<&str> = ptx::headers().iter().map(|&(name, _)| name).collect();
    assert_eq!(
        names,
        [
            "alexnet_abi.h",
            "alexnet_half.cuh",
            "alexnet_lrn.cuh",
            "alexnet_reduce.cuh"
        ]
    );
}
