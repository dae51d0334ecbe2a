//! Dynamic loss scaling for mixed-precision training, as PyTorch's `torch.amp.GradScaler`: the
//! loss is multiplied by a large scale before the backward so that small f16 gradients do not
//! flush to zero; the gradients are divided by it again into the f32 master gradients; a step
//! whose gradients overflowed (an infinity or NaN) is skipped and the scale halved, and after
//! `growth_interval` good steps in a row the scale doubles.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a run's loss scaling stands, as a checkpoint keeps it: a resumed mixed-precision run
/// goes on from this scale instead of starting again at the top and skipping steps to find it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedLossScale {
    /// The next step's scale.
    pub scale: f32,
    /// Good steps since the scale last changed.
    pub good_steps: u32,
    /// Steps skipped so far because their gradients overflowed.
    pub skipped_steps: u64,
}

/// The scale and its schedule. [`Default`] is PyTorch's: 2^16, doubled after 2000 good steps,
/// halved on an overflow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    scale: f32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    /// Good steps since the scale last changed.
    good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
        }
    }
}

impl LossScale {
    /// A schedule starting at `scale`: multiplied by `growth_factor` (> 1) after
    /// `growth_interval` (>= 1) good steps in a row, by `backoff_factor` (in (0, 1)) on an
    /// overflow.
    pub fn new(
        scale: f32,
        growth_factor: f32,
        backoff_factor: f32,
        growth_interval: u32,
    ) -> Result<Self> {
        let valid = scale.is_finite()
            && scale > 0.0
            && growth_factor.is_finite()
            && growth_factor > 1.0
            && backoff_factor > 0.0
            && backoff_factor < 1.0
            && growth_interval >= 1;
        if !valid {
            return Err(Error::invalid(
                "loss scale",
                format!(
                    "scale {scale}, growth {growth_factor}, backoff {backoff_factor}, interval \
                     {growth_interval}: need a finite positive scale, growth > 1, backoff in \
                     (0, 1) and an interval of at least 1"
                ),
            ));
        }
        Ok(LossScale {
            scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            good_steps: 0,
        })
    }

    /// The scale to multiply the next step's loss (its gradient) by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Good steps since the scale last changed (the scale grows when this reaches the
    /// interval).
    pub fn good_steps(&self) -> u32 {
        self.good_steps
    }

    /// This schedule, continued from a saved `scale` and count of `good_steps` (from a
    /// checkpoint's [`SavedLossScale`]). A count at or past this schedule's growth interval
    /// (saved under a longer one: the checkpoint keeps no schedule) means the growth is due:
    /// the next good step grows the scale.
    pub fn resumed(self, scale: f32, good_steps: u32) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid(
                "saved loss scale",
                format!("scale {scale}: need a finite positive scale"),
            ));
        }
        Ok(LossScale {
            scale,
            good_steps: good_steps.min(self.growth_interval.saturating_sub(1)),
            ..self
        })
    }

    /// Records whether this step's gradients overflowed and moves the scale; returns whether
    /// the step is to be applied (false: skip the update, as GradScaler does). The scale never
    /// grows to infinity and never shrinks to zero.
    pub fn update(&mut self, overflowed: bool) -> bool {
        if overflowed {
            self.scale = (self.scale * self.backoff_factor).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            let grown = self.scale * self.growth_factor;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.good_steps = 0;
        }
        true
    }
}

/// The CPU twin of the `grad_unscale` kernel: every gradient times `1 / scale` in f32 (one
/// rounding), and whether any product is infinite or NaN: an infinite or NaN gradient, or a
/// finite one that a scale below 1 takes past f32's range.
pub fn unscale_gradients(gradients: &[f32], scale: f32) -> (Vec<f32>, bool) {
    let inv_scale = 1.0 / scale;
    let unscaled: Vec<f32> = gradients.iter().map(|g| g * inv_scale).collect();
    let overflowed = unscaled.iter().any(|g| !g.is_finite());
    (unscaled, overflowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GradScaler's schedule, step by step: growth after the interval, backoff and a restarted
    /// count on an overflow, skipped steps reported.
    #[test]
    fn the_scale_follows_grad_scalers_schedule() {
        let mut scale = LossScale::new(1024.0, 2.0, 0.5, 3).unwrap();
        let mut seen = Vec::new();
        for overflowed in [false, false, true, false, false, false, false] {
            let applied = scale.update(overflowed);
            seen.push((applied, scale.scale()));
        }
        assert_eq!(
            seen,
            [
                (true, 1024.0),
                (true, 1024.0),
                (false, 512.0), // overflow: halved, count restarted
                (true, 512.0),
                (true, 512.0),
                (true, 1024.0), // three good steps: doubled
                (true, 1024.0),
            ]
        );
        assert_eq!(LossScale::default().scale(), 65536.0);
    }

    /// A schedule resumed from its scale and count goes on exactly as the uninterrupted one.
    #[test]
    fn a_resumed_schedule_continues_the_uninterrupted_one() {
        let overflows = [
            false, true, false, false, false, false, true, false, false, false,
        ];
        let mut whole = LossScale::new(1024.0, 2.0, 0.5, 3).unwrap();
        let mut first = whole;
        for &o in &overflows[..4] {
            first.update(o);
        }
        // Saved between two growths: the count matters for when the next one comes.
        assert_eq!((first.scale(), first.good_steps()), (512.0, 2));
        let mut resumed = LossScale::new(1024.0, 2.0, 0.5, 3)
            .unwrap()
            .resumed(first.scale(), first.good_steps())
            .unwrap();
        let mut seen = (Vec::new(), Vec::new());
        for (i, &o) in overflows.iter().enumerate() {
            let applied = whole.update(o);
            if i >= 4 {
                seen.0.push((applied, whole.scale()));
                seen.1.push((resumed.update(o), resumed.scale()));
            }
        }
        assert_eq!(seen.0, seen.1);
        assert!(seen.0.iter().any(|&(_, s)| s != 1024.0), "the scale moved");
        // Nothing that could not have been saved is taken.
        let schedule = LossScale::default();
        assert!(schedule.resumed(f32::INFINITY, 0).is_err());
        assert!(schedule.resumed(0.0, 0).is_err());
        assert_eq!(schedule.resumed(8.0, 1999).unwrap().scale(), 8.0);
    }

    /// A count saved under a longer growth interval than the resuming schedule's is not an
    /// error: the growth it has earned comes with the next good step, and an overflow still
    /// halves the scale as usual.
    #[test]
    fn a_count_past_the_growth_interval_grows_the_scale_at_the_next_good_step() {
        let schedule = LossScale::new(1024.0, 2.0, 0.5, 10).unwrap();
        for saved_count in [10, 50, u32::MAX] {
            let mut resumed = schedule.resumed(8.0, saved_count).unwrap();
            assert_eq!(resumed.good_steps(), 9);
            assert!(resumed.update(false));
            assert_eq!((resumed.scale(), resumed.good_steps()), (16.0, 0));
            let mut resumed = schedule.resumed(8.0, saved_count).unwrap();
            assert!(!resumed.update(true));
            assert_eq!((resumed.scale(), resumed.good_steps()), (4.0, 0));
        }
    }

    #[test]
    fn the_scale_stays_finite_and_positive() {
        let mut scale = LossScale::new(f32::MAX, 2.0, 0.5, 1).unwrap();
        scale.update(false);
        assert_eq!(scale.scale(), f32::MAX);
        let mut scale = LossScale::new(f32::MIN_POSITIVE, 2.0, 0.5, 1).unwrap();
        scale.update(true);
        assert_eq!(scale.scale(), f32::MIN_POSITIVE);
        for bad in [
            (0.0, 2.0, 0.5, 1),
            (1.0, 1.0, 0.5, 1),
            (1.0, 2.0, 1.0, 1),
            (1.0, 2.0, 0.5, 0),
        ] {
            assert!(
                LossScale::new(bad.0, bad.1, bad.2, bad.3).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unscaling_divides_and_reports_overflow() {
        let (g, overflowed) = unscale_gradients(&[1024.0, -3.0, 0.5], 1024.0);
        assert_eq!(
            (g, overflowed),
            (vec![1.0, -3.0 / 1024.0, 0.5 / 1024.0], false)
        );
        assert!(unscale_gradients(&[1.0, f32::INFINITY], 2.0).1);
        assert!(unscale_gradients(&[f32::NAN], 2.0).1);
        // Finite, but past f32's range once divided by a scale below 1.
        assert!(unscale_gradients(&[3.0e38], 0.5).1);
        assert!(!unscale_gradients(&[3.0e38], 1.0).1);
    }
}
