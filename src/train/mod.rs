//! Training: the optimiser, one training step (forward with dropout, softmax cross-entropy,
//! backward, update), the data (an image folder, its order, the paper's augmentation),
//! validation and checkpoints. The layers' backward passes live beside their forwards in
//! [`crate::cpu`]; the `train` binary drives all of it.
//!
//! ```
//! use alexnet_cuda::config::{AlexNetConfig, InputShape, LinearSpec};
//! use alexnet_cuda::cpu::CpuModel;
//! use alexnet_cuda::train::{CpuTrainer, SgdConfig, Trainer};
//! use alexnet_cuda::{Precision, Weights};
//!
//! # fn main() -> alexnet_cuda::Result<()> {
//! // A small AlexNet-shaped network (the presets work the same, only slower).
//! let mut config = AlexNetConfig::five_conv_three_fc("tiny", [8, 12, 10, 9, 8], None);
//! config.input = InputShape { channels: 3, height: 67, width: 67 };
//! for (fc, width) in config.fcs.iter_mut().zip([32, 24, 5]) {
//!     fc.out_features = width;
//! }
//! let weights = Weights::paper_init(&config, 7)?;
//! let model = CpuModel::new(&weights, Precision::Fp32)?;
//! let mut trainer = CpuTrainer::new(model, SgdConfig::default())?;
//! let batch = ndarray::Array4::<f32>::ones((4, 3, 67, 67));
//! let loss = trainer.step(batch.view(), &[0, 1, 2, 3], 0)?;
//! assert!(loss.is_finite());
//!
//! // As `train` does: the loader writes into a reusable buffer of the trainer's (page-locked
//! // on the GPU, so the batch goes up with no host copy) and the step reads it from there.
//! let mut buffer = trainer.batch_buffer(4)?;
//! buffer.images_mut()?.fill(1.0);
//! buffer.set_labels(vec![0, 1, 2, 3]);
//! let next = trainer.step_buffer(&buffer, 1)?;
//! assert!(next < loss, "the same batch again: {loss} -> {next}");
//! # Ok(())
//! # }
//! ```

mod batch_buffer;
mod checkpoint;
mod data;
mod evaluate;
mod loss_scale;
mod sgd;

pub use batch_buffer::BatchBuffer;
#[cfg(feature = "cuda")]
pub(crate) use batch_buffer::ContentsKey;
pub use checkpoint::{Checkpoint, TrainState, MOMENTUM_PREFIX, TRAIN_STATE_KEY};
pub use data::{
    Augmentation, Batch, BatchMaker, Draw, ImageFolder, Sample, SampleOrder,
    IMAGENET_PCA_EIGENVALUES, IMAGENET_PCA_EIGENVECTORS,
};
pub use evaluate::{evaluate, Evaluation};
pub use loss_scale::{unscale_gradients, LossScale, SavedLossScale};
pub use sgd::{Sgd, SgdConfig, UpdateRule};

use ndarray::ArrayView4;

use crate::config::AlexNetConfig;
use crate::cpu::{softmax_cross_entropy, CpuModel};
use crate::error::Result;
use crate::image::Preprocess;
use crate::weights::Weights;

/// A backend that trains: one step of SGD on a batch, and the state a run saves and restores.
/// [`CpuTrainer`] implements it here, `cuda::CudaTrainer` on the GPU; both keep their weights
/// and momentum in the same names, order and layout, so a checkpoint written by one resumes on
/// the other.
pub trait Trainer {
    /// Forward in training mode (dropout masks from `step_seed`), the mean softmax
    /// cross-entropy against `labels`, backward, and one optimiser update. Returns the loss
    /// before the update.
    fn step(&mut self, batch: ArrayView4<'_, f32>, labels: &[usize], step_seed: u64)
        -> Result<f32>;

    /// A reusable buffer for batches of `batch` images of this network's input, in the host
    /// memory this trainer reads fastest: the heap here, page-locked memory on the GPU. A run
    /// fills one with [`BatchMaker::fill`] while the trainer steps on another.
    fn batch_buffer(&self, batch: usize) -> Result<BatchBuffer> {
        let input = &self.config().input;
        BatchBuffer::on_heap([batch, input.channels, input.height, input.width])
    }

    /// [`Trainer::step`] on a filled buffer's images and labels. The buffer may be refilled
    /// as soon as this returns.
    fn step_buffer(&mut self, buffer: &BatchBuffer, step_seed: u64) -> Result<f32> {
        self.step(buffer.images()?, buffer.labels(), step_seed)
    }

    /// [`Trainer::step_buffer`] on `buffer`, with `next` (the batch the following step will
    /// take) sent ahead while this one computes. The GPU trainer uploads a page-locked `next`
    /// on its copy stream during this step, so the following step on the same buffer, unless
    /// its images were written in between ([`BatchBuffer::images_mut`]), starts computing at
    /// once; other trainers ignore `next`. `next` stays the caller's: it may be refilled or
    /// never stepped on, and `buffer` may be refilled as soon as this returns.
    fn step_buffer_prefetch(
        &mut self,
        buffer: &BatchBuffer,
        step_seed: u64,
        next: Option<&BatchBuffer>,
    ) -> Result<f32> {
        let _ = next;
        self.step_buffer(buffer, step_seed)
    }

    /// The network being trained.
    fn config(&self) -> &AlexNetConfig;

    /// The learning rate of the next step.
    fn learning_rate(&self) -> f32;

    /// A new learning rate for the next steps (a schedule); the momentum is kept.
    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()>;

    /// The current parameters (to save, to evaluate, or to go on training elsewhere).
    fn weights(&self) -> Result<Weights>;

    /// The momentum of every trainable tensor in network order (none before the first step).
    fn velocity(&self) -> Result<Vec<Vec<f32>>>;

    /// Restores the momentum (from a checkpoint): one vector per trainable tensor, or none.
    fn set_velocity(&mut self, velocity: Vec<Vec<f32>>) -> Result<()>;

    /// Top-1/top-5 of the current parameters on `folder` (inference mode), in batches of
    /// `batch`.
    fn evaluate(
        &mut self,
        folder: &ImageFolder,
        preprocess: &Preprocess,
        batch: usize,
    ) -> Result<Evaluation>;

    /// Mixed precision: the loss scale of the next step and how many steps so far were skipped
    /// because their gradients overflowed; `None` where the loss is not scaled.
    fn loss_scaling(&self) -> Option<(f32, u64)> {
        None
    }

    /// Mixed precision: the loss scale's whole state, for a checkpoint; `None` where the loss
    /// is not scaled.
    fn saved_loss_scale(&self) -> Option<SavedLossScale> {
        None
    }

    /// Continues the loss scaling from a checkpoint's state. A trainer that does not scale its
    /// loss (fp32, TF32, the CPU: a resumed run may change its precision) has nothing to
    /// continue and ignores it.
    fn restore_loss_scale(&mut self, saved: SavedLossScale) -> Result<()> {
        let _ = saved;
        Ok(())
    }
}

/// The CPU model with its optimiser.
#[derive(Clone, Debug)]
pub struct CpuTrainer {
    pub model: CpuModel,
    /// Its momentum buffers are those of the trainable tensors (after the frozen layers).
    pub optimiser: Sgd,
    /// The first `frozen_layers` layers with parameters (conv1, conv2, ...) keep their
    /// weights: fine-tuning trains only what follows them.
    pub frozen_layers: usize,
}

impl CpuTrainer {
    pub fn new(model: CpuModel, optimiser: SgdConfig) -> Result<Self> {
        Ok(CpuTrainer {
            model,
            optimiser: Sgd::new(optimiser)?,
            frozen_layers: 0,
        })
    }
}

impl Trainer for CpuTrainer {
    fn step(
        &mut self,
        batch: ArrayView4<'_, f32>,
        labels: &[usize],
        step_seed: u64,
    ) -> Result<f32> {
        let tape = self.model.forward_train(batch, step_seed)?;
        let loss = softmax_cross_entropy(tape.logits()?, labels)?;
        let grads = self
            .model
            .backward_trainable(&tape, loss.grad.view(), self.frozen_layers)?;
        drop(tape); // every stage's activation: free it before the update touches memory
        let mut params = self.model.parameters_mut();
        let trainable = params.split_off(params.len().saturating_sub(grads.tensors.len()));
        self.optimiser.step(trainable, &grads)?;
        // The next step's backward writes its gradients into this memory.
        self.model.recycle_gradients(grads);
        Ok(loss.loss)
    }

    fn config(&self) -> &AlexNetConfig {
        self.model.config()
    }

    fn learning_rate(&self) -> f32 {
        self.optimiser.config().learning_rate
    }

    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()> {
        self.optimiser.set_learning_rate(learning_rate)
    }

    fn weights(&self) -> Result<Weights> {
        self.model.weights()
    }

    fn velocity(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.optimiser.velocity().to_vec())
    }

    fn set_velocity(&mut self, velocity: Vec<Vec<f32>>) -> Result<()> {
        // One buffer per trainable tensor (those after the frozen layers' weight and bias), or
        // none: checked here, not at the next step, so a wrong checkpoint fails where it loads.
        let params = self.model.parameters();
        let trainable = &params[(2 * self.frozen_layers).min(params.len())..];
        let want: Vec<usize> = trainable.iter().map(|p| p.len()).collect();
        let found: Vec<usize> = velocity.iter().map(Vec::len).collect();
        if !velocity.is_empty() && found != want {
            return Err(crate::Error::Shape {
                op: "CpuTrainer::set_velocity",
                expected: format!("momentum tensors of {want:?}"),
                found,
            });
        }
        self.optimiser.set_velocity(velocity);
        Ok(())
    }

    fn evaluate(
        &mut self,
        folder: &ImageFolder,
        preprocess: &Preprocess,
        batch: usize,
    ) -> Result<Evaluation> {
        evaluate(&mut self.model, folder, preprocess, batch)
    }
}
