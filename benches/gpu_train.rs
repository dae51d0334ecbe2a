//! One training step on the GPU (the batch uploaded from host memory, forward in training mode,
//! softmax cross-entropy, backward, the SGD update, the loss read back): paper preset, batch
//! 128, in true fp32 kept to the GEMM-family convolutions (`fp32+gemm-only`), fp32 as it runs
//! by default (FFT and Winograd allowed), TF32 and mixed precision (f16 compute, f32 master
//! weights, loss scaling); the last three also with cuDNN's fastest backward algorithms whether
//! deterministic or not (`+nondeterministic`, PyTorch's default: `fp32+nondeterministic` is
//! the anchor's fp32 exactly), reported in
//! images/s; each from an ordinary array (pageable memory), from the trainer's page-locked
//! batch buffer, and from two such buffers taking turns with the next one sent ahead on the
//! copy stream during each step (`sent-ahead`: what `train` does). After each mode's figures, one profiled step from
//! each source prints where the step's time goes on the GPU, phase by phase
//! (`CudaTrainer::step_profiled`). Set beside PyTorch's with `tools/torch_train_anchor.py
//! --device cuda` in the same run (tools/gpu/on-device.sh `train`). `cargo bench --bench
//! gpu_train`.
//!
//! Without a usable GPU it prints one `SKIPPED` line with the reason and measures nothing.

use std::time::Duration;

use alexnet_cuda::cuda::{CudaTrainOptions, CudaTrainer};
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::train::{BatchBuffer, SgdConfig, Trainer};
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BATCH: usize = 128;

/// One measured configuration of the trainer.
#[derive(Clone, Copy)]
struct Mode {
    precision: Precision,
    fp32_gemm_only: bool,
    deterministic: bool,
}

impl Mode {
    const fn new(precision: Precision, fp32_gemm_only: bool, deterministic: bool) -> Self {
        Mode {
            precision,
            fp32_gemm_only,
            deterministic,
        }
    }

    /// `fp32+gemm-only`, `fp32`, `fp16+nondeterministic`, ...
    fn name(&self) -> String {
        let mut name = self.precision.to_string();
        if self.fp32_gemm_only {
            name.push_str("+gemm-only");
        }
        if !self.deterministic {
            name.push_str("+nondeterministic");
        }
        name
    }
}

const MODES: [Mode; 7] = [
    Mode::new(Precision::Fp32, true, true),
    Mode::new(Precision::Fp32, false, true),
    Mode::new(Precision::Fp32, false, false),
    Mode::new(Precision::Tf32, false, true),
    Mode::new(Precision::Tf32, false, false),
    Mode::new(Precision::Fp16, false, true),
    Mode::new(Precision::Fp16, false, false),
];

fn trainer(weights: &Weights, mode: Mode) -> Result<CudaTrainer, String> {
    let options = CudaTrainOptions {
        precision: mode.precision,
        fp32_gemm_only: mode.fp32_gemm_only,
        deterministic: mode.deterministic,
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
    if let Err(why) = trainer(&weights, MODES[0]) {
        eprintln!("gpu_train: SKIPPED, no usable GPU: {why}");
        return;
    }
    let input = synthetic_batch(BATCH, config.input, 1);
    let labels: Vec<usize> = (0..BATCH).map(|i| i * 37 % config.num_classes()).collect();
    let mut group = c.benchmark_group("gpu_train");
    group
        .sample_size(10)
        // 7 modes x 3 sources must fit one device run beside the tests: a step is 10-120 ms,
        // so 4 s still times 30 or more after a 1 s warm-up (the steps that choose the
        // algorithms and capture the graph run before, outside the figures).
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(BATCH as u64));
    for settings in MODES {
        let mode = settings.name();
        let mut trainer = match trainer(&weights, settings) {
            Ok(t) => t,
            Err(why) => {
                eprintln!("gpu_train paper/{mode}: SKIPPED: {why}");
                continue;
            }
        };
        // The first step chooses the convolution algorithms (cuDNN's Find), the second
        // captures the CUDA graph: neither is what a training run's steps cost.
        let mut step = 0u64;
        while step < 2 {
            step += 1;
            if let Err(e) = trainer.step(input.view(), &labels, step) {
                panic!("gpu_train paper/{mode} step {step}: {e}");
            }
        }
        group.bench_function(BenchmarkId::new(format!("paper/{mode}"), BATCH), |b| {
            b.iter(|| {
                step += 1;
                match trainer.step(input.view(), &labels, step) {
                    Ok(loss) => loss,
                    Err(e) => panic!("gpu_train paper/{mode} step {step}: {e}"),
                }
            })
        });
        // What `train` does: the loader writes each batch into the trainer's page-locked
        // buffer, which goes up with one DMA (the decode runs on the loader's thread).
        let mut buffer = match trainer.batch_buffer(BATCH) {
            Ok(b) => b,
            Err(e) => panic!("gpu_train paper/{mode}: a page-locked buffer: {e}"),
        };
        let batch = input.as_slice().expect("a contiguous batch");
        match buffer.images_mut() {
            Ok(images) => images.copy_from_slice(batch),
            Err(e) => panic!("gpu_train paper/{mode}: filling the buffer: {e}"),
        }
        buffer.set_labels(labels.clone());
        let pinned = format!("paper/{mode}/page-locked");
        group.bench_function(BenchmarkId::new(pinned, BATCH), |b| {
            b.iter(|| {
                step += 1;
                match trainer.step_buffer(&buffer, step) {
                    Ok(loss) => loss,
                    Err(e) => panic!("gpu_train paper/{mode} step {step}: {e}"),
                }
            })
        });
        // What `train` does: the next batch goes up on the copy stream while this one
        // computes (`step_buffer_prefetch`), two page-locked buffers taking turns.
        let mut other = match trainer.batch_buffer(BATCH) {
            Ok(b) => b,
            Err(e) => panic!("gpu_train paper/{mode}: a second page-locked buffer: {e}"),
        };
        match other.images_mut() {
            Ok(images) => images.copy_from_slice(batch),
            Err(e) => panic!("gpu_train paper/{mode}: filling the second buffer: {e}"),
        }
        other.set_labels(labels.clone());
        let sent_ahead = format!("paper/{mode}/sent-ahead");
        group.bench_function(BenchmarkId::new(sent_ahead, BATCH), |b| {
            b.iter(|| {
                step += 1;
                let (now, next) = match step % 2 {
                    0 => (&buffer, &other),
                    _ => (&other, &buffer),
                };
                match trainer.step_buffer_prefetch(now, step, Some(next)) {
                    Ok(loss) => loss,
                    Err(e) => panic!("gpu_train paper/{mode} step {step}: {e}"),
                }
            })
        });
        // Where a step's time goes, from ordinary memory and from the page-locked buffer.
        let mut heap = match BatchBuffer::on_heap(buffer.shape()) {
            Ok(b) => b,
            Err(e) => panic!("gpu_train paper/{mode}: a heap buffer: {e}"),
        };
        match heap.images_mut() {
            Ok(images) => images.copy_from_slice(batch),
            Err(e) => panic!("gpu_train paper/{mode}: filling the heap buffer: {e}"),
        }
        heap.set_labels(labels.clone());
        for (source, buffer) in [("pageable", &heap), ("page-locked", &buffer)] {
            step += 1;
            match trainer.step_profiled(buffer, step) {
                Ok((_, profile)) => {
                    eprintln!("gpu_train paper/{mode}/{source} profile (one eager step):");
                    eprintln!("{profile}");
                }
                // Said and passed over: the throughput figures below matter more than one
                // profile (step_profiled has not run on a GPU yet).
                Err(e) => {
                    eprintln!("gpu_train paper/{mode}/{source} profiled step {step} skipped: {e}")
                }
            }
        }
        eprintln!("gpu_train paper/{mode} convolution algorithms (cuDNN's measurements):");
        for line in trainer.conv_choices() {
            eprintln!("  {line}");
        }
        eprintln!(
            "gpu_train paper/{mode}: {} of {step} steps skipped (loss scale {:?})",
            trainer.skipped_steps(),
            trainer.loss_scale()
        );
    }
    group.finish();
}

criterion_group!(benches, gpu_train);
criterion_main!(benches);
