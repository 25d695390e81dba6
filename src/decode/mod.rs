//! Decoding of `com.atproto.sync.subscribeRepos` frames.
//!
//! Owns: turning one binary websocket message (two DAG-CBOR values: header, body) into a
//! [`DecodedFrame`], including the CARv1 `blocks` of a commit and the conversion of each
//! op's record to the atproto JSON data model.
//!
//! Must never: panic on any input, allocate a length declared by the input before the
//! bytes are there, recurse without a depth limit, or take more than linear time. Every
//! failure is a [`DecodeError`] with a stable `reason()` that callers count.
//!
//! Submodules: [`cbor`] (token reader), [`cid`] (binary CIDs and their strings), [`car`]
//! (CARv1), [`json`] (DAG-CBOR → atproto JSON), [`dagcbor_encode`] (atproto JSON →
//! canonical DAG-CBOR and CIDs, used by tests and tools, never on the decode path).

pub mod car;
pub mod cbor;
pub mod cbor_ll;
pub mod cid;
pub mod dagcbor_encode;
pub mod json;
mod types;

pub use types::*;

use cbor::{as_i64, skip_value, Source, Token};
use json::{push_int, push_json_string, JsonWriter};

/// The token source of the production path: `ciborium-ll`, as the project card asks, since it
/// meets the speed target (measurements in docs/DECISIONS.md).
pub type DefaultSource<'a> = cbor_ll::LlReader<'a>;

/// Decodes one upstream frame (header and body).
pub fn decode_frame(frame: &[u8], limits: &DecodeLimits) -> Result<DecodedFrame, DecodeError> {
    decode_frame_with::<DefaultSource<'_>>(frame, limits)
}

/// The same decoding logic driven by the hand-rolled [`cbor::Reader`]: the measured
/// alternative (benchmark) and an independent tokenizer for differential tests.
pub fn decode_frame_hand_rolled(
    frame: &[u8],
    limits: &DecodeLimits,
) -> Result<DecodedFrame, DecodeError> {
    decode_frame_with::<cbor::Reader<'_>>(frame, limits)
}

/// Explicitly `ciborium-ll` driven; same as [`decode_frame`] today.
pub fn decode_frame_ciborium_ll(
    frame: &[u8],
    limits: &DecodeLimits,
) -> Result<DecodedFrame, DecodeError> {
    decode_frame_with::<cbor_ll::LlReader<'_>>(frame, limits)
}

fn decode_frame_with<'a, S: Source<'a>>(
    frame: &'a [u8],
    limits: &DecodeLimits,
) -> Result<DecodedFrame, DecodeError> {
    let mut r = S::open(frame);
    let (op, t) = read_header(&mut r, limits)?;
    let decoded = match op {
        1 => {
            let t = t.ok_or(DecodeError::InvalidHeader("message without t"))?;
            DecodedFrame::Message(if t == "#commit" {
                decode_commit(&mut r, limits)?
            } else {
                decode_other(&mut r, t, limits)?
            })
        }
        -1 => decode_error_body(&mut r, limits)?,
        _ => return Err(DecodeError::InvalidHeader("op is neither 1 nor -1")),
    };
    let rest = r.remaining();
    if rest != 0 {
        return Err(DecodeError::TrailingBytes(rest));
    }
    Ok(decoded)
}

fn read_header<'a, S: Source<'a>>(
    r: &mut S,
    limits: &DecodeLimits,
) -> Result<(i64, Option<&'a str>), DecodeError> {
    let Token::Map(n) = r.next_token()? else {
        return Err(DecodeError::InvalidHeader("header is not a map"));
    };
    let mut op = None;
    let mut t = None;
    for _ in 0..n {
        let Token::Text(key) = r.next_token()? else {
            return Err(DecodeError::InvalidHeader("header key is not text"));
        };
        if (key == "op" && op.is_some()) || (key == "t" && t.is_some()) {
            return Err(DecodeError::InvalidHeader("duplicate header field"));
        }
        match key {
            "op" => {
                op = Some(
                    as_i64(r.next_token()?)
                        .ok_or(DecodeError::InvalidHeader("op is not an integer"))?,
                )
            }
            "t" => match r.next_token()? {
                Token::Text(s) => t = Some(s),
                _ => return Err(DecodeError::InvalidHeader("t is not text")),
            },
            _ => skip_value(r, 1, limits.max_depth)?,
        }
    }
    Ok((
        op.ok_or(DecodeError::InvalidHeader("header without op"))?,
        t,
    ))
}

/// Refuses a second occurrence of a field the decoder reads: which one to believe would be a
/// guess. `fields` lists the known names; unknown keys are skipped and not tracked.
#[inline]
fn once(seen: &mut u32, fields: &[&str], t: &str, key: &str) -> Result<(), DecodeError> {
    if let Some(i) = fields.iter().position(|f| *f == key) {
        let bit = 1u32 << i;
        if *seen & bit != 0 {
            return Err(DecodeError::InvalidBody(format!(
                "{t} field `{key}` appears twice"
            )));
        }
        *seen |= bit;
    }
    Ok(())
}

fn wrong_type(t: &str, key: &str) -> DecodeError {
    DecodeError::InvalidBody(format!("{t} field `{key}` has the wrong type"))
}

fn body_map<'a, S: Source<'a>>(r: &mut S) -> Result<u64, DecodeError> {
    match r.next_token()? {
        Token::Map(n) => Ok(n),
        _ => Err(DecodeError::InvalidBody("body is not a map".into())),
    }
}

fn body_key<'a, S: Source<'a>>(r: &mut S) -> Result<&'a str, DecodeError> {
    match r.next_token()? {
        Token::Text(k) => Ok(k),
        _ => Err(DecodeError::InvalidBody("body key is not text".into())),
    }
}

fn decode_error_body<'a, S: Source<'a>>(
    r: &mut S,
    limits: &DecodeLimits,
) -> Result<DecodedFrame, DecodeError> {
    let n = body_map(r)?;
    let mut error = None;
    let mut message = None;
    let mut seen = 0;
    for _ in 0..n {
        let key = body_key(r)?;
        once(&mut seen, &["error", "message"], "error frame", key)?;
        match key {
            "error" => match r.next_token()? {
                Token::Text(s) => error = Some(s),
                _ => return Err(wrong_type("error frame", "error")),
            },
            "message" => match r.next_token()? {
                Token::Text(s) => message = Some(s),
                Token::Null => message = None,
                _ => return Err(wrong_type("error frame", "message")),
            },
            _ => skip_value(r, 1, limits.max_depth)?,
        }
    }
    Ok(DecodedFrame::Error {
        error: error
            .ok_or_else(|| DecodeError::InvalidBody("error frame without `error`".into()))?
            .to_owned(),
        message: message.map(str::to_owned),
    })
}

/// A tag-42 link or null; anything else is the caller's wrong-type error.
fn opt_link<'a, S: Source<'a>>(r: &mut S) -> Result<Option<Option<&'a [u8]>>, DecodeError> {
    match r.next_token()? {
        Token::Null => Ok(Some(None)),
        Token::Tag(42) => match r.next_token()? {
            Token::Bytes(b) => Ok(Some(Some(cid::cid_from_tag42(b)?))),
            _ => Err(DecodeError::InvalidCid("tag 42 on a non-byte-string")),
        },
        _ => Ok(None),
    }
}

fn parse_time_us(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

struct RawOp<'a> {
    action: Action,
    path: &'a str,
    cid: Option<&'a [u8]>,
    prev: Option<&'a [u8]>,
}

fn parse_op<'a, S: Source<'a>>(r: &mut S, limits: &DecodeLimits) -> Result<RawOp<'a>, DecodeError> {
    const T: &str = "#commit op";
    let Token::Map(n) = r.next_token()? else {
        return Err(DecodeError::InvalidBody("#commit op is not a map".into()));
    };
    let (mut action, mut path, mut cid, mut prev) = (None, None, None, None);
    let mut seen = 0;
    for _ in 0..n {
        let key = body_key(r)?;
        once(&mut seen, &["action", "path", "cid", "prev"], T, key)?;
        match key {
            "action" => {
                action = Some(match r.next_token()? {
                    Token::Text("create") => Action::Create,
                    Token::Text("update") => Action::Update,
                    Token::Text("delete") => Action::Delete,
                    Token::Text(other) => {
                        return Err(DecodeError::InvalidBody(format!(
                            "unknown op action `{other}`"
                        )))
                    }
                    _ => return Err(wrong_type(T, key)),
                })
            }
            "path" => match r.next_token()? {
                Token::Text(s) => path = Some(s),
                _ => return Err(wrong_type(T, key)),
            },
            "cid" => cid = opt_link(r)?.ok_or_else(|| wrong_type(T, key))?,
            "prev" => prev = opt_link(r)?.ok_or_else(|| wrong_type(T, key))?,
            _ => skip_value(r, 2, limits.max_depth)?,
        }
    }
    Ok(RawOp {
        action: action.ok_or_else(|| DecodeError::InvalidBody("op without action".into()))?,
        path: path.ok_or_else(|| DecodeError::InvalidBody("op without path".into()))?,
        cid,
        prev,
    })
}

fn decode_commit<'a, S: Source<'a>>(
    r: &mut S,
    limits: &DecodeLimits,
) -> Result<Message, DecodeError> {
    const T: &str = "#commit";
    let n = body_map(r)?;
    let (mut repo, mut rev, mut since, mut commit, mut prev_data) = (None, None, None, None, None);
    let (mut too_big, mut rebase, mut seq, mut time, mut blocks) = (false, false, None, None, None);
    let mut ops: Vec<RawOp<'a>> = Vec::new();
    const FIELDS: &[&str] = &[
        "repo", "rev", "since", "commit", "prevData", "tooBig", "rebase", "seq", "time", "blocks",
        "ops",
    ];
    let mut seen = 0;
    for _ in 0..n {
        let key = body_key(r)?;
        once(&mut seen, FIELDS, T, key)?;
        match key {
            "repo" => match r.next_token()? {
                Token::Text(s) => repo = Some(s),
                _ => return Err(wrong_type(T, key)),
            },
            "rev" => match r.next_token()? {
                Token::Text(s) => rev = Some(s),
                _ => return Err(wrong_type(T, key)),
            },
            "since" => match r.next_token()? {
                Token::Text(s) => since = Some(s),
                Token::Null => since = None,
                _ => return Err(wrong_type(T, key)),
            },
            "commit" => commit = opt_link(r)?.ok_or_else(|| wrong_type(T, key))?,
            "prevData" => prev_data = opt_link(r)?.ok_or_else(|| wrong_type(T, key))?,
            "tooBig" => match r.next_token()? {
                Token::Bool(b) => too_big = b,
                _ => return Err(wrong_type(T, key)),
            },
            "rebase" => match r.next_token()? {
                Token::Bool(b) => rebase = b,
                _ => return Err(wrong_type(T, key)),
            },
            "seq" => seq = Some(as_i64(r.next_token()?).ok_or_else(|| wrong_type(T, key))?),
            "time" => match r.next_token()? {
                Token::Text(s) => time = Some(s),
                _ => return Err(wrong_type(T, key)),
            },
            "blocks" => match r.next_token()? {
                Token::Bytes(b) => blocks = Some(b),
                _ => return Err(wrong_type(T, key)),
            },
            "ops" => {
                let Token::Array(k) = r.next_token()? else {
                    return Err(wrong_type(T, key));
                };
                if k > limits.max_ops as u64 {
                    return Err(DecodeError::LimitExceeded("ops per commit"));
                }
                ops = Vec::with_capacity(k as usize);
                for _ in 0..k {
                    ops.push(parse_op(r, limits)?);
                }
            }
            _ => skip_value(r, 1, limits.max_depth)?,
        }
    }
    let repo = repo.ok_or_else(|| DecodeError::InvalidBody("#commit without repo".into()))?;
    let blocks = blocks.unwrap_or(&[]);
    let found = find_blocks::<S>(&ops, blocks, limits)?;

    // Ops naming the same CID share one block; converting it once per op would make the output
    // O(ops x record) instead of O(frame). Each block is converted once, repeats are copies,
    // and all record JSON of a frame is capped at a multiple of the frame's own size (a single
    // conversion expands by at most ~6x, for text made of control characters).
    let budget = r.input().len().saturating_mul(8).saturating_add(64 * 1024);
    let mut json_total: usize = 0;
    let mut first_use: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut writer = JsonWriter::new();
    let mut out_ops: Vec<Op> = Vec::with_capacity(ops.len());
    for (op, block) in ops.iter().zip(found) {
        let (collection, rkey) = op
            .path
            .split_once('/')
            .ok_or_else(|| DecodeError::InvalidBody(format!("op path `{}` has no '/'", op.path)))?;
        let record = match (op.action, block) {
            (Action::Delete, _) => RecordState::None,
            (_, None) => RecordState::Missing,
            (_, Some(data)) => {
                let key = data.as_ptr() as usize;
                let earlier = if ops.len() > 1 {
                    first_use.get(&key).copied()
                } else {
                    None
                };
                let record = match earlier {
                    Some(i) => out_ops[i].record.clone(),
                    None => {
                        if ops.len() > 1 {
                            first_use.insert(key, out_ops.len());
                        }
                        let mut json = String::with_capacity(data.len() + data.len() / 2);
                        match json::record_to_json_into::<S>(
                            data,
                            limits.max_depth,
                            &mut json,
                            &mut writer,
                        ) {
                            Ok(()) => RecordState::Json(json),
                            Err(_) => RecordState::Undecodable,
                        }
                    }
                };
                if let RecordState::Json(j) = &record {
                    json_total = json_total.saturating_add(j.len());
                    if json_total > budget {
                        return Err(DecodeError::LimitExceeded("record JSON per frame"));
                    }
                }
                record
            }
        };
        out_ops.push(Op {
            action: op.action,
            collection: collection.to_owned(),
            rkey: rkey.to_owned(),
            cid: op.cid.map(cid::cid_string),
            prev: op.prev.map(cid::cid_string),
            record,
        });
    }
    Ok(Message {
        t: "#commit".to_owned(),
        seq,
        time: time.map(str::to_owned),
        time_us: time.and_then(parse_time_us),
        did: Some(repo.to_owned()),
        body: Body::Commit(Commit {
            repo: repo.to_owned(),
            rev: rev.unwrap_or_default().to_owned(),
            since: since.map(str::to_owned),
            commit: commit.map(cid::cid_string),
            prev_data: prev_data.map(cid::cid_string),
            too_big,
            rebase,
            ops: out_ops,
            blocks_len: blocks.len(),
        }),
    })
}

/// Walks the whole CAR (so a corrupt one is always reported) and returns, per op, the block
/// its `cid` names. Lookup is a linear scan for the usual handful of ops and a binary search
/// over sorted op CIDs otherwise, so a hostile frame costs O(blocks · log ops).
fn find_blocks<'a, S: Source<'a>>(
    ops: &[RawOp<'a>],
    blocks: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Vec<Option<&'a [u8]>>, DecodeError> {
    let mut found: Vec<Option<&'a [u8]>> = vec![None; ops.len()];
    if blocks.is_empty() {
        return Ok(found);
    }
    let mut wanted: Vec<(&'a [u8], usize)> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| op.action != Action::Delete)
        .filter_map(|(i, op)| op.cid.map(|c| (c, i)))
        .collect();
    const LINEAR_MAX: usize = 8;
    if wanted.len() > LINEAR_MAX {
        wanted.sort_unstable();
    }
    let car = car::Car::parse_with::<S>(blocks, limits.max_depth)?;
    for item in car.blocks(limits.max_blocks) {
        let (cid, data) = item?;
        if wanted.len() <= LINEAR_MAX {
            for &(c, i) in &wanted {
                if c == cid && found[i].is_none() {
                    found[i] = Some(data);
                }
            }
        } else {
            let start = wanted.partition_point(|&(c, _)| c < cid);
            for &(c, i) in wanted[start..].iter().take_while(|&&(c, _)| c == cid) {
                let _ = c;
                if found[i].is_none() {
                    found[i] = Some(data);
                }
            }
        }
    }
    Ok(found)
}

/// Any non-commit message: the whole body as atproto JSON, with `#sync.blocks` replaced by its
/// length, and `seq`/`time`/`did` lifted into the [`Message`].
fn decode_other<'a, S: Source<'a>>(
    r: &mut S,
    t: &'a str,
    limits: &DecodeLimits,
) -> Result<Message, DecodeError> {
    let n = body_map(r)?;
    let is_sync = t == "#sync";
    let mut out = String::with_capacity(128);
    let mut writer = JsonWriter::new();
    let (mut seq, mut time, mut did) = (None, None, None);
    let mut prev_key: Option<&str> = None;
    let mut keys: Vec<&str> = Vec::new();
    let mut sorted = true;
    out.push('{');
    for i in 0..n {
        let key = body_key(r)?;
        if let Some(p) = prev_key {
            if json::canonical_key_cmp(p, key) != std::cmp::Ordering::Less {
                sorted = false;
            }
        }
        prev_key = Some(key);
        keys.push(key);
        if i > 0 {
            out.push(',');
        }
        if is_sync && key == "blocks" {
            let Token::Bytes(b) = r.next_token()? else {
                return Err(wrong_type(t, key));
            };
            out.push_str("\"blocksLen\":");
            push_int(&mut out, b.len() as u64);
            continue;
        }
        push_json_string(&mut out, key);
        out.push(':');
        if matches!(key, "seq" | "time" | "did") {
            let start = r.pos();
            match (key, r.next_token()?) {
                ("seq", tok) => seq = as_i64(tok),
                ("time", Token::Text(s)) => time = Some(s),
                ("did", Token::Text(s)) => did = Some(s),
                _ => {}
            }
            r.seek(start);
        }
        writer.write_value(r, &mut out, 1, limits.max_depth)?;
    }
    out.push('}');
    if !sorted {
        keys.sort_unstable_by(|a, b| json::canonical_key_cmp(a, b));
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(DecodeError::InvalidBody("duplicate body key".into()));
        }
    }
    Ok(Message {
        t: t.to_owned(),
        seq,
        time: time.map(str::to_owned),
        time_us: time.and_then(parse_time_us),
        did: did.map(str::to_owned),
        body: Body::Other { json: out },
    })
}
