//! Retention: deletes the oldest segments by age and by size, whichever limit is hit first.
//!
//! Age is measured back from the newest event's source time, not from the wall clock: a
//! capture recorded last week and replayed into `serve` is kept like live traffic, and an
//! upstream that has been down for days does not empty the log.
//!
//! Owns: the retention policy and its background thread, which also runs the store's
//! merging of small segments ([`EventStore::merge_small_segments`], after each pass, for
//! at most half the check interval). Must never: delete anything but whole oldest
//! segments through [`EventStore::delete_before`] (retention itself rewrites nothing), or
//! block the writer or readers for longer than one store deletion or merge commit.
//!
//! Size: the store's `size_bytes` (compressed segment bytes) is kept under
//! `max_bytes - overhead_bytes` (the backend's journals and not-yet-reclaimed files), so
//! the disk stays under the cap. When the overhead exceeds half the cap (tiny test caps),
//! data is kept under half the cap instead.
//!
//! Raw frames (most of the bytes; most consumers read JSON) can have limits of their own
//! ([`RawRetention`]): their age and a share of `max_bytes`. Then the frames of whole
//! oldest segments are dropped past those limits while their JSON stays
//! ([`EventStore::delete_raw_before`]), the JSON gets the rest of `max_bytes` (less the
//! overhead), and the two shares add up to `max_bytes`.

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
    /// Raw frames' own limits; `None`: a frame is kept as long as its event (the
    /// library's default; `sluice serve` sets them from `--raw-retention-*`).
    pub raw: Option<RawRetention>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(72 * 3600),
            max_bytes: 20 * 1024 * 1024 * 1024,
            check_interval: Duration::from_secs(2),
            raw: None,
        }
    }
}

/// Retention of raw frames apart from their JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRetention {
    /// Frames whose event's `time_us` is more than this older than the newest event's are
    /// dropped (default 24 h; the JSON stays up to `RetentionConfig::max_age`).
    pub max_age: Duration,
    /// The frames' share of `RetentionConfig::max_bytes` (default 4 GiB of 20).
    pub max_bytes: u64,
}

impl Default for RawRetention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 4 * 1024 * 1024 * 1024,
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPass {
    pub deleted_events: u64,
    pub segments_by_age: u64,
    pub segments_by_size: u64,
    /// Events whose raw frames were dropped (their JSON kept).
    pub raw_dropped_events: u64,
    pub raw_segments_by_age: u64,
    pub raw_segments_by_size: u64,
}

#[derive(Debug, Default)]
pub struct RetentionStats {
    pub deleted_events: AtomicU64,
    /// Small segments merged into full-size ones, and merge steps that failed.
    pub merged_segments: AtomicU64,
    pub merge_failures: AtomicU64,
    pub raw_dropped_events: AtomicU64,
    pub passes: AtomicU64,
    pub failures: AtomicU64,
}

/// The byte budget of the JSON class (every stored byte when raw frames have no limits
/// of their own): the cap less the raw share, less the backend's overhead.
pub fn data_budget(store: &dyn EventStore, config: &RetentionConfig) -> u64 {
    json_budget(
        config.max_bytes,
        store.overhead_bytes(),
        config.raw.as_ref(),
    )
}

/// [`data_budget`] from plain numbers, for projections without a store.
pub fn json_budget(max_bytes: u64, overhead_bytes: u64, raw: Option<&RawRetention>) -> u64 {
    let share = max_bytes.saturating_sub(raw.map_or(0, |r| r.max_bytes));
    share.saturating_sub(overhead_bytes).max(share / 2)
}

/// Stored bytes retention counts against [`data_budget`].
pub fn json_bytes(store: &dyn EventStore, config: &RetentionConfig) -> u64 {
    match config.raw {
        Some(_) => store.size_bytes().saturating_sub(store.raw_size_bytes()),
        None => store.size_bytes(),
    }
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
    let mut size = json_bytes(store, config);
    let mut pass = RetentionPass::default();
    let mut delete_before = None;
    let segments = store.segments(usize::MAX);
    let mut kept = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        if seg.last_time_us < cutoff {
            pass.segments_by_age += 1;
        } else if size > budget {
            pass.segments_by_size += 1;
        } else {
            kept = i;
            break;
        }
        let json = match config.raw {
            Some(_) => seg.bytes - seg.raw_bytes,
            None => seg.bytes,
        };
        size = size.saturating_sub(json);
        delete_before = Some(seg.last_seq + 1);
        kept = i + 1;
    }
    if let Some(seq) = delete_before {
        pass.deleted_events = store.delete_before(seq)?;
    }
    if let Some(raw) = &config.raw {
        raw_pass(store, raw, newest_us, &segments[kept..], &mut pass)?;
    }
    Ok(pass)
}

/// Drops the raw frames of the oldest segments (of `segments`, those retained) past
/// `raw`'s age or size, keeping their JSON.
fn raw_pass(
    store: &dyn EventStore,
    raw: &RawRetention,
    newest_us: i64,
    segments: &[crate::log::Segment],
    pass: &mut RetentionPass,
) -> Result<(), LogError> {
    let Some(floor) = store.raw_bounds().map(|b| b.oldest_seq) else {
        return Ok(());
    };
    let age_us = i64::try_from(raw.max_age.as_micros()).unwrap_or(i64::MAX);
    let cutoff = newest_us.saturating_sub(age_us);
    let mut size = store.raw_size_bytes();
    let mut drop_before = None;
    for seg in segments.iter().filter(|s| s.first_seq >= floor) {
        if seg.last_time_us < cutoff {
            pass.raw_segments_by_age += 1;
        } else if size > raw.max_bytes {
            pass.raw_segments_by_size += 1;
        } else {
            break;
        }
        size = size.saturating_sub(seg.raw_bytes);
        drop_before = Some(seg.last_seq + 1);
    }
    if let Some(seq) = drop_before {
        pass.raw_dropped_events = store.delete_raw_before(seq)?;
    }
    Ok(())
}

/// Runs merge steps while they merge something, for at most `budget`.
fn merge_for(store: &dyn EventStore, budget: Duration, stats: &RetentionStats) {
    let started = std::time::Instant::now();
    while started.elapsed() < budget {
        match store.merge_small_segments() {
            Ok(step) if step.merged > 0 => {
                stats
                    .merged_segments
                    .fetch_add(step.merged, Ordering::Relaxed);
                tracing::debug!(?step, "merged small segments");
            }
            Ok(_) => return,
            Err(e) => {
                stats.merge_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "merging small segments failed; will retry");
                return;
            }
        }
    }
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
                stats
                    .raw_dropped_events
                    .fetch_add(pass.raw_dropped_events, Ordering::Relaxed);
                if pass.deleted_events > 0 || pass.raw_dropped_events > 0 {
                    stats
                        .deleted_events
                        .fetch_add(pass.deleted_events, Ordering::Relaxed);
                    tracing::debug!(?pass, "retention deleted old events or raw frames");
                }
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "retention pass failed; will retry");
            }
        }
        merge_for(store.as_ref(), config.check_interval / 2, &stats);
        match stop.recv_timeout(config.check_interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
