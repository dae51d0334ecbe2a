//! Timing synthetic batches and summarising latencies, trtexec-style: what `infer` reports when it
//! is given no images.

use std::time::{Duration, Instant};

use ndarray::Array4;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::backend::{Backend, StageTimings};
use crate::config::InputShape;
use crate::error::{Error, Result};
use crate::image::{Preprocess, U8Batch};
use ::image::{Rgb, RgbImage};

/// Latency summary in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatencyStats {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencyStats {
    /// Summarises samples in milliseconds (percentiles interpolated linearly, as numpy does).
    /// `None` for no samples.
    pub fn from_millis(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let percentile = |q: f64| {
            let pos = q * (sorted.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        };
        Some(LatencyStats {
            min: sorted[0],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: percentile(0.5),
            p90: percentile(0.9),
            p99: percentile(0.99),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// A seeded batch of standard-normal values: what a normalised image batch looks like.
pub fn synthetic_batch(batch: usize, input: InputShape, seed: u64) -> Array4<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array4::from_shape_simple_fn((batch, input.channels, input.height, input.width), || {
        StandardNormal.sample(&mut rng)
    })
}

/// The largest batch the timing helpers build (a 4096-image u8 batch is 600 MiB): larger asks
/// are a typed error rather than an allocation that aborts the process.
pub const MAX_TIMING_BATCH: usize = 4096;

/// A seeded batch of random 8-bit images (`crop x crop x 3` each), what the image loader
/// produces: timing from it measures the whole path from host bytes to logits.
pub fn synthetic_u8_batch(batch: usize, crop: u32, seed: u64) -> Result<U8Batch> {
    if batch == 0 || batch > MAX_TIMING_BATCH {
        return Err(Error::invalid(
            "batch",
            format!("{batch} images (the timing helpers take 1 to {MAX_TIMING_BATCH})"),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = U8Batch::with_capacity(crop, batch);
    for _ in 0..batch {
        let image = RgbImage::from_fn(crop, crop, |_, _| {
            Rgb([rng.random(), rng.random(), rng.random()])
        });
        out.push(&image)?;
    }
    Ok(out)
}

/// Settings of one timing run.
#[derive(Clone, Copy, Debug)]
pub struct TimingPlan {
    pub batch: usize,
    pub warmup: usize,
    pub iterations: usize,
    pub seed: u64,
}

/// What a timing run measured, one entry per timed batch.
#[derive(Clone, Debug, Default)]
pub struct TimingRun {
    /// Host wall-clock time per batch, from 8-bit host images to logits on the host.
    pub wall: Vec<Duration>,
    /// Device-side upload / compute / download times per batch, where the backend measures them.
    pub stages: Vec<StageTimings>,
}

/// Runs `warmup` untimed then `iterations` timed batches of synthetic 8-bit images through the
/// backend's whole path (upload, preprocessing, network, logits back on the host).
/// `progress(done, total)` is called after every batch (warm-up included).
pub fn time_forward(
    backend: &mut dyn Backend,
    input: InputShape,
    plan: TimingPlan,
    mut progress: impl FnMut(usize, usize),
) -> Result<TimingRun> {
    if plan.batch == 0 || plan.batch > MAX_TIMING_BATCH || plan.iterations == 0 {
        return Err(Error::invalid(
            "timing plan",
            format!("batch must be 1 to {MAX_TIMING_BATCH} and iterations at least 1"),
        ));
    }
    if input.channels != 3 || input.height != input.width {
        return Err(Error::invalid(
            "timing plan",
            format!(
                "synthetic images are square RGB; the model takes {}x{}x{}",
                input.channels, input.height, input.width
            ),
        ));
    }
    let total = plan
        .warmup
        .checked_add(plan.iterations)
        .ok_or_else(|| Error::invalid("timing plan", "warm-up + iterations overflows"))?;
    let pre = Preprocess {
        crop: input.height as u32,
        ..Preprocess::default()
    };
    let batch = synthetic_u8_batch(plan.batch, pre.crop, plan.seed)?;
    let mut run = TimingRun::default();
    for i in 0..total {
        let start = Instant::now();
        backend.forward_u8(&batch, &pre)?;
        if i >= plan.warmup {
            run.wall.push(start.elapsed());
            run.stages.extend(backend.last_stage_timings());
        }
        progress(i + 1, total);
    }
    Ok(run)
}
