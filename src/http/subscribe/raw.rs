//! `GET /xrpc/com.atproto.sync.subscribeRepos`: the raw endpoint, the upstream frames
//! byte for byte (rainbow's contract).
//!
//! Owns the raw wire's parameters, its cursor contract (upstream seqs, exclusive;
//! `#info OutdatedCursor` then the oldest frame below the floor; an error frame and close
//! past the tip) and the raw session (each upstream frame as fan-out hands it over, once:
//! `wire::raw::FrameOnce`). Must never send a frame that is not the relay's bytes, except
//! sluice's own `#info` and error frames.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::Response;

use super::{accept, serve, IndexCost, Plan};
use crate::event::Event;
use crate::fanout::filter::Filter;
use crate::fanout::{End, SlowPolicy, Start};
use crate::http::app::{resolve_settled, AppState};
use crate::http::reply::{bad_request, log_unavailable, query_pairs};
use crate::http::session::{Closing, WireSession};
use crate::http::websocket::Upgrade;
use crate::log::{Cursor, Resolved};
use crate::wire::raw::{error_frame, info_frame};
use crate::wire::{Frame, WireKind};

/// `GET /xrpc/com.atproto.sync.subscribeRepos`: the upstream frames byte for byte, cursor
/// in upstream seqs (exclusive), optionally only commits touching `wantedCollections`.
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    request: Upgrade,
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
        Some(c) => match resolve_settled(&state, Cursor::UpstreamAfter(c)).await {
            Ok(Resolved::From(seq)) => Start::From(seq),
            Ok(Resolved::TooOld { oldest }) => {
                initial.extend(info_frame(
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
            Err(e) => return log_unavailable(&e),
        },
    };
    let plan = Plan {
        wire: WireKind::Raw,
        filter,
        start,
        policy: policy.unwrap_or(state.slow_policy),
        initial,
    };
    accept(
        state,
        peer,
        request,
        plan,
        IndexCost::Now,
        None,
        move |state, mut socket, admitted, plan| async move {
            if let Some(newest) = future {
                // Past the tip: say so and close, as the relay does.
                let goodbye = async {
                    let frame = error_frame(
                        "FutureCursor",
                        &format!("cursor is beyond the newest upstream seq {newest}"),
                    );
                    socket.write_frames(frame.as_slice()).await?;
                    socket.close(1000, "").await
                };
                let _ = tokio::time::timeout(state.session.write_timeout, goodbye).await;
                return;
            }
            serve(&state, socket, admitted, plan, RawSession).await
        },
    )
}

/// The raw session: fan-out hands it each upstream frame once (`wire::raw::FrameOnce`),
/// so a message is the event's frame as it is.
struct RawSession;

impl WireSession for RawSession {
    fn message(&mut self, event: &Event) -> Option<Frame> {
        WireKind::Raw
            .payload(event)
            .map(|frame| Frame::Binary(frame.clone()))
    }

    fn client_max_message_bytes(&self) -> usize {
        0
    }

    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Frame> {
        info_frame(
            "EventTooBig",
            &format!(
                "upstream seq {} (sluice seq {}) is {size} bytes, over the limit of {limit}; fetch it at /event/{}?wire=raw",
                event.upstream_seq, event.seq, event.seq
            ),
        )
    }

    fn ending(&self, end: &End) -> Closing {
        match end {
            End::TooSlow => Closing {
                last: error_frame("ConsumerTooSlow", "subscriber queue overflowed"),
                code: 1008,
                reason: "ConsumerTooSlow".into(),
            },
            End::TooOld { .. } => Closing {
                last: info_frame(
                    "OutdatedCursor",
                    "position fell out of retention; reconnect with a newer cursor",
                ),
                code: 1008,
                reason: "OutdatedCursor".into(),
            },
            End::Closed => Closing::restarting(),
            End::ReadFailed(e) => Closing::internal_error(error_frame("InternalError", e)),
        }
    }
}
