//! Timing synthetic batches and printing the trtexec-style report.

use std::time::Duration;

use alexnet_cuda::backend::StageTimings;
use alexnet_cuda::config::thousands;
use alexnet_cuda::peak::{dense_peak, DensePeak};
use alexnet_cuda::timing::{bottleneck, time_forward, Bottleneck, LatencyStats, TimingPlan};
use alexnet_cuda::{Backend, Error, Precision, Weights};
use serde_json::json;

use crate::args::Args;
use crate::output::say;
use crate::progress::progress_bar;

pub fn benchmark(
    args: &Args,
    backend: &mut dyn Backend,
    weights: &Weights,
    plan: TimingPlan,
) -> Result<(), Error> {
    let config = weights.config();
    let bar = progress_bar(args, (plan.warmup + plan.iterations) as u64, "timing");
    let run = time_forward(backend, config.input, plan, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let ms = |samples: &[Duration]| -> Vec<f64> {
        samples.iter().map(|t| t.as_secs_f64() * 1e3).collect()
    };
    let (Some(latency), Some(interval), Some(fill)) = (
        LatencyStats::from_millis(&ms(&run.latency)),
        LatencyStats::from_millis(&ms(&run.interval)),
        LatencyStats::from_millis(&ms(&run.fill)),
    ) else {
        return Err(Error::Invalid {
            what: "--iterations",
            message: "no timed iterations".into(),
        });
    };
    let total: Duration = run.interval.iter().sum();
    let images = (plan.batch * run.interval.len()) as f64;
    let throughput = images / total.as_secs_f64();
    let gflop_per_image = config.flops_per_image()? as f64 / 1e9;
    let tflops = throughput * gflop_per_image / 1e3;
    let peak = dense_peak(&backend.device_name(), backend.precision());
    let stages = StageSummary::new(&run.stages);
    let bound = stages.as_ref().map(|s| {
        bottleneck(
            interval.mean,
            &StageTimings {
                h2d_ms: s.h2d.mean,
                compute_ms: s.compute.mean,
                d2h_ms: s.d2h.mean,
            },
        )
    });
    if args.json {
        let mut report = json!({
            "device": backend.device_name(),
            "precision": backend.precision().to_string(),
            "fp32_gemm_only": gemm_only_applied(args, backend),
            "config": config.name,
            "batch": plan.batch,
            "warmup": plan.warmup,
            "iterations": plan.iterations,
            "throughput_img_per_s": throughput,
            "latency_ms": latency,
            "interval_ms": interval,
            "fill_ms": fill,
            "gflop_per_image": gflop_per_image,
            "achieved_tflops": tflops,
        });
        if let Some(peak) = peak {
            report["dense_peak_tflops"] = json!(peak.tflops);
            report["share_of_dense_peak"] = json!(tflops / peak.tflops);
        }
        if let Some(details) = backend.device_details() {
            report["device_details"] = json!(details);
        }
        if let Some(stages) = &stages {
            report["stage_ms"] = json!({
                "h2d": stages.h2d,
                "compute": stages.compute,
                "d2h": stages.d2h,
            });
        }
        if let Some((bound, share)) = bound {
            report["bound"] = json!(bound);
            report["busiest_stream_share"] = json!(share);
        }
        say!("{report}");
        return Ok(());
    }
    say!("=== alexnet-cuda inference benchmark ===");
    say!("device        : {}", backend.device_name());
    if let Some(details) = backend.device_details() {
        say!("libraries     : {details}");
    }
    say!(
        "model         : {} ({} parameters, {:.3} GFLOP/image)",
        config.name,
        thousands(config.param_count()?),
        gflop_per_image
    );
    say!(
        "precision     : {}{}",
        backend.precision(),
        convolution_algorithms(args, backend)
    );
    if backend.is_gpu() && backend.precision() == Precision::Fp32 {
        // The comparison users make: PyTorch's defaults are not its true fp32.
        say!(
            "compare with  : PyTorch with torch.backends.cudnn.allow_tf32 = False (its default, \
             True, runs convolutions in TF32; --precision tf32 runs them and the linear layers so)"
        );
    }
    say!("batch         : {}", plan.batch);
    say!(
        "iterations    : {} timed after {} warm-up",
        plan.iterations,
        plan.warmup
    );
    say!(
        "throughput    : {throughput:.1} images/s ({tflops:.3} TFLOP/s{})",
        peak.map(|p| of_peak(tflops, p, backend.precision()))
            .unwrap_or_default()
    );
    say!(
        "latency/batch : min {:.2} ms, mean {:.2} ms, median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.min, latency.mean, latency.p50, latency.p90, latency.p99, latency.max
    );
    say!(
        "interval      : mean {:.2} ms, median {:.2} ms (logits to logits; throughput = batch / interval)",
        interval.mean,
        interval.p50
    );
    say!(
        "host fill     : mean {:.3} ms per batch (writing the images into the input buffer)",
        fill.mean
    );
    if let Some(stages) = &stages {
        for (name, s) in [
            ("H2D", stages.h2d),
            ("compute", stages.compute),
            ("D2H", stages.d2h),
        ] {
            say!(
                "{:<14}: mean {:.3} ms, median {:.3} ms (CUDA events)",
                format!("GPU {name}"),
                s.mean,
                s.p50
            );
        }
    }
    if let Some((bound, share)) = bound {
        let why = match bound {
            Bottleneck::Compute => "the compute stream",
            Bottleneck::Transfer => "the upload",
            Bottleneck::Host => "the GPU waits for the host; the busiest stream",
        };
        say!(
            "bound         : {bound} ({why} is busy {:.0}% of each interval)",
            share * 100.0
        );
    }
    Ok(())
}

/// Upload / compute / download latencies of the timed batches (GPU backends only).
struct StageSummary {
    h2d: LatencyStats,
    compute: LatencyStats,
    d2h: LatencyStats,
}

impl StageSummary {
    fn new(stages: &[StageTimings]) -> Option<Self> {
        let of = |f: fn(&StageTimings) -> f64| {
            LatencyStats::from_millis(&stages.iter().map(f).collect::<Vec<_>>())
        };
        Some(StageSummary {
            h2d: of(|s| s.h2d_ms)?,
            compute: of(|s| s.compute_ms)?,
            d2h: of(|s| s.d2h_ms)?,
        })
    }
}

/// Which convolution algorithms GPU fp32 may run, so that two reports say what they compare:
/// every one without tensor cores (PyTorch's fp32) unless `--fp32-gemm-only`.
fn convolution_algorithms(args: &Args, backend: &dyn Backend) -> &'static str {
    match (backend.is_gpu(), backend.precision(), args.fp32_gemm_only) {
        (true, Precision::Fp32, false) => {
            " (FMA math; cuDNN may pick FFT and Winograd convolutions)"
        }
        (true, Precision::Fp32, true) => " (FMA math; GEMM-family convolutions only)",
        _ => "",
    }
}

/// Whether `--fp32-gemm-only` took effect (GPU fp32); elsewhere it was only noted.
fn gemm_only_applied(args: &Args, backend: &dyn Backend) -> bool {
    args.fp32_gemm_only && backend.is_gpu() && backend.precision() == Precision::Fp32
}

/// `, 41.6% of the H200 SXM's dense fp32 peak (67 TFLOP/s)`: the achieved figure beside the
/// datasheet's.
fn of_peak(tflops: f64, peak: DensePeak, precision: alexnet_cuda::Precision) -> String {
    format!(
        ", {:.1}% of the {}'s dense {precision} peak ({} TFLOP/s)",
        100.0 * tflops / peak.tflops,
        peak.card,
        peak.tflops
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The H200's fp32 forward of 2026-11-29 (27.896 TFLOP/s) against its datasheet peak.
    #[test]
    fn the_achieved_figure_is_set_beside_the_datasheets_peak() {
        let peak = DensePeak {
            card: "H200 SXM",
            tflops: 67.0,
        };
        assert_eq!(
            of_peak(27.896, peak, alexnet_cuda::Precision::Fp32),
            ", 41.6% of the H200 SXM's dense fp32 peak (67 TFLOP/s)"
        );
    }
}
