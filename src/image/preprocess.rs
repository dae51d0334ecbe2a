//! [`Preprocess`]: torchvision's eval transform parameters, resize-and-crop of one image, and
//! the normalisation to CHW `f32`.

use std::ops::Deref;
use std::path::Path;

use image::{ImageBuffer, Rgb, RgbImage};

use super::budget::DecodeBudget;
#[cfg(doc)]
use super::budget::DECODE_MEMORY_BUDGET;
#[cfg(doc)]
use super::decode::decode_image_file_with;
use super::decode::{with_decoded, ImageSize, Pixels};
use super::read::ImageLimits;
use super::resize::{resample_window, resample_work_bytes, CropAxis};
use super::{IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};

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
    /// Limits on reading each image file ([`Preprocess::load`], [`load_batch`]): by default at
    /// most 256 MiB are read per image. Not part of torchvision's transform.
    ///
    /// [`load_batch`]: super::load_batch
    pub limits: ImageLimits,
}

impl Default for Preprocess {
    /// torchvision's ImageNet eval transform: 256, 224, [`IMAGENET_MEAN`], [`IMAGENET_STD`];
    /// the default [`ImageLimits`].
    fn default() -> Self {
        Preprocess {
            resize_shorter: 256,
            crop: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            limits: ImageLimits::default(),
        }
    }
}

impl Preprocess {
    /// Checks the parameters: sizes non-zero, mean finite, std finite and non-zero, a byte cap of
    /// at least 1.
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
        self.limits.validate()
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

    /// The preprocessing of the central `resize_shorter` square, the paper's 256x256 patch
    /// that training crops and the ten test crops are cut from: the same with
    /// `crop = resize_shorter`. [`Error::Invalid`] naming `what` when that square is smaller
    /// than `crop`.
    pub fn central_patch(&self, what: &'static str) -> Result<Preprocess> {
        if self.resize_shorter < self.crop {
            return Err(Error::invalid(
                what,
                format!(
                    "the patch ({}) is smaller than the crop ({})",
                    self.resize_shorter, self.crop
                ),
            ));
        }
        Ok(Preprocess {
            crop: self.resize_shorter,
            ..*self
        })
    }

    /// Decodes the file at `path` and returns its `crop x crop` preprocessed crop: the same
    /// pixels as [`decode_image_file_with`] under [`Preprocess::limits`], then
    /// [`Preprocess::resize_and_crop`].
    ///
    /// Everything it allocates is held from the process-wide [`DECODE_MEMORY_BUDGET`], so
    /// loading on many threads waits rather than exceeding it. A grey image is resampled before
    /// it is widened to RGB (the same bytes, a third of the memory).
    pub fn load(&self, path: &Path) -> Result<RgbImage> {
        self.validate()?;
        let work = |size: ImageSize| {
            resample_work_bytes(size.height, self.crop, if size.grey { 1 } else { 3 })
        };
        with_decoded(path, &self.limits, DecodeBudget::global(), work, |pixels| {
            self.crop_pixels(&pixels)
        })
    }

    /// [`Preprocess::resize_and_crop`] on decoded pixels, resampling grey images as one
    /// channel.
    fn crop_pixels(&self, pixels: &Pixels) -> Result<RgbImage> {
        match pixels {
            Pixels::Rgb(rgb) => self.resize_and_crop(rgb),
            Pixels::Grey(grey) => {
                let crop = self.window::<1>(grey.as_raw(), grey.dimensions())?;
                let rgb = crop.iter().flat_map(|&v| [v, v, v]).collect();
                RgbImage::from_raw(self.crop, self.crop, rgb).ok_or_else(|| {
                    Error::invalid("image", "grey crop has the wrong size (internal error)")
                })
            }
        }
    }

    /// The `crop x crop` window of `src` (`C` channels) resized and cropped.
    fn window<const C: usize>(&self, src: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>> {
        if w == 0 || h == 0 {
            return Err(Error::invalid(
                "image",
                format!("image has no pixels ({w}x{h})"),
            ));
        }
        let (nw, nh) = self.resized_size(w, h);
        let cx = CropAxis::new(nw, self.crop);
        let cy = CropAxis::new(nh, self.crop);
        Ok(resample_window::<C>(
            src,
            (w, h),
            nw,
            nh,
            &cx,
            &cy,
            self.crop,
        ))
    }

    /// torchvision's `Resize(resize_shorter)` then `CenterCrop(crop)`: returns the
    /// `crop x crop` 8-bit crop.
    ///
    /// - Resize: see [`Preprocess::resized_size`] for the size and [`resize_bilinear`](super::resize_bilinear) for the
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
        let crop = self.window::<3>(img.as_raw(), img.dimensions())?;
        RgbImage::from_raw(self.crop, self.crop, crop)
            .ok_or_else(|| Error::invalid("image", "crop has the wrong size (internal error)"))
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
pub(super) fn normalize_hwc(hwc: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let hw = hwc.len() / 3;
    debug_assert_eq!(out.len(), 3 * hw);
    for (ch, plane) in out.chunks_exact_mut(hw).enumerate() {
        let (m, s) = (mean[ch], std[ch]);
        for (o, px) in plane.iter_mut().zip(hwc.chunks_exact(3)) {
            *o = (px[ch] as f32 / 255.0 - m) / s;
        }
    }
}
