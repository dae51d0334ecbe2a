//! The CUDA libraries this backend loads at run time: found where users have them
//! ([`super::discovery`]), probed before anything calls into them (cudarc panics on the first
//! call into a library it cannot load), their versions checked once loaded, and what to install
//! when one is missing.

use std::path::PathBuf;

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
                 GPU and its driver installed (nvidia-smi should list the GPU), or use --device cpu"
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
    let mismatch = |what: &str, library: &str, found: String, prefix: &str, wanted: &str| {
        // The file cudarc got: the loader's pick where one was made, else what is mapped.
        let picked = search
            .loader_picks
            .iter()
            .find(|(l, _)| *l == library)
            .map(|(_, p)| vec![p.clone()]);
        let loaded = picked.unwrap_or_else(|| loaded_files(prefix));
        unavailable(format!(
            "{what} {found} was loaded ({}), but this build needs {wanted}. {}",
            describe_files(&loaded),
            shadowing_advice(search, wanted, &loaded)
        ))
    };
    if cublas.0 != 13 {
        let found = format!("{}.{}", cublas.0, cublas.1);
        return Err(mismatch(
            "cuBLAS",
            "cuBLAS",
            found,
            "libcublas.",
            "libcublas.so.13",
        ));
    }
    let cublas_lt = cublas_version(true)?;
    if cublas_lt.0 != 13 {
        let found = format!("{}.{}", cublas_lt.0, cublas_lt.1);
        return Err(mismatch(
            "cuBLASLt",
            "cuBLASLt",
            found,
            "libcublasLt.",
            "libcublasLt.so.13",
        ));
    }
    let cudnn = cudarc::cudnn::result::get_version();
    if !(90000..100000).contains(&cudnn) {
        return Err(mismatch(
            "cuDNN",
            "cuDNN",
            cudnn_release(cudnn),
            "libcudnn.",
            "libcudnn.so.9",
        ));
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

/// What to do when cudarc got another version (`loaded`) of the library of the `wanted` file.
///
/// cudarc asks for the unversioned name (`libcublas.so`) before `wanted`, and glibc only hands
/// back a preloaded library for its own soname: so an unversioned link to another version on
/// the loader's path wins over anything found or preloaded, `ALEXNET_CUDA_LIB_DIRS` included.
/// What helps is a link of that name to the wanted file earlier on the path, or the other
/// version's link gone; where the wanted file was not found at all, installing it.
pub(crate) fn shadowing_advice(search: &Discovery, wanted: &str, loaded: &[PathBuf]) -> String {
    let unversioned = match wanted.find(".so") {
        Some(end) => &wanted[..end + ".so".len()],
        None => wanted,
    };
    let Some(found) = search.path_of(wanted) else {
        let hint = CUDA_LIBRARIES
            .iter()
            .find(|l| l.file().contains(&format!("({wanted})")))
            .map_or("", |l| l.install_hint());
        return format!(
            "{wanted} was not found (searched: {}). {hint}",
            search.searched()
        );
    };
    let found = found.display();
    let fix = format!(
        "put a directory holding a link `{unversioned}` -> {found} first on LD_LIBRARY_PATH \
         (`mkdir -p ~/.local/lib/alexnet-cuda && ln -sf {found} \
         ~/.local/lib/alexnet-cuda/{unversioned}` and `export \
         LD_LIBRARY_PATH=~/.local/lib/alexnet-cuda:$LD_LIBRARY_PATH`)"
    );
    // Which directory of LD_LIBRARY_PATH, if any, holds the name that led to the loaded file.
    let on_loader_path = search
        .dirs
        .iter()
        .filter(|d| d.origin == "LD_LIBRARY_PATH")
        .find(|d| {
            let link = d.path.join(unversioned);
            link.exists() && loaded.iter().any(|f| same_file(&link, f))
        });
    match on_loader_path {
        Some(dir) => format!(
            "{wanted} was found at {found}, but cudarc opens {unversioned} first, and \
             LD_LIBRARY_PATH's {} holds one of the other version: take that directory off \
             LD_LIBRARY_PATH, or {fix}",
            dir.path.display()
        ),
        None => format!(
            "{wanted} was found at {found}, but cudarc opens {unversioned} first, and the \
             loader's cache gives it the other version (`ldconfig -p | grep {unversioned}` \
             shows it; another CUDA's -dev package installs that link). Either {fix}, or \
             remove the other version's -dev package"
        ),
    }
}

/// The CUDA libraries loaded through cudarc, for lookups by name.
const CUDA_LIBRARIES: &[CudaLibrary] = &[
    CudaLibrary::Cublas,
    CudaLibrary::CublasLt,
    CudaLibrary::Cudnn,
    CudaLibrary::Nvrtc,
];

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
    use std::path::Path;

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

    /// A search that found `libcublas.so.13` in `found_dir`, with `loader_dir` on
    /// LD_LIBRARY_PATH.
    fn search_with(found_dir: Option<&Path>, loader_dir: &Path) -> Discovery {
        use super::super::discovery::SearchDir;
        Discovery {
            dirs: vec![SearchDir {
                path: loader_dir.to_path_buf(),
                origin: "LD_LIBRARY_PATH",
            }],
            found: found_dir
                .map(|d| ("libcublas.so.13", d.join("libcublas.so.13")))
                .into_iter()
                .collect(),
            ..Discovery::default()
        }
    }

    /// cudarc got cuBLAS 12 through an unversioned link: the advice names where that link is
    /// (LD_LIBRARY_PATH or the loader's cache) and a fix that beats it, or the install when
    /// no cuBLAS 13 was found; never ALEXNET_CUDA_LIB_DIRS, which cannot win over the link.
    #[test]
    fn another_version_first_gets_advice_that_works() {
        let root = tempfile::tempdir().unwrap();
        let (old, wheel, path_dir) = (
            root.path().join("cuda-12"),
            root.path().join("cu13"),
            root.path().join("on-path"),
        );
        for dir in [&old, &wheel, &path_dir] {
            std::fs::create_dir(dir).unwrap();
        }
        let old_file = old.join("libcublas.so.12.4.5");
        std::fs::write(&old_file, b"").unwrap();
        std::fs::write(wheel.join("libcublas.so.13"), b"").unwrap();
        let loaded = [old_file.clone()];

        // The other version's link is in the loader's cache (not on LD_LIBRARY_PATH).
        let advice = shadowing_advice(
            &search_with(Some(&wheel), &path_dir),
            "libcublas.so.13",
            &loaded,
        );
        let wanted = wheel.join("libcublas.so.13");
        assert!(advice.contains("loader's cache"), "{advice}");
        assert!(
            advice.contains("ldconfig -p | grep libcublas.so"),
            "{advice}"
        );
        assert!(
            advice.contains(&format!("ln -sf {} ", wanted.display())),
            "{advice}"
        );
        assert!(advice.contains("alexnet-cuda/libcublas.so`"), "{advice}");
        assert!(!advice.contains("ALEXNET_CUDA_LIB_DIRS"), "{advice}");

        // The link is in a directory on LD_LIBRARY_PATH: that directory is named.
        std::os::unix::fs::symlink(&old_file, path_dir.join("libcublas.so")).unwrap();
        let advice = shadowing_advice(
            &search_with(Some(&wheel), &path_dir),
            "libcublas.so.13",
            &loaded,
        );
        assert!(
            advice.contains(&format!("LD_LIBRARY_PATH's {}", path_dir.display())),
            "{advice}"
        );
        assert!(advice.contains("take that directory off"), "{advice}");

        // No cuBLAS 13 anywhere: what to install.
        let advice = shadowing_advice(&search_with(None, &path_dir), "libcublas.so.13", &loaded);
        assert!(advice.contains("libcublas.so.13 was not found"), "{advice}");
        assert!(
            advice.contains(CudaLibrary::Cublas.install_hint()),
            "{advice}"
        );
        let advice = shadowing_advice(&search_with(None, &path_dir), "libcudnn.so.9", &loaded);
        assert!(
            advice.contains(CudaLibrary::Cudnn.install_hint()),
            "{advice}"
        );
    }
}
