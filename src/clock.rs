//! The wall clock in unix microseconds, the one unit every stage stamps and compares in.
//!
//! Owns: reading the clock. Must never: import anything of the crate (every stage, the
//! upstream client included, reads it, so it sits at the bottom).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, unix µs (0 before 1970, `i64::MAX` past year 294,247).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
