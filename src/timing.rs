//! Timing synthetic batches and summarising latencies, trtexec-style: what `infer` reports when it
//! is given no images.

use std::time::{Duration, Instant};

use ndarray::Array4;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::backend::Backend;
use crate::config::InputShape;
use crate::error::{Error, Result};

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

/// Settings of one timing run.
#[derive(Clone, Copy, Debug)]
pub struct TimingPlan {
    pub batch: usize,
    pub warmup: usize,
    pub iterations: usize,
    pub seed: u64,
}

/// Runs `warmup` untimed then `iterations` timed forward passes over one synthetic batch.
/// `progress(done, total)` is called after every pass (warm-up included).
pub fn time_forward(
    backend: &mut dyn Backend,
    input: InputShape,
    plan: TimingPlan,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Duration>> {
    if plan.batch == 0 || plan.iterations == 0 {
        return Err(Error::invalid(
            "timing plan",
            "batch and iterations must be at least 1",
        ));
    }
    let total = plan
        .warmup
        .checked_add(plan.iterations)
        .ok_or_else(|| Error::invalid("timing plan", "warm-up + iterations overflows"))?;
    let batch = synthetic_batch(plan.batch, input, plan.seed);
    let mut times = Vec::with_capacity(plan.iterations);
    for i in 0..total {
        let start = Instant::now();
        backend.forward(batch.view())?;
        if i >= plan.warmup {
            times.push(start.elapsed());
        }
        progress(i + 1, total);
    }
    Ok(times)
}
