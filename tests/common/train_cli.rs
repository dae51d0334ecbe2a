//! Running the `train` binary, for the tests that need it (and the `cli` feature that builds
//! it): included with `#[path]` by those tests only, since the binary's path exists only there.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// `train` with `args`, its output collected.
pub fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .output()
        .expect("the train binary runs")
}

/// Status, stdout and stderr, for an assertion message.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A temp path as the `&str` an argument list takes.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}
