//! What every HTTP handler shares: [`AppState`] (the hub, admission, session settings,
//! compression, connection counts) and [`HttpStats`], the counters the sessions add to.
//!
//! Owns the state handed to each handler and how a cursor is resolved against this node's
//! log. Must never answer a request itself: the handlers (`subscribe`, `lookup`) do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::admission::Admission;
use super::listen::Connections;
use super::session::{SessionConfig, SessionEnd, WireCounters};
use crate::fanout::filter::FilterLimits;
use crate::fanout::{Hub, SlowPolicy};
use crate::wire::zstd::Zstd;
use crate::wire::WireKind;

/// Counters for metrics, summed over sessions.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub refused_rate: AtomicU64,
    pub refused_full: AtomicU64,
    pub refused_invalid: AtomicU64,
    /// Indexed by [`WireKind::index`].
    pub wires: [Arc<WireCounters>; 3],
    pub v1_cursor_clamped: AtomicU64,
    /// `/event` requests refused: over the per-IP rate, or no cold-read slot in time.
    pub event_refused_rate: AtomicU64,
    pub event_refused_busy: AtomicU64,
    pub ended: parking_lot::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl HttpStats {
    pub fn counters(&self, wire: WireKind) -> &Arc<WireCounters> {
        &self.wires[wire.index()]
    }

    pub fn record_end(&self, end: &SessionEnd) {
        *self.ended.lock().entry(end.reason()).or_default() += 1;
    }
}

/// The per-session settings SIGHUP may change. Each session takes them when it starts:
/// a running session keeps the ones it started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub client_message_timeout: std::time::Duration,
    pub client_updates_per_sec: u32,
}

impl SessionLimits {
    pub fn of(config: &SessionConfig) -> Self {
        Self {
            client_message_timeout: config.client_message_timeout,
            client_updates_per_sec: config.client_updates_per_sec,
        }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub hub: Hub,
    pub admission: Admission,
    /// Session settings as started; [`AppState::session_config`] is what a new session
    /// runs with (the reloadable ones replaced by those in force).
    pub session: SessionConfig,
    /// The reloadable session settings in force (SIGHUP).
    pub session_limits: parking_lot::Mutex<SessionLimits>,
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
    pub connections: Arc<Connections>,
    /// Parses what subscribers send (off the async workers) and charges it by size.
    pub texts: Arc<super::admission_text::TextPool>,
    /// Cluster nodes: how long a cursor just past this node's log waits for the log to
    /// reach it before it is resolved (zero on a single node). See [`resolve_settled`].
    pub cursor_grace: std::time::Duration,
}

impl AppState {
    /// The settings a session starting now runs with.
    pub fn session_config(&self) -> SessionConfig {
        let limits = *self.session_limits.lock();
        SessionConfig {
            client_message_timeout: limits.client_message_timeout,
            client_updates_per_sec: limits.client_updates_per_sec,
            ..self.session.clone()
        }
    }
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

/// With `--zstd-dictionary trained`: starts training sluice's own v1 dictionary if nobody
/// has yet.
pub fn ensure_zstd_v1(state: &AppState) {
    if state.zstd_v1.get().is_some() || state.zstd_v1_training.swap(true, Ordering::AcqRel) {
        return;
    }
    let slot = state.zstd_v1.clone();
    let cache = state.zstd_cache_bytes;
    tokio::task::spawn_blocking(move || match crate::ingest::trained_v1_dictionary() {
        Ok(dictionary) => {
            let _ = slot.set(Arc::new(Zstd::new(dictionary).with_cache_limit(cache)));
            tracing::info!("zstd dictionary trained; compress=true is available");
        }
        Err(e) => tracing::error!(error = %e, "cannot train the zstd dictionary"),
    });
}
