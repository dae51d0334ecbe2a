//! The command line: flags, their values and the usage errors clap reports.

use std::path::PathBuf;

use alexnet_cuda::image::DEFAULT_MAX_FILE_BYTES;
use alexnet_cuda::{AlexNetConfig, DeviceChoice, Precision};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "AlexNet inference: classify images or time synthetic batches"
)]
pub struct Args {
    /// Images per forward pass (1 to 1024).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch: u64,
    /// Numeric mode.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    pub precision: PrecisionArg,
    /// GPU fp32: keep cuDNN to its GEMM-family convolution algorithms, no FFT or Winograd
    /// (on an H200 within 1e-4 of the CPU instead of 3.5e-3, at half the speed). Without it
    /// fp32 picks among every algorithm without tensor cores, as PyTorch's fp32 does.
    #[arg(long)]
    pub fp32_gemm_only: bool,
    /// Where to run: auto picks CUDA when usable, else the CPU (with a notice).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Which GPU: CUDA's device index, 0 being the first [default: 0]. CUDA_VISIBLE_DEVICES
    /// limits and renumbers the GPUs; CUDA_DEVICE_ORDER=PCI_BUS_ID numbers them as nvidia-smi
    /// does (CUDA's own order puts the fastest first).
    #[arg(long, value_name = "INDEX")]
    pub gpu: Option<usize>,
    /// Architecture. Default: read off --weights, else `paper`. Given with --weights, the file
    /// must match it.
    #[arg(long, value_enum)]
    pub config: Option<ConfigArg>,
    /// safetensors weights (crate or torchvision names; F32, F16 or BF16). Default: the paper's
    /// initialisation from --seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed for the initialisation (without --weights) and the synthetic batches [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Image files or directories (directory entries in sorted name order). Without it, time
    /// synthetic batches.
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// Timed batches, synthetic mode only [default: 100 on a GPU, 10 on the CPU].
    #[arg(long, conflicts_with = "images", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub iterations: Option<u64>,
    /// Untimed batches before timing, synthetic mode only [default: 10 on a GPU, 2 on the CPU].
    #[arg(long, conflicts_with = "images", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub warmup: Option<u64>,
    /// Labels printed per image (at most the number of classes).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub top: u64,
    /// Class names, one per line in logit order (as many lines as the model has classes).
    /// Default: ImageNet's names for a 1000-class model, class indices only otherwise.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Most bytes read from one image file; a larger file is reported and skipped.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FILE_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_bytes: u64,
    /// Print one JSON object instead of text (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Write the logits as float32 [N, classes] .npy, one row per input image in order (NaN rows
    /// for images that failed).
    #[arg(long, value_name = "FILE.npy", requires = "images")]
    pub dump_logits: Option<PathBuf>,
    /// The paper's ten-crop test: average the softmax of the four corners and the centre of
    /// each image's central 256x256 patch and of their mirrors (ten forward rows per image;
    /// --batch still counts images). --dump-logits then holds the log of the averaged
    /// probabilities.
    #[arg(long, requires = "images")]
    pub ten_crop: bool,
    /// Print the layer table (shapes and parameter counts) and exit.
    #[arg(long, conflicts_with_all = ["images", "json", "dump_logits"])]
    pub summary: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Fp16,
    /// bf16 storage, f32 accumulation (on a GPU: compute capability 8.0 or newer).
    Bf16,
    /// fp32 storage, TF32 tensor-core math on the GPU (the CPU computes fp32).
    Tf32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConfigArg {
    Paper,
    Torchvision,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Tf32 => Precision::Tf32,
        }
    }
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }
}

impl ConfigArg {
    pub fn config(self) -> AlexNetConfig {
        match self {
            ConfigArg::Paper => AlexNetConfig::paper(),
            ConfigArg::Torchvision => AlexNetConfig::torchvision(),
        }
    }
}

/// What this run does, from the flags: print the table, classify images, or time batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Summary,
    Classify,
    Benchmark,
}

impl Args {
    pub fn mode(&self) -> Mode {
        if self.summary {
            Mode::Summary
        } else if self.images.is_empty() {
            Mode::Benchmark
        } else {
            Mode::Classify
        }
    }
}

/// Refuses flags given on the command line that this run's mode does not use (a usage error,
/// exit 2): nothing a user asked for is silently ignored.
pub fn check_flags(matches: &ArgMatches, args: &Args) {
    let mode = args.mode();
    let unused: &[&str] = match mode {
        Mode::Summary => &[
            "batch",
            "precision",
            "device",
            "gpu",
            "fp32_gemm_only",
            "seed",
            "images",
            "iterations",
            "warmup",
            "top",
            "json",
            "dump_logits",
            "labels",
            "max_image_bytes",
            "ten_crop",
        ],
        Mode::Classify => &["iterations", "warmup"],
        Mode::Benchmark => &["top", "dump_logits", "labels", "max_image_bytes"],
    };
    let what = match mode {
        Mode::Summary => "--summary (it only prints the layer table)",
        Mode::Classify => "classifying --images",
        Mode::Benchmark => "timing synthetic batches (no --images given)",
    };
    for id in unused {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            usage_error(format!(
                "--{} does not apply to {what}",
                id.replace('_', "-")
            ));
        }
    }
    if matches!(args.device, DeviceArg::Cpu) && args.gpu.is_some() {
        usage_error("--gpu picks a GPU, and --device cpu runs on the CPU".to_string());
    }
}

/// Reports a bad argument the way clap does (usage line, exit code 2) and exits.
pub fn usage_error(message: String) -> ! {
    Args::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}
