//! A few tiny computations run when a [`Gpu`] is opened, in each precision the models use, so
//! that a broken install (a cuDNN engine sub-library missing, a cuBLAS that cannot run on this
//! card, kernels the driver cannot load) is [`Error::DeviceUnavailable`] at open — where
//! `--device auto` can still fall back to the CPU — instead of an error inside the first forward.
//! Each result is checked against the CPU layer, so a library that runs but computes garbage
//! is caught too. Costs a few milliseconds (plus cuDNN's algorithm search on these shapes).
//! bf16's forward is tested when a bf16 model or trainer is built, and the backward passes
//! when a trainer is, in its precision and layout.

use cudarc::driver::{CudaSlice, CudaViewMut};
use half::{bf16, f16};
use ndarray::{Array, Array1, Array2, Array4, ArrayBase, ArrayViewD, Data, Dimension, StrideShape};

use super::device::{driver_err, Gpu};
use super::dtype::GpuFloat;
use super::ops::{unpack_conv_weights, Conv2dGpu, ConvOptions, LinearGpu};
use super::tensor::{GpuTensor, Layout};
use crate::cpu::{Conv2d, Conv2dGrads, InputGradient, Linear, LinearGrads};
use crate::error::{Error, Result};

/// Runs every check; the first failure is `DeviceUnavailable` naming the library and step,
/// except running out of memory (another process holding the GPU's memory is no broken
/// install), which stays [`Error::OutOfMemory`], and the self-test's own mistakes (see
/// [`fail`]).
pub(super) fn run(gpu: &Gpu) -> Result<()> {
    conv::<f32>(gpu, ConvOptions::new(1, 1, Layout::Nchw))
        .map_err(|e| fail("cuDNN's fp32 convolution", e))?;
    conv::<f16>(gpu, ConvOptions::new(1, 1, Layout::Nhwc))
        .map_err(|e| fail("cuDNN's fp16 NHWC convolution", e))?;
    linear::<f32>(gpu).map_err(|e| fail("cuBLAS's fp32 GEMM", e))?;
    linear::<f16>(gpu).map_err(|e| fail("cuBLAS's fp16 GEMM", e))?;
    gpu.synchronize().map_err(|e| fail("the device", e))
}

/// bf16 needs the tensor cores and library kernels of compute capability 8.0 (Ampere, 2020)
/// or newer: an older GPU is [`Error::DeviceUnavailable`] (so `--device auto` falls back to
/// the CPU, which computes bf16 too), not a failure deep inside cuDNN. So is a cuDNN or cuBLAS
/// whose bf16 convolution or GEMM fails the self-test (as fp32's and fp16's do at open).
pub(super) fn check_bf16_capable(gpu: &Gpu) -> Result<()> {
    bf16_capable(gpu.name(), gpu.compute_capability())?;
    run_bf16(gpu)
}

fn bf16_capable(name: &str, (major, minor): (i32, i32)) -> Result<()> {
    if major >= 8 {
        return Ok(());
    }
    Err(Error::DeviceUnavailable(format!(
        "{name} has compute capability {major}.{minor}; bf16 needs 8.0 (Ampere) or newer: use fp16 \
         on this GPU (inference or training), or bf16 inference on the CPU"
    )))
}

/// bf16's checks, as [`run`]'s: run when a bf16 model is built (on compute capability 8.0 and
/// newer; not at every open, which a pre-Ampere GPU must pass for the other precisions).
fn run_bf16(gpu: &Gpu) -> Result<()> {
    conv::<bf16>(gpu, ConvOptions::new(1, 1, Layout::Nhwc))
        .map_err(|e| fail("cuDNN's bf16 NHWC convolution", e))?;
    linear::<bf16>(gpu).map_err(|e| fail("cuBLAS's bf16 GEMM", e))?;
    gpu.synchronize().map_err(|e| fail("the device", e))
}

/// The passes a [`super::CudaTrainer`] runs, in its storage type `T` and with its
/// convolutions' options (layout, TF32, GEMM-only, deterministic: `checks.conv`): cuDNN's
/// convolution forward and, where a convolution trains, backward (filter and input) and
/// cuBLAS's two backward GEMMs (its forward GEMM was tested at open), each checked against the
/// CPU as [`run`] checks the forward. Run when a trainer is built, so that a library without
/// these kernels for this precision and layout (an install that carries only the inference
/// engines, a cuDNN without bf16 backward) is [`Error::DeviceUnavailable`] there (`train
/// --device auto` then trains on the CPU) instead of an error inside the first step.
pub(super) fn check_training<T: GpuFloat>(gpu: &Gpu, checks: TrainingChecks) -> Result<()> {
    let math = checks.conv;
    let dtype = format!("{:?}", T::DTYPE).to_lowercase();
    let layout = format!("{:?}", math.layout).to_uppercase();
    // The forward too: the open-time test runs fp16 and bf16 in NHWC only, a trainer may be NCHW.
    conv::<T>(gpu, math).map_err(|e| fail(&format!("cuDNN's {dtype} {layout} convolution"), e))?;
    if checks.conv_backward {
        conv_backward::<T>(gpu, math)
            .map_err(|e| fail(&format!("cuDNN's {dtype} {layout} convolution backward"), e))?;
    }
    linear_backward::<T>(gpu, math.allow_tf32)
        .map_err(|e| fail(&format!("cuBLAS's {dtype} backward GEMMs"), e))?;
    gpu.synchronize().map_err(|e| fail("the device", e))
}

/// What [`check_training`] tests.
#[derive(Clone, Copy, Debug)]
pub(super) struct TrainingChecks {
    /// The trainer's convolutions' layout and algorithm rules (stride, padding and channels
    /// are the test's own).
    pub conv: ConvOptions,
    /// Whether any convolution trains, so that its backward runs (with every convolution
    /// frozen, only the forward does).
    pub conv_backward: bool,
}

/// A failed check as `DeviceUnavailable` naming `what`, except running out of memory and a
/// mistake of the self-test's own (an argument or shape our code refused, never a library's
/// verdict): those stay what they are, so that `--device auto` does not fall back to the CPU
/// over a bug that says nothing of the install.
fn fail(what: &str, e: Error) -> Error {
    match e {
        kept @ (Error::OutOfMemory { .. } | Error::Invalid { .. } | Error::Shape { .. }) => kept,
        e => Error::DeviceUnavailable(format!(
            "the GPU opened, but {what} failed its self-test: {e}. Reinstall the library \
             named (see README, \"GPU set-up\"), or run on the CPU"
        )),
    }
}

/// Small values with a pattern (no two equal neighbours), exact in f16 and bf16.
fn pattern(len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + 3) % 17) as f32 / 16.0 * scale - scale / 2.0)
        .collect()
}

/// `got` within `tolerance` of the largest value of `want`, or an error saying how far off.
fn check(what: &str, got: &[f32], want: &[f32], tolerance: f32) -> Result<()> {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let error = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0f32, f32::max);
    if got.len() == want.len() && error <= tolerance * scale {
        Ok(())
    } else {
        Err(Error::cuda(
            what,
            format!(
                "wrong result: relative error {} (at most {tolerance})",
                error / scale
            ),
        ))
    }
}

/// `values` as an array of `shape`.
fn shaped<D: Dimension>(
    shape: impl Into<StrideShape<D>>,
    values: Vec<f32>,
) -> Result<Array<f32, D>> {
    Array::from_shape_vec(shape, values).map_err(|e| Error::invalid("self-test", e.to_string()))
}

/// An array's values in memory order, as [`check`] compares them.
fn values<S: Data<Elem = f32>, D: Dimension>(array: &ArrayBase<S, D>) -> Vec<f32> {
    array.iter().copied().collect()
}

/// A device buffer's values, widened to f32.
fn download<T: GpuFloat>(gpu: &Gpu, buffer: &CudaSlice<T>) -> Result<Vec<f32>> {
    let values = gpu
        .stream()
        .clone_dtoh(buffer)
        .map_err(driver_err("download a self-test result"))?;
    Ok(values.into_iter().map(T::to_f32).collect())
}

/// A zeroed device buffer of `len` values.
fn zeros<T: GpuFloat>(gpu: &Gpu, len: usize) -> Result<CudaSlice<T>> {
    gpu.stream()
        .alloc_zeros::<T>(len)
        .map_err(driver_err("allocate a self-test buffer"))
}

/// The test convolution's sizes: one 8-channel 8x8 image (tensor-core friendly), 8 filters of
/// 3x3, stride 1, padding 1.
const CONV: (usize, usize, usize, usize) = (8, 8, 8, 3);

/// `math`'s layout and algorithm rules with the test convolution's stride, padding and
/// channels.
fn test_conv(math: ConvOptions) -> ConvOptions {
    ConvOptions {
        stride: 1,
        padding: 1,
        in_channels: None,
        ..math
    }
}

/// The test convolution's input, weights and bias.
fn conv_operands() -> Result<(Array4<f32>, Array4<f32>, Array1<f32>)> {
    let (c, side, out, k) = CONV;
    Ok((
        shaped((1, c, side, side), pattern(c * side * side, 2.0))?,
        shaped((out, c, k, k), pattern(out * c * k * k, 0.5))?,
        Array1::from(pattern(out, 0.25)),
    ))
}

/// An output gradient with a pattern for the test convolution, and the CPU's gradients for it.
fn conv_gradients() -> Result<(Array4<f32>, Conv2dGrads)> {
    let (_, side, out, _) = CONV;
    let (x, w, b) = conv_operands()?;
    let dy = shaped((1, out, side, side), pattern(out * side * side, 1.0))?;
    let want =
        Conv2d::new(w.view(), &b, 1, 1)?.backward(x.view(), dy.view(), InputGradient::Compute)?;
    Ok((dy, want))
}

/// The test convolution with bias + ReLU, with `options`' layout and algorithm rules (its stride
/// and padding 1, its input channels the weights').
fn conv<T: GpuFloat>(gpu: &Gpu, options: ConvOptions) -> Result<()> {
    let (_, side, out, _) = CONV;
    let (x, w, b) = conv_operands()?;
    let want = Conv2d::new(w.view(), &b, 1, 1)?.forward_relu(x.view())?;
    let layout = options.layout;
    let mut layer = Conv2dGpu::<T>::new(gpu, w.view(), b.view(), test_conv(options))?;
    let input = GpuTensor::<T>::from_host(gpu, x.view().into_dyn(), layout)?;
    let mut output = GpuTensor::<T>::zeros(gpu, &[1, out, side, side], layout)?;
    layer.forward(gpu, &input, &mut output, true)?;
    check(
        "test convolution",
        &values(&output.to_host(gpu)?),
        &values(&want),
        1e-2,
    )
}

/// The test convolution's gradients (input, filter and bias) for an output gradient with a
/// pattern, with `math`'s layout and algorithm rules.
fn conv_backward<T: GpuFloat>(gpu: &Gpu, math: ConvOptions) -> Result<()> {
    let (c, _, out, k) = CONV;
    let (x, w, b) = conv_operands()?;
    let (dy, want) = conv_gradients()?;
    let mut layer = Conv2dGpu::<T>::new(gpu, w.view(), b.view(), test_conv(math))?;
    let [dx, dw, db] = gradients_of::<T>(
        gpu,
        [x.view().into_dyn(), dy.view().into_dyn()],
        math.layout,
        [w.len(), out],
        |x, dy, dx, dw, db| layer.backward(gpu, x, dy, Some(dx), dw, db),
    )?;
    // The filter's gradient as the layer stores it (KRSC in NHWC), to OIHW.
    let dw = values(&unpack_conv_weights(&dw, [out, c, k], c, math.layout)?);
    let want_dx = want
        .input
        .ok_or_else(|| Error::invalid("self-test", "the CPU gave no input gradient"))?;
    check_gradients(
        "test convolution",
        [dx, dw, db],
        [values(&want_dx), values(&want.weight), values(&want.bias)],
    )
}

/// The test linear layer's sizes: 16 -> 8 on 8 rows.
const LINEAR: (usize, usize, usize) = (8, 16, 8);

/// The test linear layer's input, weights and bias.
fn linear_operands() -> Result<(Array2<f32>, Array2<f32>, Array1<f32>)> {
    let (rows, inputs, outputs) = LINEAR;
    Ok((
        shaped((rows, inputs), pattern(rows * inputs, 2.0))?,
        shaped((outputs, inputs), pattern(outputs * inputs, 0.5))?,
        Array1::from(pattern(outputs, 0.25)),
    ))
}

/// An output gradient with a pattern for the test linear layer, and the CPU's gradients for it.
fn linear_gradients() -> Result<(Array2<f32>, LinearGrads)> {
    let (rows, _, outputs) = LINEAR;
    let (x, w, b) = linear_operands()?;
    let dy = shaped((rows, outputs), pattern(rows * outputs, 1.0))?;
    let want = Linear::new(w.view(), &b)?.backward(x.view(), dy.view())?;
    Ok((dy, want))
}

/// The test linear layer's forward.
fn linear<T: GpuFloat>(gpu: &Gpu) -> Result<()> {
    let (rows, _, outputs) = LINEAR;
    let (x, w, b) = linear_operands()?;
    let want = Linear::new(w.view(), &b)?.forward(x.view())?;
    let layer = LinearGpu::<T>::new(gpu, w.view(), b.view(), false)?;
    let input = GpuTensor::<T>::from_host(gpu, x.view().into_dyn(), Layout::Nchw)?;
    let mut output = GpuTensor::<T>::zeros(gpu, &[rows, outputs], Layout::Nchw)?;
    layer.forward(gpu, &input, &mut output, false)?;
    check(
        "test GEMM",
        &values(&output.to_host(gpu)?),
        &values(&want),
        1e-2,
    )
}

/// The test linear layer's gradients (input, weight and bias; TF32 where `allow_tf32`) for an
/// output gradient with a pattern.
fn linear_backward<T: GpuFloat>(gpu: &Gpu, allow_tf32: bool) -> Result<()> {
    let (_, _, outputs) = LINEAR;
    let (x, w, b) = linear_operands()?;
    let (dy, want) = linear_gradients()?;
    let layer = LinearGpu::<T>::new(gpu, w.view(), b.view(), allow_tf32)?;
    let got = gradients_of::<T>(
        gpu,
        [x.view().into_dyn(), dy.view().into_dyn()],
        Layout::Nchw,
        [w.len(), outputs],
        |x, dy, dx, dw, db| layer.backward(gpu, x, dy, Some(dx), dw, db),
    )?;
    check_gradients(
        "test GEMM",
        got,
        [
            values(&want.input),
            values(&want.weight),
            values(&want.bias),
        ],
    )
}

/// A layer's `backward(x, dy, dx, dw, db)` at `x` for the output gradient `dy`, both uploaded
/// in `layout`, into zeroed gradients of `weight_len` and `bias_len` values: the input's, the
/// weight's (as the layer stores it) and the bias's gradients, downloaded.
fn gradients_of<T: GpuFloat>(
    gpu: &Gpu,
    [x, dy]: [ArrayViewD<'_, f32>; 2],
    layout: Layout,
    [weight_len, bias_len]: [usize; 2],
    backward: impl FnOnce(
        &GpuTensor<T>,
        &GpuTensor<T>,
        &mut GpuTensor<T>,
        &mut CudaViewMut<'_, T>,
        &mut CudaViewMut<'_, f32>,
    ) -> Result<()>,
) -> Result<[Vec<f32>; 3]> {
    let input = GpuTensor::<T>::from_host(gpu, x.view(), layout)?;
    let output_grad = GpuTensor::<T>::from_host(gpu, dy, layout)?;
    let mut input_grad = GpuTensor::<T>::zeros(gpu, x.shape(), layout)?;
    let mut dw = zeros::<T>(gpu, weight_len)?;
    let mut db = zeros::<f32>(gpu, bias_len)?;
    backward(
        &input,
        &output_grad,
        &mut input_grad,
        &mut dw.slice_mut(..),
        &mut db.slice_mut(..),
    )?;
    Ok([
        values(&input_grad.to_host(gpu)?),
        download(gpu, &dw)?,
        download(gpu, &db)?,
    ])
}

/// `got`'s input, weight and bias gradients each against `want`'s, as [`check`] does.
fn check_gradients(what: &str, got: [Vec<f32>; 3], want: [Vec<f32>; 3]) -> Result<()> {
    for ((part, got), want) in ["input", "weight", "bias"].into_iter().zip(got).zip(want) {
        check(&format!("{what}'s {part} gradient"), &got, &want, 1e-2)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_accepts_close_results_and_rejects_wrong_or_nan_ones() {
        let want = [1.0, -2.0, 4.0];
        assert!(check("t", &[1.0, -2.0, 4.01], &want, 1e-2).is_ok());
        assert!(check("t", &[1.0, -2.0, 4.1], &want, 1e-2).is_err());
        assert!(check("t", &[1.0, f32::NAN, 4.0], &want, 1e-2).is_err());
        assert!(check("t", &[1.0, -2.0], &want, 1e-2).is_err());
        // The pattern is exact in f16 and bf16 and has no two equal neighbours.
        let p = pattern(40, 2.0);
        assert!(p.iter().all(|&v| f16::from_f32(v).to_f32() == v));
        assert!(p.iter().all(|&v| bf16::from_f32(v).to_f32() == v));
        assert!(p.windows(2).all(|w| w[0] != w[1]));
    }

    /// A library's failure or wrong result is "device unavailable" naming the step; running
    /// out of memory and the self-test's own argument or shape mistakes are passed on as they
    /// are.
    #[test]
    fn only_library_failures_become_device_unavailable() {
        let wrong = check("test GEMM", &[0.0], &[1.0], 1e-2).unwrap_err();
        match fail("cuBLAS's f16 backward GEMMs", wrong) {
            Error::DeviceUnavailable(message) => {
                for part in ["cuBLAS's f16 backward GEMMs", "self-test", "wrong result"] {
                    assert!(message.contains(part), "{part}: {message}");
                }
            }
            other => panic!("{other:?}"),
        }
        let own = fail("x", Error::invalid("self-test", "bug"));
        assert!(matches!(own, Error::Invalid { .. }), "{own:?}");
        let shape = fail(
            "x",
            Error::Shape {
                op: "t",
                expected: "[1]".into(),
                found: vec![2],
            },
        );
        assert!(matches!(shape, Error::Shape { .. }), "{shape:?}");
        let full =
            cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        let memory = fail("x", Error::cuda("cuMemAlloc", full));
        assert!(matches!(memory, Error::OutOfMemory { .. }), "{memory:?}");
        // (A cuBLAS error: a driver error's text needs the driver, which this machine may lack.)
        let arch = cudarc::cublas::result::CublasError(
            cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ARCH_MISMATCH,
        );
        let arch = fail("x", Error::cuda("cublasGemmEx", arch));
        assert!(matches!(arch, Error::DeviceUnavailable(_)), "{arch:?}");
    }

    /// Every value each check compares is what the CPU computes from the tests' operands, and
    /// none of them is all zeros: a library that wrote nothing (or only zeros) fails each check.
    #[test]
    fn every_expected_result_is_nonzero_so_a_blank_result_fails() {
        let (x, w, b) = conv_operands().unwrap();
        let forward = Conv2d::new(w.view(), &b, 1, 1)
            .unwrap()
            .forward_relu(x.view())
            .unwrap();
        let (_, conv) = conv_gradients().unwrap();
        let (x, w, b) = linear_operands().unwrap();
        let linear_forward = Linear::new(w.view(), &b)
            .unwrap()
            .forward(x.view())
            .unwrap();
        let (_, linear) = linear_gradients().unwrap();
        let input = conv.input.unwrap();
        let expected: [(&str, Vec<f32>); 8] = [
            ("convolution", values(&forward)),
            ("filter gradient", values(&conv.weight)),
            ("input gradient", values(&input)),
            ("bias gradient", values(&conv.bias)),
            ("GEMM", values(&linear_forward)),
            ("GEMM weight gradient", values(&linear.weight)),
            ("GEMM input gradient", values(&linear.input)),
            ("GEMM bias gradient", values(&linear.bias)),
        ];
        for (what, want) in expected {
            assert!(check(what, &want, &want, 1e-2).is_ok(), "{what}");
            let blank = vec![0.0; want.len()];
            assert!(
                check(what, &blank, &want, 1e-2).is_err(),
                "{what}: zeros pass"
            );
            // Half the values wrong is caught too, not only all of them.
            let mut half = want.clone();
            half.iter_mut().step_by(2).for_each(|v| *v = 0.0);
            assert!(
                check(what, &half, &want, 1e-2).is_err(),
                "{what}: half zeros pass"
            );
        }
    }

    /// bf16 on a GPU older than Ampere is "no usable GPU" (so `auto` falls back to the CPU),
    /// named with the card and the way out.
    #[test]
    fn bf16_needs_ampere_or_newer() {
        for capable in [(8, 0), (8, 9), (9, 0), (12, 0)] {
            assert!(bf16_capable("card", capable).is_ok(), "{capable:?}");
        }
        match bf16_capable("Tesla T4", (7, 5)) {
            Err(Error::DeviceUnavailable(message)) => {
                for part in ["Tesla T4", "7.5", "8.0", "fp16", "on the CPU"] {
                    assert!(message.contains(part), "{part}: {message}");
                }
            }
            other => panic!("{other:?}"),
        }
    }
}
