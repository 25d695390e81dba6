//! The HTTP side: subscriber endpoints (one per wire) and the event lookup endpoint.
//!
//! Owns routing, admission before upgrade, and the shared state handed to each session.
//! Must never: do per-event work outside a subscriber's own session task, or upgrade a
//! connection whose parameters are invalid (those get an HTTP 400 naming the problem).

pub mod admin;
pub mod admission;
pub mod budget;
pub mod listen;
pub mod session;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::fanout::filter::FilterLimits;
use crate::fanout::{Hub, SlowPolicy, WireKind};
use crate::wire::zstd::Zstd;
use admission::{Admission, Permit, Refusal};
use session::{SessionConfig, SessionEnd};

/// Counters for metrics, summed over sessions.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub refused_rate: AtomicU64,
    pub refused_full: AtomicU64,
    pub refused_invalid: AtomicU64,
    /// Indexed by [`WireKind::index`].
    pub wires: [session::WireCounters; 3],
    pub v1_cursor_clamped: AtomicU64,
    /// `/event` requests refused: over the per-IP rate, or no cold-read slot in time.
    pub event_refused_rate: AtomicU64,
    pub event_refused_busy: AtomicU64,
    pub ended: parking_lot::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl HttpStats {
    pub fn counters(&self, wire: WireKind) -> &session::WireCounters {
        &self.wires[wire.index()]
    }

    pub fn record_end(&self, end: &SessionEnd) {
        *self.ended.lock().entry(end.reason()).or_default() += 1;
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub hub: Hub,
    pub admission: Admission,
    pub session: SessionConfig,
    pub filter_limits: FilterLimits,
    pub slow_policy: SlowPolicy,
    pub shutdown: watch::Receiver<bool>,
    pub stats: HttpStats,
    /// v1 `compress=true`: set at start (Jetstream's dictionary, or the operator's
    /// `--zstd-dictionary FILE`), or, with `--zstd-dictionary trained`, once sluice's own
    /// is trained in the background after the first client asks (until then
    /// `compress=true` gets a 503 with Retry-After).
    pub zstd_v1: Arc<std::sync::OnceLock<Arc<Zstd>>>,
    pub zstd_v1_training: std::sync::atomic::AtomicBool,
    /// v2 `zstdDictionary=<id>`: the one current dictionary (`--zstd-dictionary-v2`).
    pub zstd_v2: Arc<Zstd>,
    /// Bytes of compressed events each scheme keeps (`--zstd-cache-mib`).
    pub zstd_cache_bytes: usize,
    /// Both listeners' connection counts and the descriptor budget (`http::listen`).
    pub connections: Arc<listen::Connections>,
    /// Cluster nodes: how long a cursor just past this node's log waits for the log to
    /// reach it before it is resolved (zero on a single node). See [`resolve_settled`].
    pub cursor_grace: std::time::Duration,
}

/// Resolves a subscriber's cursor. In a cluster, a cursor past what this node holds is
/// usually one another node has already served (the subscriber moved here when its node
/// died, and this node's reader is a few milliseconds behind): the resolution waits up to
/// `cursor_grace` for this node's log to reach the cursor, so the subscriber continues
/// with no gap and no duplicate. A cursor still ahead after that is resolved as it is
/// (each wire's future-cursor answer). Single node: no wait.
pub async fn resolve_settled(
    state: &AppState,
    cursor: crate::log::Cursor,
) -> Result<crate::log::Resolved, crate::log::LogError> {
    use crate::log::Cursor;
    let reader = state.hub.reader();
    if !state.cursor_grace.is_zero() {
        let deadline = tokio::time::Instant::now() + state.cursor_grace;
        let mut newest = reader.watch_newest();
        loop {
            let reached = match (cursor, reader.bounds()) {
                (_, None) => false,
                (Cursor::Seq(s), Some(b)) => b.newest_seq.saturating_add(1) >= s,
                (Cursor::TimeUs(t), Some(b)) => b.newest_time_us >= t,
                (Cursor::UpstreamAfter(u), Some(b)) => b.newest_upstream_seq >= u,
            };
            if reached {
                break;
            }
            match tokio::time::timeout_at(deadline, newest.changed()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
    }
    reader.resolve(cursor)
}

/// The subscriber-facing router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/subscribe", get(crate::wire::jetstream_v1::subscribe))
        .route(
            "/xrpc/network.bsky.jetstream.subscribeEvents",
            get(crate::wire::jetstream_v2::subscribe),
        )
        .route(
            "/xrpc/com.atproto.sync.subscribeRepos",
            get(crate::wire::raw::subscribe),
        )
        .route("/event/{seq}", get(event_by_seq))
        .route("/zstd-dictionary", get(zstd_dictionary))
        .route(
            "/xrpc/network.bsky.jetstream.getZstdDictionary",
            get(get_zstd_dictionary),
        )
        .with_state(state)
}

/// Query pairs in order, repeated keys kept.
pub fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    match raw {
        Some(q) => url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        None => Vec::new(),
    }
}

/// Parses a boolean query value.
pub fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        other => Err(format!("{name} must be true or false, not {other:?}")),
    }
}

/// An HTTP 400 with a plain or XRPC-style JSON body.
pub fn bad_request(state: &AppState, error: &str, message: String) -> Response {
    state.stats.refused_invalid.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({"error": error, "message": message}).to_string();
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// An HTTP 503 for a subscription whose cursor could not be resolved because the log
/// failed to answer.
pub fn log_unavailable(error: &crate::log::LogError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("log unavailable: {error}"),
    )
        .into_response()
}

/// Per-connection websocket settings for subscribers: they send almost nothing, so a small
/// read buffer (tungstenite zero-fills its whole read buffer before each read: a 128 KiB
/// default cost 40% of the CPU and ~130 KB per idle connection; 512 B instead of 4 KiB
/// saves ~3 KB per idle subscriber, a 0.5 MB `options_update` then takes ~1,000 reads)
/// and the message size bound of `--max-client-message-kib`.
pub fn tune(upgrade: websocket::Upgrade, session: &SessionConfig) -> websocket::Upgrade {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    upgrade.config(
        WebSocketConfig::default()
            .read_buffer_size(512)
            .max_message_size(Some(session.client_max_message_bytes))
            .max_frame_size(Some(session.client_max_message_bytes)),
    )
}

/// Admits the connection or answers 429/503 with a jittered `Retry-After`.
pub fn admit(state: &AppState, peer: SocketAddr) -> Result<Permit, Box<Response>> {
    if *state.shutdown.borrow() {
        return Err(Box::new(refusal_response(&Refusal {
            status: 503,
            reason: "shutting down",
            retry_after_secs: session::retry_after(state.session.retry_after_secs),
        })));
    }
    state.admission.admit(peer.ip()).map_err(|refusal| {
        let counter = if refusal.status == 503 {
            &state.stats.refused_full
        } else {
            &state.stats.refused_rate
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Box::new(refusal_response(&refusal))
    })
}

/// HTTP 503 for a subscription whose filter the index budget cannot pay for within
/// `fanout::MAX_INDEX_WAIT`; `wait` is how long it would have taken.
pub fn index_busy_response(wait: std::time::Duration) -> Response {
    refusal_response(&Refusal {
        status: 503,
        reason: "busy with filter changes; retry later",
        retry_after_secs: wait.as_secs() + 1,
    })
}

pub fn refusal_response(refusal: &Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = (
        status,
        serde_json::json!({"error": "Unavailable", "message": refusal.reason}).to_string(),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&refusal.retry_after_secs.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// How long an `/event` read below the hot tail waits for the cold-read pool before 503.
const EVENT_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /event/{seq}?wire=v1|v2|raw`: any retained event in any wire's format, so a
/// subscriber told that an event was too big for it can still fetch it.
async fn event_by_seq(
    State(state): State<Arc<AppState>>,
    Path(seq): Path<u64>,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Err(refusal) = state.admission.admit_event_request(peer.ip()) {
        state
            .stats
            .event_refused_rate
            .fetch_add(1, Ordering::Relaxed);
        return refusal_response(&refusal);
    }
    // As on the subscribe endpoints: a parameter given twice counts with its last value.
    let wire = query_pairs(&query)
        .into_iter()
        .rfind(|(k, _)| k == "wire")
        .map(|(_, v)| v)
        .unwrap_or_else(|| "v2".to_string());
    let wire = match wire.as_str() {
        "v1" => WireKind::JetstreamV1,
        "v2" => WireKind::JetstreamV2,
        "raw" => WireKind::Raw,
        other => {
            return bad_request(
                &state,
                "InvalidRequest",
                format!("wire must be v1, v2 or raw, not {other:?}"),
            )
        }
    };
    let reader = state.hub.reader().clone();
    let read = if seq >= reader.tail().oldest_seq() {
        // In the hot tail: a lookup in memory.
        Ok(reader.read_from(seq, 1, 64 * 1024 * 1024))
    } else {
        // Below it, a read of the store: through the replays' fair pool, so a flood of
        // lookups takes its turn with them instead of a blocking thread each.
        let Some(_permit) = state.hub.cold_read_permit(EVENT_READ_WAIT).await else {
            state
                .stats
                .event_refused_busy
                .fetch_add(1, Ordering::Relaxed);
            return refusal_response(&Refusal {
                status: 503,
                reason: "busy with log reads; retry later",
                retry_after_secs: session::retry_after(state.session.retry_after_secs),
            });
        };
        tokio::task::spawn_blocking(move || reader.read_from(seq, 1, 64 * 1024 * 1024)).await
    };
    let event = match read {
        Ok(Ok(events)) => events.into_iter().next().filter(|e| e.seq == seq),
        Ok(Err(crate::log::LogError::TooOld { oldest, .. })) => {
            return (
                StatusCode::GONE,
                format!("seq {seq} is older than retention (oldest is {oldest})"),
            )
                .into_response()
        }
        _ => None,
    };
    let Some(event) = event else {
        return (StatusCode::NOT_FOUND, format!("no event with seq {seq}")).into_response();
    };
    match wire.payload(&event) {
        Some(bytes) => {
            let content_type = if wire == WireKind::Raw {
                "application/vnd.ipld.dag-cbor"
            } else {
                "application/json"
            };
            ([(header::CONTENT_TYPE, content_type)], bytes.clone()).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("event {seq} is not carried on the {} wire", wire.as_str()),
        )
            .into_response(),
    }
}

/// With `--zstd-dictionary trained`: starts training sluice's own v1 dictionary if nobody
/// has yet.
pub fn ensure_zstd_v1(state: &AppState) {
    if state.zstd_v1.get().is_some() || state.zstd_v1_training.swap(true, Ordering::AcqRel) {
        return;
    }
    let slot = state.zstd_v1.clone();
    let cache = state.zstd_cache_bytes;
    tokio::task::spawn_blocking(
        move || match crate::wire::jetstream_v1::trained_dictionary() {
            Ok(dictionary) => {
                let _ = slot.set(Arc::new(Zstd::new(dictionary).with_cache_limit(cache)));
                tracing::info!("zstd dictionary trained; compress=true is available");
            }
            Err(e) => tracing::error!(error = %e, "cannot train the zstd dictionary"),
        },
    );
}

/// `GET /zstd-dictionary`: the dictionary of v1 `compress=true` (Jetstream's by default).
async fn zstd_dictionary(State(state): State<Arc<AppState>>) -> Response {
    ensure_zstd_v1(&state);
    match state.zstd_v1.get() {
        Some(zstd) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            zstd.dictionary().clone(),
        )
            .into_response(),
        None => refusal_response(&Refusal {
            status: 503,
            reason: "the dictionary is still being trained",
            retry_after_secs: session::retry_after(state.session.retry_after_secs),
        }),
    }
}

/// The HTTP 400 for a v2 client naming a dictionary ID that is not the current one: the
/// message names the current ID, so the client can fetch it and reconnect.
pub fn unknown_zstd_dictionary(state: &AppState, asked: &str) -> Response {
    let current = state.zstd_v2.id().unwrap_or_default();
    bad_request(
        state,
        "UnknownZstdDictionary",
        format!(
            "unknown zstd dictionary id {asked}; the current dictionary id is {current} \
             (GET /xrpc/network.bsky.jetstream.getZstdDictionary, then reconnect with \
             zstdDictionary={current})"
        ),
    )
}

/// `GET /xrpc/network.bsky.jetstream.getZstdDictionary[?id=N]`: the v2 dictionary as raw
/// bytes. Asked for by ID it is immutable, and cacheable as such; without one it is the
/// current dictionary, which a restart with another `--zstd-dictionary-v2` may change.
async fn get_zstd_dictionary(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let current = state.zstd_v2.id().unwrap_or_default();
    let mut by_id = false;
    for (key, value) in query_pairs(&query) {
        match key.as_str() {
            "id" => {
                if value.parse::<u32>().ok() != Some(current) {
                    return unknown_zstd_dictionary(&state, &value);
                }
                by_id = true;
            }
            other => {
                return bad_request(
                    &state,
                    "InvalidRequest",
                    format!("unknown parameter {other:?}; this endpoint takes id"),
                )
            }
        }
    }
    let cache = if by_id {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=300"
    };
    let etag = format!("\"zstd-dictionary-{current}\"");
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, cache),
        ],
        state.zstd_v2.dictionary().clone(),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}
