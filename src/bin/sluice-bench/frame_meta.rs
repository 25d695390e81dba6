//! Frame metadata: a few bytes of CBOR reading, independent of sluice's decoder, and
//! the match keys (upstream seq, commit did+rev) a subscriber reads back.

use ciborium_ll::{Decoder, Header};

pub(crate) const CLS_POST: u8 = 1;
pub(crate) const CLS_LIKE: u8 = 2;
pub(crate) const CLS_FOLLOW: u8 = 4;
pub(crate) const CLS_OTHER: u8 = 8;
pub(crate) const CLS_NONCOMMIT: u8 = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameType {
    Commit,
    Identity,
    Account,
    Sync,
    Other,
}

pub(crate) struct FrameMeta {
    pub(crate) seq: Option<i64>,
    /// hash of (repo DID, rev) for commits and syncs.
    pub(crate) commit_key: Option<u64>,
    pub(crate) ftype: FrameType,
    /// Union of the classes of the frame's ops (plus CLS_NONCOMMIT for non-commits).
    pub(crate) mask: u8,
    /// Ops per class: post, like, follow, other.
    pub(crate) ops: [u16; 4],
}

pub(crate) const MAX_DEPTH: usize = 64;

pub(crate) fn head_at(buf: &[u8], pos: usize) -> Option<(Header, usize)> {
    let rest = buf.get(pos..)?;
    let mut dec = Decoder::from(rest);
    let header = dec.pull().ok()?;
    Some((header, pos + dec.offset()))
}

pub(crate) fn skip_value(buf: &[u8], pos: usize, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let (header, mut at) = head_at(buf, pos)?;
    match header {
        Header::Bytes(len) | Header::Text(len) => {
            let end = at.checked_add(len?)?;
            (end <= buf.len()).then_some(end)
        }
        Header::Array(len) => {
            for _ in 0..len? {
                at = skip_value(buf, at, depth + 1)?;
            }
            Some(at)
        }
        Header::Map(len) => {
            for _ in 0..len? {
                at = skip_value(buf, at, depth + 1)?;
                at = skip_value(buf, at, depth + 1)?;
            }
            Some(at)
        }
        Header::Tag(_) => skip_value(buf, at, depth + 1),
        Header::Break => None,
        _ => Some(at),
    }
}

pub(crate) fn text_at(buf: &[u8], pos: usize) -> Option<(&str, usize)> {
    match head_at(buf, pos)? {
        (Header::Text(Some(len)), at) => {
            let end = at.checked_add(len)?;
            let s = std::str::from_utf8(buf.get(at..end)?).ok()?;
            Some((s, end))
        }
        _ => None,
    }
}

pub(crate) fn int_at(buf: &[u8], pos: usize) -> Option<i64> {
    match head_at(buf, pos)?.0 {
        Header::Positive(n) => i64::try_from(n).ok(),
        Header::Negative(n) => i64::try_from(n).ok().map(|n| -1 - n),
        _ => None,
    }
}

/// Calls `f(key, value_pos)` for each text key of the map at `pos`; returns the map's end.
/// `f` returns false to stop early (then `None` is returned).
pub(crate) fn walk_map(
    buf: &[u8],
    pos: usize,
    mut f: impl FnMut(&str, usize) -> bool,
) -> Option<usize> {
    let (header, mut at) = head_at(buf, pos)?;
    let Header::Map(Some(len)) = header else {
        return None;
    };
    for _ in 0..len {
        let (key, key_end) = match text_at(buf, at) {
            Some((k, end)) => (Some(k), end),
            None => (None, skip_value(buf, at, 1)?),
        };
        if let Some(k) = key {
            if !f(k, key_end) {
                return None;
            }
        }
        at = skip_value(buf, key_end, 1)?;
    }
    Some(at)
}

/// The top-level `seq` of a frame's body: what a raw-wire subscriber reads to match.
pub(crate) fn frame_seq(frame: &[u8]) -> Option<i64> {
    let body = skip_value(frame, 0, 0)?;
    let mut seq = None;
    walk_map(frame, body, |k, v| {
        if k == "seq" {
            seq = int_at(frame, v);
            return false;
        }
        true
    });
    seq
}

pub(crate) fn class_of(collection: &str) -> (u8, usize) {
    match collection {
        "app.bsky.feed.post" => (CLS_POST, 0),
        "app.bsky.feed.like" => (CLS_LIKE, 1),
        "app.bsky.graph.follow" => (CLS_FOLLOW, 2),
        _ => (CLS_OTHER, 3),
    }
}

pub(crate) fn frame_meta(frame: &[u8]) -> FrameMeta {
    let mut meta = FrameMeta {
        seq: None,
        commit_key: None,
        ftype: FrameType::Other,
        mask: 0,
        ops: [0; 4],
    };
    let mut t = None;
    let Some(body) = walk_map(frame, 0, |k, v| {
        if k == "t" {
            t = text_at(frame, v).map(|(s, _)| s.to_owned());
        }
        true
    }) else {
        return meta;
    };
    meta.ftype = match t.as_deref() {
        Some("#commit") => FrameType::Commit,
        Some("#identity") => FrameType::Identity,
        Some("#account") => FrameType::Account,
        Some("#sync") => FrameType::Sync,
        _ => FrameType::Other,
    };
    let (mut repo, mut rev) = (None, None);
    let mut ops_pos = None;
    walk_map(frame, body, |k, v| {
        match k {
            "seq" => meta.seq = int_at(frame, v),
            // `#commit` names the repo `repo`, `#sync` names it `did`.
            "repo" | "did" => repo = text_at(frame, v).map(|(s, _)| s),
            "rev" => rev = text_at(frame, v).map(|(s, _)| s),
            "ops" => ops_pos = Some(v),
            _ => {}
        }
        true
    });
    // v2 shows `#sync` events with their rev too, so they are timed like commits.
    if let (Some(repo), Some(rev)) = (repo, rev) {
        meta.commit_key = Some(commit_key(repo, rev));
    }
    if meta.ftype != FrameType::Commit {
        meta.mask = CLS_NONCOMMIT;
        return meta;
    }
    if let Some(Some((Header::Array(Some(n)), mut at))) = ops_pos.map(|p| head_at(frame, p)) {
        for _ in 0..n {
            let mut path = None;
            let Some(end) = walk_map(frame, at, |k, v| {
                if k == "path" {
                    path = text_at(frame, v).map(|(s, _)| s);
                }
                true
            }) else {
                break;
            };
            if let Some(p) = path {
                let coll = p.split('/').next().unwrap_or(p);
                let (bit, i) = class_of(coll);
                meta.mask |= bit;
                meta.ops[i] = meta.ops[i].saturating_add(1);
            }
            at = end;
        }
    }
    meta
}

/// FNV-1a over `did`, a separator and `rev`.
pub(crate) fn commit_key(did: &str, rev: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in did.bytes().chain(std::iter::once(0xff)).chain(rev.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub(crate) fn seq_key(seq: i64) -> u64 {
    // splitmix64 finaliser, with a tag so it never collides with a commit key by design.
    let mut z = (seq as u64) ^ 0x5851_f42d_4c95_7f2d;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `"key":"value"` out of a flat-ish JSON text, first occurrence.
pub(crate) fn json_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut pat = String::with_capacity(key.len() + 4);
    pat.push('"');
    pat.push_str(key);
    pat.push_str("\":\"");
    let start = text.find(&pat)? + pat.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::upstream::synth::{Synth, SynthOptions};

    #[test]
    fn meta_of_synthetic_frames() {
        let frames: Vec<Vec<u8>> = Synth::new(&SynthOptions {
            count: 300,
            ..SynthOptions::default()
        })
        .collect();
        let mut commits = 0;
        for fr in &frames {
            let m = frame_meta(fr);
            assert_eq!(m.seq, frame_seq(fr));
            assert!(m.seq.is_some());
            if m.ftype == FrameType::Commit {
                commits += 1;
                assert!(m.commit_key.is_some());
                assert!(m.ops.iter().sum::<u16>() >= 1);
            }
        }
        assert!(commits > 250);
    }

    #[test]
    fn json_fields() {
        let t = r#"{"did":"did:plc:abc","time_us":1,"kind":"commit","commit":{"rev":"3k","operation":"create"}}"#;
        assert_eq!(json_str(t, "did"), Some("did:plc:abc"));
        assert_eq!(json_str(t, "rev"), Some("3k"));
        assert_eq!(json_str(t, "nope"), None);
    }
}
