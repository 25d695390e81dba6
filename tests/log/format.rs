//! Stored layouts: a data dir written by an earlier layout opens and reads back every
//! event exactly, and keeps working as new events are appended in the current layout.
//!
//! `fixtures/log-format-1` was written by sluice's first segment layout (one JSON column
//! per wire) with `examples/log_fixture.rs`: the first 300 frames of
//! `fixtures/synth-1000.bin`, ingested with a fixed receipt time, in three commits.

use crate::log_common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use log_common::{assert_same, test_config};
use sluice::decode::DecodeLimits;
use sluice::event::Event;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{EventStore, FjallConfig, FjallStore, Log, Payloads, ReadLimits};
use sluice::upstream::capture::read_all;

/// The receipt time `examples/log_fixture.rs` gave every frame.
const RECEIVED_US: i64 = 1_748_800_000_000_000;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The synth frames ingested as the fixture writer did: one Vec of events per commit.
fn synth_commits(ingestor: &mut Ingestor, frames: &[Vec<u8>]) -> Vec<Vec<Event>> {
    frames
        .chunks(100)
        .map(|chunk| {
            let mut events = Vec::new();
            for f in chunk {
                if let IngestOutcome::Events(e) =
                    ingestor.ingest(Bytes::from(f.clone()), RECEIVED_US)
                {
                    events.extend(e);
                }
            }
            events
        })
        .collect()
}

fn read_store(store: &dyn EventStore, from: u64, payloads: Payloads) -> Vec<Event> {
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..10_000 {
        let got = store
            .read(next, ReadLimits::events(97), payloads)
            .expect("read");
        let Some(last) = got.last() else { break };
        next = last.seq + 1;
        out.extend(got.into_iter().map(sluice::log::SharedEvent::into_event));
    }
    out
}

#[test]
fn a_data_dir_of_the_first_layout_opens_reads_exactly_and_takes_new_events() {
    let frames = read_all(&fixture("synth-1000.bin"), 8 << 20).unwrap();
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let old: Vec<Event> = synth_commits(&mut ingestor, &frames[..300])
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(old.len(), 363, "the fixture holds 300 frames' 363 events");

    let dir = tempfile::tempdir().unwrap();
    crate::copy_dir(&fixture("log-format-1"), dir.path());
    {
        let (store, report) =
            FjallStore::open(FjallConfig::new(dir.path().join("events"))).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(store.resume_state().next_seq, 364);
        assert_eq!(store.segments(usize::MAX).len(), 3);
        for payloads in [Payloads::ALL, Payloads::V1, Payloads::V2, Payloads::RAW] {
            let got = read_store(&store, 1, payloads);
            assert_eq!(got.len(), old.len());
            for (want, got) in old.iter().zip(&got) {
                assert_same(&crate::with_payloads(want, payloads), got);
            }
        }
        // Cursor lookups work on the old layout's metadata.
        let mid = &old[200];
        assert_eq!(
            store.seq_at_or_after_time(mid.time_us).unwrap(),
            Some(mid.seq)
        );
    }

    // Through the log: the old events, then new ones in the current layout, across a
    // restart.
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    assert_eq!(state, ingestor.state());
    let mut new: Vec<Event> = Vec::new();
    for f in &frames[300..500] {
        if let IngestOutcome::Events(e) = ingestor.ingest(Bytes::from(f.clone()), RECEIVED_US) {
            new.extend(e.iter().cloned());
            log.append(e).unwrap();
        }
    }
    assert!(log.flush(Duration::from_secs(30)));
    log.close().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    assert_eq!(state, ingestor.state());
    let store: Arc<dyn EventStore> = log.reader().store().clone();
    let all = read_store(store.as_ref(), 1, Payloads::ALL);
    assert_eq!(all.len(), old.len() + new.len());
    for (want, got) in old.iter().chain(&new).zip(&all) {
        assert_same(want, got);
    }
    log.close().unwrap();
}

/// Every real corpus event, and every synthetic one, comes back byte for byte from the
/// current layout, which stores each event's JSON once: the v1 and v2 messages are
/// assembled on read from one record, so the verbatim column holds only what has no
/// shared form (identity/account bodies are stored once too).
#[test]
fn the_current_layout_stores_json_once_and_rebuilds_both_wires_exactly() {
    use sluice::log::codec::{column_sizes, decode, Compression, Encoder};
    use sluice::upstream::capture::upstream_fixtures_dir;
    let corpus = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    for path in [corpus, fixture("synth-1000.bin")] {
        let frames = read_all(&path, 8 << 20).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
        let events: Vec<sluice::log::SharedEvent> = frames
            .into_iter()
            .filter_map(
                |f| match ingestor.ingest(Bytes::from(f), 1_900_000_000_000_000) {
                    IngestOutcome::Events(e) => Some(e),
                    _ => None,
                },
            )
            .flatten()
            .map(sluice::log::SharedEvent::new)
            .collect();
        assert!(events.len() > 100);
        let mut encoder = Encoder::new(Compression::default()).unwrap();
        let seg = encoder.encode(&events).unwrap();
        for payloads in [Payloads::ALL, Payloads::V1, Payloads::V2] {
            let back = decode(&seg.events_value, Some(&seg.frames_value), payloads).unwrap();
            assert_eq!(back.len(), events.len());
            for (want, got) in events.iter().zip(&back) {
                let mut want = (**want).clone();
                if !payloads.v1 {
                    want.v1_json = None;
                }
                if !payloads.v2 {
                    want.v2_json = None;
                }
                if !payloads.raw {
                    want.raw_frame = Bytes::new();
                }
                assert_same(&want, got);
            }
        }
        let sizes = column_sizes(&seg.events_value).unwrap();
        let plain = |name: &str| sizes.iter().find(|c| c.0 == name).unwrap().2;
        let one_copy: usize = events
            .iter()
            .filter_map(|e| e.v2_json.as_ref().map(Bytes::len))
            .sum();
        let stored_plain: usize = sizes.iter().map(|c| c.2).sum();
        eprintln!("{}: {sizes:?}; one v2 copy {one_copy} B", path.display());
        assert!(
            stored_plain < one_copy,
            "{}: the columns ({stored_plain} B before compression) hold less than one wire's \
             JSON ({one_copy} B)",
            path.display()
        );
        assert!(
            plain("other") * 10 < plain("records"),
            "{}: events stored verbatim: {sizes:?}",
            path.display()
        );
    }
}

/// Concurrent cold readers of the same stretch share one decode per segment: the same
/// assembled bytes (one buffer per wire and segment, not a copy per reader), counted as
/// shared, and identical to what ingest made.
#[test]
fn concurrent_cold_readers_share_each_segments_assembled_json() {
    let frames = read_all(&fixture("synth-1000.bin"), 8 << 20).unwrap();
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let commits = synth_commits(&mut ingestor, &frames[..400]);
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = FjallStore::open(FjallConfig::new(dir.path().join("events"))).unwrap();
    let mut written = Vec::new();
    let mut state = StampState::fresh();
    for commit in commits {
        let shared: Vec<sluice::log::SharedEvent> = commit
            .into_iter()
            .map(sluice::log::SharedEvent::new)
            .collect();
        state.next_seq = shared.last().unwrap().seq + 1;
        state.last_time_us = shared.last().unwrap().time_us;
        state.upstream_cursor = Some(shared.last().unwrap().upstream_seq);
        store.append(&shared, state).unwrap();
        written.extend(shared);
    }
    let segments = store.segments(usize::MAX).len() as u64;
    assert!(segments >= 4);
    let store = Arc::new(store);
    let readers: Vec<Vec<Event>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                s.spawn(move || read_store(store.as_ref(), 1, Payloads::V1))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (decoded, shared) = store.decoded_cache_counts();
    let ahead = store.read_ahead_decodes();
    // Each segment decoded once for v1, by a reader or ahead of them (a read that ends
    // mid-segment finds it decoded).
    assert_eq!(
        decoded + ahead,
        segments,
        "decodes: {decoded}, ahead: {ahead}, shared: {shared}"
    );
    assert!(shared >= 7 * segments, "shared: {shared}");
    for got in &readers {
        assert_eq!(got.len(), written.len());
        for (a, b) in got.iter().zip(&readers[0]) {
            let (x, y) = (a.v1_json.as_ref(), b.v1_json.as_ref());
            assert_eq!(
                x.map(|b| b.as_ptr()),
                y.map(|b| b.as_ptr()),
                "seq {}: one assembled copy for every reader",
                a.seq
            );
        }
        for (want, got) in written.iter().zip(got) {
            assert_eq!(want.v1_json, got.v1_json, "seq {}", want.seq);
        }
    }
}
