//! Batches of preprocessed images ([`U8Batch`]), expanding command-line inputs into image paths,
//! and loading a batch in parallel.

use std::ops::Deref;
use std::path::PathBuf;

use image::{ImageBuffer, Rgb, RgbImage};
use ndarray::Array4;
use rayon::prelude::*;

use super::preprocess::{normalize_hwc, Preprocess};
use crate::error::{Error, Result};

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

    /// A batch over `data`: `N` images of `crop x crop x 3` bytes each, HWC, back to back.
    /// [`Error::Shape`] unless `data.len()` is a whole number of images.
    pub fn from_raw(crop: u32, data: Vec<u8>) -> Result<Self> {
        let batch = U8Batch::new(crop);
        let per = batch.image_bytes();
        if per == 0 || !data.len().is_multiple_of(per) {
            return Err(Error::Shape {
                op: "U8Batch::from_raw",
                expected: format!("a multiple of {per} bytes ({crop}x{crop}x3 images)"),
                found: vec![data.len()],
            });
        }
        Ok(U8Batch {
            crop,
            len: data.len() / per,
            data,
        })
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
    let results = decode_in_parallel(paths, pre);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let mut batch = U8Batch::with_capacity(pre.crop, ok);
    let rows = place_in_order(results, |img| batch.push(img));
    LoadedBatch {
        batch,
        sources: rows.sources,
        failures: rows.failures,
    }
}

/// Where the rows written by [`load_batch_into`] came from.
#[derive(Debug)]
pub struct LoadedRows {
    /// Row `r` of the output holds input `sources[r]` (strictly increasing).
    pub sources: Vec<usize>,
    /// The inputs that failed, `(index in paths, error naming the path)`, in input order.
    pub failures: Vec<(usize, Error)>,
}

/// [`load_batch`] writing straight into `out` (e.g. a pipeline's page-locked input slot): the
/// images that decode go to rows `0, 1, ...` (`crop * crop * 3` bytes each, HWC), written once
/// and sequentially, never read back. [`Error::Shape`] when `out` has room for fewer than
/// `paths.len()` images; nothing is decoded then.
pub fn load_batch_into(paths: &[PathBuf], pre: &Preprocess, out: &mut [u8]) -> Result<LoadedRows> {
    let per = U8Batch::new(pre.crop).image_bytes();
    if paths
        .len()
        .checked_mul(per)
        .is_none_or(|need| need > out.len())
    {
        return Err(Error::Shape {
            op: "load_batch_into",
            expected: format!("room for {} images of {per} bytes", paths.len()),
            found: vec![out.len()],
        });
    }
    let results = decode_in_parallel(paths, pre);
    let mut rows = out.chunks_exact_mut(per);
    Ok(place_in_order(results, |img| {
        // Checked before a row is taken: a failed image must not leave a hole.
        if img.dimensions() != (pre.crop, pre.crop) || img.as_raw().len() != per {
            return Err(Error::Shape {
                op: "load_batch_into",
                expected: format!("a {0}x{0} RGB image", pre.crop),
                found: vec![img.height() as usize, img.width() as usize, 3],
            });
        }
        let row = rows
            .next()
            .ok_or_else(|| Error::invalid("load_batch_into", "more images than rows"))?;
        row.copy_from_slice(img.as_raw());
        Ok(())
    }))
}

/// [`load_batch_into`] for ten-crop evaluation: each image that decodes becomes
/// [`TEN`](super::TEN) consecutive rows, the [`ten_crop`](super::ten_crop) of its central
/// `resize_shorter` square (the paper's 256x256 patch), `pre.crop` on a side.
/// [`Error::Shape`] when `out` has room for fewer than `10 * paths.len()` images;
/// [`Error::Invalid`] when `pre.resize_shorter < pre.crop`.
pub fn load_ten_crops_into(
    paths: &[PathBuf],
    pre: &Preprocess,
    out: &mut [u8],
) -> Result<LoadedRows> {
    let per = U8Batch::new(pre.crop).image_bytes();
    if paths
        .len()
        .checked_mul(super::TEN * per)
        .is_none_or(|need| need > out.len())
    {
        return Err(Error::Shape {
            op: "load_ten_crops_into",
            expected: format!(
                "room for {} images of {per} bytes",
                super::TEN * paths.len()
            ),
            found: vec![out.len()],
        });
    }
    let patch = pre.central_patch("ten-crop")?;
    let results = decode_in_parallel(paths, &patch);
    let mut rows = out.chunks_exact_mut(per);
    Ok(place_in_order(results, |img| {
        // All ten are cut before a row is written: a failure leaves no partial image.
        let crops = super::ten_crop(img, pre.crop)?;
        for crop in crops {
            let row = rows
                .next()
                .ok_or_else(|| Error::invalid("load_ten_crops_into", "more crops than rows"))?;
            row.copy_from_slice(crop.as_raw());
        }
        Ok(())
    }))
}

fn decode_in_parallel(paths: &[PathBuf], pre: &Preprocess) -> Vec<Result<RgbImage>> {
    paths.par_iter().map(|p| pre.load(p)).collect()
}

/// Hands each decoded image to `place` in input order and records which inputs became rows
/// and which failed (to decode, or to be placed).
fn place_in_order(
    results: Vec<Result<RgbImage>>,
    mut place: impl FnMut(&RgbImage) -> Result<()>,
) -> LoadedRows {
    let mut sources = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r.and_then(|img| place(&img)) {
            Ok(()) => sources.push(i),
            Err(e) => failures.push((i, e)),
        }
    }
    LoadedRows { sources, failures }
}
