//! Validation: top-1 and top-5 error of a model over an image folder with the eval transform.

use std::path::PathBuf;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::image::{load_batch, Preprocess};
use crate::train::ImageFolder;

/// What [`evaluate`] measured.
#[derive(Debug)]
pub struct Evaluation {
    /// Images classified (those that decoded).
    pub images: usize,
    /// Images whose label was not the top class, and not among the top five.
    pub top1_wrong: usize,
    pub top5_wrong: usize,
    /// Images that could not be read or decoded, with the reason; they count in neither error.
    pub failures: Vec<(PathBuf, Error)>,
}

impl Evaluation {
    /// Top-1 error as a fraction (NaN when nothing was classified).
    pub fn top1_error(&self) -> f64 {
        self.top1_wrong as f64 / self.images as f64
    }

    /// Top-5 error as a fraction (NaN when nothing was classified).
    pub fn top5_error(&self) -> f64 {
        self.top5_wrong as f64 / self.images as f64
    }
}

/// Classifies every image of `folder` with `model` (`batch` at a time, `preprocess` as the
/// transform) and counts top-1 and top-5 errors. A label beyond the model's classes is an
/// error (the folder does not belong to this model).
pub fn evaluate(
    model: &mut dyn Backend,
    folder: &ImageFolder,
    preprocess: &Preprocess,
    batch: usize,
) -> Result<Evaluation> {
    let classes = model.config().num_classes();
    if folder.classes().len() > classes {
        return Err(Error::invalid(
            "validation data",
            format!(
                "{} classes, the model has {classes}",
                folder.classes().len()
            ),
        ));
    }
    let mut result = Evaluation {
        images: 0,
        top1_wrong: 0,
        top5_wrong: 0,
        failures: Vec::new(),
    };
    for chunk in folder.samples().chunks(batch.max(1)) {
        let paths: Vec<PathBuf> = chunk.iter().map(|s| s.path.clone()).collect();
        let loaded = load_batch(&paths, preprocess);
        for (index, error) in loaded.failures {
            result.failures.push((paths[index].clone(), error));
        }
        if loaded.batch.is_empty() {
            continue;
        }
        let logits = model.forward(loaded.batch.to_nchw_f32(preprocess).view())?;
        for (row, &source) in logits.outer_iter().zip(&loaded.sources) {
            let label = chunk[source].label;
            let score = row[label];
            // Rank = how many classes score above the label (ties count for the label).
            let above = row.iter().filter(|&&v| v > score).count();
            result.images += 1;
            result.top1_wrong += usize::from(above >= 1 || score.is_nan());
            result.top5_wrong += usize::from(above >= 5 || score.is_nan());
        }
    }
    Ok(result)
}
