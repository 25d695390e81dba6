//! Ingest: turns upstream frames into stamped, pre-encoded [`Event`]s.
//!
//! Owns: the decode-once step, the stamps (sluice `seq`, source `time_us`, upstream seq,
//! receipt time), the drop of frames at or below the resume cursor, and the one-time
//! encoding of every wire format. Must never: assign a seq twice, let `time_us` go
//! backwards or ahead of the wall clock at receipt (unless strict increase forces it,
//! which is counted), or drop a frame without counting it.

mod thread;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::decode::{self, Body, DecodeError, DecodeLimits, DecodedFrame, Message};
use crate::event::{Event, EventKind, StampState};
use crate::upstream::client::UpstreamConfig;
use crate::wire::{jetstream_v1, jetstream_v2};

pub use thread::{start_ingest, start_ingest_with, EventSink, IngestHandle};

/// Most distinct collections counted by name; the rest are counted as `other`, so a flood
/// of made-up NSIDs cannot grow memory or metric cardinality.
pub const MAX_COUNTED_COLLECTIONS: usize = 256;

/// Counters kept by the ingestor; exported as metrics by whoever owns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Events by kind (`EventKind::as_str`).
    pub events_by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// Commit op events by collection (bounded, see [`MAX_COUNTED_COLLECTIONS`]).
    pub events_by_collection: std::collections::BTreeMap<String, u64>,
    /// Decode failures by `DecodeError::reason`.
    pub decode_errors_by_reason: std::collections::BTreeMap<&'static str, u64>,
    pub frames: u64,
    pub events: u64,
    pub decode_errors: u64,
    /// Frames at or below the resume cursor, dropped (expected after a reconnect).
    pub duplicates_dropped: u64,
    /// Frames whose seq went backwards within one connection, dropped and logged.
    pub seq_regressions: u64,
    /// Messages with no parseable source time: receipt time used instead.
    pub missing_time: u64,
    /// Source times ahead of the receipt clock, clamped.
    pub future_time_clamped: u64,
    /// Strict increase pushed `time_us` past the receipt clock (more than 1 event per µs).
    pub time_forced_ahead: u64,
    pub records_missing: u64,
    pub records_undecodable: u64,
    pub too_big_commits: u64,
    pub unknown_types: u64,
    /// Messages without the seq their type requires.
    pub missing_seq: u64,
}

/// What one frame produced.
#[derive(Debug)]
pub enum IngestOutcome {
    Events(Vec<Event>),
    /// At or below the resume cursor; dropped and counted.
    Duplicate {
        upstream_seq: i64,
    },
    /// An `#info` message: advisory, carries no seq.
    Info {
        name: String,
        message: Option<String>,
    },
    /// An error frame: the upstream ends the stream after it.
    ErrorFrame {
        error: String,
        message: Option<String>,
    },
    /// Could not be decoded; counted.
    DecodeFailed(DecodeError),
}

/// Stamps and encodes frames. Single-threaded by design: one upstream, one order.
pub struct Ingestor {
    limits: DecodeLimits,
    state: StampState,
    stats: IngestStats,
}

impl Ingestor {
    pub fn new(state: StampState, limits: DecodeLimits) -> Self {
        Self {
            limits,
            state,
            stats: IngestStats::default(),
        }
    }

    pub fn state(&self) -> StampState {
        self.state
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Forgets the upstream cursor, e.g. after the upstream answered `FutureCursor`
    /// because it numbers its events differently (another relay, or a reset one).
    pub fn reset_upstream_cursor(&mut self) {
        self.state.upstream_cursor = None;
    }

    /// Decodes, stamps and encodes one frame received at `received_us`.
    pub fn ingest(&mut self, frame: Bytes, received_us: i64) -> IngestOutcome {
        self.stats.frames += 1;
        let decoded = match decode::decode_frame(&frame, &self.limits) {
            Ok(decoded) => decoded,
            Err(err) => {
                self.stats.decode_errors += 1;
                *self
                    .stats
                    .decode_errors_by_reason
                    .entry(err.reason())
                    .or_default() += 1;
                return IngestOutcome::DecodeFailed(err);
            }
        };
        let message = match decoded {
            DecodedFrame::Error { error, message } => {
                return IngestOutcome::ErrorFrame { error, message }
            }
            DecodedFrame::Message(message) => message,
        };
        if message.t == "#info" {
            return info_outcome(&message);
        }
        let Some(upstream_seq) = message.seq else {
            self.stats.missing_seq += 1;
            return IngestOutcome::DecodeFailed(DecodeError::InvalidBody(format!(
                "{} message without seq",
                message.t
            )));
        };
        if let Some(cursor) = self.state.upstream_cursor {
            if upstream_seq <= cursor {
                self.stats.duplicates_dropped += 1;
                return IngestOutcome::Duplicate { upstream_seq };
            }
        }
        self.state.upstream_cursor = Some(upstream_seq);
        let source_us = match message.time_us {
            Some(t) => t,
            None => {
                self.stats.missing_time += 1;
                received_us
            }
        };
        let events = self.stamp(message, upstream_seq, source_us, received_us, frame);
        self.stats.events += events.len() as u64;
        for event in &events {
            *self
                .stats
                .events_by_kind
                .entry(event.kind.as_str())
                .or_default() += 1;
            if let Some(collection) = &event.collection {
                let counted = &mut self.stats.events_by_collection;
                if let Some(n) = counted.get_mut(&**collection) {
                    *n += 1;
                } else if counted.len() < MAX_COUNTED_COLLECTIONS {
                    counted.insert(collection.to_string(), 1);
                } else {
                    *counted.entry("other".to_string()).or_default() += 1;
                }
            }
        }
        IngestOutcome::Events(events)
    }

    /// Re-derives the events of a frame another node stamped (cluster followers): the
    /// same decode and encode as [`ingest`](Self::ingest), with stamps starting at
    /// `first_seq` and `first_time_us`. Ingest stamps a frame's first event at or after
    /// both its source time (clamped to receipt) and the previous `time_us` + 1, and each
    /// further op at + 1, so resuming just below `first_time_us` with the leader's
    /// `received_us` reproduces the leader's events exactly.
    pub fn restamp(
        &mut self,
        frame: Bytes,
        received_us: i64,
        first_seq: u64,
        first_time_us: i64,
    ) -> IngestOutcome {
        self.state = StampState {
            next_seq: first_seq,
            last_time_us: first_time_us.saturating_sub(1),
            upstream_cursor: None,
        };
        self.ingest(frame, received_us)
    }

    /// Records a seq that went backwards within one connection: the frame was already
    /// dropped as a duplicate, but unlike a post-reconnect overlap this is an anomaly.
    pub fn note_seq_regression(&mut self) {
        self.stats.seq_regressions += 1;
    }

    fn next_stamp(&mut self, source_us: i64, received_us: i64) -> (u64, i64) {
        let mut t = source_us;
        if t > received_us {
            self.stats.future_time_clamped += 1;
            t = received_us;
        }
        if t <= self.state.last_time_us {
            t = self.state.last_time_us + 1;
            if t > received_us {
                self.stats.time_forced_ahead += 1;
            }
        }
        self.state.last_time_us = t;
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        (seq, t)
    }

    fn stamp(
        &mut self,
        message: Message,
        upstream_seq: i64,
        source_us: i64,
        received_us: i64,
        frame: Bytes,
    ) -> Vec<Event> {
        let did = message.did.unwrap_or_default();
        // One copy of the DID for every event of the frame.
        let shared_did: Arc<str> = Arc::from(did.as_str());
        let base = |seq: u64, time_us: i64, kind: EventKind, op_index: u16| Event {
            seq,
            time_us,
            upstream_seq,
            received_us,
            kind,
            did: Arc::clone(&shared_did),
            collection: None,
            op_index,
            v1_json: None,
            v2_json: None,
            raw_frame: frame.clone(),
        };
        match message.body {
            Body::Commit(commit) if commit.too_big => {
                self.stats.too_big_commits += 1;
                let (seq, t) = self.next_stamp(source_us, received_us);
                let mut event = base(seq, t, EventKind::CommitTooBig, 0);
                event.v2_json = Some(jetstream_v2::commit_too_big(seq, t, &did, &commit).into());
                vec![event]
            }
            Body::Commit(commit) if commit.ops.is_empty() => {
                let (seq, t) = self.next_stamp(source_us, received_us);
                vec![base(seq, t, EventKind::CommitEmpty, 0)]
            }
            Body::Commit(commit) => {
                let mut events = Vec::with_capacity(commit.ops.len());
                for (index, op) in commit.ops.iter().enumerate() {
                    match op.record {
                        decode::RecordState::Missing => self.stats.records_missing += 1,
                        decode::RecordState::Undecodable => self.stats.records_undecodable += 1,
                        _ => {}
                    }
                    let (seq, t) = self.next_stamp(source_us, received_us);
                    let op_index = u16::try_from(index).unwrap_or(u16::MAX);
                    let mut event = base(seq, t, EventKind::Commit, op_index);
                    event.v1_json =
                        Some(jetstream_v1::commit_op(seq, t, &did, &commit.rev, op).into());
                    event.v2_json =
                        Some(jetstream_v2::commit_op(seq, t, &did, &commit.rev, op).into());
                    event.collection = Some(Arc::from(op.collection.as_str()));
                    events.push(event);
                }
                events
            }
            Body::Other { json } => {
                let (kind, v1_name, v2_name) = match message.t.as_str() {
                    "#identity" => (EventKind::Identity, Some("identity"), Some("identity")),
                    "#account" => (EventKind::Account, Some("account"), Some("account")),
                    "#sync" => (EventKind::Sync, None, Some("sync")),
                    _ => {
                        self.stats.unknown_types += 1;
                        (EventKind::Unknown, None, None)
                    }
                };
                let (seq, t) = self.next_stamp(source_us, received_us);
                let mut event = base(seq, t, kind, 0);
                event.v1_json =
                    v1_name.map(|name| jetstream_v1::wrapped(seq, t, &did, name, &json).into());
                event.v2_json =
                    v2_name.map(|name| jetstream_v2::wrapped(seq, t, &did, name, &json).into());
                vec![event]
            }
        }
    }
}

fn info_outcome(message: &Message) -> IngestOutcome {
    let (name, text) = match &message.body {
        Body::Other { json } => {
            let parsed: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            (
                parsed
                    .get("name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
                parsed
                    .get("message")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            )
        }
        Body::Commit(_) => (String::new(), None),
    };
    IngestOutcome::Info {
        name,
        message: text,
    }
}

/// What the ingest thread runs with: the upstream subscription and the decoder's limits.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub upstream: UpstreamConfig,
    pub decode_limits: DecodeLimits,
    /// Frames buffered between the socket and ingest; the socket is not read past it.
    pub frame_queue: usize,
    /// The ingest loop wakes at least this often when idle (liveness for the watchdog).
    pub idle_tick: Duration,
}

impl IngestConfig {
    pub fn new(upstream: UpstreamConfig) -> Self {
        Self {
            upstream,
            decode_limits: DecodeLimits::default(),
            frame_queue: 1024,
            idle_tick: Duration::from_secs(1),
        }
    }
}

/// sluice's own dictionary (`--zstd-dictionary trained`), trained on synthetic traffic:
/// deterministic, so it is the same after every restart and clients that fetched it from
/// `/zstd-dictionary` keep working. Existing v1 clients cannot decode with it: they embed
/// Jetstream's, the default.
pub fn trained_v1_dictionary() -> std::io::Result<Vec<u8>> {
    use crate::upstream::synth::{Synth, SynthOptions};
    let opts = SynthOptions {
        seed: 7,
        count: 3000,
        ..SynthOptions::default()
    };
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut samples = Vec::new();
    for frame in Synth::new(&opts) {
        if let IngestOutcome::Events(events) = ingestor.ingest(Bytes::from(frame), i64::MAX / 2) {
            samples.extend(events.into_iter().filter_map(|e| e.v1_json));
        }
    }
    crate::wire::zstd::Zstd::train(&samples, 64 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the source times and receipt clock do, stamps increase strictly and
        /// never pass the receipt clock unless strict increase leaves no choice.
        #[test]
        fn stamps_increase_and_respect_the_clock(
            steps in proptest::collection::vec((-5_000_000i64..5_000_000, 0i64..3_000, 1usize..4), 1..300)
        ) {
            let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
            let mut received = 1_700_000_000_000_000i64;
            let (mut last_seq, mut last_t) = (0u64, i64::MIN);
            for (offset, advance, ops) in steps {
                received += advance;
                for _ in 0..ops {
                    let forced_before = ingestor.stats.time_forced_ahead;
                    let (seq, t) = ingestor.next_stamp(received + offset, received);
                    prop_assert_eq!(seq, last_seq + 1);
                    prop_assert!(t > last_t);
                    if ingestor.stats.time_forced_ahead == forced_before {
                        prop_assert!(t <= received);
                    }
                    if offset <= 0 && last_t < received + offset {
                        prop_assert_eq!(t, received + offset, "an in-order past time is kept as is");
                    }
                    last_seq = seq;
                    last_t = t;
                }
            }
        }
    }
}
