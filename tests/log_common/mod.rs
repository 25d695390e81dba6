//! Shared helpers for the log tests: real events from the corpus, re-stamped at will.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use sluice::decode::DecodeLimits;
use sluice::event::{Event, EventKind, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::LogConfig;
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

/// Events of the real corpus frames, one Vec per frame; synthetic ones if it is absent.
pub fn template_frames() -> Vec<Vec<Event>> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    let mut out = Vec::new();
    if let Ok(frames) = read_all(&path, 8 * 1024 * 1024) {
        let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
        for f in frames {
            if let IngestOutcome::Events(events) =
                ingestor.ingest(Bytes::from(f), 1_700_000_000_000_000)
            {
                out.push(events);
            }
        }
    }
    if out.is_empty() {
        eprintln!(
            "corpus not found at {}; using synthetic events",
            path.display()
        );
        for i in 0..50u64 {
            // Pseudo-random bytes: compress about as badly as real frames' CIDs.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ i;
            let raw: Bytes = (0..2000 + (i as usize * 37) % 3000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
                .into();
            let ops = 1 + (i % 3) as u16;
            out.push(
                (0..ops)
                    .map(|op| Event {
                        seq: 0,
                        time_us: 0,
                        upstream_seq: 0,
                        received_us: 0,
                        kind: EventKind::Commit,
                        did: format!("did:plc:test{i}").into(),
                        collection: Some("app.bsky.feed.like".into()),
                        op_index: op,
                        v1_json: Some(Bytes::from(format!(
                            "{{\"kind\":\"commit\",\"i\":{i},\"op\":{op}}}"
                        ))),
                        v2_json: Some(Bytes::from(format!(
                            "{{\"$type\":\"message\",\"i\":{i},\"op\":{op}}}"
                        ))),
                        raw_frame: raw.clone(),
                    })
                    .collect(),
            );
        }
    }
    out
}

/// Produces frames of events continuing a stamp state, deterministically.
pub struct EventGen {
    templates: Vec<Vec<Event>>,
    k: usize,
    pub state: StampState,
}

impl EventGen {
    pub fn new(state: StampState) -> Self {
        Self {
            templates: template_frames(),
            k: 0,
            state,
        }
    }

    pub fn with_templates(templates: Vec<Vec<Event>>, state: StampState) -> Self {
        Self {
            templates,
            k: 0,
            state,
        }
    }

    /// The next frame: upstream seq = previous + 1 (or 1000), times 1 ms apart.
    pub fn next_frame(&mut self) -> Vec<Event> {
        let template = &self.templates[self.k % self.templates.len()];
        self.k += 1;
        let upstream = self.state.upstream_cursor.map_or(1000, |c| c + 1);
        let base_time = self.state.last_time_us.max(1_700_000_000_000_000) + 1000;
        let mut out = Vec::with_capacity(template.len());
        for (j, t) in template.iter().enumerate() {
            let mut e = t.clone();
            e.seq = self.state.next_seq;
            e.time_us = base_time + j as i64;
            e.upstream_seq = upstream;
            e.received_us = base_time;
            e.op_index = j as u16;
            self.state.next_seq += 1;
            self.state.last_time_us = e.time_us;
            out.push(e);
        }
        self.state.upstream_cursor = Some(upstream);
        out
    }

    /// Appends `frames` fresh frames to `store`, ten per commit; every event appended, in
    /// order.
    pub fn append_frames(
        &mut self,
        store: &impl sluice::log::EventStore,
        frames: usize,
    ) -> Vec<Event> {
        let mut all = Vec::new();
        for _ in 0..frames / 10 {
            let batch: Vec<sluice::log::SharedEvent> = (0..10)
                .flat_map(|_| self.next_frame())
                .map(sluice::log::SharedEvent::new)
                .collect();
            store.append(&batch, self.state).unwrap();
            all.extend(batch.iter().map(|e| (**e).clone()));
        }
        all
    }
}

pub fn test_config(dir: &std::path::Path) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.commit_interval = Duration::from_millis(5);
    c.max_journal_bytes = 24 * 1024 * 1024;
    c.blob_file_bytes = 1024 * 1024;
    c.segment_target_bytes = 64 * 1024;
    c
}

/// Same content (payloads compared only where both sides carry them).
pub fn assert_same(a: &Event, b: &Event) {
    assert_eq!(a.seq, b.seq);
    assert_eq!(a.time_us, b.time_us, "time of seq {}", a.seq);
    assert_eq!(a.upstream_seq, b.upstream_seq, "upstream of seq {}", a.seq);
    assert_eq!(a.received_us, b.received_us);
    assert_eq!(a.kind, b.kind);
    assert_eq!(a.did, b.did);
    assert_eq!(a.collection, b.collection);
    assert_eq!(a.op_index, b.op_index);
    assert_eq!(a.v1_json, b.v1_json, "v1 of seq {}", a.seq);
    assert_eq!(a.v2_json, b.v2_json, "v2 of seq {}", a.seq);
    assert_eq!(a.raw_frame, b.raw_frame, "raw of seq {}", a.seq);
}
