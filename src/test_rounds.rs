//! Unit tests' help for answers that depend on the clock (test builds only).
//!
//! Owns: running a round of calls again until one ran quickly enough for its answer to be
//! fixed. Must never: be compiled into the daemon, or lengthen a wait to make a test pass.

use std::time::{Duration, Instant};

/// The result of the first run of `round` that took less than `within`, tried for at most
/// 30 s. What a clock-driven piece answers a few calls apart (a token bucket refills, a
/// rate limiter opens a new window) depends on how long those calls took, so a test
/// asserts of a round known to be quick; each round starts its state afresh. A round the
/// machine stalled (the thread not scheduled for that long: CI's loaded cores) is rightly
/// answered otherwise and says nothing, so it is run again.
pub(crate) fn on_time<T>(within: Duration, mut round: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started = Instant::now();
        let result = round();
        if started.elapsed() < within {
            return result;
        }
        assert!(
            Instant::now() < deadline,
            "no round ran within {within:?} for 30 s"
        );
    }
}
