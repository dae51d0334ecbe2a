//! Each AlexNet layer on its own on the CPU backend, at the paper's shapes, batch 1 and 16.
//! Throughput is in images/s. `cargo bench --bench cpu_layers`.

use alexnet_cuda::config::InputShape;
use alexnet_cuda::config::{LrnParams, PoolSpec};
use alexnet_cuda::cpu::{Conv2d, Linear, Lrn, MaxPool2d};
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::{AlexNetConfig, Weights};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array2, Array4};
use std::hint::black_box;
use std::time::Duration;

fn activation(batch: usize, channels: usize, side: usize) -> Array4<f32> {
    let shape = InputShape {
        channels,
        height: side,
        width: side,
    };
    synthetic_batch(batch, shape, 3)
}

fn layers(c: &mut Criterion) {
    let config = AlexNetConfig::paper();
    let weights = Weights::paper_init(&config, 0).expect("init");
    let mut group = c.benchmark_group("cpu_layers");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 16] {
        group.throughput(Throughput::Elements(batch as u64));
        // Input side of each conv in the paper's network.
        let mut channels = config.input.channels;
        for (i, ((spec, params), side)) in config
            .convs
            .iter()
            .zip(weights.convs())
            .zip([224, 27, 13, 13, 13])
            .enumerate()
        {
            let conv = Conv2d::new(
                params.weight.view(),
                &params.bias,
                spec.stride,
                spec.padding,
            )
            .expect("conv");
            let x = activation(batch, channels, side);
            group.bench_with_input(
                BenchmarkId::new(format!("conv{}+relu", i + 1), batch),
                &x,
                |b, x| b.iter(|| black_box(conv.forward_relu(x.view()).expect("conv"))),
            );
            channels = spec.out_channels;
        }
        let lrn = Lrn::new(LrnParams::PAPER).expect("lrn");
        let x = activation(batch, 96, 55);
        group.bench_with_input(BenchmarkId::new("lrn1", batch), &x, |b, x| {
            b.iter(|| black_box(lrn.forward(x.view()).expect("lrn")))
        });
        let pool = MaxPool2d::from(PoolSpec::OVERLAPPING);
        group.bench_with_input(BenchmarkId::new("pool1", batch), &x, |b, x| {
            b.iter(|| black_box(pool.forward(x.view()).expect("pool")))
        });
        let mut features = config.flattened_features().expect("features");
        for (i, params) in weights.fcs().iter().enumerate() {
            let linear = Linear::new(params.weight.view(), &params.bias).expect("linear");
            let x = Array2::from_elem((batch, features), 0.5f32);
            group.bench_with_input(
                BenchmarkId::new(format!("fc{}", i + 1), batch),
                &x,
                |b, x| b.iter(|| black_box(linear.forward(x.view()).expect("linear"))),
            );
            features = linear.out_features();
        }
    }
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
