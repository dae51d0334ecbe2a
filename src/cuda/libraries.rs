//! The CUDA libraries this backend loads at run time: found where users have them
//! ([`super::discovery`]), probed before anything calls into them (cudarc panics on the first
//! call into a library it cannot load), their versions checked once loaded, and what to install
//! when one is missing.

use std::path::{Path, PathBuf};

use super::discovery::{discovery, loaded_files, same_file, Discovery};
use crate::error::{Error, Result};

/// The CUDA libraries this backend loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLibrary {
    /// `libcuda.so`, installed with the NVIDIA driver.
    Driver,
    Cublas,
    CublasLt,
    Cudnn,
    Nvrtc,
}

impl CudaLibrary {
    /// Whether the shared library can be loaded, after the search of `cuda::discovery` (run
    /// once per process) loaded what it found. Only tries to open it: calls nothing in it, so
    /// it cannot panic the way a call into a missing library does.
    pub fn is_present(self) -> bool {
        // Whatever the search finds is loaded first, so the bare-name probe below finds it.
        if self != CudaLibrary::Driver {
            discovery();
        }
        // SAFETY: each `is_culib_present` only attempts `dlopen` on candidate file names and
        // drops the handle; no symbol of the library is called.
        unsafe {
            match self {
                CudaLibrary::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLibrary::Cublas => cudarc::cublas::sys::is_culib_present(),
                CudaLibrary::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                CudaLibrary::Cudnn => cudarc::cudnn::sys::is_culib_present(),
                CudaLibrary::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            }
        }
    }

    /// What to install when the library is missing (CUDA 13 packages).
    pub fn install_hint(self) -> &'static str {
        match self {
            CudaLibrary::Driver => {
                "no NVIDIA driver: libcuda.so could not be loaded. Run on a machine with an NVIDIA \
                 GPU and its driver installed (nvidia-smi should list the GPU), or run on the CPU"
            }
            CudaLibrary::Cublas | CudaLibrary::CublasLt => {
                "install cuBLAS 13 (it ships libcublas.so.13 and libcublasLt.so.13): `pip install \
                 nvidia-cublas` (CUDA 13 wheels), or `apt install libcublas-13-0`; or point \
                 ALEXNET_CUDA_LIB_DIRS at the directory that holds them"
            }
            CudaLibrary::Cudnn => {
                "install cuDNN 9 for CUDA 13: `pip install nvidia-cudnn-cu13`, or `apt install \
                 libcudnn9-cuda-13`; or point ALEXNET_CUDA_LIB_DIRS at the directory that holds \
                 libcudnn.so.9 and its sub-libraries"
            }
            CudaLibrary::Nvrtc => {
                "install NVRTC 13.0: `pip install \"nvidia-cuda-nvrtc==13.0.*\"`, or `apt install \
                 cuda-nvrtc-13-0`; or point ALEXNET_CUDA_LIB_DIRS at its directory"
            }
        }
    }

    /// The library's name and the file this build wants, for messages.
    pub fn file(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "the NVIDIA driver (libcuda.so.1)",
            CudaLibrary::Cublas => "cuBLAS 13 (libcublas.so.13)",
            CudaLibrary::CublasLt => "cuBLASLt 13 (libcublasLt.so.13)",
            CudaLibrary::Cudnn => "cuDNN 9 (libcudnn.so.9)",
            CudaLibrary::Nvrtc => "NVRTC 13 (libnvrtc.so.13)",
        }
    }

    /// The whole message for a library that cannot be loaded: what is missing, where it was
    /// looked for, what to install.
    pub fn missing_message(self, search: &Discovery) -> String {
        match self {
            CudaLibrary::Driver => self.install_hint().to_string(),
            _ => format!(
                "{} could not be loaded. Searched: {}. {}",
                self.file(),
                search.searched(),
                self.install_hint()
            ),
        }
    }
}

/// Checks, without touching any GPU, that the driver, cuBLAS(Lt) and cuDNN can be loaded, after
/// searching the usual places for them and loading what was found (`cuda::discovery`);
/// [`Error::DeviceUnavailable`] naming the first that cannot, where it was looked for and what
/// to install. (NVRTC is only needed when a build has no machine code; [`super::Gpu::new`]
/// checks it then.)
pub fn probe_libraries() -> Result<()> {
    let search = discovery();
    if !search.conflicts.is_empty() {
        return Err(Error::DeviceUnavailable(search.conflicts.join("; ")));
    }
    for lib in [
        CudaLibrary::Driver,
        CudaLibrary::CublasLt,
        CudaLibrary::Cublas,
        CudaLibrary::Cudnn,
    ] {
        if !lib.is_present() {
            return Err(Error::DeviceUnavailable(lib.missing_message(search)));
        }
    }
    Ok(())
}

/// The versions of the libraries in use, read from the libraries themselves after loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryVersions {
    /// `(major, minor, patch)`.
    pub cublas: (i32, i32, i32),
    pub cublas_lt: (i32, i32, i32),
    /// cuDNN's `major * 10000 + minor * 100 + patch` (9.x: 90000 and up).
    pub cudnn: usize,
    /// The CUDA runtime cuDNN was built against (e.g. 13000).
    pub cudnn_cudart: usize,
    /// The files the loader actually gave cudarc (from `/proc/self/maps`).
    pub files: Vec<PathBuf>,
}

impl LibraryVersions {
    /// One line for reports: `cuBLAS 13.0.2, cuBLASLt 13.0.2, cuDNN 9.13.1 (CUDA 13.0)`.
    pub fn summary(&self) -> String {
        let (a, b, c) = self.cublas;
        let (d, e, f) = self.cublas_lt;
        format!(
            "cuBLAS {a}.{b}.{c}, cuBLASLt {d}.{e}.{f}, cuDNN {}.{}.{} (built for CUDA {}.{})",
            self.cudnn / 10000,
            self.cudnn / 100 % 100,
            self.cudnn % 100,
            self.cudnn_cudart / 1000,
            self.cudnn_cudart % 1000 / 10
        )
    }
}

/// `(major, minor, patch)` of the cuBLAS (or cuBLASLt, when `lt`) cudarc loaded.
fn cublas_version(lt: bool) -> Result<(i32, i32, i32)> {
    use cudarc::cublas::sys as blas;
    use cudarc::cublaslt::sys as blas_lt;
    let mut v = [0i32; 3];
    for (i, value) in v.iter_mut().enumerate() {
        // SAFETY: the library loads (probed before); each call writes one int through a valid
        // pointer.
        let ok = unsafe {
            if lt {
                let which = [
                    blas_lt::libraryPropertyType::MAJOR_VERSION,
                    blas_lt::libraryPropertyType::MINOR_VERSION,
                    blas_lt::libraryPropertyType::PATCH_LEVEL,
                ][i];
                blas_lt::cublasLtGetProperty(which, value)
                    == blas_lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            } else {
                let which = [
                    blas::libraryPropertyType::MAJOR_VERSION,
                    blas::libraryPropertyType::MINOR_VERSION,
                    blas::libraryPropertyType::PATCH_LEVEL,
                ][i];
                blas::cublasGetProperty(which, value) == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            }
        };
        if !ok {
            let name = if lt { "cuBLASLt" } else { "cuBLAS" };
            return Err(unavailable(format!("{name} did not report its version")));
        }
    }
    Ok((v[0], v[1], v[2]))
}

/// Reads the versions of the libraries cudarc loaded and checks they are the ones this build
/// needs (cuBLAS and cuBLASLt 13, cuDNN 9 with its graph, ops and cnn sub-libraries loadable).
/// Call only after [`probe_libraries`] succeeded (it loads the libraries). A mismatch is
/// [`Error::DeviceUnavailable`] naming the file that was loaded and the one that was found.
pub fn check_versions() -> Result<LibraryVersions> {
    let search = discovery();
    let cublas = cublas_version(false)?;
    let mismatch = |library: CudaLibrary, found: String| {
        let (name, prefix) = match library {
            CudaLibrary::Cublas => ("cuBLAS", "libcublas."),
            CudaLibrary::CublasLt => ("cuBLASLt", "libcublasLt."),
            _ => ("cuDNN", "libcudnn."),
        };
        // The file cudarc got: the loader's pick where one was made, else what is mapped.
        let picked = search
            .loader_picks
            .iter()
            .find(|(l, _)| *l == name)
            .map(|(_, p)| vec![p.clone()]);
        let loaded = picked.unwrap_or_else(|| loaded_files(prefix));
        unavailable(format!(
            "{name} {found} was loaded ({}), but this build needs {}. {}",
            describe_files(&loaded),
            library.file(),
            shadowing_advice(search, library, &loaded)
        ))
    };
    if cublas.0 != 13 {
        let found = format!("{}.{}", cublas.0, cublas.1);
        return Err(mismatch(CudaLibrary::Cublas, found));
    }
    let cublas_lt = cublas_version(true)?;
    if cublas_lt.0 != 13 {
        let found = format!("{}.{}", cublas_lt.0, cublas_lt.1);
        return Err(mismatch(CudaLibrary::CublasLt, found));
    }
    let cudnn = cudarc::cudnn::result::get_version();
    if !(90000..100000).contains(&cudnn) {
        return Err(mismatch(CudaLibrary::Cudnn, cudnn_release(cudnn)));
    }
    // cuDNN 9 is a shim over sub-libraries it loads on demand: load them now, so a broken
    // install shows here instead of inside the first convolution.
    for (name, check) in [
        (
            "libcudnn_graph.so.9",
            cudarc::cudnn::sys::cudnnGraphVersionCheck as unsafe fn() -> _,
        ),
        (
            "libcudnn_ops.so.9",
            cudarc::cudnn::sys::cudnnOpsVersionCheck,
        ),
        (
            "libcudnn_cnn.so.9",
            cudarc::cudnn::sys::cudnnCnnVersionCheck,
        ),
    ] {
        // SAFETY: cuDNN loads (probed before); each check takes no argument and only loads and
        // compares its sub-library's version.
        let status = unsafe { check() };
        if let Err(e) = status.result() {
            return Err(unavailable(format!(
                "cuDNN {} is installed but its sub-library {name} is missing or of another \
                 version ({:?}). Searched: {}. {}",
                cudnn_release(cudnn),
                e.0,
                search.searched(),
                CudaLibrary::Cudnn.install_hint()
            )));
        }
    }
    let mut files = Vec::new();
    for prefix in ["libcublas.", "libcublasLt.", "libcudnn"] {
        files.extend(loaded_files(prefix));
    }
    Ok(LibraryVersions {
        cublas,
        cublas_lt,
        cudnn,
        cudnn_cudart: cudarc::cudnn::result::get_cudart_version(),
        files,
    })
}

/// `files` for a message: their paths, comma-separated.
fn describe_files(files: &[PathBuf]) -> String {
    match files {
        [] => "an unknown file".to_string(),
        files => files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// cuDNN's version number as a release: `90300` is 9.3.0; before cuDNN 9 the number was
/// `major * 1000 + minor * 100 + patch` (`8902` is 8.9.2).
fn cudnn_release(version: usize) -> String {
    let (major, minor) = if version < 10000 {
        (version / 1000, version / 100 % 10)
    } else {
        (version / 10000, version / 100 % 100)
    };
    format!("{major}.{minor}.{}", version % 100)
}

/// What to do when cudarc got another version (`loaded`) of `library` than this build needs.
///
/// cudarc asks for the unversioned name (`libcublas.so`) first, then the wanted major
/// (`libcublas.so.13`), then older ones (`.so.12`, ...), and glibc hands back a preloaded
/// library only for its own soname. So another version wins over anything found or preloaded
/// (`ALEXNET_CUDA_LIB_DIRS` included) through an unversioned link on the loader's path, or
/// through its own `.so.12` where no `.so.13` is on that path. What beats both: a directory
/// of unversioned links to the wanted files first on `LD_LIBRARY_PATH`, with the wanted
/// files' own directory after it (cuBLAS finds cuBLASLt there). Where the wanted file was not
/// found at all: what to install.
pub(crate) fn shadowing_advice(
    search: &Discovery,
    library: CudaLibrary,
    loaded: &[PathBuf],
) -> String {
    // (unversioned name cudarc opens first, the file this build wants), for the library and
    // the one it needs beside it.
    let family: &[(&str, &str)] = match library {
        CudaLibrary::Cublas | CudaLibrary::CublasLt => &[
            ("libcublas.so", "libcublas.so.13"),
            ("libcublasLt.so", "libcublasLt.so.13"),
        ],
        CudaLibrary::Cudnn => &[("libcudnn.so", "libcudnn.so.9")],
        CudaLibrary::Driver | CudaLibrary::Nvrtc => &[],
    };
    let wanted = match library {
        CudaLibrary::CublasLt => "libcublasLt.so.13",
        _ => family.first().map_or("", |&(_, wanted)| wanted),
    };
    let Some(found) = search.path_of(wanted) else {
        return format!(
            "{wanted} was not found (searched: {}). {}",
            search.searched(),
            library.install_hint()
        );
    };
    // Absolute and without links, so the links made below point at the file itself.
    let real = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let found_dir = real(found)
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let links: Vec<String> = family
        .iter()
        .filter_map(|&(unversioned, wanted)| {
            let target = real(search.path_of(wanted)?);
            Some(format!(
                "ln -sf '{}' \"$HOME/.local/lib/alexnet-cuda/{unversioned}\"",
                target.display()
            ))
        })
        .collect();
    let fix = format!(
        "`mkdir -p \"$HOME/.local/lib/alexnet-cuda\" && {}` and `export \
         LD_LIBRARY_PATH=\"$HOME/.local/lib/alexnet-cuda:{}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\"`",
        links.join(" && "),
        found_dir.display()
    );
    // The directory of LD_LIBRARY_PATH, if any, holding the name that led to the loaded file
    // (an unversioned link, or another version's own file).
    let stem = match library {
        CudaLibrary::Cudnn => "libcudnn",
        _ => "libcublas",
    };
    let on_loader_path = search
        .dirs
        .iter()
        .filter(|d| d.origin == "LD_LIBRARY_PATH")
        .find_map(|d| {
            let entries = std::fs::read_dir(&d.path).ok()?;
            entries.filter_map(|e| e.ok()).find_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                (name.starts_with(stem) && loaded.iter().any(|f| same_file(&path, f)))
                    .then(|| format!("LD_LIBRARY_PATH's {} holds {name}", d.path.display()))
            })
        });
    let origin = on_loader_path.unwrap_or_else(|| {
        format!(
            "the loader's cache holds it (`ldconfig -p | grep {stem}` lists what it has: an \
             unversioned link from another CUDA's -dev package, or that CUDA's own library)"
        )
    });
    format!(
        "{wanted} was found at {}, but cudarc opens the other version first: {origin}. Put \
         CUDA 13's first: {fix}",
        found.display()
    )
}

/// The oldest driver this build runs on (as `cuDriverGetVersion` reports it): cudarc's
/// CUDA 13.0 bindings load entry points older drivers lack (e.g. `cuEventElapsedTime_v2`,
/// whose absence would be a panic, not an error), and the PTX is ISA 9.0.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// The CUDA version the installed driver supports (e.g. 13000 for 13.0), or
/// [`Error::DeviceUnavailable`] when there is no driver.
pub fn driver_version() -> Result<i32> {
    if !CudaLibrary::Driver.is_present() {
        return Err(unavailable(CudaLibrary::Driver.install_hint()));
    }
    let mut version = 0;
    // SAFETY: the driver library loads (checked above) and exports cuDriverGetVersion in every
    // release; it needs no cuInit and writes one int through a valid pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| unavailable(format!("cuDriverGetVersion failed ({e:?})")))?;
    Ok(version)
}

pub(crate) fn unavailable(message: impl Into<String>) -> Error {
    Error::DeviceUnavailable(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_library_has_an_install_hint() {
        for lib in [
            CudaLibrary::Driver,
            CudaLibrary::Cublas,
            CudaLibrary::CublasLt,
            CudaLibrary::Cudnn,
            CudaLibrary::Nvrtc,
        ] {
            assert!(!lib.install_hint().is_empty());
            let _ = lib.is_present(); // must not panic either way
        }
    }

    #[test]
    fn cudnn_releases_read_both_numberings() {
        assert_eq!(cudnn_release(8902), "8.9.2");
        assert_eq!(cudnn_release(90300), "9.3.0");
        assert_eq!(cudnn_release(91901), "9.19.1");
    }

    /// A search that found cuBLAS 13 (`libcublas.so.13`, `libcublasLt.so.13`) in `found_dir`,
    /// with `loader_dir` on LD_LIBRARY_PATH.
    fn search_with(found_dir: Option<&Path>, loader_dir: &Path) -> Discovery {
        use super::super::discovery::SearchDir;
        let found = ["libcublas.so.13", "libcublasLt.so.13"]
            .into_iter()
            .flat_map(|soname| found_dir.map(|d| (soname, d.join(soname))))
            .collect();
        Discovery {
            dirs: vec![SearchDir {
                path: loader_dir.to_path_buf(),
                origin: "LD_LIBRARY_PATH",
            }],
            found,
            ..Discovery::default()
        }
    }

    /// cudarc got cuBLAS 12: the advice names where it came from (a directory of
    /// LD_LIBRARY_PATH, by an unversioned link or its own file, or the loader's cache) and
    /// one fix for every case: links of the unversioned names to the CUDA 13 files, cuBLAS's
    /// and cuBLASLt's, first on LD_LIBRARY_PATH, their directory after them. Never
    /// ALEXNET_CUDA_LIB_DIRS, which cannot win over the loader. Without CUDA 13: the install.
    #[test]
    fn another_version_first_gets_advice_that_works() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let (old, wheel, path_dir) = (
            root_path.join("cuda-12"),
            root_path.join("cu13"),
            root_path.join("on-path"),
        );
        for dir in [&old, &wheel, &path_dir] {
            std::fs::create_dir(dir).unwrap();
        }
        let old_file = old.join("libcublas.so.12.4.5");
        std::fs::write(&old_file, b"").unwrap();
        for file in ["libcublas.so.13", "libcublasLt.so.13"] {
            std::fs::write(wheel.join(file), b"").unwrap();
        }
        let loaded = [old_file.clone()];
        let advise = |found: Option<&Path>, library| {
            shadowing_advice(&search_with(found, &path_dir), library, &loaded)
        };
        let fix = format!(
            "ln -sf '{}' \"$HOME/.local/lib/alexnet-cuda/libcublas.so\" && ln -sf '{}' \
             \"$HOME/.local/lib/alexnet-cuda/libcublasLt.so\"` and `export \
             LD_LIBRARY_PATH=\"$HOME/.local/lib/alexnet-cuda:{}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\"`",
            wheel.join("libcublas.so.13").display(),
            wheel.join("libcublasLt.so.13").display(),
            wheel.display()
        );

        // Nothing of it on LD_LIBRARY_PATH: the loader's cache.
        for library in [CudaLibrary::Cublas, CudaLibrary::CublasLt] {
            let advice = advise(Some(&wheel), library);
            assert!(advice.contains("the loader's cache holds it"), "{advice}");
            assert!(advice.contains("ldconfig -p | grep libcublas`"), "{advice}");
            assert!(advice.contains(&fix), "{advice}");
            assert!(!advice.contains("ALEXNET_CUDA_LIB_DIRS"), "{advice}");
        }

        // Its own versioned file in a directory of LD_LIBRARY_PATH (no unversioned link):
        // that directory is named.
        let own = path_dir.join("libcublas.so.12");
        std::os::unix::fs::symlink(&old_file, &own).unwrap();
        let advice = advise(Some(&wheel), CudaLibrary::Cublas);
        let named = format!(
            "LD_LIBRARY_PATH's {} holds libcublas.so.12",
            path_dir.display()
        );
        assert!(advice.contains(&named), "{advice}");
        assert!(advice.contains(&fix), "{advice}");
        std::fs::remove_file(own).unwrap();

        // An unversioned link there: named the same way.
        std::os::unix::fs::symlink(&old_file, path_dir.join("libcublas.so")).unwrap();
        let advice = advise(Some(&wheel), CudaLibrary::Cublas);
        let named = format!(
            "LD_LIBRARY_PATH's {} holds libcublas.so",
            path_dir.display()
        );
        assert!(advice.contains(&named), "{advice}");

        // No CUDA 13 anywhere: what to install.
        let advice = advise(None, CudaLibrary::Cublas);
        assert!(advice.contains("libcublas.so.13 was not found"), "{advice}");
        assert!(
            advice.contains(CudaLibrary::Cublas.install_hint()),
            "{advice}"
        );
        let advice = advise(None, CudaLibrary::Cudnn);
        assert!(advice.contains("libcudnn.so.9 was not found"), "{advice}");
        assert!(
            advice.contains(CudaLibrary::Cudnn.install_hint()),
            "{advice}"
        );
    }
}
