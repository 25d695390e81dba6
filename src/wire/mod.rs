//! Wire formats: the bytes subscribers receive, built by pure functions (no I/O, no
//! state), one file per wire. The HTTP endpoints that speak them live in
//! `http::subscribe`.
//!
//! Owns the byte layout of every message, the [`Frame`] a message goes out as, and
//! [`WireKind`], everything known about a wire by name (its label, its query value, its
//! content type, which event bytes it carries). Must never be invoked per subscriber: each
//! event is encoded once, at ingest, and compressed at most once per compression scheme
//! (`zstd`), whoever needs it first; must never import anything above the event.

pub mod jetstream_v1;
pub mod jetstream_v2;
pub mod json;
pub mod raw;
pub mod zstd;

use bytes::Bytes;

use crate::event::Event;

/// One data message for a subscriber. The payload is shared (a refcount, never a copy);
/// the frame header is written per subscriber because its length encoding is all it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// UTF-8 by construction: every text payload is built by the wires' JSON writers from
    /// `str`s, and events read back from the log are checksummed, so no per-subscriber
    /// validation is done.
    Text(Bytes),
    Binary(Bytes),
}

impl Frame {
    pub fn payload(&self) -> &Bytes {
        match self {
            Frame::Text(b) | Frame::Binary(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.payload().len()
    }

    pub fn is_empty(&self) -> bool {
        self.payload().is_empty()
    }
}

/// The wire a subscriber speaks: decides which payload it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireKind {
    JetstreamV1,
    JetstreamV2,
    Raw,
}

impl WireKind {
    /// Every wire, in [`WireKind::index`] order: per-wire counters are arrays of this size
    /// and metrics show each wire from the first scrape.
    pub const ALL: [WireKind; 3] = [WireKind::JetstreamV1, WireKind::JetstreamV2, WireKind::Raw];

    /// Position of this wire in per-wire counter arrays.
    pub fn index(self) -> usize {
        match self {
            WireKind::JetstreamV1 => 0,
            WireKind::JetstreamV2 => 1,
            WireKind::Raw => 2,
        }
    }

    /// The metric label and log name.
    pub fn as_str(self) -> &'static str {
        match self {
            WireKind::JetstreamV1 => "jetstream_v1",
            WireKind::JetstreamV2 => "jetstream_v2",
            WireKind::Raw => "raw",
        }
    }

    /// The wire named by a query value (`/event/{seq}?wire=v1|v2|raw`).
    pub fn from_query(value: &str) -> Result<Self, String> {
        match value {
            "v1" => Ok(WireKind::JetstreamV1),
            "v2" => Ok(WireKind::JetstreamV2),
            "raw" => Ok(WireKind::Raw),
            other => Err(format!("wire must be v1, v2 or raw, not {other:?}")),
        }
    }

    /// The HTTP content type of one message of this wire.
    pub fn content_type(self) -> &'static str {
        match self {
            WireKind::JetstreamV1 | WireKind::JetstreamV2 => "application/json",
            WireKind::Raw => "application/vnd.ipld.dag-cbor",
        }
    }

    /// The bytes this wire carries for the event, when it carries the event at all.
    pub fn payload(self, event: &Event) -> Option<&Bytes> {
        match self {
            WireKind::JetstreamV1 => event.v1_json.as_ref(),
            WireKind::JetstreamV2 => event.v2_json.as_ref(),
            WireKind::Raw => (!event.raw_frame.is_empty()).then_some(&event.raw_frame),
        }
    }
}
