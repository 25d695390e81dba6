//! `GET /subscribe`: the Jetstream v1 endpoint.
//!
//! Owns v1's parameters, its cursor contract (unix µs; below the floor it starts at the
//! oldest event held, counted), `compress=true` / `Socket-Encoding: zstd`, `requireHello`
//! and `options_update` filter changes, and the v1 session (notices for oversized events).
//! Must never upgrade with both zstd and permessage-deflate asked for.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{accept, serve, IndexCost, Plan};
use crate::event::Event;
use crate::fanout::filter::{Filter, FilterLimits};
use crate::fanout::{End, SlowPolicy, Start};
use crate::http::admission::Refusal;
use crate::http::admission_text::{self, ClientOptions, TextBusy, TextJob};
use crate::http::app::{ensure_zstd_v1, resolve_settled, AppState};
use crate::http::reply::{bad_request, log_unavailable, parse_bool, query_pairs, refusal_response};
use crate::http::session::{self, Closing, WireSession};
use crate::http::websocket::{Socket, Upgrade};
use crate::log::{Cursor, Resolved};
use crate::wire::zstd::{self, Zstd};
use crate::wire::{jetstream_v1, Frame, WireKind};

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

/// The work that reads an `options_update`: parse, then validate into a filter (both
/// grow with the message, so they run off the async workers; see `admission_text`).
fn options_job(text: Utf8Bytes, limits: FilterLimits) -> TextJob {
    Box::new(move || {
        let options = parse_options(text.as_str())?;
        let filter = Filter::build(
            &options.wanted_collections,
            &options.wanted_dids,
            &[],
            &limits,
        )?;
        Ok(ClientOptions {
            filter,
            max_message_bytes: options.max_message_size_bytes.map(|max| max as usize),
        })
    })
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
    request: Upgrade,
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
            ensure_zstd_v1(&state);
            return refusal_response(&Refusal {
                status: 503,
                reason: "the compression dictionary is not ready yet",
                retry_after_secs: crate::rate::retry_after(state.session.retry_after_secs),
            });
        }
    };
    let start = match params.cursor {
        None => Start::Live,
        Some(t) => match resolve_settled(&state, Cursor::TimeUs(t)).await {
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
            Err(e) => return log_unavailable(&e),
        },
    };
    let plan = Plan {
        wire: WireKind::JetstreamV1,
        filter,
        start,
        policy: params.policy.unwrap_or(state.slow_policy),
        initial: Vec::new(),
    };
    let mut session = V1Session {
        zstd,
        max_message_bytes: params.max_message_bytes,
        notices: params.notices,
        limits: state.filter_limits,
    };
    // A `requireHello` filter comes later and is paid for then.
    let cost = if params.require_hello {
        IndexCost::Later
    } else {
        IndexCost::Now
    };
    accept(
        state,
        peer,
        request,
        plan,
        cost,
        None,
        move |state, mut socket, mut admitted, mut plan| async move {
            if params.require_hello {
                match hello(&state, &mut socket, &mut session, start, peer).await {
                    Ok((filter, index_wait)) => {
                        plan.filter = filter;
                        admitted.index_wait = index_wait;
                    }
                    Err(end) => return close_before_hello(&state, socket, end).await,
                }
            }
            serve(&state, socket, admitted, plan, session).await
        },
    )
}

/// Waits for a `requireHello` client's first `options_update`, applies it and reserves its
/// index cost: the filter and the wait to subscribe with.
async fn hello(
    state: &AppState,
    socket: &mut Socket,
    session: &mut V1Session,
    start: Start,
    peer: SocketAddr,
) -> Result<(Filter, std::time::Duration), HelloEnd> {
    let mut shutdown = state.shutdown.clone();
    tokio::select! {
        hello = read_hello(state, socket, session, peer) => hello
            .and_then(|filter| match state.hub.reserve_subscribe_from(&filter, start, Some(peer.ip())) {
                Ok(wait) => Ok((filter, wait)),
                Err(busy) => Err(HelloEnd::IndexBusy(busy.would_wait)),
            }),
        _ = shutdown.wait_for(|&s| s) => Err(HelloEnd::Shutdown),
    }
}

/// Waits for the hello and reads it as the session reads any `options_update`: paid for
/// by size, then parsed off the async workers.
async fn read_hello(
    state: &AppState,
    socket: &mut Socket,
    session: &mut V1Session,
    peer: SocketAddr,
) -> Result<Filter, HelloEnd> {
    let text = wait_for_hello(socket).await?;
    if let Some(memory) = socket.memory() {
        memory.message_done();
    }
    let size = text.len();
    let wait = state
        .texts
        .charge_share(Some(peer.ip()), size)
        .map_err(HelloEnd::TextBusy)?;
    tokio::time::sleep(wait).await;
    let options = state
        .texts
        .parse(size, options_job(text, session.limits))
        .await
        .map_err(HelloEnd::TextBusy)?
        .map_err(HelloEnd::Invalid)?;
    session.apply_text(options).ok_or(HelloEnd::Gone)
}

/// Closes a `requireHello` connection that ended before its hello, saying why.
async fn close_before_hello(state: &AppState, mut socket: Socket, end: HelloEnd) {
    let (code, reason) = match end {
        HelloEnd::Shutdown => (
            1012,
            format!(
                "sluice is restarting; resume with your cursor in {} s",
                crate::rate::retry_after(state.session.retry_after_secs)
            ),
        ),
        HelloEnd::Invalid(problem) => (1008, problem),
        HelloEnd::IndexBusy(wait) => (1013, session::index_busy_reason(wait)),
        HelloEnd::TextBusy(busy) => (1013, admission_text::busy_reason(busy)),
        HelloEnd::Gone => return,
    };
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        socket.close(code, &reason),
    )
    .await;
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
    /// The client-text budget could not take the hello in time: close 1013.
    TextBusy(TextBusy),
}

async fn wait_for_hello(socket: &mut Socket) -> Result<Utf8Bytes, HelloEnd> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text),
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
    limits: FilterLimits,
}

impl WireSession for V1Session {
    fn message(&mut self, event: &Event) -> Option<Frame> {
        event.v1_json.clone().map(Frame::Text)
    }

    fn encode(&self, frame: Frame, seq: Option<u64>) -> Option<Frame> {
        zstd::encode(self.zstd.as_deref(), frame, seq)
    }

    fn client_max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Frame> {
        if !self.notices {
            return None;
        }
        let notice =
            jetstream_v1::too_big_notice(event.seq, event.time_us, &event.did, size, limit);
        Some(Frame::Text(Bytes::from(notice)))
    }

    fn ending(&self, end: &End) -> Closing {
        match end {
            End::TooSlow => Closing {
                last: None,
                code: 1008,
                reason: "ConsumerTooSlow".into(),
            },
            End::TooOld { oldest } => Closing {
                last: None,
                code: 1008,
                reason: format!(
                    "CursorTooOld: position fell out of retention (oldest seq {oldest})"
                ),
            },
            End::Closed => Closing::restarting(),
            End::ReadFailed(_) => Closing::internal_error(None),
        }
    }

    fn on_text(&mut self, text: Utf8Bytes) -> Option<TextJob> {
        Some(options_job(text, self.limits))
    }

    fn apply_text(&mut self, options: ClientOptions) -> Option<Filter> {
        if let Some(max) = options.max_message_bytes {
            self.max_message_bytes = max;
        }
        Some(options.filter)
    }
}
