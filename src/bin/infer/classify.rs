//! Classifying image files and reporting each result or failure.

use std::process::ExitCode;

use alexnet_cuda::classify::{classify_files, ClassifyEvent};
use alexnet_cuda::image::{collect_image_paths, Preprocess};
use alexnet_cuda::labels::class_name;
use alexnet_cuda::{Backend, Error};
use ndarray::Array2;
use serde_json::json;

use crate::args::Args;
use crate::dump::DumpFile;
use crate::output::say;
use crate::progress::progress_bar;
use crate::{EXIT_FATAL, EXIT_SOME_INPUTS_FAILED};

fn backend_classes(backend: &dyn Backend) -> usize {
    backend.config().num_classes()
}

pub fn classify(args: &Args, backend: &mut dyn Backend, batch: usize) -> Result<ExitCode, Error> {
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
    let bar = progress_bar(args, paths.len() as u64, "classifying");
    let pre = Preprocess::default();
    let num_classes = backend_classes(backend);
    // NaN rows stay for images that fail, so row i is always input i.
    let mut logits = Array2::from_elem((paths.len(), num_classes), f32::NAN);
    let mut failures = 0usize;
    let mut results = Vec::new();
    classify_files(
        backend,
        &paths,
        batch,
        &pre,
        args.top as usize,
        |event| match event {
            ClassifyEvent::Classified(c) => {
                logits
                    .row_mut(c.index)
                    .assign(&ndarray::ArrayView1::from(&c.logits[..]));
                if args.json {
                    results.push(json!({
                        "path": c.path.display().to_string(),
                        "top": c.top.iter().map(|&(class, p)| json!({
                            "class": class,
                            "label": class_name(class).unwrap_or("?"),
                            "probability": p,
                        })).collect::<Vec<_>>(),
                    }));
                } else {
                    bar.suspend(|| {
                        say!("{}", c.path.display());
                        for &(class, p) in &c.top {
                            say!(
                                "  {:>6.2}%  {:>4}  {}",
                                p * 100.0,
                                class,
                                class_name(class).unwrap_or("?")
                            );
                        }
                    });
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
