//! The `train` binary against PyTorch on image files: two steps of `train` from given weights
//! update every tensor as two steps of `torch.optim.SGD` do, to 1e-4 of the tensor's largest
//! update (tools/pytorch_train_steps_reference.py wrote tests/data/pytorch_train_steps.json,
//! and checked that PyTorch's own float32 run meets that bound ten times over), and on
//! the small shapes dataset (tools/make_shapes_dataset.py, tests/data/shapes) the training loss
//! falls below a stated threshold within a stated number of steps.

mod common;
#[path = "common/train_cli.rs"]
mod train_cli;

use std::path::{Path, PathBuf};

use alexnet_cuda::weights::StorageDtype;
use alexnet_cuda::{AlexNetConfig, Weights};
use train_cli::{path, text, train};

fn shapes(split: &str) -> PathBuf {
    common::data_path("shapes").join(split)
}

/// The formula image of tools/pytorch_train_steps_reference.py `formula_image`: byte i (HWC)
/// is `(v + 1) * 127.99` truncated, from the f32 formula value v.
fn formula_image(stream: u64, side: u32) -> image::RgbImage {
    let bytes = common::formula_values(stream, (side * side * 3) as usize, 1.0)
        .into_iter()
        .map(|v| ((v + 1.0) * 127.99) as u8)
        .collect();
    image::RgbImage::from_raw(side, side, bytes).expect("side * side * 3 bytes")
}

/// The paper preset with a `classes`-way last layer and no dropout.
fn paper_with_classes(classes: usize) -> AlexNetConfig {
    let mut config = AlexNetConfig::paper();
    config
        .fcs
        .last_mut()
        .expect("the paper preset has linear layers")
        .out_features = classes;
    config
}

#[test]
fn two_train_steps_update_every_tensor_as_torch_optim_sgd_does() {
    let reference = {
        let text = std::fs::read_to_string(common::data_path("pytorch_train_steps.json"))
            .expect("tests/data/pytorch_train_steps.json (tools/pytorch_train_steps_reference.py)");
        serde_json::from_str::<serde_json::Value>(&text).expect("fixture JSON")
    };
    let dir = tempfile::tempdir().unwrap();

    // The fixture's formula images, one class folder each, so that list order is label order.
    let data = dir.path().join("data");
    let side = reference["side"].as_u64().unwrap() as u32;
    let streams = reference["image_streams"]
        .as_array()
        .expect("image streams");
    for (class, stream) in streams.iter().enumerate() {
        let folder = data.join(format!("class{class}"));
        std::fs::create_dir_all(&folder).unwrap();
        formula_image(stream.as_u64().unwrap(), side)
            .save(folder.join("00.png"))
            .unwrap();
    }
    let classes = reference["classes"].as_u64().unwrap() as usize;
    assert_eq!(streams.len(), classes, "one image per class");

    let config = paper_with_classes(classes);
    let before = common::formula_weights(&config);
    let start = dir.path().join("start.safetensors");
    before.save(&start, StorageDtype::F32).unwrap();
    let save = dir.path().join("after.safetensors");
    // Every setting spelled out, though lr 0.01, momentum 0.9 and weight decay 5e-4 are the
    // defaults: the run must be the fixture's whatever the defaults become.
    let number = |key: &str| reference[key].as_f64().unwrap().to_string();
    let out = train(&[
        "--data",
        path(&data),
        "--weights",
        path(&start),
        "--batch",
        &number("batch"),
        "--steps",
        &number("steps"),
        "--lr",
        &number("learning_rate"),
        "--momentum",
        &number("momentum"),
        "--weight-decay",
        &number("weight_decay"),
        "--no-augment",
        "--no-shuffle",
        "--dropout",
        "0",
        "--device",
        "cpu",
        "--save",
        path(&save),
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let after = Weights::load(&save, None).unwrap();
    let updates = reference["updates"].as_array().expect("updates");
    let (before, after) = (before.named_tensors(), after.named_tensors());
    assert_eq!(before.len(), updates.len());
    assert_eq!(after.len(), updates.len());
    let mut worst = (0.0f64, String::new());
    for (((name, _, b), (after_name, _, a)), want) in before.iter().zip(&after).zip(updates) {
        assert_eq!(name, after_name);
        // The update in f64 from the f32 weights: after - before is exact there.
        let update: Vec<f64> = a
            .iter()
            .zip(b.iter())
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        let largest = want["max_abs"].as_f64().unwrap();
        assert!(largest > 0.0, "{name}: the reference update is zero");
        let tolerance = 1e-4 * largest;
        let mut note = |what: &str, got: f64, expected: f64, tolerance: f64| {
            let error = (got - expected).abs();
            assert!(
                error <= tolerance,
                "{name} {what}: {got} against PyTorch's {expected} (error {error:e}, \
                 allowed {tolerance:e})"
            );
            if error / tolerance > worst.0 {
                worst = (error / tolerance, format!("{name} {what}"));
            }
        };
        let ours_largest = update.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        note("largest |update|", ours_largest, largest, tolerance);
        let abs_sum: f64 = update.iter().map(|v| v.abs()).sum();
        let want_abs_sum = want["abs_sum"].as_f64().unwrap();
        note("sum |update|", abs_sum, want_abs_sum, 1e-4 * want_abs_sum);
        let indices = want["indices"].as_array().unwrap();
        let values = common::json_f64s(&want["values"]);
        assert_eq!(indices.len(), values.len());
        for (index, expected) in indices.iter().zip(values) {
            let index = index.as_u64().unwrap() as usize;
            note(
                &format!("update[{index}]"),
                update[index],
                expected,
                tolerance,
            );
        }
    }
    eprintln!("worst: {:.3} of the allowed error ({})", worst.0, worst.1);
}

/// The mean training loss of each epoch, from the `--log` CSV.
fn epoch_losses(log: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let column = header
        .iter()
        .position(|h| *h == "train_loss")
        .expect("a train_loss column");
    lines
        .map(|line| line.split(',').nth(column).unwrap().parse().unwrap())
        .collect()
}

/// The overfitting check every training loop should pass: on the 32 training images of
/// tests/data/shapes (4 classes: bars, columns, disc, square), from the formula's He-uniform
/// weights with a 4-way head, without augmentation or dropout, lr 0.0003, batch 8, the mean
/// loss of an epoch (4 steps) falls from about 1.8 (chance is ln 4 = 1.39) below 0.3 within 8
/// epochs = 32 steps. Measured when this test was written: 1.83, 1.72, 0.80, 0.62, 0.37, 0.21,
/// 0.18, 0.12. (The paper's initialisation does not learn this fast at batch 8: its biases of
/// 1 and fc1's 9216 inputs make small batches unstable at lr 0.01 and 0.001, and at 0.0001 the
/// loss stays near 2 for 40 steps.)
#[test]
fn training_loss_on_the_shapes_dataset_falls_below_0_3_within_32_steps() {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start.safetensors");
    common::formula_weights(&paper_with_classes(4))
        .save(&start, StorageDtype::F32)
        .unwrap();
    let save = dir.path().join("shapes.safetensors");
    let log = dir.path().join("shapes.csv");
    let out = train(&[
        "--data",
        path(&shapes("train")),
        "--val",
        path(&shapes("val")),
        "--weights",
        path(&start),
        "--batch",
        "8",
        "--steps",
        "32",
        "--lr",
        "0.0003",
        "--lr-steps",
        "100",
        "--no-augment",
        "--dropout",
        "0",
        "--device",
        "cpu",
        "--save",
        path(&save),
        "--log",
        path(&log),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let losses = epoch_losses(&log);
    eprintln!("epoch losses: {losses:?}");
    assert_eq!(losses.len(), 8, "32 steps of 8 over 32 images are 8 epochs");
    assert!(
        losses[0] > 1.0,
        "the first epoch starts near chance: {losses:?}"
    );
    let last = *losses.last().unwrap();
    assert!(
        last < 0.3,
        "the loss fell to {last}, not below 0.3: {losses:?}"
    );
}
