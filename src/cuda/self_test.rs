//! A few tiny computations run when a [`Gpu`] is opened, in each precision the models use, so
//! that a broken install (a cuDNN engine sub-library missing, a cuBLAS that cannot run on this
//! card, kernels the driver cannot load) is [`Error::DeviceUnavailable`] at open — where
//! `--device auto` can still fall back to the CPU — instead of an error inside the first forward.
//! Each result is checked against the CPU layer, so a library that runs but computes garbage
//! is caught too. Costs a few milliseconds (plus cuDNN's algorithm search on these shapes).

use half::{bf16, f16};
use ndarray::{Array1, Array2, Array4};

use super::device::Gpu;
use super::dtype::GpuFloat;
use super::ops::{Conv2dGpu, ConvOptions, LinearGpu};
use super::tensor::{GpuTensor, Layout};
use crate::cpu::{Conv2d, Linear};
use crate::error::{Error, Result};

/// Runs every check; the first failure is `DeviceUnavailable` naming the library and step,
/// except running out of memory (another process holding the GPU's memory is no broken
/// install), which stays [`Error::OutOfMemory`].
pub(super) fn run(gpu: &Gpu) -> Result<()> {
    conv::<f32>(gpu, Layout::Nchw).map_err(|e| fail("cuDNN's fp32 convolution", e))?;
    conv::<f16>(gpu, Layout::Nhwc).map_err(|e| fail("cuDNN's fp16 NHWC convolution", e))?;
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
        "{name} has compute capability {major}.{minor}; bf16 needs 8.0 (Ampere) or newer: use \
         --precision fp16 on this GPU (inference or training), or bf16 inference on the CPU \
         (--device cpu)"
    )))
}

/// bf16's checks, as [`run`]'s: run when a bf16 model is built (on compute capability 8.0 and
/// newer; not at every open, which a pre-Ampere GPU must pass for the other precisions).
fn run_bf16(gpu: &Gpu) -> Result<()> {
    conv::<bf16>(gpu, Layout::Nhwc).map_err(|e| fail("cuDNN's bf16 NHWC convolution", e))?;
    linear::<bf16>(gpu).map_err(|e| fail("cuBLAS's bf16 GEMM", e))?;
    gpu.synchronize().map_err(|e| fail("the device", e))
}

/// A failed check as `DeviceUnavailable` naming `what`, except running out of memory.
fn fail(what: &str, e: Error) -> Error {
    match e {
        out_of_memory @ Error::OutOfMemory { .. } => out_of_memory,
        e => Error::DeviceUnavailable(format!(
            "the GPU opened, but {what} failed its test when the device was opened: {e}. \
             Reinstall the library named (see README, \"GPU set-up\"), or use --device cpu"
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

/// A 3x3 convolution of one 8-channel 8x8 image (tensor-core friendly sizes) with bias + ReLU.
fn conv<T: GpuFloat>(gpu: &Gpu, layout: Layout) -> Result<()> {
    let (c, side, out) = (8, 8, 8);
    let x = Array4::from_shape_vec((1, c, side, side), pattern(c * side * side, 2.0))
        .map_err(|e| Error::invalid("self-test", e.to_string()))?;
    let w = Array4::from_shape_vec((out, c, 3, 3), pattern(out * c * 9, 0.5))
        .map_err(|e| Error::invalid("self-test", e.to_string()))?;
    let b = Array1::from(pattern(out, 0.25));
    let want = Conv2d::new(w.view(), &b, 1, 1)?.forward_relu(x.view())?;
    let mut layer = Conv2dGpu::<T>::new(gpu, w.view(), b.view(), ConvOptions::new(1, 1, layout))?;
    let input = GpuTensor::<T>::from_host(gpu, x.view().into_dyn(), layout)?;
    let mut output = GpuTensor::<T>::zeros(gpu, &[1, out, side, side], layout)?;
    layer.forward(gpu, &input, &mut output, true)?;
    let got = output.to_host(gpu)?;
    let got: Vec<f32> = got.iter().copied().collect();
    let want: Vec<f32> = want.iter().copied().collect();
    check("test convolution", &got, &want, 1e-2)
}

/// A 16 -> 8 linear layer on 8 rows.
fn linear<T: GpuFloat>(gpu: &Gpu) -> Result<()> {
    let (rows, inputs, outputs) = (8, 16, 8);
    let x = Array2::from_shape_vec((rows, inputs), pattern(rows * inputs, 2.0))
        .map_err(|e| Error::invalid("self-test", e.to_string()))?;
    let w = Array2::from_shape_vec((outputs, inputs), pattern(outputs * inputs, 0.5))
        .map_err(|e| Error::invalid("self-test", e.to_string()))?;
    let b = Array1::from(pattern(outputs, 0.25));
    let want = Linear::new(w.view(), &b)?.forward(x.view())?;
    let layer = LinearGpu::<T>::new(gpu, w.view(), b.view(), false)?;
    let input = GpuTensor::<T>::from_host(gpu, x.view().into_dyn(), Layout::Nchw)?;
    let mut output = GpuTensor::<T>::zeros(gpu, &[rows, outputs], Layout::Nchw)?;
    layer.forward(gpu, &input, &mut output, false)?;
    let got: Vec<f32> = output.to_host(gpu)?.iter().copied().collect();
    let want: Vec<f32> = want.iter().copied().collect();
    check("test GEMM", &got, &want, 1e-2)
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

    /// bf16 on a GPU older than Ampere is "no usable GPU" (so `auto` falls back to the CPU),
    /// named with the card and the way out.
    #[test]
    fn bf16_needs_ampere_or_newer() {
        for capable in [(8, 0), (8, 9), (9, 0), (12, 0)] {
            assert!(bf16_capable("card", capable).is_ok(), "{capable:?}");
        }
        match bf16_capable("Tesla T4", (7, 5)) {
            Err(Error::DeviceUnavailable(message)) => {
                for part in ["Tesla T4", "7.5", "8.0", "fp16", "--device cpu"] {
                    assert!(message.contains(part), "{part}: {message}");
                }
            }
            other => panic!("{other:?}"),
        }
    }
}
