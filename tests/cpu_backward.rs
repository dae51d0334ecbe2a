//! The CPU layers' backward passes against central finite differences of naive float64
//! forwards written here (independent of the code under test), on odd shapes: for a random
//! `g`, the gradient of `L(x) = sum(g * f(x))` with respect to `x` (and the parameters) must be
//! what each layer's `backward` returns, to 1e-4 of the largest gradient.

mod common;

use alexnet_cuda::config::{DropoutMode, LrnParams};
use alexnet_cuda::cpu::{
    relu_backward, softmax_cross_entropy, Conv2d, Dropout, InputGradient, Linear, Lrn, MaxPool2d,
};
use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};

/// `n` values in [-scale, scale], exactly representable in f32.
fn values(stream: u64, n: usize, scale: f64) -> Vec<f32> {
    common::formula_values(stream, n, scale)
}

/// Central differences of `loss` at `x` (step `h`, in f64).
fn numerical_grad(x: &[f64], h: f64, loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let up = loss(&probe);
            probe[i] = x[i] - h;
            let down = loss(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts `got` (f32) is `want` (f64) to `tol` of the largest `|want|`.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| ((g as f64 - w).abs() / scale, i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        worst <= tol,
        "{what}: element {at}: got {} want {} ({worst:.2e} of the largest gradient {scale:.3e})",
        got[at],
        want[at]
    );
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// --- naive float64 forwards --------------------------------------------------------------

fn lrn_f64(a: &[f64], [n, c, h, w]: [usize; 4], p: LrnParams) -> Vec<f64> {
    let plane = h * w;
    let (before, after) = (p.size / 2, (p.size - 1) / 2);
    let mut out = vec![0.0; a.len()];
    for img in 0..n {
        for ch in 0..c {
            for q in 0..plane {
                let at = |j: usize| a[(img * c + j) * plane + q];
                let lo = ch.saturating_sub(before);
                let hi = (ch + after).min(c - 1);
                let sum: f64 = (lo..=hi).map(|j| at(j) * at(j)).sum();
                let d = p.k as f64 + p.alpha as f64 * sum;
                out[(img * c + ch) * plane + q] = at(ch) / d.powf(p.beta as f64);
            }
        }
    }
    out
}

fn max_pool_f64(a: &[f64], [n, c, h, w]: [usize; 4], k: usize, s: usize) -> Vec<f64> {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    let mut out = Vec::with_capacity(n * c * oh * ow);
    for plane in a.chunks(h * w) {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = f64::NEG_INFINITY;
                for ky in 0..k {
                    for kx in 0..k {
                        m = m.max(plane[(oy * s + ky) * w + ox * s + kx]);
                    }
                }
                out.push(m);
            }
        }
    }
    out
}

/// Cross-correlation with zero padding, plus bias: `x` NCHW, `w` OIHW.
fn conv_f64(
    x: &[f64],
    w: &[f64],
    b: &[f64],
    [n, c, h, wd]: [usize; 4],
    [o, k, s, p]: [usize; 4],
) -> Vec<f64> {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    let mut out = Vec::with_capacity(n * o * oh * ow);
    for img in 0..n {
        for oc in 0..o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = b[oc];
                    for ic in 0..c {
                        for ki in 0..k {
                            for kj in 0..k {
                                let y = (oy * s + ki) as isize - p as isize;
                                let xx = (ox * s + kj) as isize - p as isize;
                                if y < 0 || xx < 0 || y >= h as isize || xx >= wd as isize {
                                    continue;
                                }
                                let xi = ((img * c + ic) * h + y as usize) * wd + xx as usize;
                                sum += x[xi] * w[((oc * c + ic) * k + ki) * k + kj];
                            }
                        }
                    }
                    out.push(sum);
                }
            }
        }
    }
    out
}

// --- the checks --------------------------------------------------------------------------

#[test]
fn lrn_backward_matches_finite_differences() {
    let shape = [2, 7, 3, 5];
    let len: usize = shape.iter().product();
    for (i, params) in [
        LrnParams::PAPER,
        // An even window, a non-default beta, larger alpha so the second term matters.
        LrnParams {
            size: 4,
            k: 1.0,
            alpha: 0.3,
            beta: 0.6,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let x = values(10 + i as u64, len, 3.0);
        let g = values(20 + i as u64, len, 1.0);
        let lrn = Lrn::new(params).unwrap();
        let x4 = Array4::from_shape_vec(shape, x.clone()).unwrap();
        let g4 = Array4::from_shape_vec(shape, g.clone()).unwrap();
        let got = lrn.backward(x4.view(), g4.view()).unwrap();
        let g64 = to_f64(&g);
        let want = numerical_grad(&to_f64(&x), 1e-6, |a| dot(&g64, &lrn_f64(a, shape, params)));
        assert_close(
            &format!("LRN {params:?}"),
            got.as_slice().unwrap(),
            &want,
            1e-5,
        );
    }
}

#[test]
fn conv_backward_matches_finite_differences() {
    // [n, c, h, w] and [out, kernel, stride, padding]: odd sizes, strides that skip input
    // columns, padding wider than a stride, batches below and above the thread count.
    for (i, (shape, [o, k, s, p])) in [
        ([3, 3, 9, 8], [4, 3, 2, 1]),
        ([1, 2, 11, 10], [3, 5, 4, 2]),
        ([5, 4, 6, 7], [2, 3, 1, 1]),
    ]
    .into_iter()
    .enumerate()
    {
        let [n, c, h, wd] = shape;
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
        let stream = 40 + 4 * i as u64;
        let x = values(stream, n * c * h * wd, 2.0);
        let w = values(stream + 1, o * c * k * k, 0.5);
        let b = values(stream + 2, o, 0.5);
        let g = values(stream + 3, n * o * oh * ow, 1.0);
        let conv = Conv2d::new(
            Array4::from_shape_vec([o, c, k, k], w.clone())
                .unwrap()
                .view(),
            &Array1::from(b.clone()),
            s,
            p,
        )
        .unwrap();
        let x4 = Array4::from_shape_vec(shape, x.clone()).unwrap();
        let g4 = Array4::from_shape_vec([n, o, oh, ow], g.clone()).unwrap();
        let got = conv
            .backward(x4.view(), g4.view(), InputGradient::Compute)
            .unwrap();
        let (x64, w64, b64, g64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&g));
        let geometry = [o, k, s, p];
        let what = |t: &str| format!("conv {shape:?} {geometry:?}: {t}");
        let want_x = numerical_grad(&x64, 1e-4, |a| {
            dot(&g64, &conv_f64(a, &w64, &b64, shape, geometry))
        });
        let input = got.input.as_ref().expect("input gradient was asked for");
        assert_close(&what("input"), input.as_slice().unwrap(), &want_x, 1e-5);
        let want_w = numerical_grad(&w64, 1e-4, |a| {
            dot(&g64, &conv_f64(&x64, a, &b64, shape, geometry))
        });
        assert_close(
            &what("weight"),
            got.weight.as_slice().unwrap(),
            &want_w,
            1e-5,
        );
        let want_b = numerical_grad(&b64, 1e-4, |a| {
            dot(&g64, &conv_f64(&x64, &w64, a, shape, geometry))
        });
        assert_close(&what("bias"), got.bias.as_slice().unwrap(), &want_b, 1e-5);

        // Skipping the input's gradient leaves the parameters' gradients exactly as they were.
        let params_only = conv
            .backward(x4.view(), g4.view(), InputGradient::Skip)
            .unwrap();
        assert!(params_only.input.is_none());
        assert_eq!(params_only.weight, got.weight);
        assert_eq!(params_only.bias, got.bias);
    }
}

#[test]
fn conv_backward_rejects_a_gradient_of_the_wrong_shape() {
    let conv = Conv2d::new(
        Array4::<f32>::zeros([2, 3, 3, 3]).view(),
        &Array1::zeros(2),
        1,
        0,
    )
    .unwrap();
    let x = Array4::<f32>::zeros([1, 3, 5, 5]);
    let wrong = Array4::<f32>::zeros([1, 2, 4, 3]);
    let err = conv
        .backward(x.view(), wrong.view(), InputGradient::Compute)
        .unwrap_err();
    assert!(err.to_string().contains("[1, 2, 3, 3]"), "{err}");
}

/// `pool`'s backward for an NCHW input `x` of `shape` and its output's gradient `g`.
fn pool_backward(pool: &MaxPool2d, shape: [usize; 4], x: &[f32], g: &[f32]) -> Vec<f32> {
    let (oh, ow) = pool.output_size(shape[2], shape[3]).unwrap();
    pool.backward(
        Array4::from_shape_vec(shape, x.to_vec()).unwrap().view(),
        Array4::from_shape_vec((shape[0], shape[1], oh, ow), g.to_vec())
            .unwrap()
            .view(),
    )
    .unwrap()
    .into_raw_vec_and_offset()
    .0
}

#[test]
fn max_pool_backward_routes_to_the_maxima_and_adds_overlaps() {
    let shape = [2, 3, 9, 8];
    let len: usize = shape.iter().product();
    let x = values(30, len, 5.0);
    let pool = MaxPool2d {
        kernel: 3,
        stride: 2,
    };
    let (oh, ow) = pool.output_size(9, 8).unwrap();
    let g = values(31, 2 * 3 * oh * ow, 1.0);
    let got = pool_backward(&pool, shape, &x, &g);
    let g64 = to_f64(&g);
    let want = numerical_grad(&to_f64(&x), 1e-7, |a| {
        dot(&g64, &max_pool_f64(a, shape, 3, 2))
    });
    assert_close("max-pool", &got, &want, 1e-6);
    // Overlapping windows: some input received two outputs' gradients.
    let shared = (0..len).any(|i| {
        let sum = got[i];
        sum != 0.0 && !g.contains(&sum)
    });
    assert!(shared, "no input collected the gradient of two windows");

    // Ties go to the first element of the window in row-major order, as in PyTorch.
    let flat = Array4::<f32>::zeros((1, 1, 3, 3));
    let one = Array4::from_elem((1, 1, 1, 1), 1.0f32);
    let tied = pool.backward(flat.view(), one.view()).unwrap();
    assert_eq!(tied[[0, 0, 0, 0]], 1.0);
    assert_eq!(tied.sum(), 1.0);
}

/// Where a naive scan of each window sends its gradient: in row-major window order, a strictly
/// larger value or any NaN takes over (PyTorch's CPU rule: ties to the first maximum, NaNs to
/// the last NaN).
fn max_pool_backward_naive(
    x: &[f32],
    g: &[f32],
    [n, c, h, w]: [usize; 4],
    k: usize,
    s: usize,
) -> Vec<f32> {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    let mut dx = vec![0.0f32; x.len()];
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best: Option<(usize, f32)> = None;
                for ky in 0..k {
                    for kx in 0..k {
                        let at = plane * h * w + (oy * s + ky) * w + ox * s + kx;
                        let v = x[at];
                        let takes = match best {
                            None => true,
                            Some((_, b)) => v > b || v.is_nan(),
                        };
                        if takes {
                            best = Some((at, v));
                        }
                    }
                }
                let (at, _) = best.expect("a window has elements");
                dx[at] += g[(plane * oh + oy) * ow + ox];
            }
        }
    }
    dx
}

#[test]
fn max_pool_backward_routes_ties_nans_and_infinities_like_a_naive_scan() {
    // Few distinct values (many ties in a window), NaNs and infinities of both signs, windows
    // of several sizes and strides (overlapping, touching, gapped), odd planes.
    let palette = [
        -1.0,
        0.0,
        0.5,
        2.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
    ];
    for (case, (k, s, h, w)) in [
        (3, 2, 13, 11),
        (2, 2, 8, 9),
        (3, 1, 7, 6),
        (2, 3, 11, 10),
        (1, 1, 4, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let shape = [2, 3, h, w];
        let len: usize = shape.iter().product();
        // Mostly ties and ordinary values; a NaN or infinity in about one element in eight.
        let picks = values(60 + case as u64, len, 1.0);
        let x: Vec<f32> = picks
            .iter()
            .map(|&p| {
                let i = ((p + 1.0) * 31.9) as usize;
                if i % 8 < 4 {
                    palette[i % 4]
                } else if i % 16 == 4 {
                    palette[4 + i / 16 % 4]
                } else {
                    palette[i % 3]
                }
            })
            .collect();
        assert!(x.iter().any(|v| v.is_nan()) && x.iter().any(|v| v.is_infinite()));
        let pool = MaxPool2d {
            kernel: k,
            stride: s,
        };
        let (oh, ow) = pool.output_size(h, w).unwrap();
        let g = values(70 + case as u64, 2 * 3 * oh * ow, 1.0);
        let got = pool_backward(&pool, shape, &x, &g);
        let want = max_pool_backward_naive(&x, &g, shape, k, s);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "k {k} s {s}: element {i}: got {a}, a naive scan gives {b}"
            );
        }
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let (n, inputs, outputs) = (3, 7, 5);
    let w = values(40, outputs * inputs, 1.0);
    let b = values(41, outputs, 1.0);
    let x = values(42, n * inputs, 2.0);
    let g = values(43, n * outputs, 1.0);
    let layer = Linear::new(
        Array2::from_shape_vec((outputs, inputs), w.clone())
            .unwrap()
            .view(),
        &Array1::from(b.clone()),
    )
    .unwrap();
    let got = layer
        .backward(
            Array2::from_shape_vec((n, inputs), x.clone())
                .unwrap()
                .view(),
            Array2::from_shape_vec((n, outputs), g.clone())
                .unwrap()
                .view(),
        )
        .unwrap();
    let g64 = to_f64(&g);
    // y[r][o] = b[o] + sum_i x[r][i] w[o][i]
    let forward = |x: &[f64], w: &[f64], b: &[f64]| -> Vec<f64> {
        (0..n)
            .flat_map(|r| {
                (0..outputs).map(move |o| {
                    b[o] + (0..inputs)
                        .map(|i| x[r * inputs + i] * w[o * inputs + i])
                        .sum::<f64>()
                })
            })
            .collect()
    };
    let (x64, w64, b64) = (to_f64(&x), to_f64(&w), to_f64(&b));
    let dx = numerical_grad(&x64, 1e-6, |x| dot(&g64, &forward(x, &w64, &b64)));
    let dw = numerical_grad(&w64, 1e-6, |w| dot(&g64, &forward(&x64, w, &b64)));
    let db = numerical_grad(&b64, 1e-6, |b| dot(&g64, &forward(&x64, &w64, b)));
    assert_close("linear dx", got.input.as_slice().unwrap(), &dx, 1e-5);
    assert_close("linear dW", got.weight.as_slice().unwrap(), &dw, 1e-5);
    assert_close("linear db", got.bias.as_slice().unwrap(), &db, 1e-5);

    let wrong = layer.backward(
        Array2::<f32>::zeros((n, inputs)).view(),
        Array2::<f32>::zeros((n + 1, outputs)).view(),
    );
    assert!(wrong.is_err());
}

#[test]
fn relu_backward_passes_the_gradient_where_the_output_is_positive() {
    let output = ArrayD::from_shape_vec(IxDyn(&[5]), vec![0.0, 2.0, f32::NAN, 1e-30, 3.0]).unwrap();
    let grad = ArrayD::from_shape_vec(IxDyn(&[5]), vec![1.0, 2.0, 3.0, 4.0, -5.0]).unwrap();
    let got = relu_backward(output.view(), grad.view()).unwrap();
    assert_eq!(got.as_slice().unwrap(), &[0.0, 2.0, 0.0, 4.0, -5.0]);
    let other = ArrayD::<f32>::zeros(IxDyn(&[4]));
    assert!(relu_backward(output.view(), other.view()).is_err());
}

#[test]
fn dropout_backward_uses_the_forward_mask() {
    for mode in [DropoutMode::Inverted, DropoutMode::Classic] {
        let dropout = Dropout::new(0.5, mode).unwrap();
        let ones = ArrayD::from_elem(IxDyn(&[4, 33]), 1.0f32);
        let kept = dropout.forward_train(ones.view(), 77);
        let g = ArrayD::from_shape_vec(IxDyn(&[4, 33]), values(50, 132, 1.0)).unwrap();
        let got = dropout.backward_train(g.view(), 77);
        let dropped = kept.iter().filter(|&&k| k == 0.0).count();
        assert!(dropped > 30 && dropped < 102, "{dropped} of 132 dropped");
        // d(x * mask * scale)/dx = mask * scale, and `kept` is exactly mask * scale.
        for ((&d, &k), &gv) in got.iter().zip(&kept).zip(&g) {
            assert_eq!(d, gv * k, "{mode:?}");
        }
    }
}

#[test]
fn cross_entropy_matches_its_definition_and_finite_differences() {
    let (n, classes) = (4, 11);
    let z = values(60, n * classes, 4.0);
    let labels = [3usize, 0, 10, 3];
    let out = softmax_cross_entropy(
        Array2::from_shape_vec((n, classes), z.clone())
            .unwrap()
            .view(),
        &labels,
    )
    .unwrap();
    let loss = |z: &[f64]| -> f64 {
        z.chunks(classes)
            .zip(&labels)
            .map(|(row, &l)| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[l])
            .sum::<f64>()
            / n as f64
    };
    let z64 = to_f64(&z);
    assert!(
        (out.loss as f64 - loss(&z64)).abs() < 1e-6 * loss(&z64).abs().max(1.0),
        "{} vs {}",
        out.loss,
        loss(&z64)
    );
    let want = numerical_grad(&z64, 1e-6, loss);
    assert_close("cross-entropy", out.grad.as_slice().unwrap(), &want, 1e-5);

    let logits = Array2::<f32>::zeros((2, 3));
    assert!(softmax_cross_entropy(logits.view(), &[0]).is_err());
    assert!(softmax_cross_entropy(logits.view(), &[0, 3]).is_err());
}
