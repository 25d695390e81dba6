//! Decoding of `com.atproto.sync.subscribeRepos` frames.
//!
//! Owns: turning one binary websocket message (two DAG-CBOR values: header, body) into a
//! [`DecodedFrame`], including the CARv1 `blocks` of a commit and the conversion of each
//! op's record to the atproto JSON data model.
//!
//! Must never: panic on any input, allocate a length declared by the input before the
//! bytes are there, recurse without a depth limit, or take more than linear time. Every
//! failure is a [`DecodeError`] with a stable `reason()` that callers count.

mod types;

pub use types::*;

/// Decodes one upstream frame (header and body).
pub fn decode_frame(frame: &[u8], limits: &DecodeLimits) -> Result<DecodedFrame, DecodeError> {
    let _ = (frame, limits);
    Err(DecodeError::InvalidCbor("decoder not built yet"))
}
