//! Standard output that ends like other Unix tools' when the reader goes away: a closed pipe
//! (`infer ... | head -1`) ends the program quietly, and any other write error (a full disk)
//! is one `error:` line and exit code 1 — never a panic.

use std::fmt::Display;
use std::io::{ErrorKind, Write};

/// Exit status after a closed pipe: what a shell reports for a process ended by SIGPIPE.
const EXIT_BROKEN_PIPE: i32 = 128 + 13;

/// Writes `text` and a newline to standard output (flushed: the error shows here, not later).
pub fn line(text: impl Display) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        exit_on(e);
    }
}

/// Ends the program after a failed write to standard output.
fn exit_on(e: std::io::Error) -> ! {
    if e.kind() == ErrorKind::BrokenPipe {
        std::process::exit(EXIT_BROKEN_PIPE);
    }
    // stderr may be gone too; nothing more can be said then.
    let _ = writeln!(std::io::stderr(), "error: writing to standard output: {e}");
    std::process::exit(1)
}

/// `println!` that goes through [`line()`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use say;
