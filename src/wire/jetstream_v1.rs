//! Jetstream v1 JSON (`/subscribe`): one event per repo op, `{did, time_us, kind, ...}`.
//! Pure functions: bytes in, bytes out.
//!
//! Owns the byte layout of v1 events and of sluice's `EventTooBig` notice. sluice adds
//! `cursor` (its own seq) beside `time_us` so clients can resume exactly; clients that
//! ignore unknown fields are unaffected. The endpoint and its parameters are
//! `http::subscribe::jetstream_v1`. Must never emit kinds other than `commit`, `identity`
//! and `account` as events (strict v1 clients reject unknown kinds); the notice goes only
//! to clients that asked for notices.

use super::json::{push_i64, push_key, push_str, push_u64};
use crate::decode::{Op, RecordState};

/// Opens a v1 event: `{"did":..,"time_us":..,"cursor":..,"kind":..,` (every v1 message,
/// notices and the Redis sink's events included, starts this way).
pub fn open(out: &mut Vec<u8>, did: &str, time_us: i64, seq: u64, kind: &str) {
    out.push(b'{');
    push_key(out, "did");
    push_str(out, did);
    out.push(b',');
    push_key(out, "time_us");
    push_i64(out, time_us);
    out.push(b',');
    push_key(out, "cursor");
    push_u64(out, seq);
    out.push(b',');
    push_key(out, "kind");
    push_str(out, kind);
    out.push(b',');
}

/// A commit op event.
pub fn commit_op(seq: u64, time_us: i64, did: &str, rev: &str, op: &Op) -> Vec<u8> {
    let record_len = match &op.record {
        RecordState::Json(json) => json.len(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(192 + record_len + did.len() + op.collection.len());
    open(&mut out, did, time_us, seq, "commit");
    push_key(&mut out, "commit");
    out.push(b'{');
    push_op_fields(&mut out, rev, op);
    out.extend_from_slice(b"}}");
    out
}

/// `rev, operation, collection, rkey[, record | recordMissing | recordUndecodable][, cid]`
/// of a commit op: the same fields on the v1 and v2 wires.
pub(crate) fn push_op_fields(out: &mut Vec<u8>, rev: &str, op: &Op) {
    push_key(out, "rev");
    push_str(out, rev);
    out.push(b',');
    push_key(out, "operation");
    push_str(out, op.action.as_str());
    out.push(b',');
    push_key(out, "collection");
    push_str(out, &op.collection);
    out.push(b',');
    push_key(out, "rkey");
    push_str(out, &op.rkey);
    push_record_fields(out, op);
}

/// The `record`/`cid` fields of a commit op: a record that was expected but could not be
/// produced is marked rather than silently absent.
fn push_record_fields(out: &mut Vec<u8>, op: &Op) {
    match &op.record {
        RecordState::Json(json) => {
            out.push(b',');
            push_key(out, "record");
            out.extend_from_slice(json.as_bytes());
        }
        RecordState::Missing => {
            out.push(b',');
            push_key(out, "recordMissing");
            out.extend_from_slice(b"true");
        }
        RecordState::Undecodable => {
            out.push(b',');
            push_key(out, "recordUndecodable");
            out.extend_from_slice(b"true");
        }
        RecordState::None => {}
    }
    if let Some(cid) = &op.cid {
        out.push(b',');
        push_key(out, "cid");
        push_str(out, cid);
    }
}

/// An `identity` or `account` event wrapping the upstream body verbatim.
pub fn wrapped(seq: u64, time_us: i64, did: &str, kind: &str, body_json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + did.len() + body_json.len());
    open(&mut out, did, time_us, seq, kind);
    push_key(&mut out, kind);
    out.extend_from_slice(body_json.as_bytes());
    out.push(b'}');
    out
}

/// sluice's notice that an event was over a subscriber's `maxMessageSizeBytes`: where to
/// fetch it instead. In the envelope of a v1 event (`kind: "notice"`) so v1 clients that
/// skip unknown kinds skip it.
pub fn too_big_notice(seq: u64, time_us: i64, did: &str, size: usize, limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    open(&mut out, did, time_us, seq, "notice");
    out.extend_from_slice(b"\"notice\":{\"name\":\"EventTooBig\",");
    push_key(&mut out, "size");
    push_u64(&mut out, size as u64);
    out.push(b',');
    push_key(&mut out, "limit");
    push_u64(&mut out, limit as u64);
    out.push(b',');
    push_key(&mut out, "fetch");
    push_str(&mut out, &format!("/event/{seq}?wire=v1"));
    out.extend_from_slice(b"}}");
    out
}
