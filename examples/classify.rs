//! Classify photos with AlexNet: the library's whole path in one screen.
//!
//! ```sh
//! cargo run --release --example classify -- tests/data/images/chelsea.png
//! cargo run --release --example classify -- --weights alexnet.safetensors photos/*.jpg
//! ```
//!
//! Runs on the GPU when one is usable and on the CPU otherwise (`open_backend` with
//! `DeviceChoice::Auto`). Without `--weights` the network has the paper's random initialisation,
//! so the labels are meaningless; torchvision's pretrained weights load unchanged (see README,
//! "Real weights").

use std::path::PathBuf;
use std::process::ExitCode;

use alexnet_cuda::image::{load_batch, Preprocess};
use alexnet_cuda::labels::default_labels;
use alexnet_cuda::postprocess::{softmax, top_k};
use alexnet_cuda::{open_backend, AlexNetConfig, DeviceChoice, Precision, Weights};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut weights_path = None;
    let mut paths = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--weights" => weights_path = Some(args.next().ok_or("--weights needs a file")?),
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    if paths.is_empty() {
        return Err("usage: classify [--weights FILE.safetensors] IMAGE...".into());
    }

    let weights = match &weights_path {
        Some(path) => Weights::load(path, None)?,
        None => {
            eprintln!("note: no --weights: random weights, meaningless labels");
            Weights::paper_init(&AlexNetConfig::paper(), 0)?
        }
    };
    let opened = open_backend(&weights, DeviceChoice::Auto, Precision::Fp32)?;
    if let Some(notice) = &opened.notice {
        eprintln!("note: {notice}");
    }
    let mut model = opened.backend;
    println!("running on {}", model.device_name());

    // torchvision's eval transform; images decode in parallel, bad files are reported apart.
    let pre = Preprocess::default();
    let loaded = load_batch(&paths, &pre);
    for (_, error) in &loaded.failures {
        eprintln!("skipped: {error}"); // the error names the file
    }
    if loaded.batch.is_empty() {
        return Err("no image could be read".into());
    }
    // Class names in logit order: the file's own (a `train --save` file carries them), else
    // ImageNet's for a 1000-class model, else none (ImageNet's names on another head would be
    // wrong, not merely missing).
    let file_names = match &weights_path {
        Some(path) => Weights::class_names_in(path)?,
        None => None,
    };
    let imagenet = default_labels(weights.config().num_classes());
    let name_of = |class: usize| -> &str {
        match (&file_names, imagenet) {
            (Some(names), _) => names.get(class).map(String::as_str),
            (None, Some(names)) => names.get(class).copied(),
            (None, None) => None,
        }
        .unwrap_or("?")
    };
    let logits = model.forward_u8(&loaded.batch, &pre)?;
    let probabilities = softmax(logits.view());
    for (row, &source) in loaded.sources.iter().enumerate() {
        println!("{}", paths[source].display());
        for (class, p) in top_k(probabilities.row(row), 5)? {
            println!("  {:>6.2}%  {class:>4}  {}", p * 100.0, name_of(class));
        }
    }
    Ok(())
}
