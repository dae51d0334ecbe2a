//! `tools/gpu/on-device.sh` drives the packed `infer` and `train` and the PyTorch anchors on a
//! lent GPU, whose minutes are few: a flag one of them no longer takes would be found there, at
//! the lease's cost. Here the script's `libs`, `infer`, `latency`, `train`, `anchor`,
//! `trainbench` and `compile` steps run against this build's binaries and the repository's
//! anchors, laid out as `tools/gpu/bundle.sh` packs them. Without a GPU every GPU step must get
//! past its arguments to the device check ("device unavailable", exit 1); a usage error (exit 2)
//! is a stale flag. The CPU training run must finish. The anchors meet a stand-in `torch` that
//! ends the run (exit 97) at the first use of torch after the arguments were parsed. Needs
//! python3 with its lzma module (the packing), as the README's set-up has it.

use std::path::Path;
use std::process::Command;

/// The steps the script reports, as its `note` lines start, each with the status it ran to.
fn step_statuses(summary: &str) -> Vec<(String, u32, String)> {
    summary
        .lines()
        .filter(|line| {
            ["libs ", "infer ", "train ", "anchor "]
                .iter()
                .any(|s| line.starts_with(s))
        })
        .filter_map(|line| {
            let (step, rest) = line.split_once(" rc=")?;
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let (code, said) = rest.split_at(digits);
            Some((
                step.to_string(),
                code.parse().ok()?,
                said.trim_start_matches(':').to_string(),
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

/// Exit status of the stand-in `torch` once an anchor uses torch after parsing its arguments.
const PAST_THE_ARGUMENTS: u32 = 97;
/// Its status when torch is used before the arguments were parsed: the check saw nothing.
const BEFORE_THE_ARGUMENTS: u32 = 98;

/// A stand-in `torch` package in `dir`: enough for the anchors to import it, define their
/// modules and parse their arguments (`torch.cuda.is_available()`, `nn.Module`); any other use
/// of torch ends the run, with [`PAST_THE_ARGUMENTS`] once argparse has taken the arguments
/// (it exits with 2 on one it does not know) and [`BEFORE_THE_ARGUMENTS`] before.
fn stand_in_torch(dir: &Path) {
    let ends_the_run = format!(
        r#"
import argparse, sys

_parse_args = argparse.ArgumentParser.parse_args

def _parsed(self, *args, **kwargs):
    parsed = _parse_args(self, *args, **kwargs)
    argparse._stand_in_parsed = True
    return parsed

argparse.ArgumentParser.parse_args = _parsed

def __getattr__(name):
    parsed = getattr(argparse, "_stand_in_parsed", False)
    sys.stderr.write("stand-in torch: " + name + " used, arguments parsed: " + str(parsed) + "\n")
    sys.exit({PAST_THE_ARGUMENTS} if parsed else {BEFORE_THE_ARGUMENTS})
"#
    );
    let torch = r#"
class cuda:
    @staticmethod
    def is_available():
        return True
"#;
    let nn = r#"
class Module:
    pass
"#;
    std::fs::create_dir_all(dir.join("torch/nn")).unwrap();
    std::fs::write(
        dir.join("torch/__init__.py"),
        torch.to_owned() + &ends_the_run,
    )
    .unwrap();
    std::fs::write(
        dir.join("torch/nn/__init__.py"),
        nn.to_owned() + &ends_the_run,
    )
    .unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a build without the `cuda` feature refuses --device cuda as a usage error"
)]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "on-device.sh is a bash script for Linux GPU machines (GNU timeout, bash 4)"
)]
fn the_device_runs_steps_take_their_flags() {
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
    for anchor in ["tools/gpu/torch_anchor.py", "tools/torch_train_anchor.py"] {
        let name = Path::new(anchor).file_name().unwrap();
        link(&repo.join(anchor), &bundle.join(name));
    }
    let stand_in = root.path().join("stand-in");
    stand_in_torch(&stand_in);
    let out = root.path().join("out");
    // A weights file a run left among the logs: PACK_TO's archive must leave it out.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("left.safetensors"), b"weights").unwrap();
    let packed = root.path().join("packed");
    std::fs::create_dir_all(&packed).unwrap();

    let run = Command::new("bash")
        .arg(bundle.join("on-device.sh"))
        .args([
            "libs",
            "infer",
            "latency",
            "train",
            "anchor",
            "trainbench",
            "compile",
        ])
        // The script's knobs as the test means them, whatever the caller's environment says.
        .env_remove("BATCH")
        .env_remove("INFER_ARGS")
        .env_remove("BUDGET")
        .env_remove("UNIT_FILTER")
        .env("OUT", &out)
        .env("PACK_TO", &packed)
        // Ahead of any real torch, so that the anchors stop once their arguments are parsed.
        .env("PYTHONPATH", &stand_in)
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
    // A step's status and what it said; a step missing from the summary fails the test.
    let status = |name: &str| match steps.iter().find(|(step, ..)| step == name) {
        Some((_, code, said)) => (*code, said.as_str()),
        None => panic!("no `{name}` step in the summary:\n{context}"),
    };
    for name in expected {
        let (code, said) = status(name);
        let gpu_step = name != "train cpu 20 steps";
        let fine = match code {
            0 => true,
            // No usable GPU here: the step reached the device, its arguments were taken.
            1 => gpu_step && said.contains("device unavailable"),
            _ => false,
        };
        assert!(fine, "`{name}` ended with rc={code}: {said}\n{context}");
    }
    let anchors = [
        "anchor (PyTorch eager)",
        "anchor batch 1",
        "anchor (PyTorch training)",
        "anchor (PyTorch training, amp channels_last)",
        "anchor (torch.compile)",
    ];
    for name in anchors {
        assert_eq!(
            status(name).0,
            PAST_THE_ARGUMENTS,
            "`{name}`: its arguments were not all taken (argparse exits with 2; {BEFORE_THE_ARGUMENTS}: \
             torch was used before they were parsed)\n{context}"
        );
    }

    // The logs come back packed (Python's tarfile: no xz program on the GPU machine), the
    // summary beside them.
    assert_eq!(
        std::fs::read_to_string(packed.join("summary.txt")).unwrap(),
        summary
    );
    let listing = Command::new("python3")
        .args([
            "-c",
            "import sys, tarfile; print('\\n'.join(tarfile.open(sys.argv[1]).getnames()))",
        ])
        .arg(packed.join("logs.tar.xz"))
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout);
    for log in [
        "./summary.txt",
        "./infer-fp32.txt",
        "./train-cpu.csv",
        "./anchor.txt",
    ] {
        assert!(names.lines().any(|n| n == log), "{log} not packed: {names}");
    }
    assert!(!names.contains(".safetensors"), "weights packed: {names}");
}

/// The summary's step lines are read as the script writes them (so the test above cannot pass
/// by finding no status at all).
#[test]
fn step_statuses_reads_the_scripts_lines() {
    let summary = "commit: abc\n\
        libs (crate's own search) rc=1: error: device unavailable: no driver\n\
        infer fp32 batch 128 rc=2: error: unexpected argument '--warmup'\n\
        anchor batch 1 rc=97 (anchor-latency.txt)\n\
        train cpu 20 steps rc=0: epoch 10: train loss 1.9\n\
        train fp32 against the CPU: not compared (rc 1, CPU rc 0)\n";
    let steps = step_statuses(summary);
    let codes: Vec<(&str, u32)> = steps.iter().map(|(s, c, _)| (s.as_str(), *c)).collect();
    assert_eq!(
        codes,
        [
            ("libs (crate's own search)", 1),
            ("infer fp32 batch 128", 2),
            ("anchor batch 1", 97),
            ("train cpu 20 steps", 0)
        ]
    );
    assert!(steps[0].2.contains("device unavailable"));
}
