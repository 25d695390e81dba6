//! Jetstream v1 JSON (`/subscribe`): one event per repo op, `{did, time_us, kind, ...}`.
//!
//! Owns the byte layout of v1 events and the v1 parameters, including the zstd opt-ins
//! (`compress=true`, `Socket-Encoding: zstd`; the scheme itself is `wire::zstd`). sluice
//! adds `cursor` (its own seq) beside `time_us` so clients can resume exactly; clients
//! that ignore unknown fields are unaffected.
//! Must never emit kinds other than `commit`, `identity` and `account`: strict v1 clients
//! reject unknown kinds.

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

// ---- compression -------------------------------------------------------------------

use std::sync::Arc;

use bytes::Bytes;

use super::zstd::Zstd;

/// sluice's own dictionary (`--zstd-dictionary trained`), trained on synthetic traffic:
/// deterministic, so it is the same after every restart and clients that fetched it from
/// `/zstd-dictionary` keep working. Existing v1 clients cannot decode with it: they embed
/// Jetstream's, the default.
pub fn trained_dictionary() -> std::io::Result<Vec<u8>> {
    use crate::decode::DecodeLimits;
    use crate::ingest::{IngestOutcome, Ingestor, StampState};
    use crate::upstream::synth::{Synth, SynthOptions};
    let opts = SynthOptions {
        seed: 7,
        count: 3000,
        ..SynthOptions::default()
    };
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut samples = Vec::new();
    for frame in Synth::new(&opts) {
        if let IngestOutcome::Events(events) = ingestor.ingest(Bytes::from(frame), i64::MAX / 2) {
            samples.extend(events.into_iter().filter_map(|e| e.v1_json));
        }
    }
    Zstd::train(&samples, 64 * 1024)
}

// ---- the subscriber endpoint -------------------------------------------------------

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use tokio_tungstenite::tungstenite::Message;

use crate::event::Event;
use crate::fanout::filter::Filter;
use crate::fanout::{End, SlowPolicy, Start, WireKind};
use crate::http::session::{self, WireSession};
use crate::http::websocket::{Frame, Socket, Upgrade};
use crate::http::{bad_request, parse_bool, query_pairs, AppState};
use crate::log::{Cursor, Resolved};

/// How long a `requireHello` client has to send its first `options_update`.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

struct Params {
    collections: Vec<String>,
    dids: Vec<String>,
    cursor: Option<i64>,
    compress: bool,
    max_message_bytes: usize,
    require_hello: bool,
    notices: bool,
    policy: Option<SlowPolicy>,
}

fn parse(pairs: &[(String, String)]) -> Result<Params, String> {
    let mut p = Params {
        collections: Vec::new(),
        dids: Vec::new(),
        cursor: None,
        compress: false,
        max_message_bytes: 0,
        require_hello: false,
        notices: false,
        policy: None,
    };
    for (key, value) in pairs {
        match key.as_str() {
            "wantedCollections" => p.collections.push(value.clone()),
            "wantedDids" => p.dids.push(value.clone()),
            "cursor" => {
                p.cursor = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| format!("cursor must be unix microseconds, not {value:?}"))?,
                )
            }
            "compress" => p.compress = parse_bool(key, value)?,
            "requireHello" => p.require_hello = parse_bool(key, value)?,
            "notices" => p.notices = parse_bool(key, value)?,
            "maxMessageSizeBytes" => {
                p.max_message_bytes = value.parse::<u32>().map_err(|_| {
                    format!("maxMessageSizeBytes must be an integer 0..=4294967295, not {value:?}")
                })? as usize
            }
            "slowConsumer" => p.policy = Some(value.parse::<SlowPolicy>()?),
            // Unknown parameters are ignored, as Jetstream v1 does.
            _ => {}
        }
    }
    Ok(p)
}

/// `options_update` payload.
#[derive(serde::Deserialize)]
struct OptionsUpdate {
    #[serde(rename = "type")]
    kind: String,
    payload: OptionsPayload,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct OptionsPayload {
    #[serde(default)]
    wanted_collections: Vec<String>,
    #[serde(default)]
    wanted_dids: Vec<String>,
    #[serde(default)]
    max_message_size_bytes: Option<u32>,
}

fn parse_options(text: &str) -> Result<OptionsPayload, String> {
    let update: OptionsUpdate =
        serde_json::from_str(text).map_err(|e| format!("invalid options_update: {e}"))?;
    if update.kind != "options_update" {
        return Err(format!("unknown message type {:?}", update.kind));
    }
    Ok(update.payload)
}

/// Whether any value of header `name` holds `token` (comma-separated, case-insensitive,
/// parameters after `;` ignored).
fn header_has(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').any(|item| {
                item.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case(token))
            })
        })
    })
}

/// `GET /subscribe`: Jetstream v1.
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let mut params = match parse(&query_pairs(&query)) {
        Ok(p) => p,
        Err(message) => return bad_request(&state, "InvalidRequest", message),
    };
    // Jetstream's two opt-ins to zstd: the query parameter and this header.
    if header_has(&headers, "socket-encoding", "zstd") {
        params.compress = true;
    }
    if params.compress && header_has(&headers, "sec-websocket-extensions", "permessage-deflate") {
        return bad_request(
            &state,
            "InvalidRequest",
            "choose one compression: zstd (compress=true or Socket-Encoding: zstd) or \
             permessage-deflate, not both"
                .into(),
        );
    }
    let filter = match Filter::build(&params.collections, &params.dids, &[], &state.filter_limits) {
        Ok(f) => f,
        Err(message) => return bad_request(&state, "InvalidRequest", message),
    };
    let zstd = match (params.compress, state.zstd_v1.get()) {
        (false, _) => None,
        (true, Some(zstd)) => Some(zstd.clone()),
        (true, None) => {
            crate::http::ensure_zstd_v1(&state);
            return crate::http::refusal_response(&crate::http::admission::Refusal {
                status: 503,
                reason: "the compression dictionary is not ready yet",
                retry_after_secs: crate::http::session::retry_after(state.session.retry_after_secs),
            });
        }
    };
    let start = match params.cursor {
        None => Start::Live,
        Some(t) => match crate::http::resolve_settled(&state, Cursor::TimeUs(t)).await {
            Ok(Resolved::From(seq)) => Start::From(seq),
            Ok(Resolved::TooOld { oldest }) => {
                // Jetstream v1 starts at the oldest event it has.
                state
                    .stats
                    .v1_cursor_clamped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Start::From(oldest)
            }
            Ok(Resolved::Live { next }) => Start::From(next),
            Ok(Resolved::Future { .. }) => Start::Live,
            Err(e) => return crate::http::log_unavailable(&e),
        },
    };
    let permit = match crate::http::admit(&state, peer) {
        Ok(p) => p,
        Err(response) => return *response,
    };
    // A `requireHello` filter comes later and is paid for then.
    let index_wait = if params.require_hello {
        std::time::Duration::ZERO
    } else {
        match state
            .hub
            .reserve_subscribe_from(&filter, start, Some(peer.ip()))
        {
            Ok(wait) => wait,
            Err(wait) => return crate::http::index_busy_response(wait),
        }
    };
    let policy = params.policy.unwrap_or(state.slow_policy);
    crate::http::tune(upgrade, &state.session).on_upgrade(move |mut socket| async move {
        let mut wire = V1Session {
            zstd,
            max_message_bytes: params.max_message_bytes,
            notices: params.notices,
            limits: state.filter_limits,
        };
        let mut filter = filter;
        let mut index_wait = index_wait;
        if params.require_hello {
            let mut shutdown = state.shutdown.clone();
            let outcome = tokio::select! {
                hello = wait_for_hello(&mut socket) => hello
                    .and_then(|options| wire.apply(options).map_err(HelloEnd::Invalid))
                    .and_then(|filter| match state.hub.reserve_subscribe_from(&filter, start, Some(peer.ip())) {
                        Ok(wait) => Ok((filter, wait)),
                        Err(wait) => Err(HelloEnd::IndexBusy(wait)),
                    }),
                _ = shutdown.wait_for(|&s| s) => Err(HelloEnd::Shutdown),
            };
            match outcome {
                Ok((f, wait)) => {
                    filter = f;
                    index_wait = wait;
                }
                Err(end) => {
                    let (code, reason) = match end {
                        HelloEnd::Shutdown => (
                            1012,
                            format!(
                                "sluice is restarting; resume with your cursor in {} s",
                                session::retry_after(state.session.retry_after_secs)
                            ),
                        ),
                        HelloEnd::Invalid(problem) => (1008, problem),
                        HelloEnd::IndexBusy(wait) => (1013, session::index_busy_reason(wait)),
                        HelloEnd::Gone => return,
                    };
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        socket.close(code, &reason),
                    )
                    .await;
                    return;
                }
            }
        }
        if !session::pause(index_wait, &mut state.shutdown.clone()).await {
            return;
        }
        let sub = state
            .hub
            .subscribe(WireKind::JetstreamV1, filter, policy, start);
        let end = session::run(
            socket,
            sub,
            wire,
            state.session.clone(),
            state.shutdown.clone(),
            Vec::new(),
            state.stats.counters(WireKind::JetstreamV1),
        )
        .await;
        state.stats.record_end(&end);
        drop(permit);
    })
}

/// Why a `requireHello` connection ended before its hello.
enum HelloEnd {
    /// The client left.
    Gone,
    /// The hello was invalid or late: close 1008 with this reason.
    Invalid(String),
    /// The server is shutting down: close 1012.
    Shutdown,
    /// The index budget could not pay for the filter within `fanout::MAX_INDEX_WAIT`: close
    /// 1013.
    IndexBusy(std::time::Duration),
}

async fn wait_for_hello(socket: &mut Socket) -> Result<OptionsPayload, HelloEnd> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                return parse_options(text.as_str()).map_err(HelloEnd::Invalid)
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                return Err(HelloEnd::Gone)
            }
            Err(_) => {
                return Err(HelloEnd::Invalid(format!(
                    "requireHello: no options_update within {} s",
                    HELLO_TIMEOUT.as_secs()
                )))
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

struct V1Session {
    zstd: Option<Arc<Zstd>>,
    max_message_bytes: usize,
    notices: bool,
    limits: crate::fanout::filter::FilterLimits,
}

impl V1Session {
    fn apply(&mut self, options: OptionsPayload) -> Result<Filter, String> {
        let filter = Filter::build(
            &options.wanted_collections,
            &options.wanted_dids,
            &[],
            &self.limits,
        )?;
        if let Some(max) = options.max_message_size_bytes {
            self.max_message_bytes = max as usize;
        }
        Ok(filter)
    }
}

impl WireSession for V1Session {
    fn message(&mut self, event: &Event) -> Option<Frame> {
        event.v1_json.clone().map(Frame::Text)
    }

    fn encode(&self, frame: Frame, seq: Option<u64>) -> Option<Frame> {
        super::zstd::encode(self.zstd.as_deref(), frame, seq)
    }

    fn client_max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Frame> {
        if !self.notices {
            return None;
        }
        let mut out = Vec::with_capacity(256);
        open(&mut out, &event.did, event.time_us, event.seq, "notice");
        out.extend_from_slice(b"\"notice\":{\"name\":\"EventTooBig\",");
        push_key(&mut out, "size");
        push_u64(&mut out, size as u64);
        out.push(b',');
        push_key(&mut out, "limit");
        push_u64(&mut out, limit as u64);
        out.push(b',');
        push_key(&mut out, "fetch");
        push_str(&mut out, &format!("/event/{}?wire=v1", event.seq));
        out.extend_from_slice(b"}}");
        Some(Frame::Text(Bytes::from(out)))
    }

    fn ending(&self, end: &End) -> (Option<Frame>, u16, String) {
        match end {
            End::TooSlow => (None, 1008, "ConsumerTooSlow".into()),
            End::TooOld { oldest } => (
                None,
                1008,
                format!("CursorTooOld: position fell out of retention (oldest seq {oldest})"),
            ),
            End::Closed => (None, 1012, "sluice is restarting".into()),
            End::ReadFailed(_) => (None, 1011, "InternalError".into()),
        }
    }

    fn on_text(&mut self, text: &str) -> Result<Option<Filter>, String> {
        let options = parse_options(text)?;
        self.apply(options).map(Some)
    }
}
