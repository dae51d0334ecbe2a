//! `train`: SGD on an image folder, the paper's recipe by default. Argument handling,
//! the loop's bookkeeping (epochs, schedule, checkpoints, log) and reporting; the work is done
//! by library calls.

mod args;
mod interrupt;
mod log;
mod plot;
mod run;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use args::Args;

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run::train(&args, &matches) {
        Ok(run::Outcome::Completed) => ExitCode::SUCCESS,
        Ok(run::Outcome::Interrupted) => ExitCode::from(interrupt::INTERRUPTED_STATUS),
        Err(e) => {
            eprintln!("error: {e}");
            if matches!(e, alexnet_cuda::Error::DeviceUnavailable(_)) {
                eprintln!("hint: {}", cpu_hint(&args));
            }
            ExitCode::FAILURE
        }
    }
}

/// The way to the CPU in `args`' own terms, for an unusable GPU: the library says "run on the
/// CPU" and leaves the flags to us. The CPU trains in fp32 only, and `--gpu` or a mixed
/// precision with `--device cpu` is a usage error, so those go.
fn cpu_hint(args: &Args) -> String {
    let mixed = matches!(
        args.precision,
        args::TrainPrecisionArg::Fp16 | args::TrainPrecisionArg::Bf16
    );
    let flags = match mixed {
        true => "--device cpu --precision fp32",
        false => "--device cpu",
    };
    match args.gpu {
        Some(_) => format!("{flags}, without --gpu, trains on the CPU"),
        None => format!("{flags} trains on the CPU"),
    }
}
