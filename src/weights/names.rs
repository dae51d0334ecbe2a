//! Other programs' names for the crate's parameters: torchvision's module paths.

/// torchvision's `alexnet` module paths and the crate's layer names they stand for.
const TORCHVISION_LAYERS: [(&str, &str); 8] = [
    ("features.0", "conv1"),
    ("features.3", "conv2"),
    ("features.6", "conv3"),
    ("features.8", "conv4"),
    ("features.10", "conv5"),
    ("classifier.1", "fc1"),
    ("classifier.4", "fc2"),
    ("classifier.6", "fc3"),
];

/// The crate's name for `file_name` when it is torchvision's spelling of a parameter.
pub(super) fn torchvision_alias(file_name: &str) -> Option<String> {
    let (module, param) = file_name.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    TORCHVISION_LAYERS
        .iter()
        .find(|(theirs, _)| *theirs == module)
        .map(|(_, ours)| format!("{ours}.{param}"))
}

/// torchvision's spelling of the crate's parameter `name` (`conv2.bias` -> `features.3.bias`).
pub(super) fn torchvision_name(name: &str) -> Option<String> {
    let (layer, param) = name.rsplit_once('.')?;
    TORCHVISION_LAYERS
        .iter()
        .find(|(_, ours)| *ours == layer)
        .map(|(theirs, _)| format!("{theirs}.{param}"))
}

/// A state dict saved from `nn.DataParallel` or `DistributedDataParallel` prefixes every name
/// with `module.`; the parameter is the same.
pub(super) fn without_wrapper_prefix(file_name: &str) -> &str {
    file_name.strip_prefix("module.").unwrap_or(file_name)
}

/// What a tensor of shape `found`, where `expected` was wanted, looks like when it is a known
/// mistake: a transposed linear weight, or a convolution weight in TensorFlow/Keras's HWIO.
pub(super) fn layout_hint(expected: &[usize], found: &[usize]) -> Option<String> {
    match (expected, found) {
        (&[out, inp], &[a, b]) if (a, b) == (inp, out) && out != inp => Some(format!(
            "it looks transposed (a linear weight is stored [out, in] = [{out}, {inp}], as \
             PyTorch's nn.Linear does)"
        )),
        (&[o, i, kh, kw], &[a, b, c, d])
            if (a, b, c, d) == (kh, kw, i, o) && (o, i) != (kh, kw) =>
        {
            Some(format!(
                "it looks like HWIO (TensorFlow/Keras's layout); this crate reads PyTorch's OIHW \
                 [{o}, {i}, {kh}, {kw}]: permute the axes (3, 2, 0, 1) when exporting"
            ))
        }
        _ => None,
    }
}
