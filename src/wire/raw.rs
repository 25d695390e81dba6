//! Raw `com.atproto.sync.subscribeRepos` passthrough: the upstream frames byte for byte.
//!
//! Owns which events carry a frame on the raw wire. Must never re-encode a frame: the raw
//! wire's promise is rainbow compatibility, so the bytes are exactly what the relay sent.

use bytes::Bytes;

use super::Frame;
use crate::event::Event;

/// The raw wire's one rule: each upstream frame goes out once. A frame with several ops
/// becomes several events that share it (and `upstream_seq`), and a subscriber gets the
/// frame with the first of those events it is shown: the first op for an unfiltered
/// subscriber, the first matching op for one filtered by collection. Fan-out keeps one
/// of these per raw subscriber, on the live path and in catch-up alike.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameOnce {
    /// The upstream seq of the last frame sent.
    last_sent: Option<i64>,
}

impl FrameOnce {
    /// Whether `event` brings a frame not yet sent (then it counts as sent): false for a
    /// later event of the frame last sent, and for an event without a frame.
    pub fn first_sight(&mut self, event: &Event) -> bool {
        if event.raw_frame.is_empty() || self.last_sent == Some(event.upstream_seq) {
            return false;
        }
        self.last_sent = Some(event.upstream_seq);
        true
    }

    /// Records that `event`'s frame was sent (by whoever decided it first).
    pub fn sent(&mut self, event: &Event) {
        if !event.raw_frame.is_empty() {
            self.last_sent = Some(event.upstream_seq);
        }
    }
}

/// The frame `event` carries as the first event of its frame (`op_index` 0, as ingest
/// numbers them): how a complete run of logged events is read back into its frames.
/// What a subscriber is sent is decided by [`FrameOnce`].
pub fn frame_of(event: &Event) -> Option<&Bytes> {
    (event.op_index == 0).then_some(&event.raw_frame)
}

/// A `subscribeRepos` frame: CBOR header then CBOR body, built from JSON (rare frames only).
/// `None`, logged, if either part cannot be encoded (only strings and small integers go in,
/// so this is a bug, never client input): a frame with a header and no body would be worse
/// than no frame.
fn cbor_frame(header: serde_json::Value, body: serde_json::Value) -> Option<Frame> {
    use crate::decode::dagcbor_encode::encode_dag_cbor;
    match (encode_dag_cbor(&header), encode_dag_cbor(&body)) {
        (Ok(mut out), Ok(body)) => {
            out.extend(body);
            Some(Frame::Binary(out.into()))
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, %header, %body, "cannot encode a raw-wire control frame; not sent");
            None
        }
    }
}

/// `#info` frame.
pub fn info_frame(name: &str, message: &str) -> Option<Frame> {
    cbor_frame(
        serde_json::json!({"op": 1, "t": "#info"}),
        serde_json::json!({"name": name, "message": message}),
    )
}

/// Error frame (`op: -1`); the stream ends after it.
pub fn error_frame(error: &str, message: &str) -> Option<Frame> {
    cbor_frame(
        serde_json::json!({"op": -1}),
        serde_json::json!({"error": error, "message": message}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn event(upstream_seq: i64, op_index: u16, frame: &'static [u8]) -> Event {
        Event {
            seq: 0,
            time_us: 0,
            upstream_seq,
            received_us: 0,
            kind: EventKind::Commit,
            did: "did:plc:aa".into(),
            collection: Some("app.bsky.feed.like".into()),
            op_index,
            v1_json: None,
            v2_json: None,
            raw_frame: Bytes::from_static(frame),
        }
    }

    #[test]
    fn each_frame_goes_out_with_the_first_of_its_events_shown() {
        let mut once = FrameOnce::default();
        // Unfiltered: every op of frame 10, then frame 11.
        let shown = [event(10, 0, b"a"), event(10, 1, b"a"), event(10, 2, b"a")];
        let sent: Vec<bool> = shown.iter().map(|e| once.first_sight(e)).collect();
        assert_eq!(sent, [true, false, false]);
        // Filtered by collection: the first op shown is op 1; it carries frame 11.
        assert!(once.first_sight(&event(11, 1, b"b")));
        assert!(!once.first_sight(&event(11, 2, b"b")));
        // An event without a frame is never sent and does not count as one.
        assert!(!once.first_sight(&event(12, 0, b"")));
        assert!(once.first_sight(&event(12, 1, b"c")));
    }

    #[test]
    fn a_frame_recorded_as_sent_is_not_sent_again() {
        let mut once = FrameOnce::default();
        once.sent(&event(20, 0, b"x"));
        assert!(!once.first_sight(&event(20, 1, b"x")));
        assert!(once.first_sight(&event(21, 0, b"y")));
        // Recording an event without a frame changes nothing.
        once.sent(&event(22, 0, b""));
        assert!(!once.first_sight(&event(21, 1, b"y")));
    }
}
