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
