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
    let mut out = Vec::with_capacity(commit_op_capacity(did, rev, op));
    open(&mut out, did, time_us, seq, "commit");
    push_key(&mut out, "commit");
    out.push(b'{');
    push_op_fields(&mut out, rev, op);
    out.extend_from_slice(b"}}");
    out
}

/// What [`commit_op`] allocates: its envelope and [`op_fields_len`], so that an event
/// without escapes is written without growing its buffer (the old estimate left out the
/// rev, rkey and CID and regrew most events once, a copy and a realloc per event).
pub(crate) fn commit_op_capacity(did: &str, rev: &str, op: &Op) -> usize {
    // `{"did":"..","time_us":..,"cursor":..,"kind":"commit","commit":{` and `}}`, with
    // 20 digits for each number.
    112 + did.len() + op_fields_len(rev, op)
}

/// The length of [`push_op_fields`]' output when no string needs escaping (an escape
/// grows the buffer as usual).
pub(crate) fn op_fields_len(rev: &str, op: &Op) -> usize {
    let record = match &op.record {
        RecordState::Json(json) => json.len(),
        _ => 0,
    };
    // The keys, quotes and commas (at most 96 with `recordUndecodable`), then the values.
    96 + rev.len()
        + op.action.as_str().len()
        + op.collection.len()
        + op.rkey.len()
        + record
        + op.cid.as_ref().map_or(0, String::len)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Action;
    use crate::wire::jetstream_v2;

    /// Each op shape at the longest envelope (20-digit numbers, a year of more than four
    /// digits on v2): both wires write it without growing the buffer they allocated.
    #[test]
    fn a_commit_op_is_written_in_the_buffer_it_allocated() {
        let record = r#"{"$type":"app.bsky.feed.post","text":"hello","createdAt":"2026-07-04T00:00:00.000Z"}"#;
        let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
        let op = |action, record: RecordState, cid: Option<&str>| Op {
            action,
            collection: "app.bsky.feed.post".repeat(17),
            rkey: "3l4qkq7zq2k2a".repeat(39),
            cid: cid.map(str::to_string),
            prev: cid.map(str::to_string),
            record,
        };
        let ops = [
            op(Action::Create, RecordState::Json(record.into()), Some(cid)),
            op(Action::Update, RecordState::Undecodable, Some(cid)),
            op(Action::Create, RecordState::Missing, Some(cid)),
            op(Action::Delete, RecordState::None, None),
        ];
        let did = format!("did:plc:{}", "a".repeat(2040));
        let rev = "3l4qkq7zq2k2a";
        for op in &ops {
            for (seq, time_us) in [
                (1, 1_700_000_000_000_000),
                (u64::MAX, i64::MIN),
                (u64::MAX, i64::MAX),
            ] {
                let v1 = commit_op(seq, time_us, &did, rev, op);
                assert_eq!(
                    v1.capacity(),
                    commit_op_capacity(&did, rev, op),
                    "v1 {op:?}"
                );
                let v2 = jetstream_v2::commit_op(seq, time_us, &did, rev, op);
                assert_eq!(
                    v2.capacity(),
                    jetstream_v2::commit_op_capacity(&did, rev, op),
                    "v2 {op:?}"
                );
            }
        }
    }
}
