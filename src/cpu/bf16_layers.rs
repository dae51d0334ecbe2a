//! Convolutions and linear layers on the bf16 kernels ([`super::bf16`]): inputs rounded to bf16
//! once per layer, products accumulated in f32, bias and ReLU added to the f32 sums and the
//! result rounded to bf16 in the same pass (the emulated path's numbers, up to the order of the
//! additions).

use multiversion::multiversion;
use ndarray::{s, Array2, ArrayView2, ArrayView4};
use rayon::prelude::*;

use super::bf16::{bf16_bits, bf16_hardware, to_bf16, PackedBf16};
use super::bf16_panels::{finish, kernel_available as panels_kernel_available, Panels, Rows};
use super::conv::Geometry;
use super::hwc::HwcBf16;
use super::{Conv2d, Linear};
use crate::error::{Error, Result};

/// Output features per packed block of a linear layer: each block is one task, so a small batch
/// still streams the (large) weight once across all cores.
const LINEAR_BLOCK: usize = 256;

/// Output channels per packed block of a convolution. numkong's kernel slows down when the
/// packed weight outgrows the L2 cache: measured on Zen 5 (one thread, 169 x 384 x 3456, conv4
/// of the paper preset) 146 GFLOP/s as one block, 288 as blocks of 192 or 128 columns; 729 x 256
/// x 2400 395 either way.
const CONV_BLOCK: usize = 128;

/// `act(sum + bias)` rounded to bf16, back in f32.
#[inline]
fn finish_f32(sum: f32, bias: f32, relu: bool) -> f32 {
    f32::from_bits(u32::from(finish(sum, bias, relu).0) << 16)
}

/// A batch rounded to bf16 (threaded over chunks: the conversion is a pass over memory).
fn rounded(input: &[f32]) -> Vec<numkong::bf16> {
    let mut out = vec![numkong::bf16::ZERO; input.len()];
    out.par_chunks_mut(1 << 16)
        .zip(input.par_chunks(1 << 16))
        .for_each(|(dst, src)| to_bf16(src, dst));
    out
}

/// A convolution's weight packed for the kernels that run it.
#[derive(Clone, Debug)]
pub(super) enum ConvWeights {
    /// numkong's packing, in blocks of [`CONV_BLOCK`] output channels: on AMX CPUs (numkong's
    /// tiles) and where neither AMX nor AVX512-BF16 is present (numkong's portable loops).
    Numkong(Vec<PackedBf16>),
    /// Our own AVX512-BF16 kernel's panels ([`super::bf16_panels`]).
    Panels(Panels),
}

/// Which kernels [`pack_conv`] and [`pack_linear`] pack for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProductKernels {
    Numkong,
    Panels,
}

impl ProductKernels {
    /// The faster kernels on this CPU: AMX tiles (numkong) where present, else our
    /// AVX512-BF16 kernel where present, else numkong's portable loops.
    pub(super) fn best() -> Self {
        if bf16_hardware() != Some("AMX-BF16") && panels_kernel_available() {
            ProductKernels::Panels
        } else {
            ProductKernels::Numkong
        }
    }
}

/// The window width our kernel reads for a convolution: its runs (one per kernel row,
/// `width * channels` values) must be even, so an odd run (conv1: 11 x 3) reads one column
/// more, whose weights are zero.
fn window_width(kernel: usize, channels: usize) -> usize {
    if (kernel * channels).is_multiple_of(2) {
        kernel
    } else {
        kernel + 1
    }
}

/// A convolution's weight, permuted from OIHW to OHWI (the order its windows are read in)
/// and packed for `kernels`; for the panels, each kernel row widened to
/// [`window_width`] with zeros.
pub(super) fn pack_conv(conv: &Conv2d, kernels: ProductKernels) -> ConvWeights {
    let [weight, _] = conv.parameters();
    let (out, channels, kernel) = (conv.out_channels(), conv.in_channels(), conv.kernel());
    let width = match kernels {
        ProductKernels::Numkong => kernel,
        ProductKernels::Panels => window_width(kernel, channels),
    };
    let depth = kernel * width * channels;
    let mut ohwi = vec![0.0f32; out * depth];
    for (src, dst) in weight
        .chunks_exact(channels * kernel * kernel)
        .zip(ohwi.chunks_exact_mut(depth))
    {
        for c in 0..channels {
            for ki in 0..kernel {
                for kj in 0..kernel {
                    dst[(ki * width + kj) * channels + c] = src[(c * kernel + ki) * kernel + kj];
                }
            }
        }
    }
    match kernels {
        ProductKernels::Numkong => ConvWeights::Numkong(pack_blocks(&ohwi, out, depth, CONV_BLOCK)),
        ProductKernels::Panels => ConvWeights::Panels(Panels::pack(&ohwi, out, depth)),
    }
}

impl ConvWeights {
    /// Length of one row of the product (for the panels, the depth of the widened windows).
    fn row_len(&self, depth: usize) -> usize {
        match self {
            ConvWeights::Numkong(_) => depth,
            ConvWeights::Panels(panels) => panels.row_len(),
        }
    }

    /// The sums one image's product writes before they are finished, as blocks of (channels,
    /// row length): numkong's; the panels finish theirs tile by tile.
    fn sum_blocks(&self) -> Vec<(usize, usize)> {
        match self {
            ConvWeights::Numkong(blocks) => blocks.iter().map(|b| (b.width(), b.width())).collect(),
            ConvWeights::Panels(_) => Vec::new(),
        }
    }

    /// One image's output rows `out [positions, channels]`: its rows times the weight, with
    /// bias, ReLU and bf16 rounding; on the calling thread or, with `split`, across all of
    /// rayon's threads. numkong reads rows unfolded one after another (one run each) and writes
    /// `sums` (one per [`ConvWeights::sum_blocks`]) first.
    fn multiply(
        &self,
        rows: Rows<'_>,
        sums: &mut [Vec<f32>],
        (bias, relu): (&[f32], bool),
        out: &mut [numkong::bf16],
        split: bool,
    ) {
        let threads = rayon::current_num_threads();
        let positions = rows.starts.len();
        match self {
            ConvWeights::Numkong(packed) => {
                let unfolded = rows.data;
                let k = unfolded.len() / positions.max(1);
                if split {
                    // By blocks, then by rows where blocks are fewer than threads (each call
                    // should keep many rows: see CONV_BLOCK).
                    let row_tasks = threads.div_ceil(packed.len()).max(1);
                    let per_task = positions.div_ceil(row_tasks).max(1);
                    packed
                        .par_iter()
                        .zip(sums.par_iter_mut())
                        .for_each(|(block, sums)| {
                            sums.par_chunks_mut(per_task * block.width())
                                .zip(unfolded.par_chunks(per_task * k))
                                .for_each(|(sums, a)| block.multiply(a, a.len() / k, sums));
                        });
                } else {
                    for (block, sums) in packed.iter().zip(sums.iter_mut()) {
                        block.multiply(unfolded, positions, sums);
                    }
                }
                let mut first = 0;
                for (block, sums) in packed.iter().zip(sums.iter()) {
                    let width = block.width();
                    finish_rows(sums, width, &bias[first..first + width], relu, first, out);
                    first += width;
                }
            }
            ConvWeights::Panels(panels) => {
                let channels = panels.width();
                let per_task = if split {
                    positions.div_ceil(threads)
                } else {
                    positions
                };
                let per_task = per_task.max(1);
                out.par_chunks_mut(per_task * channels)
                    .zip(rows.starts.par_chunks(per_task))
                    .for_each(|(out, starts)| {
                        panels.multiply_finish(&Rows { starts, ..rows }, bias, relu, out)
                    });
            }
        }
    }
}

/// `b [width, depth]` packed in blocks of at most `block` rows (output columns of the
/// product). Counted in rows, not chunks of `b`: a depth of 0 still has its `width` columns
/// (their sums are 0, and the bias still applies).
fn pack_blocks(b: &[f32], width: usize, depth: usize, block: usize) -> Vec<PackedBf16> {
    (0..width)
        .step_by(block.max(1))
        .map(|first| {
            let rows = block.min(width - first);
            PackedBf16::pack(&b[first * depth..(first + rows) * depth], rows, depth)
        })
        .collect()
}

/// Per-thread buffers of [`conv_hwc`]: one image in HWC bf16 (when the input is NCHW), the
/// image again inside a zero border (when read in place) or its unfolded rows, and the
/// product's sums.
struct Scratch {
    hwc: Vec<numkong::bf16>,
    bordered: Vec<numkong::bf16>,
    rows: Vec<numkong::bf16>,
    /// One `[positions, row length]` per block of [`ConvWeights::sum_blocks`].
    sums: Vec<Vec<f32>>,
}

/// What a native bf16 convolution reads: the network's NCHW f32 input (rounded and reordered
/// image by image) or the HWC bf16 output of the layer before.
#[derive(Clone, Copy)]
pub(super) enum ConvInput<'a> {
    Nchw(ArrayView4<'a, f32>),
    Hwc(&'a HwcBf16),
}

/// [`Conv2d::forward`] (or `forward_relu`) with bf16 operands, the output rounded to bf16, in
/// HWC order: the products' rows are output positions, so the output is their sums with bias,
/// ReLU and rounding, written in place (no transpose).
///
/// Our kernel reads each output position's window in place from the HWC image (inside a zero
/// border for the padding): one run of `window_width * channels` values per kernel row, so
/// nothing is unfolded. For numkong the windows are unfolded into rows first.
pub(super) fn conv_hwc(
    conv: &Conv2d,
    packed: &ConvWeights,
    input: ConvInput<'_>,
    relu: bool,
) -> Result<HwcBf16> {
    let dims = match input {
        ConvInput::Nchw(x) => x.dim(),
        ConvInput::Hwc(x) => x.nchw_dim(),
    };
    let g = conv.geometry_of("Conv2d (bf16)", dims)?;
    let (n, c, h, w) = dims;
    let o = conv.out_channels();
    let threads = rayon::current_num_threads();
    let positions = g.out_height * g.out_width;
    let (in_len, out_len) = (c * h * w, o * positions);
    let row_len = packed.row_len(g.col_rows());
    let blocks = packed.sum_blocks();
    let in_place = matches!(packed, ConvWeights::Panels(_));
    let window = window_width(g.kernel, c);
    // The border: the padding, and on the right the extra column a widened window reads.
    let (bordered_height, bordered_width) =
        (h + 2 * g.padding, w + 2 * g.padding + window - g.kernel);
    let bordered = in_place && (bordered_height, bordered_width) != (h, w);
    let bordered_len = if bordered {
        bordered_height * bordered_width * c
    } else {
        0
    };
    // Where each output position's row starts: its window's top-left in the (bordered) image,
    // or its unfolded row.
    let image_width = if bordered { bordered_width } else { w };
    let starts: Vec<usize> = if in_place {
        (0..g.out_height)
            .flat_map(|oy| (0..g.out_width).map(move |ox| (oy * image_width + ox) * g.stride * c))
            .collect()
    } else {
        (0..positions).map(|r| r * row_len).collect()
    };
    let mut output = vec![numkong::bf16::ZERO; n * out_len];
    if n > 0 && out_len > 0 {
        let standard;
        let (nchw, hwc): (&[f32], &[numkong::bf16]) = match &input {
            ConvInput::Nchw(x) => {
                standard = x.as_standard_layout();
                (standard.as_slice().unwrap_or(&[]), &[])
            }
            ConvInput::Hwc(x) => (&[], &x.data),
        };
        let [_, bias] = conv.parameters();
        // Per image: HWC bf16 (converted when the input is NCHW), read in place or unfolded
        // into rows (one per output position), multiplied by the weight and finished (bias,
        // ReLU, rounding) into the output's rows.
        let per_image = |s: &mut Scratch, i: usize, out: &mut [numkong::bf16], split: bool| {
            let image: &[numkong::bf16] = if nchw.is_empty() {
                &hwc[i * in_len..(i + 1) * in_len]
            } else {
                to_hwc_bf16(&nchw[i * in_len..(i + 1) * in_len], c, h * w, &mut s.hwc);
                &s.hwc
            };
            let rows = if in_place {
                let data = if s.bordered.is_empty() {
                    image
                } else {
                    // Only the inside is written: the border stays zero from the allocation.
                    let line = bordered_width * c;
                    for (y, src) in image.chunks_exact(w * c).enumerate() {
                        let at = (y + g.padding) * line + g.padding * c;
                        s.bordered[at..at + w * c].copy_from_slice(src);
                    }
                    &s.bordered
                };
                Rows {
                    data,
                    starts: &starts,
                    segments: g.kernel,
                    segment_stride: image_width * c,
                }
            } else {
                im2row(&g, image, row_len, &mut s.rows);
                Rows {
                    data: &s.rows,
                    starts: &starts,
                    segments: 1,
                    segment_stride: 0,
                }
            };
            packed.multiply(rows, &mut s.sums, (bias, relu), out, split);
        };
        let scratch = || Scratch {
            hwc: vec![numkong::bf16::ZERO; if nchw.is_empty() { 0 } else { in_len }],
            bordered: vec![numkong::bf16::ZERO; bordered_len],
            rows: vec![numkong::bf16::ZERO; if in_place { 0 } else { positions * row_len }],
            sums: blocks
                .iter()
                .map(|&(_, stride)| vec![0.0f32; positions * stride])
                .collect(),
        };
        if n >= threads {
            output
                .par_chunks_exact_mut(out_len)
                .enumerate()
                .for_each_init(scratch, |s, (i, out)| per_image(s, i, out, false));
        } else {
            let mut s = scratch();
            for (i, out) in output.chunks_exact_mut(out_len).enumerate() {
                per_image(&mut s, i, out, true);
            }
        }
    }
    Ok(HwcBf16 {
        images: n,
        height: g.out_height,
        width: g.out_width,
        channels: o,
        data: output,
    })
}

/// [`conv_hwc`] of an NCHW batch, back in NCHW f32 (what the tests compare with the emulated
/// twin).
#[cfg(test)]
pub(super) fn conv_forward(
    conv: &Conv2d,
    packed: &ConvWeights,
    input: ArrayView4<'_, f32>,
    relu: bool,
) -> Result<ndarray::Array4<f32>> {
    conv_hwc(conv, packed, ConvInput::Nchw(input), relu)?.to_nchw()
}

/// Sums `[positions, stride]` (the first `bias.len()` of each row) into the output's rows (one
/// per position), columns `first..`: bias, ReLU and bf16 rounding (a pass that vectorises).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn finish_rows(
    sums: &[f32],
    stride: usize,
    bias: &[f32],
    relu: bool,
    first: usize,
    out: &mut [numkong::bf16],
) {
    let channels = out.len() / (sums.len() / stride.max(1)).max(1);
    for (row, out) in sums
        .chunks_exact(stride)
        .zip(out.chunks_exact_mut(channels))
    {
        let out = &mut out[first..first + bias.len()];
        for ((o, &sum), &b) in out.iter_mut().zip(row).zip(bias) {
            *o = finish(sum, b, relu);
        }
    }
}

/// Side of the square tiles the transpose below goes through: a tile's source rows and
/// destination rows each stay within a few cache lines.
const TILE: usize = 16;

/// One CHW f32 image (`channels` planes of `plane` values) as HWC bf16, tile by tile (compiled
/// for AVX-512 and AVX2 too, picked at run time: the crate's baseline is SSE2).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn to_hwc_bf16(image: &[f32], channels: usize, plane: usize, hwc: &mut [numkong::bf16]) {
    if channels == 3 {
        // The input image: three planes, interleaved position by position (tiles of three
        // rows would spend their time on loop overhead: 8% of a torchvision forward).
        let (r, rest) = image.split_at(plane);
        let (g, b) = rest.split_at(plane);
        for (((dst, &r), &g), &b) in hwc.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
            dst[0] = numkong::bf16(bf16_bits(r));
            dst[1] = numkong::bf16(bf16_bits(g));
            dst[2] = numkong::bf16(bf16_bits(b));
        }
        return;
    }
    let mut tile = [[numkong::bf16::ZERO; TILE]; TILE];
    for p0 in (0..plane).step_by(TILE) {
        let pn = TILE.min(plane - p0);
        for c0 in (0..channels).step_by(TILE) {
            let cn = TILE.min(channels - c0);
            for (j, src) in image[c0 * plane..].chunks(plane).take(cn).enumerate() {
                for (i, &v) in src[p0..p0 + pn].iter().enumerate() {
                    tile[i][j] = numkong::bf16(bf16_bits(v));
                }
            }
            for (i, row) in tile.iter().take(pn).enumerate() {
                let at = (p0 + i) * channels + c0;
                hwc[at..at + cn].copy_from_slice(&row[..cn]);
            }
        }
    }
}

/// Unfolds one HWC image into `rows[(oy, ox), (ki, kj, c)]`: one row (of `row_len >=
/// col_rows` values, zeros after the window) per output position, in the OHWI weight's order,
/// zeros over the padding. A window row inside the image is one contiguous copy of `kernel *
/// channels` values.
fn im2row(g: &Geometry, hwc: &[numkong::bf16], row_len: usize, rows: &mut [numkong::bf16]) {
    let (kernel, channels) = (g.kernel, g.channels);
    let span = kernel * channels;
    let line_len = g.width * channels;
    let mut rows = rows.chunks_exact_mut(row_len);
    for oy in 0..g.out_height {
        for ox in 0..g.out_width {
            let Some(row) = rows.next() else { return };
            let (row, after) = row.split_at_mut(g.col_rows());
            after.fill(numkong::bf16::ZERO);
            let x0 = (ox * g.stride) as isize - g.padding as isize;
            let inside = x0 >= 0 && x0 as usize + kernel <= g.width;
            for (ki, dst) in row.chunks_exact_mut(span).enumerate() {
                let y = (oy * g.stride + ki) as isize - g.padding as isize;
                if y < 0 || y >= g.height as isize {
                    dst.fill(numkong::bf16::ZERO);
                    continue;
                }
                let line = &hwc[y as usize * line_len..(y as usize + 1) * line_len];
                if inside {
                    let from = x0 as usize * channels;
                    dst.copy_from_slice(&line[from..from + span]);
                    continue;
                }
                for (kj, d) in dst.chunks_exact_mut(channels).enumerate() {
                    let x = x0 + kj as isize;
                    if x >= 0 && (x as usize) < g.width {
                        let from = x as usize * channels;
                        d.copy_from_slice(&line[from..from + channels]);
                    } else {
                        d.fill(numkong::bf16::ZERO);
                    }
                }
            }
        }
    }
}

/// A linear layer's weight packed for the kernels that run it, in blocks of [`LINEAR_BLOCK`]
/// output features (each block one task).
#[derive(Clone, Debug)]
pub(super) enum LinearWeights {
    Numkong(Vec<PackedBf16>),
    Panels(Vec<Panels>),
}

/// A linear layer's weight `[out, in]`, packed for `kernels`.
pub(super) fn pack_linear(linear: &Linear, kernels: ProductKernels) -> LinearWeights {
    let [weight, _] = linear.parameters();
    let (outputs, inputs) = (linear.out_features(), linear.in_features());
    match kernels {
        ProductKernels::Numkong => {
            LinearWeights::Numkong(pack_blocks(weight, outputs, inputs, LINEAR_BLOCK))
        }
        ProductKernels::Panels => LinearWeights::Panels(
            (0..outputs)
                .step_by(LINEAR_BLOCK)
                .map(|first| {
                    let rows = LINEAR_BLOCK.min(outputs - first);
                    Panels::pack(
                        &weight[first * inputs..(first + rows) * inputs],
                        rows,
                        inputs,
                    )
                })
                .collect(),
        ),
    }
}

/// [`Linear::forward`] (or `forward_relu`) with bf16 operands, the output rounded to bf16.
pub(super) fn linear_forward(
    linear: &Linear,
    packed: &LinearWeights,
    input: ArrayView2<'_, f32>,
    relu: bool,
) -> Result<Array2<f32>> {
    let (n, features) = input.dim();
    if features != linear.in_features() {
        return Err(Error::Shape {
            op: "Linear (bf16)",
            expected: format!("[N, {}]", linear.in_features()),
            found: input.shape().to_vec(),
        });
    }
    let input = input.as_standard_layout();
    let x = rounded(input.as_slice().unwrap_or(&[]));
    let outputs = linear.out_features();
    let [_, bias] = linear.parameters();
    let mut out = Array2::zeros((n, outputs));
    match packed {
        LinearWeights::Numkong(blocks) => {
            let sums: Vec<Vec<f32>> = blocks
                .par_iter()
                .map(|block| {
                    let mut sums = vec![0.0f32; n * block.width()];
                    block.multiply(&x, n, &mut sums);
                    sums
                })
                .collect();
            let mut first = 0;
            for (block, sums) in blocks.iter().zip(&sums) {
                let width = block.width();
                let bias = &bias[first..first + width];
                let mut columns = out.slice_mut(s![.., first..first + width]);
                for (row, sums) in columns.rows_mut().into_iter().zip(sums.chunks_exact(width)) {
                    for ((v, &sum), &b) in row.into_iter().zip(sums).zip(bias) {
                        *v = finish_f32(sum, b, relu);
                    }
                }
                first += width;
            }
        }
        LinearWeights::Panels(blocks) => {
            // The panels read rows of an even length: an odd feature count gets a zero.
            let row_len = blocks.first().map_or(features, |b| b.row_len());
            let x = if row_len == features {
                x
            } else {
                let mut padded = vec![numkong::bf16::ZERO; n * row_len];
                for (dst, src) in padded
                    .chunks_exact_mut(row_len)
                    .zip(x.chunks_exact(features))
                {
                    dst[..features].copy_from_slice(src);
                }
                padded
            };
            let starts: Vec<usize> = (0..n).map(|r| r * row_len).collect();
            let rows = Rows {
                data: &x,
                starts: &starts,
                segments: 1,
                segment_stride: 0,
            };
            let outs: Vec<Vec<numkong::bf16>> = blocks
                .par_iter()
                .enumerate()
                .map(|(i, block)| {
                    let first = i * LINEAR_BLOCK;
                    let bias = &bias[first..first + block.width()];
                    let mut out = vec![numkong::bf16::ZERO; n * block.width()];
                    block.multiply_finish(&rows, bias, relu, &mut out);
                    out
                })
                .collect();
            for (i, (block, values)) in blocks.iter().zip(&outs).enumerate() {
                let (first, width) = (i * LINEAR_BLOCK, block.width());
                let mut columns = out.slice_mut(s![.., first..first + width]);
                for (row, values) in columns
                    .rows_mut()
                    .into_iter()
                    .zip(values.chunks_exact(width))
                {
                    for (v, &value) in row.into_iter().zip(values) {
                        *v = f32::from_bits(u32::from(value.0) << 16);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Array2, Array4};

    use super::*;
    use crate::cpu::bf16::usable_or_skip;

    /// bf16 rounding of one value, in f32.
    fn round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    /// Deterministic values in about [-1, 1], rounded to bf16 (the layers' inputs and weights
    /// in bf16 mode already are).
    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| round((((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 1001.0))
            .collect()
    }

    /// `got` against the emulated twin `want`: each value within one bf16 step of it (the sums
    /// differ only in the order of their f32 additions, which can move a value across a bf16
    /// rounding boundary), and every value a bf16.
    fn assert_within_a_bf16_step(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut exact = 0;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits() & 0xFFFF, 0, "{what}[{i}] = {g} is not a bf16");
            let tolerance = w.abs() / 128.0 + largest * 1e-5;
            assert!((g - w).abs() <= tolerance, "{what}[{i}]: {g} vs {w}");
            exact += usize::from(g == w);
        }
        // Most values agree exactly: a tolerance this loose alone would hide a small bias.
        assert!(
            exact * 10 >= got.len() * 9,
            "{what}: only {exact} of {} equal",
            got.len()
        );
    }

    /// Native convolutions against `Conv2d::forward(_relu)` on the same bf16 values, rounded:
    /// padding, stride, a channel count that leaves a partial block, one image (split across
    /// threads) and several (one per thread), windows unfolded (numkong) and read in place
    /// (the panels; odd runs widened by a zero column).
    #[test]
    fn convolutions_match_the_emulated_twin() {
        if !usable_or_skip("convolutions_match_the_emulated_twin") {
            return;
        }
        // (images, in channels, size, kernel, stride, padding, out channels)
        let cases = [
            (1, 3, 23, 11, 4, 2, 64),
            (3, 5, 13, 5, 1, 2, 130),
            (2, 16, 9, 3, 1, 1, 257),
            (4, 7, 6, 3, 2, 0, 9),
            // Depth 300 * 9 = 2700: two depth parts.
            (2, 300, 5, 3, 1, 1, 20),
            // Even runs (kernel * channels), read in place: strided, with and without border.
            (2, 8, 9, 3, 2, 0, 40),
            (1, 4, 11, 5, 2, 2, 33),
        ];
        for (i, &(n, c, size, k, stride, padding, o)) in cases.iter().enumerate() {
            let weight = Array4::from_shape_vec((o, c, k, k), values(o * c * k * k, i)).unwrap();
            let bias = Array1::from_vec(values(o, i + 10));
            let input =
                Array4::from_shape_vec((n, c, size, size), values(n * c * size * size, i + 20))
                    .unwrap();
            let conv = Conv2d::new(weight.view(), &bias, stride, padding).unwrap();
            for (kernels, relu) in [ProductKernels::Numkong, ProductKernels::Panels]
                .into_iter()
                .flat_map(|k| [(k, false), (k, true)])
            {
                let packed = pack_conv(&conv, kernels);
                let got = conv_forward(&conv, &packed, input.view(), relu).unwrap();
                let mut want = if relu {
                    conv.forward_relu(input.view()).unwrap()
                } else {
                    conv.forward(input.view()).unwrap()
                };
                want.mapv_inplace(round);
                assert_eq!(got.shape(), want.shape());
                let what = format!("case {i} {kernels:?} relu {relu}");
                assert_within_a_bf16_step(got.as_slice().unwrap(), want.as_slice().unwrap(), &what);
                if !relu {
                    assert!(got.iter().any(|&v| v < 0.0), "{what}: no negative output");
                }
            }
        }
    }

    /// Native linear layers against `Linear::forward(_relu)`, rounded: several blocks, the last
    /// one partial.
    #[test]
    fn linear_layers_match_the_emulated_twin() {
        if !usable_or_skip("linear_layers_match_the_emulated_twin") {
            return;
        }
        // The last: no inputs at all, so the output is the bias alone.
        // An odd input count too (the panels pad it).
        for (i, &(n, inputs, outputs)) in [
            (1, 300, 600),
            (5, 1000, 257),
            (33, 64, 3),
            (2, 0, 5),
            (13, 77, 40),
        ]
        .iter()
        .enumerate()
        {
            let weight =
                Array2::from_shape_vec((outputs, inputs), values(outputs * inputs, i)).unwrap();
            let bias = Array1::from_vec(values(outputs, i + 1));
            let input = Array2::from_shape_vec((n, inputs), values(n * inputs, i + 2)).unwrap();
            let linear = Linear::new(weight.view(), &bias).unwrap();
            for (kernels, relu) in [ProductKernels::Numkong, ProductKernels::Panels]
                .into_iter()
                .flat_map(|k| [(k, false), (k, true)])
            {
                let packed = pack_linear(&linear, kernels);
                let got = linear_forward(&linear, &packed, input.view(), relu).unwrap();
                let mut want = if relu {
                    linear.forward_relu(input.view()).unwrap()
                } else {
                    linear.forward(input.view()).unwrap()
                };
                want.mapv_inplace(round);
                assert_within_a_bf16_step(
                    got.as_slice().unwrap(),
                    want.as_slice().unwrap(),
                    &format!("case {i} {kernels:?} relu {relu}"),
                );
            }
        }
    }

    /// A batch of the wrong width is a shape error, not a panic inside the kernels.
    #[test]
    fn wrong_shapes_are_errors() {
        if !usable_or_skip("wrong_shapes_are_errors") {
            return;
        }
        let linear = Linear::new(Array2::zeros((4, 6)).view(), &Array1::zeros(4)).unwrap();
        for kernels in [ProductKernels::Numkong, ProductKernels::Panels] {
            let packed = pack_linear(&linear, kernels);
            assert!(linear_forward(&linear, &packed, Array2::zeros((2, 5)).view(), true).is_err());
        }
        let conv =
            Conv2d::new(Array4::zeros((4, 3, 3, 3)).view(), &Array1::zeros(4), 1, 0).unwrap();
        for kernels in [ProductKernels::Numkong, ProductKernels::Panels] {
            let packed = pack_conv(&conv, kernels);
            let wrong = Array4::zeros((1, 2, 5, 5));
            assert!(conv_forward(&conv, &packed, wrong.view(), true).is_err());
            let small = Array4::zeros((1, 3, 2, 2));
            assert!(conv_forward(&conv, &packed, small.view(), true).is_err());
        }
    }
}
