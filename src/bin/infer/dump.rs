//! `--dump-logits`: checked before any image is read, written atomically at the end, never one
//! of the run's own inputs — so a mistake, Ctrl-C or a fatal error never destroys a file.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use alexnet_cuda::Error;
use ndarray::Array2;
use ndarray_npy::WriteNpyExt;
use tempfile::NamedTempFile;

use crate::args::usage_error;

/// The output file of `--dump-logits`.
pub struct DumpFile {
    path: PathBuf,
    /// The directory the temporary file and the rename happen in.
    dir: PathBuf,
}

impl DumpFile {
    /// Checks `path` before anything is read or written: an output that is also one of the
    /// `inputs` is a usage error (exit 2); a directory that cannot take a new file is an
    /// [`Error::Io`] now rather than after the run. Nothing is created or truncated.
    pub fn check(path: &Path, inputs: &[PathBuf]) -> Result<Self, Error> {
        if let Some(input) = inputs.iter().find(|input| same_file(input, path)) {
            usage_error(format!(
                "--dump-logits {} is also an input (--images {}): it would be overwritten; \
                 choose another output file",
                path.display(),
                input.display()
            ));
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A probe file, deleted at once: the directory exists and takes new files.
        NamedTempFile::new_in(&dir).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(DumpFile {
            path: path.to_path_buf(),
            dir,
        })
    }

    /// Whether `candidate` is this output file (the same file, however it is named).
    pub fn is(&self, candidate: &Path) -> bool {
        same_file(candidate, &self.path)
    }

    /// Writes `logits` as float32 `.npy` to a temporary file beside the target and renames it
    /// over the target: the previous file stays intact until the new one is complete.
    pub fn write(&self, logits: &Array2<f32>) -> Result<(), Error> {
        let io_error = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let temp = NamedTempFile::new_in(&self.dir).map_err(io_error)?;
        let mut writer = BufWriter::new(temp);
        logits
            .write_npy(&mut writer)
            .map_err(|e| io_error(std::io::Error::other(e.to_string())))?;
        let temp = writer.into_inner().map_err(|e| io_error(e.into_error()))?;
        temp.as_file().sync_all().map_err(io_error)?;
        temp.persist(&self.path).map_err(|e| io_error(e.error))?;
        Ok(())
    }
}

/// Whether `a` and `b` name the same existing file (after following links).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
