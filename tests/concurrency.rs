//! Thread safety as documented: which types are Send/Sync, and two threads running inference at
//! once get the same results as one thread.

mod common;

use alexnet_cuda::cpu::{CpuModel, CHUNK_IMAGES};
use alexnet_cuda::timing::synthetic_batch;
use alexnet_cuda::{AlexNetConfig, Precision, Weights};

fn assert_send_sync<T: Send + Sync>() {}
#[cfg(feature = "cuda")]
fn assert_send<T: Send>() {}

#[test]
fn documented_thread_safety() {
    assert_send_sync::<CpuModel>();
    assert_send_sync::<Weights>();
    assert_send_sync::<AlexNetConfig>();
    assert_send_sync::<alexnet_cuda::image::U8Batch>();
    #[cfg(feature = "cuda")]
    {
        assert_send::<alexnet_cuda::cuda::CudaModel>();
        assert_send_sync::<alexnet_cuda::cuda::Gpu>();
    }
}

#[test]
fn two_threads_sharing_one_cpu_model_match_one_thread() {
    let config = AlexNetConfig::torchvision();
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let a = synthetic_batch(3, config.input, 1);
    let b = synthetic_batch(2, config.input, 2);
    let alone_a = model.forward(a.view()).unwrap();
    let alone_b = model.forward(b.view()).unwrap();
    let (together_a, together_b) = std::thread::scope(|scope| {
        let ta = scope.spawn(|| {
            (0..3)
                .map(|_| model.forward(a.view()).unwrap())
                .collect::<Vec<_>>()
        });
        let tb = scope.spawn(|| {
            (0..3)
                .map(|_| model.forward(b.view()).unwrap())
                .collect::<Vec<_>>()
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    for logits in &together_a {
        assert_eq!(logits, &alone_a);
    }
    for logits in &together_b {
        assert_eq!(logits, &alone_b);
    }
    assert_ne!(
        alone_a.row(0),
        alone_b.row(0),
        "different inputs, different logits"
    );
}

/// Batches larger than one chunk are split (their linear layers then run on the whole batch);
/// the split must not change any logit, in fp32 and in bf16 (native kernels where the CPU has
/// them).
#[test]
fn chunked_forward_equals_per_image_forward() {
    let config = AlexNetConfig::torchvision();
    let weights = common::formula_weights(&config);
    let n = CHUNK_IMAGES + 3;
    let input = synthetic_batch(n, config.input, 9);
    for precision in [Precision::Fp32, Precision::Bf16] {
        let model = CpuModel::new(&weights, precision).unwrap();
        let all = model.forward(input.view()).unwrap();
        assert_eq!(all.dim(), (n, 1000));
        for i in [0, CHUNK_IMAGES - 1, CHUNK_IMAGES, n - 1] {
            let one = model
                .forward(input.slice(ndarray::s![i..i + 1, .., .., ..]))
                .unwrap();
            let err = common::rel_max_error(
                all.row(i).as_slice().unwrap(),
                &one.row(0).iter().map(|&v| v as f64).collect::<Vec<_>>(),
            );
            assert!(err <= 1e-6, "{precision} image {i}: {err:e}");
        }
    }
}
