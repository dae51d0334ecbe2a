//! Reading one image file: the format is sniffed from the first bytes before anything else is
//! read, and no file is read past [`ImageLimits::max_file_bytes`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use image::ImageFormat;

use crate::error::{Error, Result};

/// Default of [`ImageLimits::max_file_bytes`]: 256 MiB, well above any photo (a 100-megapixel
/// JPEG is about 50 MB) and far below what would strain a machine.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Bytes read to recognise a format (the `image` crate's own guess reads 16).
const SNIFF_BYTES: usize = 16;

/// Limits on reading one image file, used by [`decode_image_file_with`],
/// [`Preprocess::load`] and [`load_batch`] (through [`Preprocess::limits`]).
///
/// [`decode_image_file_with`]: super::decode_image_file_with
/// [`Preprocess::load`]: super::Preprocess::load
/// [`Preprocess::limits`]: super::Preprocess::limits
/// [`load_batch`]: super::load_batch
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageLimits {
    /// Most bytes read from one image file (default [`DEFAULT_MAX_FILE_BYTES`], 256 MiB).
    ///
    /// A regular file larger than this is an [`Error::ImageTooLarge`] decided from its size,
    /// without reading it; a pipe or device is read up to this many bytes and is an
    /// `ImageTooLarge` if it has more. Either way only after its first bytes showed an image
    /// format: a non-image is an [`Error::ImageDecode`] however large it is.
    pub max_file_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

impl ImageLimits {
    /// Checks the limits: the cap must be at least 1 byte.
    pub fn validate(&self) -> Result<()> {
        if self.max_file_bytes == 0 {
            return Err(Error::invalid(
                "image limits: max_file_bytes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The formats the crate decodes (the `image` features it enables), from the first bytes.
/// `Err` is the message of an [`Error::ImageDecode`].
pub(super) fn sniff_format(head: &[u8]) -> std::result::Result<ImageFormat, String> {
    use ImageFormat::*;
    if head.is_empty() {
        return Err("file is empty".into());
    }
    match image::guess_format(head) {
        Ok(f @ (Png | Jpeg | Gif | WebP | Tiff | Bmp)) => Ok(f),
        Ok(other) => Err(format!(
            "{other:?} images are not supported (PNG, JPEG, GIF, WebP, TIFF and BMP are)"
        )),
        Err(_) => Err(
            "the image format could not be determined from the first bytes \
             (not PNG, JPEG, GIF, WebP, TIFF or BMP)"
                .into(),
        ),
    }
}

/// An opened image file whose format is known and whose size is within the cap.
pub(super) struct ImageFile {
    path: PathBuf,
    file: File,
    /// The bytes already read to sniff the format.
    head: Vec<u8>,
    /// The size of a regular file; `None` for a pipe or device (unknown, and not re-readable).
    len: Option<u64>,
    cap: u64,
}

impl ImageFile {
    /// Opens `path` and reads its first bytes: an [`Error::ImageDecode`] unless they show a
    /// supported format, then an [`Error::ImageTooLarge`] if it is a regular file over the cap.
    pub(super) fn open(path: &Path, limits: &ImageLimits) -> Result<ImageFile> {
        limits.validate()?;
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let len = meta.is_file().then_some(meta.len());
        // `take` and a loop: a pipe may deliver its first bytes in pieces.
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        (&mut file)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(path, e))?;
        sniff_format(&head).map_err(|message| Error::ImageDecode {
            path: path.to_path_buf(),
            message,
        })?;
        let cap = limits.max_file_bytes;
        if let Some(len) = len.filter(|&len| len > cap) {
            return Err(Error::ImageTooLarge {
                path: path.to_path_buf(),
                message: format!(
                    "the file is {len} bytes, more than the {cap}-byte cap per image \
                     (ImageLimits::max_file_bytes)"
                ),
            });
        }
        Ok(ImageFile {
            path: path.to_path_buf(),
            file,
            head,
            len,
            cap,
        })
    }

    /// The size of a regular file; `None` for a pipe or device, which cannot be read twice.
    pub(super) fn len(&self) -> Option<u64> {
        self.len
    }

    /// All of the file's bytes (at most the cap; an [`Error::ImageTooLarge`] if there are more).
    pub(super) fn read_all(&mut self) -> Result<Vec<u8>> {
        let path = &self.path;
        let io = |e| Error::io(path, e);
        let mut bytes;
        if self.len.is_some() {
            self.file.seek(SeekFrom::Start(0)).map_err(io)?;
            bytes = Vec::new();
        } else {
            bytes = std::mem::take(&mut self.head);
        }
        // One byte past the cap tells a file that grew (or a stream) from one that fits.
        let want = self.cap.saturating_add(1) - bytes.len() as u64;
        if let Some(len) = self.len {
            bytes.reserve_exact(len.min(self.cap) as usize);
        }
        (&mut self.file)
            .take(want)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > self.cap {
            return Err(Error::ImageTooLarge {
                path: self.path.clone(),
                message: format!(
                    "more than the {}-byte cap per image was read (ImageLimits::max_file_bytes)",
                    self.cap
                ),
            });
        }
        Ok(bytes)
    }
}
