//! Classifying image files in batches: load, preprocess, run, softmax, top-k — reporting each
//! image's result or failure as it happens.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::image::{load_batch, Preprocess};
use crate::postprocess::{softmax, top_k};

/// One classified image.
#[derive(Clone, Debug)]
pub struct Classification<'a> {
    /// Index of the image in the input list.
    pub index: usize,
    pub path: &'a Path,
    /// `(class, probability)`, most probable first.
    pub top: Vec<(usize, f32)>,
    /// The raw logits, one per class.
    pub logits: Vec<f32>,
}

/// What happened to one input.
#[derive(Debug)]
pub enum ClassifyEvent<'a> {
    Classified(Classification<'a>),
    /// The image could not be read or decoded; the others go on.
    Failed {
        index: usize,
        path: &'a Path,
        error: Error,
    },
}

/// Classifies `paths` `batch` at a time with `backend`, calling `on_event` once per input, in
/// input order. A bad image is reported as [`ClassifyEvent::Failed`] and does not stop the run;
/// an error of the backend itself (shape, device) does and is returned.
pub fn classify_files<'a>(
    backend: &mut dyn Backend,
    paths: &'a [PathBuf],
    batch: usize,
    pre: &Preprocess,
    k: usize,
    mut on_event: impl FnMut(ClassifyEvent<'a>),
) -> Result<()> {
    if batch == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    for (chunk_index, chunk) in paths.chunks(batch).enumerate() {
        let offset = chunk_index * batch;
        let loaded = load_batch(chunk, pre);
        let logits = if loaded.batch.is_empty() {
            None
        } else {
            Some(backend.forward_u8(&loaded.batch, pre)?)
        };
        let probabilities = logits.as_ref().map(|l| softmax(l.view()));
        let mut failures = loaded.failures.into_iter().peekable();
        let mut rows = loaded.sources.iter().enumerate().peekable();
        // Merge successes and failures back into input order.
        for local in 0..chunk.len() {
            let index = offset + local;
            if failures.peek().is_some_and(|(i, _)| *i == local) {
                if let Some((_, error)) = failures.next() {
                    on_event(ClassifyEvent::Failed {
                        index,
                        path: &paths[index],
                        error,
                    });
                }
            } else if let (Some((row, _)), Some(logits), Some(probabilities)) =
                (rows.next(), &logits, &probabilities)
            {
                on_event(ClassifyEvent::Classified(Classification {
                    index,
                    path: &paths[index],
                    top: top_k(probabilities.row(row), k)?,
                    logits: logits.row(row).to_vec(),
                }));
            }
        }
    }
    Ok(())
}
