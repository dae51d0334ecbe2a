//! Decoding files and bytes to 8-bit RGB under size limits (see the module docs of
//! [`crate::image`]).

use std::io::Cursor;
use std::path::Path;

use image::{
    DynamicImage, GrayImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage,
};

#[cfg(doc)]
use super::budget::DECODE_MEMORY_BUDGET;
use super::budget::{DecodeBudget, OverBudget};
use super::gif::{self, GifFailure};
use super::read::{sniff_format, ImageFile, ImageLimits};
use super::{MAX_DECODE_ALLOC, MAX_IMAGE_DIMENSION};
use crate::error::{Error, Result};

/// The decoder limits used by [`decode_image_file`] and [`decode_image_bytes`]: the crate checks
/// [`MAX_DECODE_ALLOC`] against the decoder's output itself.
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
/// Reading and decoding hold memory from the process-wide [`DECODE_MEMORY_BUDGET`] (waiting
/// while other threads' decodes hold it); the returned image itself is the caller's.
///
/// A file that cannot be read is an [`Error::Io`]; one that cannot be decoded (empty, truncated,
/// not an image, unsupported format) an [`Error::ImageDecode`]; one over the limits an
/// [`Error::ImageTooLarge`]. Every error names `path`.
pub fn decode_image_file_with(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let widen = |size: ImageSize| match size.grey {
        true => size.pixels() * 3,
        false => 0,
    };
    with_decoded(path, limits, DecodeBudget::global(), widen, |pixels| {
        Ok(pixels.into_rgb())
    })
}

/// Decoded pixels in the narrowest form the crop needs: grey images stay one channel until
/// after resampling (bit for bit the same result, a third of the memory).
pub(super) enum Pixels {
    Grey(GrayImage),
    Rgb(RgbImage),
}

impl Pixels {
    pub(super) fn into_rgb(self) -> RgbImage {
        match self {
            Pixels::Grey(grey) => DynamicImage::ImageLuma8(grey).into_rgb8(),
            Pixels::Rgb(rgb) => rgb,
        }
    }

    fn from_decoded(decoded: DynamicImage) -> Pixels {
        match decoded {
            DynamicImage::ImageLuma8(grey) => Pixels::Grey(grey),
            grey @ (DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)) => Pixels::Grey(grey.into_luma8()),
            other => Pixels::Rgb(other.into_rgb8()),
        }
    }
}

/// An image's size as its header states it, before any pixel is decoded.
#[derive(Debug, Clone, Copy)]
pub(super) struct ImageSize {
    pub(super) width: u32,
    pub(super) height: u32,
    /// Whether it decodes to [`Pixels::Grey`].
    pub(super) grey: bool,
}

impl ImageSize {
    pub(super) fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Slack for what a decoder allocates besides the pixels (tables, row buffers).
const DECODER_SLACK_BYTES: u64 = 1024 * 1024;

/// A decoder ready to run on bytes whose header was read, with what decoding will hold.
enum Prepared<'a> {
    Gif(&'a [u8]),
    Other(Box<dyn ImageDecoder + 'a>),
}

/// What decoding `bytes` will allocate: the decoder's output, half as much again for its working
/// buffers (planes, strips), the conversion to 8-bit grey or RGB, and slack.
fn prepare<'a>(bytes: &'a [u8], origin: &Path) -> Result<(Prepared<'a>, ImageSize, u64)> {
    let decode_error = |message| Error::ImageDecode {
        path: origin.to_path_buf(),
        message,
    };
    let format = sniff_format(bytes).map_err(decode_error)?;
    if format == ImageFormat::Gif {
        let (width, height, frame) =
            gif::first_frame_size(bytes).map_err(|f| gif_error(origin, f))?;
        let size = ImageSize {
            width,
            height,
            grey: false,
        };
        return Ok((
            Prepared::Gif(bytes),
            size,
            frame + 3 * size.pixels() + DECODER_SLACK_BYTES,
        ));
    }
    if format == ImageFormat::Jpeg {
        // The JPEG decoder fills missing data with grey instead of failing; PIL raises
        // "image file is truncated". Check the marker structure first.
        check_jpeg_complete(bytes).map_err(decode_error)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decode_limits());
    let decoder = reader.into_decoder().map_err(|e| image_error(origin, e))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(decode_error(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    let decoded = decoder.total_bytes();
    if decoded > MAX_DECODE_ALLOC {
        return Err(Error::ImageTooLarge {
            path: origin.to_path_buf(),
            message: format!(
                "decoding it needs {decoded} bytes, more than the {MAX_DECODE_ALLOC}-byte limit \
                 per image (MAX_DECODE_ALLOC)"
            ),
        });
    }
    use image::ColorType::*;
    let colour = decoder.color_type();
    let grey = matches!(colour, L8 | La8 | L16 | La16);
    let size = ImageSize {
        width,
        height,
        grey,
    };
    let conversion = match colour {
        L8 | Rgb8 => 0,
        L16 | La8 | La16 => size.pixels(),
        _ => 3 * size.pixels(),
    };
    let need = decoded + decoded / 2 + conversion + DECODER_SLACK_BYTES;
    Ok((Prepared::Other(Box::new(decoder)), size, need))
}

fn run(prepared: Prepared<'_>, origin: &Path) -> Result<Pixels> {
    match prepared {
        Prepared::Gif(bytes) => gif::decode_first_frame(bytes)
            .map(Pixels::Rgb)
            .map_err(|f| gif_error(origin, f)),
        Prepared::Other(decoder) => {
            let decoded =
                DynamicImage::from_decoder(decoder).map_err(|e| image_error(origin, e))?;
            Ok(Pixels::from_decoded(decoded))
        }
    }
}

fn gif_error(origin: &Path, failure: GifFailure) -> Error {
    match failure {
        GifFailure::Corrupt(message) => Error::ImageDecode {
            path: origin.to_path_buf(),
            message,
        },
        GifFailure::TooLarge(message) => Error::ImageTooLarge {
            path: origin.to_path_buf(),
            message,
        },
    }
}

fn over_budget(path: &Path, e: OverBudget) -> Error {
    Error::ImageTooLarge {
        path: path.to_path_buf(),
        message: format!(
            "reading and decoding it needs about {} bytes, more than the {}-byte memory budget \
             all decodes share (DECODE_MEMORY_BUDGET)",
            e.requested, e.limit
        ),
    }
}

/// Reads `path` (under `limits`), decodes it and hands the pixels to `use_pixels`, holding
/// from `budget` everything this allocates: the file's bytes (twice: some decoders copy them),
/// what [`prepare`] counts, and `work(size)`, what `use_pixels` allocates.
///
/// Never waits while holding a reservation (see [`DecodeBudget`]): the file's bytes are reserved
/// first; if the rest is not free at once, everything is given back, the whole amount is asked
/// for in one request, and the file is read again. A pipe or device cannot be read again, so it
/// holds the whole budget while it is read and decoded.
pub(super) fn with_decoded<T>(
    path: &Path,
    limits: &ImageLimits,
    budget: &DecodeBudget,
    work: impl Fn(ImageSize) -> u64,
    use_pixels: impl FnOnce(Pixels) -> Result<T>,
) -> Result<T> {
    let mut file = ImageFile::open(path, limits)?;
    let first = match file.len() {
        Some(len) => 2 * len,
        None => budget.limit(),
    };
    let mut reservation = budget.acquire(first).map_err(|e| over_budget(path, e))?;
    // A regular file is read at most three times: the file may change between reads.
    for _ in 0..3 {
        let bytes = file.read_all()?;
        let (prepared, size, need) = prepare(&bytes, path)?;
        let total = 2 * bytes.len() as u64 + need + work(size);
        if reservation.try_resize(total) {
            let pixels = run(prepared, path)?;
            // The file's bytes (and a decoder's copy of them) are gone: let others use them.
            let held = 2 * bytes.len() as u64;
            drop(bytes);
            reservation.try_resize(total - held);
            return use_pixels(pixels);
        }
        if file.len().is_none() || total > budget.limit() {
            return Err(over_budget(
                path,
                OverBudget {
                    requested: total,
                    limit: budget.limit(),
                },
            ));
        }
        drop(prepared);
        drop(bytes);
        drop(reservation);
        reservation = budget.acquire(total).map_err(|e| over_budget(path, e))?;
    }
    Err(Error::ImageDecode {
        path: path.to_path_buf(),
        message: "the file kept changing while it was read".into(),
    })
}

/// Decodes an in-memory image into 8-bit RGB; `origin` only names the image in errors.
///
/// The format is guessed from the content (PNG, JPEG, BMP, GIF, WebP, TIFF), never from
/// `origin`'s extension. Grayscale becomes three equal channels, alpha is dropped (not
/// blended), 16-bit samples are scaled to 8 bits, and only the first frame of an animation is
/// kept; a GIF's first frame is composed onto its canvas as PIL does (see `image/gif.rs`).
/// Limits: [`MAX_IMAGE_DIMENSION`] per side and [`MAX_DECODE_ALLOC`] bytes. The bytes are the
/// caller's, so this decode does not wait for the [`DECODE_MEMORY_BUDGET`].
///
/// A JPEG must reach its end-of-image marker: a truncated JPEG is an [`Error::ImageDecode`]
/// (the underlying decoder would silently fill the missing part with grey; PIL reports
/// "image file is truncated"). A JPEG whose data is complete but lacks only the final marker is
/// rejected too.
///
/// Note: for 16-bit *grayscale* PNGs PIL's `convert("RGB")` clips the 16-bit value to 255 instead
/// of scaling it, so PyTorch pipelines see a different (mostly white) image there.
pub fn decode_image_bytes(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    let (prepared, _, _) = prepare(bytes, origin)?;
    Ok(run(prepared, origin)?.into_rgb())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An image that needs more than the whole budget is refused before it is decoded, with an
    /// error naming the budget; one that fits is decoded and its reservation given back.
    #[test]
    fn an_image_over_the_whole_budget_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grey.png");
        GrayImage::from_pixel(1000, 1000, image::Luma([9]))
            .save(&path)
            .unwrap();
        let limits = ImageLimits::default();
        // Decoding holds at least the 1,000,000 grey bytes and half as much again.
        let small = DecodeBudget::new(1_000_000);
        let err = with_decoded(&path, &limits, &small, |_| 0, |_| Ok(())).unwrap_err();
        match err {
            Error::ImageTooLarge { message, .. } => {
                assert!(message.contains("DECODE_MEMORY_BUDGET"), "{message}")
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
        let enough = DecodeBudget::new(8_000_000);
        let side = with_decoded(
            &path,
            &limits,
            &enough,
            |_| 0,
            |pixels| match pixels {
                Pixels::Grey(g) => Ok(g.width()),
                Pixels::Rgb(_) => panic!("a grey PNG stays grey"),
            },
        )
        .unwrap();
        assert_eq!(side, 1000);
        assert!(enough.peak() >= 1_500_000, "peak {}", enough.peak());
        assert!(
            enough.acquire(8_000_000).is_ok(),
            "everything was given back"
        );
    }
}
