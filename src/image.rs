//! Image decoding and torchvision's ImageNet eval preprocessing.
//!
//! The pipeline, per image, is exactly torchvision's
//! `Compose([Resize(256), CenterCrop(224), ToTensor(), Normalize(mean, std)])` applied to a PIL
//! image opened with `Image.open(path).convert("RGB")`:
//!
//! 1. [`decode_image_file`] / [`decode_image_bytes`]: the format is guessed from the content (not
//!    the extension); grayscale, palette, RGBA, 16-bit, ... all become 8-bit RGB (alpha is dropped,
//!    not blended, like PIL's `convert("RGB")`). EXIF orientation is *not* applied (PIL does not
//!    apply it either). Decoding runs under [`Limits`] ([`MAX_IMAGE_DIMENSION`],
//!    [`MAX_DECODE_ALLOC`]) so a file whose header claims a huge size is an
//!    [`Error::ImageTooLarge`], not an abort.
//! 2. [`Preprocess::resize_and_crop`]: shorter side to [`Preprocess::resize_shorter`] (the other
//!    side `int(resize_shorter * long / short)`, truncated), bilinear with antialiasing, then the
//!    centre `crop x crop` window. The resampler is a re-implementation of Pillow's
//!    `ImagingResample` (same filter support scaling, same 22-bit fixed-point coefficients, same
//!    horizontal-then-vertical passes with an 8-bit intermediate), so on the same decoded pixels it
//!    reproduces torchvision's crops bit for bit. Only the pixels inside the crop window are
//!    computed. The result is a `crop x crop` 8-bit RGB image.
//! 3. [`Preprocess::normalize_into`] / [`U8Batch::to_nchw_f32`]: CHW `f32`,
//!    `(x as f32 / 255.0 - mean) / std`, computed in `f32` like torchvision.
//!
//! Batches are kept as [`U8Batch`] (N images, HWC `u8`, contiguous): 4x fewer bytes than `f32`,
//! which is what a GPU backend uploads before normalising on the device.

use std::borrow::Cow;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageError, ImageReader, Limits, Rgb, RgbImage};
use ndarray::Array4;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// ImageNet per-channel mean (RGB), as used by torchvision's pretrained models.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (RGB), as used by torchvision's pretrained models.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest width and largest height (in pixels) the decoders accept; a file claiming more is an
/// [`Error::ImageTooLarge`].
pub const MAX_IMAGE_DIMENSION: u32 = 16384;
/// Most bytes a decoder may allocate for one image (512 MiB); a file needing more is an
/// [`Error::ImageTooLarge`]. The decoded image itself counts (an 8-bit RGB image of
/// 16384 x 10922 pixels is about the largest that fits). The conversion to 8-bit RGB that follows
/// decoding (e.g. from grayscale) is not counted.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// Fixed-point precision of Pillow's 8-bit resampling coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

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

/// Reads and decodes an image file into 8-bit RGB (see [`decode_image_bytes`]).
///
/// A file that cannot be read is an [`Error::Io`]; one that cannot be decoded (empty, truncated,
/// not an image, unsupported format) an [`Error::ImageDecode`]; one over the limits an
/// [`Error::ImageTooLarge`]. Every error names `path`.
pub fn decode_image_file(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image_bytes(&bytes, path)
}

/// Decodes an in-memory image into 8-bit RGB; `origin` only names the image in errors.
///
/// The format is guessed from the content (PNG, JPEG, BMP, GIF, WebP, TIFF), never from
/// `origin`'s extension. Grayscale becomes three equal channels, alpha is dropped (not
/// blended), 16-bit samples are scaled to 8 bits, and only the first frame of an animation is
/// kept. Limits: [`MAX_IMAGE_DIMENSION`] per side and [`MAX_DECODE_ALLOC`] bytes.
///
/// A JPEG must reach its end-of-image marker: a truncated JPEG is an [`Error::ImageDecode`]
/// (the underlying decoder would silently fill the missing part with grey; PIL reports
/// "image file is truncated"). A JPEG whose data is complete but lacks only the final marker is
/// rejected too.
///
/// Note: for 16-bit *grayscale* PNGs PIL's `convert("RGB")` clips the 16-bit value to 255 instead
/// of scaling it, so PyTorch pipelines see a different (mostly white) image there.
pub fn decode_image_bytes(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::ImageDecode {
            path: origin.to_path_buf(),
            message: "file is empty".into(),
        });
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(origin, e))?;
    reader.limits(decode_limits());
    if reader.format() == Some(image::ImageFormat::Jpeg) {
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

// ---------------------------------------------------------------------------------------------
// Preprocessing parameters
// ---------------------------------------------------------------------------------------------

/// torchvision's eval preprocessing: `Resize(resize_shorter)` (bilinear, antialiased),
/// `CenterCrop(crop)`, `ToTensor()`, `Normalize(mean, std)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Length the shorter image side is resized to (torchvision: 256).
    pub resize_shorter: u32,
    /// Side of the square centre crop (torchvision: 224).
    pub crop: u32,
    /// Per-channel mean (RGB) subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB) divided by after subtracting the mean.
    pub std: [f32; 3],
}

impl Default for Preprocess {
    /// torchvision's ImageNet eval transform: 256, 224, [`IMAGENET_MEAN`], [`IMAGENET_STD`].
    fn default() -> Self {
        Preprocess {
            resize_shorter: 256,
            crop: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl Preprocess {
    /// Checks the parameters: sizes non-zero, mean finite, std finite and non-zero.
    pub fn validate(&self) -> Result<()> {
        if self.resize_shorter == 0 {
            return Err(Error::invalid(
                "preprocess.resize_shorter",
                "must be at least 1",
            ));
        }
        if self.crop == 0 {
            return Err(Error::invalid("preprocess.crop", "must be at least 1"));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::invalid(
                "preprocess.mean",
                format!("must be finite, got {:?}", self.mean),
            ));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(Error::invalid(
                "preprocess.std",
                format!("must be finite and non-zero, got {:?}", self.std),
            ));
        }
        Ok(())
    }

    /// The `(width, height)` torchvision's `Resize(resize_shorter)` gives an image of
    /// `width x height`: the shorter side becomes `resize_shorter`, the other
    /// `int(resize_shorter * long / short)` (truncated, computed in `f64` like Python).
    /// A square image stays square.
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (short, long) = if width <= height {
            (width, height)
        } else {
            (height, width)
        };
        let new_short = self.resize_shorter;
        let new_long = if short == 0 {
            0
        } else {
            // Python: int(requested_new_short * long / short); the product is exact in f64 and
            // the quotient correctly rounded, as with Python's int / int true division.
            (new_short as f64 * long as f64 / short as f64) as u32
        };
        if width <= height {
            (new_short, new_long)
        } else {
            (new_long, new_short)
        }
    }

    /// Decodes the file at `path` and returns its `crop x crop` preprocessed crop
    /// ([`decode_image_file`] then [`Preprocess::resize_and_crop`]).
    pub fn load(&self, path: &Path) -> Result<RgbImage> {
        self.validate()?;
        let img = decode_image_file(path)?;
        self.resize_and_crop(&img)
    }

    /// torchvision's `Resize(resize_shorter)` then `CenterCrop(crop)`: returns the
    /// `crop x crop` 8-bit crop.
    ///
    /// - Resize: see [`Preprocess::resized_size`] for the size and [`resize_bilinear`] for the
    ///   pixels (Pillow's antialiased bilinear, bit-exact). If the image already has the target
    ///   size there is no resampling at all.
    /// - Crop: top = `round((h - crop) / 2)`, left = `round((w - crop) / 2)` with Python's
    ///   round-half-to-even, like torchvision's `center_crop`.
    /// - A resized image smaller than the crop (only possible when `resize_shorter < crop`) is
    ///   zero-padded like torchvision: `(crop - side) / 2` (rounded down) zeros before, the rest
    ///   after.
    ///
    /// Only the pixels of the resized image that fall inside the crop window are computed, so a
    /// very elongated image does not allocate its whole resized version.
    ///
    /// Errors: [`Error::Invalid`] for invalid parameters or an image with no pixels.
    pub fn resize_and_crop(&self, img: &RgbImage) -> Result<RgbImage> {
        self.validate()?;
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::invalid(
                "image",
                format!("image has no pixels ({w}x{h})"),
            ));
        }
        let (nw, nh) = self.resized_size(w, h);
        let cx = CropAxis::new(nw, self.crop);
        let cy = CropAxis::new(nh, self.crop);
        Ok(resample_window(img, nw, nh, &cx, &cy, self.crop))
    }

    /// Normalises one `crop x crop` image into `out` in CHW order:
    /// `out[c * crop * crop + y * crop + x] = (pixel[y][x][c] as f32 / 255.0 - mean[c]) / std[c]`.
    ///
    /// Errors: [`Error::Shape`] if the image is not `crop x crop` or `out.len() != 3 * crop * crop`;
    /// [`Error::Invalid`] for invalid parameters.
    pub fn normalize_into<C>(&self, crop: &ImageBuffer<Rgb<u8>, C>, out: &mut [f32]) -> Result<()>
    where
        C: Deref<Target = [u8]>,
    {
        self.validate()?;
        let c = self.crop as usize;
        if crop.dimensions() != (self.crop, self.crop) {
            return Err(Error::Shape {
                op: "Preprocess::normalize_into",
                expected: format!("a {c}x{c} RGB image (height, width, channels = [{c}, {c}, 3])"),
                found: vec![crop.height() as usize, crop.width() as usize, 3],
            });
        }
        if out.len() != 3 * c * c {
            return Err(Error::Shape {
                op: "Preprocess::normalize_into",
                expected: format!("an output of 3 * {c} * {c} = {} f32", 3 * c * c),
                found: vec![out.len()],
            });
        }
        normalize_hwc(&crop.as_raw()[..3 * c * c], &self.mean, &self.std, out);
        Ok(())
    }
}

/// `hwc`: H*W*3 bytes; `out`: 3*H*W floats, CHW.
fn normalize_hwc(hwc: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let hw = hwc.len() / 3;
    debug_assert_eq!(out.len(), 3 * hw);
    for (ch, plane) in out.chunks_exact_mut(hw).enumerate() {
        let (m, s) = (mean[ch], std[ch]);
        for (o, px) in plane.iter_mut().zip(hwc.chunks_exact(3)) {
            *o = (px[ch] as f32 / 255.0 - m) / s;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resampling (Pillow's ImagingResample, 8 bits per channel, bilinear filter)
// ---------------------------------------------------------------------------------------------

/// Pillow's bilinear (triangle) filter, support 1.
fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Fixed-point coefficients for a range of output positions along one axis, as Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` compute them.
struct Coeffs {
    /// For each output position in the range: (first input index, number of taps).
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output position (only the first `taps` are used).
    weights: Vec<i32>,
    ksize: usize,
}

impl Coeffs {
    fn new(in_size: u32, out_size: u32, range: Range<u32>) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 1.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let n = range.len();
        let mut bounds = Vec::with_capacity(n);
        let mut weights = vec![0i32; n * ksize];
        let mut k = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for (i, xx) in range.enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates towards zero; Rust's `as` too (saturating).
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let taps = xmax.max(0) as usize;
            let taps = taps.min(ksize);
            let mut ww = 0.0f64;
            for (x, kx) in k.iter_mut().enumerate().take(taps) {
                let w = bilinear_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[i * ksize..(i + 1) * ksize];
            for (dst, &kx) in row.iter_mut().zip(k.iter()).take(taps) {
                let kx = if ww != 0.0 { kx / ww } else { kx };
                let scaled = kx * (1u32 << PRECISION_BITS) as f64;
                *dst = if kx < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            bounds.push((xmin as usize, taps));
        }
        Coeffs {
            bounds,
            weights,
            ksize,
        }
    }

    /// Weights of output position `i` (index within the range) and its first input index.
    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + n])
    }
}

/// Pillow's `clip8`: drop the fraction bits and clamp to 0..=255.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND_HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass: rows `rows` of `src` (width `src_w`), output columns `cols` of an image
/// `out_w` wide. Returns `rows.len() x cols.len()` RGB bytes.
fn resample_horizontal(
    src: &[u8],
    src_w: u32,
    rows: Range<usize>,
    out_w: u32,
    cols: Range<u32>,
) -> Vec<u8> {
    let coeffs = Coeffs::new(src_w, out_w, cols.clone());
    let n = cols.len();
    let stride = src_w as usize * 3;
    let mut out = vec![0u8; rows.len() * n * 3];
    for (row_out, y) in out.chunks_exact_mut(n * 3).zip(rows) {
        let row = &src[y * stride..(y + 1) * stride];
        for (i, px) in row_out.chunks_exact_mut(3).enumerate() {
            let (start, k) = coeffs.taps(i);
            let (mut s0, mut s1, mut s2) = (ROUND_HALF, ROUND_HALF, ROUND_HALF);
            for (j, &kx) in k.iter().enumerate() {
                let p = &row[(start + j) * 3..(start + j) * 3 + 3];
                let kx = kx as i64;
                s0 += p[0] as i64 * kx;
                s1 += p[1] as i64 * kx;
                s2 += p[2] as i64 * kx;
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass over `src` (`src_h` rows of `width` pixels, of which rows `row0..` are stored in
/// `src` starting at row 0), output rows `rows` of an image `out_h` high.
fn resample_vertical(
    src: &[u8],
    row0: usize,
    width: usize,
    src_h: u32,
    out_h: u32,
    rows: Range<u32>,
) -> Vec<u8> {
    let coeffs = Coeffs::new(src_h, out_h, rows.clone());
    let stride = width * 3;
    let mut out = vec![0u8; rows.len() * stride];
    let mut acc = vec![0i64; stride];
    for (i, row_out) in out.chunks_exact_mut(stride).enumerate() {
        let (start, k) = coeffs.taps(i);
        acc.iter_mut().for_each(|a| *a = ROUND_HALF);
        for (j, &ky) in k.iter().enumerate() {
            let y = start + j - row0;
            let row = &src[y * stride..(y + 1) * stride];
            let ky = ky as i64;
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * ky;
            }
        }
        for (o, &a) in row_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// The rows of the source a vertical pass over output rows `rows` reads.
fn rows_needed(src_h: u32, out_h: u32, rows: &Range<u32>) -> Range<usize> {
    if rows.is_empty() {
        return 0..0;
    }
    let c = Coeffs::new(src_h, out_h, rows.clone());
    let first = c.bounds.first().map(|&(s, _)| s).unwrap_or(0);
    let last = c.bounds.iter().map(|&(s, n)| s + n).max().unwrap_or(first);
    first..last.max(first)
}

/// Resizes `img` to `width x height` with Pillow's antialiased bilinear filter
/// (`Image.resize((width, height), Image.BILINEAR)`, which is what torchvision's `Resize` runs on
/// PIL images): the filter support grows with the downscaling factor, coefficients are 22-bit
/// fixed point, the horizontal pass runs first and is rounded to 8 bits before the vertical one.
/// An axis whose size does not change is not resampled; same size in both is a copy.
///
/// Panics if `width` or `height` is zero or `img` has no pixels.
pub fn resize_bilinear(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    assert!(
        width > 0 && height > 0 && img.width() > 0 && img.height() > 0,
        "resize_bilinear: empty image or target size"
    );
    let buf = resample_region(img, width, height, &(0..width), &(0..height));
    RgbImage::from_raw(width, height, buf).expect("buffer size matches")
}

/// Resamples `img` to a virtual `out_w x out_h` image and returns only the window
/// `cols x rows` of it (RGB bytes, `rows.len() * cols.len() * 3`).
fn resample_region(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    cols: &Range<u32>,
    rows: &Range<u32>,
) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let src = img.as_raw();
    let need_h = out_w != w;
    let need_v = out_h != h;
    // Source rows the vertical pass will read (all of `rows` when there is no vertical pass).
    let src_rows = if need_v {
        rows_needed(h, out_h, rows)
    } else {
        rows.start as usize..rows.end as usize
    };
    let ncols = cols.len();
    let tmp: Cow<[u8]> = if need_h {
        Cow::Owned(resample_horizontal(
            src,
            w,
            src_rows.clone(),
            out_w,
            cols.clone(),
        ))
    } else if cols.start == 0 && cols.end == w && src_rows.start == 0 && src_rows.end == h as usize
    {
        Cow::Borrowed(&src[..])
    } else {
        // No horizontal resampling: copy the needed columns of the needed rows.
        let stride = w as usize * 3;
        let mut v = Vec::with_capacity(src_rows.len() * ncols * 3);
        for y in src_rows.clone() {
            let row = &src[y * stride..(y + 1) * stride];
            v.extend_from_slice(&row[cols.start as usize * 3..cols.end as usize * 3]);
        }
        Cow::Owned(v)
    };
    if need_v {
        resample_vertical(&tmp, src_rows.start, ncols, h, out_h, rows.clone())
    } else {
        tmp.into_owned()
    }
}

/// One axis of torchvision's `center_crop` (with its zero padding) on an axis of length `size`.
struct CropAxis {
    /// First output index that has source data (the zero padding before it).
    out_start: u32,
    /// The source (resized-image) indices copied to outputs `out_start..`.
    src: Range<u32>,
}

impl CropAxis {
    fn new(size: u32, crop: u32) -> CropAxis {
        if crop > size {
            // torchvision pads (crop - size) // 2 before and the rest after, then the padded axis
            // has exactly `crop` entries and the crop offset is 0.
            CropAxis {
                out_start: (crop - size) / 2,
                src: 0..size,
            }
        } else {
            let offset = round_half_even_div2(size - crop);
            CropAxis {
                out_start: 0,
                src: offset..offset + crop,
            }
        }
    }
}

/// `round(d / 2)` with Python's round-half-to-even (d / 2 is an integer or ends in .5).
fn round_half_even_div2(d: u32) -> u32 {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// Resamples `img` to `out_w x out_h` and centre-crops `crop x crop` (zero-padded), computing only
/// the window.
fn resample_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    cx: &CropAxis,
    cy: &CropAxis,
    crop: u32,
) -> RgbImage {
    let window = resample_region(img, out_w, out_h, &cx.src, &cy.src);
    let (ww, wh) = (cx.src.len(), cy.src.len());
    if ww == crop as usize && wh == crop as usize {
        return RgbImage::from_raw(crop, crop, window).expect("buffer size matches");
    }
    let mut out = RgbImage::new(crop, crop);
    let stride = crop as usize * 3;
    let dst = &mut *out;
    for y in 0..wh {
        let d0 = (cy.out_start as usize + y) * stride + cx.out_start as usize * 3;
        dst[d0..d0 + ww * 3].copy_from_slice(&window[y * ww * 3..(y + 1) * ww * 3]);
    }
    out
}

/// torchvision's `CenterCrop(crop)` on an 8-bit RGB image: the `crop x crop` window at
/// top = `round((h - crop) / 2)`, left = `round((w - crop) / 2)` (round half to even); an axis
/// shorter than `crop` is zero-padded with `(crop - side) / 2` (rounded down) zeros before.
pub fn center_crop(img: &RgbImage, crop: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let cx = CropAxis::new(w, crop);
    let cy = CropAxis::new(h, crop);
    let mut out = RgbImage::new(crop, crop);
    let ww = cx.src.len() * 3;
    let src_stride = w as usize * 3;
    let stride = crop as usize * 3;
    let dst = &mut *out;
    for (i, y) in cy.src.clone().enumerate() {
        let s0 = y as usize * src_stride + cx.src.start as usize * 3;
        let d0 = (cy.out_start as usize + i) * stride + cx.out_start as usize * 3;
        dst[d0..d0 + ww].copy_from_slice(&img.as_raw()[s0..s0 + ww]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

/// N preprocessed images, each HWC `u8` `crop x crop x 3`, contiguous, in push order.
///
/// This is the compact form (a quarter of the `f32` bytes) a GPU backend uploads and normalises
/// on the device; [`U8Batch::to_nchw_f32`] gives the CPU backend's normalised NCHW tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U8Batch {
    crop: u32,
    len: usize,
    data: Vec<u8>,
}

impl U8Batch {
    /// An empty batch of `crop x crop` images.
    pub fn new(crop: u32) -> Self {
        U8Batch {
            crop,
            len: 0,
            data: Vec::new(),
        }
    }

    /// An empty batch with room for `n` images.
    pub fn with_capacity(crop: u32, n: usize) -> Self {
        let mut b = Self::new(crop);
        b.data.reserve_exact(n * b.image_bytes());
        b
    }

    /// Side of each (square) image.
    pub fn crop(&self) -> u32 {
        self.crop
    }

    /// Bytes per image: `crop * crop * 3`.
    pub fn image_bytes(&self) -> usize {
        self.crop as usize * self.crop as usize * 3
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The logical shape `[N, H, W, C]` of [`U8Batch::as_slice`].
    pub fn shape(&self) -> [usize; 4] {
        [self.len, self.crop as usize, self.crop as usize, 3]
    }

    /// Appends one image; [`Error::Shape`] unless it is `crop x crop`.
    pub fn push<C>(&mut self, img: &ImageBuffer<Rgb<u8>, C>) -> Result<()>
    where
        C: Deref<Target = [u8]>,
    {
        if img.dimensions() != (self.crop, self.crop) {
            let c = self.crop as usize;
            return Err(Error::Shape {
                op: "U8Batch::push",
                expected: format!("a {c}x{c} RGB image (height, width, channels = [{c}, {c}, 3])"),
                found: vec![img.height() as usize, img.width() as usize, 3],
            });
        }
        self.data
            .extend_from_slice(&img.as_raw()[..self.image_bytes()]);
        self.len += 1;
        Ok(())
    }

    /// All images, `N * crop * crop * 3` bytes, NHWC.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// Image `i` as a borrowed RGB image, or `None` if `i >= len()`.
    pub fn image(&self, i: usize) -> Option<ImageBuffer<Rgb<u8>, &[u8]>> {
        if i >= self.len {
            return None;
        }
        let n = self.image_bytes();
        ImageBuffer::from_raw(self.crop, self.crop, &self.data[i * n..(i + 1) * n])
    }

    /// The normalised NCHW `f32` tensor `[N, 3, crop, crop]`, using `pre`'s mean and std (the
    /// batch's own `crop`; `pre.crop` is not consulted). Images are normalised in parallel.
    /// Parameters are not validated here: a zero std gives infinities (see
    /// [`Preprocess::validate`]).
    pub fn to_nchw_f32(&self, pre: &Preprocess) -> Array4<f32> {
        let c = self.crop as usize;
        let mut out = Array4::<f32>::zeros((self.len, 3, c, c));
        let per = self.image_bytes();
        if per == 0 || self.len == 0 {
            return out;
        }
        let dst = out
            .as_slice_mut()
            .expect("freshly allocated array is contiguous");
        dst.par_chunks_mut(per)
            .zip(self.data.par_chunks(per))
            .for_each(|(o, hwc)| normalize_hwc(hwc, &pre.mean, &pre.std, o));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Paths and batch loading
// ---------------------------------------------------------------------------------------------

/// Expands command-line inputs into image paths: a file is kept as given (hidden or not, any
/// extension), a directory is replaced by its regular files (symlinks followed), not recursive,
/// hidden ones (name starting with `.`) skipped, sorted by file name (byte order). Inputs keep
/// their order. A path that is not a readable directory is kept as a file, so that a missing or
/// unreadable image is reported by decoding (with its path) while the other inputs still run; a
/// directory whose listing fails is an [`Error::Io`] naming it.
pub fn collect_image_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        // Anything that is not a readable directory is taken as an image file: if it is
        // missing or unreadable, decoding reports it with its path and the others still run.
        let is_dir = std::fs::metadata(input).is_ok_and(|m| m.is_dir());
        if !is_dir {
            out.push(input.clone());
            continue;
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(input).map_err(|e| Error::io(input, e))? {
            let entry = entry.map_err(|e| Error::io(input, e))?;
            let name = entry.file_name();
            if name.as_encoded_bytes().first() == Some(&b'.') {
                continue;
            }
            let path = entry.path();
            // Follows symlinks; a dangling link is skipped like any non-file.
            if std::fs::metadata(&path)
                .map(|m| m.is_file())
                .unwrap_or(false)
            {
                files.push((name, path));
            }
        }
        files.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
        out.extend(files.into_iter().map(|(_, p)| p));
    }
    Ok(out)
}

/// What [`load_batch`] produced.
#[derive(Debug)]
pub struct LoadedBatch {
    /// The images that decoded, in input order.
    pub batch: U8Batch,
    /// For each batch row `r`, `sources[r]` is the index in the input `paths` it came from
    /// (strictly increasing; `sources.len() == batch.len()`).
    pub sources: Vec<usize>,
    /// The inputs that failed, `(index in paths, error naming the path)`, in input order.
    /// Every input index is in exactly one of `sources` and `failures`.
    pub failures: Vec<(usize, Error)>,
}

/// Decodes and crops `paths` in parallel (rayon) with `pre`, keeping input order. A file that
/// fails (missing, undecodable, too large) does not stop the others: it is reported in
/// [`LoadedBatch::failures`] and left out of the batch; [`LoadedBatch::sources`] maps batch rows
/// back to input indices.
pub fn load_batch(paths: &[PathBuf], pre: &Preprocess) -> LoadedBatch {
    let results: Vec<Result<RgbImage>> = paths.par_iter().map(|p| pre.load(p)).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let mut batch = U8Batch::with_capacity(pre.crop, ok);
    let mut sources = Vec::with_capacity(ok);
    let mut failures = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r.and_then(|img| batch.push(&img)) {
            Ok(()) => sources.push(i),
            Err(e) => failures.push((i, e)),
        }
    }
    LoadedBatch {
        batch,
        sources,
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even() {
        // (d / 2) rounded half to even, as Python's round().
        let cases = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 2),
            (6, 3),
            (7, 4),
            (32, 16),
        ];
        for (d, want) in cases {
            assert_eq!(round_half_even_div2(d), want, "d = {d}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (inp, out) in [(640u32, 383u32), (427, 256), (300, 256), (100, 256), (7, 3)] {
            let c = Coeffs::new(inp, out, 0..out);
            for i in 0..out as usize {
                let (start, k) = c.taps(i);
                assert!(start + k.len() <= inp as usize);
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{inp}->{out} #{i}: {s}"
                );
            }
        }
    }
}
