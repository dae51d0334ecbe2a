//! Pillow's `ImagingResample` (8 bits per channel, bilinear filter with antialiasing) re-implemented
//! so crops are bit-exact with torchvision's, and torchvision's centre-crop rounding. Only the
//! pixels inside a crop window are computed.

use std::borrow::Cow;
use std::ops::Range;

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

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

/// Horizontal pass: rows `rows` of `src` (width `src_w`, `C` channels), output columns `cols`
/// of an image `out_w` wide. Returns `rows.len() x cols.len() x C` bytes.
fn resample_horizontal<const C: usize>(
    src: &[u8],
    src_w: u32,
    rows: Range<usize>,
    out_w: u32,
    cols: Range<u32>,
) -> Vec<u8> {
    let coeffs = Coeffs::new(src_w, out_w, cols.clone());
    let n = cols.len();
    let stride = src_w as usize * C;
    let mut out = vec![0u8; rows.len() * n * C];
    for (row_out, y) in out.chunks_exact_mut(n * C).zip(rows) {
        let row = &src[y * stride..(y + 1) * stride];
        for (i, px) in row_out.chunks_exact_mut(C).enumerate() {
            let (start, k) = coeffs.taps(i);
            let mut sums = [ROUND_HALF; C];
            for (j, &kx) in k.iter().enumerate() {
                let p = &row[(start + j) * C..(start + j + 1) * C];
                let kx = kx as i64;
                for (sum, &v) in sums.iter_mut().zip(p) {
                    *sum += v as i64 * kx;
                }
            }
            for (o, &sum) in px.iter_mut().zip(&sums) {
                *o = clip8(sum);
            }
        }
    }
    out
}

/// Vertical pass over `src` (`src_h` rows of `width` pixels of `C` channels, of which rows
/// `row0..` are stored in `src` starting at row 0), output rows `rows` of an image `out_h` high.
fn resample_vertical<const C: usize>(
    src: &[u8],
    row0: usize,
    width: usize,
    src_h: u32,
    out_h: u32,
    rows: Range<u32>,
) -> Vec<u8> {
    let coeffs = Coeffs::new(src_h, out_h, rows.clone());
    let stride = width * C;
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
    let (w, h) = img.dimensions();
    let buf = resample_region::<3>(img.as_raw(), w, h, width, height, &(0..width), &(0..height));
    RgbImage::from_raw(width, height, buf).expect("buffer size matches")
}

/// Resamples `src` (`w x h` pixels of `C` channels) to a virtual `out_w x out_h` image and
/// returns only the window `cols x rows` of it (`rows.len() * cols.len() * C` bytes). Channels
/// are independent, so a grey image resampled with `C = 1` and then widened is bit for bit the
/// widened image resampled with `C = 3`.
fn resample_region<const C: usize>(
    src: &[u8],
    w: u32,
    h: u32,
    out_w: u32,
    out_h: u32,
    cols: &Range<u32>,
    rows: &Range<u32>,
) -> Vec<u8> {
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
        Cow::Owned(resample_horizontal::<C>(
            src,
            w,
            src_rows.clone(),
            out_w,
            cols.clone(),
        ))
    } else if cols.start == 0 && cols.end == w && src_rows.start == 0 && src_rows.end == h as usize
    {
        Cow::Borrowed(src)
    } else {
        // No horizontal resampling: copy the needed columns of the needed rows.
        let stride = w as usize * C;
        let mut v = Vec::with_capacity(src_rows.len() * ncols * C);
        for y in src_rows.clone() {
            let row = &src[y * stride..(y + 1) * stride];
            v.extend_from_slice(&row[cols.start as usize * C..cols.end as usize * C]);
        }
        Cow::Owned(v)
    };
    if need_v {
        resample_vertical::<C>(&tmp, src_rows.start, ncols, h, out_h, rows.clone())
    } else {
        tmp.into_owned()
    }
}

/// The bytes the resampling of one image to a `crop`-wide window allocates at most, beyond the
/// image itself: the horizontal pass's rows (at most every source row) and the window.
pub(super) fn resample_work_bytes(height: u32, crop: u32, channels: usize) -> u64 {
    (u64::from(height) + u64::from(crop)) * u64::from(crop) * channels as u64 * 2
}

/// One axis of torchvision's `center_crop` (with its zero padding) on an axis of length `size`.
pub(super) struct CropAxis {
    /// First output index that has source data (the zero padding before it).
    out_start: u32,
    /// The source (resized-image) indices copied to outputs `out_start..`.
    src: Range<u32>,
}

impl CropAxis {
    pub(super) fn new(size: u32, crop: u32) -> CropAxis {
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

/// Resamples `src` (`w x h` pixels of `C` channels) to `out_w x out_h` and centre-crops
/// `crop x crop` (zero-padded), computing only the window. Returns `crop * crop * C` bytes.
pub(super) fn resample_window<const C: usize>(
    src: &[u8],
    (w, h): (u32, u32),
    out_w: u32,
    out_h: u32,
    cx: &CropAxis,
    cy: &CropAxis,
    crop: u32,
) -> Vec<u8> {
    let window = resample_region::<C>(src, w, h, out_w, out_h, &cx.src, &cy.src);
    let (ww, wh) = (cx.src.len(), cy.src.len());
    if ww == crop as usize && wh == crop as usize {
        return window;
    }
    let stride = crop as usize * C;
    let mut out = vec![0u8; crop as usize * stride];
    for y in 0..wh {
        let d0 = (cy.out_start as usize + y) * stride + cx.out_start as usize * C;
        out[d0..d0 + ww * C].copy_from_slice(&window[y * ww * C..(y + 1) * ww * C]);
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
