//! Classifying image files in batches: load, preprocess, run, softmax, top-k — reporting each
//! image's result or failure as it happens.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use std::collections::VecDeque;

use crate::image::{load_batch_into, LoadedRows, Preprocess, U8Batch};
use crate::postprocess::{softmax, top_k};
use crate::stream::{BatchStream, InputSlot, StreamedBatch};

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
///
/// The batches go through [`Backend::run_stream`]: on a GPU the next batch is decoded straight
/// into a page-locked input slot while the previous one computes.
pub fn classify_files<'a>(
    backend: &mut dyn Backend,
    paths: &'a [PathBuf],
    batch: usize,
    pre: &Preprocess,
    k: usize,
    on_event: impl FnMut(ClassifyEvent<'a>),
) -> Result<()> {
    if batch == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    let mut stream = ClassifyStream {
        paths,
        batch,
        pre,
        k,
        next: 0,
        filled: VecDeque::new(),
        on_event,
    };
    backend.run_stream(batch, pre, &mut stream)?;
    // Chunks after the last batch with an image (all of whose images failed).
    stream.report_failed_chunks();
    if let Some(chunk) = stream.filled.front() {
        return Err(Error::invalid(
            "classify",
            format!("the batch from input {} was never computed", chunk.start),
        ));
    }
    Ok(())
}

/// One chunk of `batch` inputs as it was written into an input slot.
struct FilledChunk {
    /// Index of the chunk's first input.
    start: usize,
    rows: LoadedRows,
}

/// Decodes chunks of inputs into the backend's slots and turns each batch's logits into
/// events, in input order.
struct ClassifyStream<'a, 'p, F> {
    paths: &'a [PathBuf],
    batch: usize,
    pre: &'p Preprocess,
    k: usize,
    /// The first input not yet decoded.
    next: usize,
    /// Chunks decoded and not yet reported, oldest first: every one but the last has either
    /// a batch in flight or no image at all.
    filled: VecDeque<FilledChunk>,
    on_event: F,
}

impl<'a, F: FnMut(ClassifyEvent<'a>)> ClassifyStream<'a, '_, F> {
    fn report_failures(&mut self, start: usize, failures: Vec<(usize, Error)>) {
        for (local, error) in failures {
            let index = start + local;
            (self.on_event)(ClassifyEvent::Failed {
                index,
                path: &self.paths[index],
                error,
            });
        }
    }

    /// Reports the chunks at the front that hold no image (their batch was never submitted).
    fn report_failed_chunks(&mut self) {
        while self
            .filled
            .front()
            .is_some_and(|chunk| chunk.rows.sources.is_empty())
        {
            if let Some(chunk) = self.filled.pop_front() {
                self.report_failures(chunk.start, chunk.rows.failures);
            }
        }
    }
}

impl<'a, F: FnMut(ClassifyEvent<'a>)> BatchStream for ClassifyStream<'a, '_, F> {
    fn fill(&mut self, slot: InputSlot<'_>) -> Result<usize> {
        let per = U8Batch::new(self.pre.crop).image_bytes();
        if per != slot.image_bytes {
            return Err(Error::Shape {
                op: "classify",
                expected: format!("images of the model's {} bytes", slot.image_bytes),
                found: vec![self.pre.crop as usize, self.pre.crop as usize, 3],
            });
        }
        let size = self.batch.min(slot.capacity);
        // A chunk whose images all fail leaves the slot empty: decode the next one into it.
        while self.next < self.paths.len() {
            let start = self.next;
            let end = (start + size).min(self.paths.len());
            self.next = end;
            let rows = load_batch_into(&self.paths[start..end], self.pre, slot.bytes)?;
            let n = rows.sources.len();
            self.filled.push_back(FilledChunk { start, rows });
            if n > 0 {
                return Ok(n);
            }
        }
        Ok(0)
    }

    fn take(&mut self, batch: StreamedBatch) -> Result<()> {
        self.report_failed_chunks();
        let chunk = self
            .filled
            .pop_front()
            .ok_or_else(|| Error::invalid("classify", "logits for a batch never filled"))?;
        let rows = chunk.rows.sources.len();
        if batch.logits.nrows() != rows {
            return Err(Error::Shape {
                op: "classify",
                expected: format!("logits for {rows} images"),
                found: batch.logits.shape().to_vec(),
            });
        }
        let probabilities = softmax(batch.logits.view());
        let mut failures = chunk.rows.failures.into_iter().peekable();
        let mut sources = chunk.rows.sources.iter().enumerate().peekable();
        // Merge successes and failures back into input order.
        while sources.peek().is_some() || failures.peek().is_some() {
            let next_ok = sources.peek().map(|(_, &local)| local);
            let next_failed = failures.peek().map(|(local, _)| *local);
            match (next_ok, next_failed) {
                (Some(ok), failed) if failed.is_none_or(|f| ok < f) => {
                    if let Some((row, &local)) = sources.next() {
                        let index = chunk.start + local;
                        (self.on_event)(ClassifyEvent::Classified(Classification {
                            index,
                            path: &self.paths[index],
                            top: top_k(probabilities.row(row), self.k)?,
                            logits: batch.logits.row(row).to_vec(),
                        }));
                    }
                }
                _ => {
                    if let Some((local, error)) = failures.next() {
                        let index = chunk.start + local;
                        (self.on_event)(ClassifyEvent::Failed {
                            index,
                            path: &self.paths[index],
                            error,
                        });
                    }
                }
            }
        }
        // Failed-only chunks right behind this batch are reported now, not at the next one.
        self.report_failed_chunks();
        Ok(())
    }
}
