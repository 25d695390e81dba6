//! The stamped event: the unit that flows from ingest to the log and the fan-out.
//!
//! Owns: the shape of an event after decoding and stamping, with every wire encoding
//! produced once. Must never: be re-encoded per subscriber; every field here is either a
//! routing key or shared bytes. Also [`StampState`], where stamping resumes: written by
//! ingest, made durable by the log, so it lives here below both.

use std::sync::Arc;

use bytes::Bytes;

/// What kind of event this is, for routing and for the wires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// One op of a `#commit`.
    Commit,
    /// A `#commit` flagged `tooBig`: consumers must resync the repo. One event per frame.
    CommitTooBig,
    /// A `#commit` with no ops: kept so the raw frame and cursor survive, invisible on v1.
    CommitEmpty,
    Identity,
    Account,
    Sync,
    /// A message type sluice does not know; carried along.
    Unknown,
}

impl EventKind {
    /// Every kind, so metrics can show each one from the first scrape.
    pub const ALL: [EventKind; 7] = [
        EventKind::Commit,
        EventKind::CommitTooBig,
        EventKind::CommitEmpty,
        EventKind::Identity,
        EventKind::Account,
        EventKind::Sync,
        EventKind::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Commit => "commit",
            EventKind::CommitTooBig => "commit_too_big",
            EventKind::CommitEmpty => "commit_empty",
            EventKind::Identity => "identity",
            EventKind::Account => "account",
            EventKind::Sync => "sync",
            EventKind::Unknown => "unknown",
        }
    }
}

/// A decoded, stamped, pre-encoded event.
#[derive(Debug, Clone)]
pub struct Event {
    /// sluice's own cursor: strictly increasing from 1, never reused, across restarts.
    pub seq: u64,
    /// Source time in unix µs: upstream `time`, made strictly increasing and never later
    /// than the wall clock at receipt.
    pub time_us: i64,
    /// The upstream relay's `seq` of the frame this event came from.
    pub upstream_seq: i64,
    /// Wall clock at receipt, unix µs.
    pub received_us: i64,
    pub kind: EventKind,
    /// Repo DID, empty when the message has none (`#info`). Shared: the events of one
    /// frame, and the events a decoded log segment holds for one DID, point at one copy
    /// (a log scan makes no string per event).
    pub did: Arc<str>,
    /// Collection NSID for commit ops, shared like `did` (one copy per collection in a
    /// decoded log segment).
    pub collection: Option<Arc<str>>,
    /// Index of this op in its frame; 0 for the first event of a frame. The raw wire sends
    /// the frame once, with the event whose `op_index` is 0.
    pub op_index: u16,
    /// Jetstream v1 JSON, when the event is visible on v1.
    pub v1_json: Option<Bytes>,
    /// Jetstream v2 message JSON (`{"$type":"message","payload":...}`), when visible on v2.
    pub v2_json: Option<Bytes>,
    /// The original upstream frame, shared (no copy) by every event of that frame.
    pub raw_frame: Bytes,
}

/// Where stamping resumes: the log keeps it durable with the events it covers, and ingest
/// is started from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StampState {
    /// The seq the next event gets (seq starts at 1).
    pub next_seq: u64,
    /// `time_us` of the last event stamped (0 if none).
    pub last_time_us: i64,
    /// The highest upstream seq ingested: frames at or below it are dropped.
    pub upstream_cursor: Option<i64>,
}

impl StampState {
    pub fn fresh() -> Self {
        Self {
            next_seq: 1,
            last_time_us: 0,
            upstream_cursor: None,
        }
    }
}
