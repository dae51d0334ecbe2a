//! The GPU-test counts the documents give ("the 12 of `tests/gpu_layers.rs`" in the README,
//! "`gpu_layers` (12)" in tools/gpu/NEXT_RUN.md) against the GPU tests those files hold. A GPU
//! session reads them to tell whether every test ran: a stale count hides a test that did not.

use std::path::Path;

/// Every `tests/gpu_*.rs` file, the files whose counts the documents give.
fn gpu_test_files() -> Vec<String> {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut names: Vec<String> = std::fs::read_dir(&tests)
        .expect("the tests folder")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".rs")?;
            stem.starts_with("gpu_").then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// The tests of `tests/{name}.rs` that need a GPU: those ignored with the GPU reason.
fn gpu_tests_in(name: &str) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/{name}.rs"));
    let source = std::fs::read_to_string(&path).expect("a test file");
    source.matches("#[ignore = \"needs an NVIDIA GPU").count()
}

/// A document's text with every run of whitespace (line breaks included) as one space.
fn document(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path).expect("a document");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The count a document gives for `marker`: the number in the first "the N of " + marker
/// ([`count_before`]) or marker + " (N)" ([`count_after`]); other mentions are passed over.
fn count_before(text: &str, marker: &str) -> Option<usize> {
    text.match_indices(marker).find_map(|(at, _)| {
        let before = text[..at].strip_suffix(" of ")?;
        before.rsplit(' ').next()?.parse().ok()
    })
}

fn count_after(text: &str, marker: &str) -> Option<usize> {
    text.match_indices(marker).find_map(|(at, _)| {
        let rest = text[at + marker.len()..].strip_prefix(" (")?;
        rest.split(')').next()?.parse().ok()
    })
}

/// Every counted file's count in one document, as `(file, documented, actual)` for those that
/// differ or are missing (`None`).
fn mismatches(
    counted: impl Fn(&str) -> Option<usize>,
    files: &[String],
) -> Vec<(String, Option<usize>, usize)> {
    files
        .iter()
        .map(|name| (name.clone(), counted(name), gpu_tests_in(name)))
        .filter(|(_, documented, actual)| *documented != Some(*actual))
        .collect()
}

#[test]
fn the_documents_count_every_gpu_test_file_right() {
    let files = gpu_test_files();
    assert!(
        files.len() >= 4 && files.iter().all(|name| gpu_tests_in(name) > 0),
        "the GPU test files, each with GPU tests: {files:?}"
    );
    let readme = document("README.md");
    let next_run = document("tools/gpu/NEXT_RUN.md");
    let in_readme = mismatches(
        |name| count_before(&readme, &format!("`tests/{name}.rs`")),
        &files,
    );
    let in_next_run = mismatches(|name| count_after(&next_run, &format!("`{name}`")), &files);
    assert!(
        in_readme.is_empty() && in_next_run.is_empty(),
        "(file, documented, in the file): README.md (\"the N of `tests/FILE.rs`\") {in_readme:?}; \
         tools/gpu/NEXT_RUN.md (\"`FILE` (N)\") {in_next_run:?}"
    );
}

#[test]
fn the_count_readers_find_numbers_only_where_they_stand() {
    let text = "in `tests/a.rs`, the 12 of `tests/a.rs`, the b of `tests/b.rs`, `a` x, `a` (7), \
                `b` (seven), `c`";
    assert_eq!(count_before(text, "`tests/a.rs`"), Some(12));
    assert_eq!(count_before(text, "`tests/b.rs`"), None);
    assert_eq!(count_before(text, "`tests/c.rs`"), None);
    assert_eq!(count_after(text, "`a`"), Some(7));
    assert_eq!(count_after(text, "`b`"), None);
    assert_eq!(count_after(text, "`c`"), None);
}
