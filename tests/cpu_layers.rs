//! Every CPU layer against hand-computed small cases and a naive direct implementation (f64,
//! straight from the definition) on random inputs of odd sizes.

mod common;

use alexnet_cuda::config::{DropoutMode, LrnParams};
use alexnet_cuda::cpu::{keep_draw, relu_inplace, Conv2d, Dropout, Linear, Lrn, MaxPool2d};
use alexnet_cuda::postprocess::{softmax, top_k};
use common::formula_values;
use ndarray::{arr1, Array, Array1, Array2, Array4, ArrayView4, Dimension, ShapeBuilder};

fn random<Sh: ShapeBuilder>(shape: Sh, stream: u64) -> Array<f32, Sh::Dim> {
    let zeros = Array::<f32, _>::zeros(shape);
    Array::from_shape_vec(zeros.raw_dim(), formula_values(stream, zeros.len(), 1.0)).unwrap()
}

fn assert_close<D: Dimension>(got: &Array<f32, D>, want: &Array<f64, D>, tol: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let err = got.iter().zip(want.iter()).fold(0.0f64, |m, (g, w)| {
        if g.is_nan() {
            f64::INFINITY
        } else {
            m.max((*g as f64 - w).abs())
        }
    });
    assert!(
        err / scale <= tol,
        "{what}: relative error {:.3e} > {tol:e}",
        err / scale
    );
}

fn naive_conv(
    x: ArrayView4<f32>,
    w: &Array4<f32>,
    b: &Array1<f32>,
    stride: usize,
    pad: usize,
) -> Array4<f64> {
    let (n, c, h, wd) = x.dim();
    let (o, _, k, _) = w.dim();
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (wd + 2 * pad - k) / stride + 1;
    Array4::from_shape_fn((n, o, oh, ow), |(ni, oi, y, xo)| {
        let mut s = b[oi] as f64;
        for ci in 0..c {
            for ky in 0..k {
                for kx in 0..k {
                    let iy = (y * stride + ky) as isize - pad as isize;
                    let ix = (xo * stride + kx) as isize - pad as isize;
                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                        s += x[[ni, ci, iy as usize, ix as usize]] as f64
                            * w[[oi, ci, ky, kx]] as f64;
                    }
                }
            }
        }
        s
    })
}

#[test]
fn conv_hand_computed() {
    // 1 channel 3x3 input, 2x2 kernel of ones, stride 1, no padding: sums of 2x2 blocks + bias.
    let x = Array4::from_shape_vec((1, 1, 3, 3), (1..=9).map(|v| v as f32).collect()).unwrap();
    let w = Array4::from_elem((1, 1, 2, 2), 1.0f32);
    let conv = Conv2d::new(w.view(), &arr1(&[0.5]), 1, 0).unwrap();
    let y = conv.forward(x.view()).unwrap();
    assert_eq!(y.into_raw_vec_and_offset().0, vec![12.5, 16.5, 24.5, 28.5]);
    // Padding 1, stride 2, kernel 3 of ones: corner sums.
    let w3 = Array4::from_elem((1, 1, 3, 3), 1.0f32);
    let conv = Conv2d::new(w3.view(), &arr1(&[0.0]), 2, 1).unwrap();
    let y = conv.forward(x.view()).unwrap();
    assert_eq!(y.into_raw_vec_and_offset().0, vec![12.0, 16.0, 24.0, 28.0]);
}

#[test]
fn conv_matches_naive_on_odd_sizes() {
    // (n, c, h, w, o, k, stride, pad): odd sizes, strides and paddings, batches on both code paths
    // (fewer images than threads, and more).
    let cases = [
        (1, 3, 23, 19, 5, 11, 4, 2),
        (3, 4, 13, 13, 7, 5, 1, 2),
        (5, 2, 9, 11, 3, 3, 1, 1),
        (2, 3, 17, 15, 4, 3, 2, 0),
        (1, 1, 5, 5, 1, 5, 1, 0),
        (4, 6, 7, 9, 2, 1, 1, 0),
    ];
    for (i, &(n, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
        let x = random((n, c, h, w), 10 + i as u64);
        let wt = random((o, c, k, k), 20 + i as u64);
        let b = random(o, 30 + i as u64);
        let conv = Conv2d::new(wt.view(), &b, s, p).unwrap();
        let want = naive_conv(x.view(), &wt, &b, s, p);
        assert_close(
            &conv.forward(x.view()).unwrap(),
            &want,
            1e-5,
            &format!("conv case {i}"),
        );
        let relu = want.mapv(|v| v.max(0.0));
        assert_close(
            &conv.forward_relu(x.view()).unwrap(),
            &relu,
            1e-5,
            &format!("conv+relu case {i}"),
        );
    }
}

#[test]
fn conv_rejects_bad_shapes() {
    let w = random((4, 3, 3, 3), 1);
    let conv = Conv2d::new(w.view(), &Array1::zeros(4), 1, 0).unwrap();
    assert!(
        conv.forward(random((1, 2, 8, 8), 2).view()).is_err(),
        "wrong channels"
    );
    assert!(
        conv.forward(random((1, 3, 2, 8), 2).view()).is_err(),
        "kernel larger than input"
    );
    assert!(
        Conv2d::new(w.view(), &Array1::zeros(3), 1, 0).is_err(),
        "bias length"
    );
    assert!(
        Conv2d::new(w.view(), &Array1::zeros(4), 0, 0).is_err(),
        "zero stride"
    );
    let rect = random((4, 3, 3, 2), 1);
    assert!(
        Conv2d::new(rect.view(), &Array1::zeros(4), 1, 0).is_err(),
        "non-square kernel"
    );
}

fn naive_lrn(x: &Array4<f32>, p: LrnParams) -> Array4<f64> {
    // PyTorch's window: n/2 channels before, (n-1)/2 after (symmetric for odd n).
    let c = x.dim().1 as isize;
    let (before, after) = ((p.size / 2) as isize, ((p.size - 1) / 2) as isize);
    Array4::from_shape_fn(x.dim(), |(n, ch, y, xx)| {
        let mut s = 0.0f64;
        for j in (ch as isize - before).max(0)..=(ch as isize + after).min(c - 1) {
            let a = x[[n, j as usize, y, xx]] as f64;
            s += a * a;
        }
        x[[n, ch, y, xx]] as f64 / (p.k as f64 + p.alpha as f64 * s).powf(p.beta as f64)
    })
}

#[test]
fn lrn_matches_formula_including_channel_edges() {
    // Large activations so the alpha term matters; 7 channels so both edges clip the window.
    let x = random((2, 7, 5, 3), 40).mapv(|v| v * 60.0);
    let lrn = Lrn::new(LrnParams::PAPER).unwrap();
    assert_close(
        &lrn.forward(x.view()).unwrap(),
        &naive_lrn(&x, LrnParams::PAPER),
        1e-5,
        "paper LRN",
    );
    // An even window is asymmetric: this checks which side gets the extra channel.
    let even = LrnParams {
        size: 4,
        k: 1.0,
        alpha: 1e-3,
        beta: 0.75,
    };
    assert_close(
        &Lrn::new(even).unwrap().forward(x.view()).unwrap(),
        &naive_lrn(&x, even),
        1e-5,
        "even LRN",
    );
    let other = LrnParams {
        size: 3,
        k: 1.0,
        alpha: 1e-3,
        beta: 0.6,
    };
    assert_close(
        &Lrn::new(other).unwrap().forward(x.view()).unwrap(),
        &naive_lrn(&x, other),
        1e-5,
        "other LRN",
    );
}

#[test]
fn lrn_hand_computed_edge_channel() {
    // Channel 0 of [3, 4, 0, 0, 0] sums channels 0..=2: 9 + 16 = 25.
    let x = Array4::from_shape_vec((1, 5, 1, 1), vec![3.0, 4.0, 0.0, 0.0, 0.0]).unwrap();
    let y = Lrn::new(LrnParams::PAPER)
        .unwrap()
        .forward(x.view())
        .unwrap();
    let want0 = 3.0 / (2.0f64 + 1e-4 * 25.0).powf(0.75);
    assert!((y[[0, 0, 0, 0]] as f64 - want0).abs() < 1e-6);
    // Channel 4 sees channels 2..=4: all zero, and its own value is 0.
    assert_eq!(y[[0, 4, 0, 0]], 0.0);
    // Channel 2 sees 0..=4: 25.
    assert_eq!(y[[0, 2, 0, 0]], 0.0);
    let want1 = 4.0 / (2.0f64 + 1e-4 * 25.0).powf(0.75);
    assert!((y[[0, 1, 0, 0]] as f64 - want1).abs() < 1e-6);
    // PyTorch's LocalResponseNorm takes alpha * n.
    assert!((LrnParams::PAPER.pytorch_alpha() as f64 - 5e-4).abs() < 1e-9);
}

#[test]
fn overlapping_maxpool() {
    // 5x5 ramp, 3x3 stride 2: windows overlap by one row/column; output 2x2 = bottom-right corners.
    let x = Array4::from_shape_vec((1, 1, 5, 5), (0..25).map(|v| v as f32).collect()).unwrap();
    let y = MaxPool2d {
        kernel: 3,
        stride: 2,
    }
    .forward(x.view())
    .unwrap();
    assert_eq!(y.into_raw_vec_and_offset().0, vec![12.0, 14.0, 22.0, 24.0]);
    // A maximum inside the overlap shows up in every window that covers it.
    let mut z = Array4::zeros((1, 1, 5, 5));
    z[[0, 0, 2, 2]] = 7.0;
    let y = MaxPool2d {
        kernel: 3,
        stride: 2,
    }
    .forward(z.view())
    .unwrap();
    assert_eq!(y.into_raw_vec_and_offset().0, vec![7.0; 4]);
    // NaN propagates.
    z[[0, 0, 0, 0]] = f32::NAN;
    let y = MaxPool2d {
        kernel: 3,
        stride: 2,
    }
    .forward(z.view())
    .unwrap();
    assert!(y[[0, 0, 0, 0]].is_nan() && y[[0, 0, 1, 1]] == 7.0);
}

#[test]
fn maxpool_matches_naive() {
    for (i, &(n, c, h, w, k, s)) in [
        (2, 3, 13, 13, 3, 2),
        (1, 5, 27, 21, 3, 2),
        (3, 2, 8, 9, 2, 2),
        (1, 1, 7, 7, 3, 1),
    ]
    .iter()
    .enumerate()
    {
        let x = random((n, c, h, w), 50 + i as u64);
        let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
        let want = Array4::from_shape_fn((n, c, oh, ow), |(a, b, y, xx)| {
            let mut m = f64::NEG_INFINITY;
            for ky in 0..k {
                for kx in 0..k {
                    m = m.max(x[[a, b, y * s + ky, xx * s + kx]] as f64);
                }
            }
            m
        });
        let got = MaxPool2d {
            kernel: k,
            stride: s,
        }
        .forward(x.view())
        .unwrap();
        assert_close(&got, &want, 0.0, &format!("pool case {i}"));
    }
    assert!(MaxPool2d {
        kernel: 3,
        stride: 2
    }
    .forward(random((1, 1, 2, 5), 1).view())
    .is_err());
}

#[test]
fn linear_matches_naive() {
    for (i, &(n, inf, outf)) in [(1, 7, 3), (5, 33, 17), (16, 300, 129)].iter().enumerate() {
        let x = random((n, inf), 60 + i as u64);
        let w = random((outf, inf), 70 + i as u64);
        let b = random(outf, 80 + i as u64);
        let want = Array2::from_shape_fn((n, outf), |(r, o)| {
            b[o] as f64
                + (0..inf)
                    .map(|j| x[[r, j]] as f64 * w[[o, j]] as f64)
                    .sum::<f64>()
        });
        let lin = Linear::new(w.view(), &b).unwrap();
        assert_close(
            &lin.forward(x.view()).unwrap(),
            &want,
            1e-5,
            &format!("linear {i}"),
        );
        assert_close(
            &lin.forward_relu(x.view()).unwrap(),
            &want.mapv(|v| v.max(0.0)),
            1e-5,
            "linear+relu",
        );
        assert!(lin.forward(random((n, inf + 1), 1).view()).is_err());
    }
    // Hand-computed: [1, 2] . [[1, 1], [2, -1]]^T + [0.5, 0] = [3.5, 0].
    let lin = Linear::new(
        Array2::from_shape_vec((2, 2), vec![1.0, 1.0, 2.0, -1.0])
            .unwrap()
            .view(),
        &arr1(&[0.5, 0.0]),
    )
    .unwrap();
    let y = lin
        .forward(
            Array2::from_shape_vec((1, 2), vec![1.0, 2.0])
                .unwrap()
                .view(),
        )
        .unwrap();
    assert_eq!(y.into_raw_vec_and_offset().0, vec![3.5, 0.0]);
}

#[test]
fn relu_softmax_topk() {
    let mut x = arr1(&[-1.0f32, 0.0, 2.5, -0.0, f32::NAN]).into_dyn();
    relu_inplace(x.view_mut());
    assert_eq!(&x.as_slice().unwrap()[..4], &[0.0, 0.0, 2.5, 0.0]);
    assert!(x[4].is_nan());

    let logits =
        Array2::from_shape_vec((2, 3), vec![1.0f32, 2.0, 3.0, 1000.0, 1000.0, -1000.0]).unwrap();
    let p = softmax(logits.view());
    let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
    let s: f64 = e.iter().sum();
    for j in 0..3 {
        assert!((p[[0, j]] as f64 - e[j] / s).abs() < 1e-7);
    }
    // Large logits: no overflow; two equal maxima share the mass.
    assert!((p[[1, 0]] - 0.5).abs() < 1e-7 && (p[[1, 1]] - 0.5).abs() < 1e-7 && p[[1, 2]] == 0.0);

    let row = arr1(&[0.1f32, 0.7, 0.05, 0.7, 0.15]);
    assert_eq!(
        top_k(row.view(), 3).unwrap(),
        vec![(1, 0.7), (3, 0.7), (4, 0.15)]
    );
    assert_eq!(top_k(row.view(), 5).unwrap().len(), 5);
    assert!(top_k(row.view(), 0).is_err() && top_k(row.view(), 6).is_err());
    // NaN of either sign ranks first (a negative NaN is what x86 makes of inf - inf).
    let negative_nan = -f32::NAN;
    assert!(negative_nan.is_sign_negative());
    let with_nan = arr1(&[0.5f32, negative_nan, 0.9]);
    let top = top_k(with_nan.view(), 2).unwrap();
    assert_eq!(top[0].0, 1);
    assert!(top[0].1.is_nan());
    assert_eq!(top[1], (2, 0.9));
}

#[test]
fn dropout_statistics_and_modes() {
    let x = Array1::from_elem(200_000, 1.0f32).into_dyn();
    let inverted = Dropout::new(0.5, DropoutMode::Inverted).unwrap();
    let y = inverted.forward_train(x.view(), 42);
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
    // Binomial(200000, 0.5): 5 standard deviations is 0.0056.
    assert!((kept - 0.5).abs() < 0.0056, "kept fraction {kept}");
    assert!(
        y.iter().all(|&v| v == 0.0 || v == 2.0),
        "inverted scaling is 1/(1-p)"
    );
    // Same seed, same mask; another seed, another mask.
    assert_eq!(y, inverted.forward_train(x.view(), 42));
    assert_ne!(y, inverted.forward_train(x.view(), 43));
    // The mask is the documented counter-based draw.
    for i in [0usize, 1, 777, 199_999] {
        assert_eq!(y[i] != 0.0, keep_draw(42, i as u64) >= 1u32 << 31);
    }
    // Classic: no scaling in training, x(1-p) at inference; inverted: identity at inference.
    let classic = Dropout::new(0.5, DropoutMode::Classic).unwrap();
    assert!(classic
        .forward_train(x.view(), 1)
        .iter()
        .all(|&v| v == 0.0 || v == 1.0));
    assert!(classic.forward_eval(x.view()).iter().all(|&v| v == 0.5));
    assert_eq!(inverted.forward_eval(x.view()), x);
    // p = 0.25 keeps about 3/4 and scales by 4/3.
    let quarter = Dropout::new(0.25, DropoutMode::Inverted)
        .unwrap()
        .forward_train(x.view(), 7);
    let kept = quarter.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
    assert!((kept - 0.75).abs() < 0.005, "kept fraction {kept}");
    assert!(
        Dropout::new(1.0, DropoutMode::Inverted).is_err()
            && Dropout::new(-0.1, DropoutMode::Inverted).is_err()
    );
}
