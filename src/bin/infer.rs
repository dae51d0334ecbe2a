//! `infer`: run AlexNet on images or time it on synthetic batches. Argument parsing and
//! reporting only; the work is done by library calls.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use alexnet_cuda::backend::StageTimings;
use alexnet_cuda::classify::{classify_files, ClassifyEvent};
use alexnet_cuda::config::thousands;
use alexnet_cuda::image::{collect_image_paths, Preprocess};
use alexnet_cuda::labels::class_name;
use alexnet_cuda::timing::{time_forward, LatencyStats, TimingPlan};
use alexnet_cuda::{open_backend, AlexNetConfig, Backend, DeviceChoice, Error, Precision, Weights};
use clap::{CommandFactory, Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::Array2;
use serde_json::json;

/// Exit code when some images could not be read or decoded (the rest were classified).
const EXIT_SOME_INPUTS_FAILED: u8 = 3;
/// Exit code for a fatal error (bad weights, unusable device, unreadable output path).
const EXIT_FATAL: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "AlexNet inference: classify images or time synthetic batches"
)]
struct Args {
    /// Images per forward pass (1 to 1024).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    batch: u64,
    /// Numeric mode.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    precision: PrecisionArg,
    /// Where to run: auto picks CUDA when usable, else the CPU (with a notice).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Architecture. Default: read off --weights, else `paper`. Given with --weights, the file
    /// must match it.
    #[arg(long, value_enum)]
    config: Option<ConfigArg>,
    /// safetensors weights (crate or torchvision names; F32, F16 or BF16). Default: the paper's
    /// initialisation from --seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed for the initialisation (without --weights) and the synthetic batches [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Image files or directories (directory entries in sorted name order). Without it, time
    /// synthetic batches.
    #[arg(long, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Timed batches, synthetic mode only [default: 100 on a GPU, 10 on the CPU].
    #[arg(long, conflicts_with = "images", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    iterations: Option<u64>,
    /// Untimed batches before timing, synthetic mode only [default: 10 on a GPU, 2 on the CPU].
    #[arg(long, conflicts_with = "images", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    warmup: Option<u64>,
    /// Labels printed per image (at most the number of classes).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top: u64,
    /// Print one JSON object instead of text (no progress bar).
    #[arg(long)]
    json: bool,
    /// Write the logits as float32 [N, classes] .npy, one row per input image in order (NaN rows
    /// for images that failed).
    #[arg(long, value_name = "FILE.npy", requires = "images")]
    dump_logits: Option<PathBuf>,
    /// Print the layer table (shapes and parameter counts) and exit.
    #[arg(long, conflicts_with_all = ["images", "json", "dump_logits"])]
    summary: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Fp16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConfigArg {
    Paper,
    Torchvision,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Fp16 => Precision::Fp16,
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
    fn config(self) -> AlexNetConfig {
        match self {
            ConfigArg::Paper => AlexNetConfig::paper(),
            ConfigArg::Torchvision => AlexNetConfig::torchvision(),
        }
    }
}

/// Reports a bad argument the way clap does (usage line, exit code 2) and exits.
fn usage_error(message: String) -> ! {
    Args::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FATAL)
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, Error> {
    let explicit_config = args.config.map(ConfigArg::config);
    if args.summary {
        let config = match (&args.weights, &explicit_config) {
            (Some(path), _) => Weights::load(path, explicit_config.as_ref())?
                .config()
                .clone(),
            (None, Some(config)) => config.clone(),
            (None, None) => AlexNetConfig::paper(),
        };
        println!(
            "AlexNet ({}), input {}x{}x{}",
            config.name, config.input.channels, config.input.height, config.input.width
        );
        println!("{}", config.summary()?);
        return Ok(ExitCode::SUCCESS);
    }

    let weights = match &args.weights {
        Some(path) => Weights::load(path, explicit_config.as_ref())?,
        None => {
            let config = explicit_config.unwrap_or_else(AlexNetConfig::paper);
            Weights::paper_init(&config, args.seed.unwrap_or(0))?
        }
    };
    let classes = weights.config().num_classes();
    if args.top as usize > classes {
        usage_error(format!(
            "--top {} is more than the model's {classes} classes",
            args.top
        ));
    }
    let opened = open_backend(&weights, args.device.into(), args.precision.into())?;
    if let Some(notice) = &opened.notice {
        eprintln!("note: {notice}");
    }
    let mut backend = opened.backend;
    let batch = args.batch as usize;

    if args.images.is_empty() {
        // A GPU batch takes milliseconds, a CPU batch seconds.
        let (default_warmup, default_iterations) =
            if backend.is_gpu() { (10, 100) } else { (2, 10) };
        let plan = TimingPlan {
            batch,
            warmup: args.warmup.unwrap_or(default_warmup) as usize,
            iterations: args.iterations.unwrap_or(default_iterations) as usize,
            seed: args.seed.unwrap_or(0),
        };
        benchmark(args, backend.as_mut(), &weights, plan)?;
        Ok(ExitCode::SUCCESS)
    } else {
        match (&args.weights, args.seed) {
            (None, seed) => eprintln!(
                "note: no --weights given: the paper's random initialisation (seed {}) makes the labels meaningless",
                seed.unwrap_or(0)
            ),
            (Some(_), Some(_)) => {
                eprintln!("note: --seed has no effect when classifying images with --weights")
            }
            (Some(_), None) => {}
        }
        classify(args, backend.as_mut(), batch)
    }
}

/// A progress bar on stderr, hidden for --json and when stderr is not a terminal.
fn progress_bar(args: &Args, total: u64, what: &str) -> ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn benchmark(
    args: &Args,
    backend: &mut dyn Backend,
    weights: &Weights,
    plan: TimingPlan,
) -> Result<(), Error> {
    let config = weights.config();
    let bar = progress_bar(args, (plan.warmup + plan.iterations) as u64, "timing");
    let run = time_forward(backend, config.input, plan, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let millis: Vec<f64> = run.wall.iter().map(|t| t.as_secs_f64() * 1e3).collect();
    let Some(latency) = LatencyStats::from_millis(&millis) else {
        return Err(Error::Invalid {
            what: "--iterations",
            message: "no timed iterations".into(),
        });
    };
    let total: Duration = run.wall.iter().sum();
    let images = (plan.batch * run.wall.len()) as f64;
    let throughput = images / total.as_secs_f64();
    let gflop_per_image = config.flops_per_image()? as f64 / 1e9;
    let tflops = throughput * gflop_per_image / 1e3;
    let stages = StageSummary::new(&run.stages);
    if args.json {
        let mut report = json!({
            "device": backend.device_name(),
            "precision": backend.precision().to_string(),
            "config": config.name,
            "batch": plan.batch,
            "warmup": plan.warmup,
            "iterations": plan.iterations,
            "throughput_img_per_s": throughput,
            "latency_ms": latency,
            "gflop_per_image": gflop_per_image,
            "achieved_tflops": tflops,
        });
        if let Some(stages) = &stages {
            report["stage_ms"] = json!({
                "h2d": stages.h2d,
                "compute": stages.compute,
                "d2h": stages.d2h,
            });
        }
        println!("{report}");
        return Ok(());
    }
    println!("=== alexnet-cuda inference benchmark ===");
    println!("device        : {}", backend.device_name());
    println!(
        "model         : {} ({} parameters, {:.3} GFLOP/image)",
        config.name,
        thousands(config.param_count()?),
        gflop_per_image
    );
    println!("precision     : {}", backend.precision());
    println!("batch         : {}", plan.batch);
    println!(
        "iterations    : {} timed after {} warm-up",
        plan.iterations, plan.warmup
    );
    println!("throughput    : {throughput:.1} images/s ({tflops:.3} TFLOP/s)");
    println!(
        "latency/batch : min {:.2} ms, mean {:.2} ms, median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.min, latency.mean, latency.p50, latency.p90, latency.p99, latency.max
    );
    println!(
        "latency/image : {:.3} ms (mean batch latency / batch)",
        latency.mean / plan.batch as f64
    );
    if let Some(stages) = &stages {
        for (name, s) in [
            ("H2D", stages.h2d),
            ("compute", stages.compute),
            ("D2H", stages.d2h),
        ] {
            println!(
                "{:<14}: mean {:.3} ms, median {:.3} ms (CUDA events)",
                format!("GPU {name}"),
                s.mean,
                s.p50
            );
        }
    }
    Ok(())
}

/// Upload / compute / download latencies of the timed batches (GPU backends only).
struct StageSummary {
    h2d: LatencyStats,
    compute: LatencyStats,
    d2h: LatencyStats,
}

impl StageSummary {
    fn new(stages: &[StageTimings]) -> Option<Self> {
        let of = |f: fn(&StageTimings) -> f64| {
            LatencyStats::from_millis(&stages.iter().map(f).collect::<Vec<_>>())
        };
        Some(StageSummary {
            h2d: of(|s| s.h2d_ms)?,
            compute: of(|s| s.compute_ms)?,
            d2h: of(|s| s.d2h_ms)?,
        })
    }
}

fn backend_classes(backend: &dyn Backend) -> usize {
    backend.config().num_classes()
}

fn classify(args: &Args, backend: &mut dyn Backend, batch: usize) -> Result<ExitCode, Error> {
    let paths = collect_image_paths(&args.images)?;
    // Fail on an unwritable output before the run, not after it.
    if let Some(path) = &args.dump_logits {
        std::fs::File::create(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    }
    if paths.is_empty() {
        return Err(Error::Invalid {
            what: "--images",
            message: "no image files found".into(),
        });
    }
    let bar = progress_bar(args, paths.len() as u64, "classifying");
    let pre = Preprocess::default();
    let num_classes = backend_classes(backend);
    // NaN rows stay for images that fail, so row i is always input i.
    let mut logits = Array2::from_elem((paths.len(), num_classes), f32::NAN);
    let mut failures = 0usize;
    let mut results = Vec::new();
    classify_files(
        backend,
        &paths,
        batch,
        &pre,
        args.top as usize,
        |event| match event {
            ClassifyEvent::Classified(c) => {
                logits
                    .row_mut(c.index)
                    .assign(&ndarray::ArrayView1::from(&c.logits[..]));
                if args.json {
                    results.push(json!({
                        "path": c.path.display().to_string(),
                        "top": c.top.iter().map(|&(class, p)| json!({
                            "class": class,
                            "label": class_name(class).unwrap_or("?"),
                            "probability": p,
                        })).collect::<Vec<_>>(),
                    }));
                } else {
                    bar.suspend(|| {
                        println!("{}", c.path.display());
                        for &(class, p) in &c.top {
                            println!(
                                "  {:>6.2}%  {:>4}  {}",
                                p * 100.0,
                                class,
                                class_name(class).unwrap_or("?")
                            );
                        }
                    });
                }
                bar.inc(1);
            }
            ClassifyEvent::Failed { path, error, .. } => {
                failures += 1;
                if args.json {
                    results.push(
                        json!({"path": path.display().to_string(), "error": error.to_string()}),
                    );
                }
                bar.suspend(|| eprintln!("error: {error}"));
                bar.inc(1);
            }
        },
    )?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            json!({"device": backend.device_name(), "precision": backend.precision().to_string(), "images": results})
        );
    }
    if let Some(path) = &args.dump_logits {
        ndarray_npy::write_npy(path, &logits).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    if failures > 0 {
        eprintln!(
            "{failures} of {} images could not be classified",
            paths.len()
        );
        return Ok(ExitCode::from(EXIT_SOME_INPUTS_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}
