//! Ctrl-C and SIGTERM (a batch scheduler's pre-emption) end a run at the next step with a
//! checkpoint, instead of losing every step since the last one; a second signal ends the
//! process at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const INTERRUPTED_STATUS: u8 = 130;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Catches the signals from here on. Where they cannot be caught the run goes on without, and
/// says what that costs.
pub fn install() {
    // ctrlc runs this on its own thread, not in the signal handler: printing is fine.
    let caught = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopped at once (second signal): no checkpoint of the current step");
            std::process::exit(i32::from(INTERRUPTED_STATUS));
        }
        eprintln!("\nstopping after this step, with a checkpoint (signal again to stop at once)");
    });
    if let Err(e) = caught {
        eprintln!(
            "warning: cannot catch Ctrl-C or SIGTERM ({e}): an interrupted run loses the steps \
             since its last checkpoint"
        );
    }
}

/// Whether a signal asked the run to stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
