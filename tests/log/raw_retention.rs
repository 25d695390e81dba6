//! Raw frames' own retention: the frames of whole oldest segments go past their age or
//! share of the size cap while the JSON of the same events stays; the raw floor survives a
//! restart (persisted, or recomputed from the raw files left); the two shares keep the
//! disk within 10% of the total cap. (The wires' side of the raw floor: `tests/wire/`,
//! `raw_retention`.)

use crate::log_common;

use std::path::Path;
use std::time::{Duration, Instant};

use log_common::{test_config, EventGen};
use sluice::event::{Event, StampState};
use sluice::log::retention::{self, RawRetention, RetentionConfig};
use sluice::log::{EventStore, FjallConfig, FjallStore, Log, LogError, Payloads, ReadLimits};

fn store_config(dir: &Path) -> FjallConfig {
    let mut cfg = FjallConfig::new(dir.join("events"));
    cfg.segment_target_bytes = 32 * 1024;
    cfg.blob_file_bytes = 256 * 1024;
    cfg.max_journal_bytes = 24 * 1024 * 1024;
    cfg
}

fn filled_store(dir: &Path, frames: usize) -> (FjallStore, Vec<Event>) {
    let (store, report) = FjallStore::open(store_config(dir)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let all = EventGen::new(StampState::fresh()).append_frames(&store, frames);
    (store, all)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Every event from the store's oldest on with `payloads`, in order and gapless.
fn read_all(store: &FjallStore, payloads: Payloads) -> Vec<Event> {
    let mut next = store.bounds().unwrap().oldest_seq;
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let got = store.read(next, ReadLimits::events(500), payloads).unwrap();
        let Some(last) = got.last() else { break };
        next = last.seq + 1;
        out.extend(got.into_iter().map(sluice::log::SharedEvent::into_event));
    }
    out
}

/// The frames' share of a cap at a third of the raw bytes held, checked by one pass.
fn raw_cap_a_third(store: &FjallStore) -> RetentionConfig {
    RetentionConfig {
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        max_bytes: u64::MAX / 2,
        check_interval: Duration::from_secs(1),
        raw: Some(RawRetention {
            max_age: Duration::from_secs(100 * 365 * 24 * 3600),
            max_bytes: store.raw_size_bytes() / 3,
        }),
    }
}

#[test]
fn raw_retention_drops_frames_below_a_floor_and_keeps_every_events_json() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = filled_store(dir.path(), 1000);
    let raw_dir = dir.path().join("events/raw");
    let raw_files_before = files_in(&raw_dir).len();
    let data_files_before = files_in(&dir.path().join("events/data"));
    let json_before = store.size_bytes() - store.raw_size_bytes();
    assert!(
        store.raw_size_bytes() > json_before,
        "raw frames are most of the bytes"
    );
    let config = raw_cap_a_third(&store);
    let pass = retention::run_once(&store, &config).unwrap();
    assert_eq!(pass.deleted_events, 0, "no JSON goes: {pass:?}");
    assert!(
        pass.raw_segments_by_size > 0 && pass.raw_segments_by_age == 0,
        "{pass:?}"
    );
    let raw_cap = config.raw.unwrap().max_bytes;
    assert!(store.raw_size_bytes() <= raw_cap);
    assert_eq!(
        store.size_bytes() - store.raw_size_bytes(),
        json_before,
        "the JSON's bytes are untouched"
    );
    // The floor is at a segment boundary above the oldest event; no more went than needed.
    let floor = store.raw_bounds().unwrap().oldest_seq;
    let oldest = store.bounds().unwrap().oldest_seq;
    assert_eq!(oldest, 1);
    assert!(floor > oldest);
    assert_eq!(pass.raw_dropped_events, floor - oldest);
    let segs = store.segments(usize::MAX);
    let at = segs.iter().position(|s| s.first_seq == floor).unwrap();
    assert!(store.raw_size_bytes() + segs[at - 1].raw_bytes > raw_cap);
    // Raw files wholly below the floor are gone; the data files are all still there.
    assert!(files_in(&raw_dir).len() < raw_files_before);
    assert_eq!(files_in(&dir.path().join("events/data")), data_files_before);

    // The raw wire alone is refused below the floor, naming it.
    assert!(matches!(
        store.read(floor - 1, ReadLimits::events(1), Payloads::RAW),
        Err(LogError::TooOld { oldest: o, .. }) if o == floor
    ));
    // From the floor the frames are exactly what was appended.
    let raw = store
        .read(floor, ReadLimits::events(50), Payloads::RAW)
        .unwrap();
    assert_eq!(raw[0].seq, floor);
    for e in &raw {
        let want = &all[(e.seq - 1) as usize];
        assert_eq!(e.raw_frame, want.raw_frame, "frame of seq {}", e.seq);
    }
    // The JSON of every event, below the floor too, gapless and unchanged.
    for payloads in [Payloads::V1, Payloads::V2] {
        let got = read_all(&store, payloads);
        assert_eq!(got.len(), all.len());
        for (g, want) in got.iter().zip(&all) {
            assert_eq!(g.seq, want.seq);
            assert_eq!(g.v1_json.is_some(), payloads.v1);
            if payloads.v1 {
                assert_eq!(g.v1_json, want.v1_json, "v1 of seq {}", g.seq);
            } else {
                assert_eq!(g.v2_json, want.v2_json, "v2 of seq {}", g.seq);
            }
        }
    }
    // Everything at once: below the floor without frames, from it with them.
    let got = read_all(&store, Payloads::ALL);
    assert_eq!(got.len(), all.len());
    for g in &got {
        assert_eq!(
            g.raw_frame.is_empty(),
            g.seq < floor && !all[(g.seq - 1) as usize].raw_frame.is_empty(),
            "frame of seq {} (floor {floor})",
            g.seq
        );
        assert_eq!(g.v2_json, all[(g.seq - 1) as usize].v2_json);
    }
    // A second pass moves nothing.
    assert_eq!(
        retention::run_once(&store, &config)
            .unwrap()
            .raw_dropped_events,
        0
    );
}

#[test]
fn raw_retention_by_age_counts_back_from_the_newest_event() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = filled_store(dir.path(), 600);
    // Frames older than the event two thirds in go; the JSON keeps everything.
    let cutoff = &all[all.len() * 2 / 3];
    let newest_time = all.last().unwrap().time_us;
    let config = RetentionConfig {
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        max_bytes: u64::MAX / 2,
        check_interval: Duration::from_secs(1),
        raw: Some(RawRetention {
            max_age: Duration::from_micros((newest_time - cutoff.time_us) as u64),
            max_bytes: u64::MAX / 4,
        }),
    };
    let pass = retention::run_once(&store, &config).unwrap();
    assert!(
        pass.raw_segments_by_age > 0 && pass.raw_segments_by_size == 0 && pass.deleted_events == 0,
        "{pass:?}"
    );
    let raw = store.raw_bounds().unwrap();
    let first_held = store
        .segments(usize::MAX)
        .into_iter()
        .find(|s| s.first_seq == raw.oldest_seq)
        .unwrap();
    assert!(
        first_held.last_time_us >= cutoff.time_us,
        "no expired frame left"
    );
    assert!(raw.oldest_seq <= cutoff.seq + 1, "no younger frame dropped");
    assert_eq!(store.bounds().unwrap().oldest_seq, 1);
}

#[test]
fn the_raw_floor_survives_a_restart_and_is_recomputed_when_raw_files_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let floor = {
        let (store, _) = filled_store(dir.path(), 800);
        let config = raw_cap_a_third(&store);
        retention::run_once(&store, &config).unwrap();
        store.raw_bounds().unwrap().oldest_seq
    };
    assert!(floor > 1);
    // Reopened: the same floor (persisted), a clean open, the raw wire refused below it.
    let newest = {
        let (store, report) = FjallStore::open(store_config(dir.path())).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(store.raw_bounds().unwrap().oldest_seq, floor);
        assert!(matches!(
            store.read(floor - 1, ReadLimits::events(1), Payloads::RAW),
            Err(LogError::TooOld { oldest: o, .. }) if o == floor
        ));
        assert_eq!(
            store
                .read(floor, ReadLimits::events(1), Payloads::RAW)
                .unwrap()[0]
                .seq,
            floor
        );
        assert_eq!(
            store.read(1, ReadLimits::events(1), Payloads::V1).unwrap()[0].seq,
            1
        );
        store.bounds().unwrap().newest_seq
    };
    // The oldest raw file removed behind the store's back (as if a crash had come between
    // a floor that was never persisted and the file's removal): the floor is recomputed
    // past the segments that read it, and the open says so.
    let raw_dir = dir.path().join("events/raw");
    let oldest_file = files_in(&raw_dir).into_iter().next().unwrap();
    std::fs::remove_file(raw_dir.join(&oldest_file)).unwrap();
    let (store, report) = FjallStore::open(store_config(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("raw floor moved")),
        "{report:?}"
    );
    assert_eq!(report.dropped_events, 0, "no event lost its JSON");
    let recomputed = store.raw_bounds().unwrap().oldest_seq;
    assert!(recomputed > floor);
    assert!(matches!(
        store.read(recomputed - 1, ReadLimits::events(1), Payloads::RAW),
        Err(LogError::TooOld { oldest: o, .. }) if o == recomputed
    ));
    let raw = store
        .read(recomputed, ReadLimits::events(10), Payloads::RAW)
        .unwrap();
    assert_eq!(raw[0].seq, recomputed);
    assert!(!raw[0].raw_frame.is_empty());
    assert_eq!(read_all(&store, Payloads::V2).len() as u64, newest);
}

/// Bytes the files under `dir` take on disk (allocated blocks: fjall's active journal is a
/// sparse preallocated file).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

#[test]
fn the_json_and_raw_shares_add_up_to_the_cap_and_the_disk_stays_within_ten_percent() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // 10 MiB in all, 8 of them for raw frames, small files so reclaiming is fine-grained.
    // (The JSON's share is under the store's fixed overhead, so it gets half its share.)
    config.retention.max_bytes = 10 << 20;
    config.retention.raw = Some(RawRetention {
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        max_bytes: 8 << 20,
    });
    config.retention.check_interval = Duration::from_millis(20);
    config.segment_target_bytes = 32 * 1024;
    config.blob_file_bytes = 256 * 1024;
    config.memtable_bytes = 1024 * 1024;
    let total = config.retention.max_bytes;
    let (log, state) = Log::open(config.clone()).unwrap();
    let mut gen = EventGen::new(state);
    let reader = log.reader();
    let store = reader.store().clone();
    let json_budget = retention::data_budget(store.as_ref(), &config.retention);
    let raw_budget = 8 << 20;
    let json = || store.size_bytes() - store.raw_size_bytes();
    let passes = || {
        log.retention_stats()
            .passes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The disk after retention has had a whole pass over what was appended (between
    // passes ingest may run ahead of it by one check interval's worth).
    let settled = || {
        assert!(log.flush(Duration::from_secs(60)));
        let seen = passes();
        let deadline = Instant::now() + Duration::from_secs(30);
        while passes() < seen + 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(passes() >= seen + 2, "retention stopped passing");
        dir_bytes(dir.path())
    };
    let mut worst = 0u64;
    // Well past both shares: ~3.5 KB of raw frame per corpus event.
    for i in 0..6000 {
        log.append(gen.next_frame()).unwrap();
        if i % 500 == 499 {
            worst = worst.max(settled());
        }
    }
    worst = worst.max(settled());
    assert!(json() <= json_budget, "{} > {json_budget}", json());
    assert!(store.raw_size_bytes() <= raw_budget);
    // Both shares are in use: the frames went first, then whole old segments.
    assert!(store.raw_size_bytes() > raw_budget / 2);
    assert!(json() > json_budget / 2, "{} of {json_budget}", json());
    let floor = reader.raw_floor().expect("frames dropped below the JSON");
    assert!(floor > reader.bounds().unwrap().oldest_seq);
    eprintln!(
        "cap {total} B: JSON {} B, raw {} B, disk at most {worst} B",
        json(),
        store.raw_size_bytes()
    );
    if worst > total + total / 10 {
        let out = std::process::Command::new("find")
            .args([
                dir.path().to_str().unwrap(),
                "-type",
                "f",
                "-printf",
                "%s %b %P\n",
            ])
            .output()
            .unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    assert!(
        worst <= total + total / 10,
        "the data directory took {worst} B, more than 10% over the {total} B cap"
    );
    drop(store);
    drop(reader);
    log.close().unwrap();
}
