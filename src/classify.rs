//! Classifying image files in batches: load, preprocess, run, softmax, top-k — reporting each
//! image's result or failure as it happens.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use std::collections::VecDeque;

use ndarray::{Array2, Axis};

use crate::image::{load_batch_into, load_ten_crops_into, LoadedRows, Preprocess, U8Batch};
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
    /// The raw logits, one per class; with [`Crops::Ten`], the logarithms of the averaged
    /// probabilities (whose softmax is those probabilities again).
    pub logits: Vec<f32>,
}

/// Which patches of each image the model sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Crops {
    /// The eval transform's centre crop: one forward row per image.
    #[default]
    Centre,
    /// The paper's ten-crop test: the four corners and centre of the central
    /// `resize_shorter` square and their mirrors ([`crate::image::ten_crop`]), the ten
    /// softmax outputs averaged. Ten forward rows per image.
    Ten,
}

impl Crops {
    /// Forward rows per image.
    pub fn rows_per_image(self) -> usize {
        match self {
            Crops::Centre => 1,
            Crops::Ten => crate::image::TEN,
        }
    }
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
    classify_files_with(backend, paths, batch, pre, k, Crops::Centre, on_event)
}

/// [`classify_files`] with a choice of [`Crops`]: `batch` counts images, so with
/// [`Crops::Ten`] each forward computes `10 * batch` rows.
pub fn classify_files_with<'a>(
    backend: &mut dyn Backend,
    paths: &'a [PathBuf],
    batch: usize,
    pre: &Preprocess,
    k: usize,
    crops: Crops,
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
        crops,
        next: 0,
        filled: VecDeque::new(),
        on_event,
    };
    backend.run_stream(batch * crops.rows_per_image(), pre, &mut stream)?;
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
    crops: Crops,
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
        let per_image = self.crops.rows_per_image();
        let size = self.batch.min(slot.capacity / per_image);
        if size == 0 {
            return Err(Error::invalid(
                "classify",
                format!(
                    "a slot of {} rows holds no {per_image}-crop image",
                    slot.capacity
                ),
            ));
        }
        // A chunk whose images all fail leaves the slot empty: decode the next one into it.
        while self.next < self.paths.len() {
            let start = self.next;
            let end = (start + size).min(self.paths.len());
            self.next = end;
            let paths = &self.paths[start..end];
            let rows = match self.crops {
                Crops::Centre => load_batch_into(paths, self.pre, slot.bytes)?,
                Crops::Ten => load_ten_crops_into(paths, self.pre, slot.bytes)?,
            };
            let n = rows.sources.len();
            self.filled.push_back(FilledChunk { start, rows });
            if n > 0 {
                return Ok(n * per_image);
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
        let per_image = self.crops.rows_per_image();
        let rows = chunk.rows.sources.len() * per_image;
        if batch.logits.nrows() != rows {
            return Err(Error::Shape {
                op: "classify",
                expected: format!("logits for {rows} rows"),
                found: batch.logits.shape().to_vec(),
            });
        }
        let (probabilities, logits) = match self.crops {
            Crops::Centre => (softmax(batch.logits.view()), batch.logits.to_owned()),
            Crops::Ten => {
                let averaged = average_groups(&softmax(batch.logits.view()), per_image);
                let logs = averaged.mapv(f32::ln);
                (averaged, logs)
            }
        };
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
                            logits: logits.row(row).to_vec(),
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

/// The mean of each group of `group` consecutive rows (one image's crops).
fn average_groups(rows: &Array2<f32>, group: usize) -> Array2<f32> {
    let (n, classes) = rows.dim();
    let mut out = Array2::zeros((n / group, classes));
    for (mut mean, crops) in out
        .outer_iter_mut()
        .zip(rows.axis_chunks_iter(Axis(0), group))
    {
        // Summed in f64: ten probabilities of up to 1000 classes lose nothing.
        for (c, m) in mean.iter_mut().enumerate() {
            let sum: f64 = crops.column(c).iter().map(|&p| p as f64).sum();
            *m = (sum / group as f64) as f32;
        }
    }
    out
}
