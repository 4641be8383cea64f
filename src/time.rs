//! Wall-clock readings, in one place. A leaf module.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in microseconds (0 before 1970, which no clock here reads).
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    unix_us() / 1000
}
