//! Whole-network forward on the GPU: fp32, tf32, fp16 and bf16, batch 1, 32, 128 and 256, from u8
//! images in host memory to logits on the host (`forward_u8`), replaying the CUDA graph
//! (`paper/...`) and launching kernel by kernel (`paper-eager/...`); and end to end through
//! the overlapped pinned [`Pipeline`](alexnet_cuda::cuda::Pipeline) with two batches in flight.
//! Reported in images/s. `cargo bench --bench gpu_forward`.
//!
//! Without a usable GPU it prints one `SKIPPED` line with the reason and measures nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use alexnet_cuda::cuda::{CudaModel, CudaOptions};
use alexnet_cuda::timing::synthetic_u8_batch;
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const PRECISIONS: [Precision; 4] = [
    Precision::Fp32,
    Precision::Tf32,
    Precision::Fp16,
    Precision::Bf16,
];

/// The paper model on the GPU in `precision`, or why there is none.
fn model(weights: &Weights, precision: Precision) -> Result<CudaModel, String> {
    CudaModel::new(weights, precision, CudaOptions::default()).map_err(|e| e.to_string())
}

/// The same, launching every kernel eagerly (no CUDA graph).
fn eager_model(weights: &Weights, precision: Precision) -> Result<CudaModel, String> {
    let options = CudaOptions {
        eager: true,
        ..CudaOptions::default()
    };
    CudaModel::new(weights, precision, options).map_err(|e| e.to_string())
}

fn gpu_benches(c: &mut Criterion) {
    let config = AlexNetConfig::paper();
    let weights = match Weights::paper_init(&config, 0) {
        Ok(w) => w,
        Err(e) => panic!("initialising the weights: {e}"),
    };
    if let Err(why) = model(&weights, Precision::Fp32) {
        eprintln!("gpu_forward: SKIPPED, no usable GPU: {why}");
        return;
    }
    let side = config.input.height as u32;

    let mut group = c.benchmark_group("gpu_forward");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (name, open) in [
        (
            "paper",
            model as fn(&Weights, Precision) -> Result<CudaModel, String>,
        ),
        ("paper-eager", eager_model),
    ] {
        for precision in PRECISIONS {
            // A model or batch that cannot be made is said, not silently left out.
            let mut gpu = match open(&weights, precision) {
                Ok(gpu) => gpu,
                Err(e) => {
                    eprintln!("gpu_forward {name}/{precision}: skipped: {e}");
                    continue;
                }
            };
            for batch in [1usize, 32, 128, 256] {
                let images = match synthetic_u8_batch(batch, side, 1) {
                    Ok(images) => images,
                    Err(e) => {
                        eprintln!("gpu_forward {name}/{precision}/{batch}: skipped: {e}");
                        continue;
                    }
                };
                // One trial first (it also chooses the algorithms; the graph is captured on
                // the next forward): a
                // batch the card cannot run (out of memory at 256 on a busy card) is said and
                // passed over, not a panic that loses every later figure.
                if let Err(e) = gpu.forward_u8(&images) {
                    eprintln!("gpu_forward {name}/{precision}/{batch}: skipped: {e}");
                    continue;
                }
                let mut failure = None;
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(
                    BenchmarkId::new(format!("{name}/{precision}"), batch),
                    |b| {
                        b.iter(|| match gpu.forward_u8(&images) {
                            Ok(logits) => drop(black_box(logits)),
                            Err(e) => drop(failure.get_or_insert(e.to_string())),
                        })
                    },
                );
                if let Some(e) = failure {
                    eprintln!("gpu_forward {name}/{precision}/{batch}: INVALID figure: {e}");
                }
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("gpu_pipeline");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for precision in [Precision::Fp32, Precision::Fp16] {
        let batch = 128usize;
        let skipped = |what: &str, e: &dyn std::fmt::Display| {
            eprintln!("gpu_pipeline paper/{precision}/{batch}: skipped: {what}: {e}");
        };
        let mut gpu = match model(&weights, precision) {
            Ok(gpu) => gpu,
            Err(e) => {
                skipped("the model", &e);
                continue;
            }
        };
        let images = match synthetic_u8_batch(batch, side, 2) {
            Ok(images) => images,
            Err(e) => {
                skipped("the batch", &e);
                continue;
            }
        };
        let mut pipeline = match gpu.pipeline(batch) {
            Ok(pipeline) => pipeline,
            Err(e) => {
                skipped("the pipeline", &e);
                continue;
            }
        };
        let mut failure = None;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(format!("paper/{precision}"), batch), |b| {
            // `iters` batches with two in flight: submit the next before waiting for the oldest.
            // A failure ends the sample and is said after the figure (marked invalid).
            b.iter_custom(|iters| {
                let start = Instant::now();
                let mut run = || -> alexnet_cuda::Result<()> {
                    pipeline.submit(&images)?;
                    for i in 0..iters {
                        if i + 1 < iters {
                            pipeline.submit(&images)?;
                        }
                        black_box(pipeline.finish()?);
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    failure.get_or_insert(e.to_string());
                }
                start.elapsed()
            })
        });
        if let Some(e) = failure {
            eprintln!("gpu_pipeline paper/{precision}/{batch}: INVALID figure: {e}");
        }
    }
    group.finish();
}

criterion_group!(benches, gpu_benches);
criterion_main!(benches);
