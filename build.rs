//! (One file of about 400 lines: Cargo builds a build script as a crate of its own.)
//!
//! Embeds the CUDA kernels (`kernels/*.cu`) in the crate and, when nvcc is available, compiles
//! each module twice: a fatbin with machine code for every card this build supports (sm_75 to
//! sm_120, see [`SASS_ARCHS`]) plus compute_75 PTX, which the runtime loads first, and the PTX text alone,
//! which the tests check against the kernel registry and the runtime falls back to.
//!
//! nvcc is looked for in `$NVCC` (authoritative when set: a missing file there means "no nvcc"),
//! then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then `PATH`, and must compile a probe kernel: one
//! that cannot (a host compiler it refuses) is passed over with a warning, and an nvcc older
//! than 12.8 gets only the architectures it knows. Without a usable nvcc the build succeeds with
//! one warning and the kernels are compiled at run time with NVRTC from the embedded sources; a
//! kernel that a working nvcc rejects is a build error (broken kernels must not ship).
//!
//! Output: `$OUT_DIR/kernels.rs`, included by `src/cuda/ptx.rs`, with
//! - `SOURCES`: (module, source with the `kernels/` headers inlined): self-contained for NVRTC;
//! - `HEADERS`: (file name, text) of every `kernels/` header;
//! - `PTX`: (module, PTX) — empty without nvcc;
//! - `FATBIN`: (module, fatbin bytes) — empty without nvcc; `FATBIN_SASS`: its machine-code
//!   architectures;
//! - `NVCC_VERSION`: nvcc's release (e.g. "13.0"), if nvcc was used.
//!
//! Without the `cuda` feature nothing is embedded (src/cuda is not compiled).
//!
//! It also tells the tests which CUDA tools this machine has, as cfgs the toolchain-dependent
//! tests read (`#[cfg_attr(not(alexnet_nvcc), ignore = "...")]`), so that `cargo test` shows them
//! as ignored with the reason instead of passing without checking anything:
//! - `alexnet_nvcc`: a usable nvcc was found (the PTX is embedded);
//! - `alexnet_nvrtc`: libnvrtc is on the loader path (LD_LIBRARY_PATH, CUDA_HOME/CUDA_PATH, the
//!   loader cache);
//! - `alexnet_libclang`: libclang is where bindgen looks (LIBCLANG_PATH, the loader cache, LLVM's
//!   usual directories);
//! - `alexnet_cxx`: a C++ compiler (`$CXX`, else c++, g++ or clang++ on PATH), which the
//!   `alexnet-host-kernels` test crate needs to run the kernels on the CPU.
//!
//! With `ALEXNET_REQUIRE_CUDA_TOOLS=1` (set by `tools/test.sh` and CI) all three are set whatever
//! is found, so those tests run, and fail with their message when a tool is missing.
//!
//! No libclang and no CUDA library is needed here.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// nvcc's target: virtual architecture compute_75, so the PTX JIT-compiles on sm_75 and newer.
const ARCH: &str = "compute_75";
/// The architectures the fatbin carries machine code (SASS) for: Turing (T4, RTX 20), Ampere
/// (A100, RTX 30), Ada (RTX 40, L4, L40), Hopper (H100, H200), Blackwell (B200, RTX 50).
/// Machine code runs on later minor versions of its major (sm_86 on sm_87, sm_100 on sm_103,
/// sm_120 on sm_121); any other GPU JIT-compiles the compute_75 PTX that the fatbin carries
/// too. Turing is here because its cards (T4s in many clouds) would otherwise JIT every module
/// on their first run.
const SASS_ARCHS: &[&str] = &[
    "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120",
];

/// The newest toolkit whose PTX the target machines' driver (580, CUDA 13.0) accepts.
const NEWEST_SUPPORTED: (u32, u32) = (13, 0);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);
    let kernel_dir = manifest.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    // nvcc's own settings too: they are how an nvcc that failed the probe is mended (another
    // host compiler, -allow-unsupported-compiler), and the build must then try it again.
    for var in [
        "NVCC",
        "NVCC_CCBIN",
        "NVCC_APPEND_FLAGS",
        "NVCC_PREPEND_FLAGS",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "LD_LIBRARY_PATH",
        "LIBCLANG_PATH",
        "CXX",
        REQUIRE_TOOLS,
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    build_cpu_cfgs();
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        tool_cfgs(find_nvcc().is_ok());
        return Ok(()); // no CUDA backend in this build: nothing to embed
    }
    // An nvcc that cannot compile here (a toolkit too old for an architecture, a host compiler
    // it does not support) must not fail the build of a crate that can compile its kernels at
    // run time: it is said, and passed over, unless the tools are required.
    let nvcc = match find_nvcc() {
        Ok(path) => {
            // A toolkit upgraded in place keeps its path: its nvcc is looked at again.
            println!("cargo:rerun-if-changed={}", path.display());
            usable_nvcc(path, &out_dir)?
        }
        Err(why) => Err(why),
    };
    tool_cfgs(nvcc.is_ok());
    if let Ok(found) = &nvcc {
        // For the tests that read the fatbins with the cuobjdump beside it.
        println!(
            "cargo:rustc-env=ALEXNET_BUILD_NVCC={}",
            found.path.display()
        );
    }

    let mut modules = BTreeMap::new(); // stem -> path of the .cu
    let mut headers = BTreeMap::new(); // file name -> text
    let entries = fs::read_dir(&kernel_dir)
        .map_err(|e| format!("cannot list {}: {e}", kernel_dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", kernel_dir.display()))?
            .path();
        let (Some(stem), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        match ext {
            "cu" => {
                println!("cargo:rerun-if-changed={}", path.display());
                modules.insert(stem.to_string(), path);
            }
            // The host emulation header is for the host-executed tests only (host-kernels/).
            "h" | "cuh" if path.file_name().is_some_and(|n| n == HOST_ONLY_HEADER) => {}
            "h" | "cuh" => {
                println!("cargo:rerun-if-changed={}", path.display());
                let name = format!("{stem}.{ext}");
                headers.insert(name, read(&path)?);
            }
            _ => {}
        }
    }

    // Self-contained sources for NVRTC: the kernels' own headers inlined.
    let mut sources = BTreeMap::new();
    for (stem, path) in &modules {
        let text = read(path)?;
        let file = format!("{stem}.cu");
        let mut seen = Vec::new();
        sources.insert(
            stem.clone(),
            inline_headers(&file, &text, &headers, &mut seen),
        );
    }

    let ptx = match nvcc {
        Ok(Nvcc {
            path,
            version,
            sass,
        }) => {
            if let Some((major, minor)) = version {
                if (major, minor) > NEWEST_SUPPORTED {
                    println!(
                        "cargo:warning=nvcc {} is CUDA {major}.{minor}: its PTX needs a driver newer \
                         than CUDA {}.{} (driver 580); pin the toolkit to {}.{} (see README)",
                        path.display(),
                        NEWEST_SUPPORTED.0,
                        NEWEST_SUPPORTED.1,
                        NEWEST_SUPPORTED.0,
                        NEWEST_SUPPORTED.1
                    );
                }
            }
            let built = compile_all(&path, &sass, &kernel_dir, &modules, &out_dir)?;
            Some((built, version, sass))
        }
        Err(why) => {
            println!(
                "cargo:warning=nvcc not used ({why}): the CUDA kernels will be compiled at run \
                 time with NVRTC (an nvcc that works here, in NVCC, CUDA_HOME/bin or PATH, \
                 compiles them now)"
            );
            None
        }
    };

    let mut generated =
        String::from("// Generated by build.rs: the CUDA kernels. Do not edit.\n\n");
    generated.push_str("pub(crate) static SOURCES: &[(&str, &str)] = &[\n");
    for (stem, text) in &sources {
        let _ = writeln!(generated, "    ({stem:?}, {text:?}),");
    }
    generated.push_str("];\n\npub(crate) static HEADERS: &[(&str, &str)] = &[\n");
    for (name, text) in &headers {
        let _ = writeln!(generated, "    ({name:?}, {text:?}),");
    }
    generated.push_str("];\n\npub(crate) static PTX: &[(&str, &str)] = &[\n");
    if let Some((built, _, _)) = &ptx {
        for (stem, (path, _)) in built {
            let path = path.to_str().ok_or("OUT_DIR is not valid UTF-8")?;
            let _ = writeln!(generated, "    ({stem:?}, include_str!({path:?})),");
        }
    }
    generated.push_str("];\n\npub(crate) static FATBIN: &[(&str, &[u8])] = &[\n");
    if let Some((built, _, _)) = &ptx {
        for (stem, (_, path)) in built {
            let path = path.to_str().ok_or("OUT_DIR is not valid UTF-8")?;
            let _ = writeln!(generated, "    ({stem:?}, include_bytes!({path:?})),");
        }
    }
    let sass: &[&str] = match &ptx {
        Some((_, _, sass)) => sass,
        None => &[],
    };
    let _ = writeln!(
        generated,
        "];\n\npub(crate) static FATBIN_SASS: &[&str] = &{sass:?};"
    );
    generated.push_str("\npub(crate) static NVCC_VERSION: Option<&str> = ");
    match &ptx {
        Some((_, Some((major, minor)), _)) => {
            let _ = writeln!(generated, "Some(\"{major}.{minor}\");");
        }
        _ => generated.push_str("None;\n"),
    }
    write_if_changed(&out_dir.join("kernels.rs"), &generated)
}

/// The header that turns the kernels into host C++ (used by host-kernels/, never by nvcc or NVRTC).
const HOST_ONLY_HEADER: &str = "alexnet_host.h";

/// The environment variable that makes the toolchain-dependent tests run (and fail) even where
/// a tool is missing, and an nvcc that cannot compile here a build error.
const REQUIRE_TOOLS: &str = "ALEXNET_REQUIRE_CUDA_TOOLS";

fn tools_required() -> bool {
    env::var(REQUIRE_TOOLS).is_ok_and(|v| v == "1")
}

/// Declares and sets the `alexnet_nvcc` (`nvcc`: a usable one was found), `alexnet_nvrtc`,
/// `alexnet_libclang` and `alexnet_cxx` cfgs.
fn tool_cfgs(nvcc: bool) {
    let required = tools_required();
    let found = [
        ("alexnet_nvcc", nvcc),
        ("alexnet_nvrtc", find_library("libnvrtc.so", &nvrtc_dirs())),
        (
            "alexnet_libclang",
            find_library("libclang", &libclang_dirs()),
        ),
        ("alexnet_cxx", find_cxx()),
    ];
    for (cfg, present) in found {
        println!("cargo:rustc-check-cfg=cfg({cfg})");
        if present || required {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
}

/// Declares and sets `alexnet_build_cpu_avx512f` and `alexnet_build_cpu_avx2_fma`: the
/// instructions of the CPU this build runs on, which `cargo test` also runs the tests on. A
/// unit test of a CPU kernel this machine cannot execute is then ignored with the reason
/// instead of passing without running it (build.rs runs on the build machine, so the
/// detection here is that machine's; the tests check it again when they run).
fn build_cpu_cfgs() {
    #[cfg(target_arch = "x86_64")]
    let found = [
        (
            "alexnet_build_cpu_avx512f",
            std::arch::is_x86_feature_detected!("avx512f"),
        ),
        (
            "alexnet_build_cpu_avx2_fma",
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"),
        ),
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let found = [
        ("alexnet_build_cpu_avx512f", false),
        ("alexnet_build_cpu_avx2_fma", false),
    ];
    for (cfg, present) in found {
        println!("cargo:rustc-check-cfg=cfg({cfg})");
        if present {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
}

/// Whether a C++ compiler is at hand, where the `cc` crate looks for one.
fn find_cxx() -> bool {
    if let Some(cxx) = env::var_os("CXX").filter(|v| !v.is_empty()) {
        let cxx = PathBuf::from(cxx);
        return cxx.is_file() || in_path(&cxx);
    }
    ["c++", "g++", "clang++"]
        .iter()
        .any(|name| in_path(Path::new(name)))
}

/// Whether `program` (a bare name) is a file in one of PATH's directories.
fn in_path(program: &Path) -> bool {
    env_paths("PATH")
        .iter()
        .any(|dir| dir.join(program).is_file())
}

/// Directories the dynamic loader searches for NVRTC, as `is_culib_present` will at run time.
fn nvrtc_dirs() -> Vec<PathBuf> {
    let mut dirs = env_paths("LD_LIBRARY_PATH");
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    dirs.extend(loader_cache_dirs());
    dirs
}

/// Where bindgen (clang-sys) looks for libclang.
fn libclang_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(path) = env::var_os("LIBCLANG_PATH").map(PathBuf::from) {
        // A directory, or the library file itself.
        dirs.push(if path.is_file() {
            path.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            path
        });
    }
    dirs.extend(env_paths("LD_LIBRARY_PATH"));
    dirs.extend(loader_cache_dirs());
    if let Ok(entries) = fs::read_dir("/usr/lib") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("llvm-") {
                dirs.push(entry.path().join("lib"));
            }
        }
    }
    dirs
}

fn env_paths(var: &str) -> Vec<PathBuf> {
    env::var_os(var)
        .map(|v| env::split_paths(&v).collect())
        .unwrap_or_default()
}

/// The directories of the libraries in the loader cache (`ldconfig -p`).
fn loader_cache_dirs() -> Vec<PathBuf> {
    let Ok(output) = Command::new("ldconfig").arg("-p").output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(" => ").nth(1))
        .filter_map(|path| Path::new(path.trim()).parent().map(Path::to_path_buf))
        .collect()
}

/// Whether a file whose name starts with `prefix` and contains `.so` is in one of `dirs`.
fn find_library(prefix: &str, dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|dir| {
        fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(prefix) && name.contains(".so")
            })
        })
    })
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Replaces each `#include "NAME"` of a `kernels/` header with the header's text (recursively,
/// each header once), with `#line` markers so NVRTC's messages name the original file and line.
fn inline_headers(
    file: &str,
    text: &str,
    headers: &BTreeMap<String, String>,
    seen: &mut Vec<String>,
) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for (number, line) in text.lines().enumerate() {
        let included = line
            .trim_start()
            .strip_prefix("#include")
            .map(str::trim)
            .and_then(|rest| rest.strip_prefix('"'))
            .and_then(|rest| rest.split('"').next())
            .filter(|name| headers.contains_key(*name));
        match included {
            Some(name) => {
                if !seen.iter().any(|s| s == name) {
                    seen.push(name.to_string());
                    let _ = writeln!(out, "#line 1 \"{name}\"");
                    out.push_str(&inline_headers(name, &headers[name], headers, seen));
                    let _ = writeln!(out, "#line {} \"{file}\"", number + 2);
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The nvcc to use, or why there is none.
fn find_nvcc() -> Result<PathBuf, String> {
    let exe = format!("nvcc{}", env::consts::EXE_SUFFIX);
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(nvcc);
        return if nvcc.is_file() {
            Ok(nvcc)
        } else {
            Err(format!("NVCC={} is not a file", nvcc.display()))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            let nvcc = Path::new(&root).join("bin").join(&exe);
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join(&exe);
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    Err("not in NVCC, CUDA_HOME/bin, CUDA_PATH/bin or PATH".into())
}

/// An nvcc that compiled a probe kernel here, and what it compiles for.
struct Nvcc {
    path: PathBuf,
    version: Option<(u32, u32)>,
    /// The architectures of [`SASS_ARCHS`] it knows: the fatbin's machine code.
    sass: Vec<&'static str>,
}

/// `Ok(Ok(nvcc))` if it can compile a kernel here, for the architectures of [`SASS_ARCHS`] it
/// knows (`nvcc --list-gpu-code`; nvcc before 12.8 knows no sm_100 or sm_120, and those cards
/// then JIT-compile the PTX), `Ok(Err(why))` if it cannot (passed over): a probe kernel is
/// compiled as the modules will be, so a host compiler nvcc refuses is found here, not as a
/// failure of every kernel. With the tools required ([`REQUIRE_TOOLS`]) an nvcc that cannot
/// compile is the build's error (`Err`).
fn usable_nvcc(path: PathBuf, out_dir: &Path) -> Result<Result<Nvcc, String>, String> {
    let version = nvcc_version(&path);
    let known = known_gpu_code(&path);
    let (sass, dropped): (Vec<&'static str>, Vec<&'static str>) = SASS_ARCHS
        .iter()
        .partition(|sm| known.as_ref().is_none_or(|k| k.iter().any(|c| c == *sm)));
    if !dropped.is_empty() {
        println!(
            "cargo:warning=nvcc {} does not know {}: no machine code for them (those GPUs \
             compile the kernels' PTX when first loaded); CUDA 12.8 or newer (13.0 \
             recommended) compiles for every architecture",
            path.display(),
            dropped.join(", ")
        );
    }
    let probe = out_dir.join("nvcc_probe.cu");
    fs::write(
        &probe,
        "extern \"C\" __global__ void alexnet_probe(float *x) { x[0] = 1.0f; }\n",
    )
    .map_err(|e| format!("cannot write {}: {e}", probe.display()))?;
    let probed = compile_one(
        &path,
        &sass,
        out_dir,
        &probe,
        &out_dir.join("nvcc_probe.fatbin"),
        Output::Fatbin,
    );
    match probed {
        Ok(()) => Ok(Ok(Nvcc {
            path,
            version,
            sass,
        })),
        Err(e) if tools_required() => {
            Err(format!("{REQUIRE_TOOLS}=1 and nvcc cannot compile: {e}"))
        }
        Err(e) => {
            // nvcc's own words (e.g. "unsupported GNU version"), without the command line
            // (compile_one's first two lines).
            let mut why: Vec<&str> = e
                .lines()
                .skip(2)
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(3)
                .collect();
            if why.is_empty() {
                why = e.lines().take(1).collect(); // it could not be started at all
            }
            Ok(Err(format!(
                "{} cannot compile a probe kernel here: {}",
                path.display(),
                why.join(" | ")
            )))
        }
    }
}

/// The real architectures nvcc can compile for (`nvcc --list-gpu-code`: `sm_75`, ...), or
/// `None` where it cannot say (then every architecture is tried).
fn known_gpu_code(nvcc: &Path) -> Option<Vec<String>> {
    let output = Command::new(nvcc).arg("--list-gpu-code").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let codes: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|code| code.starts_with("sm_"))
        .map(str::to_string)
        .collect();
    (!codes.is_empty()).then_some(codes)
}

/// nvcc's release, from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88").
fn nvcc_version(nvcc: &Path) -> Option<(u32, u32)> {
    let output = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let release = text.split("release ").nth(1)?;
    let (major, rest) = release.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.trim().parse().ok()?, minor.parse().ok()?))
}

/// Compiles every module to `$OUT_DIR/<module>.ptx`, in parallel; any failure is an error
/// carrying nvcc's messages.
fn compile_all(
    nvcc: &Path,
    sass: &[&str],
    kernel_dir: &Path,
    modules: &BTreeMap<String, PathBuf>,
    out_dir: &Path,
) -> Result<BTreeMap<String, Compiled>, String> {
    let results: Vec<Result<(String, Compiled), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = modules
            .iter()
            .map(|(stem, source)| {
                scope.spawn(move || {
                    let ptx = out_dir.join(format!("{stem}.ptx"));
                    let fatbin = out_dir.join(format!("{stem}.fatbin"));
                    compile_one(nvcc, sass, kernel_dir, source, &ptx, Output::Ptx)?;
                    compile_one(nvcc, sass, kernel_dir, source, &fatbin, Output::Fatbin)?;
                    Ok((stem.clone(), (ptx, fatbin)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("nvcc thread panicked".into()))
            })
            .collect()
    });
    let mut ptx = BTreeMap::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok((stem, path)) => {
                ptx.insert(stem, path);
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ptx)
    } else {
        Err(errors.join("\n"))
    }
}

/// A module's PTX and fatbin files.
type Compiled = (PathBuf, PathBuf);

/// What [`compile_one`] makes.
#[derive(Clone, Copy)]
enum Output {
    /// PTX text for compute_75: what the PTX-against-registry tests read, and the JIT fallback.
    Ptx,
    /// One fatbin: machine code for the architectures given (those of [`SASS_ARCHS`] nvcc
    /// knows) and compute_75 PTX.
    Fatbin,
}

fn compile_one(
    nvcc: &Path,
    sass: &[&str],
    kernel_dir: &Path,
    source: &Path,
    out: &Path,
    kind: Output,
) -> Result<(), String> {
    let mut command = Command::new(nvcc);
    match kind {
        Output::Ptx => {
            command.arg("--ptx").arg(format!("-arch={ARCH}"));
        }
        Output::Fatbin => {
            command.arg("--fatbin");
            for sm in sass {
                let number = sm.trim_start_matches("sm_");
                command
                    .arg("-gencode")
                    .arg(format!("arch=compute_{number},code={sm}"));
            }
            command
                .arg("-gencode")
                .arg(format!("arch={ARCH},code={ARCH}"));
        }
    }
    command
        .arg("-O3")
        .arg("-I")
        .arg(kernel_dir)
        .arg("-o")
        .arg(out)
        .arg(source);
    let output = command
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed to compile {} ({}):\n{:?}\n{}{}",
            source.display(),
            output.status,
            command,
            String::from_utf8_lossy(&output.stdout),
            stderr
        ));
    }
    // Warnings do not fail the build but must be seen.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={line}");
    }
    Ok(())
}
