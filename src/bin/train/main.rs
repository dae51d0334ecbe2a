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
            // The library says "run on the CPU"; the flag that does it is ours to name.
            if matches!(e, alexnet_cuda::Error::DeviceUnavailable(_)) {
                eprintln!("hint: --device cpu trains on the CPU (in fp32)");
            }
            ExitCode::FAILURE
        }
    }
}
