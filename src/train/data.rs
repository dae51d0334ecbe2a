//! Training data: an image folder (one subdirectory per class), the order its samples are
//! taken in, and the paper's augmentation. Everything random is drawn from counters (the
//! run's seed, the epoch, a sample's position in the run), so a run is reproducible and can
//! resume at any step without saving generator state.

use std::path::{Path, PathBuf};

use ndarray::Array4;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::BatchBuffer;
use crate::error::{Error, Result};
use crate::image::{collect_image_paths, Preprocess};

/// One labelled image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    /// The class index: the position of the class's directory in sorted order.
    pub label: usize,
}

/// A dataset laid out as `ROOT/<class>/<image>`, like torchvision's `ImageFolder`: classes are
/// the subdirectories numbered in sorted name order (byte order, hidden ones skipped), images
/// the regular files of each in sorted name order, the whole list in (class, file) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFolder {
    classes: Vec<String>,
    samples: Vec<Sample>,
}

impl ImageFolder {
    /// Lists `root`. A root that cannot be read is [`Error::Io`]; a root without class
    /// directories, or a class directory without files, is [`Error::Invalid`] naming it (an
    /// empty class would silently shift nothing but never be learned).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            let name = entry.file_name();
            let path = entry.path();
            let hidden = name.as_encoded_bytes().first() == Some(&b'.');
            if !hidden && std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                dirs.push((name, path));
            }
        }
        dirs.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
        if dirs.is_empty() {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{} has no class subdirectories (expected ROOT/<class>/<image>)",
                    root.display()
                ),
            ));
        }
        let mut classes = Vec::with_capacity(dirs.len());
        let mut samples = Vec::new();
        for (label, (name, dir)) in dirs.into_iter().enumerate() {
            let files = collect_image_paths(std::slice::from_ref(&dir))?;
            if files.is_empty() {
                return Err(Error::invalid(
                    "dataset",
                    format!("class directory {} holds no files", dir.display()),
                ));
            }
            classes.push(name.to_string_lossy().into_owned());
            samples.extend(files.into_iter().map(|path| Sample { path, label }));
        }
        Ok(ImageFolder { classes, samples })
    }

    /// Class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Every sample in (class, file) order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// The endless stream of sample indices a run takes its batches from: epoch after epoch,
/// each epoch a permutation drawn from `(seed, epoch)` (or the list order without
/// shuffling). Step `s` with batch `b` takes positions `s*b .. (s+1)*b` of the stream, so
/// batches run on across epoch ends and wrap around the list.
#[derive(Clone, Debug)]
pub struct SampleOrder {
    len: usize,
    shuffle: bool,
    seed: u64,
    /// The last epoch's permutation (a million-image epoch is not redrawn every batch).
    cached: Option<(u64, Vec<usize>)>,
}

impl SampleOrder {
    pub fn new(len: usize, shuffle: bool, seed: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("dataset", "no samples to order"));
        }
        Ok(SampleOrder {
            len,
            shuffle,
            seed,
            cached: None,
        })
    }

    /// The sample at `position` of the stream.
    pub fn at(&mut self, position: u64) -> usize {
        let len = self.len as u64;
        let (epoch, offset) = (position / len, (position % len) as usize);
        if !self.shuffle {
            return offset;
        }
        match &self.cached {
            Some((cached, order)) if *cached == epoch => order[offset],
            _ => {
                let mut order: Vec<usize> = (0..self.len).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(epoch);
                order.shuffle(&mut rng);
                let sample = order[offset];
                self.cached = Some((epoch, order));
                sample
            }
        }
    }

    /// The stream positions and sample indices of step `step`'s batch of `batch`.
    pub fn batch(&mut self, step: u64, batch: usize) -> Vec<(u64, usize)> {
        let first = step * batch as u64;
        (first..first + batch as u64)
            .map(|position| (position, self.at(position)))
            .collect()
    }
}

/// ImageNet's RGB principal components (eigenvalues, and eigenvectors as columns) on
/// [0, 1]-scaled pixels: the paper's section 4.1 lighting noise, with the values the
/// fb.resnet.torch and torchvision reference trainers use.
pub const IMAGENET_PCA_EIGENVALUES: [f32; 3] = [0.2175, 0.0188, 0.0045];
pub const IMAGENET_PCA_EIGENVECTORS: [[f32; 3]; 3] = [
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
];

/// How training images become network inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augmentation {
    /// The paper's: the shorter side resized to `resize_shorter`, the central square patch of
    /// that side, a random `crop` x `crop` window of it, flipped horizontally half the time,
    /// then PCA lighting noise (each component's weight drawn from N(0, `lighting_std`)).
    Paper { lighting_std: f32 },
    /// The evaluation transform (`--no-augment`): resize, centre crop, nothing random.
    None,
}

/// What one image's augmentation drew.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// Top-left corner of the crop inside the patch.
    pub top: u32,
    pub left: u32,
    pub flip: bool,
    /// Added to each channel of the [0, 1]-scaled pixels (before normalising).
    pub lighting: [f32; 3],
}

impl Augmentation {
    /// The draws for the sample at stream `position` of a run seeded `seed`, for a patch of
    /// `patch` and a crop of `crop` pixels.
    pub fn draw(&self, seed: u64, position: u64, patch: u32, crop: u32) -> Result<Draw> {
        let Augmentation::Paper { lighting_std } = *self else {
            let margin = patch.saturating_sub(crop);
            return Ok(Draw {
                top: margin / 2,
                left: margin / 2,
                flip: false,
                lighting: [0.0; 3],
            });
        };
        // A stream per position, beside the epoch streams of the sample order (which take
        // stream numbers from 0 up with the seed itself): the seed is mixed so they differ.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xA076_1D64_78BD_642F);
        rng.set_stream(position);
        let margin = patch.saturating_sub(crop);
        let top = rng.random_range(0..=margin);
        let left = rng.random_range(0..=margin);
        let flip = rng.random_bool(0.5);
        let normal = Normal::new(0.0f32, lighting_std)
            .map_err(|e| Error::invalid("lighting noise", e.to_string()))?;
        let alpha: [f32; 3] = std::array::from_fn(|_| normal.sample(&mut rng));
        let lighting = std::array::from_fn(|c| {
            (0..3)
                .map(|k| IMAGENET_PCA_EIGENVECTORS[c][k] * alpha[k] * IMAGENET_PCA_EIGENVALUES[k])
                .sum()
        });
        Ok(Draw {
            top,
            left,
            flip,
            lighting,
        })
    }
}

/// Makes the batches of a run: step `s`'s images decoded and augmented on rayon's threads.
#[derive(Clone, Debug)]
pub struct BatchMaker {
    folder: std::sync::Arc<ImageFolder>,
    order: SampleOrder,
    augmentation: Augmentation,
    /// The eval transform: resize, crop size, mean and std, file limits.
    preprocess: Preprocess,
    batch: usize,
    seed: u64,
}

/// One training batch: normalised images `[N, 3, crop, crop]` and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub images: Array4<f32>,
    pub labels: Vec<usize>,
}

impl BatchMaker {
    /// Batches of `batch` from `folder`, shuffled per epoch unless `shuffle` is false. The
    /// paper's patch is `preprocess.resize_shorter` square; crops are `preprocess.crop`.
    pub fn new(
        folder: std::sync::Arc<ImageFolder>,
        batch: usize,
        shuffle: bool,
        augmentation: Augmentation,
        preprocess: Preprocess,
        seed: u64,
    ) -> Result<Self> {
        preprocess.validate()?;
        if batch == 0 {
            return Err(Error::invalid("batch size", "must be at least 1"));
        }
        if let Augmentation::Paper { lighting_std } = augmentation {
            if !(lighting_std.is_finite() && lighting_std >= 0.0) {
                return Err(Error::invalid(
                    "lighting noise",
                    format!("sigma {lighting_std} must be finite and >= 0"),
                ));
            }
            preprocess.central_patch("augmentation")?;
        }
        Ok(BatchMaker {
            order: SampleOrder::new(folder.len(), shuffle, seed)?,
            folder,
            augmentation,
            preprocess,
            batch,
            seed,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Step `step`'s batch. An image that cannot be read or decoded is an error naming its
    /// path (a training run should not quietly learn from fewer images than it was given).
    pub fn make(&mut self, step: u64) -> Result<Batch> {
        let [n, c, h, w] = self.batch_shape();
        let mut images = vec![0.0f32; n * c * h * w];
        let labels = self.write_batch(step, &mut images)?;
        let images = Array4::from_shape_vec((n, c, h, w), images)
            .map_err(|e| Error::invalid("batch", e.to_string()))?;
        Ok(Batch { images, labels })
    }

    /// [`BatchMaker::make`] into a buffer of [`BatchMaker::batch_shape`] (the images and their
    /// labels), allocating nothing: what a run's loader does with the trainer's buffers.
    pub fn fill(&mut self, step: u64, buffer: &mut BatchBuffer) -> Result<()> {
        if buffer.shape() != self.batch_shape() {
            return Err(Error::Shape {
                op: "BatchMaker::fill",
                expected: format!("a buffer of {:?}", self.batch_shape()),
                found: buffer.shape().to_vec(),
            });
        }
        let labels = self.write_batch(step, buffer.images_mut()?)?;
        buffer.set_labels(labels);
        Ok(())
    }

    /// `[batch, 3, crop, crop]`: the shape of every batch it makes.
    pub fn batch_shape(&self) -> [usize; 4] {
        let crop = self.preprocess.crop as usize;
        [self.batch, 3, crop, crop]
    }

    /// Step `step`'s images into `images` (NCHW, [`BatchMaker::batch_shape`]); returns their
    /// labels.
    fn write_batch(&mut self, step: u64, images: &mut [f32]) -> Result<Vec<usize>> {
        let picks = self.order.batch(step, self.batch);
        let [_, c, h, w] = self.batch_shape();
        images
            .par_chunks_exact_mut(c * h * w)
            .zip(picks.par_iter())
            .try_for_each(|(out, &(position, index))| {
                self.write_image(&self.folder.samples()[index].path, position, out)
            })?;
        Ok(picks
            .iter()
            .map(|&(_, index)| self.folder.samples()[index].label)
            .collect())
    }

    /// Decodes, augments and normalises one image into `out` (CHW).
    fn write_image(&self, path: &Path, position: u64, out: &mut [f32]) -> Result<()> {
        let pre = &self.preprocess;
        let (patch, source) = match self.augmentation {
            Augmentation::None => (pre.crop, pre.load(path)?),
            Augmentation::Paper { .. } => {
                let square = pre.central_patch("augmentation")?;
                (square.crop, square.load(path)?)
            }
        };
        let draw = self
            .augmentation
            .draw(self.seed, position, patch, pre.crop)?;
        let crop = pre.crop as usize;
        let plane = crop * crop;
        for y in 0..crop {
            for x in 0..crop {
                let sx = if draw.flip { crop - 1 - x } else { x };
                let pixel = source.get_pixel(draw.left + sx as u32, draw.top + y as u32);
                for c in 0..3 {
                    let v = pixel.0[c] as f32 / 255.0 + draw.lighting[c];
                    out[c * plane + y * crop + x] = (v - pre.mean[c]) / pre.std[c];
                }
            }
        }
        Ok(())
    }
}
