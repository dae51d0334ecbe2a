//! One training step on the GPU (the batch uploaded from host memory, forward in training mode,
//! softmax cross-entropy, backward, the SGD update, the loss read back): paper preset, batch
//! 128, in true fp32, TF32 and mixed precision (f16 compute, f32 master weights, loss
//! scaling), reported in images/s; each from an ordinary array (pageable memory) and from the
//! trainer's page-locked batch buffer (what `train` uses). Set beside PyTorch's with `tools/torch_train_anchor.py
//! --device cuda` in the same run (tools/gpu/on-device.sh `train`). `cargo bench --bench
//! gpu_train`.
//!
//! Without a usable GPU it prints one `SKIPPED` line with the reason and measures nothing.

use std::time::Duration;

use alexnet_cuda::cuda::{CudaTrainOptions, CudaTrainer};
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::train::{SgdConfig, Trainer};
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BATCH: usize = 128;

fn trainer(weights: &Weights, precision: Precision) -> Result<CudaTrainer, String> {
    let options = CudaTrainOptions {
        precision,
        ..CudaTrainOptions::default()
    };
    CudaTrainer::with_options(weights, SgdConfig::default(), options).map_err(|e| e.to_string())
}

fn gpu_train(c: &mut Criterion) {
    let config = AlexNetConfig::paper();
    let weights = match Weights::paper_init(&config, 0) {
        Ok(w) => w,
        Err(e) => panic!("initialising the weights: {e}"),
    };
    if let Err(why) = trainer(&weights, Precision::Fp32) {
        eprintln!("gpu_train: SKIPPED, no usable GPU: {why}");
        return;
    }
    let input = synthetic_batch(BATCH, config.input, 1);
    let labels: Vec<usize> = (0..BATCH).map(|i| i * 37 % config.num_classes()).collect();
    let mut group = c.benchmark_group("gpu_train");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements(BATCH as u64));
    for precision in [Precision::Fp32, Precision::Tf32, Precision::Fp16] {
        let mut trainer = match trainer(&weights, precision) {
            Ok(t) => t,
            Err(why) => {
                eprintln!("gpu_train paper/{precision}: SKIPPED: {why}");
                continue;
            }
        };
        let mut step = 0u64;
        group.bench_function(BenchmarkId::new(format!("paper/{precision}"), BATCH), |b| {
            b.iter(|| {
                step += 1;
                match trainer.step(input.view(), &labels, step) {
                    Ok(loss) => loss,
                    Err(e) => panic!("gpu_train paper/{precision} step {step}: {e}"),
                }
            })
        });
        // What `train` does: the loader writes each batch into the trainer's page-locked
        // buffer, which goes up with one DMA (the decode runs on the loader's thread).
        let mut buffer = match trainer.batch_buffer(BATCH) {
            Ok(b) => b,
            Err(e) => panic!("gpu_train paper/{precision}: a page-locked buffer: {e}"),
        };
        match buffer.images_mut() {
            Ok(images) => images.copy_from_slice(input.as_slice().expect("a contiguous batch")),
            Err(e) => panic!("gpu_train paper/{precision}: filling the buffer: {e}"),
        }
        buffer.set_labels(labels.clone());
        let pinned = format!("paper/{precision}/page-locked");
        group.bench_function(BenchmarkId::new(pinned, BATCH), |b| {
            b.iter(|| {
                step += 1;
                match trainer.step_buffer(&buffer, step) {
                    Ok(loss) => loss,
                    Err(e) => panic!("gpu_train paper/{precision} step {step}: {e}"),
                }
            })
        });
        eprintln!(
            "gpu_train paper/{precision}: {} of {step} steps skipped (loss scale {:?})",
            trainer.skipped_steps(),
            trainer.loss_scale()
        );
    }
    group.finish();
}

criterion_group!(benches, gpu_train);
criterion_main!(benches);
