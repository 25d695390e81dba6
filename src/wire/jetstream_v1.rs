//! Jetstream v1 JSON (`/subscribe`): one event per repo op, `{did, time_us, kind, ...}`.
//!
//! Owns the byte layout of v1 events. sluice adds `cursor` (its own seq) beside `time_us`
//! so clients can resume exactly; clients that ignore unknown fields are unaffected.
//! Must never emit kinds other than `commit`, `identity` and `account`: strict v1 clients
//! reject unknown kinds.

use super::json::{push_i64, push_key, push_str, push_u64};
use crate::decode::{Op, RecordState};

fn open(out: &mut Vec<u8>, did: &str, time_us: i64, seq: u64, kind: &str) {
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
    push_key(&mut out, "rev");
    push_str(&mut out, rev);
    out.push(b',');
    push_key(&mut out, "operation");
    push_str(&mut out, op.action.as_str());
    out.push(b',');
    push_key(&mut out, "collection");
    push_str(&mut out, &op.collection);
    out.push(b',');
    push_key(&mut out, "rkey");
    push_str(&mut out, &op.rkey);
    push_record_fields(&mut out, op);
    out.extend_from_slice(b"}}");
    out
}

/// The `record`/`cid` fields of a commit op, shared with the v2 wire: a record that was
/// expected but could not be produced is marked rather than silently absent.
pub(crate) fn push_record_fields(out: &mut Vec<u8>, op: &Op) {
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
