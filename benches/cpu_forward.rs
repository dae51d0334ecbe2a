//! Whole-network forward pass on the CPU backend, paper and torchvision presets, fp32, fp16 and
//! bf16, batch 1 and 16, reported in images/s. `cargo bench --bench cpu_forward`.

use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_forward");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (preset, precision) in [
        ("paper", Precision::Fp32),
        ("torchvision", Precision::Fp32),
        ("paper", Precision::Fp16),
        // On the CPU's bf16 hardware where it has it (the bench id says which), else emulated.
        ("paper", Precision::Bf16),
        ("torchvision", Precision::Bf16),
    ] {
        let config = AlexNetConfig::preset(preset).expect("preset");
        let weights = Weights::paper_init(&config, 0).expect("init");
        let model = CpuModel::new(&weights, precision).expect("model");
        let kernels = model
            .bf16_kernels()
            .map(|k| format!(" on {k}"))
            .unwrap_or_default();
        for batch in [1usize, 16] {
            let input = synthetic_batch(batch, config.input, 1);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{preset}/{precision}{kernels}"), batch),
                &input,
                |b, x| b.iter(|| black_box(model.forward(x.view()).expect("forward"))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
