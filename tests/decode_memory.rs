//! The decode memory budget holds for the whole process, whatever the thread count: many huge
//! grey PNGs (260 KB files that decode to 256 MiB each) loaded on eight threads at once.
//!
//! Its own test binary: the figure checked is the process's peak resident memory (VmHWM).

use alexnet_cuda::image::{load_batch, Preprocess, DECODE_MEMORY_BUDGET};
use image::{GrayImage, Luma};

const SIDE: u32 = 16384;
const FILES: usize = 8;
const THREADS: usize = 8;

/// The process's peak resident set so far, in bytes (Linux only).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Before the budget each thread held the 256 MiB grey image and its 768 MiB RGB widening:
/// 8 GiB at the peak on eight threads. Now the decodes wait for each other within the budget.
#[test]
fn huge_grey_images_on_eight_threads_stay_within_the_budget() {
    let Some(before) = peak_rss() else {
        eprintln!("SKIPPED: /proc/self/status has no VmHWM on this system");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // One 16384 x 16384 grey PNG, compressed to a few hundred KB, copied FILES times.
    let first = dir.path().join("huge_0.png");
    GrayImage::from_fn(SIDE, SIDE, |x, y| {
        Luma([((x / 64 + y / 64) % 2 * 200) as u8])
    })
    .save(&first)
    .unwrap();
    let mut paths = vec![first.clone()];
    for i in 1..FILES {
        let p = dir.path().join(format!("huge_{i}.png"));
        std::fs::copy(&first, &p).unwrap();
        paths.push(p);
    }
    // Writing the file took memory too; the peak that counts is what loading adds to it.
    let after_writing = peak_rss().unwrap_or(before);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap();
    let pre = Preprocess::default();
    let loaded = pool.install(|| load_batch(&paths, &pre));
    assert_eq!(loaded.batch.len(), FILES, "{:?}", loaded.failures);
    let peak = peak_rss().unwrap_or(0);
    // The budget, plus what the process held before (the writer's buffers are freed but the
    // peak keeps them), plus slack for threads and allocator overhead.
    let allowed = after_writing.max(DECODE_MEMORY_BUDGET) + 256 * 1024 * 1024;
    eprintln!(
        "peak resident {} MiB (before loading {} MiB, allowed {} MiB)",
        peak >> 20,
        after_writing >> 20,
        allowed >> 20
    );
    assert!(
        peak <= allowed,
        "peak resident memory {peak} bytes is over {allowed} (budget {DECODE_MEMORY_BUDGET})"
    );
}
