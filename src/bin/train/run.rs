//! One training run: set-up (fresh or resumed), the step loop with data decoded ahead on
//! another thread, and at every epoch's end validation, the schedule, the log and a
//! checkpoint.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::image::Preprocess;
use alexnet_cuda::train::{
    Augmentation, BatchBuffer, BatchMaker, Checkpoint, CpuTrainer, ImageFolder, SgdConfig,
    TrainState, Trainer,
};
use alexnet_cuda::weights::{SaveOptions, StorageDtype};
use alexnet_cuda::{AlexNetConfig, Error, Precision, Weights};
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::{Deserialize, Serialize};

use crate::args::{Args, DeviceArg, RuleArg};
use crate::interrupt::StopRequest;
use crate::log::{append_row, progress_bar, rate, EpochRow};
use crate::plot::{plot_log, plot_paths, PICTURES};

/// The paper's epochs when neither --epochs nor --steps is given.
const DEFAULT_EPOCHS: u64 = 90;

/// What shapes a run. Checkpoints record it and a resumed run keeps it: resuming with
/// different values would not continue the same run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Settings {
    seed: u64,
    batch: usize,
    shuffle: bool,
    augment: bool,
    /// The learning rate the run started with (the current one is in the train state).
    learning_rate: f32,
    momentum: f32,
    weight_decay: f32,
    paper_rule: bool,
    decay_biases: bool,
    lr_steps: Vec<u64>,
    patience: u32,
    /// Dropout of the hidden linear layers (None: the architecture's).
    dropout: Option<f32>,
    /// Layers with parameters kept fixed, counted from conv1 (--freeze).
    #[serde(default)]
    frozen_layers: usize,
    /// Where the run ends: after `epochs` epochs or `steps` steps.
    epochs: Option<u64>,
    steps: Option<u64>,
    /// How many images --data held when the run started (absent in older checkpoints): the
    /// epochs and the shuffled order are those of that many images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    images: Option<usize>,
}

impl Settings {
    fn from_args(args: &Args) -> Self {
        Settings {
            seed: args.seed.unwrap_or(0),
            batch: args.batch as usize,
            shuffle: !args.no_shuffle,
            augment: !args.no_augment,
            learning_rate: args.lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
            paper_rule: matches!(args.update_rule, RuleArg::Paper),
            decay_biases: !args.no_bias_decay,
            lr_steps: args.lr_steps.clone(),
            patience: args.patience,
            dropout: args.dropout,
            frozen_layers: 0, // resolved against the model's layers in `start`
            epochs: args
                .epochs
                .or(args.steps.is_none().then_some(DEFAULT_EPOCHS)),
            steps: args.steps,
            images: None, // the data's, set in `start`
        }
    }

    fn sgd(&self, learning_rate: f32) -> SgdConfig {
        SgdConfig {
            learning_rate,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            rule: if self.paper_rule {
                alexnet_cuda::train::UpdateRule::Paper
            } else {
                alexnet_cuda::train::UpdateRule::PyTorch
            },
            decay_biases: self.decay_biases,
        }
    }

    /// Steps the whole run takes over `images` training images.
    fn total_steps(&self, images: usize) -> u64 {
        match (self.steps, self.epochs) {
            (Some(steps), _) => steps,
            (None, epochs) => {
                let images = epochs.unwrap_or(DEFAULT_EPOCHS) * images as u64;
                images.div_ceil(self.batch as u64)
            }
        }
    }

    /// The dropout mask seed of step `step`: distinct per step and per run seed.
    fn step_seed(&self, step: u64) -> u64 {
        self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Flags that are part of [`Settings`]: on --resume, giving one with another value than the
/// checkpoint's is a usage error.
const SETTING_FLAGS: [&str; 12] = [
    "seed",
    "batch",
    "no_shuffle",
    "no_augment",
    "lr",
    "momentum",
    "weight_decay",
    "update_rule",
    "no_bias_decay",
    "lr_steps",
    "patience",
    "dropout",
];

pub fn train(args: &Args, matches: &ArgMatches) -> Result<Outcome, Error> {
    let checkpoint_path = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| args.save.with_extension("ckpt.safetensors"));
    refuse_clobbering(args, &checkpoint_path)?;
    let folder = Arc::new(ImageFolder::open(&args.data)?);
    let val = args.val.as_ref().map(ImageFolder::open).transpose()?;
    if let Some(val) = &val {
        if val.classes() != folder.classes() {
            return Err(Error::invalid(
                "--val",
                "its class directories differ from --data's (the labels would not match)",
            ));
        }
    }
    let (mut trainer, mut state, settings) = match &args.resume {
        Some(path) => resume(args, matches, path, &folder)?,
        None => start(args, &folder)?,
    };
    let side = trainer.config().input.square_rgb_side("training images")? as u32;
    let preprocess = Preprocess {
        resize_shorter: side * 8 / 7, // 256 for 224, as the paper and torchvision
        crop: side,
        ..Preprocess::default()
    };
    let augmentation = if settings.augment {
        Augmentation::Paper { lighting_std: 0.1 }
    } else {
        Augmentation::None
    };
    let maker = BatchMaker::new(
        folder.clone(),
        settings.batch,
        settings.shuffle,
        augmentation,
        preprocess,
        settings.seed,
    )?;
    let total = settings.total_steps(folder.len());
    println!(
        "training {} ({} classes, {} images{}) for {} steps of {} from step {}, lr {}",
        trainer.config().name,
        folder.classes().len(),
        folder.len(),
        val.as_ref().map_or(String::new(), |v| format!(
            ", {} validation images",
            v.len()
        )),
        total,
        settings.batch,
        state.step,
        rate(trainer.learning_rate())
    );
    if val.is_none() && settings.lr_steps.is_empty() {
        eprintln!("note: no --val and no --lr-steps: the learning rate stays constant");
    }
    // From here a signal stops the run with a checkpoint (before, there is nothing to lose).
    let stop = StopRequest::install();
    let mut run = Run {
        args,
        settings: &settings,
        checkpoint_path: &checkpoint_path,
        folder: &folder,
        val: val.as_ref(),
        eval: preprocess,
        stop: &stop,
    };
    if let Outcome::Interrupted = run.steps(trainer.as_mut(), &mut state, maker, total)? {
        return Ok(Outcome::Interrupted);
    }
    let options = SaveOptions {
        dtype: StorageDtype::F32,
        names: args.names.into(),
        classes: Some(folder.classes()),
    };
    trainer.weights()?.save_with(&args.save, &options)?;
    println!(
        "saved {} (and the checkpoint {})",
        args.save.display(),
        checkpoint_path.display()
    );
    Ok(Outcome::Completed)
}

/// How a run that did not fail ended.
pub enum Outcome {
    /// Every step ran; the weights are saved.
    Completed,
    /// A signal stopped it between steps; the checkpoint holds its last step.
    Interrupted,
}

/// Refuses output paths that would destroy an input or another run's checkpoint.
fn refuse_clobbering(args: &Args, checkpoint: &Path) -> Result<(), Error> {
    let same = |a: &Path, b: &Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    for input in [&args.weights, &args.resume].into_iter().flatten() {
        if same(&args.save, input) {
            crate::args::usage_error(format!(
                "--save {} would overwrite the run's starting point; choose another file",
                args.save.display()
            ));
        }
    }
    if let Some(log) = &args.log {
        let extension = log.extension().and_then(|e| e.to_str()).unwrap_or("");
        if PICTURES.contains(&extension.to_ascii_lowercase().as_str()) {
            crate::args::usage_error(format!(
                "--log {} would be overwritten by its own picture: name the log FILE.csv",
                log.display()
            ));
        }
        // A log with rows is a run's: this one's when resuming, another's for a new run,
        // whose rows would mix with them.
        if args.resume.is_none() && log.metadata().is_ok_and(|m| m.len() > 0) {
            crate::args::usage_error(format!(
                "--log {} exists (from another run?): a new run starts its own log; continue \
                 that run with --resume, or choose another log name",
                log.display()
            ));
        }
        // A log that exists is this run's (continued); without one, a picture beside it
        // would be someone else's.
        if !log.exists() {
            if let Some(picture) = plot_paths(log).into_iter().find(|p| p.exists()) {
                crate::args::usage_error(format!(
                    "{} exists and would be overwritten by the curves of --log {}; move it or \
                     choose another log name",
                    picture.display(),
                    log.display()
                ));
            }
        }
    }
    if checkpoint.exists() && !args.resume.as_deref().is_some_and(|r| same(r, checkpoint)) {
        crate::args::usage_error(format!(
            "the checkpoint {} exists (from another run?): continue it with --resume, or pass \
             another --checkpoint",
            checkpoint.display()
        ));
    }
    Ok(())
}

/// A fresh run: weights from --weights or the paper's initialisation, the head replaced with
/// --classes, dropout from --dropout.
fn start(
    args: &Args,
    folder: &ImageFolder,
) -> Result<(Box<dyn Trainer>, TrainState, Settings), Error> {
    let mut settings = Settings::from_args(args);
    settings.images = Some(folder.len());
    let mut weights = match &args.weights {
        Some(path) => Weights::load(path, None)?,
        None => {
            let config = args
                .config
                .map_or_else(AlexNetConfig::paper, |c| c.config());
            Weights::paper_init(&config, settings.seed)?
        }
    };
    if let Some(classes) = args.classes {
        weights = with_new_head(&weights, classes as usize, settings.seed)?;
    }
    let data_classes = folder.classes().len();
    let model_classes = weights.config().num_classes();
    if data_classes != model_classes {
        crate::args::usage_error(format!(
            "the data has {data_classes} classes and the model {model_classes}: pass --classes \
             {data_classes} to train a new {data_classes}-way last layer"
        ));
    }
    let weights = with_dropout(&weights, settings.dropout)?;
    if let Some(layer) = &args.freeze {
        let layers = parameter_layers(weights.config())?;
        let names: Vec<&str> = layers.iter().map(String::as_str).collect();
        settings.frozen_layers = frozen_layers(&names, layer);
    }
    let trainer = make_trainer(
        args,
        &weights,
        settings.sgd(settings.learning_rate),
        settings.frozen_layers,
    )?;
    let state = TrainState {
        step: 0,
        epoch: 0,
        learning_rate: settings.learning_rate,
        best_val_error: None,
        epochs_without_improvement: 0,
        classes: folder.classes().to_vec(),
        settings: serde_json::to_value(&settings)
            .map_err(|e| Error::invalid("settings", e.to_string()))?,
        loss_scale: None,
    };
    Ok((trainer, state, settings))
}

/// A resumed run: the checkpoint's weights, momentum, state and settings; --epochs/--steps
/// may move the end.
fn resume(
    args: &Args,
    matches: &ArgMatches,
    path: &Path,
    folder: &ImageFolder,
) -> Result<(Box<dyn Trainer>, TrainState, Settings), Error> {
    let checkpoint = Checkpoint::load(path, None)?;
    let mut settings: Settings = serde_json::from_value(checkpoint.state.settings.clone())
        .map_err(|e| Error::invalid("checkpoint settings", e.to_string()))?;
    let given = Settings::from_args(args);
    for flag in SETTING_FLAGS {
        if matches.value_source(flag) != Some(ValueSource::CommandLine) {
            continue;
        }
        let mut probe = settings.clone();
        apply_flag(&mut probe, &given, flag);
        if probe != settings {
            crate::args::usage_error(format!(
                "--{} differs from the checkpoint's run ({}); a resumed run keeps its settings",
                flag.replace('_', "-"),
                checkpoint.state.settings
            ));
        }
    }
    let mut state = checkpoint.state;
    if args.epochs.is_some() || args.steps.is_some() {
        settings.epochs = args.epochs;
        settings.steps = args.steps;
        // The new end goes into the checkpoints this run writes: a later --resume without
        // the flag continues to it, not to the first run's end.
        state.settings = serde_json::to_value(&settings)
            .map_err(|e| Error::invalid("settings", e.to_string()))?;
    }
    if state.classes != folder.classes() {
        return Err(Error::invalid(
            "--data",
            "its classes differ from the checkpoint's run",
        ));
    }
    if settings.images.is_none() {
        // A checkpoint from before the count was kept: this run's count is checked from now.
        settings.images = Some(folder.len());
        state.settings = serde_json::to_value(&settings)
            .map_err(|e| Error::invalid("settings", e.to_string()))?;
    }
    if let Some(images) = settings.images.filter(|&n| n != folder.len()) {
        // Other steps would see other images and the epochs end elsewhere: not the same run.
        return Err(Error::invalid(
            "--data",
            format!(
                "it holds {} images, the checkpoint's run had {images}: resume with the same \
                 data, or start a new run from the checkpoint's weights (--weights {})",
                folder.len(),
                path.display()
            ),
        ));
    }
    let weights = with_dropout(&checkpoint.weights, settings.dropout)?;
    let mut trainer = make_trainer(
        args,
        &weights,
        settings.sgd(state.learning_rate),
        settings.frozen_layers,
    )?;
    trainer.set_velocity(checkpoint.velocity)?;
    if let Some(saved) = state.loss_scale {
        trainer.restore_loss_scale(saved)?;
    }
    Ok((trainer, state, settings))
}

/// The trainer `--device`, `--precision` and `--fp32-gemm-only` ask for: the GPU's for `cuda`
/// (an error without a usable GPU), the GPU's for `auto` where one is usable (else the CPU's,
/// with a note, unless the precision needs a GPU), the CPU's for `cpu`. Mixed precision never
/// falls back to fp32 silently: without a GPU it is an error; a GPU-only setting the CPU
/// cannot honour is said.
fn make_trainer(
    args: &Args,
    weights: &Weights,
    sgd: SgdConfig,
    frozen_layers: usize,
) -> Result<Box<dyn Trainer>, Error> {
    let (device, precision) = (args.device, Precision::from(args.precision));
    let mixed = matches!(precision, Precision::Fp16 | Precision::Bf16);
    let mixed_needs_a_gpu = format!(
        "--precision {precision} (mixed precision) trains on a GPU only; the CPU trains in fp32"
    );
    if device == DeviceArg::Cpu && args.gpu.is_some() {
        crate::args::usage_error(
            "--gpu picks a GPU, and --device cpu trains on the CPU".to_string(),
        );
    }
    if device == DeviceArg::Cpu && mixed {
        crate::args::usage_error(format!(
            "{mixed_needs_a_gpu}: drop --device cpu or use fp32"
        ));
    }
    if args.fp32_gemm_only && precision != Precision::Fp32 {
        crate::args::usage_error(format!(
            "--fp32-gemm-only applies to --precision fp32 only, not {precision}"
        ));
    }
    #[cfg(feature = "cuda")]
    if device != DeviceArg::Cpu {
        let options = alexnet_cuda::cuda::CudaTrainOptions {
            device: args.gpu.unwrap_or(0),
            precision,
            fp32_gemm_only: args.fp32_gemm_only,
            deterministic: !args.nondeterministic,
            frozen_layers,
            channels_last: args.channels_last,
            ..Default::default()
        };
        match alexnet_cuda::cuda::CudaTrainer::with_options(weights, sgd, options) {
            Ok(trainer) => {
                eprintln!(
                    "training on {} in {precision} (GPU training is checked against the CPU \
                     only in part so far: its fp32 steps with GEMM-family convolutions matched on \
                     an H200; --device cpu is the verified path)",
                    trainer.gpu().name()
                );
                return Ok(Box::new(trainer));
            }
            Err(Error::DeviceUnavailable(why)) if mixed => {
                return Err(Error::DeviceUnavailable(format!(
                    "{why}; {mixed_needs_a_gpu}"
                )));
            }
            Err(Error::DeviceUnavailable(why)) if device == DeviceArg::Auto => {
                eprintln!("note: no usable GPU ({why}); training on the CPU")
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if device == DeviceArg::Cuda || mixed {
        let why = match mixed {
            true => format!("; {mixed_needs_a_gpu}"),
            false => String::new(),
        };
        crate::args::usage_error(format!(
            "--device cuda / --precision {precision}: this build has no GPU support (built \
             without the `cuda` feature){why}"
        ));
    }
    if precision == Precision::Tf32 {
        eprintln!("note: tf32 is a GPU math mode; the CPU trains in fp32");
    }
    if args.fp32_gemm_only {
        eprintln!("note: --fp32-gemm-only is a cuDNN setting: no effect on the CPU");
    }
    if let Some(gpu) = args.gpu {
        eprintln!("note: --gpu {gpu} picks a GPU: no effect on the CPU");
    }
    if args.nondeterministic {
        eprintln!(
            "note: --nondeterministic is a GPU setting: the CPU's steps are deterministic either way"
        );
    }
    if args.channels_last {
        eprintln!("note: --channels-last is a GPU layout: no effect on the CPU");
    }
    let model = CpuModel::new(weights, Precision::Fp32)?;
    let mut trainer = CpuTrainer::new(model, sgd)?;
    trainer.frozen_layers = frozen_layers;
    Ok(Box::new(trainer))
}

/// The names of the layers with parameters (`conv1`, ..., `fc3`), in network order.
fn parameter_layers(config: &AlexNetConfig) -> Result<Vec<String>, Error> {
    Ok(config
        .plan()?
        .stages
        .into_iter()
        .filter(|stage| stage.params.is_some())
        .map(|stage| stage.name)
        .collect())
}

/// How many layers `--freeze LAYER` (or `FIRST..LAYER`, FIRST being the first layer) keeps
/// fixed: LAYER and every layer before it. A usage error for an unknown layer, or for the
/// last one (nothing would train).
fn frozen_layers(layers: &[&str], spec: &str) -> usize {
    let (first, last) = match spec.split_once("..") {
        Some((first, last)) => (Some(first), last),
        None => (None, spec),
    };
    let listed = layers.join(", ");
    if first.is_some_and(|f| layers.first() != Some(&f)) {
        crate::args::usage_error(format!(
            "--freeze {spec}: a frozen range starts at the first layer ({listed})"
        ));
    }
    match layers.iter().position(|&l| l == last) {
        Some(i) if i + 1 < layers.len() => i + 1,
        Some(_) => crate::args::usage_error(format!(
            "--freeze {spec} would freeze every layer: nothing would train"
        )),
        None => crate::args::usage_error(format!(
            "--freeze {spec}: no layer `{last}` (the layers are {listed})"
        )),
    }
}

/// Copies one flag's value from `given` into `settings`.
fn apply_flag(settings: &mut Settings, given: &Settings, flag: &str) {
    match flag {
        "seed" => settings.seed = given.seed,
        "batch" => settings.batch = given.batch,
        "no_shuffle" => settings.shuffle = given.shuffle,
        "no_augment" => settings.augment = given.augment,
        "lr" => settings.learning_rate = given.learning_rate,
        "momentum" => settings.momentum = given.momentum,
        "weight_decay" => settings.weight_decay = given.weight_decay,
        "update_rule" => settings.paper_rule = given.paper_rule,
        "no_bias_decay" => settings.decay_biases = given.decay_biases,
        "lr_steps" => settings.lr_steps = given.lr_steps.clone(),
        "patience" => settings.patience = given.patience,
        "dropout" => settings.dropout = given.dropout,
        _ => {}
    }
}

/// `weights` with the last layer replaced by the paper's initialisation for `classes` outputs.
fn with_new_head(weights: &Weights, classes: usize, seed: u64) -> Result<Weights, Error> {
    let mut config = weights.config().clone();
    if let Some(last) = config.fcs.last_mut() {
        last.out_features = classes;
    }
    let fresh = Weights::paper_init(&config, seed)?;
    let old = weights.named_tensors();
    let new = fresh.named_tensors();
    let head = new.len().saturating_sub(2); // the last layer's weight and bias
    Weights::from_fn(&config, |index, _, _| {
        let source = if index >= head { &new } else { &old };
        source[index].2.to_vec()
    })
}

/// `weights` under a config whose hidden linear layers drop with probability `dropout`.
fn with_dropout(weights: &Weights, dropout: Option<f32>) -> Result<Weights, Error> {
    let Some(p) = dropout else {
        return Ok(weights.clone());
    };
    let mut config = weights.config().clone();
    for fc in &mut config.fcs {
        if fc.dropout.is_some() {
            fc.dropout = Some(p);
        }
    }
    let tensors = weights.named_tensors();
    Weights::from_fn(&config, |index, _, _| tensors[index].2.to_vec())
}

/// What the loop needs besides the trainer and its state.
struct Run<'a> {
    args: &'a Args,
    settings: &'a Settings,
    checkpoint_path: &'a Path,
    folder: &'a ImageFolder,
    val: Option<&'a ImageFolder>,
    eval: Preprocess,
    stop: &'a StopRequest,
}

/// Epoch figures being gathered.
struct EpochTally {
    loss_sum: f64,
    steps: u64,
    images: u64,
    started: Instant,
}

impl EpochTally {
    fn new() -> Self {
        EpochTally {
            loss_sum: 0.0,
            steps: 0,
            images: 0,
            started: Instant::now(),
        }
    }
}

impl Run<'_> {
    fn steps(
        &mut self,
        trainer: &mut dyn Trainer,
        state: &mut TrainState,
        maker: BatchMaker,
        total: u64,
    ) -> Result<Outcome, Error> {
        let bar = progress_bar(total, state.step);
        // Where no bar is drawn (stderr to a file, under nohup or a scheduler) a line now and
        // then says the run is alive.
        let progress_every = match self.args.progress_every {
            Some(seconds) => Some(Duration::from_secs(seconds)),
            None => bar.is_hidden().then_some(PROGRESS_LINE_INTERVAL),
        };
        let mut last_line = Instant::now();
        // An epoch end that failed in an earlier run (which saved its checkpoint just before
        // it) is done first: at the run's last step the loop below would never reach it. Its
        // training figures were not kept (NaN in the log).
        while state.epoch < self.epochs_done(state.step) {
            state.epoch += 1;
            bar.suspend(|| self.end_epoch(trainer, state, &EpochTally::new()))?;
        }
        let buffers = (0..LOADER_BUFFERS)
            .map(|_| trainer.batch_buffer(self.settings.batch))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut loader = Loader::start(maker, buffers, state.step, total);
        let mut tally = EpochTally::new();
        let mut last_checkpoint = state.step;
        let mut last_checkpoint_at = Instant::now();
        // The batch after the current one, taken from the loader before the current step so
        // that it goes up while that step computes (the GPU trainer's copy stream); a failure
        // to load it is reported when its turn comes, as without the look-ahead.
        let mut ahead: Option<Result<BatchBuffer, Error>> = None;
        while state.step < total {
            if self.stop.requested() {
                bar.finish_and_clear();
                if state.step > last_checkpoint {
                    self.checkpoint(trainer, state)?;
                }
                // The checkpoint of this step: this run's, or the one it resumed when no
                // step ran since.
                let holder = match self.checkpoint_path.exists() {
                    true => Some(self.checkpoint_path),
                    false => self.args.resume.as_deref(),
                };
                match holder {
                    Some(path) => eprintln!(
                        "stopped at step {} of {total}; continue with --resume {}",
                        state.step,
                        path.display()
                    ),
                    None => eprintln!("stopped before the first step ended: nothing to save"),
                }
                return Ok(Outcome::Interrupted);
            }
            let batch = match ahead.take().unwrap_or_else(|| loader.next()) {
                Ok(batch) => batch,
                Err(e) => {
                    self.checkpoint(trainer, state)?;
                    return Err(e);
                }
            };
            ahead = (state.step + 1 < total).then(|| loader.next());
            let next = ahead.as_ref().and_then(|next| next.as_ref().ok());
            let seed = self.settings.step_seed(state.step);
            let loss = trainer.step_buffer_prefetch(&batch, seed, next)?;
            let images = batch.labels().len() as u64;
            loader.recycle(batch);
            if !loss.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!(
                        "the loss became {loss} at step {}; the checkpoint {} holds the weights \
                         from step {last_checkpoint} (try a lower --lr)",
                        state.step,
                        self.checkpoint_path.display()
                    ),
                ));
            }
            state.step += 1;
            tally.loss_sum += loss as f64;
            tally.steps += 1;
            tally.images += images;
            bar.set_position(state.step);
            let rate = tally.images as f64 / tally.started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "epoch {} loss {loss:.4} {rate:.1} img/s",
                state.epoch + 1
            ));
            if progress_every.is_some_and(|every| last_line.elapsed() >= every) {
                let scaling = trainer
                    .loss_scaling()
                    .map_or(String::new(), |(scale, _)| format!(", loss scale {scale}"));
                bar.suspend(|| {
                    eprintln!(
                        "step {}/{total} (epoch {}): loss {loss:.4}, {rate:.1} img/s{scaling}",
                        state.step,
                        state.epoch + 1
                    )
                });
                last_line = Instant::now();
            }
            let epochs_done = self.epochs_done(state.step);
            let mut saved = false;
            while state.epoch < epochs_done {
                // A failed epoch end (validation out of GPU memory, say) must not lose the
                // epoch's training: its weights are saved with the epoch's end still to do,
                // which a resume does after its first step.
                let before = state.clone();
                state.epoch += 1;
                if let Err(e) = bar.suspend(|| self.end_epoch(trainer, state, &tally)) {
                    match self.checkpoint(trainer, &before) {
                        Ok(()) => eprintln!(
                            "the end of epoch {} failed; the weights of step {} are in {}: \
                             --resume it",
                            state.epoch,
                            before.step,
                            self.checkpoint_path.display()
                        ),
                        Err(saving) => eprintln!(
                            "the end of epoch {} failed, and so did saving the checkpoint: \
                             {saving}",
                            state.epoch
                        ),
                    }
                    return Err(e);
                }
                tally = EpochTally::new();
                saved = true;
            }
            let due = self
                .args
                .checkpoint_every
                .is_some_and(|every| state.step.is_multiple_of(every));
            // A checkpoint is half a gigabyte (weights and momentum): on a small dataset whose
            // epochs take seconds, writing one per epoch would cost more than the training.
            let epoch_due = saved && last_checkpoint_at.elapsed() >= EPOCH_CHECKPOINT_INTERVAL;
            if epoch_due || due || state.step == total {
                self.checkpoint(trainer, state)?;
                last_checkpoint = state.step;
                last_checkpoint_at = Instant::now();
            }
        }
        bar.finish_and_clear();
        Ok(Outcome::Completed)
    }

    /// The epochs `step` steps complete.
    fn epochs_done(&self, step: u64) -> u64 {
        step * self.settings.batch as u64 / self.folder.len() as u64
    }

    /// Validation, the schedule, the log line and CSV row of the epoch just completed (its
    /// training figures NaN where `tally` holds no step: an epoch end redone on resuming).
    fn end_epoch(
        &mut self,
        trainer: &mut dyn Trainer,
        state: &mut TrainState,
        tally: &EpochTally,
    ) -> Result<(), Error> {
        let train_loss = match tally.steps {
            0 => f64::NAN,
            steps => tally.loss_sum / steps as f64,
        };
        let images_per_second =
            tally.images as f64 / tally.started.elapsed().as_secs_f64().max(1e-9);
        let mut errors = None;
        if let Some(val) = self.val {
            let result = trainer.evaluate(val, &self.eval, self.settings.batch)?;
            if let Some((path, error)) = result.failures.first() {
                eprintln!(
                    "warning: {} validation images could not be read (first: {}: {error})",
                    result.failures.len(),
                    path.display()
                );
            }
            // With five classes or fewer every label is in the top five: no top-5 figure.
            let top5 = (val.classes().len() > 5).then(|| result.top5_error());
            errors = Some((result.top1_error(), top5));
        }
        let learning_rate = trainer.learning_rate();
        let row = EpochRow {
            epoch: state.epoch,
            step: state.step,
            train_loss,
            val_top1_error: errors.map(|e| e.0),
            val_top5_error: errors.and_then(|e| e.1),
            learning_rate,
            images_per_second,
        };
        let val_text = errors.map_or(String::new(), |(top1, top5)| {
            let top5 = top5.map_or(String::new(), |e| format!(" top-5 {:.2}%", 100.0 * e));
            format!(", val top-1 error {:.2}%{top5}", 100.0 * top1)
        });
        let scaling_text = trainer
            .loss_scaling()
            .map_or(String::new(), |(scale, skipped)| {
                format!(", loss scale {scale}, {skipped} steps skipped on overflow")
            });
        println!(
            "epoch {}: train loss {train_loss:.4}{val_text}, lr {}, {images_per_second:.1} img/s{scaling_text}",
            state.epoch,
            rate(learning_rate)
        );
        if let Some(log) = &self.args.log {
            append_row(log, &row)?;
            // The curves are a convenience: a failure to draw them is said, not fatal.
            if let Err(e) = plot_log(log) {
                eprintln!("warning: could not draw the curves: {e}");
            }
        }
        if self.lower_learning_rate(state, errors.map(|e| e.0)) {
            let lowered = learning_rate / 10.0;
            trainer.set_learning_rate(lowered)?;
            println!("learning rate {} -> {}", rate(learning_rate), rate(lowered));
        }
        state.learning_rate = trainer.learning_rate();
        Ok(())
    }

    /// The schedule: fixed epochs (--lr-steps) or the validation error's plateau (--patience).
    fn lower_learning_rate(&self, state: &mut TrainState, val_error: Option<f64>) -> bool {
        if !self.settings.lr_steps.is_empty() {
            return self.settings.lr_steps.contains(&state.epoch);
        }
        let Some(error) = val_error.filter(|e| e.is_finite()) else {
            return false;
        };
        if state.best_val_error.is_none_or(|best| error < best) {
            state.best_val_error = Some(error);
            state.epochs_without_improvement = 0;
            return false;
        }
        state.epochs_without_improvement += 1;
        if state.epochs_without_improvement >= self.settings.patience {
            state.epochs_without_improvement = 0;
            return true;
        }
        false
    }

    fn checkpoint(&self, trainer: &dyn Trainer, state: &TrainState) -> Result<(), Error> {
        Checkpoint {
            weights: trainer.weights()?,
            velocity: trainer.velocity()?,
            state: TrainState {
                loss_scale: trainer.saved_loss_scale(),
                ..state.clone()
            },
        }
        .save(self.checkpoint_path)
    }
}

/// Epoch ends write a checkpoint when the last one is at least this old (--checkpoint-every
/// and the end of the run always write one).
const EPOCH_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// How often a run without a progress bar prints a progress line, by default.
const PROGRESS_LINE_INTERVAL: Duration = Duration::from_secs(60);

/// How many batch buffers a run cycles through: the trainer steps on one while the next one
/// goes up to the GPU and the loader fills the third.
const LOADER_BUFFERS: usize = 3;

/// Batches made on another thread, ahead of the trainer, each written straight into
/// one of the trainer's own buffers (page-locked on the GPU) and handed back after its step.
struct Loader {
    batches: Option<mpsc::Receiver<Result<BatchBuffer, Error>>>,
    empty: Option<mpsc::Sender<BatchBuffer>>,
    thread: Option<JoinHandle<()>>,
}

impl Loader {
    fn start(mut maker: BatchMaker, buffers: Vec<BatchBuffer>, first: u64, end: u64) -> Self {
        let (send, batches) = mpsc::sync_channel(buffers.len());
        let (empty, refill) = mpsc::channel::<BatchBuffer>();
        for buffer in buffers {
            // The receiver is alive (it is right here): this cannot fail.
            let _ = empty.send(buffer);
        }
        let thread = std::thread::spawn(move || {
            for step in first..end {
                // No buffer comes back once the trainer has stopped: stop too.
                let Ok(mut buffer) = refill.recv() else {
                    return;
                };
                let batch = maker.fill(step, &mut buffer).map(|()| buffer);
                let failed = batch.is_err();
                if send.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        Loader {
            batches: Some(batches),
            empty: Some(empty),
            thread: Some(thread),
        }
    }

    fn next(&mut self) -> Result<BatchBuffer, Error> {
        self.batches
            .as_ref()
            .and_then(|b| b.recv().ok())
            .unwrap_or_else(|| Err(Error::invalid("data loader", "it stopped early")))
    }

    /// Gives a stepped-on buffer back to be filled again.
    fn recycle(&mut self, buffer: BatchBuffer) {
        if let Some(empty) = &self.empty {
            // The loader may have finished its last step already: the buffer is then dropped.
            let _ = empty.send(buffer);
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channels first lets a thread blocked on sending or waiting finish.
        self.batches = None;
        self.empty = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
