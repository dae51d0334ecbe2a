//! What every backend shares: the device choice, the [`Backend`] trait the CLI and benchmarks
//! drive, and [`open_backend`]. Each model implements the trait beside its own code.

use ndarray::{Array2, ArrayView4};
use serde::Serialize;

use crate::config::{AlexNetConfig, Precision};
use crate::cpu::CpuModel;
use crate::error::{Error, Result};
use crate::image::{Preprocess, U8Batch};
use crate::stream::{drive, BatchStream, HostQueue};
use crate::weights::Weights;

/// Which device to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when usable, otherwise the CPU (with a notice).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// A model that turns normalised NCHW batches into logits.
pub trait Backend {
    /// A human-readable device description ("CPU (2 threads)", "NVIDIA H100 ...").
    fn device_name(&self) -> String;
    fn precision(&self) -> Precision;
    /// The architecture being run.
    fn config(&self) -> &AlexNetConfig;
    /// Logits `[N, classes]` for a normalised `[N, 3, H, W]` batch.
    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>>;

    /// Logits for a batch of u8 HWC images normalised with `pre`'s mean and std. The default
    /// normalises on the host and calls [`Backend::forward`]; the CUDA backend uploads the
    /// bytes and normalises on the GPU.
    fn forward_u8(&mut self, batch: &U8Batch, pre: &Preprocess) -> Result<Array2<f32>> {
        self.forward(batch.to_nchw_f32(pre).view())
    }

    /// What runs the device, for reports: on a GPU the compute capability, the CUDA libraries'
    /// versions and where the kernels came from; `None` on the CPU.
    fn device_details(&self) -> Option<String> {
        None
    }

    /// Whether this backend runs on a GPU (picks the CLI's default iteration counts).
    fn is_gpu(&self) -> bool {
        false
    }

    /// Runs the batches `stream` writes, `max_batch` images at most each, normalised with
    /// `pre`'s mean and std, and hands their logits back in order (see [`crate::stream`]). On
    /// a GPU the next batch is written into a page-locked slot while the previous one computes;
    /// the default computes each batch on the host as it is submitted.
    fn run_stream(
        &mut self,
        max_batch: usize,
        pre: &Preprocess,
        stream: &mut dyn BatchStream,
    ) -> Result<()> {
        let mut queue = HostQueue::new(self, pre, max_batch, 1)?;
        drive(&mut queue, stream)
    }

    /// Device-side timings of the last batch (upload, compute, download), where the backend
    /// measures them (CUDA events); `None` on the CPU.
    fn last_stage_timings(&self) -> Option<StageTimings> {
        None
    }
}

/// Where the time of one batch went on a device, measured with CUDA events: host-to-device
/// upload, compute (input preparation to logits), device-to-host download.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StageTimings {
    pub h2d_ms: f64,
    pub compute_ms: f64,
    pub d2h_ms: f64,
}

/// A backend ready to run, and a one-line notice when the choice was not the one asked for.
pub struct OpenedBackend {
    pub backend: Box<dyn Backend>,
    /// E.g. why `Auto` fell back to the CPU.
    pub notice: Option<String>,
}

/// GPU settings [`open_backend_with`] passes on; the default is [`open_backend`]'s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// GPU fp32 only: keep cuDNN to its GEMM-family convolution algorithms, no FFT or
    /// Winograd (`CudaOptions::fp32_gemm_only`: closer to the CPU, slower). The CPU has no
    /// such choice; where the CPU runs, the notice says this had no effect.
    pub fp32_gemm_only: bool,
    /// The GPU to open: CUDA's device index (0, the default, is the first; see
    /// `CudaOptions::device`). Where the CPU runs, the notice says an index other than 0 had
    /// no effect.
    pub gpu: usize,
}

/// Builds a model for `weights` on the chosen device. `Cuda` fails with
/// [`Error::DeviceUnavailable`] when no GPU path is usable (no driver, GPU, cuBLAS, cuDNN or
/// kernels; the message says what to install); `Auto` then falls back to the CPU and says why
/// in the notice.
pub fn open_backend(
    weights: &Weights,
    choice: DeviceChoice,
    precision: Precision,
) -> Result<OpenedBackend> {
    open_backend_with(weights, choice, precision, BackendOptions::default())
}

/// [`open_backend`] with GPU settings beyond the defaults.
pub fn open_backend_with(
    weights: &Weights,
    choice: DeviceChoice,
    precision: Precision,
    options: BackendOptions,
) -> Result<OpenedBackend> {
    let cpu = || -> Result<Box<dyn Backend>> { Ok(Box::new(CpuModel::new(weights, precision)?)) };
    let cuda = || open_cuda(weights, precision, options);
    // Nothing asked for is dropped silently: a GPU-only setting the CPU cannot honour is said.
    let on_cpu = |notice: Option<String>| -> Option<String> {
        let mut unused = Vec::new();
        if options.fp32_gemm_only {
            unused.push("fp32 GEMM-only convolutions are a cuDNN setting: no effect on the CPU");
        }
        let gpu = format!("GPU {} was asked for: no effect on the CPU", options.gpu);
        if options.gpu != 0 {
            unused.push(&gpu);
        }
        let parts: Vec<&str> = notice.as_deref().into_iter().chain(unused).collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    };
    match choice {
        DeviceChoice::Cpu => Ok(OpenedBackend {
            backend: cpu()?,
            notice: on_cpu(cpu_precision_notice(precision)),
        }),
        DeviceChoice::Cuda => Ok(OpenedBackend {
            backend: cuda()?,
            notice: None,
        }),
        DeviceChoice::Auto => match cuda() {
            Ok(backend) => Ok(OpenedBackend {
                backend,
                notice: None,
            }),
            // No usable GPU (or a CUDA failure while setting it up): the CPU computes the same.
            Err(
                e @ (Error::DeviceUnavailable(_) | Error::Cuda { .. } | Error::OutOfMemory { .. }),
            ) => Ok(OpenedBackend {
                backend: cpu()?,
                notice: on_cpu(Some(match cpu_precision_notice(precision) {
                    Some(also) => format!("CUDA is not usable ({e}); running on the CPU; {also}"),
                    None => format!("CUDA is not usable ({e}); running on the CPU"),
                })),
            }),
            Err(e) => Err(e),
        },
    }
}

/// What the CPU says when it computes another precision than the one asked for, or computes
/// it without the speed the name suggests.
fn cpu_precision_notice(precision: Precision) -> Option<String> {
    let computed = precision.on_cpu();
    if computed != precision {
        return Some(format!(
            "{precision} is a GPU math mode: the CPU computes {computed} (exact f32 math)"
        ));
    }
    (precision == Precision::Bf16).then(|| match crate::cpu::bf16_hardware() {
        Some(hardware) => format!("bf16 on the CPU runs on its {hardware} kernels"),
        None => "bf16 on the CPU: this CPU has no AMX-BF16 or AVX512-BF16, so it rounds to \
                 bf16 and multiplies with the f32 kernels (the numbers bf16 hardware gives, at \
                 about fp32's speed)"
            .to_string(),
    })
}

#[cfg(feature = "cuda")]
fn open_cuda(
    weights: &Weights,
    precision: Precision,
    options: BackendOptions,
) -> Result<Box<dyn Backend>> {
    use crate::cuda::{CudaModel, CudaOptions};
    let options = CudaOptions {
        fp32_gemm_only: options.fp32_gemm_only,
        device: options.gpu,
        ..CudaOptions::default()
    };
    Ok(Box::new(CudaModel::new(weights, precision, options)?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _weights: &Weights,
    _precision: Precision,
    _options: BackendOptions,
) -> Result<Box<dyn Backend>> {
    Err(Error::DeviceUnavailable(
        "this build of alexnet-cuda has no CUDA backend (its `cuda` feature is off); rebuild \
         with default features, or run on the CPU"
            .to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's network on 67x67 inputs: every layer, little work.
    fn small_weights() -> Weights {
        let mut config = AlexNetConfig::torchvision();
        config.input.height = 67;
        config.input.width = 67;
        Weights::paper_init(&config, 5).unwrap()
    }

    /// A GPU-only setting given where the CPU runs is said in the notice, not dropped.
    #[test]
    fn fp32_gemm_only_on_the_cpu_is_reported() {
        let weights = small_weights();
        let options = BackendOptions {
            fp32_gemm_only: true,
            ..BackendOptions::default()
        };
        let opened =
            open_backend_with(&weights, DeviceChoice::Cpu, Precision::Fp32, options).unwrap();
        let notice = opened.notice.unwrap_or_default();
        assert!(notice.contains("no effect on the CPU"), "{notice}");
        // A GPU index too, beside the other setting.
        let both = BackendOptions { gpu: 1, ..options };
        let opened = open_backend_with(&weights, DeviceChoice::Cpu, Precision::Fp32, both).unwrap();
        let notice = opened.notice.unwrap_or_default();
        assert!(
            notice.contains("GPU 1 was asked for") && notice.contains("GEMM-only"),
            "{notice}"
        );
        let plain = open_backend(&weights, DeviceChoice::Cpu, Precision::Fp32).unwrap();
        assert_eq!(plain.notice, None);
    }

    /// tf32 on the CPU is fp32, and the caller is told: the backend reports fp32, the logits
    /// are the fp32 model's bit for bit, and the notice names both precisions.
    #[test]
    fn tf32_on_the_cpu_is_fp32_and_says_so() {
        let weights = small_weights();
        let config = weights.config().clone();
        let opened = open_backend(&weights, DeviceChoice::Cpu, Precision::Tf32).unwrap();
        assert_eq!(opened.backend.precision(), Precision::Fp32);
        let notice = opened.notice.unwrap_or_default();
        assert!(
            notice.contains("tf32") && notice.contains("fp32"),
            "{notice}"
        );
        let input = crate::timing::synthetic_batch(2, config.input, 9);
        let fp32 = CpuModel::new(&weights, Precision::Fp32).unwrap();
        let tf32 = CpuModel::new(&weights, Precision::Tf32).unwrap();
        assert_eq!(
            tf32.forward(input.view()).unwrap(),
            fp32.forward(input.view()).unwrap()
        );
        let plain = open_backend(&weights, DeviceChoice::Cpu, Precision::Fp32).unwrap();
        assert!(plain.notice.is_none());
    }

    /// bf16 runs where the others do: `auto` takes a usable GPU (one of compute capability 8.0
    /// or newer) and otherwise the CPU, saying why; `cpu` says which kernels compute it;
    /// `cuda` without a usable GPU is the error that says so, never a silent CPU run.
    #[test]
    fn bf16_takes_the_gpu_where_one_is_usable_and_the_cpu_otherwise() {
        let weights = small_weights();
        let opened = open_backend(&weights, DeviceChoice::Auto, Precision::Bf16).unwrap();
        assert_eq!(opened.backend.precision(), Precision::Bf16);
        let on_gpu = !opened.backend.device_name().starts_with("CPU");
        if !on_gpu {
            let notice = opened.notice.unwrap_or_default();
            assert!(notice.contains("running on the CPU"), "{notice}");
        }
        // The notice and the device name say what computes the products.
        let on_cpu = open_backend(&weights, DeviceChoice::Cpu, Precision::Bf16).unwrap();
        let (notice, device) = (
            on_cpu.notice.unwrap_or_default(),
            on_cpu.backend.device_name(),
        );
        match crate::cpu::bf16_hardware() {
            Some(hardware) => {
                assert!(notice.contains(hardware), "{notice}");
                assert!(device.contains(hardware), "{device}");
            }
            None => {
                assert!(notice.contains("f32 kernels"), "{notice}");
                assert!(!device.contains("bf16"), "{device}");
            }
        }
        match open_backend(&weights, DeviceChoice::Cuda, Precision::Bf16) {
            Ok(opened) => {
                assert!(on_gpu, "cuda opened where auto took the CPU");
                assert_eq!(opened.backend.precision(), Precision::Bf16);
            }
            Err(Error::DeviceUnavailable(message)) => {
                assert!(!on_gpu, "auto opened the GPU: {message}")
            }
            Err(other) => panic!("another error: {other}"),
        }
    }

    #[test]
    fn precisions_parse_and_print_alike() {
        for p in [
            Precision::Fp32,
            Precision::Fp16,
            Precision::Bf16,
            Precision::Tf32,
        ] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        assert!("bf8".parse::<Precision>().is_err());
    }
}
