//! The command line of `train`.

use std::path::PathBuf;

use alexnet_cuda::train::UpdateRule;
use alexnet_cuda::weights::TensorNames;
use alexnet_cuda::{AlexNetConfig, Precision};
use clap::{CommandFactory, Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Train AlexNet on an image folder (ROOT/<class>/<image>) as the paper did",
    after_help = "Example: train --data photos/train --val photos/val --classes 5 \\\n    \
                  --weights alexnet.safetensors --epochs 10 --save tuned.safetensors"
)]
pub struct Args {
    /// Training images: one subdirectory per class (classes in sorted name order).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Validation images, laid out like --data: top-1/top-5 error after every epoch.
    #[arg(long, value_name = "DIR")]
    pub val: Option<PathBuf>,
    /// Architecture for a fresh network [default: paper]; with --weights, read off the file.
    #[arg(long, value_enum, conflicts_with_all = ["weights", "resume"])]
    pub config: Option<ConfigArg>,
    /// Start from these weights (crate or torchvision names) instead of the paper's
    /// initialisation.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub weights: Option<PathBuf>,
    /// Seed of the initialisation, the data order, the augmentation and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replace the last layer by a freshly initialised one with this many classes
    /// (fine-tuning on a new label set).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000), conflicts_with = "resume")]
    pub classes: Option<u64>,
    /// Images per step.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch: u64,
    /// Epochs to train (passes over --data) [default: 90, the paper's].
    #[arg(long, conflicts_with = "steps", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub epochs: Option<u64>,
    /// Train this many steps instead of whole epochs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Option<u64>,
    /// Learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,
    /// pytorch: v = m v + g + wd w, w -= lr v (torch.optim.SGD); paper: v = m v - wd lr w - lr g,
    /// w += v.
    #[arg(long, value_enum, default_value_t = RuleArg::Pytorch)]
    pub update_rule: RuleArg,
    /// No weight decay on biases.
    #[arg(long)]
    pub no_bias_decay: bool,
    /// Divide the learning rate by 10 after these epochs (e.g. 30,60) instead of on plateaus.
    #[arg(long, value_delimiter = ',', value_name = "E1,E2,...")]
    pub lr_steps: Vec<u64>,
    /// Divide the learning rate by 10 when the validation error has not improved for this many
    /// epochs (needs --val).
    #[arg(long, default_value_t = 2, conflicts_with = "lr_steps")]
    pub patience: u32,
    /// Keep the layers up to this one fixed and train only those after it: `conv5` (or
    /// `conv1..conv5`) fine-tunes the linear layers alone. A resumed run keeps its own.
    #[arg(long, value_name = "LAYER", conflicts_with = "resume")]
    pub freeze: Option<String>,
    /// Dropout probability of the hidden linear layers [default: the model's, 0.5].
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Train on the eval transform (resize 256, centre crop 224) without random crops, flips
    /// or lighting noise.
    #[arg(long)]
    pub no_augment: bool,
    /// Keep the folder's order (batches run on and wrap around) instead of shuffling per epoch.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Where to train: auto takes the GPU where one is usable (and says so), else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Which GPU: CUDA's device index, 0 being the first [default: 0]. CUDA_VISIBLE_DEVICES
    /// limits and renumbers the GPUs; CUDA_DEVICE_ORDER=PCI_BUS_ID numbers them as nvidia-smi
    /// does (CUDA's own order puts the fastest first).
    #[arg(long, value_name = "INDEX")]
    pub gpu: Option<usize>,
    /// How the GPU computes: fp32 (true fp32), tf32 (TF32 tensor-core math; the CPU trains in
    /// fp32 and says so), fp16 (mixed precision: f16 compute, f32 master weights, dynamic
    /// loss scaling; GPU only) or bf16 (the same in bf16; a GPU of compute capability 8.0 or
    /// newer only). Weights and checkpoints are f32 in every case, and a resumed run may
    /// change it.
    #[arg(long, value_enum, default_value_t = TrainPrecisionArg::Fp32)]
    pub precision: TrainPrecisionArg,
    /// GPU fp32: keep cuDNN to its GEMM-family convolution algorithms (forward and backward),
    /// no FFT or Winograd: closer to the CPU, slower (on an H200 the inference forward came
    /// within 1e-4 of the CPU instead of 3.5e-3, at half the speed). Without it fp32 picks
    /// among every algorithm without tensor cores, as PyTorch's fp32 does. No effect on the
    /// CPU (said so).
    #[arg(long)]
    pub fp32_gemm_only: bool,
    /// GPU: let cuDNN's backward take its fastest measured algorithms even when they sum with
    /// atomics, as PyTorch does by default: faster steps that are not bit for bit repeatable
    /// from run to run. Without it the fastest deterministic ones run. No effect on the CPU,
    /// which is deterministic either way (said so).
    #[arg(long)]
    pub nondeterministic: bool,
    /// GPU: keep the activations channels-last (NHWC), the layout of cuDNN's tensor-core
    /// kernels, as PyTorch's `channels_last`. Weights, momentum and checkpoints stay in the
    /// usual order. Not yet measured on a GPU against the default NCHW. No effect on the CPU
    /// (said so).
    #[arg(long)]
    pub channels_last: bool,
    /// Where the trained weights go (safetensors, crate names, class names in the metadata).
    #[arg(long, value_name = "FILE")]
    pub save: PathBuf,
    /// Tensor names in the --save file: the crate's, or torchvision's (`features.0.weight`,
    /// ...) so `torchvision.models.alexnet().load_state_dict` takes a torchvision-preset file.
    #[arg(long, value_enum, default_value_t = NamesArg::Crate)]
    pub names: NamesArg,
    /// Checkpoint file (weights, momentum, step, learning rate) [default: SAVE with its
    /// extension replaced by `.ckpt.safetensors`].
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Also checkpoint every this many steps (always at the end of the run, and at the end of an
    /// epoch when the last checkpoint is a minute old).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Print a progress line (step, loss, images/s) every this many seconds; 0: every step
    /// [default: 60 when stderr is not a terminal, where no progress bar is drawn; none beside
    /// the bar].
    #[arg(long, value_name = "SECONDS")]
    pub progress_every: Option<u64>,
    /// Continue the run saved in this checkpoint (its settings apply; --epochs or --steps may
    /// extend it).
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Append one CSV row per epoch: epoch, step, train loss, validation errors, learning rate;
    /// the curves are redrawn beside it as FILE.png and FILE.svg.
    #[arg(long, value_name = "FILE.csv")]
    pub log: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConfigArg {
    Paper,
    Torchvision,
}

impl ConfigArg {
    pub fn config(self) -> AlexNetConfig {
        match self {
            ConfigArg::Paper => AlexNetConfig::paper(),
            ConfigArg::Torchvision => AlexNetConfig::torchvision(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrainPrecisionArg {
    Fp32,
    Tf32,
    Fp16,
    Bf16,
}

impl From<TrainPrecisionArg> for Precision {
    fn from(p: TrainPrecisionArg) -> Self {
        match p {
            TrainPrecisionArg::Fp32 => Precision::Fp32,
            TrainPrecisionArg::Tf32 => Precision::Tf32,
            TrainPrecisionArg::Fp16 => Precision::Fp16,
            TrainPrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum NamesArg {
    Crate,
    Torchvision,
}

impl From<NamesArg> for TensorNames {
    fn from(names: NamesArg) -> Self {
        match names {
            NamesArg::Crate => TensorNames::Crate,
            NamesArg::Torchvision => TensorNames::Torchvision,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RuleArg {
    Pytorch,
    Paper,
}

impl From<RuleArg> for UpdateRule {
    fn from(rule: RuleArg) -> Self {
        match rule {
            RuleArg::Pytorch => UpdateRule::PyTorch,
            RuleArg::Paper => UpdateRule::Paper,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

/// Reports a bad argument the way clap does (usage line, exit code 2) and exits.
pub fn usage_error(message: String) -> ! {
    Args::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}
