//! One cluster node's life: the lease loop (standby ↔ leader), the leader's appender, and
//! the stream reader.
//!
//! Owns: taking, renewing, losing and handing over the lease; starting ingest on taking
//! it and stopping it on losing it; starting each term's appender (`append`); trimming the stream's window; reporting this node's position. Must
//! never: append after its own clock says the lease may have expired, keep ingesting
//! after a fenced append, or block the runtime on Redis.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use super::append::{self, TermCtl};
use super::link::{Acquire, Grant, Keys, Link};
use super::tail::Tailer;
use super::{ClusterConfig, ClusterError, ClusterShared, NodeReport, Role};
use crate::event::{Event, StampState};
use crate::fanout::Hub;
use crate::ingest::IngestStats;
use crate::ingest::{start_ingest_with, EventSink, IngestConfig, IngestHandle};
use crate::log::Log;
use crate::upstream::client::UpstreamShared;
use crate::wire::WireKind;

/// A node's reports older than this many lease TTLs are not "live" for trimming.
const LIVE_TTLS: u32 = 3;
/// A running cluster node.
pub struct Node {
    pub shared: Arc<ClusterShared>,
    stop: watch::Sender<bool>,
    lease_task: tokio::task::JoinHandle<()>,
    tail_thread: Option<std::thread::JoinHandle<()>>,
}

/// What the lease loop needs from the daemon.
pub struct NodeParts {
    pub ingest: IngestConfig,
    pub log: Arc<Log>,
    pub hub: Hub,
    pub upstream: Arc<UpstreamShared>,
    pub ingest_stats: Arc<parking_lot::Mutex<IngestStats>>,
}

impl Node {
    /// Checks Redis (durability, function library), then starts the stream reader and the
    /// lease loop. Redis being unreachable at start is not an error (the node serves what
    /// it holds and keeps trying) unless durability is required, which needs an answer.
    pub async fn start(config: ClusterConfig, parts: NodeParts) -> anyhow::Result<Node> {
        let keys = Keys::new(&config.name);
        let shared = Arc::new(ClusterShared {
            node_id: config.node_id.clone(),
            cluster: config.name.clone(),
            ..ClusterShared::default()
        });
        let mut link = Link::new(&config.redis_url, config.redis_timeout)?;
        match link.durability().await {
            Ok((appendonly, fsync)) => {
                let durable = appendonly == "yes" && fsync == "always";
                if durable {
                    tracing::info!("redis: appendonly yes, appendfsync always: an acknowledged append survives a redis crash");
                } else if config.require_durable {
                    anyhow::bail!(
                        "redis is not durable (appendonly {appendonly:?}, appendfsync {fsync:?}); \
                         --redis-require-durable needs appendonly yes and appendfsync always"
                    );
                } else {
                    tracing::warn!(
                        appendonly,
                        appendfsync = fsync,
                        "redis is not set up for durable appends (appendonly yes + appendfsync \
                         always): a redis crash can lose acknowledged events (docs/OPERATIONS.md)"
                    );
                }
            }
            Err(e) if config.require_durable => {
                anyhow::bail!(
                    "cannot check redis durability ({e}); --redis-require-durable needs an answer"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable at start; serving what this node holds and retrying")
            }
        }
        let functions_loaded = match link.load_functions().await {
            Ok(()) => true,
            Err(ClusterError::Unavailable(_)) => false,
            Err(e) => anyhow::bail!("cannot load the cluster functions into redis: {e}"),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let tailer = Tailer {
            config: config.clone(),
            keys: keys.clone(),
            log: parts.log.clone(),
            shared: shared.clone(),
            upstream: parts.upstream.clone(),
            limits: parts.ingest.decode_limits.clone(),
            stop: stop_rx.clone(),
        };
        let tail_thread = std::thread::Builder::new()
            .name("sluice-cluster-tail".into())
            .spawn(move || tailer.run())?;
        let lease = LeaseLoop {
            config,
            keys,
            link,
            functions_loaded,
            shared: shared.clone(),
            parts,
            term: None,
            max_epoch: 0,
            seed_block: None,
            stop: stop_rx,
        };
        let lease_task = tokio::spawn(lease.run());
        Ok(Node {
            shared,
            stop: stop_tx,
            lease_task,
            tail_thread: Some(tail_thread),
        })
    }

    /// Graceful stop: a leader stops ingest, appends what it has and hands the lease over
    /// at once; then the stream reader stops.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Err(e) = (&mut self.lease_task).await {
            tracing::error!(error = %e, "cluster lease task failed");
        }
        if let Some(t) = self.tail_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// One leader term: the ingest run and the appender, under one epoch.
struct Term {
    epoch: u64,
    ingest: Option<IngestHandle>,
    appender: Option<std::thread::JoinHandle<()>>,
    ctl: Arc<TermCtl>,
}

/// The leader's sink: hands each frame's events to the appender thread (bounded: a full
/// queue blocks ingest, which stops reading the upstream).
struct ClusterSink {
    tx: SyncSender<Vec<Event>>,
    ctl: Arc<TermCtl>,
}

impl EventSink for ClusterSink {
    fn append(&mut self, events: Vec<Event>) -> anyhow::Result<()> {
        let mut events = events;
        loop {
            if self.ctl.ended.load(Ordering::Acquire) {
                anyhow::bail!(
                    "leader term ended: {}",
                    self.ctl.why.lock().clone().unwrap_or_default()
                );
            }
            match self.tx.try_send(events) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => anyhow::bail!("cluster appender stopped"),
                Err(TrySendError::Full(back)) => {
                    events = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

struct LeaseLoop {
    config: ClusterConfig,
    keys: Keys,
    link: Link,
    functions_loaded: bool,
    shared: Arc<ClusterShared>,
    parts: NodeParts,
    term: Option<Term>,
    max_epoch: u64,
    /// The last reason re-seeding was refused (logged when it changes).
    seed_block: Option<String>,
    stop: watch::Receiver<bool>,
}

impl LeaseLoop {
    async fn run(mut self) {
        let ttl = self.config.lease_ttl;
        let mut last_report = Instant::now() - Duration::from_secs(60);
        loop {
            let wait = match &self.term {
                Some(_) => ttl / 3,
                None => {
                    let base = self.config.standby_poll.as_millis() as u64;
                    Duration::from_millis(rand::thread_rng().gen_range(base / 2..=base + base / 2))
                }
            };
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            if *self.stop.borrow() {
                break;
            }
            if !self.functions_loaded {
                match self.link.load_functions().await {
                    Ok(()) => self.functions_loaded = true,
                    Err(e) => {
                        self.shared.note_error(&e);
                        continue;
                    }
                }
            }
            match self.term.as_ref().map(|t| t.ctl.clone()) {
                Some(ctl) => self.lead(&ctl).await,
                None => self.try_acquire().await,
            }
            if last_report.elapsed() >= ttl / 3 {
                last_report = Instant::now();
                self.report().await;
            }
        }
        self.hand_over().await;
    }

    /// A leader's tick: end the term if it ended itself, else renew.
    async fn lead(&mut self, ctl: &Arc<TermCtl>) {
        let ttl = self.config.lease_ttl;
        let ingest_died = self
            .term
            .as_ref()
            .and_then(|t| t.ingest.as_ref())
            .is_some_and(|i| i.is_finished());
        if ctl.ended.load(Ordering::Acquire) || ingest_died {
            let why = ctl
                .why
                .lock()
                .clone()
                .unwrap_or_else(|| "ingest stopped".into());
            self.step_down(&why).await;
            return;
        }
        let sent = Instant::now();
        match self
            .link
            .renew(&self.keys, &self.config.node_id, ctl.epoch, ttl)
            .await
        {
            Ok(()) => ctl.extend(sent, ttl),
            Err(ClusterError::Unavailable(e)) => {
                if !ctl.lease_valid() {
                    ctl.end(format!(
                        "lease could not be renewed before it may expire ({e})"
                    ));
                    self.step_down("lease not renewed in time").await;
                }
            }
            Err(e) => {
                if e.is_missing_function() {
                    self.functions_loaded = false;
                }
                ctl.end(e.to_string());
                self.step_down(&e.to_string()).await;
            }
        }
    }

    async fn try_acquire(&mut self) {
        let reader = self.parts.log.reader();
        let local = match reader.bounds() {
            Some(b) => StampState {
                next_seq: b.newest_seq + 1,
                last_time_us: b.newest_time_us,
                upstream_cursor: Some(b.newest_upstream_seq),
            },
            None => StampState {
                next_seq: reader.newest_seq() + 1,
                ..StampState::fresh()
            },
        };
        let sent = Instant::now();
        let answer = self
            .link
            .acquire(
                &self.keys,
                &self.config.node_id,
                self.config.lease_ttl,
                self.max_epoch,
                local,
            )
            .await;
        match answer {
            Ok(Acquire::Granted(grant)) => self.become_leader(grant, sent),
            Ok(Acquire::Held { .. }) => {}
            Ok(Acquire::SeedBlocked { why }) => {
                if self.seed_block.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        why,
                        "the cluster's resume state is missing in redis (a new cluster, or \
                         redis lost its data); it is re-seeded by the live node holding the \
                         most of the log"
                    );
                    self.seed_block = Some(why);
                }
            }
            Err(e) => {
                if e.is_missing_function() {
                    self.functions_loaded = false;
                }
                self.shared.note_error(&e);
            }
        }
    }

    fn become_leader(&mut self, grant: Grant, sent: Instant) {
        self.max_epoch = self.max_epoch.max(grant.epoch);
        let ctl = Arc::new(TermCtl::new(grant.epoch, sent, self.config.lease_ttl));
        if grant.seeded {
            tracing::error!(
                next_seq = grant.state.next_seq,
                "REDIS HAD LOST THE CLUSTER STATE: re-seeded it from this node's log (the \
                 node holding the most); the seq space continues, nothing is renumbered"
            );
        }
        tracing::info!(
            epoch = grant.epoch,
            next_seq = grant.state.next_seq,
            upstream_cursor = ?grant.state.upstream_cursor,
            "took the cluster lease: this node is the ingest leader"
        );
        let (tx, rx) = std::sync::mpsc::sync_channel(self.config.append_queue_frames.max(1));
        let appender = {
            let (config, keys, shared, ctl) = (
                self.config.clone(),
                self.keys.clone(),
                self.shared.clone(),
                ctl.clone(),
            );
            std::thread::Builder::new()
                .name("sluice-cluster-append".into())
                .spawn(move || append::run(config, keys, shared, ctl, rx))
        };
        let appender = match appender {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the cluster appender; staying standby");
                return;
            }
        };
        let sink = ClusterSink {
            tx,
            ctl: ctl.clone(),
        };
        let ingest = start_ingest_with(
            self.parts.ingest.clone(),
            grant.state,
            sink,
            self.parts.upstream.clone(),
            self.parts.ingest_stats.clone(),
        );
        let ingest = match ingest {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::error!(error = %e, "cannot start ingest as leader");
                ctl.end(format!("ingest did not start: {e}"));
                None
            }
        };
        self.shared.epoch.store(grant.epoch, Ordering::Relaxed);
        self.shared.set_role(Role::Leader);
        self.shared.takeovers.fetch_add(1, Ordering::Relaxed);
        self.term = Some(Term {
            epoch: grant.epoch,
            ingest,
            appender: Some(appender),
            ctl,
        });
    }

    /// Stops ingest and the appender of the current term; back to standby.
    async fn end_term(&mut self) -> Option<Term> {
        let mut term = self.term.take()?;
        if let Some(ingest) = term.ingest.take() {
            if let Err(e) = ingest.shutdown().await {
                tracing::info!(error = %e, "leader ingest ended");
            }
        }
        if let Some(appender) = term.appender.take() {
            let _ = tokio::task::spawn_blocking(move || appender.join()).await;
        }
        self.shared.set_role(Role::Standby);
        Some(term)
    }

    async fn step_down(&mut self, why: &str) {
        if let Some(term) = self.term.as_ref() {
            term.ctl.end(why.to_string());
        }
        if let Some(term) = self.end_term().await {
            self.shared.step_downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(epoch = term.epoch, why, "stepped down: no longer the ingest leader; appended nothing after the lease was lost");
        }
    }

    /// Graceful stop: ingest stops, the appender appends what is queued, the lease is
    /// released at once so a standby takes over without waiting for it to expire.
    async fn hand_over(&mut self) {
        let Some(term) = self.end_term().await else {
            return;
        };
        match self
            .link
            .release(&self.keys, &self.config.node_id, term.epoch)
            .await
        {
            Ok(true) => {
                self.shared.handovers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    epoch = term.epoch,
                    "released the cluster lease for a standby to take over at once"
                );
            }
            Ok(false) => tracing::info!(
                epoch = term.epoch,
                "the lease was no longer ours to release"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lease; a standby takes over when it expires")
            }
        }
        self.report().await;
    }

    /// Publishes this node's position, reads everyone's, and (leader) sets the trim point.
    async fn report(&mut self) {
        let position = self.parts.log.reader().newest_seq();
        let subscribers: u64 = [WireKind::JetstreamV1, WireKind::JetstreamV2, WireKind::Raw]
            .iter()
            .map(|w| self.parts.hub.stats().subscribers(*w))
            .sum();
        let now = super::link::now_ms();
        let text = NodeReport::render(position, now, self.shared.role(), subscribers);
        if let Err(e) = self
            .link
            .report(&self.keys, &self.config.node_id, &text)
            .await
        {
            self.shared.note_error(&e);
            return;
        }
        let stream_next = match self.link.state(&self.keys).await {
            Ok(Some((state, _))) => state.next_seq,
            Ok(None) => 0,
            Err(e) => {
                self.shared.note_error(&e);
                return;
            }
        };
        self.shared
            .stream_next_seq
            .store(stream_next, Ordering::Relaxed);
        let reports = match self.link.reports(&self.keys).await {
            Ok(r) => r,
            Err(e) => {
                self.shared.note_error(&e);
                return;
            }
        };
        let live_ms = (self.config.lease_ttl * LIVE_TTLS).as_millis() as u64;
        let mut nodes = Vec::new();
        for (node, text) in reports {
            let Some(mut r) = NodeReport::parse(&node, &text) else {
                continue;
            };
            r.lag_events = stream_next.saturating_sub(1).saturating_sub(r.position);
            // Reports of nodes gone for an hour are dropped, so the table stays current.
            if now.saturating_sub(r.reported_ms) > 3_600_000 {
                let _ = self.link.forget(&self.keys, &node).await;
                continue;
            }
            nodes.push(r);
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        if let Some(term) = &self.term {
            let live: Vec<&NodeReport> = nodes
                .iter()
                .filter(|r| now.saturating_sub(r.reported_ms) <= live_ms)
                .collect();
            let below = trim_point(&self.config, stream_next, &live);
            term.ctl.trim_below.store(below, Ordering::Relaxed);
        }
        *self.shared.nodes.lock() = nodes;
    }
}

/// Where the leader trims: keep `window_events`, but never past the slowest live node
/// (its next seq), and always keep `window_floor_events`. The byte bound is applied by the
/// appender, which knows the bytes per event.
fn trim_point(config: &ClusterConfig, stream_next: u64, live: &[&NodeReport]) -> u64 {
    let by_window =
        stream_next.saturating_sub(config.window_events.max(config.window_floor_events));
    let slowest = live
        .iter()
        .map(|r| r.position + 1)
        .min()
        .unwrap_or(by_window);
    by_window.min(slowest)
}
