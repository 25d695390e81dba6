//! The HTTP answers handlers share: query parsing, 400s that name the problem, 503s and
//! 429s with `Retry-After`.
//!
//! Owns the shape of every refusal body (`{"error", "message"}`) and the `Retry-After`
//! header. Must never refuse without a message that says what to change or when to retry.

use std::sync::atomic::Ordering;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::admission::Refusal;
use super::app::AppState;
use super::listen::HoldableRefusal;

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

/// HTTP 503 for a subscription whose filter the index budget cannot pay for within
/// `fanout::MAX_INDEX_WAIT`; `wait` is how long it would have taken.
pub fn index_busy_response(wait: std::time::Duration) -> Response {
    refusal_response(&Refusal {
        status: 503,
        reason: "busy with filter changes; retry later",
        retry_after_secs: wait.as_secs() + 1,
    })
}

/// A 429 or 503 with `Retry-After`, marked so that the listener holds it and closes its
/// connection (`listen::hold_refusal`): a client that asks again at once waits.
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
    response.extensions_mut().insert(HoldableRefusal {
        retry_after: std::time::Duration::from_secs(refusal.retry_after_secs),
    });
    response
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
