//! Class names: ImageNet's, or a user's label file.
//!
//! `imagenet_classes.txt` (shipped inside the crate) holds torchvision's 1000 ImageNet-1k class
//! names, one per line, in logit order (index `i` of the model's output is class `i`). A model
//! with another number of classes gets no names unless its own label file is given
//! ([`read_labels`]).

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Largest label file [`read_labels`] reads (16 MiB: a million long names).
pub const MAX_LABELS_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Number of ImageNet-1k classes.
pub const NUM_IMAGENET_CLASSES: usize = 1000;

const CLASSES_TXT: &str = include_str!("imagenet_classes.txt");

/// The 1000 ImageNet class names in logit order (torchvision's names), parsed once.
pub fn imagenet_classes() -> &'static [&'static str] {
    static CLASSES: OnceLock<Vec<&'static str>> = OnceLock::new();
    CLASSES.get_or_init(|| {
        CLASSES_TXT
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect()
    })
}

/// The name of class `index`, or `None` if `index >= 1000`.
pub fn class_name(index: usize) -> Option<&'static str> {
    imagenet_classes().get(index).copied()
}

/// The names for a model with `classes` outputs when no label file is given: ImageNet's for
/// exactly [`NUM_IMAGENET_CLASSES`], none otherwise (ImageNet's names on a 10-class head would
/// be wrong, not merely missing).
pub fn default_labels(classes: usize) -> Option<&'static [&'static str]> {
    (classes == NUM_IMAGENET_CLASSES).then(imagenet_classes)
}

/// Reads a label file: UTF-8, one name per line in logit order, trailing whitespace (and a
/// `\r`) dropped; a final newline does not add a label, but an empty line inside the file is a
/// (nameless) label, so indices never shift. At most [`MAX_LABELS_FILE_BYTES`] are read.
///
/// Errors: [`Error::Io`] if it cannot be read, [`Error::Invalid`] if it is larger than the cap,
/// not UTF-8, or empty.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_LABELS_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let invalid = |message: String| Error::Invalid {
        what: "label file",
        message: format!("{}: {message}", path.display()),
    };
    if bytes.len() as u64 > MAX_LABELS_FILE_BYTES {
        return Err(invalid(format!(
            "more than {MAX_LABELS_FILE_BYTES} bytes; a label file has one class name per line"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    if labels.is_empty() {
        return Err(invalid("the file is empty".into()));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_1000_non_empty_classes() {
        let c = imagenet_classes();
        assert_eq!(c.len(), NUM_IMAGENET_CLASSES);
        assert_eq!(CLASSES_TXT.lines().count(), NUM_IMAGENET_CLASSES);
        assert!(CLASSES_TXT.lines().all(|l| !l.trim().is_empty()));
        assert!(c.iter().all(|n| !n.is_empty() && n.trim() == *n));
    }

    #[test]
    fn known_indices() {
        assert_eq!(class_name(0), Some("tench"));
        assert_eq!(class_name(1), Some("goldfish"));
        assert_eq!(class_name(999), Some("toilet tissue"));
        assert_eq!(class_name(1000), None);
    }

    #[test]
    fn imagenet_names_only_for_1000_classes() {
        assert_eq!(default_labels(1000).map(<[_]>::len), Some(1000));
        assert!(default_labels(10).is_none());
        assert!(default_labels(1001).is_none());
    }

    #[test]
    fn label_files_keep_every_line_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.txt");
        std::fs::write(&path, "cat\r\n\ndog  \nbird\n").unwrap();
        assert_eq!(read_labels(&path).unwrap(), ["cat", "", "dog", "bird"]);
        std::fs::write(&path, "").unwrap();
        assert!(matches!(read_labels(&path), Err(Error::Invalid { .. })));
        std::fs::write(&path, b"caf\xe9\n").unwrap();
        assert!(matches!(read_labels(&path), Err(Error::Invalid { .. })));
        assert!(matches!(
            read_labels(&dir.path().join("missing.txt")),
            Err(Error::Io { .. })
        ));
    }
}
