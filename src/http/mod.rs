//! The HTTP side: the subscriber router, and the pieces every endpoint uses.
//!
//! Layout, in the order a request meets it: `listen` (accept, deadlines and caps before
//! the upgrade), `websocket` (the upgrade and framed writes), `admission` (rates and
//! connection caps at upgrade time), `subscribe` (one endpoint per wire over one accept
//! path), `session` (a subscriber's life after the upgrade), `lookup` (`/event/{seq}`
//! and the dictionaries), `admin` (the second listener). `app` holds the state handlers
//! share, `reply` the answers they give, `budget` the client-held memory,
//! `admission_text` the parsing of what subscribers send (off the async workers, paid
//! for by size).
//!
//! Must never: do per-event work outside a subscriber's own session task, or upgrade a
//! connection whose parameters are invalid (those get an HTTP 400 naming the problem).

pub mod admin;
pub mod admission;
pub mod admission_text;
pub mod app;
pub mod budget;
pub mod listen;
pub mod lookup;
pub mod reply;
pub mod session;
pub mod subscribe;
pub mod websocket;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use app::AppState;

/// The subscriber-facing router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/subscribe", get(subscribe::jetstream_v1::subscribe))
        .route(
            "/xrpc/network.bsky.jetstream.subscribeEvents",
            get(subscribe::jetstream_v2::subscribe),
        )
        .route(
            "/xrpc/com.atproto.sync.subscribeRepos",
            get(subscribe::raw::subscribe),
        )
        .route("/event/{seq}", get(lookup::event_by_seq))
        .route("/zstd-dictionary", get(lookup::zstd_dictionary))
        .route(
            "/xrpc/network.bsky.jetstream.getZstdDictionary",
            get(lookup::get_zstd_dictionary),
        )
        .with_state(state)
}
