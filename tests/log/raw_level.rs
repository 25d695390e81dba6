//! The raw frames' adaptive zstd level: segments stored at either level (and at levels an
//! operator may set) read back exactly, after a restart too, and the log writer takes the
//! fast level only while a backlog builds (appends waiting for room in its queue), the
//! small level while it keeps up.

use crate::log_common;

use std::time::Duration;

use log_common::{assert_same, test_config, EventGen};
use sluice::event::{Event, StampState};
use sluice::log::{
    Compression, EventStore, FjallConfig, FjallStore, Log, Payloads, ReadLimits, WriterPace,
};

/// Every event from `from` on, all payloads, in reads of 100 events.
fn read_store(store: &dyn EventStore, from: u64) -> Vec<sluice::log::SharedEvent> {
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..100_000 {
        let got = store
            .read(next, ReadLimits::events(100), Payloads::ALL)
            .expect("read");
        let Some(last) = got.last() else { break };
        next = last.seq + 1;
        out.extend(got);
    }
    out
}

fn assert_all_same(want: &[Event], got: &[sluice::log::SharedEvent]) {
    assert_eq!(got.len(), want.len(), "every event read back");
    for (w, g) in want.iter().zip(got) {
        assert_same(w, g);
    }
}

/// Groups encoded keeping up and behind, at the default levels and at others an operator
/// may configure, are stored with the level the pace asks for and read back exactly, before
/// and after the store is reopened (which verifies the newest segment).
#[test]
fn segments_at_each_raw_level_read_back_exactly() {
    for (raw_level, raw_fast_level) in [(3, -3), (19, -7), (1, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FjallConfig::new(dir.path().join("events"));
        config.segment_target_bytes = 64 * 1024;
        config.compression = Compression {
            raw_level,
            raw_fast_level,
            ..Compression::default()
        };
        let (store, _) = FjallStore::open(config.clone()).unwrap();
        let mut gen = EventGen::new(StampState::fresh());
        let mut want = Vec::new();
        for round in 0..6 {
            let pace = if round % 2 == 0 {
                WriterPace::KeepingUp
            } else {
                WriterPace::Behind
            };
            let batch: Vec<sluice::log::SharedEvent> = (0..20)
                .flat_map(|_| gen.next_frame())
                .map(sluice::log::SharedEvent::new)
                .collect();
            let encoded = store.encode(&batch, pace).unwrap();
            assert!(!encoded.is_empty());
            let level = if pace == WriterPace::KeepingUp {
                raw_level
            } else {
                raw_fast_level
            };
            assert!(
                encoded.iter().all(|s| s.raw_level == level),
                "{pace:?} encodes raw frames at level {level}"
            );
            store.append_encoded(&batch, &encoded, gen.state).unwrap();
            want.extend(batch.iter().map(|e| (**e).clone()));
        }
        assert_all_same(&want, &read_store(&store, 1));
        drop(store);
        let (store, report) = FjallStore::open(config).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_all_same(&want, &read_store(&store, 1));
    }
}

/// Through the log: appends made one at a time, each waited for, are committed at the
/// keeping-up level; a flood into a small writer queue (appends wait for room) is committed
/// partly at the fast level; every event of both reads back exactly. The counts are what
/// `sluice_log_raw_level_segments_total` exports.
#[test]
fn the_writer_takes_the_fast_level_only_under_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Long enough that a paced append is never taken late by a loaded machine's scheduler.
    config.commit_interval = Duration::from_millis(300);
    config.queue_max_bytes = 64 * 1024;
    config.compression = Compression {
        raw_level: 3,
        raw_fast_level: -3,
        ..Compression::default()
    };
    let (log, state) = Log::open(config).unwrap();
    let stats = || log.writer_stats().raw_level_segments();
    assert_eq!(
        stats(),
        vec![(-3, 0), (3, 0)],
        "both levels listed from the start"
    );

    let mut gen = EventGen::new(state);
    let mut want = Vec::new();
    for _ in 0..4 {
        let frame = gen.next_frame();
        want.extend(frame.iter().cloned());
        log.append(frame).unwrap();
        assert!(log.flush(Duration::from_secs(30)), "paced append durable");
    }
    let paced = stats();
    assert_eq!(paced[0], (-3, 0), "no fast-level segment while keeping up");
    assert!(paced[1].1 >= 4, "each paced commit at level 3: {paced:?}");

    // ~150 corpus frames are ~800 KB, many times the 64 KiB queue.
    for _ in 0..300 {
        let frame = gen.next_frame();
        want.extend(frame.iter().cloned());
        log.append(frame).unwrap();
    }
    assert!(log.flush(Duration::from_secs(60)), "flood durable");
    let flooded = stats();
    assert!(
        flooded[0].1 > 0,
        "a backlog builds and takes the fast level: {flooded:?}"
    );

    let got = read_store(log.reader().store().as_ref(), 1);
    assert_all_same(&want, &got);
    log.close().unwrap();
}
