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
use crate::stream::{BatchStream, InputSlot, StreamedBatch};
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
    /// Host wall-clock time from the previous batch's logits on the host to this one's: what
    /// the throughput is made of (with batches overlapped it is less than the latency).
    pub interval: Vec<Duration>,
    /// From each batch's submission to its logits on the host.
    pub latency: Vec<Duration>,
    /// Host time writing each batch's images into the backend's input buffer.
    pub fill: Vec<Duration>,
    /// Device-side upload / compute / download times per batch, where the backend measures them.
    pub stages: Vec<StageTimings>,
}

/// Runs `warmup` untimed then `iterations` timed batches of synthetic 8-bit images through the
/// backend's whole path ([`Backend::run_stream`]: images written into the backend's input
/// buffer, upload, preprocessing, network, logits back on the host), overlapped where the
/// backend overlaps. Like PyTorch's pinned-memory end-to-end timing, the images are written
/// into each input buffer once and reused. `progress(done, total)` is called after every batch
/// (warm-up included).
pub fn time_forward(
    backend: &mut dyn Backend,
    input: InputShape,
    plan: TimingPlan,
    progress: impl FnMut(usize, usize),
) -> Result<TimingRun> {
    if plan.batch == 0 || plan.batch > MAX_TIMING_BATCH || plan.iterations == 0 {
        return Err(Error::invalid(
            "timing plan",
            format!("batch must be 1 to {MAX_TIMING_BATCH} and iterations at least 1"),
        ));
    }
    let side = input.square_rgb_side("timing plan")?;
    let total = plan
        .warmup
        .checked_add(plan.iterations)
        .ok_or_else(|| Error::invalid("timing plan", "warm-up + iterations overflows"))?;
    let pre = Preprocess {
        crop: u32::try_from(side)
            .map_err(|_| Error::invalid("timing plan", "input side does not fit u32"))?,
        ..Preprocess::default()
    };
    let mut stream = TimedStream {
        images: synthetic_u8_batch(plan.batch, pre.crop, plan.seed)?,
        written: Vec::new(),
        filled: 0,
        taken: 0,
        total,
        warmup: plan.warmup,
        last: Instant::now(),
        run: TimingRun::default(),
        progress,
    };
    backend.run_stream(plan.batch, &pre, &mut stream)?;
    if stream.taken != total {
        return Err(Error::invalid(
            "timing",
            format!("{} of {total} batches came back", stream.taken),
        ));
    }
    Ok(stream.run)
}

/// The same synthetic batch `total` times, timed from batch `warmup` on.
struct TimedStream<P> {
    images: U8Batch,
    /// Which slots already hold the images.
    written: Vec<bool>,
    filled: usize,
    taken: usize,
    total: usize,
    warmup: usize,
    /// When the previous batch's logits arrived (the stream's start before the first).
    last: Instant,
    run: TimingRun,
    progress: P,
}

impl<P: FnMut(usize, usize)> BatchStream for TimedStream<P> {
    fn fill(&mut self, slot: InputSlot<'_>) -> Result<usize> {
        if self.filled == self.total {
            return Ok(0);
        }
        let bytes = self.images.as_slice();
        if slot.capacity < self.images.len() || slot.bytes.len() < bytes.len() {
            return Err(Error::invalid(
                "timing",
                format!("an input slot of {} images", slot.capacity),
            ));
        }
        if self.written.len() <= slot.slot {
            self.written.resize(slot.slot + 1, false);
        }
        if !self.written[slot.slot] {
            slot.bytes[..bytes.len()].copy_from_slice(bytes);
            self.written[slot.slot] = true;
        }
        self.filled += 1;
        Ok(self.images.len())
    }

    fn take(&mut self, batch: StreamedBatch) -> Result<()> {
        let now = Instant::now();
        if self.taken >= self.warmup {
            self.run.interval.push(now - self.last);
            self.run.latency.push(batch.latency);
            self.run.fill.push(batch.fill);
            self.run.stages.extend(batch.timings);
        }
        self.last = now;
        self.taken += 1;
        (self.progress)(self.taken, self.total);
        Ok(())
    }
}

/// What limited a GPU run's throughput, from where the time of a batch interval went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bottleneck {
    /// The compute stream (network, then logits' download) was busy nearly all the time.
    Compute,
    /// The upload stream was busy nearly all the time: more data than the bus carries.
    Transfer,
    /// Neither stream was: the GPU waited for the host (writing images, reading results).
    Host,
}

impl std::fmt::Display for Bottleneck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bottleneck::Compute => "compute-bound",
            Bottleneck::Transfer => "transfer-bound",
            Bottleneck::Host => "host-bound",
        })
    }
}

/// Share of a batch interval a stream must be busy for the run to count as bound by it.
pub const BUSY_SHARE: f64 = 0.85;

/// Where a batch interval of `interval_ms` went, from the mean stage times: the compute stream
/// runs compute then the download, the copy stream the upload, both overlapped with the
/// host. Returns the bottleneck and the busier stream's share of the interval.
pub fn bottleneck(interval_ms: f64, stages: &StageTimings) -> (Bottleneck, f64) {
    let compute = stages.compute_ms + stages.d2h_ms;
    let upload = stages.h2d_ms;
    let busiest = compute.max(upload);
    let share = if interval_ms > 0.0 {
        busiest / interval_ms
    } else {
        1.0
    };
    let bound = if share < BUSY_SHARE {
        Bottleneck::Host
    } else if compute >= upload {
        Bottleneck::Compute
    } else {
        Bottleneck::Transfer
    };
    (bound, share)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(h2d_ms: f64, compute_ms: f64, d2h_ms: f64) -> StageTimings {
        StageTimings {
            h2d_ms,
            compute_ms,
            d2h_ms,
        }
    }

    #[test]
    fn the_busiest_stream_names_the_bottleneck() {
        // 10 ms per batch, the GPU computing 9.5 of them: compute-bound.
        let (bound, share) = bottleneck(10.0, &stages(2.0, 9.0, 0.5));
        assert_eq!(bound, Bottleneck::Compute);
        assert!((share - 0.95).abs() < 1e-12, "{share}");
        // The upload takes longer than the compute and fills the interval.
        assert_eq!(
            bottleneck(10.0, &stages(9.8, 4.0, 0.1)).0,
            Bottleneck::Transfer
        );
        // Both streams idle a third of the time: the host is too slow.
        let (bound, share) = bottleneck(15.0, &stages(5.0, 9.0, 0.5));
        assert_eq!(bound, Bottleneck::Host);
        assert!((share - 9.5 / 15.0).abs() < 1e-12, "{share}");
        // Just under and just at the threshold.
        assert_eq!(
            bottleneck(100.0, &stages(0.0, 84.9, 0.0)).0,
            Bottleneck::Host
        );
        assert_eq!(
            bottleneck(100.0, &stages(0.0, 85.0, 0.0)).0,
            Bottleneck::Compute
        );
        assert_eq!(
            bottleneck(0.0, &stages(0.0, 0.0, 0.0)).0,
            Bottleneck::Compute
        );
    }
}
