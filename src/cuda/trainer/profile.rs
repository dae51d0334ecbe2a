//! Where one training step's time goes on the device ([`CudaTrainer::step_profiled`]): CUDA
//! events recorded on the compute stream between the step's phases (the batch's upload, each
//! stage's forward, the loss, each stage's backward, the unscaling, the update, the loss's
//! read-back), read after the step's own sync. A profiled step runs eagerly: the inside of a
//! replayed graph cannot be timed phase by phase, so the figures add the launch overhead a
//! graph saves (a few microseconds per phase).
//!
//! [`CudaTrainer::step_profiled`]: super::CudaTrainer::step_profiled

use std::fmt;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::cuda::device::{driver_err, Gpu};
use crate::cuda::events::{new_event, record};
use crate::error::Result;

/// One phase of a profiled step and its device time.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPhase {
    /// E.g. `batch upload`, `conv1 forward`, `loss`, `fc3 backward`, `sgd update`.
    pub name: String,
    /// Milliseconds between the end of the previous phase and the end of this one on the
    /// compute stream (host work that delays the stream, such as staging a pageable batch,
    /// counts in the phase it delays).
    pub ms: f64,
}

/// The phases of one training step in the order they ran, as measured by
/// [`CudaTrainer::step_profiled`](super::CudaTrainer::step_profiled). Its `Display` is a table
/// with each phase's share of the step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepProfile {
    pub phases: Vec<StepPhase>,
}

impl StepProfile {
    /// The whole step: the phases' sum.
    pub fn total_ms(&self) -> f64 {
        self.phases.iter().map(|p| p.ms).sum()
    }

    /// The summed time of the phases whose name ends with `suffix` (`" forward"`,
    /// `" backward"`).
    pub fn sum_ending_with(&self, suffix: &str) -> f64 {
        self.phases
            .iter()
            .filter(|p| p.name.ends_with(suffix))
            .map(|p| p.ms)
            .sum()
    }
}

impl fmt::Display for StepProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total_ms();
        let share = |ms: f64| if total > 0.0 { 100.0 * ms / total } else { 0.0 };
        for phase in &self.phases {
            writeln!(
                f,
                "{:<24} {:>9.3} ms {:>5.1}%",
                phase.name,
                phase.ms,
                share(phase.ms)
            )?;
        }
        for (what, suffix) in [("all forwards", " forward"), ("all backwards", " backward")] {
            let ms = self.sum_ending_with(suffix);
            writeln!(f, "{what:<24} {ms:>9.3} ms {:>5.1}%", share(ms))?;
        }
        write!(f, "{:<24} {total:>9.3} ms", "step")
    }
}

/// The events of a step being profiled: an origin, then one event at the end of each phase.
pub(super) struct StepMarks {
    events: Vec<(String, CudaEvent)>,
}

impl StepMarks {
    /// Records the origin on `gpu`'s compute stream: the first phase is timed from here.
    pub fn start(gpu: &Gpu) -> Result<Self> {
        let mut marks = StepMarks { events: Vec::new() };
        marks.mark(gpu, gpu.stream(), String::new())?;
        Ok(marks)
    }

    /// Ends the phase `name` at the stream's current position.
    pub fn mark(&mut self, gpu: &Gpu, stream: &CudaStream, name: String) -> Result<()> {
        let event = new_event(gpu)?;
        record(&event, stream)?;
        self.events.push((name, event));
        Ok(())
    }

    /// The phases' times; waits for the last event.
    pub fn finish(self) -> Result<StepProfile> {
        let mut phases = Vec::with_capacity(self.events.len().saturating_sub(1));
        for pair in self.events.windows(2) {
            let [(_, begin), (name, end)] = pair else {
                continue;
            };
            let ms = begin
                .elapsed_ms(end)
                .map_err(driver_err("cuEventElapsedTime"))?;
            phases.push(StepPhase {
                name: name.clone(),
                ms: f64::from(ms),
            });
        }
        Ok(StepProfile { phases })
    }
}

/// Ends the phase `name()` where a step is being profiled; nothing (not even the name's
/// formatting) otherwise.
pub(super) fn mark(
    marks: &mut Option<&mut StepMarks>,
    gpu: &Gpu,
    name: impl FnOnce() -> String,
) -> Result<()> {
    match marks {
        Some(marks) => marks.mark(gpu, gpu.stream(), name()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> StepProfile {
        let phase = |name: &str, ms: f64| StepPhase {
            name: name.into(),
            ms,
        };
        StepProfile {
            phases: vec![
                phase("batch upload", 10.0),
                phase("conv1 forward", 5.0),
                phase("fc1 forward", 5.0),
                phase("loss", 0.5),
                phase("fc1 backward", 9.5),
                phase("conv1 backward", 20.0),
                phase("sgd update", 50.0),
            ],
        }
    }

    #[test]
    fn totals_add_the_phases_and_group_forwards_and_backwards() {
        let p = profile();
        assert_eq!(p.total_ms(), 100.0);
        assert_eq!(p.sum_ending_with(" forward"), 10.0);
        assert_eq!(p.sum_ending_with(" backward"), 29.5);
        assert_eq!(StepProfile::default().total_ms(), 0.0);
    }

    #[test]
    fn the_table_lists_every_phase_with_its_share() {
        let table = profile().to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7 + 3, "{table}");
        assert!(lines[0].starts_with("batch upload") && lines[0].ends_with("10.0%"));
        assert!(lines[6].contains("50.000 ms") && lines[6].ends_with("50.0%"));
        assert!(lines[7].starts_with("all forwards") && lines[7].ends_with("10.0%"));
        assert!(lines[8].starts_with("all backwards") && lines[8].ends_with("29.5%"));
        assert!(lines[9].starts_with("step") && lines[9].contains("100.000 ms"));
        // An empty profile prints without dividing by zero.
        assert!(StepProfile::default().to_string().contains("0.0%"));
    }
}
