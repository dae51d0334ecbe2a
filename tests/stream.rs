//! Streaming batches ([`Backend::run_stream`]): the call order a GPU's two-slot pipeline
//! produces, replayed on the CPU with [`HostQueue`] at depth 2, must give every batch's logits
//! in order, and `classify_files` must report every input once, in input order, whatever
//! fails where.

mod common;

use std::path::PathBuf;

use alexnet_cuda::backend::StageTimings;
use alexnet_cuda::classify::{classify_files, ClassifyEvent};
use alexnet_cuda::config::AlexNetConfig;
use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::image::{Preprocess, U8Batch};
use alexnet_cuda::stream::{drive, BatchStream, HostQueue, InputSlot, StreamedBatch};
use alexnet_cuda::timing::{time_forward, TimingPlan};
use alexnet_cuda::{Backend, Error, Precision, Result, Weights};
use image::{Rgb, RgbImage};
use ndarray::{Array2, ArrayView4};

const SIDE: u32 = 67;

fn small_weights() -> Weights {
    let mut config = AlexNetConfig::torchvision();
    config.input.height = SIDE as usize;
    config.input.width = SIDE as usize;
    common::formula_weights(&config)
}

fn pre() -> Preprocess {
    Preprocess {
        crop: SIDE,
        ..Preprocess::default()
    }
}

/// A CPU model whose `run_stream` keeps two batches in flight, as the GPU pipeline does.
struct TwoSlots(CpuModel);

impl Backend for TwoSlots {
    fn device_name(&self) -> String {
        "two-slot CPU".into()
    }
    fn precision(&self) -> Precision {
        self.0.precision()
    }
    fn config(&self) -> &AlexNetConfig {
        Backend::config(&self.0)
    }
    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        self.0.forward(input)
    }
    fn run_stream(
        &mut self,
        max_batch: usize,
        pre: &Preprocess,
        stream: &mut dyn BatchStream,
    ) -> Result<()> {
        let mut queue = HostQueue::new(self, pre, max_batch, 2)?;
        drive(&mut queue, stream)
    }
    fn last_stage_timings(&self) -> Option<StageTimings> {
        None
    }
}

/// Writes the given batches one per fill and records every call.
struct Recorder {
    batches: Vec<U8Batch>,
    next: usize,
    calls: Vec<String>,
    logits: Vec<Array2<f32>>,
}

impl BatchStream for Recorder {
    fn fill(&mut self, slot: InputSlot<'_>) -> Result<usize> {
        let Some(batch) = self.batches.get(self.next) else {
            self.calls.push("end".into());
            return Ok(0);
        };
        self.calls
            .push(format!("fill {} slot {}", self.next, slot.slot));
        slot.bytes[..batch.as_slice().len()].copy_from_slice(batch.as_slice());
        self.next += 1;
        Ok(batch.len())
    }

    fn take(&mut self, batch: StreamedBatch) -> Result<()> {
        self.calls.push(format!("take {}", self.logits.len()));
        self.logits.push(batch.logits);
        Ok(())
    }
}

#[test]
fn two_slots_fill_ahead_and_take_in_order() {
    let weights = small_weights();
    let model = CpuModel::new(&weights, Precision::Fp32).unwrap();
    let batches: Vec<U8Batch> = [3, 1, 3, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| common::random_u8_batch(n, SIDE, 40 + i as u64))
        .collect();
    let want: Vec<Array2<f32>> = batches
        .iter()
        .map(|b| model.forward(b.to_nchw_f32(&pre()).view()).unwrap())
        .collect();

    let mut backend = TwoSlots(model);
    let mut recorder = Recorder {
        batches,
        next: 0,
        calls: Vec::new(),
        logits: Vec::new(),
    };
    backend.run_stream(3, &pre(), &mut recorder).unwrap();
    assert_eq!(
        recorder.calls,
        [
            "fill 0 slot 0",
            "fill 1 slot 1",
            "take 0",
            "fill 2 slot 0",
            "take 1",
            "fill 3 slot 1",
            "take 2",
            "end",
            "take 3"
        ]
    );
    assert_eq!(recorder.logits, want);

    // The single-buffer default computes each batch before the next fill.
    let mut model = backend.0;
    recorder.next = 0;
    recorder.calls.clear();
    recorder.logits.clear();
    model.run_stream(3, &pre(), &mut recorder).unwrap();
    assert_eq!(
        recorder.calls,
        [
            "fill 0 slot 0",
            "take 0",
            "fill 1 slot 0",
            "take 1",
            "fill 2 slot 0",
            "take 2",
            "fill 3 slot 0",
            "take 3",
            "end"
        ]
    );
    assert_eq!(recorder.logits, want);
}

/// Claims more images than the slot holds.
struct Overfill;

impl BatchStream for Overfill {
    fn fill(&mut self, slot: InputSlot<'_>) -> Result<usize> {
        Ok(slot.capacity + 1)
    }
    fn take(&mut self, _: StreamedBatch) -> Result<()> {
        Ok(())
    }
}

#[test]
fn a_fill_larger_than_its_slot_is_an_error() {
    let mut model = CpuModel::new(&small_weights(), Precision::Fp32).unwrap();
    let result = model.run_stream(2, &pre(), &mut Overfill);
    assert!(matches!(result, Err(Error::Invalid { .. })), "{result:?}");
}

#[test]
fn timing_counts_every_batch_once_through_two_slots() {
    let mut backend = TwoSlots(CpuModel::new(&small_weights(), Precision::Fp32).unwrap());
    let input = Backend::config(&backend).input;
    let mut seen = Vec::new();
    let plan = TimingPlan {
        batch: 2,
        warmup: 2,
        iterations: 3,
        seed: 1,
    };
    let run = time_forward(&mut backend, input, plan, |done, total| {
        seen.push((done, total))
    })
    .unwrap();
    assert_eq!(seen, [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]);
    assert_eq!(run.interval.len(), 3);
    assert_eq!(run.latency.len(), 3);
    assert_eq!(run.fill.len(), 3);
    assert!(run.stages.is_empty(), "the CPU measures no device stages");
}

/// Writes a photo-like PNG (a gradient of `SIDE + 9` pixels square, so the crop resizes).
fn write_png(path: &PathBuf, seed: u8) {
    let side = SIDE + 9;
    RgbImage::from_fn(side, side, |x, y| {
        Rgb([
            (x as u8).wrapping_mul(3).wrapping_add(seed),
            (y as u8).wrapping_mul(5),
            seed.wrapping_mul(7),
        ])
    })
    .save(path)
    .unwrap();
}

/// Inputs `good` (a PNG) or bad (not an image), classified 2 at a time through two slots:
/// every input is reported once, in order, and every good one has the logits of the model run
/// on that image alone.
#[test]
fn classify_reports_every_input_in_order_through_two_slots() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks of 2: [ok bad] [bad bad] [ok ok] [bad ok] [bad] — an all-failed chunk in the
    // middle and one at the end.
    let good = [true, false, false, false, true, true, false, true, false];
    let paths: Vec<PathBuf> = good
        .iter()
        .enumerate()
        .map(|(i, &ok)| {
            let path = dir.path().join(format!("{i}.png"));
            if ok {
                write_png(&path, i as u8 * 31);
            } else {
                std::fs::write(&path, b"not an image").unwrap();
            }
            path
        })
        .collect();
    let weights = small_weights();
    let reference = CpuModel::new(&weights, Precision::Fp32).unwrap();
    let pre = pre();
    let alone = |path: &PathBuf| {
        let mut one = U8Batch::new(SIDE);
        one.push(&pre.load(path).unwrap()).unwrap();
        reference.forward(one.to_nchw_f32(&pre).view()).unwrap()
    };

    for (name, mut backend) in [
        (
            "two slots",
            Box::new(TwoSlots(CpuModel::new(&weights, Precision::Fp32).unwrap()))
                as Box<dyn Backend>,
        ),
        (
            "one buffer",
            Box::new(CpuModel::new(&weights, Precision::Fp32).unwrap()),
        ),
    ] {
        let mut events = Vec::new();
        classify_files(backend.as_mut(), &paths, 2, &pre, 3, |event| {
            events.push(match event {
                ClassifyEvent::Classified(c) => (c.index, Some(c.logits)),
                ClassifyEvent::Failed { index, .. } => (index, None),
            })
        })
        .unwrap();
        let order: Vec<usize> = events.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..paths.len()).collect::<Vec<_>>(), "{name}");
        for (index, logits) in &events {
            assert_eq!(logits.is_some(), good[*index], "{name}: input {index}");
            if let Some(logits) = logits {
                let want = alone(&paths[*index]);
                let max_diff = logits
                    .iter()
                    .zip(want.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                // Batched and alone differ only by the GEMM's summation order.
                assert!(max_diff < 1e-4, "{name}: input {index}: {max_diff}");
            }
        }
    }
}
