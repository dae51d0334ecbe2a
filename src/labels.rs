//! ImageNet class names.
//!
//! `imagenet_classes.txt` (shipped inside the crate) holds torchvision's 1000 ImageNet-1k class
//! names, one per line, in logit order (index `i` of the model's output is class `i`).

use std::sync::OnceLock;

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
}
