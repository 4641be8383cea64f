//! A hybrid logical clock: unix milliseconds in the high 48 bits, a counter
//! in the low 16. Readings only grow, stay near wall-clock time, and after
//! observing a peer's reading the next local one is larger.

use std::sync::atomic::{AtomicU64, Ordering};

use super::messages::Version;
use crate::time::unix_ms;

pub struct Hlc {
    node: u32,
    last: AtomicU64,
}

impl Hlc {
    pub fn new(node: u32) -> Hlc {
        Hlc {
            node,
            last: AtomicU64::new(0),
        }
    }

    /// A new version, larger than every reading made or observed before.
    pub fn now(&self) -> Version {
        let physical = unix_ms() << 16;
        let prev = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some((l + 1).max(physical))
            })
            .unwrap_or_else(|l| l);
        Version {
            ts: (prev + 1).max(physical),
            node: self.node,
        }
    }

    /// Takes in a reading from elsewhere.
    pub fn observe(&self, ts: u64) {
        self.last.fetch_max(ts, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_grow_and_pass_observed_ones() {
        let c = Hlc::new(1);
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        let far = (unix_ms() + 60_000) << 16;
        c.observe(far);
        let d = c.now();
        assert!(d.ts > far);
        assert!(d.ts >> 16 >= unix_ms(), "stays near wall-clock time");
    }
}
