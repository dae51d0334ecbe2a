//! Finding the CUDA libraries where users have them.
//!
//! cudarc opens libraries by bare name, so only the loader's own path and cache are searched.
//! Most machines with PyTorch hold cuBLAS, cuBLASLt and NVRTC in the CUDA 13 pip wheels
//! (`site-packages/nvidia/cu13/lib`) and cuDNN in `site-packages/nvidia/cudnn/lib`, which the
//! loader never looks at. So before cudarc is touched, these directories are searched, in this
//! order, and every library found is loaded by absolute path and kept loaded for the process:
//!
//! 1. `ALEXNET_CUDA_LIB_DIRS` (colon-separated), for an explicit choice;
//! 2. `LD_LIBRARY_PATH`;
//! 3. `CUDA_HOME`, then `CUDA_PATH` (their `lib64` and `lib`);
//! 4. the site-packages of the `python3` on `PATH` (`nvidia/cu13/lib`, `nvidia/cudnn/lib`);
//! 5. `/usr/local/cuda/lib64`.
//!
//! The loader cache (e.g. apt's `/usr/lib/x86_64-linux-gnu`) is left to the loader. glibc reuses
//! a loaded library when a later `dlopen` asks for its soname, so cudarc then gets these. It asks
//! for a bare `libcudnn.so` first, though, which the loader may find in another install (apt's
//! `-dev` packages put one in its cache), and then that install is used whatever was preloaded.
//! So first `super::loader` opens what cudarc will open; a library found that way has its
//! companions (cuDNN's sub-libraries) preloaded from its own directory, never from another
//! install, and only the libraries the loader cannot find come from this search, each with its
//! companions from its own directory. An explicit `ALEXNET_CUDA_LIB_DIRS` that the loader's
//! choice overrides is an error, not a silent substitution. `super::libraries` then checks the
//! versions actually in use.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The files this build wants, by soname, dependencies before their users (cuBLASLt before
/// cuBLAS, cuDNN's sub-libraries before its shim), with the library each belongs to.
pub const WANTED: &[(&str, &str)] = &[
    ("cuBLASLt", "libcublasLt.so.13"),
    ("cuBLAS", "libcublas.so.13"),
    ("NVRTC", "libnvrtc-builtins.so.13.0"),
    ("NVRTC", "libnvrtc.so.13"),
    ("cuDNN", "libcudnn_graph.so.9"),
    ("cuDNN", "libcudnn_engines_precompiled.so.9"),
    ("cuDNN", "libcudnn_engines_runtime_compiled.so.9"),
    ("cuDNN", "libcudnn_heuristic.so.9"),
    ("cuDNN", "libcudnn_ops.so.9"),
    ("cuDNN", "libcudnn_cnn.so.9"),
    ("cuDNN", "libcudnn_adv.so.9"),
    ("cuDNN", "libcudnn.so.9"),
];

/// One directory of the search and where it came from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchDir {
    pub path: PathBuf,
    /// E.g. `"ALEXNET_CUDA_LIB_DIRS"`, `"python3 site-packages"`.
    pub origin: &'static str,
}

/// What the search reads: the process's environment by default ([`SearchEnv::from_process`]),
/// or made up by a test.
#[derive(Clone, Debug, Default)]
pub struct SearchEnv {
    pub explicit: Option<OsString>,
    pub loader_path: Option<OsString>,
    pub cuda_home: Option<OsString>,
    pub cuda_path: Option<OsString>,
    /// The site-packages directories of the `python3` on `PATH`.
    pub site_packages: Vec<PathBuf>,
}

impl SearchEnv {
    /// This process's variables, and the site-packages `python3` reports (none when there is
    /// no python3 or it does not answer within two seconds).
    pub fn from_process() -> Self {
        SearchEnv {
            explicit: std::env::var_os("ALEXNET_CUDA_LIB_DIRS"),
            loader_path: std::env::var_os("LD_LIBRARY_PATH"),
            cuda_home: std::env::var_os("CUDA_HOME"),
            cuda_path: std::env::var_os("CUDA_PATH"),
            site_packages: python_site_packages(),
        }
    }
}

/// The directories to search, in order, without duplicates.
pub fn search_dirs(env: &SearchEnv) -> Vec<SearchDir> {
    let mut dirs: Vec<SearchDir> = Vec::new();
    let mut add = |path: PathBuf, origin: &'static str| {
        if !path.as_os_str().is_empty() && !dirs.iter().any(|d| d.path == path) {
            dirs.push(SearchDir { path, origin });
        }
    };
    for (var, origin) in [
        (&env.explicit, "ALEXNET_CUDA_LIB_DIRS"),
        (&env.loader_path, "LD_LIBRARY_PATH"),
    ] {
        if let Some(list) = var {
            std::env::split_paths(list).for_each(|p| add(p, origin));
        }
    }
    for (var, origin) in [(&env.cuda_home, "CUDA_HOME"), (&env.cuda_path, "CUDA_PATH")] {
        if let Some(root) = var {
            add(Path::new(root).join("lib64"), origin);
            add(Path::new(root).join("lib"), origin);
        }
    }
    for site in &env.site_packages {
        add(site.join("nvidia/cu13/lib"), "python3 site-packages");
        add(site.join("nvidia/cudnn/lib"), "python3 site-packages");
    }
    add(
        PathBuf::from("/usr/local/cuda/lib64"),
        "the default CUDA install",
    );
    dirs
}

/// The result of a search: the directories looked at and the files found (first match wins).
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub dirs: Vec<SearchDir>,
    /// `(soname, path)` for each file of `WANTED` that was found.
    pub found: Vec<(&'static str, PathBuf)>,
    /// `(library, file)` for each library cudarc's own loader opens (see `super::loader`).
    pub loader_picks: Vec<(&'static str, PathBuf)>,
    /// `(soname, path)` for each file loaded by absolute path ([`Discovery::plan`]).
    pub loaded: Vec<(&'static str, PathBuf)>,
    /// Files found but not loadable (`path: error`), e.g. a wrong architecture or a missing
    /// dependency.
    pub failed: Vec<String>,
    /// Each library `ALEXNET_CUDA_LIB_DIRS` names that cannot be the one used, and why.
    pub conflicts: Vec<String>,
}

impl Discovery {
    /// Looks for every file of `WANTED` in `env`'s directories (reads the file system only).
    pub fn search(env: &SearchEnv) -> Self {
        let dirs = search_dirs(env);
        let found = WANTED
            .iter()
            .filter_map(|&(_, soname)| {
                dirs.iter()
                    .map(|d| d.path.join(soname))
                    .find(|p| p.is_file())
                    .map(|p| (soname, p))
            })
            .collect();
        Discovery {
            dirs,
            found,
            ..Discovery::default()
        }
    }

    /// The files to load by absolute path, given the file cudarc's own loader opens for some
    /// libraries (`loader_picks`, `(library, file)`), and the conflicts with an explicit
    /// `ALEXNET_CUDA_LIB_DIRS`. A library is its `WANTED` files, its own file last (cuDNN: the
    /// sub-libraries, then `libcudnn.so.9`). One the loader opens has its files taken from the
    /// directory of what it opened; any other, from the directory where the search found its
    /// own file. Files of one library never come from two directories: cuDNN refuses to run
    /// with sub-libraries of another version.
    pub fn plan(
        &self,
        loader_picks: &[(&'static str, PathBuf)],
    ) -> (Vec<(&'static str, PathBuf)>, Vec<String>) {
        let mut load = Vec::new();
        let mut conflicts = Vec::new();
        let mut libraries: Vec<&str> = WANTED.iter().map(|&(library, _)| library).collect();
        libraries.dedup();
        for library in libraries {
            let files: Vec<&'static str> = WANTED
                .iter()
                .filter(|&&(l, _)| l == library)
                .map(|&(_, soname)| soname)
                .collect();
            let Some(&own) = files.last() else { continue };
            let found = self.path_of(own);
            let picked = loader_picks
                .iter()
                .find(|(l, _)| *l == library)
                .map(|(_, p)| p.as_path());
            let dir = match (picked, found) {
                (Some(picked), found) => {
                    if let Some(found) = found.filter(|f| !same_file(f, picked)) {
                        if self.origin_of(found) == Some("ALEXNET_CUDA_LIB_DIRS") {
                            conflicts.push(format!(
                                "ALEXNET_CUDA_LIB_DIRS names {}, but cudarc opens {library} by \
                                 an unversioned name first, which the loader finds at {}: that \
                                 install would be used. Remove its unversioned link from the \
                                 loader's path (apt's -dev package installs it), or put a \
                                 directory holding such a link to {} first on LD_LIBRARY_PATH",
                                found.display(),
                                picked.display(),
                                found.display()
                            ));
                        }
                    }
                    // The install is where the file lives, not where a link to it is.
                    let real = picked
                        .canonicalize()
                        .unwrap_or_else(|_| picked.to_path_buf());
                    real.parent().map(Path::to_path_buf)
                }
                (None, Some(found)) => found.parent().map(Path::to_path_buf),
                (None, None) => None,
            };
            if let Some(dir) = dir {
                load.extend(
                    files
                        .iter()
                        .map(|&soname| (soname, dir.join(soname)))
                        .filter(|(_, path)| path.is_file()),
                );
            }
        }
        (load, conflicts)
    }

    /// Where the search directory holding `file` came from.
    fn origin_of(&self, file: &Path) -> Option<&'static str> {
        let dir = file.parent()?;
        self.dirs.iter().find(|d| d.path == dir).map(|d| d.origin)
    }

    /// Where `soname` was found, if it was.
    pub fn path_of(&self, soname: &str) -> Option<&Path> {
        self.found
            .iter()
            .find(|(s, _)| *s == soname)
            .map(|(_, p)| p.as_path())
    }

    /// The searched directories for a message: `dir (origin)`, `; `-separated.
    pub fn searched(&self) -> String {
        let dirs: Vec<String> = self
            .dirs
            .iter()
            .map(|d| {
                let state = if d.path.is_dir() { "" } else { ", missing" };
                format!("{} ({}{state})", d.path.display(), d.origin)
            })
            .collect();
        format!("{}; and the loader's cache", dirs.join("; "))
    }
}

/// The search of this process, done once, with every file found loaded by absolute path (and
/// kept loaded) before cudarc opens anything.
pub fn discovery() -> &'static Discovery {
    static DONE: OnceLock<Discovery> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut found = Discovery::search(&SearchEnv::from_process());
        // What cudarc will open is settled before anything is preloaded.
        found.loader_picks = super::loader::loader_picks();
        let (load, conflicts) = found.plan(&found.loader_picks);
        found.failed = preload(&load);
        found.loaded = load;
        found.conflicts = conflicts;
        found
    })
}

/// Whether two paths name the same file (after links).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Loads each file by absolute path and keeps it loaded for the life of the process; returns
/// the failures.
#[cfg(unix)]
fn preload(files: &[(&'static str, PathBuf)]) -> Vec<String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    static KEPT: OnceLock<std::sync::Mutex<Vec<Library>>> = OnceLock::new();
    let kept = KEPT.get_or_init(Default::default);
    let mut failed = Vec::new();
    for (_, path) in files {
        // SAFETY: loading a CUDA library runs its initialisers, which only set up the library
        // itself (no callbacks into this process); the handle is kept in a static and never
        // closed, so nothing unloads code cudarc may call later.
        match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
            Ok(library) => {
                if let Ok(mut kept) = kept.lock() {
                    kept.push(library);
                }
            }
            Err(e) => failed.push(format!("{}: {e}", path.display())),
        }
    }
    failed
}

#[cfg(not(unix))]
fn preload(_files: &[(&'static str, PathBuf)]) -> Vec<String> {
    Vec::new()
}

/// The site-packages directories of the `python3` on `PATH`, asked with a two-second limit.
fn python_site_packages() -> Vec<PathBuf> {
    const SCRIPT: &str = "import site, sys\n\
        dirs = list(getattr(site, 'getsitepackages', lambda: [])())\n\
        dirs.append(site.getusersitepackages())\n\
        sys.stdout.write('\\n'.join(dirs))";
    let Ok(mut child) = Command::new("python3")
        .args(["-I", "-c", SCRIPT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_string(&mut text);
    }
    text.lines().map(PathBuf::from).collect()
}

/// The files of the process's address space whose name contains `fragment` (from
/// `/proc/self/maps`): which library the loader actually gave cudarc.
pub fn loaded_files(fragment: &str) -> Vec<PathBuf> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| {
            Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(fragment))
        })
        .map(PathBuf::from)
        .collect();
    files.dedup();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_order_is_the_documented_one() {
        let env = SearchEnv {
            explicit: Some("/a:/b".into()),
            loader_path: Some("/c:/a".into()),
            cuda_home: Some("/cuda".into()),
            cuda_path: None,
            site_packages: vec!["/site".into()],
        };
        let dirs: Vec<String> = search_dirs(&env)
            .iter()
            .map(|d| d.path.display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "/a",
                "/b",
                "/c",
                "/cuda/lib64",
                "/cuda/lib",
                "/site/nvidia/cu13/lib",
                "/site/nvidia/cudnn/lib",
                "/usr/local/cuda/lib64"
            ]
        );
    }

    /// A directory holding empty files with these names.
    fn install(root: &Path, dir: &str, files: &[&str]) -> PathBuf {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for file in files {
            std::fs::write(dir.join(file), b"").unwrap();
        }
        dir
    }

    const CUDNN: &[&str] = &["libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"];

    fn loaded_from(load: &[(&'static str, PathBuf)], library_prefix: &str) -> Vec<PathBuf> {
        load.iter()
            .filter(|(soname, _)| soname.starts_with(library_prefix))
            .map(|(_, path)| path.clone())
            .collect()
    }

    /// The H200 machine's layout: apt's cuDNN in the loader's cache (which cudarc opens by
    /// `libcudnn.so`) and PyTorch's newer wheel in site-packages. Every cuDNN file then comes
    /// from apt's directory, none from the wheel.
    #[test]
    fn the_loaders_cudnn_gets_its_own_sub_libraries() {
        let root = tempfile::tempdir().unwrap();
        let apt = install(root.path(), "apt", CUDNN);
        let site = root.path().join("site-packages");
        let wheel = install(&site, "nvidia/cudnn/lib", CUDNN);
        let found = Discovery::search(&SearchEnv {
            site_packages: vec![site],
            ..SearchEnv::default()
        });
        assert_eq!(
            found.path_of("libcudnn_ops.so.9"),
            Some(wheel.join("libcudnn_ops.so.9").as_path())
        );
        let picks = [("cuDNN", apt.join("libcudnn.so.9"))];
        let (load, conflicts) = found.plan(&picks);
        let mut want: Vec<PathBuf> = CUDNN.iter().map(|f| apt.join(f)).collect();
        let mut got = loaded_from(&load, "libcudnn");
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        // Without a loader pick the wheel is used, all of it.
        let (load, _) = found.plan(&[]);
        assert!(
            loaded_from(&load, "libcudnn")
                .iter()
                .all(|p| p.parent() == Some(wheel.as_path())),
            "{load:?}"
        );
        assert_eq!(loaded_from(&load, "libcudnn").len(), CUDNN.len());
    }

    /// An explicit directory the loader's choice would override is an error naming both.
    #[test]
    fn an_overridden_explicit_choice_is_a_conflict() {
        let root = tempfile::tempdir().unwrap();
        let apt = install(root.path(), "apt", CUDNN);
        let mine = install(root.path(), "mine", CUDNN);
        let found = Discovery::search(&SearchEnv {
            explicit: Some(mine.clone().into()),
            ..SearchEnv::default()
        });
        let (_, conflicts) = found.plan(&[("cuDNN", apt.join("libcudnn.so.9"))]);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(
            conflicts[0].contains(&mine.display().to_string()),
            "{conflicts:?}"
        );
        assert!(
            conflicts[0].contains(&apt.display().to_string()),
            "{conflicts:?}"
        );
        // The loader finding the explicit file itself (through a link) is no conflict.
        #[cfg(unix)]
        {
            let link = root.path().join("libcudnn.so");
            std::os::unix::fs::symlink(mine.join("libcudnn.so.9"), &link).unwrap();
            let (load, conflicts) = found.plan(&[("cuDNN", link)]);
            assert!(conflicts.is_empty(), "{conflicts:?}");
            assert!(!loaded_from(&load, "libcudnn").is_empty());
        }
    }

    /// A library's files never come from two directories: a sub-library found only elsewhere
    /// is left out rather than mixed in.
    #[test]
    fn one_library_is_loaded_from_one_directory() {
        let root = tempfile::tempdir().unwrap();
        let shim_only = install(root.path(), "a", &["libcudnn.so.9"]);
        let ops_only = install(root.path(), "b", &["libcudnn_ops.so.9"]);
        let path = std::env::join_paths([&shim_only, &ops_only]).unwrap();
        let found = Discovery::search(&SearchEnv {
            loader_path: Some(path),
            ..SearchEnv::default()
        });
        assert!(found.path_of("libcudnn_ops.so.9").is_some());
        let (load, _) = found.plan(&[]);
        assert_eq!(
            loaded_from(&load, "libcudnn"),
            vec![shim_only.join("libcudnn.so.9")]
        );
    }

    #[test]
    fn a_pip_layout_is_found_and_named_in_messages() {
        let root = tempfile::tempdir().unwrap();
        let site = root.path().join("site-packages");
        let cu13 = site.join("nvidia/cu13/lib");
        let cudnn = site.join("nvidia/cudnn/lib");
        std::fs::create_dir_all(&cu13).unwrap();
        std::fs::create_dir_all(&cudnn).unwrap();
        for file in ["libcublas.so.13", "libcublasLt.so.13", "libnvrtc.so.13"] {
            std::fs::write(cu13.join(file), b"").unwrap();
        }
        std::fs::write(cudnn.join("libcudnn.so.9"), b"").unwrap();
        // A cuBLAS 12 wheel's file is not what this build wants.
        std::fs::write(cu13.join("libcublas.so.12"), b"").unwrap();
        let env = SearchEnv {
            site_packages: vec![site.clone()],
            ..SearchEnv::default()
        };
        let found = Discovery::search(&env);
        assert_eq!(
            found.path_of("libcublas.so.13"),
            Some(cu13.join("libcublas.so.13").as_path())
        );
        assert_eq!(
            found.path_of("libcudnn.so.9"),
            Some(cudnn.join("libcudnn.so.9").as_path())
        );
        assert_eq!(found.path_of("libcudnn_cnn.so.9"), None);
        let searched = found.searched();
        assert!(searched.contains(&cu13.display().to_string()), "{searched}");
        assert!(searched.contains("python3 site-packages"), "{searched}");
        assert!(searched.contains("/usr/local/cuda/lib64"), "{searched}");
    }
}
