//! Raw `com.atproto.sync.subscribeRepos` passthrough: the upstream frames byte for byte.
//!
//! Owns which events carry a frame on the raw wire. Must never re-encode a frame: the raw
//! wire's promise is rainbow compatibility, so the bytes are exactly what the relay sent.

use crate::event::Event;

/// The frame to send for this event, if any: a frame with several ops becomes several
/// events, and only the first of them carries the frame.
pub fn frame_of(event: &Event) -> Option<&bytes::Bytes> {
    (event.op_index == 0).then_some(&event.raw_frame)
}
