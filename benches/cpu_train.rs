//! One training step on the CPU (forward in training mode, softmax cross-entropy, backward,
//! SGD update), paper preset, fp32, batch 16, reported in images/s. Set beside PyTorch's with
//! tools/torch_train_anchor.py in the same run. `cargo bench --bench cpu_train`.

use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::train::{CpuTrainer, SgdConfig, Trainer};
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_train");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    for preset in ["paper", "torchvision"] {
        let config = AlexNetConfig::preset(preset).expect("preset");
        let weights = Weights::paper_init(&config, 0).expect("init");
        let model = CpuModel::new(&weights, Precision::Fp32).expect("model");
        let mut trainer = CpuTrainer::new(model, SgdConfig::default()).expect("trainer");
        let batch = 16usize;
        let input = synthetic_batch(batch, config.input, 1);
        let labels: Vec<usize> = (0..batch).map(|i| i * 37 % 1000).collect();
        let mut step = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(format!("{preset}/fp32"), batch), |b| {
            b.iter(|| {
                step += 1;
                trainer.step(input.view(), &labels, step).expect("step")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
