//! The subscriber endpoints, one file per wire, over one accept path.
//!
//! Each wire's file decides only what is its own: its query parameters, how its cursor
//! resolves and what a client is told about it, its first frames, its [`WireSession`].
//! Everything else happens here, once, in one order ([`accept`]): [`admit`] the connection
//! and reserve the filter's routing-index cost, [`upgrade`] the tuned socket, then [`serve`]:
//! wait out the index wait, subscribe, run the session, record how it ended.
//!
//! Owns that order. Must never upgrade a connection that admission refused or whose index
//! cost could not be reserved (those are answered 429/503 before the upgrade).

pub mod jetstream_v1;
pub mod jetstream_v2;
pub mod raw;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;

use super::admission::{Permit, Refusal};
use super::app::AppState;
use super::reply::{index_busy_response, refusal_response};
use super::session::{self, WireSession};
use super::websocket::{Socket, Upgrade};
use crate::fanout::filter::Filter;
use crate::fanout::{SlowPolicy, Start};
use crate::wire::{Frame, WireKind};

/// What a wire decided about a new subscriber.
pub struct Plan {
    pub wire: WireKind,
    pub filter: Filter,
    pub start: Start,
    pub policy: SlowPolicy,
    /// Sent before the first event (notices about the cursor).
    pub initial: Vec<Frame>,
}

/// An admitted connection: its admission permit (released when this is dropped) and how
/// long its index reservation asks it to wait.
pub struct Admitted {
    _permit: Permit,
    pub index_wait: Duration,
}

/// When the routing-index cost of a subscriber's filter is paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexCost {
    /// Now, before the upgrade: a refusal is a 503 the client can retry.
    Now,
    /// Later, by the wire (v1 `requireHello`: the filter comes in the first message).
    Later,
}

/// Admits the connection and reserves the index cost of `plan`'s filter: the refusal to
/// answer with if either says no (nothing is reserved then).
pub fn admit(
    state: &AppState,
    peer: SocketAddr,
    plan: &Plan,
    cost: IndexCost,
) -> Result<Admitted, Box<Response>> {
    let permit = admit_connection(state, peer)?;
    let index_wait = match cost {
        IndexCost::Later => Duration::ZERO,
        IndexCost::Now => state
            .hub
            .reserve_subscribe_from(&plan.filter, plan.start, Some(peer.ip()))
            .map_err(|busy| Box::new(index_busy_response(busy.would_wait)))?,
    };
    Ok(Admitted {
        _permit: permit,
        index_wait,
    })
}

/// [`admit`]s the connection, then [`upgrade`]s it; `then` runs on the socket with what was
/// admitted and planned. A refusal is answered before the upgrade.
pub fn accept<F, Fut>(
    state: Arc<AppState>,
    peer: SocketAddr,
    request: Upgrade,
    plan: Plan,
    cost: IndexCost,
    subprotocol: Option<&'static str>,
    then: F,
) -> Response
where
    F: FnOnce(Arc<AppState>, Socket, Admitted, Plan) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admitted = match admit(&state, peer, &plan, cost) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    upgrade(&state.clone(), request, subprotocol, move |socket| {
        then(state, socket, admitted, plan)
    })
}

/// Tunes the socket and upgrades (choosing `subprotocol` when the client offered it);
/// `then` runs on the socket.
pub fn upgrade<F, Fut>(
    state: &AppState,
    upgrade: Upgrade,
    subprotocol: Option<&'static str>,
    then: F,
) -> Response
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut upgrade = tune(upgrade, &state.session);
    if let Some(protocol) = subprotocol {
        upgrade = upgrade.protocols([protocol]);
    }
    upgrade.on_upgrade(then)
}

/// The rest of a subscriber's life: waits out the index wait (or ends at shutdown),
/// subscribes as `plan` says, runs `session` until it ends, records how.
pub async fn serve(
    state: &AppState,
    socket: Socket,
    admitted: Admitted,
    plan: Plan,
    session: impl WireSession,
) {
    if !session::pause(admitted.index_wait, &mut state.shutdown.clone()).await {
        return;
    }
    let sub = state
        .hub
        .subscribe(plan.wire, plan.filter, plan.policy, plan.start);
    let end = session::run(
        socket,
        sub,
        session,
        state.session_config(),
        state.shutdown.clone(),
        plan.initial,
        state.stats.counters(plan.wire),
        &state.texts,
    )
    .await;
    state.stats.record_end(&end);
    drop(admitted);
}

/// Per-connection websocket settings for subscribers: they send almost nothing, so a small
/// read buffer (tungstenite zero-fills its whole read buffer before each read: a 128 KiB
/// default cost 40% of the CPU and ~130 KB per idle connection; 512 B instead of 4 KiB
/// saves ~3 KB per idle subscriber, a 0.5 MB `options_update` then takes ~1,000 reads)
/// and the message size bound of `--max-client-message-kib`.
fn tune(upgrade: Upgrade, session: &session::SessionConfig) -> Upgrade {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    upgrade.config(
        WebSocketConfig::default()
            .read_buffer_size(512)
            .max_message_size(Some(session.client_max_message_bytes))
            .max_frame_size(Some(session.client_max_message_bytes)),
    )
}

/// Admits the connection or answers 429/503 with a jittered `Retry-After`.
fn admit_connection(state: &AppState, peer: SocketAddr) -> Result<Permit, Box<Response>> {
    if *state.shutdown.borrow() {
        return Err(Box::new(refusal_response(&Refusal {
            status: 503,
            reason: "shutting down",
            retry_after_secs: crate::rate::retry_after(state.session.retry_after_secs),
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
