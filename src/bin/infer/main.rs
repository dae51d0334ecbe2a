//! `infer`: run AlexNet on images or time it on synthetic batches. Argument parsing and
//! reporting only; the work is done by library calls.

mod args;
mod benchmark;
mod classify;
mod dump;
mod output;
mod progress;

use std::process::ExitCode;

use alexnet_cuda::timing::TimingPlan;
use alexnet_cuda::{open_backend_with, AlexNetConfig, BackendOptions, Error, Precision, Weights};
use clap::{CommandFactory, FromArgMatches};

use args::{check_flags, usage_error, Args, ConfigArg};
use benchmark::benchmark;
use classify::classify;
use output::say;

/// Exit code when some images could not be read or decoded (the rest were classified).
pub const EXIT_SOME_INPUTS_FAILED: u8 = 3;
/// Exit code for a fatal error (bad weights, unusable device, unreadable output path).
pub const EXIT_FATAL: u8 = 1;

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    check_flags(&matches, &args);
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if matches!(e, Error::DeviceUnavailable(_)) {
                eprintln!("hint: {}", cpu_hint(&args));
            }
            ExitCode::from(EXIT_FATAL)
        }
    }
}

/// The way to the CPU in `args`' own terms, for an unusable GPU: the library says "run on the
/// CPU" and leaves the flag to us. `--gpu` with `--device cpu` is a usage error, so it goes.
fn cpu_hint(args: &Args) -> String {
    match args.gpu {
        Some(_) => "--device cpu, without --gpu, runs on the CPU".to_string(),
        None => "--device cpu runs on the CPU".to_string(),
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
        say!(
            "AlexNet ({}), input {}x{}x{}",
            config.name,
            config.input.channels,
            config.input.height,
            config.input.width
        );
        say!("{}", config.summary()?);
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
    let precision: Precision = args.precision.into();
    if args.fp32_gemm_only && precision != Precision::Fp32 {
        usage_error(format!(
            "--fp32-gemm-only applies to --precision fp32 only, not {precision}"
        ));
    }
    let options = BackendOptions {
        fp32_gemm_only: args.fp32_gemm_only,
        gpu: args.gpu.unwrap_or(0),
    };
    let opened = open_backend_with(&weights, args.device.into(), precision, options)?;
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
        classify(args, backend.as_mut(), batch, &weights)
    }
}
