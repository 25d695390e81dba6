//! `GET /xrpc/network.bsky.jetstream.subscribeEvents`: the Jetstream v2 endpoint.
//!
//! Owns v2's parameters, its cursor contract (seq cursors, with 0 meaning "before the
//! first event"; unix-µs cursors at or above [`TIME_CURSOR_FLOOR`]; `CursorTooOld` below
//! the floor for seqs, `#info OutdatedCursor` for times, `#info FutureCursor` past the
//! tip), the `zstdDictionary` choice and the v2 session. Must never accept a v1
//! parameter silently: each gets a 400 naming the v2 way.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::Response;

use super::{accept, serve, IndexCost, Plan};
use crate::event::Event;
use crate::fanout::filter::{Filter, Kind};
use crate::fanout::{End, SlowPolicy, Start};
use crate::http::app::{resolve_settled, AppState};
use crate::http::reply::{bad_request, log_unavailable, query_pairs, unknown_zstd_dictionary};
use crate::http::session::{Closing, WireSession};
use crate::http::websocket::Upgrade;
use crate::log::{Cursor, Resolved};
use crate::wire::jetstream_v2::{error_frame, info};
use crate::wire::zstd::{self, Zstd};
use crate::wire::{Frame, WireKind};

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

/// `GET /xrpc/network.bsky.jetstream.subscribeEvents`.
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    request: Upgrade,
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
                return unknown_zstd_dictionary(&state, asked);
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
            match resolve_settled(&state, cursor).await {
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
                Err(e) => return log_unavailable(&e),
            }
        }
    };
    let plan = Plan {
        wire: WireKind::JetstreamV2,
        filter: params.filter,
        start,
        policy: params.policy.unwrap_or(state.slow_policy),
        initial,
    };
    let session = V2Session {
        max_message_bytes: params.max_message_bytes,
        zstd,
    };
    accept(
        state,
        peer,
        request,
        plan,
        IndexCost::Now,
        Some(SUBPROTOCOL),
        move |state, socket, admitted, plan| async move {
            serve(&state, socket, admitted, plan, session).await
        },
    )
}

struct V2Session {
    max_message_bytes: usize,
    /// With `zstdDictionary`: every message (events, `#info`, error frames) goes out as one
    /// zstd frame of its text, in a binary message.
    zstd: Option<Arc<Zstd>>,
}

impl WireSession for V2Session {
    fn message(&mut self, event: &Event) -> Option<Frame> {
        event.v2_json.clone().map(Frame::Text)
    }

    fn encode(&self, frame: Frame, seq: Option<u64>) -> Option<Frame> {
        zstd::encode(self.zstd.as_deref(), frame, seq)
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

    fn ending(&self, end: &End) -> Closing {
        match end {
            End::TooSlow => Closing {
                last: Some(error_frame(
                    "ConsumerTooSlow",
                    "subscriber queue overflowed",
                )),
                code: 1008,
                reason: "ConsumerTooSlow".into(),
            },
            End::TooOld { oldest } => Closing {
                last: Some(error_frame(
                    "CursorTooOld",
                    &format!("position fell out of retention; the oldest seq held is {oldest}"),
                )),
                code: 1008,
                reason: "CursorTooOld".into(),
            },
            End::Closed => Closing::restarting(),
            End::ReadFailed(e) => Closing::internal_error(Some(error_frame("InternalError", e))),
        }
    }
}
