//! Retention by age and by size: whole oldest segments go, nothing newer, reads stay
//! gapless from the new oldest event.

use crate::log_common;

use std::time::{Duration, Instant};

use log_common::{test_config, EventGen};
use sluice::event::{Event, StampState};
use sluice::log::retention::{self, RetentionConfig};
use sluice::log::{
    Cursor, EventStore, FjallConfig, FjallStore, Log, LogError, Payloads, ReadLimits, Resolved,
};

fn store_with(dir: &std::path::Path, frames: usize) -> (FjallStore, Vec<Event>) {
    let mut cfg = FjallConfig::new(dir.join("events"));
    cfg.segment_target_bytes = 32 * 1024;
    cfg.blob_file_bytes = 1024 * 1024;
    cfg.max_journal_bytes = 24 * 1024 * 1024;
    let (store, report) = FjallStore::open(cfg).unwrap();
    assert!(report.is_clean());
    let all = EventGen::new(StampState::fresh()).append_frames(&store, frames);
    (store, all)
}

fn assert_readable_from_oldest(store: &FjallStore, newest: u64) {
    let oldest = store.bounds().unwrap().oldest_seq;
    let mut next = oldest;
    for _ in 0..100_000 {
        let got = store
            .read(next, ReadLimits::events(500), Payloads::ALL)
            .unwrap();
        if got.is_empty() {
            break;
        }
        for e in got {
            assert_eq!(e.seq, next);
            next += 1;
        }
    }
    assert_eq!(next, newest + 1);
    assert!(matches!(
        store.read(oldest - 1, ReadLimits::events(1), Payloads::V1),
        Err(LogError::TooOld { oldest: o, .. }) if o == oldest
    ));
}

#[test]
fn retention_by_age_deletes_only_whole_expired_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = store_with(dir.path(), 600);
    let newest = all.last().unwrap().seq;
    // An age such that the first ~third of the events are older than it, counted back from
    // the newest event (not from the wall clock: these events are from 2025).
    let cutoff_event = &all[all.len() / 3];
    let newest_time = all.last().unwrap().time_us;
    let config = RetentionConfig {
        max_age: Duration::from_micros((newest_time - cutoff_event.time_us) as u64),
        max_bytes: u64::MAX,
        check_interval: Duration::from_secs(1),
        raw: None,
    };
    let pass = retention::run_once(&store, &config).unwrap();
    assert!(
        pass.segments_by_age > 0 && pass.segments_by_size == 0,
        "{pass:?}"
    );
    let segs = store.segments(usize::MAX);
    assert!(
        segs[0].last_time_us >= cutoff_event.time_us,
        "no expired segment left"
    );
    assert!(segs[0].first_seq > 1);
    assert!(
        segs[0].first_seq <= cutoff_event.seq + 1,
        "nothing younger than the cutoff was deleted"
    );
    assert_readable_from_oldest(&store, newest);
    // A second pass at the same time deletes nothing more.
    assert_eq!(
        retention::run_once(&store, &config).unwrap().deleted_events,
        0
    );
}

#[test]
fn retention_by_size_keeps_the_newest_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = store_with(dir.path(), 1000);
    let newest = all.last().unwrap().seq;
    let total = store.size_bytes();
    let config = RetentionConfig {
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        max_bytes: total / 3,
        check_interval: Duration::from_secs(1),
        raw: None,
    };
    let budget = retention::data_budget(&store, &config);
    let pass = retention::run_once(&store, &config).unwrap();
    assert!(
        pass.segments_by_size > 0 && pass.segments_by_age == 0,
        "{pass:?}"
    );
    assert!(
        store.size_bytes() <= budget,
        "{} > {budget}",
        store.size_bytes()
    );
    let segs = store.segments(usize::MAX);
    assert!(
        store.size_bytes() + segs[0].bytes > budget || segs.len() == 1,
        "deleted no more than needed"
    );
    assert_eq!(store.bounds().unwrap().newest_seq, newest);
    assert_readable_from_oldest(&store, newest);
}

/// A log capped at 3 MiB, checked every 20 ms, in 32 KiB segments, with a hot tail of
/// `tail_max_bytes`.
fn size_capped_config(dir: &std::path::Path, tail_max_bytes: usize) -> sluice::log::LogConfig {
    let mut config = test_config(dir);
    config.retention.max_bytes = 3 * 1024 * 1024;
    config.retention.check_interval = Duration::from_millis(20);
    config.segment_target_bytes = 32 * 1024;
    config.tail_max_bytes = tail_max_bytes;
    config.memtable_bytes = 1024 * 1024;
    config
}

#[test]
fn background_retention_reclaims_disk_and_cursors_see_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let config = size_capped_config(dir.path(), 256 * 1024);
    let (log, state) = Log::open(config.clone()).unwrap();
    let mut gen = EventGen::new(state);
    for _ in 0..4000 {
        log.append(gen.next_frame()).unwrap();
    }
    assert!(log.flush(Duration::from_secs(60)));
    let reader = log.reader();
    let store = reader.store().clone();
    let budget = retention::data_budget(store.as_ref(), &config.retention);
    let deadline = Instant::now() + Duration::from_secs(30);
    let deleted = || {
        log.retention_stats()
            .deleted_events
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    while (store.size_bytes() > budget || deleted() == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(store.size_bytes() <= budget);
    assert!(deleted() > 0);
    let oldest = reader.bounds().unwrap().oldest_seq;
    assert!(oldest > 1);
    assert_eq!(
        reader.resolve(Cursor::Seq(1)).unwrap(),
        Resolved::TooOld { oldest }
    );
    let mut next = oldest;
    for _ in 0..100_000 {
        let got = reader.read_from(next, 256, usize::MAX).unwrap();
        if got.is_empty() {
            break;
        }
        for e in got {
            assert_eq!(e.seq, next);
            next += 1;
        }
    }
    assert_eq!(next, gen.state.next_seq);
    let stored = store.size_bytes();
    drop(store);
    drop(reader);
    log.close().unwrap();
    drop(log);
    // Deleted data leaves the disk: data files wholly deleted are removed (not rewritten).
    let on_disk: u64 = std::fs::read_dir(dir.path().join("events/data"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    eprintln!("stored {stored} B, data files {on_disk} B (after close)");
    assert!(
        on_disk <= budget + 4 * config.blob_file_bytes,
        "data files {on_disk} B exceed the budget {budget} B by more than the reclaim granularity"
    );
    if std::env::var_os("SLUICE_TEST_LIST").is_some() {
        let out = std::process::Command::new("find")
            .args([
                dir.path().to_str().unwrap_or("."),
                "-type",
                "f",
                "-printf",
                "%s %P\n",
            ])
            .output();
        if let Ok(out) = out {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

/// Retention decides what exists, even for events the hot tail still holds: reading below
/// the store's oldest seq is `TooOld`, as `resolve` says, not served from memory.
#[test]
fn events_deleted_by_retention_are_not_served_from_the_hot_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(size_capped_config(dir.path(), 256 * 1024 * 1024)).unwrap();
    let mut gen = EventGen::new(state);
    for _ in 0..4000 {
        log.append(gen.next_frame()).unwrap();
    }
    assert!(log.flush(Duration::from_secs(60)));
    let reader = log.reader();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.bounds().unwrap().oldest_seq <= 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let oldest = reader.bounds().unwrap().oldest_seq;
    assert!(oldest > 1, "retention deleted nothing");
    assert!(
        reader.tail().oldest_seq() < oldest,
        "the test needs deleted events still in the tail"
    );
    // Retention passes keep running meanwhile, so the floor may rise between two calls;
    // it never falls.
    let floor = match reader.read_from(1, 10, usize::MAX) {
        Err(LogError::TooOld { oldest: o, .. }) => o,
        other => panic!(
            "a read below the store's oldest seq must be TooOld, got {:?}",
            other.map(|events| events.len())
        ),
    };
    assert!(floor >= oldest, "the floor fell from {oldest} to {floor}");
    let mut served = None;
    for _ in 0..100 {
        let at = reader.bounds().unwrap().oldest_seq;
        match reader.read_from(at, 1, usize::MAX) {
            Ok(events) => {
                served = Some((at, events[0].seq));
                break;
            }
            Err(LogError::TooOld { oldest: newer, .. }) if newer > at => continue,
            Err(e) => panic!("reading from the oldest seq {at}: {e:?}"),
        }
    }
    let (at, first) = served.expect("the oldest seq was readable within 100 tries");
    assert_eq!(first, at, "a read from the oldest seq starts there");
    log.close().unwrap();
}

/// Age is counted back from the newest event, not from the clock: a capture dated years ago
/// (here 2023) is kept whole by the background thread when it spans less than the limit.
#[test]
fn an_old_capture_is_kept_when_it_spans_less_than_the_age_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.retention.max_age = Duration::from_secs(3600);
    config.retention.check_interval = Duration::from_millis(10);
    let (log, state) = Log::open(config).unwrap();
    let mut gen = EventGen::new(state);
    for _ in 0..500 {
        log.append(gen.next_frame()).unwrap();
    }
    assert!(log.flush(Duration::from_secs(60)));
    let passes = || {
        log.retention_stats()
            .passes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let first = passes();
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes() < first + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(passes() >= first + 5, "retention ran several passes");
    let reader = log.reader();
    let bounds = reader.bounds().unwrap();
    assert!(
        bounds.newest_time_us < sluice::clock::now_us() - 365 * 24 * 3600 * 1_000_000,
        "the events are old by the clock"
    );
    assert_eq!(bounds.oldest_seq, 1, "nothing was deleted");
    assert_eq!(
        log.retention_stats()
            .deleted_events
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
