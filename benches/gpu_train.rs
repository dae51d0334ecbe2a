//! One training step on the GPU (the batch uploaded from host memory, forward in training mode,
//! softmax cross-entropy, backward, the SGD update, the loss read back): paper preset, batch
//! 128, in true fp32 kept to the GEMM-family convolutions (`fp32+gemm-only`), fp32 as it runs
//! by default (FFT and Winograd allowed), TF32 and mixed precision (f16 compute, f32 master
//! weights, loss scaling); the last three also with cuDNN's fastest backward algorithms whether
//! deterministic or not (`+nondeterministic`, PyTorch's default: `fp32+nondeterministic` is
//! the anchor's fp32 exactly), reported in images/s; each from an ordinary array (pageable
//! memory), from the trainer's page-locked batch buffer, and from two such buffers taking
//! turns with the next one sent ahead on the copy stream during each step (`sent-ahead`: what
//! `train` does). Before each mode's figures, after a warm-up that settles the CUDA graph and
//! the loss scale: one profiled step from each source, printing where the step's time goes on
//! the GPU phase by phase (`CudaTrainer::step_profiled`), the convolutions' algorithms and the
//! graph's state; a step that fails is said and passes over its figure, not the run. Set
//! beside PyTorch's with `tools/torch_train_anchor.py --device cuda` in the same run
//! (tools/gpu/on-device.sh `trainbench`). `cargo bench --bench gpu_train`.
//!
//! Without a usable GPU it prints one `SKIPPED` line with the reason and measures nothing.

use std::time::Duration;

use alexnet_cuda::cuda::{CudaTrainOptions, CudaTrainer, GraphStatus};
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::train::{BatchBuffer, SgdConfig, Trainer};
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use ndarray::ArrayView4;

const BATCH: usize = 128;

/// One measured configuration of the trainer.
#[derive(Clone, Copy)]
struct Mode {
    precision: Precision,
    fp32_gemm_only: bool,
    deterministic: bool,
    channels_last: bool,
}

impl Mode {
    const fn new(precision: Precision, fp32_gemm_only: bool, deterministic: bool) -> Self {
        Mode {
            precision,
            fp32_gemm_only,
            deterministic,
            channels_last: false,
        }
    }

    /// The same in channels-last (NHWC) activations.
    const fn channels_last(self) -> Self {
        Mode {
            channels_last: true,
            ..self
        }
    }

    /// `fp32+gemm-only`, `fp32`, `fp16+nondeterministic`, `fp16+channels-last`, ...
    fn name(&self) -> String {
        let mut name = self.precision.to_string();
        if self.fp32_gemm_only {
            name.push_str("+gemm-only");
        }
        if !self.deterministic {
            name.push_str("+nondeterministic");
        }
        if self.channels_last {
            name.push_str("+channels-last");
        }
        name
    }
}

/// NCHW in every mode, then channels-last beside the default fp32 and mixed precision: the
/// layout PyTorch's tensor-core advice (and its `channels_last` anchor) uses, to be measured
/// against NCHW on the card before it becomes the default.
const MODES: [Mode; 10] = [
    Mode::new(Precision::Fp32, true, true),
    Mode::new(Precision::Fp32, false, true),
    Mode::new(Precision::Fp32, false, false),
    Mode::new(Precision::Tf32, false, true),
    Mode::new(Precision::Tf32, false, false),
    Mode::new(Precision::Fp16, false, true),
    Mode::new(Precision::Fp16, false, false),
    Mode::new(Precision::Bf16, false, true),
    Mode::new(Precision::Fp32, false, true).channels_last(),
    Mode::new(Precision::Fp16, false, true).channels_last(),
];

fn trainer(weights: &Weights, mode: Mode) -> Result<CudaTrainer, String> {
    let options = CudaTrainOptions {
        precision: mode.precision,
        fp32_gemm_only: mode.fp32_gemm_only,
        deterministic: mode.deterministic,
        channels_last: mode.channels_last,
        ..CudaTrainOptions::default()
    };
    CudaTrainer::with_options(weights, SgdConfig::default(), options).map_err(|e| e.to_string())
}

/// Steps from `input` until the CUDA graph is settled (replaying, or known not to be) and no
/// step was skipped for three steps in a row, at most 20 steps: the first step chooses the
/// convolution algorithms (cuDNN's Find), the second captures the graph, and mixed precision's
/// first steps may overflow (each a skipped step; the graph replays on, reading the lowered
/// scale on the device). None of that is what a training run's steps cost.
fn warm_up(
    trainer: &mut CudaTrainer,
    input: ArrayView4<'_, f32>,
    labels: &[usize],
    step: &mut u64,
) -> alexnet_cuda::Result<()> {
    let mut calm = 0;
    for _ in 0..20 {
        let skipped = trainer.skipped_steps();
        *step += 1;
        trainer.step(input, labels, *step)?;
        let settled = trainer.graph_status() != GraphStatus::NotCaptured;
        calm = match settled && trainer.skipped_steps() == skipped {
            true => calm + 1,
            false => 0,
        };
        if *step >= 2 && calm >= 3 {
            break;
        }
    }
    Ok(())
}

/// Times `one_step` as the figure `id` after one trial step. A failure is said and passes
/// over this figure only (a panic would lose every later mode's figures and profiles): the
/// trial's failure skips the figure, a timed step's marks it invalid.
fn measure(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    label: &str,
    step: &mut u64,
    mut one_step: impl FnMut(u64) -> alexnet_cuda::Result<f32>,
) {
    *step += 1;
    if let Err(e) = one_step(*step) {
        eprintln!("gpu_train {label}: SKIPPED, its trial step failed: {e}");
        return;
    }
    let mut failure = None;
    group.bench_function(id, |b| {
        b.iter(|| {
            *step += 1;
            one_step(*step).unwrap_or_else(|e| {
                failure.get_or_insert(e.to_string());
                f32::NAN
            })
        })
    });
    if let Some(e) = failure {
        eprintln!("gpu_train {label}: INVALID figure, a timed step failed: {e}");
    }
}

/// A batch buffer of `trainer`'s (page-locked) or on the heap holding `batch` and `labels`.
fn filled(
    buffer: alexnet_cuda::Result<BatchBuffer>,
    batch: &[f32],
    labels: &[usize],
) -> alexnet_cuda::Result<BatchBuffer> {
    let mut buffer = buffer?;
    buffer.images_mut()?.copy_from_slice(batch);
    buffer.set_labels(labels.to_vec());
    Ok(buffer)
}

/// One profiled step from `buffer` (after `stage`, which may send it ahead), printed.
fn print_profile(
    trainer: &mut CudaTrainer,
    label: &str,
    step: &mut u64,
    stage: impl FnOnce(&mut CudaTrainer, u64) -> alexnet_cuda::Result<f32>,
    buffer: &BatchBuffer,
) {
    *step += 1;
    let profiled = stage(trainer, *step).and_then(|_| {
        *step += 1;
        trainer.step_profiled(buffer, *step)
    });
    match profiled {
        Ok((_, profile)) => eprintln!("{label} profile (one eager step):\n{profile}"),
        Err(e) => eprintln!("{label} profiled step {step} skipped: {e}"),
    }
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
    let Some(batch) = input.as_slice() else {
        panic!("synthetic_batch gives a contiguous batch");
    };
    let mut group = c.benchmark_group("gpu_train");
    group
        .sample_size(10)
        // 9 modes x 3 sources must fit one device run beside the tests: a step is 10-120 ms,
        // so 4 s still times 30 or more after a 1 s warm-up (the steps that choose the
        // algorithms and capture the graph run before, outside the figures).
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(BATCH as u64));
    for settings in MODES {
        let mode = settings.name();
        let label = format!("paper/{mode}");
        let mut trainer = match trainer(&weights, settings) {
            Ok(t) => t,
            Err(why) => {
                eprintln!("gpu_train {label}: SKIPPED: {why}");
                continue;
            }
        };
        let mut step = 0u64;
        if let Err(e) = warm_up(&mut trainer, input.view(), &labels, &mut step) {
            eprintln!("gpu_train {label}: SKIPPED, warm-up step {step} failed: {e}");
            continue;
        }
        // The buffers `train` uses: page-locked ones written by the loader (two taking turns
        // when the next batch is sent ahead), and one on the heap for the pageable path.
        let buffers = filled(trainer.batch_buffer(BATCH), batch, &labels).and_then(|buffer| {
            let other = filled(trainer.batch_buffer(BATCH), batch, &labels)?;
            let heap = filled(BatchBuffer::on_heap(buffer.shape()), batch, &labels)?;
            Ok((buffer, other, heap))
        });
        let (buffer, other, heap) = match buffers {
            Ok(buffers) => buffers,
            Err(e) => {
                eprintln!("gpu_train {label}: SKIPPED, its batch buffers: {e}");
                continue;
            }
        };
        // First what a failing figure must not take with it: where one step's time goes on
        // the GPU, phase by phase, from each source (`sent-ahead`: the batch the previous step
        // sent up on the copy stream), the algorithms behind it, and whether the figures
        // replay a graph.
        let direct = |_: &mut CudaTrainer, _| Ok(0.0);
        print_profile(
            &mut trainer,
            &format!("gpu_train {label}/pageable"),
            &mut step,
            direct,
            &heap,
        );
        print_profile(
            &mut trainer,
            &format!("gpu_train {label}/page-locked"),
            &mut step,
            direct,
            &buffer,
        );
        let send_ahead = |t: &mut CudaTrainer, s| t.step_buffer_prefetch(&other, s, Some(&buffer));
        print_profile(
            &mut trainer,
            &format!("gpu_train {label}/sent-ahead"),
            &mut step,
            send_ahead,
            &buffer,
        );
        eprintln!("gpu_train {label} convolution algorithms (cuDNN's measurements):");
        for line in trainer.conv_choices() {
            eprintln!("  {line}");
        }
        eprintln!("gpu_train {label}: graph {:?}", trainer.graph_status());

        measure(
            &mut group,
            BenchmarkId::new(label.clone(), BATCH),
            &label,
            &mut step,
            |s| trainer.step(input.view(), &labels, s),
        );
        // What `train` does without sending ahead: the loader writes each batch into the
        // trainer's page-locked buffer, which goes up with one DMA.
        let pinned = format!("{label}/page-locked");
        measure(
            &mut group,
            BenchmarkId::new(pinned.clone(), BATCH),
            &pinned,
            &mut step,
            |s| trainer.step_buffer(&buffer, s),
        );
        // What `train` does: the next batch goes up on the copy stream while this one
        // computes (`step_buffer_prefetch`), two page-locked buffers taking turns.
        let sent_ahead = format!("{label}/sent-ahead");
        measure(
            &mut group,
            BenchmarkId::new(sent_ahead.clone(), BATCH),
            &sent_ahead,
            &mut step,
            |s| {
                let (now, next) = match s % 2 {
                    0 => (&buffer, &other),
                    _ => (&other, &buffer),
                };
                trainer.step_buffer_prefetch(now, s, Some(next))
            },
        );
        eprintln!(
            "gpu_train {label}: {} of {step} steps skipped (loss scale {:?}), graph {:?}",
            trainer.skipped_steps(),
            trainer.loss_scale(),
            trainer.graph_status()
        );
    }
    group.finish();
}

criterion_group!(benches, gpu_train);
criterion_main!(benches);
