//! The cuDNN and cuBLAS calls of the GPU layers, replayed on the CPU. Each layer describes its
//! library call as data (`cuda::library_calls`: descriptor dims, formats, padding, strides,
//! transposes, leading dimensions) and packs its weights as it uploads them; here a naive
//! convolution and a naive column-major GEMM read memory exactly as those arguments tell the
//! library to, and must reproduce the CPU layers on odd shapes, in both precisions' layouts
//! (NCHW/KCRS for fp32, NHWC/KRSC with the input padded to 8 channels for fp16), including fc1's
//! column permutation for NHWC activations. No GPU needed: this catches transposes, leading
//! dimensions, descriptor dims and layouts before the first GPU run does. The training calls
//! (`cudnnConvolutionBackwardData` / `BackwardFilter` with the forward's descriptors, the two
//! GEMMs of a linear layer's backward) are replayed against the CPU layers' backward the same way.

#![cfg(feature = "cuda")]

mod common;

use alexnet_cuda::cpu::{Conv2d, InputGradient, Linear};
use alexnet_cuda::cuda::library_calls::{
    chw_columns_to_hwc, pack_conv_weights, unpack_conv_weights, ConvCall, GemmCall, LinearBuffer,
};
use alexnet_cuda::cuda::{ConvOptions, Layout};
use common::formula_values;
use ndarray::{s, Array, Array1, Array2, Array4, ShapeBuilder};
use LinearBuffer::{Input, InputGrad, Output, OutputGrad, Weight, WeightGrad};

fn random<Sh: ShapeBuilder>(shape: Sh, stream: u64, scale: f64) -> Array<f32, Sh::Dim> {
    let zeros = Array::<f32, _>::zeros(shape);
    Array::from_shape_vec(zeros.raw_dim(), formula_values(stream, zeros.len(), scale)).unwrap()
}

/// `a` in `layout`'s memory order.
fn physical(a: &Array4<f32>, layout: Layout) -> Vec<f32> {
    match layout {
        Layout::Nchw => a.iter().copied().collect(),
        Layout::Nhwc => a
            .view()
            .permuted_axes([0, 2, 3, 1])
            .iter()
            .copied()
            .collect(),
    }
}

/// Every (input, filter, output) element triple a convolution multiplies, as memory indices
/// into the buffers `call` describes, exactly as cuDNN reads them: dims from the call, memory
/// order from its format (NCHW/KCRS or NHWC/KRSC), zero padding (taps outside the input are
/// skipped), strides and dilations. The one walk the forward and both backward replays share.
fn for_each_tap(call: &ConvCall, mut tap: impl FnMut(usize, usize, usize)) {
    let u = |v: i32| usize::try_from(v).expect("non-negative descriptor value");
    let [n, c, h, w] = call.x.map(u);
    let [k, fc, r, s] = call.filter.map(u);
    let [yn, yk, oh, ow] = call.y.map(u);
    assert_eq!((fc, yn, yk), (c, n, k), "descriptors disagree: {call:?}");
    let nhwc = call.layout == Layout::Nhwc;
    let xi = |b, ch, y, xx| {
        if nhwc {
            ((b * h + y) * w + xx) * c + ch
        } else {
            ((b * c + ch) * h + y) * w + xx
        }
    };
    let fi = |o, ch, i, j| {
        if nhwc {
            ((o * r + i) * s + j) * c + ch
        } else {
            ((o * c + ch) * r + i) * s + j
        }
    };
    let yi = |b, o, y, xx| {
        if nhwc {
            ((b * oh + y) * ow + xx) * k + o
        } else {
            ((b * k + o) * oh + y) * ow + xx
        }
    };
    for b in 0..n {
        for o in 0..k {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        for i in 0..r {
                            for j in 0..s {
                                let iy = (oy as i64) * call.stride[0] as i64
                                    - call.padding[0] as i64
                                    + (i as i64) * call.dilation[0] as i64;
                                let ix = (ox as i64) * call.stride[1] as i64
                                    - call.padding[1] as i64
                                    + (j as i64) * call.dilation[1] as i64;
                                if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                    continue;
                                }
                                tap(
                                    xi(b, ch, iy as usize, ix as usize),
                                    fi(o, ch, i, j),
                                    yi(b, o, oy, ox),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Elements of the tensors a call describes: `x`, the filter, `y`.
fn conv_lengths(call: &ConvCall) -> [usize; 3] {
    let len = |dims: [i32; 4]| dims.iter().map(|&d| d as usize).product();
    [len(call.x), len(call.filter), len(call.y)]
}

/// `cudnnConvolutionForward` replayed: a naive cross-correlation, f64 accumulation.
fn conv_by_call(call: &ConvCall, x: &[f32], filter: &[f32]) -> Vec<f32> {
    let [x_len, f_len, y_len] = conv_lengths(call);
    assert_eq!(x.len(), x_len, "input buffer vs descriptor");
    assert_eq!(filter.len(), f_len, "filter buffer vs descriptor");
    let mut y = vec![0.0f64; y_len];
    for_each_tap(call, |xi, fi, yi| y[yi] += x[xi] as f64 * filter[fi] as f64);
    y.into_iter().map(|v| v as f32).collect()
}

/// `cudnnConvolutionBackwardData` replayed: every output gradient sent back along the taps
/// that produced its output, `dx = W^T dy`, f64 accumulation.
fn conv_backward_data_by_call(call: &ConvCall, filter: &[f32], dy: &[f32]) -> Vec<f32> {
    let [x_len, f_len, y_len] = conv_lengths(call);
    assert_eq!(filter.len(), f_len, "filter buffer vs descriptor");
    assert_eq!(dy.len(), y_len, "output gradient vs descriptor");
    let mut dx = vec![0.0f64; x_len];
    for_each_tap(call, |xi, fi, yi| {
        dx[xi] += filter[fi] as f64 * dy[yi] as f64
    });
    dx.into_iter().map(|v| v as f32).collect()
}

/// `cudnnConvolutionBackwardFilter` replayed: `dW = dy x^T` summed over the batch, written in
/// the filter descriptor's order, f64 accumulation.
fn conv_backward_filter_by_call(call: &ConvCall, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let [x_len, f_len, y_len] = conv_lengths(call);
    assert_eq!(x.len(), x_len, "input buffer vs descriptor");
    assert_eq!(dy.len(), y_len, "output gradient vs descriptor");
    let mut dw = vec![0.0f64; f_len];
    for_each_tap(call, |xi, fi, yi| dw[fi] += x[xi] as f64 * dy[yi] as f64);
    dw.into_iter().map(|v| v as f32).collect()
}

/// A naive column-major GEMM exactly as cuBLAS reads its arguments: `C = op(A) op(B)`, `C` of
/// `ldc x n`, with `A` and `B` taken from the layer's `buffers` by the roles the call gives
/// them ([`GemmCall::operands`], as the layer does) and `C` the buffer `writes`. f64
/// accumulation. Panics where a buffer is shorter than the arguments imply, or the call writes
/// another buffer.
fn gemm_by_call(
    call: &GemmCall,
    buffers: &[(LinearBuffer, &[f32])],
    writes: LinearBuffer,
) -> Vec<f32> {
    assert_eq!(call.c, writes, "{call:?} writes another buffer");
    let given = [buffers, &[(writes, &[][..])]].concat();
    let (a, b, _) = call
        .operands(&given)
        .unwrap_or_else(|e| panic!("{call:?}: {e}"));
    let u = |v: i32| usize::try_from(v).expect("non-negative GEMM argument");
    let (m, n, k) = (u(call.m), u(call.n), u(call.k));
    let (lda, ldb, ldc) = (u(call.lda), u(call.ldb), u(call.ldc));
    // The leading dimensions cuBLAS requires, and the buffer sizes they imply.
    let (a_rows, a_cols) = if call.transa { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if call.transb { (n, k) } else { (k, n) };
    assert!(
        lda >= a_rows && ldb >= b_rows && ldc >= m,
        "leading dimensions too small: {call:?}"
    );
    assert!(
        a.len() >= lda * (a_cols - 1) + a_rows,
        "A is shorter than {call:?} reads"
    );
    assert!(
        b.len() >= ldb * (b_cols - 1) + b_rows,
        "B is shorter than {call:?} reads"
    );
    let op_a = |i: usize, l: usize| {
        if call.transa {
            a[l + i * lda]
        } else {
            a[i + l * lda]
        }
    };
    let op_b = |l: usize, j: usize| {
        if call.transb {
            b[j + l * ldb]
        } else {
            b[l + j * ldb]
        }
    };
    let mut c = vec![f32::NAN; ldc * n];
    for j in 0..n {
        for i in 0..m {
            let acc: f64 = (0..k).map(|l| op_a(i, l) as f64 * op_b(l, j) as f64).sum();
            c[i + j * ldc] = acc as f32;
        }
    }
    c
}

/// max |got - want| / max |want|, infinite on NaN.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    common::rel_max_error(got, &want64)
}

struct ConvCase {
    name: &'static str,
    input: [usize; 4],
    out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

const CONV_CASES: &[ConvCase] = &[
    // AlexNet's conv1 geometry on a small image (11x11, stride 4, pad 2), batch 3.
    ConvCase {
        name: "conv1-like",
        input: [3, 3, 31, 27],
        out: 5,
        kernel: 11,
        stride: 4,
        padding: 2,
    },
    // conv2 (5x5, pad 2) and conv3-5 (3x3, pad 1) geometries, batch 1, odd sizes.
    ConvCase {
        name: "conv2-like",
        input: [1, 7, 9, 13],
        out: 6,
        kernel: 5,
        stride: 1,
        padding: 2,
    },
    ConvCase {
        name: "conv3-like",
        input: [2, 5, 6, 5],
        out: 4,
        kernel: 3,
        stride: 1,
        padding: 1,
    },
    // Stride larger than the window, no padding.
    ConvCase {
        name: "strided",
        input: [2, 4, 11, 10],
        out: 3,
        kernel: 2,
        stride: 3,
        padding: 0,
    },
];

/// A case as both sides see it: the input and weights, the CPU layer (zero bias) and the GPU
/// layer's call in `layout` with the input padded to `padded_channels`.
struct ConvSetup {
    x: Array4<f32>,
    weight: Array4<f32>,
    cpu: Conv2d,
    call: ConvCall,
    in_channels: usize,
    what: String,
}

fn conv_setup(
    case: &ConvCase,
    layout: Layout,
    padded_channels: Option<usize>,
    seed: u64,
) -> ConvSetup {
    let [n, c, h, w] = case.input;
    let x = random((n, c, h, w), seed, 1.0);
    let weight = random((case.out, c, case.kernel, case.kernel), seed + 1, 0.5);
    let cpu = Conv2d::new(
        weight.view(),
        &Array1::zeros(case.out),
        case.stride,
        case.padding,
    )
    .unwrap();
    let in_channels = padded_channels.unwrap_or(c);
    let call = ConvOptions {
        in_channels: padded_channels,
        ..ConvOptions::new(case.stride, case.padding, layout)
    }
    .call(case.out, in_channels, case.kernel, [n, h, w])
    .unwrap();
    let what = format!("{} {layout:?} in_channels={in_channels}", case.name);
    ConvSetup {
        x,
        weight,
        cpu,
        call,
        in_channels,
        what,
    }
}

/// `a` `[n, c, h, w]` with zero channels appended up to `in_channels`, as the layer holds it.
fn pad_channels(a: &Array4<f32>, in_channels: usize) -> Array4<f32> {
    let (n, c, h, w) = a.dim();
    let mut padded = Array4::<f32>::zeros((n, in_channels, h, w));
    padded.slice_mut(s![.., ..c, .., ..]).assign(a);
    padded
}

/// `check` on every case in both layouts, and in NHWC with the input padded to 8 channels (the
/// fp16 path, zero filters for the extra channels) where the case has at most 8; seeds from
/// `seed`.
fn each_conv_variant(seed: u64, check: impl Fn(&ConvCase, Layout, Option<usize>, u64)) {
    for (i, case) in CONV_CASES.iter().enumerate() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            check(case, layout, None, seed + i as u64);
        }
        if case.input[1] <= 8 {
            check(case, Layout::Nhwc, Some(8), seed + 100 + i as u64);
        }
    }
}

fn conv_case(case: &ConvCase, layout: Layout, padded_channels: Option<usize>, seed: u64) {
    let setup = conv_setup(case, layout, padded_channels, seed);
    let (call, what) = (&setup.call, &setup.what);
    let want = setup.cpu.forward(setup.x.view()).unwrap();
    let [n, ..] = case.input;
    assert_eq!(
        call.y.map(|v| v as usize),
        [n, case.out, want.dim().2, want.dim().3],
        "{what}: output descriptor"
    );
    let filter = pack_conv_weights(setup.weight.view(), setup.in_channels, layout).unwrap();
    let padded = pad_channels(&setup.x, setup.in_channels);
    let y = conv_by_call(call, &physical(&padded, layout), &filter);
    let err = rel_err(&y, &physical(&want, layout));
    eprintln!("{what}: relative error {err:.2e}");
    assert!(err <= 1e-5, "{what}: relative error {err:e}");
}

/// Both backward calls of `case` replayed against the CPU layer's backward: the input gradient
/// in the layout's order (zero for padded channels), the filter gradient unpacked to OIHW (and
/// exactly zero for padded channels, whose inputs are zero: the update leaves them alone).
fn conv_backward_case(case: &ConvCase, layout: Layout, padded_channels: Option<usize>, seed: u64) {
    let setup = conv_setup(case, layout, padded_channels, seed);
    let (call, in_channels) = (&setup.call, setup.in_channels);
    let what = format!("{} backward", setup.what);
    let (x, cpu) = (&setup.x, &setup.cpu);
    let dy = random(cpu.forward(x.view()).unwrap().dim(), seed + 2, 1.0);
    let want = cpu
        .backward(x.view(), dy.view(), InputGradient::Compute)
        .unwrap();
    let want_dx = want.input.expect("input gradient computed");
    let pad = |a: &Array4<f32>| pad_channels(a, in_channels);
    let filter = pack_conv_weights(setup.weight.view(), in_channels, layout).unwrap();
    let dy_stored = physical(&dy, layout);

    let dx = conv_backward_data_by_call(call, &filter, &dy_stored);
    let err = rel_err(&dx, &physical(&pad(&want_dx), layout));
    eprintln!("{what}: input gradient relative error {err:.2e}");
    assert!(err <= 1e-5, "{what}: input gradient relative error {err:e}");

    let dw = conv_backward_filter_by_call(call, &physical(&pad(x), layout), &dy_stored);
    let dims = [case.out, case.input[1], case.kernel];
    let got = unpack_conv_weights(&dw, dims, in_channels, layout).unwrap();
    let err = rel_err(got.as_slice().unwrap(), want.weight.as_slice().unwrap());
    eprintln!("{what}: filter gradient relative error {err:.2e}");
    assert!(
        err <= 1e-5,
        "{what}: filter gradient relative error {err:e}"
    );
    // Everything outside the real channels is exactly zero.
    let real = pack_conv_weights(got.view(), in_channels, layout).unwrap();
    for (i, (&packed, &kept)) in dw.iter().zip(&real).enumerate() {
        if kept == 0.0 {
            assert_eq!(packed, 0.0, "{what}: padded filter gradient {i}");
        }
    }
}

#[test]
fn convolution_backward_calls_reproduce_the_cpu_layer_in_both_layouts() {
    each_conv_variant(500, conv_backward_case);
}

#[test]
fn unpacking_a_filter_inverts_packing() {
    let weight = random((3, 5, 2, 2), 700, 1.0);
    for (layout, in_channels) in [(Layout::Nchw, 5), (Layout::Nhwc, 5), (Layout::Nhwc, 8)] {
        let packed = pack_conv_weights(weight.view(), in_channels, layout).unwrap();
        let back = unpack_conv_weights(&packed, [3, 5, 2], in_channels, layout).unwrap();
        assert_eq!(back, weight, "{layout:?} {in_channels}");
    }
    assert!(unpack_conv_weights(&[0.0; 10], [3, 5, 2], 5, Layout::Nchw).is_err());
    assert!(unpack_conv_weights(&[0.0; 60], [3, 5, 2], 4, Layout::Nchw).is_err());
}

#[test]
fn convolution_calls_reproduce_the_cpu_layer_in_both_layouts() {
    each_conv_variant(100, conv_case);
}

#[test]
fn the_filter_layout_is_what_the_descriptor_says() {
    // One weight set to 1 at (o, c, i, j) must land where KCRS / KRSC put it.
    let (o, c, i, j) = (1, 2, 0, 1);
    let (r, s) = (2, 2);
    let mut weight = Array4::<f32>::zeros((2, 3, r, s));
    weight[[o, c, i, j]] = 1.0;
    let kcrs = pack_conv_weights(weight.view(), 3, Layout::Nchw).unwrap();
    assert_eq!(
        kcrs.iter().position(|&v| v == 1.0),
        Some(((o * 3 + c) * r + i) * s + j)
    );
    let krsc = pack_conv_weights(weight.view(), 8, Layout::Nhwc).unwrap();
    assert_eq!(krsc.len(), 2 * 8 * r * s);
    assert_eq!(
        krsc.iter().position(|&v| v == 1.0),
        Some(((o * r + i) * s + j) * 8 + c)
    );
    assert!(pack_conv_weights(weight.view(), 2, Layout::Nhwc).is_err());
}

#[test]
fn linear_calls_reproduce_the_cpu_layer() {
    for (i, &(rows, features, out)) in [(1, 9, 7), (3, 37, 5), (4, 256, 33)].iter().enumerate() {
        let x = random((rows, features), 300 + i as u64, 1.0);
        let weight = random((out, features), 310 + i as u64, 0.3);
        let want = Linear::new(weight.view(), &Array1::zeros(out))
            .unwrap()
            .forward(x.view())
            .unwrap();
        let call = GemmCall::linear(out, features, rows).unwrap();
        // A: the row-major [out, in] weight; B: the row-major [rows, in] input; C: the
        // row-major [rows, out] output, as the layer passes them.
        let c = gemm_by_call(
            &call,
            &[
                (Weight, weight.as_slice().unwrap()),
                (Input, x.as_slice().unwrap()),
            ],
            Output,
        );
        let got = Array2::from_shape_vec((rows, out), c).unwrap();
        let err = rel_err(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(
            err <= 1e-5,
            "linear {rows}x{features}->{out}: relative error {err:e}"
        );
    }
}

#[test]
fn linear_backward_calls_reproduce_the_cpu_layer() {
    for (i, &(rows, features, out)) in [(1, 9, 7), (3, 37, 5), (4, 256, 33)].iter().enumerate() {
        let x = random((rows, features), 800 + i as u64, 1.0);
        let weight = random((out, features), 810 + i as u64, 0.3);
        let dy = random((rows, out), 820 + i as u64, 1.0);
        let want = Linear::new(weight.view(), &Array1::zeros(out))
            .unwrap()
            .backward(x.view(), dy.view())
            .unwrap();
        let what = format!("linear backward {rows}x{features}->{out}");
        // A: the row-major weight, B: the row-major dy; C: row-major dx [rows, in].
        // Every buffer the layer has, so that a call naming the wrong one reads it.
        let buffers = [
            (Weight, weight.as_slice().unwrap()),
            (Input, x.as_slice().unwrap()),
            (OutputGrad, dy.as_slice().unwrap()),
        ];
        let call = GemmCall::linear_backward_input(out, features, rows).unwrap();
        let dx = gemm_by_call(&call, &buffers, InputGrad);
        let err = rel_err(&dx, want.input.as_slice().unwrap());
        assert!(err <= 1e-5, "{what}: input gradient relative error {err:e}");
        // A: the row-major input, B: the row-major dy; C: row-major dW [out, in].
        let call = GemmCall::linear_backward_weight(out, features, rows).unwrap();
        let dw = gemm_by_call(&call, &buffers, WeightGrad);
        let err = rel_err(&dw, want.weight.as_slice().unwrap());
        assert!(
            err <= 1e-5,
            "{what}: weight gradient relative error {err:e}"
        );
    }
}

#[test]
fn fc1_backward_on_nhwc_activations_gives_the_cpus_gradients() {
    // With fc1's columns permuted for NHWC activations, the input gradient comes out in NHWC
    // order and the weight gradient in the permuted column order.
    let (n, c, h, w, out) = (3, 5, 4, 3, 7);
    let activations = random((n, c, h, w), 830, 1.0);
    let weight = random((out, c * h * w), 831, 0.3);
    let dy = random((n, out), 832, 1.0);
    let nchw_rows = activations
        .clone()
        .into_shape_with_order((n, c * h * w))
        .unwrap();
    let want = Linear::new(weight.view(), &Array1::zeros(out))
        .unwrap()
        .backward(nchw_rows.view(), dy.view())
        .unwrap();
    let permuted = chw_columns_to_hwc(weight.view(), [c, h, w]).unwrap();
    let nhwc = physical(&activations, Layout::Nhwc);
    let buffers = [
        (Weight, permuted.as_slice().unwrap()),
        (Input, &nhwc[..]),
        (OutputGrad, dy.as_slice().unwrap()),
    ];
    let call = GemmCall::linear_backward_input(out, c * h * w, n).unwrap();
    let dx = gemm_by_call(&call, &buffers, InputGrad);
    let want_dx = want.input.into_shape_with_order((n, c, h, w)).unwrap();
    let err = rel_err(&dx, &physical(&want_dx, Layout::Nhwc));
    assert!(err <= 1e-5, "fc1 backward on NHWC: input gradient {err:e}");
    let call = GemmCall::linear_backward_weight(out, c * h * w, n).unwrap();
    let dw = gemm_by_call(&call, &buffers, WeightGrad);
    let want_dw = chw_columns_to_hwc(want.weight.view(), [c, h, w]).unwrap();
    let err = rel_err(&dw, want_dw.as_slice().unwrap());
    assert!(err <= 1e-5, "fc1 backward on NHWC: weight gradient {err:e}");
}

#[test]
fn fc1_on_nhwc_activations_gives_the_cpus_result() {
    // The fp16 path flattens NHWC activations in (H, W, C) order; fc1's columns are permuted at
    // load so that the GEMM still computes the CPU's (C, H, W) product.
    let (n, c, h, w, out) = (3, 5, 4, 3, 7);
    let activations = random((n, c, h, w), 400, 1.0);
    let weight = random((out, c * h * w), 401, 0.3);
    let nchw_rows = activations
        .clone()
        .into_shape_with_order((n, c * h * w))
        .unwrap();
    let want = Linear::new(weight.view(), &Array1::zeros(out))
        .unwrap()
        .forward(nchw_rows.view())
        .unwrap();
    let nhwc = physical(&activations, Layout::Nhwc); // n rows of (H, W, C)
    let permuted = chw_columns_to_hwc(weight.view(), [c, h, w]).unwrap();
    let call = GemmCall::linear(out, c * h * w, n).unwrap();
    let got = gemm_by_call(
        &call,
        &[(Weight, permuted.as_slice().unwrap()), (Input, &nhwc)],
        Output,
    );
    let err = rel_err(&got, want.as_slice().unwrap());
    assert!(err <= 1e-5, "fc1 on NHWC: relative error {err:e}");
    // Without the permutation the NHWC flatten gives another function.
    let unpermuted = gemm_by_call(
        &call,
        &[(Weight, weight.as_slice().unwrap()), (Input, &nhwc)],
        Output,
    );
    assert!(rel_err(&unpermuted, want.as_slice().unwrap()) > 1e-2);
}
