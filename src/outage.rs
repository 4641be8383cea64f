//! Logging for something that fails over and over (a backend, a link to a
//! peer): one line when it goes down, one summary per interval while it
//! stays down, one line when it is back. Never a line per failed request:
//! a 6-second memcached outage under load used to write 160,000 lines.
//!
//! A leaf module: tracing only.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How often a summary is written while something stays down.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// What one call logged (for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    Nothing,
    Down,
    StillDown { failures: u64 },
    Back { failures: u64 },
}

/// Taken when an attempt starts (see [`Outage::mark`]): which outages
/// had begun by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(u64);

/// The up/down state of one thing, named in every line it logs.
pub struct Outage {
    what: String,
    every: Duration,
    /// Read without the lock on every success: the common case costs one
    /// atomic load.
    down: AtomicBool,
    /// Outages begun so far; an attempt's [`Mark`].
    outages: AtomicU64,
    state: Mutex<State>,
}

struct State {
    since: Instant,
    /// Failures since it went down.
    failures: u64,
    /// Failures since the last line.
    unreported: u64,
    last_line: Instant,
}

impl Outage {
    /// `what` names the thing in each line, e.g. `memcached 127.0.0.1:11211`.
    pub fn new(what: impl Into<String>) -> Outage {
        Outage::with_summary_every(what, SUMMARY_EVERY)
    }

    pub fn with_summary_every(what: impl Into<String>, every: Duration) -> Outage {
        let now = Instant::now();
        Outage {
            what: what.into(),
            every,
            down: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            state: Mutex::new(State {
                since: now,
                failures: 0,
                unreported: 0,
                last_line: now,
            }),
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// One failure.
    pub fn failed(&self, error: &dyn Display) -> Logged {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if !self.down.swap(true, Ordering::Relaxed) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            *s = State {
                since: now,
                failures: 1,
                unreported: 0,
                last_line: now,
            };
            tracing::warn!(error = %error, "{} is down", self.what);
            return Logged::Down;
        }
        s.failures += 1;
        s.unreported += 1;
        if now.duration_since(s.last_line) < self.every {
            return Logged::Nothing;
        }
        let failures = s.unreported;
        tracing::warn!(
            failures,
            down_for_s = now.duration_since(s.since).as_secs(),
            error = %error,
            "{} is still down", self.what
        );
        s.unreported = 0;
        s.last_line = now;
        Logged::StillDown { failures }
    }

    /// To take when an attempt starts, for [`Outage::ok_since`]. An atomic
    /// load: no clock read on the request path.
    pub fn mark(&self) -> Mark {
        Mark(self.outages.load(Ordering::Relaxed))
    }

    /// One success.
    pub fn ok(&self) -> Logged {
        self.ok_since(None)
    }

    /// One success of an attempt that started at `started`: one that began
    /// before the outage did (an answer in flight when it went down) does
    /// not end it.
    pub fn ok_since(&self, started: Option<Mark>) -> Logged {
        if !self.down.load(Ordering::Relaxed) {
            return Logged::Nothing;
        }
        // Under the lock, which `failed` holds while it begins an outage.
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if started.is_some_and(|m| m != self.mark()) {
            return Logged::Nothing;
        }
        if !self.down.swap(false, Ordering::Relaxed) {
            return Logged::Nothing;
        }
        let failures = s.failures;
        tracing::info!(
            failures,
            down_for_ms = s.since.elapsed().as_millis() as u64,
            "{} is back",
            self.what
        );
        Logged::Back { failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_down_a_summary_per_interval_one_line_back() {
        let o = Outage::with_summary_every("thing", Duration::from_secs(10));
        assert_eq!(o.ok(), Logged::Nothing);
        assert_eq!(o.failed(&"refused"), Logged::Down);
        assert!(o.is_down());
        for _ in 0..1000 {
            assert_eq!(o.failed(&"refused"), Logged::Nothing);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(o.failed(&"refused"), Logged::StillDown { failures: 1001 });
        assert_eq!(o.failed(&"refused"), Logged::Nothing);
        assert_eq!(o.ok(), Logged::Back { failures: 1003 });
        assert!(!o.is_down());
        assert_eq!(o.ok(), Logged::Nothing);
        // A new outage starts counting afresh.
        let before = o.mark();
        assert_eq!(o.failed(&"timeout"), Logged::Down);
        let during = o.mark();
        // An answer to a request sent before it went down does not end it.
        assert_eq!(o.ok_since(Some(before)), Logged::Nothing);
        assert!(o.is_down());
        assert_eq!(o.ok_since(Some(during)), Logged::Back { failures: 1 });
        // Nor does one sent before an outage that began after it.
        assert_eq!(o.failed(&"timeout"), Logged::Down);
        assert_eq!(o.ok_since(Some(during)), Logged::Nothing);
        assert!(o.is_down());
    }
}
