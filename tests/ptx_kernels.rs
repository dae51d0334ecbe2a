//! The PTX nvcc made at build time against `cuda::registry`: every kernel the launchers use
//! exists in its module with the parameters they pass (count, pointers as `.u64`, parameter
//! structs by value with the Rust struct's size), no module defines a kernel the table lacks,
//! and the PTX is loadable by the target driver (ISA <= 9.0, CUDA 13.0's). No GPU needed.
//!
//! The PTX tests need nvcc at build time (set `NVCC` or `CUDA_HOME`, or put nvcc on PATH; see
//! README): built without it they are ignored with that reason, and with
//! `ALEXNET_REQUIRE_CUDA_TOOLS=1` (tools/test.sh, CI) they run and fail instead.

#![cfg(feature = "cuda")]

use alexnet_cuda::cuda::ptx;
use alexnet_cuda::cuda::registry::{KERNELS, MODULES};

/// PTX ISA of CUDA 13.0, the newest that driver 580 (the GPU machines') accepts.
const NEWEST_PTX_ISA: (u32, u32) = (9, 0);

fn prebuilt(module: &str) -> &'static str {
    ptx::module_ptx(module).unwrap_or_else(|| {
        panic!(
            "no PTX for module {module:?}: this crate was built without nvcc, which this test \
             requires (set NVCC=/path/to/nvcc or CUDA_HOME, or put nvcc on PATH, and rebuild; \
             see README, \"Building the CUDA kernels\")"
        )
    })
}

#[test]
fn modules_are_the_kernel_files() {
    let mut table: Vec<&str> = MODULES.to_vec();
    table.sort_unstable();
    let embedded: Vec<&str> = ptx::modules().collect();
    assert_eq!(
        table, embedded,
        "registry::MODULES must list exactly the kernels/*.cu files"
    );
    for spec in KERNELS {
        assert!(
            MODULES.contains(&spec.module),
            "{} is in module {:?}, which MODULES lacks",
            spec.name,
            spec.module
        );
    }
}

#[test]
#[cfg_attr(
    not(alexnet_nvcc),
    ignore = "needs nvcc at build time, and none was found (see README, Building the CUDA kernels; tools/test.sh installs it); ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn ptx_matches_the_registry() {
    let mut problems = Vec::new();
    for module in MODULES {
        if let Err(found) = ptx::check_module(module, prebuilt(module)) {
            problems.extend(found);
        }
    }
    assert!(
        problems.is_empty(),
        "nvcc's PTX disagrees with src/cuda/registry.rs:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
#[cfg_attr(
    not(alexnet_nvcc),
    ignore = "needs nvcc at build time, and none was found (see README, Building the CUDA kernels; tools/test.sh installs it); ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn ptx_targets_compute_75_and_an_old_enough_isa() {
    for module in MODULES {
        let text = prebuilt(module);
        let isa = ptx::ptx_isa_version(text)
            .unwrap_or_else(|| panic!("{module}: no .version line in the PTX"));
        assert!(
            isa <= NEWEST_PTX_ISA,
            "{module}: PTX ISA {}.{} is newer than {}.{} (CUDA 13.0): the GPU machines' driver \
             580 would reject it; build with nvcc 13.0 (nvcc here: {:?})",
            isa.0,
            isa.1,
            NEWEST_PTX_ISA.0,
            NEWEST_PTX_ISA.1,
            ptx::nvcc_version()
        );
        assert!(
            text.lines().any(|l| l.trim() == ".target sm_75"),
            "{module}: PTX is not for sm_75 (compute_75)"
        );
    }
}

/// cuobjdump, beside the nvcc that built the crate (tools/cuda-env.sh installs both).
fn cuobjdump() -> std::path::PathBuf {
    let nvcc = option_env!("ALEXNET_BUILD_NVCC")
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("NVCC"))
        .expect(
            "the build used no nvcc: run through tools/test.sh, which installs nvcc and cuobjdump",
        );
    let path = std::path::Path::new(&nvcc).with_file_name("cuobjdump");
    assert!(
        path.is_file(),
        "{} is missing: tools/cuda-env.sh installs it (nvidia-cuda-cuobjdump)",
        path.display()
    );
    path
}

#[test]
#[cfg_attr(
    not(alexnet_nvcc),
    ignore = "needs nvcc at build time, and none was found (see README, Building the CUDA kernels; tools/test.sh installs it); ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn fatbins_carry_machine_code_for_todays_cards_and_compute_75_ptx() {
    let dir = tempfile::tempdir().unwrap();
    for module in MODULES {
        let fatbin = ptx::module_fatbin(module).unwrap_or_else(|| {
            panic!("no fatbin for {module:?}: the crate was built without nvcc")
        });
        let file = dir.path().join(format!("{module}.fatbin"));
        std::fs::write(&file, fatbin).unwrap();
        let list = |flag: &str| {
            let out = std::process::Command::new(cuobjdump())
                .arg(flag)
                .arg(&file)
                .output()
                .unwrap();
            assert!(out.status.success(), "cuobjdump {flag} failed on {module}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let elf = list("--list-elf");
        for sm in ptx::fatbin_sass() {
            assert!(
                elf.contains(&format!(".{sm}.cubin")),
                "{module}: no {sm} machine code in the fatbin:\n{elf}"
            );
        }
        let ptx_list = list("--list-ptx");
        assert!(
            ptx_list.contains(".sm_75.ptx"),
            "{module}: no compute_75 PTX in the fatbin:\n{ptx_list}"
        );
    }
    // Turing (the oldest card supported: T4s should not JIT every module), Hopper (the H200 the
    // first GPU run has) and, from an nvcc that knows it (12.8 on), Blackwell are among them.
    let knows_blackwell = ptx::nvcc_version()
        .and_then(|v| v.split_once('.'))
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)))
        .is_some_and(|version| version >= (12, 8));
    let mut expected = vec!["sm_75", "sm_90"];
    if knows_blackwell {
        expected.push("sm_100");
    }
    for sm in expected {
        assert!(ptx::fatbin_sass().contains(&sm), "no {sm} machine code");
    }
}

#[test]
fn parser_reads_nvcc_signatures() {
    let sample = "\
.visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 .ptr .align 1 k_param_1,\n\
\t.param .align 8 .b8 k_param_2[24]\n)\n{\n}\n.visible .entry empty()\n{\n}\n";
    let entries = ptx::ptx_entries(sample);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].name, "k");
    assert_eq!(
        entries[0].params,
        vec![
            ptx::PtxParam::U64,
            ptx::PtxParam::U64,
            ptx::PtxParam::Bytes { align: 8, size: 24 }
        ]
    );
    assert_eq!(entries[1].name, "empty");
    assert!(entries[1].params.is_empty());
}

#[test]
fn check_module_reports_every_mismatch() {
    // dropout_f32 with a 16-byte struct (AlexnetDropoutParams is 24), the module's other
    // kernels (f16, bf16) missing, and a kernel the registry does not know.
    let ptx = ".visible .entry dropout_f32(\n\t.param .u64 p0,\n\t.param .u64 p1,\n\
               \t.param .align 8 .b8 p2[16]\n)\n\
               {\n}\n.visible .entry stray_f32(\n\t.param .u64 p0\n)\n{\n}\n";
    let problems = ptx::check_module("dropout", ptx).unwrap_err();
    let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(has("dropout_f32 parameter 2"), "{problems:#?}");
    assert!(has("dropout_f16 is missing"), "{problems:#?}");
    assert!(has("dropout_bf16 is missing"), "{problems:#?}");
    assert!(has("stray_f32 is not in the registry"), "{problems:#?}");
    assert_eq!(problems.len(), 1 + 2 + 1, "{problems:#?}");
}

/// ptxas, beside the nvcc that built the crate (nvcc needs it to make machine code).
fn ptxas() -> std::path::PathBuf {
    let path = cuobjdump().with_file_name("ptxas");
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// From `ptxas -v`'s report, each function with a stack frame or spills: `(name, frame bytes,
/// spill store bytes, spill load bytes)`.
fn local_memory_users(report: &str) -> Vec<(String, u64, u64, u64)> {
    let mut users = Vec::new();
    let mut function = String::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            function = rest.trim().to_string();
        } else if line.contains("bytes stack frame") {
            let numbers: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            if let [frame, stores, loads] = numbers[..] {
                if frame + stores + loads > 0 {
                    users.push((function.clone(), frame, stores, loads));
                }
            } else {
                panic!("unexpected ptxas line: {line}");
            }
        }
    }
    users
}

#[test]
fn local_memory_users_are_read_from_ptxas_reports() {
    let report = "\
ptxas info    : Compiling entry function 'prepare_input_f32' for 'sm_90'
ptxas info    : Function properties for prepare_input_f32
    48 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 48 bytes cumulative stack size
ptxas info    : Compiling entry function 'lrn_f32' for 'sm_90'
ptxas info    : Function properties for lrn_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for helper
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
";
    assert_eq!(
        local_memory_users(report),
        vec![
            ("prepare_input_f32".to_string(), 48, 0, 0),
            ("helper".to_string(), 8, 4, 12)
        ]
    );
}

/// No kernel keeps anything in local memory on the H200's architecture: no stack frame (an
/// array indexed at run time, such as a parameter struct's `mean[c]` or a ring indexed by
/// channel, is placed there) and no register spills. Both cost a round trip through the cache
/// per access that the kernels' designs do not count on; a kernel that needs one should say so
/// here, with its reason.
#[test]
#[cfg_attr(
    not(alexnet_nvcc),
    ignore = "needs nvcc at build time, and none was found (see README, Building the CUDA kernels; tools/test.sh installs it); ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
)]
fn kernels_keep_to_registers_on_sm_90() {
    let dir = tempfile::tempdir().unwrap();
    let mut found = Vec::new();
    for module in MODULES {
        let file = dir.path().join(format!("{module}.ptx"));
        std::fs::write(&file, prebuilt(module)).unwrap();
        let out = std::process::Command::new(ptxas())
            .args(["-arch=sm_90", "-v", "-o"])
            .arg(dir.path().join(format!("{module}.cubin")))
            .arg(&file)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ptxas failed on {module}:\n{report}");
        assert!(
            report.contains("bytes stack frame"),
            "{module}: no resource report from ptxas -v:\n{report}"
        );
        found.extend(
            local_memory_users(&report)
                .into_iter()
                .map(|(name, frame, stores, loads)| {
                    format!("{module}: {name}: {frame} B frame, {stores} B spill stores, {loads} B spill loads")
                }),
        );
    }
    assert!(
        found.is_empty(),
        "local memory in use:\n  {}",
        found.join("\n  ")
    );
}
