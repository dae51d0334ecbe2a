//! Ctrl-C (SIGINT) and SIGTERM (a batch scheduler's pre-emption) end a run at the next step
//! with a checkpoint, instead of losing every step since the last one; a second one ends the
//! process at once. SIGHUP is left alone, so `nohup` keeps a run going when its terminal closes,
//! and a signal ignored when the run starts stays ignored: a shell starts a script's background
//! job (`train ... &`) with SIGINT ignored, so that the terminal's Ctrl-C is not meant for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

/// Exit status of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const INTERRUPTED_STATUS: u8 = 130;

/// Set by the first signal; read between steps.
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    /// Catches the signals from here on. Where they cannot be caught the run goes on without,
    /// and says what that costs.
    pub fn install() -> Self {
        let requested = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            if ignored(signal) {
                let stop = if signal == SIGINT {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                eprintln!(
                    "note: signal {signal} was ignored when the run started (a background job), \
                     so it stays ignored: {stop} stops the run with a checkpoint"
                );
                continue;
            }
            // The second signal finds the flag set and exits at once, from the handler with
            // `_exit` (no destructor runs under the main thread's feet); the first sets it.
            let caught = flag::register_conditional_shutdown(
                signal,
                i32::from(INTERRUPTED_STATUS),
                Arc::clone(&requested),
            )
            .and_then(|_| flag::register(signal, Arc::clone(&requested)));
            if let Err(e) = caught {
                eprintln!(
                    "warning: cannot catch signal {signal} ({e}): an interrupted run loses the \
                     steps since its last checkpoint"
                );
            }
        }
        StopRequest(requested)
    }

    /// Whether a signal asked the run to stop.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Whether `signal` is ignored in this process now (inherited from whoever started it).
#[cfg(unix)]
fn ignored(signal: i32) -> bool {
    // SAFETY: `sigaction` is plain data, for which all zeroes is a valid value.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: with a null new action `sigaction` changes nothing and only writes the current
    // action into `current`, a valid, writable `sigaction`.
    let read = unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) };
    read == 0 && current.sa_sigaction == libc::SIG_IGN
}

#[cfg(not(unix))]
fn ignored(_signal: i32) -> bool {
    false
}
