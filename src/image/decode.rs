//! Decoding files and bytes to 8-bit RGB under size limits (see the module docs of
//! [`crate::image`]).

use std::path::Path;

use image::{DynamicImage, ImageError, ImageReader, Limits, RgbImage};

use super::gif::{self, GifFailure};
use super::read::{sniff_format, ImageFile, ImageLimits};
use super::{MAX_DECODE_ALLOC, MAX_IMAGE_DIMENSION};
use crate::error::{Error, Result};

/// The decoder limits used by [`decode_image_file`] and [`decode_image_bytes`].
fn decode_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_DIMENSION);
    limits.max_image_height = Some(MAX_IMAGE_DIMENSION);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

fn image_error(path: &Path, err: ImageError) -> Error {
    match err {
        ImageError::Limits(e) => Error::ImageTooLarge {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
        other => Error::ImageDecode {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

/// Reads and decodes an image file into 8-bit RGB (see [`decode_image_bytes`]), under the
/// default [`ImageLimits`] (at most 256 MiB read); see [`decode_image_file_with`].
pub fn decode_image_file(path: &Path) -> Result<RgbImage> {
    decode_image_file_with(path, &ImageLimits::default())
}

/// Reads and decodes an image file into 8-bit RGB (see [`decode_image_bytes`]), reading at most
/// `limits.max_file_bytes` bytes.
///
/// The first bytes are read first: unless they show a supported format the file is an
/// [`Error::ImageDecode`] without reading the rest. A regular file larger than the cap is an
/// [`Error::ImageTooLarge`] without reading it; a pipe or device is read up to the cap.
///
/// A file that cannot be read is an [`Error::Io`]; one that cannot be decoded (empty, truncated,
/// not an image, unsupported format) an [`Error::ImageDecode`]; one over the limits an
/// [`Error::ImageTooLarge`]. Every error names `path`.
pub fn decode_image_file_with(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let bytes = ImageFile::open(path, limits)?.read_all()?;
    decode_image_bytes(&bytes, path)
}

/// Decodes an in-memory image into 8-bit RGB; `origin` only names the image in errors.
///
/// The format is guessed from the content (PNG, JPEG, BMP, GIF, WebP, TIFF), never from
/// `origin`'s extension. Grayscale becomes three equal channels, alpha is dropped (not
/// blended), 16-bit samples are scaled to 8 bits, and only the first frame of an animation is
/// kept; a GIF's first frame is composed onto its canvas as PIL does (see `image/gif.rs`). Limits: [`MAX_IMAGE_DIMENSION`] per side and [`MAX_DECODE_ALLOC`] bytes.
///
/// A JPEG must reach its end-of-image marker: a truncated JPEG is an [`Error::ImageDecode`]
/// (the underlying decoder would silently fill the missing part with grey; PIL reports
/// "image file is truncated"). A JPEG whose data is complete but lacks only the final marker is
/// rejected too.
///
/// Note: for 16-bit *grayscale* PNGs PIL's `convert("RGB")` clips the 16-bit value to 255 instead
/// of scaling it, so PyTorch pipelines see a different (mostly white) image there.
pub fn decode_image_bytes(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    let format = sniff_format(bytes).map_err(|message| Error::ImageDecode {
        path: origin.to_path_buf(),
        message,
    })?;
    if format == image::ImageFormat::Gif {
        return gif::decode_first_frame(bytes).map_err(|failure| match failure {
            GifFailure::Corrupt(message) => Error::ImageDecode {
                path: origin.to_path_buf(),
                message,
            },
            GifFailure::TooLarge(message) => Error::ImageTooLarge {
                path: origin.to_path_buf(),
                message,
            },
        });
    }
    let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    reader.limits(decode_limits());
    if format == image::ImageFormat::Jpeg {
        // The JPEG decoder fills missing data with grey instead of failing; PIL raises
        // "image file is truncated". Check the marker structure first.
        check_jpeg_complete(bytes).map_err(|message| Error::ImageDecode {
            path: origin.to_path_buf(),
            message,
        })?;
    }
    let decoded: DynamicImage = reader.decode().map_err(|e| image_error(origin, e))?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(Error::ImageDecode {
            path: origin.to_path_buf(),
            message: format!(
                "image has no pixels ({}x{})",
                decoded.width(),
                decoded.height()
            ),
        });
    }
    Ok(decoded.into_rgb8())
}

/// Walks a JPEG's marker segments (skipping each segment by its length, and the entropy-coded
/// data after each start-of-scan) and fails unless the end-of-image marker is reached before the
/// data runs out. Bytes after the end-of-image marker are ignored, as decoders do.
fn check_jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    let truncated = |what: &str| Err(format!("truncated JPEG ({} bytes): {what}", b.len()));
    if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG: missing start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // Skip anything up to the next 0xFF, then any fill bytes (0xFF 0xFF ...).
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            return truncated("no end-of-image marker");
        };
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length: stuffed zero, TEM, RSTn, SOI.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        if i + 2 > b.len() {
            return truncated("a marker segment is cut off");
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 {
            return Err(format!(
                "corrupt JPEG: marker 0x{marker:02X} has length {len}"
            ));
        }
        i += len;
        if i > b.len() {
            return truncated("a marker segment is cut off");
        }
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker other than a stuffed 0xFF00 or RSTn.
            loop {
                if i + 1 >= b.len() {
                    return truncated("the image data ends before the end-of-image marker");
                }
                if b[i] == 0xFF && b[i + 1] != 0x00 && !(0xD0..=0xD7).contains(&b[i + 1]) {
                    break;
                }
                i += 1;
            }
        }
    }
}
