//! The `infer` binary as a user runs it: exit codes, messages, JSON, logits dumps.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use alexnet_cuda::weights::StorageDtype;
use alexnet_cuda::AlexNetConfig;
use common::*;
use ndarray::Array2;

fn infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infer"))
        .args(args)
        .output()
        .expect("the infer binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_no_panic(out: &Output) {
    let err = stderr(out);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn summary_prints_the_seed_table() {
    let out = infer(&["--summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("62,378,344") && text.contains("96x55x55") && text.contains("37,752,832"),
        "{text}"
    );
    let out = infer(&["--summary", "--config", "torchvision"]);
    assert!(stdout(&out).contains("61,100,840"), "{}", stdout(&out));
}

#[test]
fn bad_images_are_reported_and_the_rest_classified() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["chelsea.png", "camera.png"] {
        std::fs::copy(data_path(&format!("images/{name}")), dir.path().join(name)).unwrap();
    }
    for name in ["truncated.jpg", "not_an_image.png", "empty.jpg"] {
        std::fs::copy(data_path(&format!("bad/{name}")), dir.path().join(name)).unwrap();
    }
    let dump = dir.path().join("logits.npy");
    let out = infer(&[
        "--device",
        "cpu",
        "--batch",
        "2",
        "--top",
        "3",
        "--images",
        path_str(dir.path()),
        "--dump-logits",
        path_str(&dump),
    ]);
    assert_no_panic(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "some images failed: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    for bad in ["truncated.jpg", "not_an_image.png", "empty.jpg"] {
        assert!(err.contains(bad), "stderr does not name {bad}: {err}");
    }
    let text = stdout(&out);
    assert!(
        text.contains("chelsea.png") && text.contains("camera.png"),
        "{text}"
    );
    // Sorted order: camera, chelsea, empty, not_an_image, truncated; NaN rows for the failures.
    let logits: Array2<f32> = ndarray_npy::read_npy(&dump).unwrap();
    assert_eq!(logits.dim(), (5, 1000));
    let finite: Vec<bool> = logits
        .rows()
        .into_iter()
        .map(|r| r.iter().all(|v| v.is_finite()))
        .collect();
    assert_eq!(finite, [true, true, false, false, false]);
}

#[test]
fn bad_weights_stop_with_the_error_message() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let missing = dir.path().join("missing.safetensors");
    for path in [&garbage, &missing] {
        let out = infer(&[
            "--device",
            "cpu",
            "--weights",
            path_str(path),
            "--iterations",
            "1",
        ]);
        assert_no_panic(&out);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.contains(path_str(path)),
            "{err}"
        );
    }
}

/// Without a usable GPU: `--device cuda` is a clear error and `auto` falls back with a notice.
/// With one (a GPU machine): both run on it.
#[test]
fn cuda_device_choice_follows_the_machine() {
    #[cfg(feature = "cuda")]
    let gpu_usable = alexnet_cuda::cuda::Gpu::new(0).is_ok();
    #[cfg(not(feature = "cuda"))]
    let gpu_usable = false;
    let out = infer(&[
        "--device",
        "cuda",
        "--batch",
        "1",
        "--iterations",
        "1",
        "--warmup",
        "0",
    ]);
    assert_no_panic(&out);
    if gpu_usable {
        assert!(out.status.success(), "{}", stderr(&out));
    } else {
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("device unavailable"),
            "{}",
            stderr(&out)
        );
        // The way out is named with the binary's own flag (the library cannot know it).
        assert!(
            stderr(&out).contains("hint: --device cpu runs on the CPU"),
            "{}",
            stderr(&out)
        );
        // --gpu with --device cpu is a usage error, so the hint drops it.
        let out = infer(&[
            "--device",
            "cuda",
            "--gpu",
            "0",
            "--batch",
            "1",
            "--iterations",
            "1",
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("hint: --device cpu, without --gpu, runs on the CPU"),
            "{}",
            stderr(&out)
        );
    }

    let out = infer(&[
        "--batch",
        "1",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("JSON");
    let on_cpu = report["device"].as_str().unwrap_or("").starts_with("CPU");
    assert_eq!(
        on_cpu, !gpu_usable,
        "auto picks the GPU exactly when one is usable: {report}"
    );
    if !gpu_usable {
        assert!(
            stderr(&out).contains("running on the CPU"),
            "one-line notice: {}",
            stderr(&out)
        );
    } else {
        assert!(
            report["stage_ms"]["compute"]["mean"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
}

#[test]
fn json_report_has_the_documented_keys() {
    let out = infer(&[
        "--device",
        "cpu",
        "--batch",
        "2",
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    for key in [
        "device",
        "precision",
        "config",
        "batch",
        "warmup",
        "iterations",
        "throughput_img_per_s",
        "gflop_per_image",
        "achieved_tflops",
    ] {
        assert!(!v[key].is_null(), "missing {key}: {v}");
    }
    assert_eq!(v["batch"], 2);
    assert_eq!(v["iterations"], 2);
    for key in ["min", "mean", "p50", "p90", "p99", "max"] {
        assert!(
            v["latency_ms"][key].as_f64().unwrap() > 0.0,
            "latency_ms.{key}: {v}"
        );
    }
    assert!(v["throughput_img_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn usage_errors_exit_with_code_2() {
    let image = data_path("images/coffee.png");
    let cases: [&[&str]; 10] = [
        &["--batch", "0"],
        &["--top", "0", "--iterations", "1"],
        &["--top", "1001", "--iterations", "1"],
        &["--precision", "fp8"],
        &["--dump-logits", "x.npy"], // nothing to dump without --images
        &["--images", path_str(&image), "--iterations", "3"], // timing flags do not apply
        &["--summary", "--json"],
        &["--device", "cpu", "--gpu", "1", "--iterations", "1"], // a GPU index for the CPU
        &["--summary", "--gpu", "1"],
        &["--summary", "--fp32-gemm-only"], // no convolution runs
    ];
    for args in cases {
        let out = infer(args);
        assert_no_panic(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("error"), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_missing_image_is_reported_and_the_rest_classified() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jpg");
    let good = data_path("images/coffee.png");
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&missing),
        path_str(&good),
    ]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(path_str(&missing)),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("coffee.png"), "{}", stdout(&out));
}

#[test]
fn an_unwritable_dump_path_fails_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("no/such/dir/out.npy");
    let image = data_path("images/coffee.png");
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&image),
        "--dump-logits",
        path_str(&dump),
    ]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(path_str(&dump)), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("coffee.png"),
        "no classification before the error"
    );
}

/// The paths of sample photos under tests/data/images, as arguments.
fn photo_paths(photos: &[&str]) -> Vec<String> {
    photos
        .iter()
        .map(|p| path_str(&data_path(&format!("images/{p}"))).to_string())
        .collect()
}

/// The whole CLI path (weights file, decoding, resize, crop, normalise, model, dump) against
/// PyTorch's logits for the photos.
#[test]
fn dumped_logits_match_pytorch_on_photos() {
    let reference = pytorch_reference();
    let dir = tempfile::tempdir().unwrap();
    for (name, dtype) in [
        ("torchvision", StorageDtype::F32),
        ("paper", StorageDtype::F32),
    ] {
        let config = AlexNetConfig::preset(name).unwrap();
        let weights_path = dir.path().join(format!("{name}.safetensors"));
        formula_weights(&config).save(&weights_path, dtype).unwrap();
        let dump = dir.path().join(format!("{name}.npy"));
        let photos = ["chelsea.png", "coffee.png", "rocket.jpg"];
        let photo_paths = photo_paths(&photos);
        let mut args = vec![
            "--device",
            "cpu",
            "--weights",
            path_str(&weights_path),
            "--dump-logits",
            path_str(&dump),
            "--batch",
            "2",
            "--images",
        ];
        args.extend(photo_paths.iter().map(String::as_str));
        let out = infer(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let logits: Array2<f32> = ndarray_npy::read_npy(&dump).unwrap();
        assert_eq!(logits.dim(), (3, 1000));
        for (row, photo) in photos.iter().enumerate() {
            let want = json_f64s(&reference["presets"][name]["photos"][photo]["logits"]);
            let err = rel_max_error(logits.row(row).as_slice().unwrap(), &want);
            assert!(err < 2e-2, "{name} {photo}: {err:.2e}");
        }
    }
}

#[test]
fn same_seed_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let image = data_path("images/coffee.png");
    let run = |seed: &str, file: &str| -> Array2<f32> {
        let dump = dir.path().join(file);
        let out = infer(&[
            "--device",
            "cpu",
            "--seed",
            seed,
            "--images",
            path_str(&image),
            "--dump-logits",
            path_str(&dump),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        ndarray_npy::read_npy(&dump).unwrap()
    };
    let a = run("7", "a.npy");
    let b = run("7", "b.npy");
    let c = run("8", "c.npy");
    assert_eq!(a, b, "same seed, same logits");
    assert_ne!(a, c, "another seed, other weights");
}

/// Runs infer with its standard output going to `stdout` (a closed pipe, /dev/full, ...).
fn infer_to(args: &[&str], stdout: std::process::Stdio) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infer"))
        .args(args)
        .stdout(stdout)
        .output()
        .expect("the infer binary runs")
}

#[test]
fn a_dump_that_is_also_an_input_is_refused_and_the_input_survives() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("v.png");
    std::fs::copy(data_path("images/coffee.png"), &image).unwrap();
    let before = std::fs::read(&image).unwrap();
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&image),
        "--dump-logits",
        path_str(&image),
    ]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is also an input"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        before,
        "the input was changed"
    );
}

#[test]
fn a_dump_inside_the_images_directory_is_never_read_back() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data_path("images/coffee.png"),
        dir.path().join("coffee.png"),
    )
    .unwrap();
    let dump = dir.path().join("logits.npy");
    let args = [
        "--device",
        "cpu",
        "--images",
        path_str(dir.path()),
        "--dump-logits",
        path_str(&dump),
    ];
    for run in 0..2 {
        let out = infer(&args);
        assert_no_panic(&out);
        assert_eq!(out.status.code(), Some(0), "run {run}: {}", stderr(&out));
        let logits: Array2<f32> = ndarray_npy::read_npy(&dump).unwrap();
        assert_eq!(
            logits.dim(),
            (1, 1000),
            "run {run}: the dump was read as an input"
        );
    }
}

#[test]
fn a_failed_run_leaves_the_previous_dump_intact() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let dump = dir.path().join("logits.npy");
    std::fs::write(&dump, b"the previous results").unwrap();
    // An empty image directory: an error, and nothing written.
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&empty),
        "--dump-logits",
        path_str(&dump),
    ]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dump).unwrap(), b"the previous results");
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn flags_that_do_not_apply_to_the_mode_are_usage_errors() {
    let image = data_path("images/coffee.png");
    let cases: [&[&str]; 6] = [
        &["--dump-logits", "x.npy", "--iterations", "1"],
        &["--dump-logits", "x.npy", "--warmup", "0"],
        &["--summary", "--iterations", "3"],
        &["--summary", "--top", "3"],
        &["--summary", "--images", path_str(&image)],
        &["--top", "3", "--iterations", "1"],
    ];
    let dir = tempfile::tempdir().unwrap();
    for args in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_infer"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_no_panic(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        // Ours, or clap's own for the pairs it already knows.
        let text = stderr(&out);
        assert!(
            text.contains("does not apply") || text.contains("cannot be used with"),
            "{args:?}: {text}"
        );
    }
    assert!(!dir.path().join("x.npy").exists(), "nothing is written");
}

/// `--fp32-gemm-only` is a GPU fp32 setting: refused with another precision, and said (not
/// silently dropped) where the CPU runs.
#[test]
fn fp32_gemm_only_applies_to_gpu_fp32_only() {
    let out = infer(&["--fp32-gemm-only", "--precision", "fp16", "--device", "cpu"]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("fp32 only"), "{}", stderr(&out));
    let out = infer(&[
        "--fp32-gemm-only",
        "--device",
        "cpu",
        "--config",
        "torchvision",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no effect on the CPU"),
        "{}",
        stderr(&out)
    );
    // The report says what ran: the setting did not apply on the CPU.
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("JSON");
    assert_eq!(
        report["fp32_gemm_only"],
        serde_json::json!(false),
        "{report}"
    );
}

#[test]
fn a_closed_pipe_ends_quietly() {
    for args in [
        &["--summary"][..],
        &[
            "--device",
            "cpu",
            "--images",
            path_str(&data_path("images/coffee.png")),
        ][..],
        &[
            "--device",
            "cpu",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--json",
        ][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // the reader is gone before infer writes anything
        let out = infer_to(args, writer.into());
        assert_no_panic(&out);
        assert_eq!(
            stderr(&out).lines().filter(|l| l.contains("error")).count(),
            0,
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_full_disk_is_one_error_line_and_exit_1() {
    let full = std::fs::File::create("/dev/full").unwrap();
    let out = infer_to(&["--summary"], full.into());
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{}", stderr(&out));
    assert!(errors[0].contains("No space left"), "{}", errors[0]);
}

#[test]
fn a_run_where_every_image_failed_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jpg");
    let out = infer(&["--device", "cpu", "--images", path_str(&missing)]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("none of the 1 images"),
        "{}",
        stderr(&out)
    );
}

/// A torchvision-shaped model with a `classes`-way head, saved to `dir/name`.
fn head_weights(dir: &Path, name: &str, classes: usize) -> std::path::PathBuf {
    let mut config = AlexNetConfig::torchvision();
    if let Some(last) = config.fcs.last_mut() {
        last.out_features = classes;
    }
    let path = dir.join(name);
    alexnet_cuda::Weights::paper_init(&config, 7)
        .unwrap()
        .save(&path, StorageDtype::F32)
        .unwrap();
    path
}

/// ImageNet's names belong to 1000-class heads only: a 10-class head prints class indices, or
/// the names of `--labels FILE`, whose line count must match.
#[test]
fn a_ten_class_head_gets_indices_or_its_own_labels() {
    let dir = tempfile::tempdir().unwrap();
    let weights = head_weights(dir.path(), "ten.safetensors", 10);
    let image = data_path("images/coffee.png");
    let base = [
        "--device",
        "cpu",
        "--weights",
        path_str(&weights),
        "--images",
        path_str(&image),
        "--top",
        "3",
    ];
    let out = infer(&base);
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{text}");
    for row in &rows {
        // "  12.34%     7": a probability and an index, no ImageNet name ("tench", "hen", ...).
        assert_eq!(row.split_whitespace().count(), 2, "{row:?} in {text}");
    }

    let names: Vec<String> = (0..10).map(|i| format!("kind-{i}")).collect();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, names.join("\n") + "\n").unwrap();
    let mut args = base.to_vec();
    args.extend(["--labels", path_str(&labels), "--json"]);
    let out = infer(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    for entry in v["images"][0]["top"].as_array().unwrap() {
        let class = entry["class"].as_u64().unwrap() as usize;
        assert_eq!(entry["label"], names[class].as_str(), "{v}");
    }

    // 9 names for 10 classes: a usage error naming both counts, before any image is read.
    std::fs::write(&labels, names[..9].join("\n")).unwrap();
    let out = infer(&args);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("9 lines") && err.contains("10 classes"),
        "{err}"
    );
}

/// A 1000-class model keeps ImageNet's names without --labels (the default stays).
#[test]
fn a_thousand_class_head_keeps_imagenet_names() {
    let image = data_path("images/coffee.png");
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&image),
        "--top",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = stdout(&out).lines().nth(1).unwrap_or_default().to_string();
    assert!(row.split_whitespace().count() >= 3, "{row:?}");
}

/// Weights holding a NaN: a warning naming the first layer whose output is not finite (and the
/// tensor), and JSON that shows the NaN instead of `null` under a valid-looking class.
#[test]
fn nan_logits_are_explained_and_stay_visible() {
    let dir = tempfile::tempdir().unwrap();
    let config = AlexNetConfig::torchvision();
    let clean = alexnet_cuda::Weights::paper_init(&config, 3).unwrap();
    let values: std::collections::HashMap<String, Vec<f32>> = clean
        .named_tensors()
        .into_iter()
        .map(|(name, _, v)| (name, v.into_owned()))
        .collect();
    // One NaN in conv3's weights (the third convolution): conv1 and conv2 stay finite.
    let weights = alexnet_cuda::Weights::from_fn(&config, |_, name, _| {
        let mut v = values[name].clone();
        if name == "conv3.weight" {
            v[17] = f32::NAN;
        }
        v
    })
    .unwrap();
    let path = dir.path().join("nan.safetensors");
    weights.save(&path, StorageDtype::F32).unwrap();
    let image = data_path("images/coffee.png");
    let out = infer(&[
        "--device",
        "cpu",
        "--weights",
        path_str(&path),
        "--images",
        path_str(&image),
        "--json",
    ]);
    assert_no_panic(&out);
    let err = stderr(&out);
    assert!(err.contains("not finite") && err.contains("conv3"), "{err}");
    assert!(err.contains("conv3.weight (1 values)"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let image = &v["images"][0];
    assert_eq!(image["finite"], false, "{v}");
    for entry in image["top"].as_array().unwrap() {
        assert_eq!(entry["probability"], "NaN", "{v}");
    }
}

/// `--max-image-bytes` lowers (or raises) the per-image read cap; a file over it is reported
/// by name and the rest classified.
#[test]
fn max_image_bytes_caps_each_file() {
    let small = data_path("images/coffee.png");
    let size = std::fs::metadata(&small).unwrap().len();
    let cap = (size - 1).to_string();
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&small),
        "--max-image-bytes",
        &cap,
    ]);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("coffee.png") && err.contains("too large"),
        "{err}"
    );
    let out = infer(&[
        "--device",
        "cpu",
        "--images",
        path_str(&small),
        "--max-image-bytes",
        &size.to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Timing synthetic batches reads no image: the flag is a usage error there.
    let out = infer(&["--max-image-bytes", "10", "--iterations", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// `--precision tf32` is a GPU math mode: on the CPU the run says it computes fp32 and reports
/// fp32 (never a silent substitution).
#[test]
fn tf32_on_the_cpu_is_reported_as_fp32() {
    let out = infer(&[
        "--device",
        "cpu",
        "--precision",
        "tf32",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("tf32 is a GPU math mode"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["precision"], "fp32", "{v}");
}

/// `--precision bf16` runs where the other precisions do: `auto` (the default device) on a
/// usable GPU of compute capability 8.0 or newer, else on the CPU with the notice that says
/// why, reporting bf16 either way; `--device cuda` without such a GPU is the "device
/// unavailable" error (exit 1), never a silent CPU run.
#[test]
fn bf16_runs_on_a_usable_gpu_or_the_cpu() {
    let args = [
        "--precision",
        "bf16",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--json",
    ];
    let out = infer(&args);
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["precision"], "bf16", "{v}");
    let on_gpu = !v["device"].as_str().unwrap_or("").starts_with("CPU");
    if !on_gpu {
        assert!(
            stderr(&out).contains("running on the CPU"),
            "{}",
            stderr(&out)
        );
    }
    let out = infer(&[&["--device", "cuda"], &args[..]].concat());
    assert_no_panic(&out);
    if on_gpu {
        assert!(out.status.success(), "{}", stderr(&out));
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("device unavailable"),
            "{}",
            stderr(&out)
        );
    }
}

/// `--ten-crop` end to end: the dumped log-probabilities are PyTorch's ten-crop averages
/// (tools/ten_crop_reference.py), and the flag is refused where it means nothing.
#[test]
fn ten_crop_gives_pytorchs_averaged_probabilities() {
    let text = std::fs::read_to_string(data_path("ten_crop_reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights_path = dir.path().join("paper.safetensors");
    formula_weights(&AlexNetConfig::paper())
        .save(&weights_path, StorageDtype::F32)
        .unwrap();
    let dump = dir.path().join("ten.npy");
    let photos = ["chelsea.png", "coffee.png", "camera.png"];
    let photo_paths = photo_paths(&photos);
    let mut args = vec![
        "--device",
        "cpu",
        "--weights",
        path_str(&weights_path),
        "--ten-crop",
        "--dump-logits",
        path_str(&dump),
        "--batch",
        "2",
        "--images",
    ];
    args.extend(photo_paths.iter().map(String::as_str));
    let out = infer(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let logs: Array2<f32> = ndarray_npy::read_npy(&dump).unwrap();
    for (row, photo) in photos.iter().enumerate() {
        let probabilities: Vec<f32> = logs.row(row).iter().map(|l| l.exp()).collect();
        let want = json_f64s(&reference["photos"][photo]["probabilities"]);
        let err = rel_max_error(&probabilities, &want);
        assert!(err < 1e-5, "{photo}: {err:.2e}");
    }
    let out = infer(&["--ten-crop", "--batch", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
