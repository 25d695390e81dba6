//! The Redis sink: every event, as a durable, replayable Redis stream entry per collection
//! and per kind, for consumers that already speak Redis.
//!
//! Owns: reading sluice's own log from the sink's position (like a catch-up subscriber),
//! shaping each event's stream entries (`<prefix>c:<collection>`, `<prefix>k:<kind>`,
//! optionally `<prefix>all`; entry id `<seq>-0`; fields `event`, `time_us`, `seq`, `did`),
//! and writing each batch together with the sink's position in one Redis transaction that
//! compares and sets that position (`WATCH`, then `MULTI`/`EXEC`; see [`transact`]); its
//! own thread and runtime at `--redis-sink-nice`; probing a Redis that is not up, and
//! backing off from one that fails ([`fail`]).
//! Must never: hold more than two batches of events (`--redis-sink-batch-events`,
//! `--redis-sink-batch-kib`), write an event the log could still lose (it sinks only what
//! is durable), write a stream entry twice or skip one without counting it, or slow ingest
//! and subscribers: it is one more reader of the log, its CPU runs below the live path's
//! priority, and when Redis is slow or away it simply falls behind and catches up later.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::watch;

use crate::event::{Event, EventKind};
use crate::log::{LogError, LogReader, Payloads, ReadLimits};
use crate::wire::json::push_key;

/// Everything the sink is configured with.
#[derive(Debug, Clone)]
pub struct RedisSinkConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key the sink writes (default `sluice:`).
    pub prefix: String,
    /// Also write every event to `<prefix>all`.
    pub all_stream: bool,
    /// Also PUBLISH each collection entry's JSON on the channel `<prefix>c:<collection>`.
    pub publish: bool,
    /// Streams are trimmed to about this many entries (0 = no length bound).
    pub max_len: u64,
    /// ...and entries whose source time is more than this older than the newest sunk
    /// event's are trimmed (None = no age bound).
    pub max_age: Option<Duration>,
    /// Most events, and bytes of event JSON, per write (the sink's memory bound).
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    /// Deadline of one Redis command (connect, write).
    pub timeout: Duration,
    /// Reconnect backoff after errors from a live Redis: full jitter, doubling from
    /// `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// While Redis refuses connections (or answers that it is loading its data), the sink
    /// tries again this often, without backoff: a refused connect costs Redis nothing, and
    /// the sink resumes within this interval of Redis coming back.
    pub probe_interval: Duration,
    /// Niceness of the sink's thread (its log reads, encoding and Redis I/O run on a
    /// runtime of their own): above the live path's, so that on busy cores live delivery
    /// runs first. 0 = the live path's priority.
    pub nice: i32,
}

impl RedisSinkConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "sluice:".into(),
            all_stream: false,
            publish: false,
            max_len: 1_000_000,
            max_age: Some(Duration::from_secs(24 * 3600)),
            batch_max_events: 2000,
            batch_max_bytes: 4 * 1024 * 1024,
            timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            probe_interval: Duration::from_millis(100),
            nice: 19,
        }
    }

    /// The key of the sink's position hash (fields `seq`, `time_us`).
    pub fn position_key(&self) -> String {
        format!("{}sink", self.prefix)
    }
}

/// Why a sink step failed. Each is counted under its `reason()` and retried.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    #[error("event log: {0}")]
    Log(#[from] LogError),
    /// The sink's thread or runtime could not be started (only from [`start`]).
    #[error("cannot start the sink's thread: {0}")]
    Start(std::io::Error),
}

impl SinkError {
    /// The reasons a running sink counts (`Start` happens before it runs).
    pub const REASONS: [&'static str; 4] = ["redis", "timeout", "reply", "log"];

    pub fn reason(&self) -> &'static str {
        match self {
            SinkError::Redis(_) => "redis",
            SinkError::Timeout(_) => "timeout",
            SinkError::Reply(_) => "reply",
            SinkError::Log(_) => "log",
            SinkError::Start(_) => "start",
        }
    }

    /// Redis is not there to answer yet: it refused the connection, or it answered that
    /// it is still loading its data. Such failures are probed for at
    /// `--redis-sink-probe-ms` rather than backed off from.
    pub fn redis_not_up(&self) -> bool {
        match self {
            SinkError::Redis(e) => {
                e.is_connection_refusal() || e.kind() == redis::ErrorKind::BusyLoadingError
            }
            _ => false,
        }
    }
}

/// The sink's counters, read by the admin endpoints.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// The newest seq whose entries are in Redis (the stored position).
    pub position: AtomicU64,
    /// Source time of that event (0 before the first).
    pub position_time_us: AtomicU64,
    pub connected: AtomicBool,
    /// The sink runs under a cluster's lease (else it is alone and always active).
    pub leased: bool,
    /// The sink may write: it runs alone, or holds the cluster's sink lease.
    pub active: AtomicBool,
    /// Times this node's sink took the lease.
    pub lease_takeovers: AtomicU64,
    /// Events covered by writes (each once, whatever its number of entries).
    pub events: AtomicU64,
    /// Stream entries added.
    pub entries: AtomicU64,
    /// Entries Redis already held (a repeated write), counted and skipped.
    pub duplicates: AtomicU64,
    /// Entries Redis refused for another reason than a repeat (e.g. the key holds another
    /// type): counted and logged, the position moves on.
    pub rejected: AtomicU64,
    /// Events visible on no JSON wire (empty commits, unknown types): nothing to write.
    pub skipped: AtomicU64,
    /// Events retention deleted before the sink reached them (Redis was away too long).
    pub lost: AtomicU64,
    /// Writes refused because the stored position was not the sink's (another writer, or
    /// a Redis restored to an older state); the sink resumes from the stored one.
    pub position_conflicts: AtomicU64,
    /// Transactions that applied a batch.
    pub batches: AtomicU64,
    /// Microseconds spent in writes to Redis (the position check and the transaction,
    /// round trips included).
    pub write_us: AtomicU64,
    /// Microseconds spent waiting for a batch from the log: its read and encoding when they
    /// did not overlap a write.
    pub read_wait_us: AtomicU64,
    /// Microseconds spent waiting out the backoff (or the probe interval) after failures.
    pub backoff_us: AtomicU64,
    /// Attempts that found Redis not up (connection refused, or loading its data), each
    /// followed by the probe interval rather than the backoff.
    pub probes: AtomicU64,
    pub errors_redis: AtomicU64,
    pub errors_timeout: AtomicU64,
    pub errors_reply: AtomicU64,
    pub errors_log: AtomicU64,
}

impl SinkStats {
    fn count_error(&self, e: &SinkError) {
        let c = match e {
            SinkError::Redis(_) => &self.errors_redis,
            SinkError::Timeout(_) => &self.errors_timeout,
            SinkError::Reply(_) => &self.errors_reply,
            SinkError::Log(_) | SinkError::Start(_) => &self.errors_log,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Where the sink's time went (microseconds), by part: see [`SinkStats::PARTS`].
    pub const PARTS: [&'static str; 3] = ["write", "read_wait", "backoff"];

    pub fn time_us(&self, part: &str) -> u64 {
        match part {
            "write" => &self.write_us,
            "read_wait" => &self.read_wait_us,
            _ => &self.backoff_us,
        }
        .load(Ordering::Relaxed)
    }

    fn add_time(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn errors(&self, reason: &str) -> u64 {
        match reason {
            "redis" => &self.errors_redis,
            "timeout" => &self.errors_timeout,
            "reply" => &self.errors_reply,
            _ => &self.errors_log,
        }
        .load(Ordering::Relaxed)
    }

    /// Events durable in the log but not yet in Redis, and the source-time distance
    /// between the newest of them and the position (seconds).
    pub fn lag(&self, reader: &LogReader) -> (u64, f64) {
        let position = self.position.load(Ordering::Relaxed);
        let durable = reader.durable_seq();
        let events = durable.saturating_sub(position);
        if events == 0 {
            return (0, 0.0);
        }
        let newest_time = reader.bounds().map_or(0, |b| b.newest_time_us);
        let at = self.position_time_us.load(Ordering::Relaxed) as i64;
        let seconds = if at == 0 {
            // Nothing sunk yet: measured from the oldest event held.
            reader
                .bounds()
                .map_or(0.0, |b| (newest_time - b.oldest_time_us) as f64 / 1e6)
        } else {
            (newest_time - at).max(0) as f64 / 1e6
        };
        (events, seconds)
    }
}

/// One stream entry of an event: where it goes and whether it is also published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub publish: bool,
}

/// What the sink writes for one event: its JSON and its entries (none for events that
/// no JSON wire shows: empty commits and unknown types).
#[derive(Debug, Clone)]
pub struct Shaped {
    pub json: Bytes,
    pub entries: Vec<Entry>,
}

/// The sink's JSON and stream keys for `event`. Commits, identity and account events carry
/// their Jetstream v1 JSON unchanged; `#sync` and `tooBig` commits, which Jetstream v1 does
/// not show, get the same v1 shape (`{did, time_us, cursor, kind, <kind>: {...}}`) made
/// from their v2 payload, and a `tooBig` commit is written to the stream of every
/// collection its ops touch as well as to `<prefix>k:tooBig`, so a collection's readers
/// learn that a repo must be resynced.
pub fn shape(event: &Event, config: &RedisSinkConfig) -> Option<Shaped> {
    let p = &config.prefix;
    let all = config
        .all_stream
        .then(|| format!("{p}all"))
        .map(|key| Entry {
            key,
            publish: false,
        });
    let (json, mut entries) = match event.kind {
        EventKind::Commit => {
            let collection = event.collection.as_deref()?;
            let json = event.v1_json.clone()?;
            (
                json,
                vec![Entry {
                    key: format!("{p}c:{collection}"),
                    publish: config.publish,
                }],
            )
        }
        EventKind::Identity | EventKind::Account => {
            let json = event.v1_json.clone()?;
            (
                json,
                vec![Entry {
                    key: format!("{p}k:{}", event.kind.as_str()),
                    publish: false,
                }],
            )
        }
        EventKind::Sync => {
            let payload = v2_payload(event)?;
            let body = payload.get("sync")?;
            let json = v1_shaped(event, "sync", &serde_json::to_vec(body).ok()?);
            (
                json,
                vec![Entry {
                    key: format!("{p}k:sync"),
                    publish: false,
                }],
            )
        }
        EventKind::CommitTooBig => {
            let mut payload = v2_payload(event)?;
            let object = payload.as_object_mut()?;
            for k in ["$type", "seq", "did", "time"] {
                object.remove(k);
            }
            let mut collections: Vec<String> = object
                .get("ops")
                .and_then(|ops| ops.as_array())
                .map(|ops| {
                    ops.iter()
                        .filter_map(|op| op.get("path")?.as_str())
                        .filter_map(|path| path.split_once('/').map(|(c, _)| c.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            collections.sort();
            collections.dedup();
            let json = v1_shaped(event, "tooBig", &serde_json::to_vec(&payload).ok()?);
            let mut entries: Vec<Entry> = collections
                .into_iter()
                .map(|c| Entry {
                    key: format!("{p}c:{c}"),
                    publish: config.publish,
                })
                .collect();
            entries.push(Entry {
                key: format!("{p}k:tooBig"),
                publish: false,
            });
            (json, entries)
        }
        EventKind::CommitEmpty | EventKind::Unknown => return None,
    };
    entries.extend(all);
    Some(Shaped { json, entries })
}

fn v2_payload(event: &Event) -> Option<serde_json::Value> {
    let v2 = event.v2_json.as_ref()?;
    let mut message: serde_json::Value = serde_json::from_slice(v2).ok()?;
    Some(message.get_mut("payload")?.take())
}

fn v1_shaped(event: &Event, kind: &str, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(96 + event.did.len() + body.len());
    crate::wire::jetstream_v1::open(&mut out, &event.did, event.time_us, event.seq, kind);
    push_key(&mut out, kind);
    out.extend_from_slice(body);
    out.push(b'}');
    out.into()
}

/// A running sink: its own thread, with a runtime of its own (see [`start_with_lease`]).
/// Dropping it stops the sink as a timed-out shutdown does.
pub struct SinkHandle {
    pub stats: Arc<SinkStats>,
    shutdown: watch::Sender<bool>,
    /// Dropping the sink's loop at once (after a shutdown that did not finish in time).
    abort: tokio::sync::oneshot::Sender<()>,
    /// Answered when the sink's loop has ended.
    done: tokio::sync::oneshot::Receiver<()>,
}

impl SinkHandle {
    /// Stops after the write in flight (if any); what is written stays consistent with
    /// the stored position, so nothing is lost or repeated.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.shutdown.send(true);
        let mut done = self.done;
        if tokio::time::timeout(timeout, &mut done).await.is_err() {
            tracing::warn!("redis sink did not stop in time; aborted");
            let _ = self.abort.send(());
        }
    }
}

/// Whether, and under which epoch, this node holds the lease to run the sink: `Some(epoch)`
/// while it does (a cluster's named lease, `cluster::NamedLease`).
pub type Lease = watch::Receiver<Option<u64>>;

/// Starts the sink on the current runtime; it writes whenever it can (a single node).
pub fn start(reader: LogReader, config: RedisSinkConfig) -> Result<SinkHandle, SinkError> {
    start_with_lease(reader, config, None)
}

/// Starts the sink; with a `lease`, it writes only while the lease says this node holds it
/// and otherwise follows the stored position, so its lag stays true (a cluster: one node
/// sinks at a time). Each time it takes the lease it resumes from the stored position,
/// wherever the previous holder left it.
pub fn start_with_lease(
    reader: LogReader,
    config: RedisSinkConfig,
    lease: Option<Lease>,
) -> Result<SinkHandle, SinkError> {
    let client = redis::Client::open(config.url.as_str())?;
    let stats = Arc::new(SinkStats {
        leased: lease.is_some(),
        active: AtomicBool::new(lease.is_none()),
        ..SinkStats::default()
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    // The sink's CPU (log reads, shaping, encoding the commands, the client's packing and
    // reply parsing) runs on its own niced thread and blocking threads, not on the live
    // path's workers: while it catches up after an outage, live delivery runs first on
    // busy cores (docs/DECISIONS.md, Redis sink).
    let class = crate::priority::Background::Nice(config.nice);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("redis-sink-read")
        .on_thread_start(move || crate::priority::lower_this_thread_or_log(class, "redis sink"))
        .build()
        .map_err(SinkError::Start)?;
    let loop_stats = stats.clone();
    std::thread::Builder::new()
        .name("redis-sink".into())
        .spawn(move || {
            crate::priority::lower_this_thread_or_log(class, "redis sink");
            runtime.block_on(async move {
                tokio::select! {
                    _ = run(client, reader, config, loop_stats, shutdown_rx, lease) => {}
                    _ = abort_rx => {}
                }
            });
            // Blocking reads still under way end on their own; nothing waits for them.
            runtime.shutdown_background();
            let _ = done_tx.send(());
        })
        .map_err(SinkError::Start)?;
    Ok(SinkHandle {
        stats,
        shutdown: shutdown_tx,
        abort: abort_tx,
        done: done_rx,
    })
}

struct Conn {
    con: MultiplexedConnection,
    /// The stored position: the next write continues after it.
    position: u64,
}

async fn with_timeout<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, SinkError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SinkError::Timeout(timeout)),
    }
}

async fn connect(client: &redis::Client, config: &RedisSinkConfig) -> Result<Conn, SinkError> {
    let mut con = with_timeout(
        config.timeout,
        client.get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_connection_timeout(config.timeout)
                .set_response_timeout(config.timeout),
        ),
    )
    .await?;
    let stored: Option<String> = with_timeout(
        config.timeout,
        redis::cmd("HGET")
            .arg(config.position_key())
            .arg("seq")
            .query_async(&mut con),
    )
    .await?;
    let position = parse_position(stored)?;
    Ok(Conn { con, position })
}

async fn run(
    client: redis::Client,
    reader: LogReader,
    config: RedisSinkConfig,
    stats: Arc<SinkStats>,
    mut shutdown: watch::Receiver<bool>,
    mut lease: Option<Lease>,
) {
    let mut durable = reader.watch_durable();
    // The epoch of the lease this node held at the last check (None: not held).
    let mut epoch: Option<u64> = None;
    let mut conn: Option<Conn> = None;
    let mut failures = 0u32;
    let mut last_trim = Instant::now();
    let mut warned_ahead = false;
    let mut prefetched: Option<Prepared> = None;
    // Events per write: halved after a write that timed out (a batch Redis cannot apply
    // within the deadline would otherwise be retried forever), doubled back after each
    // write that succeeds.
    let mut batch_events = config.batch_max_events.max(1);
    tracing::info!(prefix = %config.prefix, "redis sink starting");
    while !*shutdown.borrow() {
        if let Some(rx) = lease.as_mut() {
            let now = *rx.borrow_and_update();
            if now != epoch {
                // The lease changed hands: whatever another node wrote meanwhile is read
                // afresh (a new connection reads the stored position).
                epoch = now;
                conn = None;
                prefetched = None;
                stats.active.store(now.is_some(), Ordering::Relaxed);
                match now {
                    Some(epoch) => {
                        stats.lease_takeovers.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            epoch,
                            "redis sink: took the sink lease; resuming from the stored position"
                        );
                    }
                    None => {
                        tracing::info!("redis sink: standby (another node holds the sink lease)")
                    }
                }
            }
            if epoch.is_none() {
                follow(
                    &client,
                    &config,
                    &stats,
                    &mut conn,
                    &mut failures,
                    &mut shutdown,
                )
                .await;
                let changed = tokio::select! {
                    r = rx.changed() => r.is_ok(),
                    _ = shutdown.changed() => true,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => true,
                };
                if !changed {
                    tracing::warn!("redis sink: the sink lease's keeper is gone; stopping");
                    break;
                }
                continue;
            }
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&client, &config).await {
                Ok(c) => {
                    tracing::info!(position = c.position, "redis sink connected");
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.position.store(c.position, Ordering::Relaxed);
                    conn.insert(c)
                }
                Err(e) => {
                    fail(&stats, &e, &mut failures, &config, &mut shutdown).await;
                    continue;
                }
            },
        };
        let durable_seq = reader.durable_seq();
        if c.position >= durable_seq {
            if c.position > durable_seq && !warned_ahead {
                warned_ahead = true;
                tracing::warn!(
                    position = c.position,
                    durable_seq,
                    "redis sink position is ahead of the log: waiting for the log to reach it \
                     (a different or reset data directory would never reach it)"
                );
            }
            let idle = tokio::select! {
                _ = durable.wait_for(|&d| d > c.position) => false,
                _ = shutdown.changed() => false,
                _ = lease_changed(&mut lease) => false,
                _ = tokio::time::sleep(Duration::from_secs(1)) => true,
            };
            if idle {
                // Nothing to write for a second: check Redis is still there, so
                // `connected` (metrics, status, /readyz) is true only while it is.
                let ping: Result<Value, _> =
                    with_timeout(config.timeout, redis::cmd("PING").query_async(&mut c.con)).await;
                match ping {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        conn = None;
                        stats.connected.store(false, Ordering::Relaxed);
                        fail(&stats, &e, &mut failures, &config, &mut shutdown).await;
                    }
                }
            }
            continue;
        }
        warned_ahead = false;
        let from = c.position + 1;
        let trim_due = config.max_age.is_some() && last_trim.elapsed() >= Duration::from_secs(1);
        let reading = Instant::now();
        let prepared = match prefetched.take() {
            Some(p) if p.from == from => Ok(Some(p)),
            _ => prepare(&reader, from, durable_seq, &config, batch_events, trim_due).await,
        };
        SinkStats::add_time(&stats.read_wait_us, reading.elapsed());
        let batch = match prepared {
            Ok(Some(batch)) => batch,
            Ok(None) => continue,
            Err(SinkError::Log(LogError::TooOld { oldest, .. })) => {
                // Only when nothing was ever sunk is starting at the oldest event held not
                // a loss.
                if c.position > 0 {
                    let lost = oldest.saturating_sub(from);
                    stats.lost.fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(
                        from,
                        oldest,
                        lost,
                        "redis sink fell out of the log's retention: events were NOT written to redis"
                    );
                }
                match write_skip(c, oldest.saturating_sub(1), &config).await {
                    Ok(true) => stats.position.store(c.position, Ordering::Relaxed),
                    Ok(false) => {
                        stats.position_conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        conn = None;
                        stats.connected.store(false, Ordering::Relaxed);
                        fail(&stats, &e, &mut failures, &config, &mut shutdown).await;
                    }
                }
                continue;
            }
            Err(e) => {
                fail(&stats, &e, &mut failures, &config, &mut shutdown).await;
                continue;
            }
        };
        if batch.age_checked {
            // Checked, whether or not anything was old enough to trim: the next check is
            // a second away either way.
            last_trim = Instant::now();
        }
        let (last_seq, last_time, events) = (batch.last_seq, batch.last_time_us, batch.events);
        // While Redis applies this batch, the next one is read and encoded: the sink's
        // CPU and Redis's overlap (at most two batches are held).
        let next_from = last_seq + 1;
        let durable_now = reader.durable_seq();
        let next_trim = config.max_age.is_some() && last_trim.elapsed() >= Duration::from_secs(1);
        let joined = Instant::now();
        let (written, next) = tokio::join!(
            async {
                let writing = Instant::now();
                let written = write(c, batch, &config).await;
                (written, writing.elapsed())
            },
            async {
                if next_from <= durable_now {
                    prepare(
                        &reader,
                        next_from,
                        durable_now,
                        &config,
                        batch_events,
                        next_trim,
                    )
                    .await
                    .ok()
                    .flatten()
                } else {
                    None
                }
            }
        );
        let (written, writing) = written;
        // The write's time, and what the loop waited beyond it for the next batch.
        SinkStats::add_time(&stats.write_us, writing);
        SinkStats::add_time(
            &stats.read_wait_us,
            joined.elapsed().saturating_sub(writing),
        );
        prefetched = next;
        match written {
            Ok(Written::Done {
                entries,
                duplicates,
                rejected,
                skipped,
            }) => {
                stats.rejected.fetch_add(rejected, Ordering::Relaxed);
                stats.skipped.fetch_add(skipped, Ordering::Relaxed);
                stats.events.fetch_add(events, Ordering::Relaxed);
                stats.entries.fetch_add(entries, Ordering::Relaxed);
                stats.duplicates.fetch_add(duplicates, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                failures = 0;
                batch_events = batch_events
                    .saturating_mul(2)
                    .min(config.batch_max_events.max(1));
                stats.position.store(last_seq, Ordering::Relaxed);
                stats
                    .position_time_us
                    .store(u64::try_from(last_time).unwrap_or(0), Ordering::Relaxed);
                if duplicates > 0 {
                    tracing::warn!(
                        duplicates,
                        last_seq,
                        "redis already held some entries of this batch; they were skipped"
                    );
                }
            }
            Ok(Written::Conflict { stored }) => {
                stats.position_conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    ours = c.position,
                    stored,
                    "redis sink position changed under us; resuming from the stored one"
                );
                c.position = stored;
                stats.position.store(stored, Ordering::Relaxed);
            }
            Err(e) => {
                if matches!(e, SinkError::Timeout(_)) && batch_events > 1 {
                    batch_events /= 2;
                    prefetched = None;
                    tracing::warn!(batch_events, "redis sink write timed out; smaller batches");
                }
                conn = None;
                stats.connected.store(false, Ordering::Relaxed);
                fail(&stats, &e, &mut failures, &config, &mut shutdown).await;
            }
        }
    }
    stats.connected.store(false, Ordering::Relaxed);
    tracing::info!("redis sink stopped");
}

/// Returns when the lease changes (never without one, or once its keeper is gone).
async fn lease_changed(lease: &mut Option<Lease>) {
    if let Some(rx) = lease {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// A standby's view of the stored position (read once a second), so its lag in
/// `/metrics` and on the status page says how far Redis is behind, whoever writes.
async fn follow(
    client: &redis::Client,
    config: &RedisSinkConfig,
    stats: &SinkStats,
    conn: &mut Option<Conn>,
    failures: &mut u32,
    shutdown: &mut watch::Receiver<bool>,
) {
    let read = async {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => conn.insert(connect(client, config).await?),
        };
        let (seq, time_us): (Option<String>, Option<String>) = with_timeout(
            config.timeout,
            redis::cmd("HMGET")
                .arg(config.position_key())
                .arg("seq")
                .arg("time_us")
                .query_async(&mut c.con),
        )
        .await?;
        c.position = parse_position(seq)?;
        let time_us = time_us.and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        Ok::<_, SinkError>((c.position, time_us))
    };
    match read.await {
        Ok((position, time_us)) => {
            *failures = 0;
            stats.connected.store(true, Ordering::Relaxed);
            stats.position.store(position, Ordering::Relaxed);
            stats.position_time_us.store(time_us, Ordering::Relaxed);
        }
        Err(e) => {
            *conn = None;
            stats.connected.store(false, Ordering::Relaxed);
            fail(stats, &e, failures, config, shutdown).await;
        }
    }
}

/// Counts and logs `e`, then waits (or until shutdown) before the next attempt:
/// - Redis not up (connection refused, or still loading its data): the probe interval,
///   with no backoff, so the sink resumes within it of Redis being back;
/// - the first other failure since the last success (usually: Redis just went away, and
///   the next attempt finds out whether it refuses): the probe interval too;
/// - every further one (a live Redis that keeps failing, or a flapping one that accepts
///   and drops): full-jitter backoff, doubling from `backoff_min` up to `backoff_max`.
///
/// `failures` counts the failures of the second and third kinds; only a successful
/// command from Redis resets it (a connect alone does not), so a Redis that flaps is
/// backed off from.
async fn fail(
    stats: &SinkStats,
    e: &SinkError,
    failures: &mut u32,
    config: &RedisSinkConfig,
    shutdown: &mut watch::Receiver<bool>,
) {
    stats.count_error(e);
    let wait = if e.redis_not_up() {
        let probes = stats.probes.fetch_add(1, Ordering::Relaxed) + 1;
        if probes.is_power_of_two() {
            tracing::warn!(error = %e, probes, "redis sink: redis is not up; probing");
        }
        config.probe_interval
    } else {
        *failures = failures.saturating_add(1);
        if *failures <= 3 || failures.is_power_of_two() {
            tracing::warn!(reason = e.reason(), error = %e, failures = *failures, "redis sink: retrying");
        }
        if *failures == 1 {
            config.probe_interval
        } else {
            config
                .backoff_min
                .saturating_mul(1u32 << (*failures - 2).min(16))
                .min(config.backoff_max)
                .mul_f64(rand::random::<f64>())
        }
    };
    let waiting = Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.changed() => {}
    }
    SinkStats::add_time(&stats.backoff_us, waiting.elapsed());
}

/// The seq of the oldest event within `age` of `newest_time_us` (0 when none is older).
fn min_seq_within(reader: &LogReader, newest_time_us: i64, age: Duration) -> u64 {
    let age_us = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
    let cutoff = newest_time_us.saturating_sub(age_us);
    match reader.resolve(crate::log::Cursor::TimeUs(cutoff)) {
        Ok(crate::log::Resolved::From(seq)) => seq,
        _ => 0,
    }
}

/// One batch, read from the log and encoded as the commands of one transaction.
struct Prepared {
    /// The seq the batch starts at (the position it continues is `from - 1`).
    from: u64,
    /// Events covered.
    events: u64,
    last_seq: u64,
    last_time_us: i64,
    /// `MULTI` and the batch's commands.
    tx: redis::Pipeline,
    /// For each command after `MULTI`: whether it is an `XADD` (else PUBLISH or XTRIM).
    is_xadd: Vec<bool>,
    /// Events with no JSON form.
    skipped: u64,
    /// Whether the age bound was checked for this batch (whatever it found).
    age_checked: bool,
}

/// Reads up to one batch of durable events from `from` and encodes it, on a blocking
/// thread (the store read and the encoding are the sink's CPU). `None` when nothing
/// durable is there yet. With `trim_due`, the batch also trims every stream it touches to
/// the events within `--redis-sink-max-age-secs` of its newest.
async fn prepare(
    reader: &LogReader,
    from: u64,
    durable_seq: u64,
    config: &RedisSinkConfig,
    batch_events: usize,
    trim_due: bool,
) -> Result<Option<Prepared>, SinkError> {
    let reader = reader.clone();
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        prepare_blocking(&reader, from, durable_seq, &config, batch_events, trim_due)
    })
    .await
    .map_err(|e| SinkError::Log(LogError::Backend(format!("sink read task: {e}"))))?
}

fn prepare_blocking(
    reader: &LogReader,
    from: u64,
    durable_seq: u64,
    config: &RedisSinkConfig,
    batch_events: usize,
    trim_due: bool,
) -> Result<Option<Prepared>, SinkError> {
    if from > durable_seq {
        return Ok(None);
    }
    let max_events = batch_events
        .min(usize::try_from(durable_seq - from + 1).unwrap_or(usize::MAX))
        .max(1);
    let limits = ReadLimits {
        max_events,
        max_bytes: config.batch_max_bytes,
    };
    let payloads = Payloads {
        v1: true,
        v2: true,
        raw: false,
    };
    let mut events = reader.read_from_with(from, limits, payloads)?;
    // Only what is durable: an event the log could still lose is never in Redis.
    events.retain(|e| e.seq <= durable_seq);
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let age_checked = trim_due && config.max_age.is_some();
    let minid = match config.max_age {
        Some(age) if trim_due => min_seq_within(reader, last.time_us, age),
        _ => 0,
    };
    let mut tx = redis::Pipeline::with_capacity(events.len() + 64);
    tx.cmd("MULTI");
    let mut skipped = 0;
    let mut is_xadd = Vec::with_capacity(events.len() + 64);
    let mut id = itoa::Buffer::new();
    // Every stream the batch adds to, each trimmed once after the batch's entries.
    let mut touched: HashSet<String> = HashSet::new();
    for event in &events {
        let Some(shaped) = shape(event, config) else {
            skipped += 1;
            continue;
        };
        for entry in &shaped.entries {
            // Sized up front: grown argument by argument, a ~700-byte command's buffer was
            // reallocated about seven times.
            let seq = id.format(event.seq);
            let mut entry_id = [0u8; 24]; // u64 digits (at most 20) and "-0"
            let n = seq.len();
            entry_id[..n].copy_from_slice(seq.as_bytes());
            entry_id[n..n + 2].copy_from_slice(b"-0");
            let mut xadd = redis::Cmd::with_capacity(
                11,
                64 + entry.key.len() + 2 * seq.len() + shaped.json.len() + event.did.len(),
            );
            xadd.arg("XADD")
                .arg(&entry.key)
                .arg(&entry_id[..n + 2])
                .arg("event")
                .arg(shaped.json.as_ref())
                .arg("time_us")
                .arg(event.time_us)
                .arg("seq")
                .arg(seq)
                .arg("did")
                .arg(&*event.did);
            tx.add_command(xadd);
            is_xadd.push(true);
            if entry.publish {
                tx.cmd("PUBLISH").arg(&entry.key).arg(shaped.json.as_ref());
                is_xadd.push(false);
            }
            if !touched.contains(&entry.key) {
                touched.insert(entry.key.clone());
            }
        }
    }
    // Trimming once per stream per batch, not with `MAXLEN ~` on every `XADD`: Redis
    // rewrites a trimming `XADD`'s arguments for its AOF, which cost it ~1 µs of its ~6 per
    // entry (docs/DECISIONS.md, Redis sink). The bound still holds after every batch.
    let mut touched: Vec<String> = touched.into_iter().collect();
    touched.sort();
    for key in &touched {
        if config.max_len > 0 {
            tx.cmd("XTRIM")
                .arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(config.max_len);
            is_xadd.push(false);
        }
        if minid > 0 {
            tx.cmd("XTRIM")
                .arg(key)
                .arg("MINID")
                .arg("~")
                .arg(format!("{minid}-0"));
            is_xadd.push(false);
        }
    }
    Ok(Some(Prepared {
        from,
        events: events.len() as u64,
        last_seq: last.seq,
        last_time_us: last.time_us,
        tx,
        is_xadd,
        skipped,
        age_checked,
    }))
}

/// Writes `body` and moves the stored position to `(to_seq, to_time_us)` in one step, if
/// the stored position is still `c.position`: `WATCH` the position, read it, and only if it
/// is ours queue the entries and the new position in `MULTI`/`EXEC`. A transaction is
/// applied whole or not at all (AOF records it as one unit; a torn one at the end of the
/// file is dropped on load), so the position always describes exactly what the streams
/// hold. If another writer moved the position in between, `EXEC` does nothing and the
/// stored position is returned instead.
///
/// `tx` starts with `MULTI` and holds `body_len` commands after it; the replies of those
/// commands are returned in order. A command can fail inside
/// `EXEC` without undoing the others: an `XADD` whose id the stream already passed is
/// such a failure (a harmless repeated write), which callers count.
async fn transact(
    c: &mut Conn,
    config: &RedisSinkConfig,
    mut tx: redis::Pipeline,
    body_len: usize,
    to_seq: u64,
    to_time_us: i64,
) -> Result<Result<Vec<Value>, u64>, SinkError> {
    use redis::aio::ConnectionLike;
    let key = config.position_key();
    let (_, stored): (Value, Option<String>) = with_timeout(
        config.timeout,
        redis::pipe()
            .cmd("WATCH")
            .arg(&key)
            .cmd("HGET")
            .arg(&key)
            .arg("seq")
            .query_async(&mut c.con),
    )
    .await?;
    let stored = parse_position(stored)?;
    if stored != c.position {
        let _: Value = with_timeout(
            config.timeout,
            redis::cmd("UNWATCH").query_async(&mut c.con),
        )
        .await?;
        return Ok(Err(stored));
    }
    tx.cmd("HSET")
        .arg(&key)
        .arg("seq")
        .arg(to_seq)
        .arg("time_us")
        .arg(to_time_us)
        .cmd("EXEC");
    let count = body_len + 3;
    let replies = with_timeout(config.timeout, c.con.req_packed_commands(&tx, 0, count)).await?;
    match replies.into_iter().last() {
        Some(Value::Array(mut results)) if results.len() == body_len + 1 => {
            results.pop(); // HSET
            c.position = to_seq;
            Ok(Ok(results))
        }
        Some(Value::Nil) => {
            // The position changed between WATCH and EXEC: read it again.
            let stored: Option<String> = with_timeout(
                config.timeout,
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("seq")
                    .query_async(&mut c.con),
            )
            .await?;
            Ok(Err(parse_position(stored)?))
        }
        other => Err(SinkError::Reply(format!("EXEC answered {other:?}"))),
    }
}

fn parse_position(stored: Option<String>) -> Result<u64, SinkError> {
    match stored {
        None => Ok(0),
        Some(s) => s
            .parse()
            .map_err(|_| SinkError::Reply(format!("position {s:?} is not a seq"))),
    }
}

enum Written {
    Done {
        entries: u64,
        duplicates: u64,
        rejected: u64,
        skipped: u64,
    },
    Conflict {
        stored: u64,
    },
}

async fn write(
    c: &mut Conn,
    batch: Prepared,
    config: &RedisSinkConfig,
) -> Result<Written, SinkError> {
    let Prepared {
        tx,
        is_xadd,
        skipped,
        last_seq,
        last_time_us,
        ..
    } = batch;
    match transact(c, config, tx, is_xadd.len(), last_seq, last_time_us).await? {
        Ok(replies) => {
            let (mut entries, mut duplicates, mut rejected) = (0, 0, 0);
            let mut trim_refused = false;
            for (reply, xadd) in replies.iter().zip(&is_xadd) {
                match (reply, xadd) {
                    // "The ID specified in XADD is equal or smaller than the target
                    // stream top item": the entry is already there.
                    (Value::ServerError(e), true)
                        if e.details().is_some_and(|d| d.contains("equal or smaller")) =>
                    {
                        duplicates += 1
                    }
                    (Value::ServerError(e), true) => {
                        if rejected == 0 {
                            tracing::error!(
                                code = e.code(),
                                detail = e.details().unwrap_or(""),
                                "redis refused a stream entry; it is NOT in redis"
                            );
                        }
                        rejected += 1;
                    }
                    (_, true) => entries += 1,
                    (Value::ServerError(e), false) => {
                        // An XTRIM (or PUBLISH) refused: the key is not a stream, so its
                        // XADDs were refused and counted too. The batch is applied all
                        // the same; this must not take the counts with it.
                        if !trim_refused {
                            tracing::warn!(
                                code = e.code(),
                                detail = e.details().unwrap_or(""),
                                "redis refused a trim or publish of the sink"
                            );
                        }
                        trim_refused = true;
                    }
                    _ => {}
                }
            }
            Ok(Written::Done {
                entries,
                duplicates,
                rejected,
                skipped,
            })
        }
        Err(stored) => Ok(Written::Conflict { stored }),
    }
}

/// Moves the stored position to `to` without entries (retention passed the sink, or the
/// log starts after seq 1). True if it was ours to move.
async fn write_skip(c: &mut Conn, to: u64, config: &RedisSinkConfig) -> Result<bool, SinkError> {
    let mut tx = redis::pipe();
    tx.cmd("MULTI");
    match transact(c, config, tx, 0, to, 0).await? {
        Ok(_) => Ok(true),
        Err(stored) => {
            c.position = stored;
            Ok(false)
        }
    }
}
