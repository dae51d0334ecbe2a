//! Where a non-finite result comes from: which weight tensors hold NaN or infinity, and which
//! layer first produces a non-finite output for a given image (on the CPU reference).

use std::fmt;

use crate::config::Precision;
use crate::cpu::CpuModel;
use crate::error::Result;
use crate::image::{Preprocess, U8Batch};
use crate::weights::Weights;

/// What [`diagnose_non_finite`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFiniteDiagnosis {
    /// Weight tensors (crate names) holding NaN or infinite values, with how many, in network
    /// order.
    pub weight_tensors: Vec<(String, usize)>,
    /// The first stage ("conv1", "lrn1", "pool1", ..., "fc3") whose output holds a NaN or an
    /// infinity when the image runs through the fp32 CPU model; `None` if every stage is finite
    /// there (the other backend's own arithmetic produced it, e.g. an fp16 overflow).
    pub first_stage: Option<String>,
}

impl fmt::Display for NonFiniteDiagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first_stage {
            Some(stage) => write!(
                f,
                "the first layer whose output is not finite is {stage} (fp32 CPU reference)"
            )?,
            None => write!(
                f,
                "the fp32 CPU reference computes finite values for this image: the backend's \
                 own arithmetic overflowed (fp16 ends at 65504)"
            )?,
        }
        if !self.weight_tensors.is_empty() {
            let list: Vec<String> = self
                .weight_tensors
                .iter()
                .map(|(name, n)| format!("{name} ({n} values)"))
                .collect();
            write!(f, "; weights holding NaN or infinity: {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// The weight tensors that hold NaN or infinite values, and how many each.
pub fn non_finite_weights(weights: &Weights) -> Vec<(String, usize)> {
    weights
        .named_tensors()
        .into_iter()
        .filter_map(|(name, _, values)| {
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            (bad > 0).then_some((name, bad))
        })
        .collect()
}

/// Explains non-finite logits for `image` (a batch of one preprocessed image): the weight
/// tensors holding non-finite values, and the first layer whose output is not finite when the
/// image runs through the fp32 [`CpuModel`] built from `weights`.
pub fn diagnose_non_finite(
    weights: &Weights,
    image: &U8Batch,
    pre: &Preprocess,
) -> Result<NonFiniteDiagnosis> {
    let model = CpuModel::new(weights, Precision::Fp32)?;
    let input = image.to_nchw_f32(pre);
    let mut first_stage = None;
    model.forward_observed(input.view(), |stage, activation| {
        if first_stage.is_none() && activation.iter().any(|v| !v.is_finite()) {
            first_stage = Some(stage.to_string());
        }
    })?;
    Ok(NonFiniteDiagnosis {
        weight_tensors: non_finite_weights(weights),
        first_stage,
    })
}
