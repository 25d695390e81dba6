//! Jetstream v2 (`network.bsky.jetstream.subscribeEvents`, proposal 0015 `xrpc.v1.json`
//! framing): `{"$type":"message","payload":{"$type":"...#commit", seq, did, time, ...}}`.
//!
//! Owns the byte layout of v2 message frames. `seq` is sluice's own seq; `time` is the
//! event's source time with µs precision. Must never put anything but `message` or
//! `error` in the envelope `$type`.

use super::json::{push_key, push_str, push_time_us, push_u64};
use super::Frame;
use crate::decode::{Commit, Op};

const NSID: &str = "network.bsky.jetstream.subscribeEvents";

/// Opens a v2 message: `{"$type":"message","payload":{"$type":"...#<def>","seq":..,"did":..,"time":..`
/// (the log assembles stored events' messages with it too).
pub fn open(out: &mut Vec<u8>, def: &str, seq: u64, time_us: i64, did: &str) {
    out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
    out.extend_from_slice(NSID.as_bytes());
    out.push(b'#');
    out.extend_from_slice(def.as_bytes());
    out.extend_from_slice(b"\",");
    push_key(out, "seq");
    push_u64(out, seq);
    out.push(b',');
    push_key(out, "did");
    push_str(out, did);
    out.push(b',');
    push_key(out, "time");
    push_time_us(out, time_us);
}

/// A `#commit` message for one op.
pub fn commit_op(seq: u64, time_us: i64, did: &str, rev: &str, op: &Op) -> Vec<u8> {
    let mut out = Vec::with_capacity(commit_op_capacity(did, rev, op));
    open(&mut out, "commit", seq, time_us, did);
    out.push(b',');
    super::jetstream_v1::push_op_fields(&mut out, rev, op);
    out.extend_from_slice(b"}}");
    out
}

/// What [`commit_op`] allocates: the envelope (`{"$type":"message","payload":{"$type":
/// "network.bsky.jetstream.subscribeEvents#commit","seq":..,"did":"..","time":"..",` and
/// `}}`, at most 176 bytes besides the DID) and the op's fields, so an event without escapes
/// is written without growing its buffer.
pub(crate) fn commit_op_capacity(did: &str, rev: &str, op: &Op) -> usize {
    176 + did.len() + super::jetstream_v1::op_fields_len(rev, op)
}

/// `#identity`, `#account` and `#sync`: the upstream body wrapped verbatim under its kind.
pub fn wrapped(seq: u64, time_us: i64, did: &str, kind: &str, body_json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + did.len() + body_json.len());
    open(&mut out, kind, seq, time_us, did);
    out.push(b',');
    push_key(&mut out, kind);
    out.extend_from_slice(body_json.as_bytes());
    out.extend_from_slice(b"}}");
    out
}

/// A `tooBig` commit: the records are not available, so the consumer must resync the
/// repo. Carries the rev and every op path so the consumer knows what changed.
pub fn commit_too_big(seq: u64, time_us: i64, did: &str, commit: &Commit) -> Vec<u8> {
    let mut out = Vec::with_capacity(192 + did.len() + commit.ops.len() * 64);
    open(&mut out, "tooBig", seq, time_us, did);
    out.push(b',');
    push_key(&mut out, "rev");
    push_str(&mut out, &commit.rev);
    out.push(b',');
    push_key(&mut out, "ops");
    out.push(b'[');
    for (i, op) in commit.ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        push_key(&mut out, "operation");
        push_str(&mut out, op.action.as_str());
        out.push(b',');
        push_key(&mut out, "path");
        let path = format!("{}/{}", op.collection, op.rkey);
        push_str(&mut out, &path);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}}");
    out
}

/// An `#info` message: `name` says what happened, `message` says it to a person.
pub fn info(name: &str, message: &str) -> Frame {
    let mut out = Vec::with_capacity(128 + message.len());
    out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
    out.extend_from_slice(NSID.as_bytes());
    out.extend_from_slice(b"#info\",");
    push_key(&mut out, "name");
    push_str(&mut out, name);
    out.push(b',');
    push_key(&mut out, "message");
    push_str(&mut out, message);
    out.extend_from_slice(b"}}");
    Frame::Text(out.into())
}

/// An error message; the stream ends after it.
pub fn error_frame(error: &str, message: &str) -> Frame {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"{\"$type\":\"error\",");
    push_key(&mut out, "error");
    push_str(&mut out, error);
    out.push(b',');
    push_key(&mut out, "message");
    push_str(&mut out, message);
    out.push(b'}');
    Frame::Text(out.into())
}
