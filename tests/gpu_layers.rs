//! Every GPU layer against its CPU twin (`alexnet_cuda::cpu`) on fresh random inputs: AlexNet's
//! own shapes and odd ones. Tolerances, as max |gpu - cpu| / max |cpu|: fp32 <= 1e-5 (1e-2 for
//! convolutions free to use FFT and Winograd), fp16 <= 1e-2 and bf16 <= 3e-2 (against the CPU
//! layer run on the rounded inputs); NaN never passes. Outputs are
//! poisoned (filled with NaN) before each kernel runs, so an element it fails to write shows.
//!
//! These need an NVIDIA GPU, its driver, cuBLAS and cuDNN 9, so they are ignored by default:
//! `cargo test --release --test gpu_layers -- --include-ignored` on a GPU machine. Run that way
//! on a machine without a GPU they FAIL with the "device unavailable" message (they never pass
//! without running). Inputs come from a fixed seed (printed); set ALEXNET_TEST_SEED to vary it.

#![cfg(feature = "cuda")]

mod common;

use alexnet_cuda::config::{DropoutMode, LrnParams};
use alexnet_cuda::cpu::{Conv2d, Dropout, Linear, Lrn, MaxPool2d};
use alexnet_cuda::cuda::{
    softmax_top_k, Conv2dGpu, ConvOptions, DropoutGpu, Gpu, GpuFloat, GpuTensor, Layout, LinearGpu,
    LrnGpu, MaxPoolGpu, PrepareInput, TopK,
};
use alexnet_cuda::image::Preprocess;
use alexnet_cuda::postprocess::{softmax, top_k};
use alexnet_cuda::Error;
use common::{check, formula_values, random_u8_batch};
use half::{bf16, f16};
use ndarray::{s, Array, Array1, Array2, Array4, ArrayD, Dimension, ShapeBuilder};

fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| panic!("{e}"))
}

fn seed(test: &str) -> u64 {
    common::test_seed(test)
}

/// Uniform values in (-scale, scale) from `stream`.
fn random<Sh: ShapeBuilder>(shape: Sh, stream: u64, scale: f64) -> Array<f32, Sh::Dim> {
    let zeros = Array::<f32, _>::zeros(shape);
    Array::from_shape_vec(zeros.raw_dim(), formula_values(stream, zeros.len(), scale)).unwrap()
}

fn round_f16<D: Dimension>(a: &Array<f32, D>) -> Array<f32, D> {
    round_to::<f16, D>(a)
}

/// `a` rounded to `T` and back (what a `T` buffer holds of it).
fn round_to<T: GpuFloat, D: Dimension>(a: &Array<f32, D>) -> Array<f32, D> {
    a.mapv(|v| T::from_f32(v).to_f32())
}

fn upload<T: GpuFloat, D: Dimension>(gpu: &Gpu, a: &Array<f32, D>, layout: Layout) -> GpuTensor<T> {
    GpuTensor::from_host(gpu, a.view().into_dyn(), layout).unwrap()
}

/// A NaN-filled output tensor.
fn poisoned<T: GpuFloat>(gpu: &Gpu, shape: &[usize], layout: Layout) -> GpuTensor<T> {
    let mut t = GpuTensor::zeros(gpu, shape, layout).unwrap();
    t.poison(gpu).unwrap();
    t
}

fn download<T: GpuFloat>(gpu: &Gpu, t: &GpuTensor<T>) -> ArrayD<f32> {
    t.to_host(gpu).unwrap()
}

/// One convolution to test: input `[n, c, h, w]`, output channels, kernel, stride, padding.
struct ConvShape {
    name: &'static str,
    input: [usize; 4],
    out: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

const fn conv(
    name: &'static str,
    input: [usize; 4],
    out: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> ConvShape {
    ConvShape {
        name,
        input,
        out,
        k,
        stride,
        pad,
    }
}

/// The paper's five convolutions at batch 2, and an odd one.
const CONVS: [ConvShape; 6] = [
    conv("conv1", [2, 3, 224, 224], 96, 11, 4, 2),
    conv("conv2", [2, 96, 27, 27], 256, 5, 1, 2),
    conv("conv3", [2, 256, 13, 13], 384, 3, 1, 1),
    conv("conv4", [2, 384, 13, 13], 384, 3, 1, 1),
    conv("conv5", [2, 384, 13, 13], 256, 3, 1, 1),
    conv("odd", [3, 5, 17, 19], 7, 3, 2, 1),
];

struct ConvCase {
    x: Array4<f32>,
    w: Array4<f32>,
    b: Array1<f32>,
    stride: usize,
    pad: usize,
}

fn conv_case(i: usize, seed: u64) -> ConvCase {
    let ConvShape {
        input: [n, c, h, w],
        out: o,
        k,
        stride,
        pad,
        ..
    } = CONVS[i];
    let fan_in = (c * k * k) as f64;
    ConvCase {
        x: random((n, c, h, w), seed + 10 * i as u64, 1.0),
        w: random(
            (o, c, k, k),
            seed + 10 * i as u64 + 1,
            (6.0 / fan_in).sqrt(),
        ),
        b: random(o, seed + 10 * i as u64 + 2, 0.1),
        stride,
        pad,
    }
}

/// True fp32 in both its modes: the GEMM family only (`fp32_gemm_only`) within 1e-5 of the
/// CPU; every algorithm without tensor cores (the default: FFT and Winograd too, whose
/// transforms round more) within 1e-2.
#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn conv_fp32_matches_cpu_for_every_alexnet_shape() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("conv_fp32");
    for (i, ConvShape { name, .. }) in CONVS.iter().enumerate() {
        let case = conv_case(i, seed);
        let cpu = Conv2d::new(case.w.view(), &case.b, case.stride, case.pad).unwrap();
        for (fp32_gemm_only, tolerance) in [(true, 1e-5), (false, 1e-2)] {
            let options = ConvOptions {
                fp32_gemm_only,
                ..ConvOptions::new(case.stride, case.pad, Layout::Nchw)
            };
            let mut conv =
                Conv2dGpu::<f32>::new(&gpu, case.w.view(), case.b.view(), options).unwrap();
            let x = upload::<f32, _>(&gpu, &case.x, Layout::Nchw);
            for relu in [true, false] {
                let want = if relu {
                    cpu.forward_relu(case.x.view()).unwrap()
                } else {
                    cpu.forward(case.x.view()).unwrap()
                };
                let mut y = poisoned::<f32>(&gpu, want.shape(), Layout::Nchw);
                conv.forward(&gpu, &x, &mut y, relu).unwrap();
                let (n, _, h, w) = case.x.dim();
                eprintln!(
                    "{name} fp32_gemm_only={fp32_gemm_only}: cuDNN algorithm {:?}",
                    conv.algorithm(n, h, w)
                );
                check(
                    &format!("{name} fp32 gemm_only={fp32_gemm_only} relu={relu}"),
                    &download(&gpu, &y),
                    &want.into_dyn(),
                    tolerance,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn conv_fp16_nhwc_matches_cpu_for_every_alexnet_shape() {
    let _gpu = common::exclusive_gpu();
    conv_narrow_nhwc_case::<f16>("fp16", 1e-2);
}

/// As the fp16 test in bf16 (compute capability 8.0 and newer): bf16's step is 8 times f16's.
#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn conv_bf16_nhwc_matches_cpu_for_every_alexnet_shape() {
    let _gpu = common::exclusive_gpu();
    if common::gpu_runs_bf16("conv_bf16_nhwc") {
        conv_narrow_nhwc_case::<bf16>("bf16", 3e-2);
    }
}

/// Every AlexNet convolution in `T` (NHWC, the RGB input padded to 8 channels) against the CPU
/// layer on the same rounded inputs, within `tol`.
fn conv_narrow_nhwc_case<T: GpuFloat>(what: &str, tol: f64) {
    let gpu = gpu();
    let seed = seed(&format!("conv_{what}"));
    for (i, ConvShape { name, .. }) in CONVS.iter().enumerate() {
        let case = conv_case(i, seed);
        let (xr, wr, br) = (
            round_to::<T, _>(&case.x),
            round_to::<T, _>(&case.w),
            round_to::<T, _>(&case.b),
        );
        let want = Conv2d::new(wr.view(), &br, case.stride, case.pad)
            .unwrap()
            .forward_relu(xr.view())
            .unwrap();
        // The RGB input is padded to 8 channels (zeros) as in the model; the others are
        // multiples of 8 already except the odd case, which runs unpadded.
        let (n, c, h, w) = case.x.dim();
        let padded = if c == 3 { 8 } else { c };
        let mut xp = Array4::<f32>::zeros((n, padded, h, w));
        xp.slice_mut(s![.., ..c, .., ..]).assign(&xr);
        let mut options = ConvOptions::new(case.stride, case.pad, Layout::Nhwc);
        options.in_channels = Some(padded);
        let mut conv = Conv2dGpu::<T>::new(&gpu, case.w.view(), case.b.view(), options).unwrap();
        let x = upload::<T, _>(&gpu, &xp, Layout::Nhwc);
        let mut y = poisoned::<T>(&gpu, want.shape(), Layout::Nhwc);
        conv.forward(&gpu, &x, &mut y, true).unwrap();
        eprintln!(
            "{name} {what}: cuDNN algorithm {:?}",
            conv.algorithm(n, h, w)
        );
        check(
            &format!("{name} {what} NHWC"),
            &download(&gpu, &y),
            &want.into_dyn(),
            tol,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn conv_tf32_is_opt_in_and_close() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("conv_tf32");
    let case = conv_case(2, seed);
    let want = Conv2d::new(case.w.view(), &case.b, case.stride, case.pad)
        .unwrap()
        .forward_relu(case.x.view())
        .unwrap();
    let mut options = ConvOptions::new(case.stride, case.pad, Layout::Nchw);
    options.allow_tf32 = true;
    let mut conv = Conv2dGpu::<f32>::new(&gpu, case.w.view(), case.b.view(), options).unwrap();
    let x = upload::<f32, _>(&gpu, &case.x, Layout::Nchw);
    let mut y = poisoned::<f32>(&gpu, want.shape(), Layout::Nchw);
    conv.forward(&gpu, &x, &mut y, true).unwrap();
    check("conv3 tf32", &download(&gpu, &y), &want.into_dyn(), 1e-2);
}

/// LRN shapes: conv1's output at batch 2, and an odd one (channel edges everywhere).
const LRN_SHAPES: [[usize; 4]; 2] = [[2, 96, 55, 55], [3, 7, 5, 9]];

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn lrn_matches_cpu_with_and_without_the_fused_relu() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("lrn");
    let cpu = Lrn::new(LrnParams::PAPER).unwrap();
    let lrn = LrnGpu::new(LrnParams::PAPER).unwrap();
    for (i, shape) in LRN_SHAPES.iter().enumerate() {
        // Large values, so the normalisation is far from the identity.
        let x = random(*shape, seed + i as u64, 60.0)
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        let relu_x = x.mapv(|v| v.max(0.0));
        for relu_first in [true, false] {
            let src = if relu_first { &relu_x } else { &x };
            let want = cpu.forward(src.view()).unwrap().into_dyn();
            let xg = upload::<f32, _>(&gpu, &x, Layout::Nchw);
            let mut y = poisoned::<f32>(&gpu, shape, Layout::Nchw);
            lrn.forward(&gpu, &xg, &mut y, relu_first).unwrap();
            check(
                &format!("lrn {shape:?} fp32 relu_first={relu_first}"),
                &download(&gpu, &y),
                &want,
                1e-5,
            );

            let x16 = round_f16(&x);
            let src16 = if relu_first {
                x16.mapv(|v| v.max(0.0))
            } else {
                x16.clone()
            };
            let want16 = cpu.forward(src16.view()).unwrap().into_dyn();
            let xg = upload::<f16, _>(&gpu, &x16, Layout::Nhwc);
            let mut y = poisoned::<f16>(&gpu, shape, Layout::Nhwc);
            lrn.forward(&gpu, &xg, &mut y, relu_first).unwrap();
            check(
                &format!("lrn {shape:?} fp16 NHWC relu_first={relu_first}"),
                &download(&gpu, &y),
                &want16,
                1e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn maxpool_matches_cpu_exactly_and_propagates_nan() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("maxpool");
    // (input, kernel, stride): conv1's and conv5's outputs with overlapping 3x3/2 pooling, an
    // odd shape, and non-overlapping 2x2/2.
    let cases: [([usize; 4], usize, usize); 4] = [
        ([2, 96, 55, 55], 3, 2),
        ([2, 256, 13, 13], 3, 2),
        ([3, 5, 13, 11], 3, 2),
        ([1, 2, 8, 8], 2, 2),
    ];
    for (i, (shape, k, stride)) in cases.into_iter().enumerate() {
        let mut x = random(shape, seed + i as u64, 1.0)
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        x[[0, 1, 4, 4]] = f32::NAN;
        let want = MaxPool2d { kernel: k, stride }.forward(x.view()).unwrap();
        let pool = MaxPoolGpu::new(k, stride).unwrap();
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let xg = upload::<f32, _>(&gpu, &x, layout);
            let mut y = poisoned::<f32>(&gpu, want.shape(), layout);
            pool.forward(&gpu, &xg, &mut y).unwrap();
            let got = download(&gpu, &y);
            assert_eq!(got.shape(), want.shape());
            for (idx, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "pool {shape:?} k{k}/s{stride} {layout:?}: element {idx}: gpu {g}, cpu {w}"
                );
            }
            assert!(got.iter().any(|v| v.is_nan()), "the NaN did not propagate");
        }
        // f16: max selects, so the result is exactly the CPU's on the rounded input.
        let x16 = round_f16(&x);
        let want16 = MaxPool2d { kernel: k, stride }.forward(x16.view()).unwrap();
        let xg = upload::<f16, _>(&gpu, &x16, Layout::Nhwc);
        let mut y = poisoned::<f16>(&gpu, want16.shape(), Layout::Nhwc);
        pool.forward(&gpu, &xg, &mut y).unwrap();
        let got = download(&gpu, &y);
        for (g, w) in got.iter().zip(want16.iter()) {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()));
        }
        eprintln!("pool {shape:?} k{k}/s{stride}: exact in fp32 (both layouts) and fp16");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn linear_matches_cpu_fp32_fp16_and_bf16() {
    let _gpu = common::exclusive_gpu();
    let bf16_runs = common::gpu_runs_bf16("linear");
    let gpu = gpu();
    let seed = seed("linear");
    // (rows, in, out): fc1 (fed a 4-D pool5-shaped tensor, flattened), fc2, fc3, an odd one.
    let cases: [(usize, usize, usize); 4] = [
        (3, 9216, 4096),
        (3, 4096, 4096),
        (5, 4096, 1000),
        (7, 37, 13),
    ];
    for (i, (rows, inf, outf)) in cases.into_iter().enumerate() {
        let x = random((rows, inf), seed + 3 * i as u64, 1.0);
        let w = random(
            (outf, inf),
            seed + 3 * i as u64 + 1,
            (6.0 / inf as f64).sqrt(),
        );
        let b = random(outf, seed + 3 * i as u64 + 2, 0.1);
        let cpu = Linear::new(w.view(), &b).unwrap();
        // fc1's input arrives as pool5's [N, 256, 6, 6] NCHW: flattened in (C, H, W) order.
        let x_gpu_shape: Vec<usize> = if inf == 9216 {
            vec![rows, 256, 6, 6]
        } else {
            vec![rows, inf]
        };
        let x4 = x
            .clone()
            .into_shape_with_order(x_gpu_shape.clone())
            .unwrap();

        let lin = LinearGpu::<f32>::new(&gpu, w.view(), b.view(), false).unwrap();
        let xg = upload::<f32, _>(&gpu, &x4, Layout::Nchw);
        for relu in [true, false] {
            let want = if relu {
                cpu.forward_relu(x.view()).unwrap()
            } else {
                cpu.forward(x.view()).unwrap()
            };
            let mut y = poisoned::<f32>(&gpu, &[rows, outf], Layout::Nchw);
            lin.forward(&gpu, &xg, &mut y, relu).unwrap();
            check(
                &format!("linear {rows}x{inf}->{outf} fp32 relu={relu}"),
                &download(&gpu, &y),
                &want.into_dyn(),
                1e-5,
            );
        }

        let (x16, w16, b16) = (round_f16(&x), round_f16(&w), round_f16(&b));
        let want16 = Linear::new(w16.view(), &b16)
            .unwrap()
            .forward_relu(x16.view())
            .unwrap();
        let lin16 = LinearGpu::<f16>::new(&gpu, w.view(), b.view(), false).unwrap();
        let xg = upload::<f16, _>(&gpu, &x16, Layout::Nchw);
        let mut y = poisoned::<f16>(&gpu, &[rows, outf], Layout::Nchw);
        lin16.forward(&gpu, &xg, &mut y, true).unwrap();
        check(
            &format!("linear {rows}x{inf}->{outf} fp16"),
            &download(&gpu, &y),
            &want16.into_dyn(),
            1e-2,
        );

        // bf16 (compute capability 8.0 and newer): bf16's step is 8 times f16's.
        if bf16_runs {
            let (xb, wb, bb) = (
                round_to::<bf16, _>(&x),
                round_to::<bf16, _>(&w),
                round_to::<bf16, _>(&b),
            );
            let want_bf16 = Linear::new(wb.view(), &bb)
                .unwrap()
                .forward_relu(xb.view())
                .unwrap();
            let lin_bf16 = LinearGpu::<bf16>::new(&gpu, w.view(), b.view(), false).unwrap();
            let xg = upload::<bf16, _>(&gpu, &xb, Layout::Nchw);
            let mut y = poisoned::<bf16>(&gpu, &[rows, outf], Layout::Nchw);
            lin_bf16.forward(&gpu, &xg, &mut y, true).unwrap();
            check(
                &format!("linear {rows}x{inf}->{outf} bf16"),
                &download(&gpu, &y),
                &want_bf16.into_dyn(),
                3e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn dropout_draws_the_cpu_mask() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("dropout");
    for (mode, p) in [
        (DropoutMode::Inverted, 0.5),
        (DropoutMode::Classic, 0.5),
        (DropoutMode::Inverted, 0.1),
    ] {
        let x = random((4, 4096), seed, 1.0).mapv(|v| v + 2.0); // no zeros in the input
        let cpu = Dropout::new(p, mode).unwrap();
        let gpu_dropout = DropoutGpu::new(p, mode).unwrap();
        for draw_seed in [seed, seed ^ 0xDEAD_BEEF] {
            let want = cpu.forward_train(x.view().into_dyn(), draw_seed);
            let mut t = upload::<f32, _>(&gpu, &x, Layout::Nchw);
            gpu_dropout.forward_train(&gpu, &mut t, draw_seed).unwrap();
            let got = download(&gpu, &t);
            let mismatches = got
                .iter()
                .zip(want.iter())
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(
                mismatches, 0,
                "{mode:?} p={p}: {mismatches} elements differ"
            );
            let kept = got.iter().filter(|v| **v != 0.0).count() as f64 / got.len() as f64;
            eprintln!("dropout {mode:?} p={p}: same mask as the CPU, kept {kept:.3}");

            // f16: the same mask (zeros at the same places), values within f16 rounding.
            let x16 = round_f16(&x);
            let want16 = cpu.forward_train(x16.view().into_dyn(), draw_seed);
            let mut t = upload::<f16, _>(&gpu, &x16, Layout::Nchw);
            gpu_dropout.forward_train(&gpu, &mut t, draw_seed).unwrap();
            let got16 = download(&gpu, &t);
            for (g, w) in got16.iter().zip(want16.iter()) {
                assert_eq!(*g == 0.0, *w == 0.0, "f16 mask differs");
            }
            check(&format!("dropout f16 {mode:?}"), &got16, &want16, 1e-2);
        }
        // Inference: identity (inverted) or x (1 - p) (classic), as the CPU.
        let want = cpu.forward_eval(x.view().into_dyn());
        let mut t = upload::<f32, _>(&gpu, &x, Layout::Nchw);
        gpu_dropout.forward_eval(&gpu, &mut t).unwrap();
        let got = download(&gpu, &t);
        assert!(got
            .iter()
            .zip(want.iter())
            .all(|(g, w)| g.to_bits() == w.to_bits()));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn softmax_and_top_k_match_cpu() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("softmax_topk");
    let rows = 5;
    let mut logits = random((rows, 1000), seed, 8.0);
    logits.row_mut(3).fill(0.0); // a row of ties: lower index first
    let mut topk = TopK::new(&gpu, rows).unwrap();
    // The kernel's top-k must be exactly `cpu::top_k` of the probabilities it computed (the
    // same expression, so the same bits): ties and near-ties included. Those probabilities
    // must match the CPU's softmax within 1e-5.
    let top_k_of = |probs: &ArrayD<f32>, r: usize, k: usize| {
        let row = probs.index_axis(ndarray::Axis(0), r);
        let row = row.into_dimensionality::<ndarray::Ix1>().unwrap();
        top_k(row, k).unwrap()
    };
    for k in [1, 5, 32] {
        for (dtype, l) in [("f32", logits.clone()), ("f16", round_f16(&logits))] {
            let mut probs = poisoned::<f32>(&gpu, &[rows, 1000], Layout::Nchw);
            topk.poison(&gpu).unwrap();
            if dtype == "f32" {
                let lg = upload::<f32, _>(&gpu, &l, Layout::Nchw);
                softmax_top_k(&gpu, &lg, k, Some(&mut probs), &mut topk).unwrap();
            } else {
                let lg = upload::<f16, _>(&gpu, &l, Layout::Nchw);
                softmax_top_k(&gpu, &lg, k, Some(&mut probs), &mut topk).unwrap();
            }
            let gpu_probs = download(&gpu, &probs);
            check(
                &format!("softmax {dtype} (k={k})"),
                &gpu_probs,
                &softmax(l.view()).into_dyn(),
                1e-5,
            );
            let got = topk.to_host(&gpu).unwrap();
            assert_eq!(got.len(), rows);
            for (r, row) in got.iter().enumerate() {
                let want = top_k_of(&gpu_probs, r, k);
                assert_eq!(row.len(), k);
                for (&(c, p), &(wc, wp)) in row.iter().zip(&want) {
                    assert_eq!(c, wc, "{dtype} row {r} k={k}: {row:?} vs {want:?}");
                    assert_eq!(p.to_bits(), wp.to_bits(), "{dtype} row {r} k={k}");
                }
            }
            // The row of equal logits: the lowest indices, in order.
            assert_eq!(
                got[3].iter().map(|&(c, _)| c).collect::<Vec<_>>(),
                (0..k).collect::<Vec<_>>()
            );

            // Only the top-k (no probability buffer): the same answer.
            topk.poison(&gpu).unwrap();
            if dtype == "f32" {
                let lg = upload::<f32, _>(&gpu, &l, Layout::Nchw);
                softmax_top_k(&gpu, &lg, k, None, &mut topk).unwrap();
            } else {
                let lg = upload::<f16, _>(&gpu, &l, Layout::Nchw);
                softmax_top_k(&gpu, &lg, k, None, &mut topk).unwrap();
            }
            assert_eq!(
                topk.to_host(&gpu).unwrap(),
                got,
                "{dtype} k={k} without probs"
            );
        }
    }
    let lg = upload::<f32, _>(&gpu, &logits, Layout::Nchw);
    for bad_k in [0, 33, 1001] {
        assert!(
            softmax_top_k(&gpu, &lg, bad_k, None, &mut topk).is_err(),
            "k = {bad_k}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn prepare_input_matches_the_cpu_normalisation() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = seed("prepare_input");
    let pre = Preprocess::default();
    let prep = PrepareInput::new(pre.mean, pre.std).unwrap();
    for (n, side) in [(3, 224), (2, 17)] {
        let batch = random_u8_batch(n, side, seed);
        let want = batch.to_nchw_f32(&pre);
        let src = gpu.upload_bytes(batch.as_slice()).unwrap();
        let s = side as usize;

        let mut y = poisoned::<f32>(&gpu, &[n, 3, s, s], Layout::Nchw);
        prep.forward(&gpu, &src.as_view(), &mut y).unwrap();
        check(
            &format!("prepare_input {n}x{side} f32 NCHW"),
            &download(&gpu, &y),
            &want.clone().into_dyn(),
            1e-5,
        );

        // f16 NHWC padded to 8 channels: the padding is exactly zero.
        let mut y = poisoned::<f16>(&gpu, &[n, 8, s, s], Layout::Nhwc);
        prep.forward(&gpu, &src.as_view(), &mut y).unwrap();
        let got = download(&gpu, &y);
        assert!(
            got.slice(s![.., 3.., .., ..]).iter().all(|v| *v == 0.0),
            "padding channels must be 0"
        );
        check(
            &format!("prepare_input {n}x{side} f16 NHWC8"),
            &got.slice(s![.., ..3, .., ..]).to_owned().into_dyn(),
            &round_f16(&want).into_dyn(),
            1e-2,
        );
    }
    // Wrong byte count: refused before any launch.
    let batch = random_u8_batch(2, 17, seed);
    let src = gpu.upload_bytes(batch.as_slice()).unwrap();
    let mut y = GpuTensor::<f32>::zeros(&gpu, &[3, 3, 17, 17], Layout::Nchw).unwrap();
    assert!(matches!(
        prep.forward(&gpu, &src.as_view(), &mut y),
        Err(Error::Shape { .. })
    ));
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn launchers_refuse_mismatched_shapes() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let w = Array4::<f32>::zeros((4, 3, 3, 3));
    let b = Array1::<f32>::zeros(4);
    let mut conv = Conv2dGpu::<f32>::new(
        &gpu,
        w.view(),
        b.view(),
        ConvOptions::new(1, 1, Layout::Nchw),
    )
    .unwrap();
    let x = GpuTensor::<f32>::zeros(&gpu, &[1, 3, 8, 8], Layout::Nchw).unwrap();
    let mut bad_y = GpuTensor::<f32>::zeros(&gpu, &[1, 4, 7, 8], Layout::Nchw).unwrap();
    assert!(matches!(
        conv.forward(&gpu, &x, &mut bad_y, true),
        Err(Error::Shape { .. })
    ));
    let bad_x = GpuTensor::<f32>::zeros(&gpu, &[1, 2, 8, 8], Layout::Nchw).unwrap();
    let mut y = GpuTensor::<f32>::zeros(&gpu, &[1, 4, 8, 8], Layout::Nchw).unwrap();
    assert!(matches!(
        conv.forward(&gpu, &bad_x, &mut y, true),
        Err(Error::Shape { .. })
    ));
    let x_nhwc = GpuTensor::<f32>::zeros(&gpu, &[1, 3, 8, 8], Layout::Nhwc).unwrap();
    assert!(conv.forward(&gpu, &x_nhwc, &mut y, true).is_err());

    let pool = MaxPoolGpu::new(3, 2).unwrap();
    let mut bad = GpuTensor::<f32>::zeros(&gpu, &[1, 3, 4, 4], Layout::Nchw).unwrap();
    assert!(matches!(
        pool.forward(&gpu, &x, &mut bad),
        Err(Error::Shape { .. })
    ));

    let lrn = LrnGpu::new(LrnParams::PAPER).unwrap();
    assert!(matches!(
        lrn.forward(&gpu, &x, &mut bad, true),
        Err(Error::Shape { .. })
    ));

    let lw = Array2::<f32>::zeros((5, 10));
    let lb = Array1::<f32>::zeros(5);
    let lin = LinearGpu::<f32>::new(&gpu, lw.view(), lb.view(), false).unwrap();
    let lx = GpuTensor::<f32>::zeros(&gpu, &[2, 11], Layout::Nchw).unwrap();
    let mut ly = GpuTensor::<f32>::zeros(&gpu, &[2, 5], Layout::Nchw).unwrap();
    assert!(matches!(
        lin.forward(&gpu, &lx, &mut ly, true),
        Err(Error::Shape { .. })
    ));
}

/// Uploads of every kind come back as they went up: a standard-layout f32 array into NCHW (sent
/// straight from the array's memory), a strided view (copied into order first), f16 (rounded)
/// and NHWC (reordered). The f32 device memory is also read as it lies, against this test's own
/// reordering, so that an upload and a download that both ignored the layout would not pass.
#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn uploads_of_any_strides_and_layouts_come_back_unchanged() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let values = random((2, 5, 3, 4), seed("uploads"), 3.0);
    // The same logical tensor from memory in another order: a permuted view of a permuted copy.
    let stored = values
        .view()
        .permuted_axes([2, 0, 3, 1])
        .as_standard_layout()
        .to_owned();
    let strided = stored.view().permuted_axes([1, 3, 0, 2]);
    assert_eq!(strided, values.view());
    assert!(
        strided.as_slice().is_none(),
        "the view must not be contiguous"
    );
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let in_memory: Vec<f32> = match layout {
            Layout::Nchw => values.iter().copied().collect(),
            Layout::Nhwc => values
                .view()
                .permuted_axes([0, 2, 3, 1])
                .iter()
                .copied()
                .collect(),
        };
        for view in [values.view(), strided] {
            let mut t = GpuTensor::<f32>::zeros(&gpu, &[2, 5, 3, 4], layout).unwrap();
            t.poison(&gpu).unwrap();
            t.upload(&gpu, view.into_dyn()).unwrap();
            let raw = gpu.stream().clone_dtoh(t.data()).unwrap();
            assert_eq!(raw, in_memory, "f32 {layout:?} as it lies in device memory");
            assert_eq!(
                download(&gpu, &t),
                values.clone().into_dyn(),
                "f32 {layout:?}"
            );
            let mut h = GpuTensor::<f16>::zeros(&gpu, &[2, 5, 3, 4], layout).unwrap();
            h.upload(&gpu, view.into_dyn()).unwrap();
            assert_eq!(
                download(&gpu, &h),
                round_f16(&values).into_dyn(),
                "f16 {layout:?}"
            );
        }
    }
}
