//! Replay depth: how far back the log reaches now, and how far its caps would reach at a
//! given event rate.
//!
//! Owns: the arithmetic behind the depth metrics, the status page's depth rows and
//! `sluice config check`'s projection. Must never: scan stored events (it reads the
//! store's bounds, its size and one cursor lookup), or count time by the wall clock
//! (windows and rates are in source time, like retention).

use std::time::Duration;

use super::retention::{data_budget, json_bytes, RetentionConfig};
use super::store::{Bounds, EventStore};

/// Stored bytes per event of the real corpus (`cargo bench --bench log`, commits of 50
/// events as at 500 events/s): JSON wires 177 B, raw frames 3,421 B (zstd level 3, the
/// level the writer uses while it keeps up with the live rate). What `config check`
/// projects with before the daemon has measured its own traffic.
pub const MEASURED_JSON_BYTES_PER_EVENT: u64 = 177;
/// See [`MEASURED_JSON_BYTES_PER_EVENT`].
pub const MEASURED_RAW_BYTES_PER_EVENT: u64 = 3_421;
/// Both classes together.
pub const MEASURED_BYTES_PER_EVENT: u64 =
    MEASURED_JSON_BYTES_PER_EVENT + MEASURED_RAW_BYTES_PER_EVENT;

/// The rate window: the last hour of source time.
const RATE_WINDOW_US: i64 = 3_600_000_000;

/// What the log holds now and how deep its caps reach at the recent rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Depth {
    /// Events held (oldest to newest seq).
    pub retained_events: u64,
    /// Source time from the oldest to the newest event held.
    pub retained_seconds: f64,
    /// Events per second of source time over the last hour held (or all of it, if less).
    pub recent_rate: f64,
    /// Stored bytes per event held, on average.
    pub bytes_per_event: f64,
    /// How far back the caps would reach at `recent_rate`: the size cap divided by the
    /// bytes that rate stores per second, or the age limit, whichever is less. `None`
    /// while the rate is unknown (fewer than two events).
    pub projected_seconds: Option<f64>,
}

/// How deep the caps of `retention` reach at `events_per_sec` with `bytes_per_event`
/// stored per event: (seconds, true when the size cap is what limits it).
pub fn projection(
    budget_bytes: u64,
    max_age: Duration,
    bytes_per_event: f64,
    events_per_sec: f64,
) -> (f64, bool) {
    let age = max_age.as_secs_f64();
    if events_per_sec <= 0.0 || bytes_per_event <= 0.0 {
        return (age, false);
    }
    let by_size = budget_bytes as f64 / bytes_per_event / events_per_sec;
    if by_size < age {
        (by_size, true)
    } else {
        (age, false)
    }
}

/// The depth of the JSON wires in `store` under `retention` (every event held: the JSON
/// is what stays longest); `None` when it is empty.
pub fn measure(store: &dyn EventStore, retention: &RetentionConfig) -> Option<Depth> {
    window(
        store,
        store.bounds()?,
        json_bytes(store, retention),
        data_budget(store, retention),
        retention.max_age,
    )
}

/// The depth of the raw frames in `store` (those still held) under `retention`; `None`
/// when no frame is held. Without raw limits of their own, frames are held as long as
/// their events and share the JSON's caps.
pub fn measure_raw(store: &dyn EventStore, retention: &RetentionConfig) -> Option<Depth> {
    match &retention.raw {
        Some(raw) => window(
            store,
            store.raw_bounds()?,
            store.raw_size_bytes(),
            raw.max_bytes,
            raw.max_age.min(retention.max_age),
        ),
        None => window(
            store,
            store.raw_bounds()?,
            store.size_bytes(),
            data_budget(store, retention),
            retention.max_age,
        ),
    }
}

/// The depth of the window `b` of `store`, holding `bytes`, under `budget` and `max_age`.
fn window(
    store: &dyn EventStore,
    b: Bounds,
    bytes: u64,
    budget: u64,
    max_age: Duration,
) -> Option<Depth> {
    let retained_events = b.newest_seq.saturating_sub(b.oldest_seq) + 1;
    let span_us = b.newest_time_us.saturating_sub(b.oldest_time_us).max(0);
    let window_start = b.newest_time_us.saturating_sub(RATE_WINDOW_US);
    let (window_events, window_us) = if window_start <= b.oldest_time_us {
        (retained_events, span_us)
    } else {
        let from = store
            .seq_at_or_after_time(window_start)
            .ok()
            .flatten()
            .unwrap_or(b.oldest_seq)
            .max(b.oldest_seq);
        (b.newest_seq.saturating_sub(from) + 1, RATE_WINDOW_US)
    };
    let recent_rate = if window_us > 0 && window_events > 1 {
        (window_events - 1) as f64 / (window_us as f64 / 1e6)
    } else {
        0.0
    };
    let bytes_per_event = bytes as f64 / retained_events as f64;
    let projected_seconds =
        (recent_rate > 0.0).then(|| projection(budget, max_age, bytes_per_event, recent_rate).0);
    Some(Depth {
        retained_events,
        retained_seconds: span_us as f64 / 1e6,
        recent_rate,
        bytes_per_event,
        projected_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_takes_the_smaller_of_size_and_age() {
        let gib20 = 20 * 1024 * 1024 * 1024;
        let age = Duration::from_secs(72 * 3600);
        // 20 GiB at 3,706 B/event and 1,000 events/s: ~1.6 h, limited by size.
        let (s, by_size) = projection(gib20, age, 3_706.0, 1_000.0);
        assert!(by_size);
        assert!((s / 3600.0 - 1.61).abs() < 0.01, "{s}");
        // JSON alone at 177 B/event and 500/s: ~67 h.
        let (s, by_size) = projection(gib20, age, 177.0, 500.0);
        assert!(by_size);
        assert!((s / 3600.0 - 67.4).abs() < 0.1, "{s}");
        // A slow stream: the age limit.
        assert_eq!(
            projection(gib20, age, 177.0, 1.0),
            (age.as_secs_f64(), false)
        );
        assert_eq!(
            projection(gib20, age, 177.0, 0.0),
            (age.as_secs_f64(), false)
        );
    }
}
