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

use crate::clock::now_us;
use crate::decode::DecodeError;
use crate::event::EventKind;
use crate::fanout::Hub;
use crate::http::app::AppState;
use crate::http::budget::Spent;
use crate::http::listen::{Hold, Linger, Refused, Side};
use crate::http::session::SessionEnd;
use crate::ingest::IngestStats;
use crate::log::Log;
use crate::sink::{SinkError, SinkStats};
use crate::upstream::client::UpstreamShared;
use crate::wire::WireKind;

/// What the admin endpoints read.
pub struct AdminState {
    pub log: Arc<Log>,
    pub hub: Hub,
    pub app: Arc<AppState>,
    pub upstream: Arc<UpstreamShared>,
    pub ingest_stats: Arc<parking_lot::Mutex<IngestStats>>,
    pub limits: AdminLimits,
    /// Set when this node is part of a cluster.
    pub cluster: Option<Arc<crate::cluster::ClusterShared>>,
    /// The Redis sink's counters, when it runs.
    pub sink: Option<Arc<SinkStats>>,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

/// The configured bounds readiness and metrics are judged against.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Ready only while the newest event is at most this far behind the wall clock.
    pub ready_max_lag: Duration,
    /// The log's writer queue bound: ready only while the queue is below 90% of it.
    pub log_queue_max_bytes: usize,
    /// The log's size cap (`--retention-max-gib`), exported so alerts can compare.
    pub log_max_bytes: u64,
    /// The log's age limit (`--retention-hours`), for the depth projection.
    pub log_max_age: Duration,
    /// Raw frames' own limits (`--raw-retention-*`), when they have them.
    pub log_raw: Option<crate::log::RawRetention>,
}

impl AdminLimits {
    fn retention(&self) -> crate::log::RetentionConfig {
        crate::log::RetentionConfig {
            max_age: self.log_max_age,
            max_bytes: self.log_max_bytes,
            raw: self.log_raw,
            ..crate::log::RetentionConfig::default()
        }
    }
}

impl AdminState {
    pub fn new(
        log: Arc<Log>,
        hub: Hub,
        app: Arc<AppState>,
        upstream: Arc<UpstreamShared>,
        ingest_stats: Arc<parking_lot::Mutex<IngestStats>>,
        limits: AdminLimits,
        sink: Option<Arc<SinkStats>>,
    ) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, describe_metrics);
        let handle = recorder.handle();
        Self {
            log,
            hub,
            app,
            upstream,
            ingest_stats,
            limits,
            cluster: None,
            sink,
            recorder,
            handle,
        }
    }

    /// The live-reloadable limits in force, named like their settings and in their units.
    fn live_limits(&self) -> Vec<(&'static str, f64)> {
        const MIB: f64 = 1024.0 * 1024.0;
        let admission = self.app.admission.config();
        let connections = &self.app.connections;
        let listen = connections.limits(Side::Subscriber);
        let memory = connections.memory().config();
        let budgets = self.hub.budgets();
        let texts = self.app.texts.config();
        let session = *self.app.session_limits.lock();
        vec![
            ("max_subscribers", admission.max_subscribers as f64),
            ("connects_per_sec", admission.connects_per_sec),
            ("connect_burst", admission.connect_burst),
            ("max_per_ip", admission.max_per_ip as f64),
            ("connects_per_sec_per_ip", admission.connects_per_sec_per_ip),
            (
                "event_requests_per_sec_per_ip",
                admission.event_requests_per_sec_per_ip,
            ),
            ("event_requests_per_sec", admission.event_requests_per_sec),
            (
                "header_read_timeout_secs",
                listen.header_read_timeout.as_secs_f64(),
            ),
            (
                "handshake_timeout_secs",
                listen.handshake_timeout.as_secs_f64(),
            ),
            ("max_pending_connections", listen.max_pending as f64),
            ("max_pending_per_ip", listen.max_pending_per_ip as f64),
            ("refusal_hold_ms", listen.refusal_hold.as_millis() as f64),
            (
                "max_held_refusals_per_ip",
                listen.max_held_refusals_per_ip as f64,
            ),
            (
                "refusal_linger_ms",
                listen.refusal_linger.as_millis() as f64,
            ),
            (
                "max_lingering_refusals_per_ip",
                listen.max_lingering_refusals_per_ip as f64,
            ),
            (
                "max_lingering_refusals",
                listen.max_lingering_refusals as f64,
            ),
            (
                "max_request_head_kib",
                listen.max_head_bytes as f64 / 1024.0,
            ),
            ("fd_reserve", connections.reserve() as f64),
            ("client_memory_mib", memory.total_bytes as f64 / MIB),
            ("client_memory_per_ip_mib", memory.per_ip_bytes as f64 / MIB),
            ("max_index_changes_per_sec", budgets.index_total as f64),
            (
                "max_index_changes_per_sec_per_ip",
                budgets.index_per_ip as f64,
            ),
            ("scan_events_per_sec", budgets.scan_total as f64),
            ("scan_events_per_sec_per_ip", budgets.scan_per_ip as f64),
            ("replay_events_per_sec", budgets.replay_per_conn as f64),
            (
                "client_message_timeout_secs",
                session.client_message_timeout.as_secs_f64(),
            ),
            (
                "max_client_updates_per_sec",
                f64::from(session.client_updates_per_sec),
            ),
            (
                "client_text_kib_per_sec",
                texts.bytes_per_sec as f64 / 1024.0,
            ),
            (
                "client_text_kib_per_sec_per_ip",
                texts.bytes_per_sec_per_ip as f64 / 1024.0,
            ),
        ]
    }

    fn lag_seconds(&self) -> Option<f64> {
        self.log
            .reader()
            .bounds()
            .map(|b| (now_us() - b.newest_time_us) as f64 / 1e6)
    }

    /// Why the daemon is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        match &self.cluster {
            // A standby reads the shared stream, not the upstream.
            Some(cluster) => {
                if let Some(why) = cluster.not_ready() {
                    return Some(why);
                }
                if cluster.role() == crate::cluster::Role::Leader
                    && !self.upstream.connected.load(Ordering::Relaxed)
                {
                    return Some("leader: upstream not connected".into());
                }
            }
            None => {
                if !self.upstream.connected.load(Ordering::Relaxed) {
                    return Some("upstream not connected".into());
                }
            }
        }
        if self.log.queued_bytes() * 10 >= self.limits.log_queue_max_bytes * 9 {
            return Some("event log is not keeping up (writer queue full)".into());
        }
        match self.lag_seconds() {
            None => Some("no events ingested yet".into()),
            Some(lag) if lag > self.limits.ready_max_lag.as_secs_f64() => Some(format!(
                "upstream lag {lag:.1} s exceeds {} s",
                self.limits.ready_max_lag.as_secs()
            )),
            Some(_) => None,
        }
    }

    /// Sets every metric from the current counters and renders them.
    pub fn render_metrics(&self) -> String {
        use metrics::{counter, gauge};
        metrics::with_local_recorder(&self.recorder, || {
            let ingest = self.ingest_stats.lock().clone();
            // Every known label value is exported from the first scrape, at 0 until it
            // happens, so `rate()` and `absent()` work on a healthy daemon.
            for kind in EventKind::ALL.map(EventKind::as_str) {
                let n = ingest.events_by_kind.get(kind).copied().unwrap_or(0);
                counter!("sluice_ingested_events_total", "kind" => kind).absolute(n);
            }
            for (collection, n) in &ingest.events_by_collection {
                counter!("sluice_ingested_commit_ops_total", "collection" => collection.clone())
                    .absolute(*n);
            }
            for reason in DecodeError::REASONS {
                let n = ingest
                    .decode_errors_by_reason
                    .get(reason)
                    .copied()
                    .unwrap_or(0);
                counter!("sluice_decode_errors_total", "reason" => reason).absolute(n);
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
            // Before the first event there is no lag to speak of: NaN, which no threshold
            // alert fires on (`sluice_upstream_connected` and readiness cover that case).
            gauge!("sluice_upstream_lag_seconds").set(self.lag_seconds().unwrap_or(f64::NAN));
            let hub = self.hub.stats();
            for wire in WireKind::ALL {
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
            let ended = self.app.stats.ended.lock().clone();
            for reason in SessionEnd::REASONS {
                let n = ended.get(reason).copied().unwrap_or(0);
                counter!("sluice_subscriber_disconnects_total", "reason" => reason).absolute(n);
            }
            counter!("sluice_admission_refused_total", "reason" => "rate")
                .absolute(self.app.stats.refused_rate.load(Ordering::Relaxed));
            counter!("sluice_admission_refused_total", "reason" => "full")
                .absolute(self.app.stats.refused_full.load(Ordering::Relaxed));
            counter!("sluice_admission_refused_total", "reason" => "invalid")
                .absolute(self.app.stats.refused_invalid.load(Ordering::Relaxed));
            let v1 = self.app.zstd_v1.get();
            for (scheme, zstd) in [("v1", v1.map(|z| &**z)), ("v2", Some(&*self.app.zstd_v2))] {
                counter!("sluice_zstd_compressed_events_total", "scheme" => scheme)
                    .absolute(zstd.map_or(0, |z| z.compressed_count()));
                counter!("sluice_zstd_failures_total", "scheme" => scheme)
                    .absolute(zstd.map_or(0, |z| z.failed_count()));
                counter!("sluice_zstd_uncached_events_total", "scheme" => scheme)
                    .absolute(zstd.map_or(0, |z| z.uncached_count()));
                gauge!("sluice_zstd_cache_bytes", "scheme" => scheme)
                    .set(zstd.map_or(0, |z| z.cache_bytes()) as f64);
            }
            let connections = &self.app.connections;
            for side in [Side::Subscriber, Side::Admin] {
                let name = side.as_str();
                let stats = connections.stats(side);
                gauge!("sluice_connections_open", "listener" => name)
                    .set(stats.open.load(Ordering::Relaxed) as f64);
                gauge!("sluice_connections_pending", "listener" => name)
                    .set(stats.pending.load(Ordering::Relaxed) as f64);
                counter!("sluice_connections_accepted_total", "listener" => name)
                    .absolute(stats.accepted.load(Ordering::Relaxed));
                for why in Refused::ALL {
                    counter!("sluice_connections_refused_total", "listener" => name, "reason" => why.reason())
                        .absolute(stats.refused(why));
                }
                for (reason, n) in [
                    ("header_timeout", &stats.header_timeouts),
                    ("handshake_timeout", &stats.handshake_timeouts),
                    ("shutdown", &stats.closed_on_shutdown),
                    ("uri_too_long", &stats.uri_too_long),
                ] {
                    counter!("sluice_connections_closed_unfinished_total", "listener" => name, "reason" => reason)
                        .absolute(n.load(Ordering::Relaxed));
                }
                counter!("sluice_connections_accept_errors_total", "listener" => name)
                    .absolute(stats.accept_errors.load(Ordering::Relaxed));
                gauge!("sluice_refusals_held", "listener" => name)
                    .set(stats.held.load(Ordering::Relaxed) as f64);
                for how in Hold::ALL {
                    counter!("sluice_refusals_total", "listener" => name, "answered" => how.reason())
                        .absolute(stats.holds(how));
                }
                gauge!("sluice_refusals_lingering", "listener" => name)
                    .set(stats.lingering.load(Ordering::Relaxed) as f64);
                for how in Linger::ALL {
                    counter!("sluice_connections_refused_closes_total", "listener" => name, "closed" => how.reason())
                        .absolute(stats.lingers(how));
                }
                if let Some(cap) = connections.cap(side) {
                    gauge!("sluice_connections_fd_cap", "listener" => name).set(cap as f64);
                }
            }
            counter!("sluice_event_requests_refused_total", "reason" => "rate")
                .absolute(self.app.stats.event_refused_rate.load(Ordering::Relaxed));
            counter!("sluice_event_requests_refused_total", "reason" => "busy")
                .absolute(self.app.stats.event_refused_busy.load(Ordering::Relaxed));
            let memory = connections.memory();
            gauge!("sluice_client_memory_bytes").set(memory.used() as f64);
            gauge!("sluice_client_memory_limit_bytes").set(memory.config().total_bytes as f64);
            for why in [Spent::Total, Spent::PerIp] {
                counter!("sluice_client_memory_refused_total", "budget" => why.reason())
                    .absolute(memory.refused(why));
            }
            if let Some(nofile) = connections.nofile() {
                gauge!("sluice_open_file_limit").set(nofile as f64);
            }
            let texts = &self.app.texts.stats;
            counter!("sluice_client_text_messages_total", "parsed" => "inline")
                .absolute(texts.inline.load(Ordering::Relaxed));
            counter!("sluice_client_text_messages_total", "parsed" => "pool")
                .absolute(texts.pooled.load(Ordering::Relaxed));
            counter!("sluice_client_text_bytes_total")
                .absolute(texts.bytes.load(Ordering::Relaxed));
            counter!("sluice_client_text_budget_total", "outcome" => "waited")
                .absolute(texts.waited.load(Ordering::Relaxed));
            counter!("sluice_client_text_budget_total", "outcome" => "refused")
                .absolute(texts.refused.load(Ordering::Relaxed));
            for (setting, value) in self.live_limits() {
                gauge!("sluice_limit", "setting" => setting).set(value);
            }
            gauge!("sluice_active_replays").set(hub.catchups_active.load(Ordering::Relaxed) as f64);
            counter!("sluice_cold_reads_total").absolute(hub.cold_reads.load(Ordering::Relaxed));
            let pool = self.hub.catchup();
            gauge!("sluice_catchup_pool_threads").set(pool.threads_alive() as f64);
            gauge!("sluice_catchup_pool_work", "kind" => "read")
                .set(pool.stats().reads.load(Ordering::Relaxed) as f64);
            gauge!("sluice_catchup_pool_work", "kind" => "write")
                .set(pool.stats().writes.load(Ordering::Relaxed) as f64);
            counter!("sluice_catchup_pool_panics_total")
                .absolute(pool.stats().panics.load(Ordering::Relaxed));
            let starvation = pool.starvation();
            let watched = |f: fn(&crate::priority::WatchStats) -> u64| starvation.map_or(0, f);
            counter!("sluice_catchup_pool_raises_total")
                .absolute(watched(|w| w.raises.load(Ordering::Relaxed)));
            counter!("sluice_catchup_pool_raise_refusals_total")
                .absolute(watched(|w| w.refused.load(Ordering::Relaxed)));
            gauge!("sluice_catchup_pool_starvation_bound_seconds")
                .set(pool.starvation_bound().as_secs_f64());
            gauge!("sluice_catchup_pool_raised")
                .set(watched(|w| u64::from(w.raised.load(Ordering::Relaxed))) as f64);
            gauge!("sluice_catchup_pace_bytes_per_second").set(pool.pace_bytes_per_sec() as f64);
            gauge!("sluice_catchup_pace_events_per_second").set(pool.pace_events_per_sec() as f64);
            counter!("sluice_catchup_paced_writes_total")
                .absolute(pool.stats().paced_writes.load(Ordering::Relaxed));
            counter!("sluice_catchup_paced_seconds_total")
                .absolute(pool.stats().paced_ns.load(Ordering::Relaxed) / 1_000_000_000);
            counter!("sluice_catchup_paced_bytes_total")
                .absolute(pool.stats().paced_bytes.load(Ordering::Relaxed));
            counter!("sluice_catchup_paced_events_total")
                .absolute(pool.stats().paced_events.load(Ordering::Relaxed));
            counter!("sluice_index_budget_total", "outcome" => "waited")
                .absolute(hub.index_waits.load(Ordering::Relaxed));
            counter!("sluice_index_budget_total", "outcome" => "refused")
                .absolute(hub.index_refusals.load(Ordering::Relaxed));
            counter!("sluice_index_budget_total", "outcome" => "rejoin_deferred")
                .absolute(hub.rejoins_deferred.load(Ordering::Relaxed));
            for (outcome, count) in [
                ("written", &hub.direct_written),
                ("handed", &hub.direct_handed),
                ("refused", &hub.direct_refused),
            ] {
                counter!("sluice_direct_writes_total", "outcome" => outcome)
                    .absolute(count.load(Ordering::Relaxed));
            }
            let reader = self.log.reader();
            gauge!("sluice_log_bytes").set(reader.store().size_bytes() as f64);
            gauge!("sluice_log_disk_bytes").set(reader.store().disk_bytes() as f64);
            gauge!("sluice_log_max_bytes").set(self.limits.log_max_bytes as f64);
            gauge!("sluice_log_raw_bytes").set(reader.store().raw_size_bytes() as f64);
            let direct = u8::from(reader.store().direct_raw_writes());
            gauge!("sluice_log_direct_raw_writes").set(f64::from(direct));
            gauge!("sluice_log_raw_max_bytes")
                .set(self.limits.log_raw.map_or(0.0, |r| r.max_bytes as f64));
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
            for (level, segments) in self.log.writer_stats().raw_level_segments() {
                counter!("sluice_log_raw_level_segments_total", "level" => level.to_string())
                    .absolute(segments);
            }
            counter!("sluice_log_retention_deleted_events_total").absolute(
                self.log
                    .retention_stats()
                    .deleted_events
                    .load(Ordering::Relaxed),
            );
            let rs = self.log.retention_stats();
            counter!("sluice_log_merged_segments_total", "outcome" => "merged")
                .absolute(rs.merged_segments.load(Ordering::Relaxed));
            counter!("sluice_log_merged_segments_total", "outcome" => "failed_step")
                .absolute(rs.merge_failures.load(Ordering::Relaxed));
            let (decodes, shared) = reader.store().decoded_cache_counts();
            counter!("sluice_log_segment_decodes_total", "outcome" => "decoded").absolute(decodes);
            counter!("sluice_log_segment_decodes_total", "outcome" => "shared").absolute(shared);
            counter!("sluice_log_segment_decodes_total", "outcome" => "read_ahead")
                .absolute(reader.store().read_ahead_decodes());
            let depth =
                crate::log::depth::measure(reader.store().as_ref(), &self.limits.retention());
            gauge!("sluice_log_retained_events")
                .set(depth.map_or(0.0, |d| d.retained_events as f64));
            gauge!("sluice_log_retained_seconds").set(depth.map_or(0.0, |d| d.retained_seconds));
            gauge!("sluice_log_recent_events_per_second").set(depth.map_or(0.0, |d| d.recent_rate));
            gauge!("sluice_log_stored_bytes_per_event")
                .set(depth.map_or(0.0, |d| d.bytes_per_event));
            gauge!("sluice_log_projected_depth_seconds")
                .set(depth.and_then(|d| d.projected_seconds).unwrap_or(0.0));
            let raw =
                crate::log::depth::measure_raw(reader.store().as_ref(), &self.limits.retention());
            gauge!("sluice_log_raw_retained_events")
                .set(raw.map_or(0.0, |d| d.retained_events as f64));
            gauge!("sluice_log_raw_retained_seconds").set(raw.map_or(0.0, |d| d.retained_seconds));
            gauge!("sluice_log_raw_stored_bytes_per_event")
                .set(raw.map_or(0.0, |d| d.bytes_per_event));
            gauge!("sluice_log_raw_projected_depth_seconds")
                .set(raw.and_then(|d| d.projected_seconds).unwrap_or(0.0));
            // 0 while every event held has its frame.
            gauge!("sluice_log_raw_floor_seq").set(reader.raw_floor().unwrap_or(0) as f64);
            counter!("sluice_log_retention_raw_dropped_events_total").absolute(
                self.log
                    .retention_stats()
                    .raw_dropped_events
                    .load(Ordering::Relaxed),
            );
            // An empty log reads as seq 0 ("nothing yet") and time 0.
            let b = reader.bounds();
            gauge!("sluice_log_oldest_seq").set(b.map_or(0.0, |b| b.oldest_seq as f64));
            gauge!("sluice_log_newest_seq").set(b.map_or(0.0, |b| b.newest_seq as f64));
            gauge!("sluice_log_oldest_time_seconds")
                .set(b.map_or(0.0, |b| b.oldest_time_us as f64 / 1e6));
            gauge!("sluice_log_newest_time_seconds")
                .set(b.map_or(0.0, |b| b.newest_time_us as f64 / 1e6));
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                gauge!("sluice_runtime_worker_threads").set(runtime.metrics().num_workers() as f64);
            }
            if let Some(cluster) = &self.cluster {
                cluster_metrics(cluster, reader.newest_seq());
            }
            gauge!("sluice_ready").set(if self.not_ready().is_none() { 1.0 } else { 0.0 });
            if let Some(sink) = &self.sink {
                let (lag_events, lag_seconds) = sink.lag(&reader);
                gauge!("sluice_redis_sink_connected").set(
                    if sink.connected.load(Ordering::Relaxed) {
                        1.0
                    } else {
                        0.0
                    },
                );
                gauge!("sluice_redis_sink_active").set(if sink.active.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                });
                counter!("sluice_redis_sink_lease_takeovers_total")
                    .absolute(sink.lease_takeovers.load(Ordering::Relaxed));
                gauge!("sluice_redis_sink_position")
                    .set(sink.position.load(Ordering::Relaxed) as f64);
                gauge!("sluice_redis_sink_lag_events").set(lag_events as f64);
                gauge!("sluice_redis_sink_lag_seconds").set(lag_seconds);
                counter!("sluice_redis_sink_events_total")
                    .absolute(sink.events.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_entries_total")
                    .absolute(sink.entries.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_duplicates_total")
                    .absolute(sink.duplicates.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_rejected_total")
                    .absolute(sink.rejected.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_skipped_total")
                    .absolute(sink.skipped.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_lost_events_total")
                    .absolute(sink.lost.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_position_conflicts_total")
                    .absolute(sink.position_conflicts.load(Ordering::Relaxed));
                for reason in SinkError::REASONS {
                    counter!("sluice_redis_sink_errors_total", "reason" => reason)
                        .absolute(sink.errors(reason));
                }
                counter!("sluice_redis_sink_probes_total")
                    .absolute(sink.probes.load(Ordering::Relaxed));
                counter!("sluice_redis_sink_batches_total")
                    .absolute(sink.batches.load(Ordering::Relaxed));
                for part in SinkStats::PARTS {
                    counter!("sluice_redis_sink_time_microseconds_total", "part" => part)
                        .absolute(sink.time_us(part));
                }
            }
        });
        self.handle.render()
    }

    /// The Redis sink's state for the status page and `/readyz` (null without a sink).
    fn sink_status(&self) -> serde_json::Value {
        let Some(sink) = &self.sink else {
            return serde_json::Value::Null;
        };
        let (lag_events, lag_seconds) = sink.lag(&self.log.reader());
        json!({
            "connected": sink.connected.load(Ordering::Relaxed),
            "active": sink.active.load(Ordering::Relaxed),
            "leased": sink.leased,
            "lease_takeovers": sink.lease_takeovers.load(Ordering::Relaxed),
            "position": sink.position.load(Ordering::Relaxed),
            "lag_events": lag_events,
            "lag_seconds": lag_seconds,
            "events": sink.events.load(Ordering::Relaxed),
            "entries": sink.entries.load(Ordering::Relaxed),
            "duplicates": sink.duplicates.load(Ordering::Relaxed),
            "lost": sink.lost.load(Ordering::Relaxed),
            "rejected": sink.rejected.load(Ordering::Relaxed),
        })
    }

    /// `/readyz`'s detail line for the Redis sink. The sink's lag does not decide
    /// readiness: subscribers are served whatever Redis does.
    pub fn sink_detail(&self) -> Option<String> {
        let sink = self.sink.as_ref()?;
        let (lag_events, lag_seconds) = sink.lag(&self.log.reader());
        let role = match (sink.leased, sink.active.load(Ordering::Relaxed)) {
            (false, _) => "",
            (true, true) => "; this node holds the sink lease",
            (true, false) => "; standby, another node holds the sink lease",
        };
        Some(format!(
            "redis sink: {}, {lag_events} events ({lag_seconds:.1} s) behind{role}",
            if sink.connected.load(Ordering::Relaxed) {
                "connected"
            } else {
                "disconnected"
            }
        ))
    }

    /// The status page's data.
    pub fn status(&self) -> serde_json::Value {
        let ingest = self.ingest_stats.lock().clone();
        let reader = self.log.reader();
        let hub = self.hub.stats();
        let wires: serde_json::Map<String, serde_json::Value> = WireKind::ALL
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
            "cluster": self.cluster.as_ref().map(|c| json!({
                "name": c.cluster,
                "node": c.node_id,
                "role": c.role().as_str(),
                "epoch": c.epoch.load(Ordering::Relaxed),
                "redis_up": c.redis_up.load(Ordering::Relaxed),
                "stream_next_seq": c.stream_next_seq.load(Ordering::Relaxed),
                "takeovers": c.takeovers.load(Ordering::Relaxed),
                "discontinuities": c.discontinuities.load(Ordering::Relaxed),
                "nodes": *c.nodes.lock(),
            })),
            "log": {
                "bounds": reader.bounds().map(|b| json!({
                    "oldest_seq": b.oldest_seq, "newest_seq": b.newest_seq,
                    "oldest_time_us": b.oldest_time_us, "newest_time_us": b.newest_time_us,
                })),
                "bytes": reader.store().size_bytes(),
                "tail_bytes": reader.tail().bytes(),
                "raw_bytes": reader.store().raw_size_bytes(),
                "raw_floor_seq": reader.raw_floor(),
                "depth": crate::log::depth::measure(reader.store().as_ref(), &self.limits.retention())
                    .map(depth_json),
                "raw_depth": crate::log::depth::measure_raw(reader.store().as_ref(), &self.limits.retention())
                    .map(depth_json),
            },
            "redis_sink": self.sink_status(),
        })
    }
}

/// One class's replay depth on the status page.
fn depth_json(d: crate::log::depth::Depth) -> serde_json::Value {
    json!({
        "retained_events": d.retained_events,
        "retained_seconds": d.retained_seconds,
        "recent_rate": d.recent_rate,
        "bytes_per_event": d.bytes_per_event,
        "projected_seconds": d.projected_seconds,
    })
}

/// Help text for every family `/metrics` exports (Prometheus shows it as `# HELP`).
const COUNTERS: &[(&str, &str)] = &[
    ("sluice_ingested_events_total", "Events ingested, by kind (one per repo op for commits)."),
    ("sluice_ingested_commit_ops_total", "Commit op events ingested, by collection (the first 256 collections seen; the rest as \"other\")."),
    ("sluice_decode_errors_total", "Upstream frames that could not be decoded, by reason; each is skipped and logged."),
    ("sluice_upstream_frames_total", "Frames read from the upstream relay."),
    ("sluice_upstream_duplicates_dropped_total", "Upstream frames at or below the resume cursor, dropped."),
    ("sluice_upstream_seq_regressions_total", "Upstream frames whose seq went backwards within one connection (an anomaly), dropped."),
    ("sluice_records_missing_total", "Create or update ops whose record block was missing from the commit."),
    ("sluice_too_big_commits_total", "Commits flagged tooBig by the relay."),
    ("sluice_upstream_reconnects_total", "Reconnections to the upstream relay."),
    ("sluice_upstream_stalls_total", "Upstream connections replaced after --stall-timeout-secs without a frame or pong."),
    ("sluice_upstream_oversized_frames_total", "Upstream frames over --max-frame-bytes, refused."),
    ("sluice_delivered_events_total", "Events written to subscribers, by wire."),
    ("sluice_delivered_bytes_total", "Bytes written to subscribers, by wire."),
    ("sluice_oversized_events_total", "Events not sent because they exceeded a subscriber's message size limit, by wire."),
    ("sluice_slow_consumer_transitions_total", "Subscribers moved to catch-up from the log (to=catchup) and back to live (to=live)."),
    ("sluice_subscriber_disconnects_total", "Subscriber sessions ended, by reason."),
    ("sluice_admission_refused_total", "Subscribe requests refused before the upgrade, by reason."),
    ("sluice_cold_reads_total", "Log reads below the hot tail (from the durable store)."),
    ("sluice_zstd_compressed_events_total", "Events compressed, by scheme (v1 compress=true, v2 zstdDictionary): once per event and scheme, shared by its subscribers."),
    ("sluice_zstd_uncached_events_total", "Events compressed but not kept because the scheme's cache was at --zstd-cache-mib, by scheme: the next subscriber compresses them again."),
    ("sluice_zstd_failures_total", "Messages that could not be compressed and so were not sent, by scheme (logged)."),
    ("sluice_direct_writes_total", "Writes the fan-out dispatcher made to live subscribers itself (--direct-writes), by outcome: written whole, written in part (the rest left to the subscriber's session), refused (the socket would block or was busy; the events went to the subscriber's queue)."),
    ("sluice_index_budget_total", "Routing-index changes that waited for, were refused by, or were deferred by the hub-wide budget."),
    ("sluice_log_commits_total", "Group commits of the event log."),
    ("sluice_log_commit_failures_total", "Group commits of the event log that failed (retried)."),
    ("sluice_log_retention_deleted_events_total", "Events deleted from the log by retention."),
    ("sluice_log_raw_level_segments_total", "Log segments committed, by the zstd level of their raw frames: --log-raw-zstd-level while the log writer keeps up, --log-raw-zstd-fast-level for groups taken with a backlog building."),
    ("sluice_log_retention_raw_dropped_events_total", "Events whose raw frame retention dropped while keeping their JSON (--raw-retention-hours, --raw-retention-max-gib)."),
    ("sluice_log_merged_segments_total", "Small log segments (cut by commits at the live rate) merged into full-size ones so replays scan them fast (outcome=merged), and merge steps that failed and are retried (outcome=failed_step); --log-merge-segments."),
    ("sluice_log_segment_decodes_total", "Stored segments read by replays: decoded (outcome=decoded) or served by a decode another replay made, from --log-decoded-cache-mib (outcome=shared), or decoded ahead of the replay that then read it, --log-read-ahead-segments (outcome=read_ahead)."),
    ("sluice_connections_accepted_total", "Connections accepted, by listener."),
    ("sluice_connections_refused_total", "Connections refused before any request was read, by listener and reason (pending_full 503, pending_per_ip 429, fd_reserve 503, held_per_ip 429: the address had --max-held-refusals-per-ip refusals held)."),
    ("sluice_connections_closed_unfinished_total", "Connections closed before their upgrade or answer, by listener and reason (header_timeout, handshake_timeout, shutdown; uri_too_long: answered 414 naming the way to send what did not fit)."),
    ("sluice_connections_accept_errors_total", "accept() failures (e.g. out of descriptors), by listener."),
    ("sluice_client_memory_refused_total", "Subscriber reads or filters refused (close 1013) because they did not fit the client-memory budget, by budget (total, per_ip)."),
    ("sluice_client_text_messages_total", "Subscriber text messages (v1 options_update) parsed, by where: in place (parsed=inline, under 8 KiB) or on the client-text threads (parsed=pool)."),
    ("sluice_client_text_bytes_total", "Bytes of subscriber text messages charged to the --client-text-kib-per-sec budget."),
    ("sluice_client_text_budget_total", "Subscriber text messages that waited for the client-text budget (outcome=waited) or were refused by it, closing the connection with 1013 (outcome=refused)."),
    ("sluice_connections_refused_closes_total", "Connections refused before any request was read, by listener and how they were closed after their answer: closed=lingered (the client's request read and dropped until it closed or its head ended, --refusal-linger-ms: no reset), closed=cut (lingered to the time or --max-request-head-kib bound, shutdown or a socket error), closed=at_once (a descriptor-reserve refusal, lingering off, or over --max-lingering-refusals-per-ip / --max-lingering-refusals or the descriptor cap)."),
    ("sluice_refusals_total", "Refusals with Retry-After (429, 503) answered, by listener and how: held --refusal-hold-ms first (answered=held) or at once because the address had --max-held-refusals-per-ip held (answered=at_once); each closes its connection."),
    ("sluice_event_requests_refused_total", "/event requests refused: over the per-IP rate (429) or no cold-read slot in time (503)."),
    ("sluice_redis_sink_events_total", "Events the Redis sink has written (each once, whatever its number of stream entries)."),
    ("sluice_redis_sink_entries_total", "Stream entries the Redis sink has added."),
    ("sluice_redis_sink_duplicates_total", "Stream entries Redis already held (a repeated write), skipped."),
    ("sluice_redis_sink_rejected_total", "Stream entries Redis refused for another reason than a repeat (e.g. a key of another type); not in Redis, logged."),
    ("sluice_redis_sink_skipped_total", "Events with no JSON form (empty commits, unknown types), not written to Redis."),
    ("sluice_redis_sink_lost_events_total", "Events retention deleted before the Redis sink reached them."),
    ("sluice_redis_sink_position_conflicts_total", "Redis sink writes refused because the stored position had changed; it resumed from the stored one."),
    ("sluice_redis_sink_errors_total", "Redis sink failures, by reason; each is retried, after --redis-sink-probe-ms while Redis refuses connections or is loading, else with backoff."),
    ("sluice_redis_sink_probes_total", "Redis sink attempts that found Redis not up (connection refused, or loading its data), each retried after --redis-sink-probe-ms without backoff."),
    ("sluice_redis_sink_lease_takeovers_total", "Times this node took the cluster's sink lease and started writing (0 on a single node)."),
    ("sluice_redis_sink_batches_total", "Transactions of the Redis sink that applied a batch (events per batch = the events counter's increase over this one's)."),
    ("sluice_redis_sink_time_microseconds_total", "Where the Redis sink's time went, by part: write (position check and transaction, round trips included), read_wait (waiting for a batch from the log beyond the write it overlaps), backoff (waiting after failures)."),
    ("sluice_catchup_pool_panics_total", "Catch-up reads and writes that panicked on the catch-up pool (a bug; each is logged and ends its subscriber's session as read_failed or write_failed)."),
    ("sluice_catchup_pool_raises_total", "Times the idle-class catch-up threads (--catchup-sched idle) were raised to nice 19 because catch-up made no progress for --catchup-starvation-ms while they waited for a core (0 in the nice class)."),
    ("sluice_catchup_pool_raise_refusals_total", "Thread raises of the starvation bound the kernel refused (needs RLIMIT_NICE >= 1 or CAP_SYS_NICE); those threads stayed idle."),
    ("sluice_catchup_paced_writes_total", "Catch-up writes that waited for the catch-up pace (--catchup-pace-mib-per-sec) before going out."),
    ("sluice_catchup_paced_seconds_total", "Time catch-up writes waited for the catch-up pace, summed over subscribers, in whole seconds (a replay that waited only takes longer; nothing is dropped)."),
    ("sluice_catchup_paced_bytes_total", "Bytes of catch-up writes paid into the catch-up pace (their events' bytes on their wires before compression); 0 while unpaced."),
    ("sluice_catchup_paced_events_total", "Events of catch-up writes paid into the catch-up pace in events (--catchup-pace-events-per-sec); 0 while unpaced."),
];

const GAUGES: &[(&str, &str)] = &[
    (
        "sluice_refusals_held",
        "Refusals being held now before they are answered, by listener.",
    ),
    (
        "sluice_refusals_lingering",
        "Connections refused before any request was read that linger now after their answer (--refusal-linger-ms), by listener.",
    ),
    (
        "sluice_upstream_connected",
        "1 while the upstream websocket is connected.",
    ),
    (
        "sluice_upstream_lag_seconds",
        "Wall clock minus the newest event's source time, in seconds (NaN before the first event).",
    ),
    ("sluice_subscribers", "Connected subscribers, by wire."),
    (
        "sluice_queued_events",
        "Events waiting in subscribers' live queues.",
    ),
    (
        "sluice_active_replays",
        "Subscribers reading the log in catch-up.",
    ),
    (
        "sluice_log_bytes",
        "Bytes of events held by the log's store (JSON wires and raw frames).",
    ),
    (
        "sluice_log_raw_bytes",
        "The part of sluice_log_bytes that is raw frames with retention of their own.",
    ),
    (
        "sluice_log_direct_raw_writes",
        "1 while the log writes its raw-frame files with O_DIRECT, past the page cache (--log-direct-raw-writes on, the file system takes it, none refused since); 0 when they go through the page cache, and until this process has written its first raw file.",
    ),
    (
        "sluice_log_raw_max_bytes",
        "The raw frames' share of --retention-max-gib (--raw-retention-max-gib), in bytes; 0 when frames have no limits of their own.",
    ),
    (
        "sluice_log_disk_bytes",
        "Bytes the log's data directory takes on disk.",
    ),
    (
        "sluice_log_retained_events",
        "Events the log holds (oldest to newest seq): the JSON wires' window.",
    ),
    (
        "sluice_log_retained_seconds",
        "Source time the log spans, oldest to newest event held (the JSON wires' replay depth now).",
    ),
    (
        "sluice_log_raw_retained_events",
        "Events whose raw frame the log holds (raw floor to newest seq): the raw wire's window.",
    ),
    (
        "sluice_log_raw_retained_seconds",
        "Source time the raw frames held span (the raw wire's replay depth now).",
    ),
    (
        "sluice_log_raw_floor_seq",
        "The oldest seq whose raw frame is held, when raw retention dropped frames the log still holds the JSON of (0 otherwise).",
    ),
    (
        "sluice_log_raw_stored_bytes_per_event",
        "Stored bytes of raw frame per event held, on average.",
    ),
    (
        "sluice_log_raw_projected_depth_seconds",
        "How far back the raw frames would reach at the last hour's rate: their share of the cap over the bytes that rate stores, or --raw-retention-hours if less (0 until a rate is known).",
    ),
    (
        "sluice_log_recent_events_per_second",
        "Events per second of source time over the last hour held (or all of it, if less).",
    ),
    (
        "sluice_log_stored_bytes_per_event",
        "Stored bytes of the JSON wires per event held, on average (raw frames together with them when frames have no limits of their own).",
    ),
    (
        "sluice_log_projected_depth_seconds",
        "How far back the JSON wires would reach at the last hour's rate: their share of the size cap over the bytes that rate stores, or --retention-hours if less (0 until a rate is known).",
    ),
    (
        "sluice_log_max_bytes",
        "The log's size cap (--retention-max-gib, JSON and raw shares together), in bytes.",
    ),
    (
        "sluice_log_tail_bytes",
        "Bytes of events in the in-memory hot tail.",
    ),
    (
        "sluice_log_writer_queue_bytes",
        "Bytes of events waiting for the log writer.",
    ),
    (
        "sluice_log_oldest_seq",
        "The oldest seq the log holds (0 when empty).",
    ),
    (
        "sluice_log_newest_seq",
        "The newest seq the log holds (0 when empty).",
    ),
    (
        "sluice_log_oldest_time_seconds",
        "Source time of the oldest event held, unix seconds (0 when empty).",
    ),
    (
        "sluice_log_newest_time_seconds",
        "Source time of the newest event held, unix seconds (0 when empty).",
    ),
    (
        "sluice_runtime_worker_threads",
        "Async worker threads of the main runtime.",
    ),
    (
        "sluice_zstd_cache_bytes",
        "Bytes of compressed events a compression scheme keeps for its subscribers, by scheme.",
    ),
    ("sluice_ready", "1 while /readyz answers ready."),
    (
        "sluice_connections_open",
        "Connections open now (upgraded or not), by listener.",
    ),
    (
        "sluice_connections_pending",
        "Connections accepted and not yet upgraded or answered, by listener.",
    ),
    (
        "sluice_connections_fd_cap",
        "Most connections the listener holds given the open-file limit and --fd-reserve.",
    ),
    (
        "sluice_open_file_limit",
        "The process's open-file limit (RLIMIT_NOFILE) after raising the soft limit.",
    ),
    (
        "sluice_client_memory_bytes",
        "Bytes subscribers make the daemon hold now (messages under way, filters).",
    ),
    (
        "sluice_limit",
        "Live-reloadable limits in force (SIGHUP changes them), by setting, in the unit its name says.",
    ),
    (
        "sluice_client_memory_limit_bytes",
        "The client-memory budget (--client-memory-mib), in bytes.",
    ),
    (
        "sluice_redis_sink_connected",
        "1 while the Redis sink is connected.",
    ),
    (
        "sluice_redis_sink_active",
        "1 while this node's Redis sink may write: it runs alone, or holds the cluster's sink lease.",
    ),
    (
        "sluice_redis_sink_position",
        "The newest seq in Redis (the sink's stored position; a standby reads it once a second).",
    ),
    (
        "sluice_redis_sink_lag_events",
        "Durable events not yet written by the Redis sink.",
    ),
    (
        "sluice_redis_sink_lag_seconds",
        "Source time between the newest event and the Redis sink's position, seconds.",
    ),    (
        "sluice_catchup_pool_threads",
        "Threads of the catch-up pool alive now (its workers and its blocking threads for cold reads).",
    ),
    (
        "sluice_catchup_pool_work",
        "Catch-up work handed to the catch-up pool and not finished (queued or running), by kind: read (a cold read below the hot tail), write (a subscriber's catch-up write).",
    ),
    (
        "sluice_catchup_pool_starvation_bound_seconds",
        "The idle catch-up pool's starvation bound (--catchup-starvation-ms), seconds; 0 in the nice class or with the bound off.",
    ),
    (
        "sluice_catchup_pool_raised",
        "1 while the starvation bound holds the idle-class catch-up threads at nice 19 (until catch-up work finishes again), else 0.",
    ),
    (
        "sluice_catchup_pace_bytes_per_second",
        "The server-wide pace of catch-up writes (--catchup-pace-mib-per-sec), bytes per second; 0 = unpaced.",
    ),
    (
        "sluice_catchup_pace_events_per_second",
        "The server-wide pace of catch-up writes in events (--catchup-pace-events-per-sec), events per second; 0 = unpaced.",
    ),
];

/// Help text of the cluster's families (exported only by nodes started with `--redis`).
const CLUSTER_COUNTERS: &[(&str, &str)] = &[
    ("sluice_cluster_takeovers_total", "Times this node took the cluster lease and became the ingest leader."),
    ("sluice_cluster_step_downs_total", "Times this node stopped leading because its lease was lost, lapsed or an append was refused."),
    ("sluice_cluster_handovers_total", "Times this node released the lease on a graceful stop."),
    ("sluice_cluster_appends_total", "Batches this node appended to the shared stream."),
    ("sluice_cluster_appended_events_total", "Events this node appended to the shared stream."),
    ("sluice_cluster_appended_bytes_total", "Entry bytes this node appended to the shared stream."),
    ("sluice_cluster_append_retries_total", "Appends retried because Redis was unreachable (ingest waits meanwhile)."),
    ("sluice_cluster_append_aborts_total", "Appends whose transaction Redis aborted because the state or the stream was written after their check; sent again."),
    ("sluice_cluster_appends_refused_total", "Appends refused (fenced, not continuing the stream, lease lapsed): nothing was written."),
    ("sluice_cluster_trims_total", "Appends that trimmed the stream's window."),
    ("sluice_cluster_trimmed_entries_total", "Stream entries removed by trimming."),
    ("sluice_cluster_discontinuities_total", "Times this node rejoined past the stream's window and moved its log's floor."),
    ("sluice_cluster_discontinuity_events_total", "Seqs this node does not hold because of discontinuities."),
    ("sluice_cluster_tailed_events_total", "Events this node wrote from the stream into its log."),
    ("sluice_cluster_tail_errors_total", "Failed reads or applications of the stream (retried)."),
    ("sluice_cluster_skipped_held_events_total", "Stream events skipped because this node already held them (after a re-seed)."),
    ("sluice_cluster_append_seconds_bucket", "Append latency histogram: appends that took at most le seconds."),
    ("sluice_cluster_append_seconds_count", "Appends timed by the latency histogram."),
];

const CLUSTER_GAUGES: &[(&str, &str)] = &[
    (
        "sluice_cluster_role",
        "1 for this node's role (leader or standby).",
    ),
    (
        "sluice_cluster_lease_epoch",
        "The fencing epoch of this node's last lease.",
    ),
    (
        "sluice_cluster_redis_up",
        "1 while this node's stream reader reaches Redis.",
    ),
    (
        "sluice_cluster_stream_newest_seq",
        "The shared stream's newest seq, as last read.",
    ),
    (
        "sluice_cluster_tail_lag_events",
        "Events the stream holds beyond this node's log.",
    ),
    (
        "sluice_cluster_append_in_flight",
        "Appends sent to Redis and not answered yet (at most --cluster-append-in-flight).",
    ),
    (
        "sluice_cluster_append_seconds_sum",
        "Total seconds of the timed appends.",
    ),
    (
        "sluice_cluster_node_position",
        "Each node's newest seq, as it last reported.",
    ),
    (
        "sluice_cluster_node_lag_events",
        "Each node's lag behind the stream, in events.",
    ),
    (
        "sluice_cluster_node_subscribers",
        "Each node's subscribers, as it last reported.",
    ),
];

fn describe_metrics() {
    for &(name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for &(name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
}

/// The cluster's metrics (inside the admin recorder's scope).
fn cluster_metrics(c: &crate::cluster::ClusterShared, local_newest: u64) {
    use metrics::{counter, gauge};
    // Described here, not at start, so a single node's /metrics has no cluster families.
    for &(name, help) in CLUSTER_COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for &(name, help) in CLUSTER_GAUGES {
        metrics::describe_gauge!(name, help);
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let role = c.role();
    for r in [crate::cluster::Role::Leader, crate::cluster::Role::Standby] {
        gauge!("sluice_cluster_role", "role" => r.as_str()).set(if r == role { 1.0 } else { 0.0 });
    }
    gauge!("sluice_cluster_lease_epoch").set(load(&c.epoch) as f64);
    gauge!("sluice_cluster_redis_up").set(if c.redis_up.load(Ordering::Relaxed) {
        1.0
    } else {
        0.0
    });
    let stream_next = load(&c.stream_next_seq);
    gauge!("sluice_cluster_stream_newest_seq").set(stream_next.saturating_sub(1) as f64);
    gauge!("sluice_cluster_tail_lag_events")
        .set(stream_next.saturating_sub(1).saturating_sub(local_newest) as f64);
    counter!("sluice_cluster_takeovers_total").absolute(load(&c.takeovers));
    counter!("sluice_cluster_step_downs_total").absolute(load(&c.step_downs));
    counter!("sluice_cluster_handovers_total").absolute(load(&c.handovers));
    counter!("sluice_cluster_appends_total").absolute(load(&c.appends));
    counter!("sluice_cluster_appended_events_total").absolute(load(&c.appended_events));
    counter!("sluice_cluster_appended_bytes_total").absolute(load(&c.appended_bytes));
    counter!("sluice_cluster_append_retries_total").absolute(load(&c.append_retries));
    counter!("sluice_cluster_append_aborts_total").absolute(load(&c.append_aborts));
    gauge!("sluice_cluster_append_in_flight").set(load(&c.append_in_flight) as f64);
    counter!("sluice_cluster_appends_refused_total").absolute(load(&c.fenced_appends));
    counter!("sluice_cluster_trims_total").absolute(load(&c.trims));
    counter!("sluice_cluster_trimmed_entries_total").absolute(load(&c.trimmed_entries));
    counter!("sluice_cluster_discontinuities_total").absolute(load(&c.discontinuities));
    counter!("sluice_cluster_discontinuity_events_total").absolute(load(&c.discontinuity_events));
    counter!("sluice_cluster_tailed_events_total").absolute(load(&c.tailed_events));
    counter!("sluice_cluster_tail_errors_total").absolute(load(&c.tail_errors));
    counter!("sluice_cluster_skipped_held_events_total").absolute(load(&c.skipped_held));
    let (buckets, sum) = c.append_latency.snapshot();
    for (le, n) in &buckets {
        let le = if le.is_infinite() {
            "+Inf".to_string()
        } else {
            le.to_string()
        };
        counter!("sluice_cluster_append_seconds_bucket", "le" => le).absolute(*n);
    }
    counter!("sluice_cluster_append_seconds_count").absolute(buckets.last().map_or(0, |b| b.1));
    gauge!("sluice_cluster_append_seconds_sum").set(sum);
    for n in c.nodes.lock().iter() {
        gauge!("sluice_cluster_node_position", "node" => n.node.clone()).set(n.position as f64);
        gauge!("sluice_cluster_node_lag_events", "node" => n.node.clone()).set(n.lag_events as f64);
        gauge!("sluice_cluster_node_subscribers", "node" => n.node.clone())
            .set(n.subscribers as f64);
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
    let detail = state
        .sink_detail()
        .map_or(String::new(), |d| format!("\n{d}"));
    match state.not_ready() {
        None => (StatusCode::OK, format!("ready{detail}")).into_response(),
        Some(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}{detail}")).into_response()
        }
    }
}

async fn status_json(State(state): State<Arc<AdminState>>) -> Response {
    axum::Json(state.status()).into_response()
}

async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}
