//! The GET endpoints that answer from what sluice holds: `/event/{seq}` (any retained
//! event in any wire's bytes) and the zstd dictionaries of v1 and v2.
//!
//! Owns the lookups' limits (per-IP rate, the cold-read pool, the read wait). Must never
//! read the store on a thread of its own: reads below the hot tail take a cold-read slot.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::admission::Refusal;
use super::app::{ensure_zstd_v1, AppState};
use super::reply::{bad_request, query_pairs, refusal_response, unknown_zstd_dictionary};
use crate::wire::WireKind;

/// How long an `/event` read below the hot tail waits for the cold-read pool before 503.
const EVENT_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /event/{seq}?wire=v1|v2|raw`: any retained event in any wire's format, so a
/// subscriber told that an event was too big for it can still fetch it.
pub async fn event_by_seq(
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
    let wire = match WireKind::from_query(&wire) {
        Ok(wire) => wire,
        Err(message) => return bad_request(&state, "InvalidRequest", message),
    };
    let reader = state.hub.reader().clone();
    let payloads = crate::log::Payloads::of_wire(wire);
    let limits = crate::log::ReadLimits {
        max_events: 1,
        max_bytes: 64 * 1024 * 1024,
    };
    let read = if seq >= reader.tail().oldest_seq() {
        // In the hot tail: a lookup in memory.
        Ok(reader.read_from_with(seq, limits, payloads))
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
                retry_after_secs: crate::rate::retry_after(state.session.retry_after_secs),
            });
        };
        let reader = reader.clone();
        tokio::task::spawn_blocking(move || reader.read_from_with(seq, limits, payloads)).await
    };
    let event = match read {
        Ok(Ok(events)) => events.into_iter().next().filter(|e| e.seq == seq),
        // Raw frames have their own retention: below the raw floor the event is still
        // held, as JSON only.
        Ok(Err(crate::log::LogError::TooOld { oldest, .. }))
            if wire == WireKind::Raw && reader.bounds().is_some_and(|b| seq >= b.oldest_seq) =>
        {
            return (
                StatusCode::NOT_FOUND,
                format!(
                    "the raw frame of event {seq} is no longer held: raw frames are kept from \
                     seq {oldest} (--raw-retention-hours, --raw-retention-max-gib); its JSON is \
                     still served with wire=v1 or wire=v2"
                ),
            )
                .into_response()
        }
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
            ([(header::CONTENT_TYPE, wire.content_type())], bytes.clone()).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("event {seq} is not carried on the {} wire", wire.as_str()),
        )
            .into_response(),
    }
}

/// `GET /zstd-dictionary`: the dictionary of v1 `compress=true` (Jetstream's by default).
pub async fn zstd_dictionary(State(state): State<Arc<AppState>>) -> Response {
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
            retry_after_secs: crate::rate::retry_after(state.session.retry_after_secs),
        }),
    }
}

/// `GET /xrpc/network.bsky.jetstream.getZstdDictionary[?id=N]`: the v2 dictionary as raw
/// bytes. Asked for by ID it is immutable, and cacheable as such; without one it is the
/// current dictionary, which a restart with another `--zstd-dictionary-v2` may change.
pub async fn get_zstd_dictionary(
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
