//! Which file cudarc's own loader opens for each CUDA library, found before this crate preloads
//! anything (`super::discovery`).
//!
//! cudarc opens a library by trying bare names in a fixed order, the unversioned
//! `libcudnn.so` first. Where the loader's path or cache holds such a name (apt's `-dev`
//! packages install `libcudnn.so`), cudarc gets that install whatever else was preloaded, so
//! the files preloaded beside it must come from the same install: on a machine with apt's
//! cuDNN 9.14 and PyTorch's cuDNN 9.19 wheel, the 9.14 shim with the wheel's sub-libraries
//! refused to run (`CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH`, seen on an H200). Trying
//! cudarc's names here, in cudarc's order and with its flags, opens exactly what cudarc will
//! open later (glibc hands the same library to the second `dlopen`).

use std::path::{Path, PathBuf};

/// The libraries cudarc opens by name: `(library as WANTED names it, cudarc's name, a symbol
/// the library exports)`; the symbol locates the file that was opened.
const CUDARC_LIBRARIES: &[(&str, &str, &str)] = &[
    ("cuBLASLt", "cublasLt", "cublasLtGetVersion"),
    ("cuBLAS", "cublas", "cublasGetProperty"),
    ("NVRTC", "nvrtc", "nvrtcVersion"),
    ("cuDNN", "cudnn", "cudnnGetVersion"),
];

/// For each library cudarc would find through the loader's own search, the library's name (as
/// in `discovery::WANTED`) and the file the loader opened. The libraries stay loaded for the
/// life of the process, as cudarc keeps them.
#[cfg(unix)]
pub fn loader_picks() -> Vec<(&'static str, PathBuf)> {
    use libloading::os::unix::{Library, RTLD_LAZY, RTLD_LOCAL};
    let mut picks = Vec::new();
    for &(library, cudarc_name, symbol) in CUDARC_LIBRARIES {
        for candidate in cudarc::get_lib_name_candidates(cudarc_name) {
            // SAFETY: the same `dlopen` cudarc makes for this name (libloading's
            // `Library::new` flags), which cudarc would make anyway; loading a CUDA library
            // runs only its own initialisers.
            let Ok(lib) = (unsafe { Library::open(Some(&candidate), RTLD_LAZY | RTLD_LOCAL) })
            else {
                continue;
            };
            // SAFETY: the symbol is only read as an address, never called.
            let address = unsafe { lib.get::<unsafe extern "C" fn()>(symbol) }
                .ok()
                .map(|f| *f as usize);
            if let Some(path) = address.and_then(file_holding) {
                picks.push((library, path));
            }
            // Kept open, as cudarc keeps it: unloading could run code cudarc is about to use.
            std::mem::forget(lib);
            break;
        }
    }
    picks
}

#[cfg(not(unix))]
pub fn loader_picks() -> Vec<(&'static str, PathBuf)> {
    Vec::new()
}

/// The file mapped at `address` in this process (from `/proc/self/maps`).
pub fn file_holding(address: usize) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    file_in_maps(&maps, address)
}

/// The file of the `/proc/<pid>/maps` line whose range holds `address`.
fn file_in_maps(maps: &str, address: usize) -> Option<PathBuf> {
    maps.lines().find_map(|line| {
        let (range, mut rest) = line.split_once(' ')?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        // Past permissions, offset, device and inode, the rest of the line is the path (which
        // may hold spaces).
        for _ in 0..4 {
            rest = rest.trim_start().split_once(' ')?.1;
        }
        let path = rest.trim();
        ((start..end).contains(&address) && path.starts_with('/')).then(|| Path::new(path).into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_found_in_its_mapping() {
        let maps = "7f0000000000-7f0000001000 r--p 00000000 08:01 42 /usr/lib/libfoo.so.1\n\
                    7f0000001000-7f0000003000 r-xp 00001000 08:01 42 /usr/lib/libfoo.so.1\n\
                    7f0000003000-7f0000004000 rw-p 00000000 00:00 0\n\
                    7f0000004000-7f0000005000 r--p 00000000 08:01 43     /opt/my libs/libbar.so\n\
                    7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n";
        let foo = Some(PathBuf::from("/usr/lib/libfoo.so.1"));
        assert_eq!(file_in_maps(maps, 0x7f0000000000), foo);
        assert_eq!(file_in_maps(maps, 0x7f0000002fff), foo);
        assert_eq!(file_in_maps(maps, 0x7f0000003000), None, "anonymous");
        let bar = Some(PathBuf::from("/opt/my libs/libbar.so"));
        assert_eq!(
            file_in_maps(maps, 0x7f0000004000),
            bar,
            "a path with a space"
        );
        assert_eq!(
            file_in_maps(maps, 0x7ffd00000010),
            None,
            "[stack] is no file"
        );
        assert_eq!(file_in_maps(maps, 0x1000), None, "unmapped");
    }

    /// cudarc's names tried through the loader's own search, in a child process whose
    /// LD_LIBRARY_PATH holds only an unversioned `libnvrtc.so` link to the real NVRTC: that is
    /// the pick, reported as the real file. Needs NVRTC (not a GPU).
    #[test]
    #[cfg_attr(
        not(alexnet_nvrtc),
        ignore = "needs NVRTC (libnvrtc.so.13) on the loader path, and none was found at build time; ALEXNET_REQUIRE_CUDA_TOOLS=1 runs it anyway"
    )]
    fn the_loaders_choice_is_found_by_cudarcs_names() {
        const NAME: &str = "cuda::loader::tests::the_loaders_choice_is_found_by_cudarcs_names";
        if std::env::var_os("ALEXNET_LOADER_CHILD").is_some() {
            for (library, path) in loader_picks() {
                println!("pick {library} {}", path.display());
            }
            return;
        }
        let search = super::super::discovery::Discovery::search(
            &super::super::discovery::SearchEnv::from_process(),
        );
        let nvrtc = search
            .path_of("libnvrtc.so.13")
            .expect("NVRTC (libnvrtc.so.13) found: tools/cuda-env.sh installs it")
            .canonicalize()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&nvrtc, dir.path().join("libnvrtc.so")).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--include-ignored", "--nocapture"])
            .env("ALEXNET_LOADER_CHILD", "1")
            .env("LD_LIBRARY_PATH", dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let picked = stdout
            .lines()
            .find_map(|line| line.strip_prefix("pick NVRTC "))
            .unwrap_or_else(|| panic!("no NVRTC pick in the child's output: {stdout}"));
        assert_eq!(Path::new(picked).canonicalize().unwrap(), nvrtc);
    }

    #[test]
    fn this_process_finds_its_own_code() {
        let here = an_address_is_found_in_its_mapping as fn() as usize;
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        let found = file_holding(here).expect("the test executable is mapped");
        assert_eq!(found.canonicalize().unwrap(), exe);
    }
}
