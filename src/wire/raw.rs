//! Raw `com.atproto.sync.subscribeRepos` passthrough: the upstream frames byte for byte.
//!
//! Owns which events carry a frame on the raw wire. Must never re-encode a frame: the raw
//! wire's promise is rainbow compatibility, so the bytes are exactly what the relay sent.

use super::Frame;
use crate::event::Event;

/// The frame to send for this event, if any: a frame with several ops becomes several
/// events, and only the first of them carries the frame.
pub fn frame_of(event: &Event) -> Option<&bytes::Bytes> {
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
