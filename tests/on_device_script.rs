//! `tools/gpu/on-device.sh` drives the packed `infer` and `train` on a lent GPU, whose minutes
//! are few: a flag either binary no longer takes would be found there, at the lease's cost.
//! Here the script's `libs`, `infer`, `latency` and `train` steps run against this build's
//! binaries, laid out as `tools/gpu/bundle.sh` packs them. Without a GPU every GPU step must
//! get past its arguments to the device check ("device unavailable", exit 1); a usage error
//! (exit 2) is a stale flag. The CPU training run must finish.

use std::path::Path;
use std::process::Command;

/// The steps the script reports, as its `note` lines start, each with the status it ran to.
fn step_statuses(summary: &str) -> Vec<(String, u32, String)> {
    summary
        .lines()
        .filter(|line| {
            ["libs ", "infer ", "train "]
                .iter()
                .any(|s| line.starts_with(s))
        })
        .filter_map(|line| {
            let (step, rest) = line.split_once(" rc=")?;
            let (code, said) = rest.split_once(':').unwrap_or((rest, ""));
            Some((
                step.to_string(),
                code.trim().parse().ok()?,
                said.to_string(),
            ))
        })
        .collect()
}

/// `to` made to point at `from`: where the script runs, bundle.sh's layout without copies.
#[cfg(unix)]
fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to).unwrap();
}

#[cfg(not(unix))]
fn link(_: &Path, _: &Path) {
    unreachable!("the test that links is ignored off Unix");
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a build without the `cuda` feature refuses --device cuda as a usage error"
)]
#[cfg_attr(
    not(unix),
    ignore = "on-device.sh is a bash script for Linux GPU machines"
)]
fn the_device_runs_steps_take_the_binaries_flags() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = tempfile::tempdir().unwrap();
    let bundle = root.path().join(".gpu");
    std::fs::create_dir_all(bundle.join("bin")).unwrap();
    std::fs::copy(
        repo.join("tools/gpu/on-device.sh"),
        bundle.join("on-device.sh"),
    )
    .unwrap();
    // bundle.sh's names for the executables; the training data where the script looks.
    link(
        Path::new(env!("CARGO_BIN_EXE_infer")),
        &bundle.join("bin/bin-infer"),
    );
    link(
        Path::new(env!("CARGO_BIN_EXE_train")),
        &bundle.join("bin/bin-train"),
    );
    link(&repo.join("tests"), &root.path().join("tests"));
    let out = root.path().join("out");

    let run = Command::new("bash")
        .arg(bundle.join("on-device.sh"))
        .args(["libs", "infer", "latency", "train"])
        .env("OUT", &out)
        .env("INFER_TIMEOUT", "120")
        .output()
        .unwrap();
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap_or_default();
    let context = format!(
        "{summary}\n--- stdout/stderr:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    let steps = step_statuses(&summary);
    let expected = [
        "libs (crate's own search)",
        "infer fp32 batch 128",
        "infer fp32g batch 128",
        "infer tf32 batch 128",
        "infer fp16 batch 128",
        "infer bf16 batch 128",
        "infer fp32 batch 1",
        "infer fp16 batch 1",
        "train fp32 20 steps",
        "train fp32g 20 steps",
        "train fp16 20 steps",
        "train bf16 20 steps",
        "train cpu 20 steps",
    ];
    for name in expected {
        let Some((_, code, said)) = steps.iter().find(|(step, ..)| step == name) else {
            panic!("no `{name}` step in the summary:\n{context}");
        };
        let gpu_step = name != "train cpu 20 steps";
        let fine = match code {
            0 => true,
            // No usable GPU here: the step reached the device, its arguments were taken.
            1 => gpu_step && said.contains("device unavailable"),
            _ => false,
        };
        assert!(fine, "`{name}` ended with rc={code}: {said}\n{context}");
    }
}

/// The summary's step lines are read as the script writes them (so the test above cannot pass
/// by finding no status at all).
#[test]
fn step_statuses_reads_the_scripts_lines() {
    let summary = "commit: abc\n\
        libs (crate's own search) rc=1: error: device unavailable: no driver\n\
        infer fp32 batch 128 rc=2: error: unexpected argument '--warmup'\n\
        anchor batch 1 rc=1 (anchor-latency.txt)\n\
        train cpu 20 steps rc=0: epoch 10: train loss 1.9\n\
        train fp32 against the CPU: not compared (rc 1, CPU rc 0)\n";
    let steps = step_statuses(summary);
    let codes: Vec<(&str, u32)> = steps.iter().map(|(s, c, _)| (s.as_str(), *c)).collect();
    assert_eq!(
        codes,
        [
            ("libs (crate's own search)", 1),
            ("infer fp32 batch 128", 2),
            ("train cpu 20 steps", 0)
        ]
    );
    assert!(steps[0].2.contains("device unavailable"));
}
