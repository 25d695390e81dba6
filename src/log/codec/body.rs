//! What a stored event's JSON is built from, and building it back.
//!
//! Owns: splitting an event's v1 and v2 JSON into what they share (a commit op's fields,
//! an identity/account/sync body, a `tooBig` summary) and what the event's own fields
//! (seq, time, DID, kind, collection) already say, and assembling both wires' bytes from
//! those parts on read. Must never: store or return bytes that differ from what ingest
//! produced (every split is checked by assembling it again at encode time; an event that
//! does not split exactly is stored verbatim), or panic on stored bytes.

use crate::event::{Event, EventKind};
use crate::wire::json::push_str;
use crate::wire::{jetstream_v1, jetstream_v2};

/// The base32-sortable alphabet of TIDs (atproto spec).
const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
/// RFC 4648 base32, lower case: multibase `b`, what CIDv1 strings use.
const B32_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// How a commit op's record appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPart {
    Json,
    Missing,
    Undecodable,
    None,
}

/// A commit op's fields, shared by the v1 and v2 messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitParts<'a> {
    pub rev: &'a [u8],
    /// 0 create, 1 update, 2 delete.
    pub action: u8,
    pub rkey: &'a [u8],
    pub record: RecordPart,
    /// The record JSON when `record` is `Json`.
    pub record_json: &'a [u8],
    pub cid: Option<&'a [u8]>,
}

/// What an event's JSON is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split<'a> {
    /// Neither wire shows the event.
    Nothing,
    /// A commit op: both wires, built from the parts and the collection.
    Commit(CommitParts<'a>),
    /// `#identity` / `#account` (both wires) or `#sync` (v2 only): the body, verbatim.
    Wrapped { v1: bool, body: &'a [u8] },
    /// A `tooBig` commit (v2 only): the fields after the envelope.
    TooBig { tail: &'a [u8] },
    /// Stored as given.
    Verbatim {
        v1: Option<&'a [u8]>,
        v2: Option<&'a [u8]>,
    },
}

const ACTIONS: [&str; 3] = ["create", "update", "delete"];

/// The v1 and v2 JSON of `event` split into shared parts, checked by assembling them again
/// into `scratch`. Falls back to [`Split::Verbatim`] whenever the split is not exact.
pub fn split<'a>(event: &'a Event, scratch: &mut Vec<u8>) -> Split<'a> {
    let v1 = event.v1_json.as_deref();
    let v2 = event.v2_json.as_deref();
    let verbatim = Split::Verbatim { v1, v2 };
    let candidate = match (event.kind, v1, v2) {
        (_, None, None) => return Split::Nothing,
        (EventKind::Commit, Some(_), Some(v2)) => {
            match commit_fields(event, v2, scratch).and_then(parse_commit_fields) {
                Some(parts) => Split::Commit(parts),
                None => return verbatim,
            }
        }
        (EventKind::Identity | EventKind::Account | EventKind::Sync, _, Some(v2)) => {
            let Some(name) = wrapped_name(event.kind) else {
                return verbatim;
            };
            scratch.clear();
            jetstream_v2::open(scratch, name, event.seq, event.time_us, &event.did);
            scratch.extend_from_slice(b",\"");
            scratch.extend_from_slice(name.as_bytes());
            scratch.extend_from_slice(b"\":");
            match v2
                .strip_prefix(scratch.as_slice())
                .and_then(|b| b.strip_suffix(b"}}"))
            {
                Some(body) => Split::Wrapped {
                    v1: v1.is_some(),
                    body,
                },
                None => return verbatim,
            }
        }
        (EventKind::CommitTooBig, None, Some(v2)) => {
            scratch.clear();
            jetstream_v2::open(scratch, "tooBig", event.seq, event.time_us, &event.did);
            scratch.push(b',');
            match v2
                .strip_prefix(scratch.as_slice())
                .and_then(|b| b.strip_suffix(b"}}"))
            {
                Some(tail) => Split::TooBig { tail },
                None => return verbatim,
            }
        }
        _ => return verbatim,
    };
    // The check: both wires assembled from the split equal what ingest made.
    let same = |wire_v1: bool, want: Option<&[u8]>, scratch: &mut Vec<u8>| {
        scratch.clear();
        let built = assemble(event, &event.did, &candidate, wire_v1, scratch);
        match (built, want) {
            (true, Some(w)) => scratch.as_slice() == w,
            (false, None) => true,
            _ => false,
        }
    };
    if same(true, v1, scratch) && same(false, v2, scratch) {
        candidate
    } else {
        verbatim
    }
}

fn wrapped_name(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::Identity => Some("identity"),
        EventKind::Account => Some("account"),
        EventKind::Sync => Some("sync"),
        _ => None,
    }
}

/// The commit op fields of a v2 commit message: what follows its envelope.
fn commit_fields<'a>(event: &Event, v2: &'a [u8], scratch: &mut Vec<u8>) -> Option<&'a [u8]> {
    scratch.clear();
    jetstream_v2::open(scratch, "commit", event.seq, event.time_us, &event.did);
    scratch.push(b',');
    v2.strip_prefix(scratch.as_slice())?.strip_suffix(b"}}")
}

/// Reads a JSON string's contents (escapes kept) up to its closing quote; returns the
/// contents and what follows the quote.
fn string_token(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some((&b[..i], &b[i + 1..])),
            _ => i += 1,
        }
    }
    None
}

fn parse_commit_fields(f: &[u8]) -> Option<CommitParts<'_>> {
    let rest = f.strip_prefix(b"\"rev\":\"")?;
    let (rev, rest) = string_token(rest)?;
    let rest = rest.strip_prefix(b",\"operation\":\"")?;
    let (action, rest) = string_token(rest)?;
    let action = ACTIONS.iter().position(|a| a.as_bytes() == action)? as u8;
    let rest = rest.strip_prefix(b",\"collection\":\"")?;
    // The collection is the event's own (checked when the split is assembled again).
    let (_, rest) = string_token(rest)?;
    let rest = rest.strip_prefix(b",\"rkey\":\"")?;
    let (rkey, rest) = string_token(rest)?;
    // What is left: the record part, then the cid part, each optional.
    let (body, cid) = match rest.strip_suffix(b"\"") {
        Some(before_quote) => {
            const CID_KEY: &[u8] = b",\"cid\":\"";
            let at = before_quote
                .windows(CID_KEY.len())
                .rposition(|w| w == CID_KEY)?;
            let cid = &before_quote[at + CID_KEY.len()..];
            if cid.iter().any(|&c| c == b'"' || c == b'\\') {
                return None;
            }
            (&rest[..at], Some(cid))
        }
        None => (rest, None),
    };
    let (record, record_json) = if body.is_empty() {
        (RecordPart::None, &body[..0])
    } else if body == b",\"recordMissing\":true" {
        (RecordPart::Missing, &body[..0])
    } else if body == b",\"recordUndecodable\":true" {
        (RecordPart::Undecodable, &body[..0])
    } else {
        (RecordPart::Json, body.strip_prefix(b",\"record\":")?)
    };
    Some(CommitParts {
        rev,
        action,
        rkey,
        record,
        record_json,
        cid,
    })
}

/// Appends one wire's JSON of `event` as stored in `split` to `out`; false when that wire
/// does not show the event. `did` is the event's DID (passed apart so a reader can use a
/// segment's shared DID table).
pub fn assemble(event: &Event, did: &str, split: &Split<'_>, v1: bool, out: &mut Vec<u8>) -> bool {
    match *split {
        Split::Nothing => false,
        Split::Verbatim { v1: a, v2: b } => match if v1 { a } else { b } {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                true
            }
            None => false,
        },
        Split::Commit(parts) => {
            let collection = event.collection.as_deref().unwrap_or("");
            if v1 {
                jetstream_v1::open(out, did, event.time_us, event.seq, "commit");
                out.extend_from_slice(b"\"commit\":{");
            } else {
                jetstream_v2::open(out, "commit", event.seq, event.time_us, did);
                out.push(b',');
            }
            push_commit_fields(out, collection, &parts);
            out.extend_from_slice(b"}}");
            true
        }
        Split::Wrapped { v1: has_v1, body } => {
            let Some(name) = wrapped_name(event.kind) else {
                return false;
            };
            if v1 {
                if !has_v1 {
                    return false;
                }
                jetstream_v1::open(out, did, event.time_us, event.seq, name);
            } else {
                jetstream_v2::open(out, name, event.seq, event.time_us, did);
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(body);
            out.extend_from_slice(if v1 { b"}" } else { b"}}" });
            true
        }
        Split::TooBig { tail } => {
            if v1 {
                return false;
            }
            jetstream_v2::open(out, "tooBig", event.seq, event.time_us, did);
            out.push(b',');
            out.extend_from_slice(tail);
            out.extend_from_slice(b"}}");
            true
        }
    }
}

fn push_commit_fields(out: &mut Vec<u8>, collection: &str, p: &CommitParts<'_>) {
    out.extend_from_slice(b"\"rev\":\"");
    out.extend_from_slice(p.rev);
    out.extend_from_slice(b"\",\"operation\":\"");
    out.extend_from_slice(ACTIONS[usize::from(p.action.min(2))].as_bytes());
    out.extend_from_slice(b"\",\"collection\":");
    push_str(out, collection);
    out.extend_from_slice(b",\"rkey\":\"");
    out.extend_from_slice(p.rkey);
    out.push(b'"');
    match p.record {
        RecordPart::Json => {
            out.extend_from_slice(b",\"record\":");
            out.extend_from_slice(p.record_json);
        }
        RecordPart::Missing => out.extend_from_slice(b",\"recordMissing\":true"),
        RecordPart::Undecodable => out.extend_from_slice(b",\"recordUndecodable\":true"),
        RecordPart::None => {}
    }
    if let Some(cid) = p.cid {
        out.extend_from_slice(b",\"cid\":\"");
        out.extend_from_slice(cid);
        out.push(b'"');
    }
}

/// A TID's integer, when `s` is one (13 characters, first at most `j`).
pub fn tid_value(s: &[u8]) -> Option<u64> {
    if s.len() != 13 {
        return None;
    }
    let mut v = 0u64;
    for (i, &c) in s.iter().enumerate() {
        let d = TID_ALPHABET.iter().position(|&a| a == c)? as u64;
        if i == 0 && d >= 16 {
            return None;
        }
        v = (v << 5) | d;
    }
    Some(v)
}

/// Appends the TID of `v` (the inverse of [`tid_value`]).
pub fn push_tid(out: &mut Vec<u8>, v: u64) {
    let mut tid = [0u8; 13];
    for (i, c) in tid.iter_mut().enumerate() {
        *c = TID_ALPHABET[((v >> (5 * (12 - i))) & 31) as usize];
    }
    out.extend_from_slice(&tid);
}

fn b32_digit(c: u8) -> Option<u32> {
    match c {
        b'a'..=b'z' => Some(u32::from(c - b'a')),
        b'2'..=b'7' => Some(u32::from(c - b'2') + 26),
        _ => None,
    }
}

/// The bytes of a multibase base32 (`b`) string, appended to `out`; false (and `out`
/// unchanged) unless the string is exactly what [`push_cid`] would write back.
pub fn cid_bytes(s: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(digits) = s.strip_prefix(b"b") else {
        return false;
    };
    let start = out.len();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in digits {
        let Some(d) = b32_digit(c) else {
            out.truncate(start);
            return false;
        };
        acc = (acc << 5) | d;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Canonical only: leftover bits are zero and fewer than a whole character.
    if acc != 0 || bits >= 5 || out.len() - start > 255 {
        out.truncate(start);
        return false;
    }
    true
}

/// Appends `bytes` as a multibase base32 string (`b` + lower-case RFC 4648, no padding).
pub fn push_cid(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(1 + (bytes.len() * 8).div_ceil(5));
    out.push(b'b');
    // Whole groups of 5 bytes are 8 characters, written at once.
    let mut groups = bytes.chunks_exact(5);
    for g in &mut groups {
        let v = g.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let mut chars = [0u8; 8];
        for (i, c) in chars.iter_mut().enumerate() {
            *c = B32_ALPHABET[((v >> (35 - 5 * i)) & 31) as usize];
        }
        out.extend_from_slice(&chars);
    }
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in groups.remainder() {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(B32_ALPHABET[((acc >> bits) & 31) as usize]);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(B32_ALPHABET[((acc << (5 - bits)) & 31) as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tids_and_cids_round_trip_and_refuse_non_canonical() {
        for tid in ["3l7qfkl5wxk2c", "2222222222222", "jzzzzzzzzzzzz"] {
            let v = tid_value(tid.as_bytes()).unwrap();
            let mut out = Vec::new();
            push_tid(&mut out, v);
            assert_eq!(out, tid.as_bytes());
        }
        for bad in ["kzzzzzzzzzzzz", "3l7qfkl5wxk2", "3l7qfkl5wxk2C", "self"] {
            assert_eq!(tid_value(bad.as_bytes()), None, "{bad}");
        }
        let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
        let mut bin = Vec::new();
        assert!(cid_bytes(cid.as_bytes(), &mut bin));
        assert_eq!(bin.len(), 36);
        let mut back = Vec::new();
        push_cid(&mut back, &bin);
        assert_eq!(back, cid.as_bytes());
        // A last character with non-zero spare bits does not round-trip: refused.
        let mut bin = Vec::new();
        assert!(!cid_bytes(
            b"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpn",
            &mut bin
        ));
        assert!(bin.is_empty());
        assert!(!cid_bytes(b"Qmabc", &mut bin));
        // Every length (whole 5-byte groups and each remainder) round-trips.
        for len in 0..=41usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let mut text = Vec::new();
            push_cid(&mut text, &bytes);
            assert_eq!(text.len(), 1 + (len * 8).div_ceil(5), "length {len}");
            let mut back = Vec::new();
            assert!(cid_bytes(&text, &mut back), "length {len}");
            assert_eq!(back, bytes, "length {len}");
        }
    }
}
