//! Reading the architecture off a file's tensor shapes, and catching the paper/torchvision
//! preset mix-up with an explicit config.

use std::path::Path;

use super::names::layout_hint;
use super::read::TensorIndex;
use crate::config::{AlexNetConfig, Plan};
use crate::error::{Error, Result};

/// Output width of layer `layer` (`conv1`, `fc3`, ...) as the file has it: the weight's first
/// dimension, or the bias's length when the weight is absent.
fn out_width(tensors: &TensorIndex<'_>, layer: &str) -> Option<usize> {
    ["weight", "bias"].iter().find_map(|param| {
        tensors
            .get(&format!("{layer}.{param}"))?
            .shape()
            .first()
            .copied()
    })
}

/// The file's output channels for each convolution of `plan` (`None` where the file does not
/// say), looked up under the plan's layer names.
fn file_conv_channels(tensors: &TensorIndex<'_>, plan: &Plan) -> Vec<Option<usize>> {
    plan.convs()
        .map(|stage| out_width(tensors, &stage.name))
        .collect()
}

fn conv_channels(config: &AlexNetConfig) -> Vec<usize> {
    config.convs.iter().map(|c| c.out_channels).collect()
}

/// `[96, ?, 384, ...]` for messages.
fn channel_list(channels: &[Option<usize>]) -> String {
    let items: Vec<String> = channels
        .iter()
        .map(|c| c.map_or("?".to_string(), |c| c.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

/// Reads the architecture off the tensor shapes: the conv channels pick a preset (missing
/// tensors are left to the full check, which names them with their expected shapes), and the
/// fully connected widths come from the file.
pub(super) fn detect_config(tensors: &TensorIndex<'_>, origin: &Path) -> Result<AlexNetConfig> {
    let presets = [AlexNetConfig::paper(), AlexNetConfig::torchvision()];
    // Both presets name their layers alike (conv1..conv5, fc1..fc3).
    let names = presets[0].plan()?;
    let channels = file_conv_channels(tensors, &names);
    let matching: Vec<&AlexNetConfig> = presets
        .iter()
        .filter(|preset| {
            conv_channels(preset)
                .iter()
                .zip(&channels)
                .all(|(want, found)| found.is_none_or(|found| found == *want))
        })
        .collect();
    let architecture_error = |message: String| Error::Architecture {
        path: origin.to_path_buf(),
        message,
    };
    let preset = match matching.as_slice() {
        [preset] => *preset,
        [] => {
            if let Some(hint) = hwio_hint(tensors, &names, &presets) {
                return Err(architecture_error(hint));
            }
            return Err(architecture_error(format!(
                "conv channels {} match neither the paper preset {:?} nor torchvision's {:?}; \
                 give the architecture explicitly ({EXPLICIT}) to load this file",
                channel_list(&channels),
                conv_channels(&presets[0]),
                conv_channels(&presets[1]),
            )));
        }
        _ => {
            return Err(architecture_error(format!(
                "cannot tell the architecture: the file's conv channels {} fit both the paper and \
                 the torchvision preset (conv weights missing); give it explicitly ({EXPLICIT})",
                channel_list(&channels),
            )))
        }
    };
    let mut config = preset.clone();
    fc_widths(&mut config, tensors, origin)?;
    Ok(config)
}

/// How to give the architecture explicitly, in both of this crate's interfaces.
const EXPLICIT: &str = "--config in infer, an AlexNetConfig in the library";

/// Reads the fully connected widths off the file along the chain of layers: each weight must
/// take the previous layer's width (the flattened convolutions for fc1). A weight that takes it
/// on the wrong axis is reported as transposed, with the shape that was expected.
fn fc_widths(config: &mut AlexNetConfig, tensors: &TensorIndex<'_>, origin: &Path) -> Result<()> {
    let plan = config.plan()?;
    let mut width: usize = plan.flatten_shape().iter().product();
    let names: Vec<String> = plan.linears().map(|s| s.name.clone()).collect();
    for (fc, name) in config.fcs.iter_mut().zip(names) {
        let weight = format!("{name}.weight");
        match tensors.get(&weight).map(|t| t.shape().to_vec()).as_deref() {
            Some(&[out, inp]) if inp == width => fc.out_features = out,
            Some(found) => {
                // Report against the width the rest of the file gives (the bias), or the preset's.
                let out = tensors
                    .get(&format!("{name}.bias"))
                    .and_then(|b| b.shape().first().copied())
                    .unwrap_or(fc.out_features);
                let expected = vec![out, width];
                return Err(Error::TensorShape {
                    path: origin.to_path_buf(),
                    name: tensors.get(&weight).map_or(weight.clone(), |t| t.label()),
                    hint: layout_hint(&expected, found),
                    expected,
                    found: found.to_vec(),
                });
            }
            // Missing: the bias may still say the width; the full check names what is missing.
            None => {
                if let Some(out) = out_width(tensors, &name) {
                    fc.out_features = out;
                }
            }
        }
        width = fc.out_features;
    }
    Ok(())
}

/// When conv1's weight has a square kernel on its first two axes and a preset's channels on its
/// last, the file is in TensorFlow/Keras's HWIO layout: say so instead of "no preset matches".
fn hwio_hint(tensors: &TensorIndex<'_>, names: &Plan, presets: &[AlexNetConfig]) -> Option<String> {
    let conv1 = names.convs().next()?;
    let expected = &conv1.params.as_ref()?.weight;
    let tensor = tensors.get(&expected.name)?;
    let found = tensor.shape();
    presets.iter().find_map(|preset| {
        let plan = preset.plan().ok()?;
        let want = &plan.convs().next()?.params.as_ref()?.weight.shape;
        layout_hint(want, found)
            .map(|hint| format!("tensor `{}` has shape {found:?}: {hint}", tensor.label()))
    })
}

/// With an explicit config, catches the common mix-up of the two presets (paper weights with the
/// torchvision config or the reverse) and says so, rather than reporting a shape mismatch.
pub(super) fn check_preset_swap(
    config: &AlexNetConfig,
    tensors: &TensorIndex<'_>,
    origin: &Path,
) -> Result<()> {
    if config.convs.len() != 5 {
        return Ok(());
    }
    let Ok(plan) = config.plan() else {
        return Ok(()); // the full check reports a malformed config
    };
    let Some(found) = file_conv_channels(tensors, &plan)
        .into_iter()
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(());
    };
    if found == conv_channels(config) {
        return Ok(());
    }
    let presets = [AlexNetConfig::paper(), AlexNetConfig::torchvision()];
    match presets.iter().find(|p| conv_channels(p) == found) {
        Some(preset) => Err(Error::Architecture {
            path: origin.to_path_buf(),
            message: format!(
                "the file holds {} AlexNet weights (conv channels {found:?}), but the config `{}` \
                 has conv channels {:?}; use the `{}` preset or give no config at all",
                preset.name,
                config.name,
                conv_channels(config),
                preset.name
            ),
        }),
        None => Ok(()),
    }
}
