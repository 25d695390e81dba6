//! The admin listener: `/metrics` (Prometheus), `/healthz`, `/readyz`, `/status.json` and a
//! human status page at `/`.
//!
//! Owns the translation of every stage's counters into metrics and status. Must never do
//! work per event: everything here is read from counters at request time.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde_json::json;

use crate::fanout::{Hub, WireKind};
use crate::http::AppState;
use crate::ingest::{now_us, IngestStats};
use crate::log::Log;
use crate::upstream::client::UpstreamShared;

const WIRES: [WireKind; 3] = [WireKind::JetstreamV1, WireKind::JetstreamV2, WireKind::Raw];

/// What the admin endpoints read.
pub struct AdminState {
    pub log: Arc<Log>,
    pub hub: Hub,
    pub app: Arc<AppState>,
    pub upstream: Arc<UpstreamShared>,
    pub ingest_stats: Arc<parking_lot::Mutex<IngestStats>>,
    /// Ready only while the newest event is at most this far behind the wall clock.
    pub ready_max_lag: Duration,
    /// The log's writer queue bound: ready only while the queue is below 90% of it.
    pub log_queue_max_bytes: usize,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl AdminState {
    pub fn new(
        log: Arc<Log>,
        hub: Hub,
        app: Arc<AppState>,
        upstream: Arc<UpstreamShared>,
        ingest_stats: Arc<parking_lot::Mutex<IngestStats>>,
        ready_max_lag: Duration,
        log_queue_max_bytes: usize,
    ) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Self {
            log,
            hub,
            app,
            upstream,
            ingest_stats,
            ready_max_lag,
            log_queue_max_bytes,
            recorder,
            handle,
        }
    }

    fn lag_seconds(&self) -> Option<f64> {
        self.log
            .reader()
            .bounds()
            .map(|b| (now_us() - b.newest_time_us) as f64 / 1e6)
    }

    /// Why the daemon is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        if !self.upstream.connected.load(Ordering::Relaxed) {
            return Some("upstream not connected".into());
        }
        if self.log.queued_bytes() * 10 >= self.log_queue_max_bytes * 9 {
            return Some("event log is not keeping up (writer queue full)".into());
        }
        match self.lag_seconds() {
            None => Some("no events ingested yet".into()),
            Some(lag) if lag > self.ready_max_lag.as_secs_f64() => Some(format!(
                "upstream lag {lag:.1} s exceeds {} s",
                self.ready_max_lag.as_secs()
            )),
            Some(_) => None,
        }
    }

    /// Sets every metric from the current counters and renders them.
    pub fn render_metrics(&self) -> String {
        use metrics::{counter, gauge};
        metrics::with_local_recorder(&self.recorder, || {
            let ingest = self.ingest_stats.lock().clone();
            for (kind, n) in &ingest.events_by_kind {
                counter!("sluice_ingested_events_total", "kind" => *kind).absolute(*n);
            }
            for (collection, n) in &ingest.events_by_collection {
                counter!("sluice_ingested_commit_ops_total", "collection" => collection.clone())
                    .absolute(*n);
            }
            for (reason, n) in &ingest.decode_errors_by_reason {
                counter!("sluice_decode_errors_total", "reason" => *reason).absolute(*n);
            }
            counter!("sluice_upstream_frames_total").absolute(ingest.frames);
            counter!("sluice_upstream_duplicates_dropped_total")
                .absolute(ingest.duplicates_dropped);
            counter!("sluice_upstream_seq_regressions_total").absolute(ingest.seq_regressions);
            counter!("sluice_records_missing_total").absolute(ingest.records_missing);
            counter!("sluice_too_big_commits_total").absolute(ingest.too_big_commits);
            let up = &self.upstream;
            gauge!("sluice_upstream_connected").set(if up.connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            });
            counter!("sluice_upstream_reconnects_total")
                .absolute(up.reconnects.load(Ordering::Relaxed));
            counter!("sluice_upstream_stalls_total").absolute(up.stalls.load(Ordering::Relaxed));
            counter!("sluice_upstream_oversized_frames_total")
                .absolute(up.oversized_frames.load(Ordering::Relaxed));
            if let Some(lag) = self.lag_seconds() {
                gauge!("sluice_upstream_lag_seconds").set(lag);
            }
            let hub = self.hub.stats();
            for wire in WIRES {
                let name = wire.as_str();
                gauge!("sluice_subscribers", "wire" => name).set(hub.subscribers(wire) as f64);
                let c = self.app.stats.counters(wire);
                counter!("sluice_delivered_events_total", "wire" => name)
                    .absolute(c.events.load(Ordering::Relaxed));
                counter!("sluice_delivered_bytes_total", "wire" => name)
                    .absolute(c.bytes.load(Ordering::Relaxed));
                counter!("sluice_oversized_events_total", "wire" => name)
                    .absolute(c.oversized.load(Ordering::Relaxed));
            }
            gauge!("sluice_queued_events").set(self.hub.queued_events() as f64);
            counter!("sluice_slow_consumer_transitions_total", "to" => "catchup")
                .absolute(hub.overflows.load(Ordering::Relaxed));
            counter!("sluice_slow_consumer_transitions_total", "to" => "live")
                .absolute(hub.rejoins.load(Ordering::Relaxed));
            for (reason, n) in self.app.stats.ended.lock().iter() {
                counter!("sluice_subscriber_disconnects_total", "reason" => *reason).absolute(*n);
            }
            counter!("sluice_admission_refused_total", "reason" => "rate")
                .absolute(self.app.stats.refused_rate.load(Ordering::Relaxed));
            counter!("sluice_admission_refused_total", "reason" => "full")
                .absolute(self.app.stats.refused_full.load(Ordering::Relaxed));
            counter!("sluice_admission_refused_total", "reason" => "invalid")
                .absolute(self.app.stats.refused_invalid.load(Ordering::Relaxed));
            gauge!("sluice_active_replays").set(hub.catchups_active.load(Ordering::Relaxed) as f64);
            counter!("sluice_cold_reads_total").absolute(hub.cold_reads.load(Ordering::Relaxed));
            counter!("sluice_index_budget_total", "outcome" => "waited")
                .absolute(hub.index_waits.load(Ordering::Relaxed));
            counter!("sluice_index_budget_total", "outcome" => "refused")
                .absolute(hub.index_refusals.load(Ordering::Relaxed));
            counter!("sluice_index_budget_total", "outcome" => "rejoin_deferred")
                .absolute(hub.rejoins_deferred.load(Ordering::Relaxed));
            let reader = self.log.reader();
            gauge!("sluice_log_bytes").set(reader.store().size_bytes() as f64);
            gauge!("sluice_log_disk_bytes").set(reader.store().disk_bytes() as f64);
            gauge!("sluice_log_tail_bytes").set(reader.tail().bytes() as f64);
            gauge!("sluice_log_writer_queue_bytes").set(self.log.queued_bytes() as f64);
            counter!("sluice_log_commits_total")
                .absolute(self.log.writer_stats().commits.load(Ordering::Relaxed));
            counter!("sluice_log_commit_failures_total").absolute(
                self.log
                    .writer_stats()
                    .commit_failures
                    .load(Ordering::Relaxed),
            );
            counter!("sluice_log_retention_deleted_events_total").absolute(
                self.log
                    .retention_stats()
                    .deleted_events
                    .load(Ordering::Relaxed),
            );
            if let Some(b) = reader.bounds() {
                gauge!("sluice_log_oldest_seq").set(b.oldest_seq as f64);
                gauge!("sluice_log_newest_seq").set(b.newest_seq as f64);
                gauge!("sluice_log_oldest_time_seconds").set(b.oldest_time_us as f64 / 1e6);
                gauge!("sluice_log_newest_time_seconds").set(b.newest_time_us as f64 / 1e6);
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                gauge!("sluice_runtime_worker_threads").set(runtime.metrics().num_workers() as f64);
            }
            gauge!("sluice_ready").set(if self.not_ready().is_none() { 1.0 } else { 0.0 });
        });
        self.handle.render()
    }

    /// The status page's data.
    pub fn status(&self) -> serde_json::Value {
        let ingest = self.ingest_stats.lock().clone();
        let reader = self.log.reader();
        let hub = self.hub.stats();
        let wires: serde_json::Map<String, serde_json::Value> = WIRES
            .iter()
            .map(|&w| {
                let c = self.app.stats.counters(w);
                (
                    w.as_str().to_string(),
                    json!({
                        "subscribers": hub.subscribers(w),
                        "delivered_events": c.events.load(Ordering::Relaxed),
                        "delivered_bytes": c.bytes.load(Ordering::Relaxed),
                        "oversized": c.oversized.load(Ordering::Relaxed),
                    }),
                )
            })
            .collect();
        json!({
            "now_us": now_us(),
            "ready": self.not_ready().is_none(),
            "not_ready_reason": self.not_ready(),
            "upstream": {
                "connected": self.upstream.connected.load(Ordering::Relaxed),
                "reconnects": self.upstream.reconnects.load(Ordering::Relaxed),
                "lag_seconds": self.lag_seconds(),
                "frames": ingest.frames,
                "decode_errors": ingest.decode_errors,
            },
            "events_by_collection": ingest.events_by_collection,
            "events_by_kind": ingest.events_by_kind,
            "wires": wires,
            "slow": {
                "catching_up": hub.catchups_active.load(Ordering::Relaxed),
                "to_catchup": hub.overflows.load(Ordering::Relaxed),
                "rejoined": hub.rejoins.load(Ordering::Relaxed),
                "disconnects": *self.app.stats.ended.lock(),
            },
            "log": {
                "bounds": reader.bounds().map(|b| json!({
                    "oldest_seq": b.oldest_seq, "newest_seq": b.newest_seq,
                    "oldest_time_us": b.oldest_time_us, "newest_time_us": b.newest_time_us,
                })),
                "bytes": reader.store().size_bytes(),
                "tail_bytes": reader.tail().bytes(),
            },
        })
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics_text(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.render_metrics(),
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    match state.not_ready() {
        None => (StatusCode::OK, "ready").into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

async fn status_json(State(state): State<Arc<AdminState>>) -> Response {
    axum::Json(state.status()).into_response()
}

async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}
