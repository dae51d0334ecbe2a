//! Classifying image files and reporting each result or failure.

use std::process::ExitCode;

use std::path::Path;

use alexnet_cuda::classify::{classify_files_with, Classification, ClassifyEvent, Crops};
use alexnet_cuda::diagnose::diagnose_non_finite;
use alexnet_cuda::image::{collect_image_paths, ImageLimits, Preprocess, U8Batch};
use alexnet_cuda::labels::{default_labels, read_labels};
use alexnet_cuda::{Backend, Error, Weights};
use ndarray::Array2;
use serde_json::{json, Value};

use crate::args::{usage_error, Args};
use crate::dump::DumpFile;
use crate::output::say;
use crate::progress::progress_bar;
use crate::{EXIT_FATAL, EXIT_SOME_INPUTS_FAILED};

fn backend_classes(backend: &dyn Backend) -> usize {
    backend.config().num_classes()
}

/// The class names to print: `--labels FILE` (its line count must be the class count), the
/// names the weights file carries (`train --save` writes them), ImageNet's for a 1000-class
/// model, or none (indices only).
fn class_names(args: &Args, classes: usize) -> Result<Option<Vec<String>>, Error> {
    match &args.labels {
        Some(path) => {
            let labels = read_labels(path)?;
            if labels.len() != classes {
                usage_error(format!(
                    "--labels {} has {} lines, but the model has {classes} classes \
                     (one name per line, in logit order)",
                    path.display(),
                    labels.len()
                ));
            }
            Ok(Some(labels))
        }
        None => {
            let from_file = match &args.weights {
                Some(path) => Weights::class_names_in(path)?,
                None => None,
            };
            if let Some(names) = from_file.filter(|names| names.len() == classes) {
                return Ok(Some(names));
            }
            Ok(default_labels(classes)
                .map(|names| names.iter().map(|name| name.to_string()).collect()))
        }
    }
}

/// A probability for JSON: a number, or the string "NaN" / "inf" so that a non-finite value
/// stays visible (JSON numbers cannot hold it; serde would write `null`).
fn json_probability(p: f32) -> Value {
    if p.is_finite() {
        json!(p)
    } else {
        json!(p.to_string())
    }
}

/// Explains the first image whose logits are not finite: its weights and the first layer
/// whose output is not finite (re-run on the CPU reference).
fn explain_non_finite(weights: &Weights, pre: &Preprocess, path: &Path) -> String {
    let diagnosis = pre.load(path).and_then(|crop| {
        let mut one = U8Batch::with_capacity(pre.crop, 1);
        one.push(&crop)?;
        diagnose_non_finite(weights, &one, pre)
    });
    match diagnosis {
        Ok(diagnosis) => diagnosis.to_string(),
        Err(e) => format!("(the CPU re-run to find the layer failed: {e})"),
    }
}

pub fn classify(
    args: &Args,
    backend: &mut dyn Backend,
    batch: usize,
    weights: &Weights,
) -> Result<ExitCode, Error> {
    // Checked before any image is read; nothing is written until the end.
    let dump = args
        .dump_logits
        .as_deref()
        .map(|path| DumpFile::check(path, &args.images))
        .transpose()?;
    let mut paths = collect_image_paths(&args.images)?;
    if let Some(dump) = &dump {
        // The run's own output (e.g. a previous dump inside an --images directory) is never
        // one of its inputs.
        paths.retain(|p| !dump.is(p));
    }
    if paths.is_empty() {
        return Err(Error::Invalid {
            what: "--images",
            message: "no image files found".into(),
        });
    }
    let num_classes = backend_classes(backend);
    let names = class_names(args, num_classes)?;
    let label = |class: usize| {
        names
            .as_ref()
            .and_then(|n| n.get(class))
            .map(String::as_str)
    };
    let bar = progress_bar(args, paths.len() as u64, "classifying");
    let pre = Preprocess {
        limits: ImageLimits {
            max_file_bytes: args.max_image_bytes,
        },
        ..Preprocess::default()
    };
    let mut non_finite = 0usize;
    // NaN rows stay for images that fail, so row i is always input i.
    let mut logits = Array2::from_elem((paths.len(), num_classes), f32::NAN);
    let mut failures = 0usize;
    let mut results = Vec::new();
    let crops = if args.ten_crop {
        Crops::Ten
    } else {
        Crops::Centre
    };
    classify_files_with(
        backend,
        &paths,
        batch,
        &pre,
        args.top as usize,
        crops,
        |event| match event {
            ClassifyEvent::Classified(c) => {
                logits
                    .row_mut(c.index)
                    .assign(&ndarray::ArrayView1::from(&c.logits[..]));
                let finite = c.logits.iter().all(|v| v.is_finite());
                if !finite {
                    non_finite += 1;
                    if non_finite == 1 {
                        let why = explain_non_finite(weights, &pre, c.path);
                        bar.suspend(|| {
                            eprintln!(
                                "warning: {}: the logits are not finite (NaN or infinity), so \
                                 the probabilities are meaningless; {why}",
                                c.path.display()
                            )
                        });
                    }
                }
                if args.json {
                    results.push(json_result(&c, finite, &label));
                } else {
                    bar.suspend(|| print_result(&c, &label));
                }
                bar.inc(1);
            }
            ClassifyEvent::Failed { path, error, .. } => {
                failures += 1;
                if args.json {
                    results.push(
                        json!({"path": path.display().to_string(), "error": error.to_string()}),
                    );
                }
                bar.suspend(|| eprintln!("error: {error}"));
                bar.inc(1);
            }
        },
    )?;
    bar.finish_and_clear();
    if args.json {
        say!(
            "{}",
            json!({"device": backend.device_name(), "precision": backend.precision().to_string(), "images": results})
        );
    }
    if let Some(dump) = &dump {
        dump.write(&logits)?;
    }
    if non_finite > 0 {
        eprintln!(
            "warning: {non_finite} of {} images have logits that are not finite",
            paths.len()
        );
    }
    if failures == paths.len() {
        eprintln!("none of the {} images could be classified", paths.len());
        return Ok(ExitCode::from(EXIT_FATAL));
    }
    if failures > 0 {
        eprintln!(
            "{failures} of {} images could not be classified",
            paths.len()
        );
        return Ok(ExitCode::from(EXIT_SOME_INPUTS_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

fn json_result<'a>(
    c: &Classification<'_>,
    finite: bool,
    label: &impl Fn(usize) -> Option<&'a str>,
) -> Value {
    json!({
        "path": c.path.display().to_string(),
        "finite": finite,
        "top": c.top.iter().map(|&(class, p)| json!({
            "class": class,
            "label": label(class),
            "probability": json_probability(p),
        })).collect::<Vec<_>>(),
    })
}

fn print_result<'a>(c: &Classification<'_>, label: &impl Fn(usize) -> Option<&'a str>) {
    say!("{}", c.path.display());
    for &(class, p) in &c.top {
        match label(class) {
            Some(name) => say!("  {:>6.2}%  {:>4}  {}", p * 100.0, class, name),
            None => say!("  {:>6.2}%  {:>4}", p * 100.0, class),
        }
    }
}
