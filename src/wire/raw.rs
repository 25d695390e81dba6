//! Raw `com.atproto.sync.subscribeRepos` passthrough: the upstream frames byte for byte.
//!
//! Owns which events carry a frame on the raw wire. Must never re-encode a frame: the raw
//! wire's promise is rainbow compatibility, so the bytes are exactly what the relay sent.

use crate::event::Event;

/// The frame to send for this event, if any: a frame with several ops becomes several
/// events, and only the first of them carries the frame.
pub fn frame_of(event: &Event) -> Option<&bytes::Bytes> {
    (event.op_index == 0).then_some(&event.raw_frame)
}

// ---- the subscriber endpoint -------------------------------------------------------

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::Response;

use crate::fanout::filter::Filter;
use crate::fanout::{End, SlowPolicy, Start, WireKind};
use crate::http::session::{self, WireSession};
use crate::http::websocket::{Frame, Upgrade};
use crate::http::{bad_request, query_pairs, AppState};
use crate::log::{Cursor, Resolved};

/// A `subscribeRepos` frame: CBOR header then CBOR body, built from JSON (rare frames only).
fn cbor_frame(header: serde_json::Value, body: serde_json::Value) -> Frame {
    let mut out = crate::decode::dagcbor_encode::encode_dag_cbor(&header).unwrap_or_default();
    out.extend(crate::decode::dagcbor_encode::encode_dag_cbor(&body).unwrap_or_default());
    Frame::Binary(out.into())
}

/// `#info` frame.
pub fn info_frame(name: &str, message: &str) -> Frame {
    cbor_frame(
        serde_json::json!({"op": 1, "t": "#info"}),
        serde_json::json!({"name": name, "message": message}),
    )
}

/// Error frame (`op: -1`); the stream ends after it.
pub fn error_frame(error: &str, message: &str) -> Frame {
    cbor_frame(
        serde_json::json!({"op": -1}),
        serde_json::json!({"error": error, "message": message}),
    )
}

/// `GET /xrpc/com.atproto.sync.subscribeRepos`: the upstream frames byte for byte, cursor
/// in upstream seqs (exclusive), optionally only commits touching `wantedCollections`.
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    upgrade: Upgrade,
) -> Response {
    let mut collections = Vec::new();
    let mut cursor = None;
    let mut policy = None;
    for (key, value) in query_pairs(&query) {
        match key.as_str() {
            "cursor" => match value.parse::<i64>() {
                Ok(c) => cursor = Some(c),
                Err(_) => {
                    return bad_request(
                        &state,
                        "InvalidRequest",
                        format!("cursor must be an integer, not {value:?}"),
                    )
                }
            },
            "wantedCollections" => collections.push(value),
            "slowConsumer" => match value.parse::<SlowPolicy>() {
                Ok(p) => policy = Some(p),
                Err(e) => return bad_request(&state, "InvalidRequest", e),
            },
            other => {
                return bad_request(
                    &state,
                    "InvalidRequest",
                    format!("unknown parameter {other:?}"),
                )
            }
        }
    }
    let filter = match Filter::build(&collections, &[], &[], &state.filter_limits) {
        Ok(f) => f,
        Err(e) => return bad_request(&state, "InvalidRequest", e),
    };
    let mut initial = Vec::new();
    let mut future = None;
    let start = match cursor {
        None => Start::Live,
        Some(c) => match crate::http::resolve_settled(&state, Cursor::UpstreamAfter(c)).await {
            Ok(Resolved::From(seq)) => Start::From(seq),
            Ok(Resolved::TooOld { oldest }) => {
                initial.push(info_frame(
                    "OutdatedCursor",
                    "requested cursor exceeded limit. Possibly missing events",
                ));
                Start::From(oldest)
            }
            Ok(Resolved::Future {
                newest_upstream_seq,
            }) => {
                future = Some(newest_upstream_seq);
                Start::Live
            }
            Ok(Resolved::Live { next }) => Start::From(next),
            Err(e) => return crate::http::log_unavailable(&e),
        },
    };
    let permit = match crate::http::admit(&state, peer) {
        Ok(p) => p,
        Err(response) => return *response,
    };
    let index_wait = match state
        .hub
        .reserve_subscribe_from(&filter, start, Some(peer.ip()))
    {
        Ok(wait) => wait,
        Err(wait) => return crate::http::index_busy_response(wait),
    };
    let policy = policy.unwrap_or(state.slow_policy);
    crate::http::tune(upgrade, &state.session).on_upgrade(move |mut socket| async move {
        if let Some(newest) = future {
            let goodbye = async {
                socket
                    .write_frames(&[error_frame(
                        "FutureCursor",
                        &format!("cursor is beyond the newest upstream seq {newest}"),
                    )])
                    .await?;
                socket.close(1000, "").await
            };
            let _ = tokio::time::timeout(state.session.write_timeout, goodbye).await;
            drop(permit);
            return;
        }
        if !session::pause(index_wait, &mut state.shutdown.clone()).await {
            drop(permit);
            return;
        }
        let sub = state.hub.subscribe(WireKind::Raw, filter, policy, start);
        let end = session::run(
            socket,
            sub,
            RawSession {
                last_upstream_seq: None,
            },
            state.session.clone(),
            state.shutdown.clone(),
            initial,
            state.stats.counters(WireKind::Raw),
        )
        .await;
        state.stats.record_end(&end);
        drop(permit);
    })
}

struct RawSession {
    last_upstream_seq: Option<i64>,
}

impl WireSession for RawSession {
    fn message(&mut self, event: &Event) -> Option<Frame> {
        if self.last_upstream_seq == Some(event.upstream_seq) || event.raw_frame.is_empty() {
            return None;
        }
        self.last_upstream_seq = Some(event.upstream_seq);
        Some(Frame::Binary(event.raw_frame.clone()))
    }

    fn client_max_message_bytes(&self) -> usize {
        0
    }

    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Frame> {
        Some(info_frame(
            "EventTooBig",
            &format!(
                "upstream seq {} (sluice seq {}) is {size} bytes, over the limit of {limit}; fetch it at /event/{}?wire=raw",
                event.upstream_seq, event.seq, event.seq
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
            End::TooOld { .. } => (
                Some(info_frame(
                    "OutdatedCursor",
                    "position fell out of retention; reconnect with a newer cursor",
                )),
                1008,
                "OutdatedCursor".into(),
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
        Ok(None)
    }
}
