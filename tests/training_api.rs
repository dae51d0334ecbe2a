//! The training API's contracts: typed errors for what a caller can get wrong, the training
//! forward against the inference forward, and steps that repeat bit for bit.

mod common;

use alexnet_cuda::config::{AlexNetConfig, LrnParams};
use alexnet_cuda::cpu::{softmax_cross_entropy, CpuModel, Gradient, Gradients};
use alexnet_cuda::train::{
    Checkpoint, CpuTrainer, SavedLossScale, Sgd, SgdConfig, TrainState, Trainer,
};
use alexnet_cuda::weights::StorageDtype;
use alexnet_cuda::{Error, Precision, Weights};
use ndarray::Array4;

use common::{small_training_batch as batch, small_training_config as small_config};

#[test]
fn sgd_rejects_settings_that_cannot_train() {
    for bad in [
        SgdConfig {
            learning_rate: f32::NAN,
            ..SgdConfig::default()
        },
        SgdConfig {
            momentum: -0.9,
            ..SgdConfig::default()
        },
        SgdConfig {
            weight_decay: f32::INFINITY,
            ..SgdConfig::default()
        },
    ] {
        assert!(
            matches!(Sgd::new(bad), Err(Error::Invalid { .. })),
            "{bad:?} was accepted"
        );
    }
    let mut sgd = Sgd::new(SgdConfig::default()).unwrap();
    assert!(sgd.set_learning_rate(-0.1).is_err());
    assert_eq!(
        sgd.config().learning_rate,
        0.01,
        "a refused rate changes nothing"
    );
}

fn refs(p: &mut [Vec<f32>]) -> Vec<&mut [f32]> {
    p.iter_mut().map(|v| v.as_mut_slice()).collect()
}

#[test]
fn sgd_step_rejects_gradients_of_another_shape() {
    let mut params = vec![vec![1.0f32; 3], vec![0.0; 2]];
    let grads = |lens: &[usize]| Gradients {
        tensors: lens
            .iter()
            .map(|&n| Gradient {
                name: "x.weight".into(),
                shape: vec![n],
                values: vec![0.5; n],
            })
            .collect(),
    };
    let mut sgd = Sgd::new(SgdConfig::default()).unwrap();
    assert!(sgd.step(refs(&mut params), &grads(&[3])).is_err());
    assert!(sgd.step(refs(&mut params), &grads(&[3, 4])).is_err());
    assert_eq!(
        params,
        vec![vec![1.0; 3], vec![0.0; 2]],
        "a refused step changes nothing"
    );
    sgd.step(refs(&mut params), &grads(&[3, 2])).unwrap();
    // v = g + wd w; w -= lr v (PyTorch's rule, first step).
    let want = 1.0 - 0.01 * (0.5 + 5e-4 * 1.0);
    assert!(
        (params[0][0] - want).abs() < 1e-7,
        "{} vs {want}",
        params[0][0]
    );
    // Momentum buffers sized for this network refuse another one.
    let mut other = vec![vec![0.0f32; 4]];
    assert!(sgd.step(refs(&mut other), &grads(&[4])).is_err());
}

#[test]
fn training_refuses_fp16_and_bf16_models_and_a_foreign_tape() {
    let config = small_config(Some(0.5));
    let weights = common::formula_weights(&config);
    for narrow in [Precision::Fp16, Precision::Bf16] {
        let half = CpuModel::new(&weights, narrow).unwrap();
        assert!(matches!(
            half.forward_train(batch(2, 1).view(), 0),
            Err(Error::Invalid { .. })
        ));
    }
    let model = CpuModel::new(&weights, Precision::Fp32).unwrap();
    let tape = model.forward_train(batch(2, 1).view(), 0).unwrap();
    let mut other_config = small_config(Some(0.5));
    other_config.convs[2].lrn = Some(LrnParams::PAPER); // one more stage
    let other = CpuModel::new(&common::formula_weights(&other_config), Precision::Fp32).unwrap();
    let grad = ndarray::Array2::<f32>::zeros((2, 5));
    assert!(other.backward(&tape, grad.view()).is_err());
    // A gradient that is not shaped like the logits.
    let wrong = ndarray::Array2::<f32>::zeros((2, 4));
    assert!(matches!(
        model.backward(&tape, wrong.view()),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn without_dropout_the_training_forward_is_the_inference_forward() {
    let config = small_config(None);
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let x = batch(3, 2);
    let tape = model.forward_train(x.view(), 7).unwrap();
    assert_eq!(tape.logits().unwrap(), model.forward(x.view()).unwrap());
}

/// Gradients handed back with `recycle_gradients` are written over, never read: the next
/// backward gives the same gradients, bit for bit, as without them (their values poisoned with
/// NaN would show), and the linear layers' weight gradients land in the memory handed back.
#[test]
fn recycled_gradient_memory_changes_no_gradient() {
    let config = small_config(Some(0.5));
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let tape = model.forward_train(batch(3, 4).view(), 11).unwrap();
    let loss = softmax_cross_entropy(tape.logits().unwrap(), &[0, 3, 4]).unwrap();
    let fresh = model.backward(&tape, loss.grad.view()).unwrap();

    let mut handed_back = fresh.clone();
    for tensor in &mut handed_back.tensors {
        tensor.values.fill(f32::NAN);
    }
    let linear_weights = ["fc1.weight", "fc2.weight", "fc3.weight"];
    let memory = |grads: &Gradients| -> Vec<*const f32> {
        let at = |name| grads.get(name).expect(name).values.as_ptr();
        linear_weights.into_iter().map(at).collect()
    };
    let before = memory(&handed_back);
    model.recycle_gradients(handed_back);
    let again = model.backward(&tape, loss.grad.view()).unwrap();
    assert_eq!(again, fresh, "recycled memory changed a gradient");
    assert_eq!(
        memory(&again),
        before,
        "the memory handed back was not used"
    );
}

/// Thirty steps on one batch of eight from the formula weights: the losses and the weights.
fn thirty_steps(dropout: Option<f32>) -> (Vec<f32>, alexnet_cuda::Weights) {
    let config = small_config(dropout);
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let mut trainer = CpuTrainer::new(model, SgdConfig::default()).unwrap();
    let x = batch(8, 3);
    let losses = (0..30)
        .map(|step| trainer.step(x.view(), &LABELS, step).unwrap())
        .collect();
    (losses, trainer.model.weights().unwrap())
}

const LABELS: [usize; 8] = [0, 1, 2, 3, 4, 0, 1, 2];

#[test]
fn training_steps_repeat_bit_for_bit() {
    let (losses, weights) = thirty_steps(Some(0.5));
    let (again, weights_again) = thirty_steps(Some(0.5));
    assert_eq!(losses, again, "the same steps give the same losses");
    assert_eq!(weights, weights_again, "and the same weights");
}

#[test]
fn training_on_one_batch_drives_its_loss_down() {
    let (losses, weights) = thirty_steps(None);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}: {losses:?}");
    let model = CpuModel::new(&weights, Precision::Fp32).unwrap();
    let logits = model.forward(batch(8, 3).view()).unwrap();
    let ce = softmax_cross_entropy(logits.view(), &LABELS).unwrap();
    assert!(
        ce.loss < 0.5 * first,
        "the exported weights carry the training"
    );
}

#[test]
fn stepping_on_a_reused_batch_buffer_is_stepping_on_the_array() {
    let mut on_arrays = small_trainer();
    let mut on_buffer = small_trainer();
    let mut buffer = on_buffer.batch_buffer(8).unwrap();
    assert_eq!(buffer.shape(), [8, 3, 67, 67]);
    assert!(
        !buffer.is_page_locked(),
        "the CPU trainer's buffers are on the heap"
    );
    for step in 0..4u64 {
        let x = batch(8, 10 + step);
        let labels: Vec<usize> = LABELS.iter().map(|l| (l + step as usize) % 5).collect();
        buffer
            .images_mut()
            .unwrap()
            .copy_from_slice(x.as_slice().unwrap());
        buffer.set_labels(labels.clone());
        let want = on_arrays.step(x.view(), &labels, step).unwrap();
        let got = on_buffer.step_buffer(&buffer, step).unwrap();
        assert_eq!(got, want, "step {step}");
    }
    assert_eq!(on_buffer.weights().unwrap(), on_arrays.weights().unwrap());

    // A buffer of another input, or with a label per image missing, is refused.
    let wrong = alexnet_cuda::train::BatchBuffer::on_heap([8, 3, 64, 64]).unwrap();
    assert!(matches!(
        on_buffer.step_buffer(&wrong, 9),
        Err(Error::Shape { .. })
    ));
    buffer.set_labels(vec![0; 7]);
    assert!(on_buffer.step_buffer(&buffer, 9).is_err());
    assert_eq!(on_buffer.weights().unwrap(), on_arrays.weights().unwrap());
}

/// A trainer on the small network from the formula weights, dropout on.
fn small_trainer() -> CpuTrainer {
    let config = small_config(Some(0.5));
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    CpuTrainer::new(model, SgdConfig::default()).unwrap()
}

fn state(step: u64) -> TrainState {
    TrainState {
        step,
        epoch: 0,
        learning_rate: 0.01,
        best_val_error: Some(0.25),
        epochs_without_improvement: 1,
        classes: (0..5).map(|c| format!("class {c}")).collect(),
        settings: serde_json::json!({"seed": 3}),
        loss_scale: None,
    }
}

/// A mixed-precision run's loss scale survives its checkpoint; a checkpoint written before the
/// scale was kept (no `loss_scale` in its state) still loads, with none; and a trainer that
/// does not scale its loss (the CPU's) takes a saved scale without complaint and has none.
#[test]
fn a_checkpoint_keeps_the_loss_scale_and_old_ones_still_load() {
    let saved = SavedLossScale {
        scale: 2048.0,
        good_steps: 17,
        skipped_steps: 3,
    };
    let trainer = small_trainer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.ckpt.safetensors");
    let with_scale = TrainState {
        loss_scale: Some(saved),
        ..state(5)
    };
    Checkpoint {
        weights: trainer.model.weights().unwrap(),
        velocity: Vec::new(),
        state: with_scale.clone(),
    }
    .save(&path)
    .unwrap();
    let config = small_config(Some(0.5));
    let loaded = Checkpoint::load(&path, Some(&config)).unwrap();
    assert_eq!(loaded.state.loss_scale, Some(saved));
    assert_eq!(loaded.state, with_scale);

    let mut old = serde_json::to_value(state(5)).unwrap();
    assert!(old.get("loss_scale").is_none(), "None is not written");
    old.as_object_mut().unwrap().remove("loss_scale");
    let parsed: TrainState = serde_json::from_value(old).unwrap();
    assert_eq!(parsed, state(5));

    let mut cpu = small_trainer();
    assert_eq!(cpu.saved_loss_scale(), None);
    cpu.restore_loss_scale(saved).unwrap();
    assert_eq!(cpu.loss_scaling(), None);
}

#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    let x = batch(8, 3);
    let mut uninterrupted = small_trainer();
    let mut interrupted = small_trainer();
    for step in 0..3 {
        uninterrupted.step(x.view(), &LABELS, step).unwrap();
        interrupted.step(x.view(), &LABELS, step).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt.safetensors");
    Checkpoint {
        weights: interrupted.model.weights().unwrap(),
        velocity: interrupted.optimiser.velocity().to_vec(),
        state: state(3),
    }
    .save(&path)
    .unwrap();
    drop(interrupted);

    let config = small_config(Some(0.5));
    let loaded = Checkpoint::load(&path, Some(&config)).unwrap();
    assert_eq!(loaded.state, state(3));
    let model = CpuModel::new(&loaded.weights, Precision::Fp32).unwrap();
    let mut resumed = CpuTrainer::new(model, SgdConfig::default()).unwrap();
    // Another network's momentum (one tensor short, or a tensor of another size) is refused
    // where it is restored; the run's own is taken through the Trainer interface.
    let mut short = loaded.velocity.clone();
    short.pop();
    let mut resized = loaded.velocity.clone();
    resized[0].push(0.0);
    for wrong in [short, resized] {
        assert!(matches!(
            Trainer::set_velocity(&mut resumed, wrong),
            Err(Error::Shape { .. })
        ));
    }
    Trainer::set_velocity(&mut resumed, loaded.velocity).unwrap();
    for step in 3..6 {
        let a = uninterrupted.step(x.view(), &LABELS, step).unwrap();
        let b = resumed.step(x.view(), &LABELS, step).unwrap();
        assert_eq!(a, b, "step {step}");
    }
    assert_eq!(
        uninterrupted.model.weights().unwrap(),
        resumed.model.weights().unwrap()
    );
    // The momentum matters: without it the same steps end elsewhere.
    let mut forgetful = CpuTrainer::new(
        CpuModel::new(
            &Checkpoint::load(&path, Some(&config)).unwrap().weights,
            Precision::Fp32,
        )
        .unwrap(),
        SgdConfig::default(),
    )
    .unwrap();
    for step in 3..6 {
        forgetful.step(x.view(), &LABELS, step).unwrap();
    }
    assert_ne!(
        uninterrupted.model.weights().unwrap(),
        forgetful.model.weights().unwrap()
    );
    // A checkpoint's weights load as weights.
    let weights = Weights::load(&path, Some(&config)).unwrap();
    assert_eq!(weights, uninterrupted_weights_at_3(&x));
}

/// The weights after the first three steps, recomputed.
fn uninterrupted_weights_at_3(x: &Array4<f32>) -> Weights {
    let mut trainer = small_trainer();
    for step in 0..3 {
        trainer.step(x.view(), &LABELS, step).unwrap();
    }
    trainer.model.weights().unwrap()
}

#[test]
fn a_checkpoint_refuses_a_weights_file_and_mismatched_momentum() {
    let config = small_config(Some(0.5));
    let weights = common::formula_weights(&config);
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.safetensors");
    weights.save(&plain, StorageDtype::F32).unwrap();
    let err = Checkpoint::load(&plain, Some(&config)).unwrap_err();
    assert!(err.to_string().contains("no training state"), "{err}");
    let bad = Checkpoint {
        weights,
        velocity: vec![vec![0.0; 3]],
        state: state(1),
    };
    assert!(bad.save(dir.path().join("bad.safetensors")).is_err());
    assert!(
        !dir.path().join("bad.safetensors").exists(),
        "nothing written"
    );
}

/// A diverged run's weights or momentum (NaN, infinite) never replace a checkpoint: the save
/// is an error naming the first bad value, and the file there before stays as it was.
#[test]
fn a_checkpoint_with_non_finite_values_is_refused_and_the_old_one_kept() {
    let config = small_config(Some(0.5));
    let good = common::formula_weights(&config);
    assert_eq!(good.first_non_finite(), None);
    let shapes = config.parameter_shapes().unwrap();
    let momentum: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, shape)| vec![0.0; shape.iter().product()])
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt.safetensors");
    Checkpoint {
        weights: good.clone(),
        velocity: momentum.clone(),
        state: state(1),
    }
    .save(&path)
    .unwrap();
    let before = std::fs::read(&path).unwrap();

    // NaN in the third tensor's weights, at flat index 5.
    let (third, _) = &shapes[2];
    let diverged = Weights::from_fn(&config, |index, name, shape| {
        let mut values = good.named_tensors()[index].2.to_vec();
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        if index == 2 {
            values[5] = f32::NAN;
        }
        values
    })
    .unwrap();
    assert_eq!(
        diverged.first_non_finite().map(|(name, at, _)| (name, at)),
        Some((third.clone(), 5))
    );
    let err = Checkpoint {
        weights: diverged,
        velocity: momentum.clone(),
        state: state(2),
    }
    .save(&path)
    .unwrap_err();
    assert!(
        err.to_string().contains(&format!("{third}[5] is NaN")),
        "{err}"
    );

    // An infinite momentum value is refused the same way.
    let mut exploded = momentum;
    exploded[0][7] = f32::INFINITY;
    let err = Checkpoint {
        weights: good,
        velocity: exploded,
        state: state(2),
    }
    .save(&path)
    .unwrap_err();
    let (first, _) = &shapes[0];
    assert!(
        err.to_string()
            .contains(&format!("momentum.{first}[7] is inf")),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old checkpoint is kept"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no partial file: {leftovers:?}");
}

/// A save killed mid-write (`kill -9`) leaves `<name>.partial-<pid>`; the next successful save
/// removes it when its process has ended and nothing wrote to it for a minute, and leaves every
/// other file alone: a live process's, a recently written one, another checkpoint's, a foreign
/// name.
#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "only Linux tells an ended process (by /proc); elsewhere nothing is removed"
)]
fn a_save_removes_the_partial_files_of_killed_saves() {
    use std::time::{Duration, SystemTime};

    // Above the kernel's largest possible pid_max (2^22): no process can have these ids.
    const ENDED: u32 = 4_194_400;
    const ENDED_TOO: u32 = 4_194_401;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt.safetensors");
    let two_minutes_ago = SystemTime::now() - Duration::from_secs(120);
    let leftover = |name: String, old: bool| {
        let file = std::fs::File::create(dir.path().join(&name)).unwrap();
        if old {
            file.set_modified(two_minutes_ago).unwrap();
        }
        name
    };
    let abandoned = leftover(format!("run.ckpt.safetensors.partial-{ENDED}"), true);
    let kept = [
        // Its process may still be writing: pid 1 always runs.
        leftover("run.ckpt.safetensors.partial-1".into(), true),
        leftover(format!("run.ckpt.safetensors.partial-{ENDED_TOO}"), false),
        leftover(format!("other.safetensors.partial-{ENDED}"), true),
        leftover("run.ckpt.safetensors.partial-notes".into(), true),
    ];
    let config = small_config(Some(0.5));
    let momentum: Vec<Vec<f32>> = config
        .parameter_shapes()
        .unwrap()
        .iter()
        .map(|(_, shape)| vec![0.0; shape.iter().product()])
        .collect();
    Checkpoint {
        weights: common::formula_weights(&config),
        velocity: momentum,
        state: state(1),
    }
    .save(&path)
    .unwrap();

    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    let mut expected: Vec<String> = kept.to_vec();
    expected.push("run.ckpt.safetensors".into());
    expected.sort();
    assert_eq!(left, expected, "{abandoned} alone should have gone");
}

#[test]
fn saved_class_names_come_back_from_the_file() {
    let config = small_config(None);
    let weights = common::formula_weights(&config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("named.safetensors");
    let names: Vec<String> = ["ant", "bee", "cat", "dog", "eel"]
        .map(String::from)
        .to_vec();
    weights
        .save_with_classes(&path, StorageDtype::F32, &names)
        .unwrap();
    assert_eq!(Weights::class_names_in(&path).unwrap(), Some(names.clone()));
    assert_eq!(Weights::load(&path, Some(&config)).unwrap(), weights);
    assert!(weights
        .save_with_classes(dir.path().join("x"), StorageDtype::F32, &names[..4])
        .is_err());
    let plain = dir.path().join("plain.safetensors");
    weights.save(&plain, StorageDtype::F32).unwrap();
    assert_eq!(Weights::class_names_in(&plain).unwrap(), None);
}

#[test]
fn frozen_layers_keep_their_weights_and_the_rest_trains_as_unfrozen() {
    let x = batch(4, 5);
    let labels = [0, 1, 2, 3];
    let mut frozen = small_trainer();
    frozen.frozen_layers = 5; // conv1..conv5
    let start = frozen.model.weights().unwrap().named_tensors().len();
    assert_eq!(start, 16);
    let reference = small_trainer(); // the same weights, nothing frozen
    let mut manual = small_trainer();
    let mut sgd = alexnet_cuda::train::Sgd::new(SgdConfig::default()).unwrap();
    for step in 0..2 {
        frozen.step(x.view(), &labels, step).unwrap();
        // The reference: the full backward, the update applied to the linear layers only.
        let tape = manual.model.forward_train(x.view(), step).unwrap();
        let loss = softmax_cross_entropy(tape.logits().unwrap(), &labels).unwrap();
        let mut grads = manual.model.backward(&tape, loss.grad.view()).unwrap();
        let fc = grads.tensors.split_off(10);
        let mut params = manual.model.parameters_mut();
        let tail = params.split_off(10);
        sgd.step(tail, &Gradients { tensors: fc }).unwrap();
    }
    let got = frozen.model.parameters();
    let untouched = reference.model.parameters();
    let want = manual.model.parameters();
    for i in 0..16 {
        if i < 10 {
            assert_eq!(got[i], untouched[i], "frozen tensor {i} changed");
        } else {
            assert_eq!(got[i], want[i], "tensor {i}");
            assert_ne!(got[i], untouched[i], "tensor {i} did not train");
        }
    }
    assert_eq!(
        frozen.optimiser.velocity().len(),
        6,
        "momentum for the trained tensors"
    );
    // Its checkpoint keeps the momentum of the trained tensors and reads back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frozen.ckpt");
    Checkpoint {
        weights: frozen.model.weights().unwrap(),
        velocity: frozen.optimiser.velocity().to_vec(),
        state: state(2),
    }
    .save(&path)
    .unwrap();
    let config = small_config(Some(0.5));
    let loaded = Checkpoint::load(&path, Some(&config)).unwrap();
    assert_eq!(loaded.velocity, frozen.optimiser.velocity());
    // Freezing every layer would train nothing.
    frozen.frozen_layers = 8;
    assert!(frozen.step(x.view(), &labels, 2).is_err());
}

#[test]
fn weights_saved_under_torchvisions_names_are_its_state_dict_keys() {
    use alexnet_cuda::weights::{SaveOptions, TensorNames};
    let config = AlexNetConfig::torchvision();
    let weights = Weights::paper_init(&config, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tv.safetensors");
    let options = SaveOptions {
        names: TensorNames::Torchvision,
        ..SaveOptions::default()
    };
    weights.save_with(&path, &options).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    // torchvision.models.alexnet().state_dict().keys(), printed by torchvision 0.29, sorted.
    let mut want = [
        "features.0.weight",
        "features.0.bias",
        "features.3.weight",
        "features.3.bias",
        "features.6.weight",
        "features.6.bias",
        "features.8.weight",
        "features.8.bias",
        "features.10.weight",
        "features.10.bias",
        "classifier.1.weight",
        "classifier.1.bias",
        "classifier.4.weight",
        "classifier.4.bias",
        "classifier.6.weight",
        "classifier.6.bias",
    ];
    want.sort();
    assert_eq!(names, want);
    assert_eq!(
        Weights::load(&path, None).unwrap(),
        weights,
        "and they load back"
    );
}
