//! Linear layers at small batch sizes straight from the row-major weight `[out, in]`: each
//! output is a dot product of an input row and a weight row, both contiguous, so nothing needs
//! packing. A training step changes every weight, and packing fc1's and fc2's into the panels
//! of `f32_panels` again after each update cost ~28 ms of a ~450 ms torchvision step at batch
//! 16 (2-core AVX-512 VM); this kernel needs no packing and, up to [`MAX_BATCH`] images, is no
//! slower than the panels (fc1 at batch 16: 11.4 ms against 13.4; at 32: 18.0 against 18.6;
//! at 64 the panels lead, 27.5 against 32.8). Inference and training choose it by the same rule
//! ([`suits`]), so the training forward still computes the inference forward's bits.

use std::ops::Range;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::bias_act::relu as relu_of;
use super::f32_panels::Kernel;
use super::Linear;
use crate::error::{Error, Result};

/// The largest batch this kernel takes. Above it the panels' register tiles, which reuse each
/// weight across 12 images, are faster (see the module's text).
pub(super) const MAX_BATCH: usize = 32;

/// Images per register block: with [`OUTPUTS`] outputs, 24 accumulators of 16 lanes, 6
/// weight registers and one input register: 31 of AVX-512's 32 registers.
const IMAGES: usize = 4;

/// Outputs per register block.
const OUTPUTS: usize = 6;

/// Lanes per accumulator: one AVX-512 register of f32.
const LANES: usize = 16;

/// Products per row summed in registers before the sums go to the planes: fc1's 9216 are added
/// in 9 blocks, so the rounding error grows with a block's length and the number of blocks,
/// not the whole depth (as the panels' blocks do). 1024 measured faster than 256 and 512.
const DEPTH_BLOCK: usize = 1024;

/// Outputs per task: a few blocks, so both cores stream their share of the weight.
const TASK_OUTPUTS: usize = 8 * OUTPUTS;

/// Whether a linear layer on `kernel` takes this path for a batch of `n` images: on AVX-512
/// only (the register blocks above would spill on AVX2's 16 registers) and up to
/// [`MAX_BATCH`] images.
pub(super) fn suits(kernel: Kernel, n: usize) -> bool {
    kernel == Kernel::Avx512 && n <= MAX_BATCH
}

/// [`Linear::forward`] (or `forward_relu`) from the layer's row-major weight: `input [n, in]`
/// to `[n, out]`. Each output's products are summed in 16 lanes (every 16th product per lane)
/// and the lanes added at the end; the bias is added after, then the ReLU when `relu`.
pub(super) fn linear_rows(
    linear: &Linear,
    input: ArrayView2<'_, f32>,
    relu: bool,
) -> Result<Array2<f32>> {
    let (n, depth) = input.dim();
    let width = linear.out_features();
    if depth != linear.in_features() {
        return Err(Error::Shape {
            op: "Linear (rows)",
            expected: format!("[N, {}]", linear.in_features()),
            found: input.shape().to_vec(),
        });
    }
    let [weight, bias] = linear.parameters();
    let input = input.as_standard_layout();
    let x = input.as_slice().unwrap_or(&[]);
    // Planes `[out, n]`: each task writes its outputs' planes, one contiguous range.
    let mut planes = vec![0.0f32; width * n];
    if n > 0 {
        planes
            .par_chunks_mut(TASK_OUTPUTS * n)
            .enumerate()
            .for_each(|(task, planes)| {
                let first = task * TASK_OUTPUTS;
                let outputs = planes.len() / n;
                let w = &weight[first * depth..(first + outputs) * depth];
                dots(x, n, w, depth, outputs, planes);
                for (plane, &b) in planes.chunks_exact_mut(n).zip(&bias[first..]) {
                    for v in plane {
                        *v += b;
                        if relu {
                            *v = relu_of(*v);
                        }
                    }
                }
            });
    }
    // Planes `[out, n]` to rows `[n, out]` (a small array: the batch's outputs).
    Ok(Array2::from_shape_vec((width, n), planes)
        .map_err(|e| Error::invalid("Linear output", e.to_string()))?
        .reversed_axes()
        .as_standard_layout()
        .into_owned())
}

/// The dot products of the `n` rows of `x` (`depth` long) with the `outputs` rows of `w` into
/// `planes` (`[outputs, n]`, zeroed by the caller), in register blocks of [`IMAGES`] x [`OUTPUTS`]
/// (then the leftover images and outputs one at a time), one [`DEPTH_BLOCK`] at a time, each
/// block's sums added to the planes.
fn dots(x: &[f32], n: usize, w: &[f32], depth: usize, outputs: usize, planes: &mut [f32]) {
    assert!(
        x.len() == n * depth && w.len() == outputs * depth && planes.len() == outputs * n,
        "internal: linear rows shapes"
    );
    let full_outputs = outputs - outputs % OUTPUTS;
    let full_images = n - n % IMAGES;
    // Every block below reads images `i..i + I` of `x` and outputs `o..o + O` of `w` over
    // `depths`: inside by the assert and the loop bounds.
    for depths in (0..depth)
        .step_by(DEPTH_BLOCK)
        .map(|d| d..(d + DEPTH_BLOCK).min(depth))
    {
        let at = |o, i| Block {
            x,
            w,
            depth,
            depths: depths.clone(),
            first_image: i,
            first_output: o,
        };
        for o in (0..full_outputs).step_by(OUTPUTS) {
            for i in (0..full_images).step_by(IMAGES) {
                add(&at(o, i).sums::<IMAGES, OUTPUTS>(), i, o, n, planes);
            }
            for i in full_images..n {
                add(&at(o, i).sums::<1, OUTPUTS>(), i, o, n, planes);
            }
        }
        for o in full_outputs..outputs {
            for i in (0..full_images).step_by(IMAGES) {
                add(&at(o, i).sums::<IMAGES, 1>(), i, o, n, planes);
            }
            for i in full_images..n {
                add(&at(o, i).sums::<1, 1>(), i, o, n, planes);
            }
        }
    }
}

/// Where one register block reads: images from `first_image`, outputs from `first_output`,
/// the products over `depths` only.
struct Block<'a> {
    x: &'a [f32],
    w: &'a [f32],
    depth: usize,
    depths: Range<usize>,
    first_image: usize,
    first_output: usize,
}

impl Block<'_> {
    /// Images `first_image..+I` times outputs `first_output..+O` on the AVX-512 kernel where
    /// this CPU has it (the model sends nothing here otherwise), else on the portable twin.
    #[inline]
    fn sums<const I: usize, const O: usize>(&self) -> [[f32; O]; I] {
        let span = |row: usize| {
            let start = row * self.depth;
            start + self.depths.start..start + self.depths.end
        };
        let rows: [&[f32]; I] = std::array::from_fn(|i| &self.x[span(self.first_image + i)]);
        let weights: [&[f32]; O] = std::array::from_fn(|o| &self.w[span(self.first_output + o)]);
        let depth = self.depths.len();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is here; every row and weight slice is `depth` long.
            return unsafe { block_avx512(&rows, &weights, depth) };
        }
        block_portable(&rows, &weights, depth)
    }
}

/// `I * O` accumulators of 16 lanes (each lane sums every 16th product), the lanes added at
/// the end, the depth's tail past the last whole 16 added one product at a time.
///
/// # Safety
/// AVX-512F; every slice of `rows` and `weights` is `depth` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block_avx512<const I: usize, const O: usize>(
    rows: &[&[f32]; I],
    weights: &[&[f32]; O],
    depth: usize,
) -> [[f32; O]; I] {
    use std::arch::x86_64::*;
    debug_assert!(rows.iter().chain(weights).all(|r| r.len() == depth));
    let mut acc = [[_mm512_setzero_ps(); O]; I];
    let whole = depth - depth % LANES;
    for at in (0..whole).step_by(LANES) {
        // SAFETY (every load): `at + 16 <= whole <= depth`, the length of each slice.
        let wv: [__m512; O] =
            std::array::from_fn(|o| unsafe { _mm512_loadu_ps(weights[o].as_ptr().add(at)) });
        for (acc, row) in acc.iter_mut().zip(rows) {
            let xv = unsafe { _mm512_loadu_ps(row.as_ptr().add(at)) };
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                *acc = _mm512_fmadd_ps(xv, wv, *acc);
            }
        }
    }
    std::array::from_fn(|i| {
        std::array::from_fn(|o| _mm512_reduce_add_ps(acc[i][o]) + tail(rows[i], weights[o], whole))
    })
}

/// What [`block_avx512`] computes, in the same order, without intrinsics: the tests' twin,
/// and the fallback if this module is ever reached without AVX-512F.
fn block_portable<const I: usize, const O: usize>(
    rows: &[&[f32]; I],
    weights: &[&[f32]; O],
    depth: usize,
) -> [[f32; O]; I] {
    let whole = depth - depth % LANES;
    std::array::from_fn(|i| {
        std::array::from_fn(|o| {
            let mut lanes = [0.0f32; LANES];
            for at in (0..whole).step_by(LANES) {
                for (lane, sum) in lanes.iter_mut().enumerate() {
                    *sum = rows[i][at + lane].mul_add(weights[o][at + lane], *sum);
                }
            }
            reduce_like_avx512(lanes) + tail(rows[i], weights[o], whole)
        })
    })
}

/// The 16 lanes added as `_mm512_reduce_add_ps` adds them: halves folded onto each other.
fn reduce_like_avx512(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            lanes[lane] += lanes[lane + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// The products past the last whole 16, in order.
#[inline]
fn tail(row: &[f32], weights: &[f32], from: usize) -> f32 {
    row[from..]
        .iter()
        .zip(&weights[from..])
        .fold(0.0, |sum, (&x, &w)| x.mul_add(w, sum))
}

/// A block's sums added to the planes `[output, image]`.
#[inline]
fn add<const I: usize, const O: usize>(
    sums: &[[f32; O]; I],
    first_image: usize,
    first_output: usize,
    n: usize,
    planes: &mut [f32],
) {
    for (i, row) in sums.iter().enumerate() {
        for (o, &sum) in row.iter().enumerate() {
            planes[(first_output + o) * n + first_image + i] += sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    /// Values in [-1, 1) with few repeats, exactly representable.
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    /// Every shape's edge: images and outputs short of a whole register block, several tasks,
    /// depths with and without a tail past the last 16, over one depth block, and none at all;
    /// to 1e-6 of each output's sum of |products| (f64 reference written here).
    #[test]
    fn rows_match_a_naive_product_on_every_edge() {
        for (n, outputs, depth) in [
            (1, 1, 1),
            (3, 5, 15),
            (4, 6, 16),
            (5, 7, 17),
            (9, 13, 100),
            (16, 50, 33),
            (2, 97, DEPTH_BLOCK + 37),
            (MAX_BATCH, 12, 2 * DEPTH_BLOCK),
            (7, 11, 0),
        ] {
            let (w, b, x) = (
                values(outputs * depth, 1),
                values(outputs, 2),
                values(n * depth, 3),
            );
            let layer = Linear::new(
                ArrayView2::from_shape((outputs, depth), &w).unwrap(),
                &Array1::from(b.clone()),
            )
            .unwrap();
            let input = ArrayView2::from_shape((n, depth), &x).unwrap();
            for relu in [false, true] {
                let got = linear_rows(&layer, input, relu).unwrap();
                assert_eq!(got.dim(), (n, outputs));
                for i in 0..n {
                    for o in 0..outputs {
                        let products =
                            (0..depth).map(|d| x[i * depth + d] as f64 * w[o * depth + d] as f64);
                        let magnitude: f64 =
                            products.clone().map(f64::abs).sum::<f64>() + b[o].abs() as f64;
                        let mut want = products.sum::<f64>() + b[o] as f64;
                        if relu {
                            want = want.max(0.0);
                        }
                        let err = (got[[i, o]] as f64 - want).abs();
                        assert!(
                            err <= 1e-6 * magnitude.max(1e-30),
                            "n {n} out {outputs} depth {depth} relu {relu}: [{i}, {o}] = {} want {want}",
                            got[[i, o]]
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 kernel and its portable twin add the same products in the same order: the
    /// same bits, on a block with a tail.
    #[test]
    #[cfg_attr(
        not(alexnet_build_cpu_avx512f),
        ignore = "needs a CPU with AVX-512F (the kernel it checks never runs elsewhere), and the \
                  machine that built the tests has none"
    )]
    fn the_avx512_block_is_its_portable_twin() {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(
                std::arch::is_x86_feature_detected!("avx512f"),
                "this CPU has no AVX-512F: the kernel cannot be checked here"
            );
            let depth = 3 * LANES + 5;
            let x = values(IMAGES * depth, 4);
            let w = values(OUTPUTS * depth, 5);
            let rows: [&[f32]; IMAGES] = std::array::from_fn(|i| &x[i * depth..][..depth]);
            let weights: [&[f32]; OUTPUTS] = std::array::from_fn(|o| &w[o * depth..][..depth]);
            // SAFETY: AVX-512F is here (asserted above); every slice is `depth` long.
            let fast = unsafe { block_avx512(&rows, &weights, depth) };
            let twin = block_portable(&rows, &weights, depth);
            assert_eq!(
                fast.map(|row| row.map(f32::to_bits)),
                twin.map(|row| row.map(f32::to_bits))
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        panic!("AVX-512F is an x86-64 instruction set: the kernel cannot be checked here");
    }

    #[test]
    fn a_wrong_input_width_is_a_shape_error() {
        let layer = Linear::new(
            ArrayView2::from_shape((2, 3), &[0.0f32; 6]).unwrap(),
            &Array1::zeros(2),
        )
        .unwrap();
        let input = ndarray::Array2::<f32>::zeros((1, 4));
        assert!(matches!(
            linear_rows(&layer, input.view(), false),
            Err(Error::Shape { .. })
        ));
    }
}
