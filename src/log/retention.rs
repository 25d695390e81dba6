//! Retention: deletes the oldest segments by age and by size, whichever limit is hit first.
//!
//! Age is measured back from the newest event's source time, not from the wall clock: a
//! capture recorded last week and replayed into `serve` is kept like live traffic, and an
//! upstream that has been down for days does not empty the log.
//!
//! Owns: the retention policy and its background thread. Must never: delete anything but
//! whole oldest segments through [`EventStore::delete_before`] (no rewriting of retained
//! data), or block the writer or readers for longer than one store deletion.
//!
//! Size: the store's `size_bytes` (compressed segment bytes) is kept under
//! `max_bytes - overhead_bytes` (the backend's journals and not-yet-reclaimed files), so
//! the disk stays under the cap. When the overhead exceeds half the cap (tiny test caps),
//! data is kept under half the cap instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::store::{EventStore, LogError};

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Events whose `time_us` is more than this older than the newest event's are deleted
    /// (default 72 h).
    pub max_age: Duration,
    /// Size cap for the store (default 20 GiB).
    pub max_bytes: u64,
    /// How often the limits are checked (default 2 s).
    pub check_interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(72 * 3600),
            max_bytes: 20 * 1024 * 1024 * 1024,
            check_interval: Duration::from_secs(2),
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPass {
    pub deleted_events: u64,
    pub segments_by_age: u64,
    pub segments_by_size: u64,
}

#[derive(Debug, Default)]
pub struct RetentionStats {
    pub deleted_events: AtomicU64,
    pub passes: AtomicU64,
    pub failures: AtomicU64,
}

/// The byte budget for stored segments under `config`.
pub fn data_budget(store: &dyn EventStore, config: &RetentionConfig) -> u64 {
    config
        .max_bytes
        .saturating_sub(store.overhead_bytes())
        .max(config.max_bytes / 2)
}

/// One retention pass: by age back from the newest stored event's source time, then by size.
pub fn run_once(
    store: &dyn EventStore,
    config: &RetentionConfig,
) -> Result<RetentionPass, LogError> {
    let Some(newest_us) = store.bounds().map(|b| b.newest_time_us) else {
        return Ok(RetentionPass::default());
    };
    let age_us = i64::try_from(config.max_age.as_micros()).unwrap_or(i64::MAX);
    let cutoff = newest_us.saturating_sub(age_us);
    let budget = data_budget(store, config);
    let mut size = store.size_bytes();
    let mut pass = RetentionPass::default();
    let mut delete_before = None;
    for seg in store.segments(usize::MAX) {
        if seg.last_time_us < cutoff {
            pass.segments_by_age += 1;
        } else if size > budget {
            pass.segments_by_size += 1;
        } else {
            break;
        }
        size = size.saturating_sub(seg.bytes);
        delete_before = Some(seg.last_seq + 1);
    }
    if let Some(seq) = delete_before {
        pass.deleted_events = store.delete_before(seq)?;
    }
    Ok(pass)
}

/// Runs passes every `check_interval` until `stop` is dropped or sent to.
pub fn run(
    store: Arc<dyn EventStore>,
    config: RetentionConfig,
    stats: Arc<RetentionStats>,
    stop: mpsc::Receiver<()>,
) {
    loop {
        match run_once(store.as_ref(), &config) {
            Ok(pass) => {
                stats.passes.fetch_add(1, Ordering::Relaxed);
                if pass.deleted_events > 0 {
                    stats
                        .deleted_events
                        .fetch_add(pass.deleted_events, Ordering::Relaxed);
                    tracing::debug!(?pass, "retention deleted old events");
                }
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "retention pass failed; will retry");
            }
        }
        match stop.recv_timeout(config.check_interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
