//! Jetstream v2 (`network.bsky.jetstream.subscribeEvents`, proposal 0015 `xrpc.v1.json`
//! framing): `{"$type":"message","payload":{"$type":"...#commit", seq, did, time, ...}}`.
//!
//! Owns the byte layout of v2 message frames. `seq` is sluice's own seq; `time` is the
//! event's source time with µs precision. Must never put anything but `message` or
//! `error` in the envelope `$type`.

use super::json::{push_key, push_str, push_time_us, push_u64};
use crate::decode::{Commit, Op};

const NSID: &str = "network.bsky.jetstream.subscribeEvents";

fn open(out: &mut Vec<u8>, def: &str, seq: u64, time_us: i64, did: &str) {
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
    let record_len = match &op.record {
        crate::decode::RecordState::Json(json) => json.len(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(256 + record_len + did.len() + op.collection.len());
    open(&mut out, "commit", seq, time_us, did);
    out.push(b',');
    super::jetstream_v1::push_op_fields(&mut out, rev, op);
    out.extend_from_slice(b"}}");
    out
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

// ---- the subscriber endpoint -------------------------------------------------------

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::Response;

use crate::event::Event;
use crate::fanout::filter::{Filter, Kind};
use crate::fanout::{End, SlowPolicy, Start, WireKind};
use crate::http::session::{self, WireSession};
use crate::http::websocket::{Frame, Upgrade};
use crate::http::{bad_request, query_pairs, AppState};
use crate::log::{Cursor, Resolved};

/// The `xrpc.v1.json` subprotocol of proposal 0015.
pub const SUBPROTOCOL: &str = "xrpc.v1.json";
/// Cursors at or above this are unix µs, not seqs (as Jetstream v2 does).
const TIME_CURSOR_FLOOR: u64 = 1_000_000_000_000_000;

struct Params {
    filter: Filter,
    cursor: Option<u64>,
    max_message_bytes: usize,
    policy: Option<SlowPolicy>,
    /// The dictionary ID asked for with `zstdDictionary`, as given.
    zstd_dictionary: Option<String>,
}

fn parse(pairs: &[(String, String)], state: &AppState) -> Result<Params, String> {
    let (mut collections, mut dids, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    let mut cursor = None;
    let mut max_message_bytes = 0usize;
    let mut policy = None;
    let mut zstd_dictionary = None;
    for (key, value) in pairs {
        match key.as_str() {
            "collections" => collections.push(value.clone()),
            "dids" => dids.push(value.clone()),
            "kinds" => kinds.push(
                Kind::parse(value)
                    .ok_or_else(|| format!("kinds: unknown kind {value:?} (commit, identity, account, sync)"))?,
            ),
            "cursor" => {
                cursor = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("cursor must be a non-negative integer, not {value:?}"))?,
                )
            }
            "maxMessageSizeBytes" => {
                max_message_bytes = value
                    .parse::<u32>()
                    .map_err(|_| format!("maxMessageSizeBytes must be an integer 0..=4294967295, not {value:?}"))?
                    as usize
            }
            "slowConsumer" => policy = Some(value.parse::<SlowPolicy>()?),
            "wantedCollections" | "wantedDids" | "requireHello" => {
                return Err(format!(
                    "{key} is a Jetstream v1 parameter; this endpoint takes collections, dids, kinds and cursor"
                ))
            }
            "compress" => {
                return Err(
                    "compress is a Jetstream v1 parameter; for compression here, fetch \
                     network.bsky.jetstream.getZstdDictionary and pass zstdDictionary=<its id>"
                        .to_string(),
                )
            }
            "zstdDictionary" => zstd_dictionary = Some(value.clone()),
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    if !collections.is_empty() && !kinds.is_empty() && !kinds.contains(&Kind::Commit) {
        return Err(
            "collections given but kinds excludes commit: the filter could never apply".into(),
        );
    }
    let filter = Filter::build(&collections, &dids, &kinds, &state.filter_limits)?;
    Ok(Params {
        filter,
        cursor,
        max_message_bytes,
        policy,
        zstd_dictionary,
    })
}

fn info(name: &str, message: &str) -> Frame {
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

fn error_frame(error: &str, message: &str) -> Frame {
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

/// `GET /xrpc/network.bsky.jetstream.subscribeEvents`.
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    upgrade: Upgrade,
) -> Response {
    let params = match parse(&query_pairs(&query), &state) {
        Ok(p) => p,
        Err(message) => return bad_request(&state, "InvalidRequest", message),
    };
    // Compression is by dictionary ID, checked before anything else is resolved.
    let zstd = match &params.zstd_dictionary {
        None => None,
        Some(asked) => {
            if asked
                .parse::<u32>()
                .ok()
                .is_none_or(|id| Some(id) != state.zstd_v2.id())
            {
                return crate::http::unknown_zstd_dictionary(&state, asked);
            }
            Some(state.zstd_v2.clone())
        }
    };
    let mut initial = Vec::new();
    let start = match params.cursor {
        None => Start::Live,
        Some(c) => {
            let cursor = if c >= TIME_CURSOR_FLOOR {
                Cursor::TimeUs(i64::try_from(c).unwrap_or(i64::MAX))
            } else {
                // Seq 0 is never allocated: it is the "nothing yet" sentinel a fresh client
                // sends, meaning "before the first event". It is judged as seq 1 from here on.
                Cursor::Seq(c.max(1))
            };
            match crate::http::resolve_settled(&state, cursor).await {
                Ok(Resolved::From(seq)) => Start::From(seq),
                Ok(Resolved::TooOld { oldest }) => match cursor {
                    Cursor::TimeUs(_) => {
                        initial.push(info(
                            "OutdatedCursor",
                            &format!("cursor is older than retention; resuming from seq {oldest}"),
                        ));
                        Start::From(oldest)
                    }
                    _ => {
                        return bad_request(
                            &state,
                            "CursorTooOld",
                            format!("cursor {c} is below the retention floor; the oldest seq held is {oldest}"),
                        )
                    }
                },
                Ok(Resolved::Live { next }) => {
                    if matches!(cursor, Cursor::Seq(s) if s > next) {
                        initial.push(info(
                            "FutureCursor",
                            &format!("cursor {c} is beyond the newest seq {}; starting at the live tip", next - 1),
                        ));
                    }
                    Start::From(next)
                }
                Ok(Resolved::Future { .. }) => Start::Live,
                Err(e) => return crate::http::log_unavailable(&e),
            }
        }
    };
    let permit = match crate::http::admit(&state, peer) {
        Ok(p) => p,
        Err(response) => return *response,
    };
    let index_wait = match state
        .hub
        .reserve_subscribe_from(&params.filter, start, Some(peer.ip()))
    {
        Ok(wait) => wait,
        Err(wait) => return crate::http::index_busy_response(wait),
    };
    let policy = params.policy.unwrap_or(state.slow_policy);
    crate::http::tune(upgrade, &state.session)
        .protocols([SUBPROTOCOL])
        .on_upgrade(move |socket| async move {
            if !session::pause(index_wait, &mut state.shutdown.clone()).await {
                drop(permit);
                return;
            }
            let sub = state
                .hub
                .subscribe(WireKind::JetstreamV2, params.filter, policy, start);
            let wire = V2Session {
                max_message_bytes: params.max_message_bytes,
                zstd,
            };
            let end = session::run(
                socket,
                sub,
                wire,
                state.session.clone(),
                state.shutdown.clone(),
                initial,
                state.stats.counters(WireKind::JetstreamV2),
            )
            .await;
            state.stats.record_end(&end);
            drop(permit);
        })
}

struct V2Session {
    max_message_bytes: usize,
    /// With `zstdDictionary`: every message (events, `#info`, error frames) goes out as one
    /// zstd frame of its text, in a binary message.
    zstd: Option<Arc<super::zstd::Zstd>>,
}

impl WireSession for V2Session {
    fn message(&mut self, event: &Event) -> Option<Frame> {
        event.v2_json.clone().map(Frame::Text)
    }

    fn encode(&self, frame: Frame, seq: Option<u64>) -> Option<Frame> {
        super::zstd::encode(self.zstd.as_deref(), frame, seq)
    }

    fn client_max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Frame> {
        Some(info(
            "EventTooBig",
            &format!(
                "event seq {} is {size} bytes, over this subscription's limit of {limit}; fetch it at /event/{}?wire=v2",
                event.seq, event.seq
            ),
        ))
    }

    fn ending(&self, end: &End) -> (Option<Frame>, u16, String) {
        match end {
            End::TooSlow => (
                Some(error_frame(
                    "ConsumerTooSlow",
                    "subscriber queue overflowed",
                )),
                1008,
                "ConsumerTooSlow".into(),
            ),
            End::TooOld { oldest } => (
                Some(error_frame(
                    "CursorTooOld",
                    &format!("position fell out of retention; the oldest seq held is {oldest}"),
                )),
                1008,
                "CursorTooOld".into(),
            ),
            End::Closed => (None, 1012, "sluice is restarting".into()),
            End::ReadFailed(e) => (
                Some(error_frame("InternalError", e)),
                1011,
                "InternalError".into(),
            ),
        }
    }

    fn on_text(&mut self, _text: &str) -> Result<Option<Filter>, String> {
        // v2 clients send nothing; ignore rather than punish.
        Ok(None)
    }
}
