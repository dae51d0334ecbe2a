//! One memory budget for every image decode in the process, whatever the thread count.
//!
//! A per-image limit does not bound a process that decodes on sixteen threads. Each decode
//! therefore reserves what it will hold (file bytes, decoded pixels, conversion, resampling) from
//! one shared [`DecodeBudget`] before allocating it, and waits while the budget is spent.
//!
//! No deadlock: a decode never waits while it holds a reservation. It may *grow* a reservation
//! only when the bytes are free at once ([`Reservation::try_grow`]); otherwise it gives back
//! what it holds and asks for the whole amount in one request. Requests are served in arrival
//! order, so a large image is not starved by a stream of small ones.
//!
//! What runs under a reservation (decoding, the crop) must not wait on rayon work: a rayon worker
//! waiting in a join may pick up another image's load from the pool, which would then wait for
//! the budget while its thread holds a reservation. The decoders and the resampler use no rayon
//! (checked for image 0.25's decoders); `load_batch` parallelises only across images.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// What all image decodes in the process may hold at once: 2 GiB. Every image within the
/// per-image limits (256 MiB read, [`super::MAX_DECODE_ALLOC`] decoded) fits on its own.
pub const DECODE_MEMORY_BUDGET: u64 = 2 * 1024 * 1024 * 1024;

/// A pool of bytes that decodes reserve from (see the module docs).
#[derive(Debug)]
pub(crate) struct DecodeBudget {
    limit: u64,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    in_use: u64,
    /// Highest `in_use` so far (for tests and reports).
    peak: u64,
    /// Ticket of the next request to be served, and the next ticket to hand out: requests are
    /// served in arrival order.
    serving: u64,
    next_ticket: u64,
}

/// A request larger than the whole budget: it could never be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget {
    pub(crate) requested: u64,
    pub(crate) limit: u64,
}

impl DecodeBudget {
    pub(crate) const fn new(limit: u64) -> DecodeBudget {
        DecodeBudget {
            limit,
            state: Mutex::new(State {
                in_use: 0,
                peak: 0,
                serving: 0,
                next_ticket: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// The process-wide budget of [`DECODE_MEMORY_BUDGET`] bytes.
    pub(crate) fn global() -> &'static DecodeBudget {
        static GLOBAL: DecodeBudget = DecodeBudget::new(DECODE_MEMORY_BUDGET);
        &GLOBAL
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// The most bytes reserved at once so far.
    #[cfg(test)]
    pub(crate) fn peak(&self) -> u64 {
        self.lock().peak
    }

    /// A poisoned lock only means another decode panicked; the counters stay consistent
    /// (every update is a single assignment), so carry on with them.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `bytes` are free and the requests before this one were served, then reserves
    /// them. The caller must not hold another reservation of this budget.
    pub(crate) fn acquire(&self, bytes: u64) -> Result<Reservation<'_>, OverBudget> {
        if bytes > self.limit {
            return Err(OverBudget {
                requested: bytes,
                limit: self.limit,
            });
        }
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        while state.serving != ticket || self.limit - state.in_use < bytes {
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.serving += 1;
        state.in_use += bytes;
        state.peak = state.peak.max(state.in_use);
        drop(state);
        // The next request in line may fit too.
        self.freed.notify_all();
        Ok(Reservation {
            budget: self,
            bytes,
        })
    }

    fn release(&self, bytes: u64) {
        let mut state = self.lock();
        state.in_use = state.in_use.saturating_sub(bytes);
        drop(state);
        self.freed.notify_all();
    }
}

/// Bytes held from a [`DecodeBudget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl Reservation<'_> {
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows the reservation to `total` bytes if that is possible without waiting (and no
    /// earlier request is waiting); `false` leaves it as it was. Shrinking always succeeds.
    pub(crate) fn try_resize(&mut self, total: u64) -> bool {
        if total <= self.bytes {
            self.budget.release(self.bytes - total);
            self.bytes = total;
            return true;
        }
        let extra = total - self.bytes;
        let mut state = self.budget.lock();
        let nobody_waiting = state.serving == state.next_ticket;
        if nobody_waiting && self.budget.limit - state.in_use >= extra {
            state.in_use += extra;
            state.peak = state.peak.max(state.in_use);
            self.bytes = total;
            true
        } else {
            false
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_request_over_the_whole_budget_is_refused_at_once() {
        let budget = DecodeBudget::new(100);
        assert_eq!(
            budget.acquire(101).unwrap_err(),
            OverBudget {
                requested: 101,
                limit: 100
            }
        );
        assert!(budget.acquire(100).is_ok());
    }

    #[test]
    fn growing_needs_free_bytes_and_shrinking_gives_them_back() {
        let budget = DecodeBudget::new(100);
        let mut a = budget.acquire(60).unwrap();
        let b = budget.acquire(30).unwrap();
        assert!(!a.try_resize(80), "only 10 bytes are free");
        assert_eq!(a.bytes(), 60);
        assert!(a.try_resize(70));
        drop(b);
        assert!(a.try_resize(100));
        assert!(a.try_resize(10));
        assert!(budget.acquire(90).is_ok());
        assert_eq!(budget.peak(), 100);
    }

    /// Many threads, requests of every size: what is held at once never passes the limit, and
    /// every request is served (no deadlock, no starvation of the large ones).
    #[test]
    fn concurrent_decodes_stay_within_the_budget() {
        let budget = DecodeBudget::new(1000);
        let held = AtomicU64::new(0);
        let max_held = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (budget, held, max_held) = (&budget, &held, &max_held);
                s.spawn(move || {
                    for i in 0..200u64 {
                        let first = (t * 97 + i * 31) % 600 + 1;
                        let mut r = match budget.acquire(first) {
                            Ok(r) => r,
                            Err(e) => panic!("{e:?}"),
                        };
                        let mut mine = first;
                        let now = held.fetch_add(mine, Ordering::SeqCst) + mine;
                        max_held.fetch_max(now, Ordering::SeqCst);
                        let total = first + (i * 13) % 400;
                        if r.try_resize(total) {
                            held.fetch_add(total - mine, Ordering::SeqCst);
                            mine = total;
                            let now = held.load(Ordering::SeqCst);
                            max_held.fetch_max(now, Ordering::SeqCst);
                        }
                        std::thread::yield_now();
                        held.fetch_sub(mine, Ordering::SeqCst);
                        drop(r);
                    }
                });
            }
        });
        assert!(max_held.load(Ordering::SeqCst) <= 1000);
        assert!(budget.peak() <= 1000);
        assert_eq!(budget.lock().in_use, 0);
    }
}
