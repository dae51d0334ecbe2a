//! Overlapped GPU inference: while the GPU computes one batch, the next batch's pixels go up
//! through page-locked memory on the copy stream.
//!
//! ```sh
//! cargo run --release --example pipeline -- 128 20   # batch size, number of batches
//! ```
//!
//! Needs an NVIDIA GPU; elsewhere it stops with the reason (no driver, no cuDNN, ...).

use std::process::ExitCode;
use std::time::Instant;

use alexnet_cuda::cuda::{CudaModel, CudaOptions};
use alexnet_cuda::timing::synthetic_u8_batch;
use alexnet_cuda::{AlexNetConfig, Precision, Weights};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map_or(Ok(128), |a| a.parse())?;
    let batches: usize = args.next().map_or(Ok(20), |a| a.parse())?;

    let config = AlexNetConfig::paper();
    let weights = Weights::paper_init(&config, 0)?;
    let mut model = CudaModel::new(&weights, Precision::Fp16, CudaOptions::default())?;
    println!("running on {}", model.device_name());
    let images = synthetic_u8_batch(batch, config.input.height as u32, 7)?;

    let mut pipeline = model.pipeline(batch)?;
    let start = Instant::now();
    // Keep two batches in flight: submit the next before waiting for the oldest.
    pipeline.submit(&images)?;
    for i in 0..batches {
        if i + 1 < batches {
            pipeline.submit(&images)?;
        }
        let out = pipeline.finish()?;
        println!(
            "batch {i}: logits {:?}, upload {:.2} ms, compute {:.2} ms, download {:.2} ms",
            out.logits.dim(),
            out.timings.h2d_ms,
            out.timings.compute_ms,
            out.timings.d2h_ms
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{:.0} images/s over {batches} batches of {batch}",
        (batches * batch) as f64 / seconds
    );
    Ok(())
}
