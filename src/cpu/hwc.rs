//! Activations as bf16 in HWC order (channels innermost), the layout native bf16 mode keeps
//! from one convolution to the next: the convolutions' products write it directly and unfold
//! from it, so no layer pays a transpose, and pooling and LRN over it read each position's
//! channels contiguously. Both layers compute what their NCHW twins compute on the same values
//! (bit for bit: the same f32 operations in the same order), rounded to bf16.

use multiversion::multiversion;
use ndarray::Array4;
use rayon::prelude::*;

use super::bf16::bf16_bits;
use super::{Lrn, MaxPool2d};
use crate::config::LrnParams;
use crate::error::{Error, Result};

/// A batch `[N, H, W, C]` of bf16 values.
#[derive(Clone, Debug)]
pub(super) struct HwcBf16 {
    pub(super) images: usize,
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) channels: usize,
    pub(super) data: Vec<numkong::bf16>,
}

/// A bf16 value in f32 (exact).
#[inline]
fn value(v: numkong::bf16) -> f32 {
    f32::from_bits(u32::from(v.0) << 16)
}

impl HwcBf16 {
    /// The shape in NCHW terms, `(n, c, h, w)`.
    pub(super) fn nchw_dim(&self) -> (usize, usize, usize, usize) {
        (self.images, self.channels, self.height, self.width)
    }

    /// The same values as an NCHW f32 batch (for observers and the flattening before the
    /// linear layers).
    pub(super) fn to_nchw(&self) -> Result<Array4<f32>> {
        let (n, c, h, w) = self.nchw_dim();
        let plane = h * w;
        let mut out = vec![0.0f32; self.data.len()];
        if !out.is_empty() {
            out.par_chunks_exact_mut(c * plane)
                .zip(self.data.par_chunks_exact(c * plane))
                .for_each(|(dst, src)| {
                    for (p, pixel) in src.chunks_exact(c).enumerate() {
                        for (ch, &v) in pixel.iter().enumerate() {
                            dst[ch * plane + p] = value(v);
                        }
                    }
                });
        }
        Array4::from_shape_vec((n, c, h, w), out)
            .map_err(|e| Error::invalid("HWC to NCHW", e.to_string()))
    }
}

/// [`MaxPool2d::forward`] over HWC bf16: the same maxima (NaN wins), one output row per task.
pub(super) fn pool_hwc(pool: &MaxPool2d, input: &HwcBf16) -> Result<HwcBf16> {
    let (n, c, h, w) = input.nchw_dim();
    let (oh, ow) = pool.output_size(h, w)?;
    let mut data = vec![numkong::bf16::ZERO; n * oh * ow * c];
    if !data.is_empty() {
        let (k, s) = (pool.kernel, pool.stride);
        data.par_chunks_exact_mut(ow * c).enumerate().for_each_init(
            || (vec![0.0f32; w * c], vec![0.0f32; c]),
            |(column_max, best), (row, out)| {
                let (image, oy) = (row / oh, row % oh);
                let image = &input.data[image * h * w * c..(image + 1) * h * w * c];
                let rows = &image[oy * s * w * c..(oy * s + k) * w * c];
                pool_row(k, s, rows, column_max, best, out);
            },
        );
    }
    Ok(HwcBf16 {
        images: n,
        height: oh,
        width: ow,
        channels: c,
        data,
    })
}

/// One output row: the max down the window's `k` input rows (`rows`, each `w * c` values),
/// then across each window of `k` positions, channel by channel (contiguous, vectorised).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn pool_row(
    k: usize,
    s: usize,
    rows: &[numkong::bf16],
    column_max: &mut [f32],
    best: &mut [f32],
    out: &mut [numkong::bf16],
) {
    let c = best.len();
    let line = column_max.len();
    column_max.fill(f32::NEG_INFINITY);
    for row in rows.chunks_exact(line) {
        for (m, &v) in column_max.iter_mut().zip(row) {
            *m = nan_max(*m, value(v));
        }
    }
    for (ox, out) in out.chunks_exact_mut(c).enumerate() {
        let window = &column_max[ox * s * c..(ox * s + k) * c];
        best.fill(f32::NEG_INFINITY);
        for position in window.chunks_exact(c) {
            for (b, &v) in best.iter_mut().zip(position) {
                *b = nan_max(*b, v);
            }
        }
        // The max of bf16 values is one of them: exact.
        for (o, &b) in out.iter_mut().zip(best.iter()) {
            *o = numkong::bf16(bf16_bits(b));
        }
    }
}

/// `max` that lets any NaN win, as [`MaxPool2d`] does.
#[inline]
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

/// [`Lrn::forward`] over HWC bf16, rounded to bf16: per position, the window's squares added
/// in the same order as the NCHW layer adds them (zeros beyond the channels add nothing), then
/// the same normalisation.
pub(super) fn lrn_hwc(lrn: &Lrn, input: &HwcBf16) -> HwcBf16 {
    let (c, size) = (input.channels, lrn.params.size);
    let mut data = vec![numkong::bf16::ZERO; input.data.len()];
    if !data.is_empty() {
        // Squares padded with `size / 2` zeros before and `(size - 1) / 2` after: the window
        // of channel `ch` is `squares[ch..ch + size]`.
        let scratch = || (vec![0.0f32; c], vec![0.0f32; c + size - 1], vec![0.0f32; c]);
        data.par_chunks_mut(c * 64)
            .zip(input.data.par_chunks(c * 64))
            .for_each_init(scratch, |(values, squares, sums), (out, src)| {
                lrn_positions(src, lrn.params, values, squares, sums, out);
            });
    }
    HwcBf16 { data, ..*input }
}

/// LRN over positions (`src` and `out`: rows of `values.len()` channels): per position, its
/// channels as f32 (`values`), their windows' sums of squares (`sums`), normalised and rounded.
/// One call per chunk of positions, compiled for AVX-512 or AVX2 where the CPU has them.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn lrn_positions(
    src: &[numkong::bf16],
    params: LrnParams,
    values: &mut [f32],
    squares: &mut [f32],
    sums: &mut [f32],
    out: &mut [numkong::bf16],
) {
    let LrnParams {
        size,
        k,
        alpha,
        beta,
    } = params;
    let (c, before) = (values.len(), size / 2);
    for (out, pixel) in out.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
        for ((v, s), &x) in values.iter_mut().zip(&mut squares[before..]).zip(pixel) {
            *v = value(x);
            *s = *v * *v;
        }
        sums.fill(0.0);
        for offset in 0..size {
            for (d, &s) in sums.iter_mut().zip(&squares[offset..]) {
                *d += s;
            }
        }
        super::lrn::normalise_values(sums, values, k, alpha, beta);
        for (o, &v) in out.iter_mut().zip(sums.iter()) {
            *o = numkong::bf16(bf16_bits(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array4;

    use super::*;

    /// An NCHW batch of bf16 values (in f32) with negatives, repeats and, when asked, NaNs.
    fn batch(dim: (usize, usize, usize, usize), nans: bool) -> Array4<f32> {
        Array4::from_shape_fn(dim, |(n, c, y, x)| {
            let i = ((n * 31 + c) * 37 + y) * 41 + x;
            if nans && i % 23 == 5 {
                return f32::NAN;
            }
            half::bf16::from_f32(((i * 7919 % 2003) as f32 - 1001.0) / 137.0).to_f32()
        })
    }

    /// The same batch as HWC bf16, element by element (independent of `to_nchw`).
    fn to_hwc(x: &Array4<f32>) -> HwcBf16 {
        let (n, c, h, w) = x.dim();
        let mut data = Vec::with_capacity(x.len());
        for i in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    for ch in 0..c {
                        data.push(numkong::bf16(
                            half::bf16::from_f32(x[[i, ch, y, xx]]).to_bits(),
                        ));
                    }
                }
            }
        }
        HwcBf16 {
            images: n,
            height: h,
            width: w,
            channels: c,
            data,
        }
    }

    /// Bit for bit, NaN matching NaN.
    fn assert_same(got: &Array4<f32>, want: &Array4<f32>, what: &str) {
        assert_eq!(got.dim(), want.dim(), "{what}: shape");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn hwc_batches_convert_back_to_the_same_nchw_values() {
        let x = batch((2, 5, 3, 4), true);
        assert_same(&to_hwc(&x).to_nchw().unwrap(), &x, "round trip");
    }

    /// Pooling over HWC against `MaxPool2d::forward` on the same values: overlapping and not,
    /// channel counts below and above a vector, NaNs winning their windows.
    #[test]
    fn pooling_matches_the_nchw_layer() {
        for (dim, kernel, stride) in [
            ((2, 5, 9, 11), 3, 2),
            ((1, 20, 7, 7), 2, 1),
            ((3, 33, 13, 13), 3, 2),
        ] {
            let x = batch(dim, true);
            let pool = MaxPool2d { kernel, stride };
            let got = pool_hwc(&pool, &to_hwc(&x)).unwrap().to_nchw().unwrap();
            let want = pool.forward(x.view()).unwrap();
            assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|&v| v < 0.0));
            assert_same(&got, &want, &format!("pool {dim:?} {kernel}/{stride}"));
        }
        let too_small = batch((1, 2, 2, 2), false);
        assert!(pool_hwc(
            &MaxPool2d {
                kernel: 3,
                stride: 2
            },
            &to_hwc(&too_small)
        )
        .is_err());
    }

    /// LRN over HWC against `Lrn::forward` on the same values, rounded to bf16: the paper's
    /// window and an even one, channel counts smaller than the window and larger.
    #[test]
    fn lrn_matches_the_nchw_layer_rounded() {
        for (channels, size, beta) in [(3, 5, 0.75), (96, 5, 0.75), (17, 4, 0.6)] {
            let x = batch((2, channels, 3, 5), false);
            let lrn = Lrn::new(LrnParams {
                size,
                k: 2.0,
                alpha: 1e-2,
                beta,
            })
            .unwrap();
            let got = lrn_hwc(&lrn, &to_hwc(&x)).to_nchw().unwrap();
            let want = lrn
                .forward(x.view())
                .unwrap()
                .mapv(|v| half::bf16::from_f32(v).to_f32());
            assert_same(
                &got,
                &want,
                &format!("lrn {channels} channels, size {size}"),
            );
        }
    }
}
