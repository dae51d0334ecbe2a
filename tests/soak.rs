//! Long runs: many batches through one model, checking that memory stays flat and results stay
//! identical. Ignored by default (minutes); run them with
//! `tools/test.sh --test soak -- --ignored` (the GPU one needs a GPU and fails without one).

mod common;

use alexnet_cuda::image::Preprocess;
use alexnet_cuda::timing::synthetic_u8_batch;
use alexnet_cuda::{open_backend, AlexNetConfig, Backend, DeviceChoice, Precision};

/// Resident set size of this process in bytes (Linux: /proc/self/statm).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Runs `batches` batches; after a warm-up of a tenth of them, RSS may grow by at most
/// `max_growth` bytes, and every batch's logits must equal the first batch's bit for bit.
fn soak(backend: &mut dyn Backend, batches: usize, max_growth: u64) {
    let pre = Preprocess::default();
    let batch = synthetic_u8_batch(4, pre.crop, 5).unwrap();
    let first = backend.forward_u8(&batch, &pre).unwrap();
    let warmup = batches / 10;
    let mut baseline = None;
    for i in 1..batches {
        let logits = backend.forward_u8(&batch, &pre).unwrap();
        assert!(logits == first, "batch {i}: logits changed");
        if i == warmup {
            baseline = rss_bytes();
        }
        if i % (batches / 10).max(1) == 0 {
            eprintln!(
                "batch {i}/{batches}: rss {:?} MiB",
                rss_bytes().map(|b| b >> 20)
            );
        }
    }
    if let (Some(before), Some(after)) = (baseline, rss_bytes()) {
        let growth = after.saturating_sub(before);
        eprintln!(
            "rss after warm-up {} MiB, at the end {} MiB",
            before >> 20,
            after >> 20
        );
        assert!(
            growth <= max_growth,
            "memory grew by {growth} bytes over {batches} batches"
        );
    } else {
        panic!("cannot read /proc/self/statm: this soak test needs Linux");
    }
}

#[test]
#[ignore = "soak: 200 CPU batches (about a minute); tools/test.sh --test soak -- --ignored"]
fn soak_cpu_200_batches() {
    let weights = common::formula_weights(&AlexNetConfig::torchvision());
    let mut opened = open_backend(&weights, DeviceChoice::Cpu, Precision::Fp32).unwrap();
    soak(opened.backend.as_mut(), 200, 16 << 20);
}

#[test]
#[ignore = "soak: 10,000 batches on an NVIDIA GPU; tools/test.sh --test soak -- --ignored on a GPU machine"]
fn soak_gpu_10000_batches() {
    let _gpu = common::exclusive_gpu();
    let weights = common::formula_weights(&AlexNetConfig::paper());
    let mut opened = open_backend(&weights, DeviceChoice::Cuda, Precision::Fp16)
        .unwrap_or_else(|e| panic!("{e}"));
    soak(opened.backend.as_mut(), 10_000, 16 << 20);
}
