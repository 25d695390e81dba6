//! Ingest over the 150 real relay frames: every event is stamped correctly, its v1 and v2
//! JSON are right, and the raw frames pass through byte for byte.

use bytes::Bytes;
use serde_json::Value;
use sluice::decode::{decode_frame, Body, DecodeLimits, DecodedFrame};
use sluice::event::{Event, EventKind, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

fn corpus() -> Vec<Vec<u8>> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    assert!(
        path.is_file(),
        "real corpus missing at {} (set SLUICE_UPSTREAM_FIXTURES)",
        path.display()
    );
    read_all(&path, 5 << 20).expect("read corpus")
}

fn manifest() -> Value {
    let path = upstream_fixtures_dir().join("jetstream-corpus/manifest.json");
    serde_json::from_slice(&std::fs::read(path).expect("manifest")).expect("manifest json")
}

/// Ingests every frame as if it arrived `receipt_delay_us` after its source time.
fn ingest_all(frames: &[Vec<u8>], receipt_delay_us: i64) -> Vec<Event> {
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut events = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let source = match decode_frame(frame, &DecodeLimits::default()) {
            Ok(DecodedFrame::Message(m)) => m.time_us.expect("source time"),
            other => panic!("frame {i}: {other:?}"),
        };
        match ingestor.ingest(Bytes::from(frame.clone()), source + receipt_delay_us) {
            IngestOutcome::Events(batch) => events.extend(batch),
            other => panic!("frame {i}: unexpected {other:?}"),
        }
    }
    assert_eq!(ingestor.stats().decode_errors, 0);
    events
}

#[test]
fn stamps_are_gapless_increasing_and_use_source_time() {
    let frames = corpus();
    let events = ingest_all(&frames, 2_000_000);
    let manifest = manifest();
    assert_eq!(events.len() as u64, manifest["v1_events"].as_u64().unwrap());
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "sluice seq is gapless from 1");
        assert!(e.time_us <= e.received_us, "never later than receipt");
        assert!(
            e.received_us - e.time_us < 2_100_000,
            "time_us is the source time, not the receipt time: {} vs {}",
            e.time_us,
            e.received_us
        );
        if i > 0 {
            assert!(e.time_us > events[i - 1].time_us, "strictly increasing");
            assert!(e.upstream_seq >= events[i - 1].upstream_seq);
        }
    }
    assert_eq!(
        events.first().unwrap().upstream_seq,
        manifest["seq_first"].as_i64().unwrap()
    );
    assert_eq!(
        events.last().unwrap().upstream_seq,
        manifest["seq_last"].as_i64().unwrap()
    );
}

#[test]
fn source_time_in_the_future_is_clamped_to_receipt() {
    let frames = corpus();
    // Received 10 s *before* the source time: a relay clock ahead of ours.
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut clamped = Vec::new();
    for frame in &frames {
        let Ok(DecodedFrame::Message(m)) = decode_frame(frame, &DecodeLimits::default()) else {
            panic!("decode")
        };
        let received = m.time_us.unwrap() - 10_000_000;
        if let IngestOutcome::Events(batch) = ingestor.ingest(Bytes::from(frame.clone()), received)
        {
            clamped.extend(batch);
        }
    }
    assert!(ingestor.stats().future_time_clamped >= frames.len() as u64);
    for e in &clamped {
        assert!(
            e.time_us <= e.received_us || ingestor.stats().time_forced_ahead > 0,
            "seq {}: {} > receipt {}",
            e.seq,
            e.time_us,
            e.received_us
        );
    }
    assert!(clamped.windows(2).all(|w| w[1].time_us > w[0].time_us));
}

#[test]
fn v1_and_v2_json_match_the_decoded_ops() {
    let frames = corpus();
    let events = ingest_all(&frames, 1_000);
    let limits = DecodeLimits::default();
    // Expected (did, kind, operation, collection, rkey, cid) per event, from the decoder.
    let mut expected = Vec::new();
    for frame in &frames {
        let Ok(DecodedFrame::Message(m)) = decode_frame(frame, &limits) else {
            panic!("decode")
        };
        match m.body {
            Body::Commit(c) => {
                for op in c.ops {
                    expected.push((
                        c.repo.clone(),
                        "commit",
                        Some((
                            op.action.as_str(),
                            op.collection,
                            op.rkey,
                            op.cid,
                            c.rev.clone(),
                        )),
                    ));
                }
            }
            Body::Other { .. } => expected.push((
                m.did.unwrap(),
                if m.t == "#identity" {
                    "identity"
                } else {
                    "account"
                },
                None,
            )),
        }
    }
    assert_eq!(expected.len(), events.len());
    let (mut creates, mut updates, mut deletes) = (0, 0, 0);
    for (e, (did, kind, op)) in events.iter().zip(expected) {
        let v1: Value = serde_json::from_slice(e.v1_json.as_ref().expect("v1 visible")).unwrap();
        let v2: Value = serde_json::from_slice(e.v2_json.as_ref().expect("v2 visible")).unwrap();
        assert_eq!(v1["did"], did.as_str());
        assert_eq!(v1["kind"], kind);
        assert_eq!(v1["time_us"].as_i64(), Some(e.time_us));
        assert_eq!(v1["cursor"].as_u64(), Some(e.seq));
        assert_eq!(v2["$type"], "message");
        let p = &v2["payload"];
        assert_eq!(
            p["$type"].as_str().unwrap(),
            format!("network.bsky.jetstream.subscribeEvents#{kind}")
        );
        assert_eq!(p["seq"].as_u64(), Some(e.seq));
        assert_eq!(p["did"], did.as_str());
        let time = time::OffsetDateTime::parse(
            p["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert_eq!(time.unix_timestamp_nanos() / 1000, i128::from(e.time_us));
        match op {
            Some((operation, collection, rkey, cid, rev)) => {
                assert_eq!(e.kind, EventKind::Commit);
                assert_eq!(e.collection.as_deref(), Some(collection.as_str()));
                for commit in [&v1["commit"], p] {
                    assert_eq!(commit["operation"], operation);
                    assert_eq!(commit["collection"], collection.as_str());
                    assert_eq!(commit["rkey"], rkey.as_str());
                    assert_eq!(commit["rev"], rev.as_str());
                    assert_eq!(commit["cid"].as_str(), cid.as_deref());
                    if operation == "delete" {
                        assert!(commit.get("record").is_none());
                    } else {
                        assert_eq!(
                            commit["record"]["$type"],
                            collection.as_str(),
                            "record type matches its collection"
                        );
                    }
                }
                match operation {
                    "create" => creates += 1,
                    "update" => updates += 1,
                    _ => deletes += 1,
                }
            }
            None => {
                let inner = &v1[kind];
                assert_eq!(inner["did"], did.as_str());
                assert_eq!(inner["seq"].as_i64(), Some(e.upstream_seq));
                assert_eq!(&p[kind], inner);
            }
        }
    }
    let m = manifest();
    assert_eq!(creates, m["creates"].as_u64().unwrap());
    assert_eq!(updates, m["updates"].as_u64().unwrap());
    assert_eq!(deletes, m["deletes"].as_u64().unwrap());
}

#[test]
fn raw_frames_pass_through_once_per_frame_without_copy() {
    let frames = corpus();
    let events = ingest_all(&frames, 1_000);
    let raw: Vec<&Bytes> = events
        .iter()
        .filter_map(sluice::wire::raw::frame_of)
        .collect();
    assert_eq!(raw.len(), frames.len());
    for (sent, original) in raw.iter().zip(&frames) {
        assert_eq!(sent.as_ref(), original.as_slice());
    }
    // Events of one frame share one allocation.
    for pair in events.windows(2) {
        if pair[0].upstream_seq == pair[1].upstream_seq {
            assert_eq!(pair[0].raw_frame.as_ptr(), pair[1].raw_frame.as_ptr());
        }
    }
}

#[test]
fn replayed_frames_at_or_below_the_cursor_are_dropped_and_counted() {
    let frames = corpus();
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    for frame in &frames[..100] {
        let _ = ingestor.ingest(Bytes::from(frame.clone()), i64::MAX / 2);
    }
    let next = ingestor.state().next_seq;
    // A reconnect re-sends 50 already-seen frames, then new ones.
    let mut fresh_events = 0;
    for frame in &frames[50..] {
        if let IngestOutcome::Events(batch) =
            ingestor.ingest(Bytes::from(frame.clone()), i64::MAX / 2)
        {
            assert!(batch[0].seq == next + fresh_events, "no gap, no reuse");
            fresh_events += batch.len() as u64;
        }
    }
    assert_eq!(ingestor.stats().duplicates_dropped, 50);
    assert_eq!(ingestor.state().next_seq, next + fresh_events);
}
