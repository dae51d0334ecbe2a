//! The `train` binary end to end on a tiny image folder: its steps are the library's, a resumed
//! run ends bit-identical to an uninterrupted one, the saved file carries the class names that
//! `infer` prints, and what a user can get wrong is a usage error before any work.

mod common;
#[path = "common/train_cli.rs"]
mod train_cli;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::image::Preprocess;
use alexnet_cuda::train::{
    Augmentation, BatchMaker, Checkpoint, CpuTrainer, ImageFolder, SgdConfig, Trainer,
};
use alexnet_cuda::{AlexNetConfig, Precision, Weights};
use image::RgbImage;
use train_cli::{path, text, train};

const CLASSES: [&str; 3] = ["ants", "bees", "cats"];

/// ROOT/<class>/<i>.png: two images per class, each its own pattern and size.
fn dataset(root: &Path) -> PathBuf {
    for (c, class) in CLASSES.iter().enumerate() {
        let dir = root.join("data").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..2u32 {
            let (w, h) = (260 + 20 * i + 7 * c as u32, 240 + 10 * c as u32);
            let bytes =
                common::formula_values(50 + 2 * c as u64 + i as u64, (w * h * 3) as usize, 1.0)
                    .into_iter()
                    .map(|v| ((v + 1.0) * 127.9) as u8)
                    .collect();
            RgbImage::from_raw(w, h, bytes)
                .unwrap()
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
    }
    root.join("data")
}

#[test]
fn two_steps_of_train_are_two_steps_of_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("out.safetensors");
    let out = train(&[
        "--data",
        path(&data),
        "--classes",
        "3",
        "--seed",
        "0",
        "--batch",
        "2",
        "--steps",
        "2",
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

    // The same two steps through the library: the paper's initialisation with a 3-way head
    // (each tensor has its own stream, so the head is what paper_init gives a 3-class config).
    let mut config = AlexNetConfig::paper();
    config.fcs.last_mut().unwrap().out_features = 3;
    for fc in &mut config.fcs {
        fc.dropout = fc.dropout.map(|_| 0.0);
    }
    let model = CpuModel::new(&Weights::paper_init(&config, 0).unwrap(), Precision::Fp32).unwrap();
    let mut trainer = CpuTrainer::new(model, SgdConfig::default()).unwrap();
    let folder = Arc::new(ImageFolder::open(&data).unwrap());
    let mut maker = BatchMaker::new(
        folder,
        2,
        false,
        Augmentation::None,
        Preprocess::default(),
        0,
    )
    .unwrap();
    for step in 0..2 {
        let batch = maker.make(step).unwrap();
        trainer
            .step(batch.images.view(), &batch.labels, 99)
            .unwrap();
    }
    let saved = Weights::load(&save, None).unwrap();
    assert_eq!(
        saved.named_tensors(),
        trainer.model.weights().unwrap().named_tensors()
    );
    let names = Weights::class_names_in(&save)
        .unwrap()
        .expect("class names saved");
    assert_eq!(names, CLASSES);

    // infer prints those names for that file.
    let image = data.join("bees").join("0.png");
    let out = Command::new(env!("CARGO_BIN_EXE_infer"))
        .args([
            "--weights",
            path(&save),
            "--images",
            path(&image),
            "--top",
            "3",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(CLASSES.iter().all(|c| stdout.contains(c)), "{stdout}");
}

#[test]
fn a_resumed_run_ends_as_the_uninterrupted_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let file = |name: &str| dir.path().join(name);
    // Augmentation, shuffling and dropout on: everything random must resume exactly.
    // (--classes shapes a fresh run only: a resumed run takes its head from the checkpoint.)
    let common = [
        "--data",
        path(&data),
        "--val",
        path(&data),
        "--batch",
        "2",
        "--seed",
        "7",
        "--device",
        "cpu",
    ];
    let run = |extra: &[&str]| {
        let out = train(&[&common[..], extra].concat());
        assert!(out.status.success(), "{}", text(&out));
        out
    };
    let full = run(&[
        "--classes",
        "3",
        "--steps",
        "4",
        "--save",
        path(&file("full.safetensors")),
        "--log",
        path(&file("full.csv")),
    ]);
    run(&[
        "--classes",
        "3",
        "--steps",
        "2",
        "--save",
        path(&file("half.safetensors")),
        "--checkpoint",
        path(&file("half.ckpt")),
    ]);
    let resumed = run(&[
        "--resume",
        path(&file("half.ckpt")),
        "--steps",
        "4",
        "--save",
        path(&file("resumed.safetensors")),
    ]);
    assert!(
        String::from_utf8_lossy(&resumed.stdout).contains("from step 2"),
        "{}",
        text(&resumed)
    );
    // The resumed run's checkpoint (beside its --save) carries the end it was given, so that
    // a later --resume of it without --steps goes on to that end, not to the first run's.
    let continued = Checkpoint::load(file("resumed.ckpt.safetensors"), None).unwrap();
    assert_eq!(continued.state.step, 4);
    assert_eq!(
        continued.state.settings["steps"], 4,
        "{}",
        continued.state.settings
    );
    let a = Weights::load(file("full.safetensors"), None).unwrap();
    let b = Weights::load(file("resumed.safetensors"), None).unwrap();
    assert!(
        a == b,
        "the resumed run's weights differ from the uninterrupted run's"
    );
    // With an image added the same steps would take other images: refused, naming both counts.
    std::fs::copy(data.join("ants/0.png"), data.join("ants/2.png")).unwrap();
    let other = train(
        &[
            &common[..],
            &[
                "--resume",
                path(&file("half.ckpt")),
                "--save",
                path(&file("other.safetensors")),
            ],
        ]
        .concat(),
    );
    assert!(!other.status.success(), "{}", text(&other));
    assert!(
        String::from_utf8_lossy(&other.stderr)
            .contains("holds 7 images, the checkpoint's run had 6"),
        "{}",
        text(&other)
    );
    assert!(!file("other.safetensors").exists());
    // A checkpoint from before the count was kept is not refused, and the run's own
    // checkpoints record the count from then on.
    let mut old = Checkpoint::load(file("half.ckpt"), None).unwrap();
    assert_eq!(old.state.settings["images"], 6);
    old.state.settings.as_object_mut().unwrap().remove("images");
    old.save(file("old.ckpt")).unwrap();
    let resumed_old = train(
        &[
            &common[..],
            &[
                "--resume",
                path(&file("old.ckpt")),
                "--steps",
                "3",
                "--save",
                path(&file("old-run.safetensors")),
            ],
        ]
        .concat(),
    );
    assert!(resumed_old.status.success(), "{}", text(&resumed_old));
    let recorded = Checkpoint::load(file("old-run.ckpt.safetensors"), None).unwrap();
    assert_eq!(recorded.state.settings["images"], 7);
    // Six images, batches of two: step 3 ends the first epoch, which the log records.
    let log = std::fs::read_to_string(file("full.csv")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].starts_with("epoch,step,train_loss,val_top1_error"),
        "{log}"
    );
    assert!(lines[1].starts_with("1,3,"), "{log}");
    // The curves beside the log: an SVG with both charts and a point per epoch.
    let svg = std::fs::read_to_string(file("full.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg:.200}");
    assert!(svg.contains("training loss") && svg.contains("validation error"));
    // And a PNG: the loss line (blue), the top-1 line (red) and text (the captions, drawn
    // with the font compiled into the binary) are all on it.
    let png = image::open(file("full.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (800, 600));
    let count = |wanted: fn(&image::Rgb<u8>) -> bool, rows: std::ops::Range<u32>| {
        png.enumerate_pixels()
            .filter(|(_, y, p)| rows.contains(y) && wanted(p))
            .count()
    };
    let blue = |p: &image::Rgb<u8>| p.0[2] > 200 && p.0[0] < 80 && p.0[1] < 80;
    let red = |p: &image::Rgb<u8>| p.0[0] > 200 && p.0[1] < 80 && p.0[2] < 80;
    let ink = |p: &image::Rgb<u8>| p.0.iter().all(|&c| c < 100);
    assert!(count(blue, 0..300) > 0, "no loss line in the upper chart");
    assert!(count(red, 300..600) > 0, "no top-1 line in the lower chart");
    assert!(count(ink, 0..30) > 20, "no caption text at the top");
    assert!(
        String::from_utf8_lossy(&full.stdout).contains("epoch 1: train loss"),
        "{}",
        text(&full)
    );
}

/// Without a usable GPU, `--device cuda` is a clear error naming why (no work done, nothing
/// saved) and the default `auto` trains on the CPU with a note; with one (a GPU machine) both
/// train on it.
/// Whether this machine has a GPU the crate can use.
fn gpu_usable() -> bool {
    #[cfg(feature = "cuda")]
    return alexnet_cuda::cuda::Gpu::new(0).is_ok();
    #[cfg(not(feature = "cuda"))]
    false
}

/// `train` for one step of batch 2 of the torchvision preset with a 3-class head on `data`,
/// saving to `save`, with `extra` flags.
fn one_step(data: &Path, save: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--data",
        path(data),
        "--steps",
        "1",
        "--batch",
        "2",
        "--classes",
        "3",
        "--config",
        "torchvision",
        "--save",
        path(save),
    ];
    args.extend_from_slice(extra);
    train(&args)
}

#[test]
fn train_device_choice_follows_the_machine() {
    let gpu_usable = gpu_usable();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("out.safetensors");
    let run = |device: &str| one_step(&data, &save, &["--device", device]);
    let out = run("cuda");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{}", text(&out));
    if gpu_usable {
        assert!(out.status.success(), "{}", text(&out));
        assert!(stderr.contains("training on"), "{}", text(&out));
        return;
    }
    #[cfg(feature = "cuda")]
    let says = "device unavailable";
    #[cfg(not(feature = "cuda"))]
    let says = "no GPU support";
    assert!(
        matches!(out.status.code(), Some(1 | 2)) && stderr.contains(says),
        "expected a failure saying {says:?}: {}",
        text(&out)
    );
    #[cfg(feature = "cuda")]
    assert!(
        stderr.contains("hint: --device cpu trains on the CPU"),
        "the way out is named with train's own flag: {}",
        text(&out)
    );
    assert!(
        !save.exists(),
        "nothing is saved by a run that did not start"
    );
    let out = run("auto");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("training on the CPU"),
        "{}",
        text(&out)
    );
}

#[test]
fn mixed_precision_never_falls_back_to_fp32_and_tf32_on_the_cpu_says_so() {
    let gpu_usable = gpu_usable();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("out.safetensors");
    let run = |device: &str, precision: &str| {
        one_step(
            &data,
            &save,
            &["--device", device, "--precision", precision],
        )
    };
    for mixed in ["fp16", "bf16"] {
        // Asking the CPU for mixed precision is a usage error, whatever the machine.
        let out = run("cpu", mixed);
        assert_eq!(out.status.code(), Some(2), "{mixed}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("GPU only"),
            "{}",
            text(&out)
        );
        assert!(
            !save.exists(),
            "nothing is saved by a run that did not start"
        );
        // auto: the GPU, or a failure that says why; never an fp32 run on the CPU.
        let out = run("auto", mixed);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{}", text(&out));
        // bf16 needs compute capability 8.0: an older GPU is a failure naming it.
        let too_old = mixed == "bf16" && stderr.contains("compute capability");
        if gpu_usable && !too_old {
            assert!(out.status.success(), "{}", text(&out));
            assert!(stderr.contains(&format!("in {mixed}")), "{}", text(&out));
            std::fs::remove_file(&save).unwrap();
        } else {
            assert!(
                matches!(out.status.code(), Some(1 | 2)) && stderr.contains("GPU only"),
                "{}",
                text(&out)
            );
            // No usable GPU (rc 1): the way to the CPU drops the mixed precision too.
            if out.status.code() == Some(1) {
                assert!(
                    stderr.contains("hint: --device cpu --precision fp32 trains on the CPU"),
                    "{}",
                    text(&out)
                );
            }
            assert!(
                !save.exists(),
                "nothing is saved by a run that did not start"
            );
        }
    }
    // tf32 on the CPU trains in fp32 and says so.
    let out = run("cpu", "tf32");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the CPU trains in fp32"),
        "{}",
        text(&out)
    );
    assert!(save.exists());
}

/// `--fp32-gemm-only` is a GPU fp32 setting: refused with another precision before any work,
/// and said (not silently dropped) where the CPU trains.
#[test]
fn fp32_gemm_only_applies_to_gpu_fp32_training_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("out.safetensors");
    for precision in ["tf32", "fp16"] {
        let flags = ["--fp32-gemm-only", "--precision", precision];
        let out = one_step(&data, &save, &flags);
        assert_eq!(out.status.code(), Some(2), "{precision}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("fp32 only"),
            "{}",
            text(&out)
        );
        assert!(
            !save.exists(),
            "nothing is saved by a run that did not start"
        );
    }
    let out = one_step(&data, &save, &["--fp32-gemm-only", "--device", "cpu"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no effect on the CPU"),
        "{}",
        text(&out)
    );
    assert!(save.exists());
}

/// `--nondeterministic` and `--channels-last` are GPU settings: where the CPU trains each is
/// said, not silently dropped, and the run goes on.
#[test]
fn gpu_settings_are_said_to_do_nothing_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("out.safetensors");
    let flags = ["--nondeterministic", "--channels-last", "--device", "cpu"];
    let out = one_step(&data, &save, &flags);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--nondeterministic is a GPU setting"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains("--channels-last is a GPU layout: no effect on the CPU"),
        "{}",
        text(&out)
    );
    assert!(save.exists());
}

/// An epoch end a run left undone (its validation failed, and the checkpoint was saved just
/// before it) is done first when the run resumes, also at the run's last step, where no step
/// would reach it; the figures of the training it did not see are NaN in the log.
#[test]
fn a_resumed_run_first_does_the_epoch_end_its_checkpoint_left_undone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let file = |name: &str| dir.path().join(name);
    let common = ["--data", path(&data), "--batch", "2", "--device", "cpu"];
    // Six images, batches of two: step 3 ends epoch 1, and the run.
    let first = train(
        &[
            &common[..],
            &[
                "--classes",
                "3",
                "--steps",
                "3",
                "--save",
                path(&file("a.safetensors")),
            ],
        ]
        .concat(),
    );
    assert!(first.status.success(), "{}", text(&first));
    let mut checkpoint = Checkpoint::load(file("a.ckpt.safetensors"), None).unwrap();
    assert_eq!((checkpoint.state.step, checkpoint.state.epoch), (3, 1));
    // What the failed epoch end leaves: the step done, its epoch not ended.
    checkpoint.state.epoch = 0;
    checkpoint.save(file("undone.ckpt")).unwrap();
    let resumed = train(
        &[
            &common[..],
            &[
                "--val",
                path(&data),
                "--resume",
                path(&file("undone.ckpt")),
                "--save",
                path(&file("b.safetensors")),
                "--log",
                path(&file("b.csv")),
            ],
        ]
        .concat(),
    );
    assert!(resumed.status.success(), "{}", text(&resumed));
    let log = std::fs::read_to_string(file("b.csv")).unwrap();
    let rows: Vec<&str> = log.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{log}");
    assert!(rows[0].starts_with("1,3,NaN,"), "{log}");
    assert!(
        String::from_utf8_lossy(&resumed.stdout).contains("epoch 1: train loss NaN, val top-1"),
        "{}",
        text(&resumed)
    );
}

/// A long run says it is alive where no progress bar is drawn (stderr is a pipe here);
/// under `nohup` (SIGHUP ignored) a hang-up leaves it running, as an interrupt does a
/// background job started with SIGINT ignored; and SIGTERM (a scheduler's
/// pre-emption; Ctrl-C's SIGINT the same) stops it after the current step with a checkpoint of
/// that step, exit status 130, and no --save file.
#[test]
fn a_run_prints_progress_and_a_signal_stops_it_with_a_checkpoint() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("long.safetensors");
    // As `nohup` starts it (SIGHUP ignored), in the background of a script (SIGINT ignored).
    let mut child = Command::new("sh")
        .args([
            "-c",
            "trap '' HUP INT; exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_train"),
        ])
        .args([
            "--data",
            path(&data),
            "--classes",
            "3",
            "--batch",
            "2",
            "--steps",
            "100000",
            "--lr", // small enough for the loss to stay finite on six images
            "0.0001",
            "--device",
            "cpu",
            "--progress-every",
            "0",
            "--save",
            path(&save),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |name: &str| {
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -{name} {pid}")])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    };
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    // A hang-up and an interrupt after the first step's line; the run goes on (a caught one
    // would stop it at the next step boundary, by step 3); SIGTERM after the fourth.
    for line in lines.by_ref() {
        let line = line.unwrap();
        let step = |n: u32| line.starts_with(&format!("step {n}/100000 (epoch "));
        let (first, fourth) = (step(1), step(4));
        seen.push(line);
        if first {
            signal("HUP");
            signal("INT");
        }
        if fourth {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.starts_with("step 4/100000")),
        "no progress line after the hang-up: {seen:#?}"
    );
    signal("TERM");
    seen.extend(lines.map(Result::unwrap));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.starts_with("stopped at step")),
        "{seen:#?}"
    );
    let checkpoint = Checkpoint::load(dir.path().join("long.ckpt.safetensors"), None).unwrap();
    assert!(checkpoint.state.step >= 4, "{}", checkpoint.state.step);
    assert!(!save.exists(), "an interrupted run saves no final weights");
}

#[test]
fn what_a_user_gets_wrong_is_a_usage_error_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let save = dir.path().join("out.safetensors");
    let base = ["--data", path(&data), "--steps", "1", "--save", path(&save)];
    let refused = |extra: &[&str], says: &str| {
        let out = train(&[&base[..], extra].concat());
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "expected {says:?}: {}", text(&out));
    };
    refused(&[], "--classes 3"); // 1000-class model, 3-class data
    let weights = dir.path().join("start.safetensors");
    Weights::paper_init(&AlexNetConfig::torchvision(), 0)
        .unwrap()
        .save(&weights, alexnet_cuda::weights::StorageDtype::F32)
        .unwrap();
    let out = train(&[
        "--data",
        path(&data),
        "--steps",
        "1",
        "--classes",
        "3",
        "--weights",
        path(&weights),
        "--save",
        path(&weights),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("overwrite"),
        "{}",
        text(&out)
    );
    refused(
        &["--classes", "3", "--freeze", "fc3"],
        "nothing would train",
    );
    refused(&["--classes", "3", "--freeze", "conv9"], "no layer `conv9`");
    refused(
        &["--classes", "3", "--device", "cpu", "--gpu", "1"],
        "--gpu picks a GPU",
    );
    refused(
        &["--classes", "3", "--freeze", "conv2..conv4"],
        "starts at the first layer",
    );
    // The log's pictures: never over the log itself, never over someone else's picture.
    let picture_log = dir.path().join("curves.png");
    refused(
        &["--classes", "3", "--log", path(&picture_log)],
        "overwritten by its own picture",
    );
    let photo = dir.path().join("holiday.png");
    std::fs::write(&photo, b"a user's picture").unwrap();
    let log = dir.path().join("holiday.csv");
    refused(
        &["--classes", "3", "--log", path(&log)],
        "holiday.png exists",
    );
    assert_eq!(std::fs::read(&photo).unwrap(), b"a user's picture");
    // A new run never adds its rows to another run's log.
    let old_log = dir.path().join("old.csv");
    std::fs::write(&old_log, b"epoch,step\n1,3\n").unwrap();
    refused(
        &["--classes", "3", "--log", path(&old_log)],
        "a new run starts its own log",
    );
    assert_eq!(std::fs::read(&old_log).unwrap(), b"epoch,step\n1,3\n");
    std::fs::write(dir.path().join("out.ckpt.safetensors"), b"a previous run").unwrap();
    refused(&["--classes", "3"], "exists");
    assert!(!save.exists(), "nothing was written");
}
