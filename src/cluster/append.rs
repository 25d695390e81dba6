//! The leader's appender: one term's frames, batched, encoded and appended to the stream.
//!
//! Owns: batching what ingest queued, encoding each batch into an entry
//! (`entry::EntryEncoder`, one zstd context per term) on its own thread while the
//! previous batch is in flight, the fenced append of each batch in order (`Link::append`), the byte bound of the window, and the term's own
//! clock ([`TermCtl`]). Must never: append after the term's clock says the lease may have
//! expired, append a batch before the one ahead of it was acknowledged, retry a batch
//! Redis refused, or hold more than three batches (one being encoded, one encoded and
//! waiting, one in flight).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::{Keys, Link};
use super::{entry, ClusterConfig, ClusterError, ClusterShared};
use crate::event::{Event, StampState};

/// The leader stops appending this long before its lease can have expired.
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(100))
}

/// One leader term as the lease loop, ingest's sink and the appender share it.
#[derive(Debug)]
pub struct TermCtl {
    pub epoch: u64,
    /// Monotonic deadline (ns since `base`) after which the lease may have expired.
    valid_until_ns: AtomicU64,
    base: Instant,
    /// Set when an append was refused for good (fenced, gap, cursor) or the lease lapsed.
    pub ended: AtomicBool,
    pub why: parking_lot::Mutex<Option<String>>,
    /// Trim the stream below this seq with the next append (0: do not).
    pub trim_below: AtomicU64,
}

impl TermCtl {
    /// A term under `epoch` whose lease was granted by a request sent at `sent` for `ttl`.
    pub fn new(epoch: u64, sent: Instant, ttl: Duration) -> Self {
        let ctl = TermCtl {
            epoch,
            valid_until_ns: AtomicU64::new(0),
            base: Instant::now(),
            ended: AtomicBool::new(false),
            why: parking_lot::Mutex::new(None),
            trim_below: AtomicU64::new(0),
        };
        // `base` is after `sent`: the lease may have been granted up to this much earlier.
        ctl.extend(ctl.base, ttl.saturating_sub(sent.elapsed()));
        ctl
    }

    pub fn lease_valid(&self) -> bool {
        (self.base.elapsed().as_nanos() as u64) < self.valid_until_ns.load(Ordering::Acquire)
    }

    /// A renewal for `ttl`, sent at `sent_at`, succeeded.
    pub fn extend(&self, sent_at: Instant, ttl: Duration) {
        let until =
            (sent_at.saturating_duration_since(self.base) + ttl).saturating_sub(safety_margin(ttl));
        self.valid_until_ns
            .fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
    }

    pub fn end(&self, why: String) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            *self.why.lock() = Some(why);
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

/// One batch, encoded, waiting for its append.
struct Encoded {
    first_seq: u64,
    last_seq: u64,
    state: StampState,
    events: u64,
    payload: Vec<u8>,
}

/// Runs one term's appender until ingest's queue closes (then appends what is left) or
/// the term ends. Encoding runs on a second thread, one batch ahead of the append in
/// flight, so the leader's CPU work and Redis's overlap.
pub fn run(
    config: ClusterConfig,
    keys: Keys,
    shared: Arc<ClusterShared>,
    ctl: Arc<TermCtl>,
    rx: Receiver<Vec<Event>>,
) {
    let (tx, encoded) = std::sync::mpsc::sync_channel::<Encoded>(1);
    let encoder = {
        let (config, ctl) = (config.clone(), ctl.clone());
        std::thread::Builder::new()
            .name("sluice-cluster-encode".into())
            .spawn(move || encode_loop(&config, &ctl, rx, tx))
    };
    let encoder = match encoder {
        Ok(e) => e,
        Err(e) => {
            ctl.end(format!("cannot start the entry encoder: {e}"));
            return;
        }
    };
    send_loop(&config, &keys, &shared, &ctl, encoded);
    if encoder.join().is_err() {
        ctl.end("the entry encoder panicked".into());
    }
}

/// Batches whatever ingest queued (whole frames, up to the configured events and bytes)
/// and encodes it; stops when the queue closes, the sender is gone or the term ended.
fn encode_loop(
    config: &ClusterConfig,
    ctl: &TermCtl,
    rx: Receiver<Vec<Event>>,
    tx: SyncSender<Encoded>,
) {
    let mut encoder = match entry::EntryEncoder::new(config.compression_level) {
        Ok(e) => e,
        Err(e) => {
            ctl.end(format!("cannot start the entry encoder: {e}"));
            return;
        }
    };
    while let Ok(first) = rx.recv() {
        let mut batch = first;
        let mut frame_bytes: usize = batch.first().map_or(0, |e| e.raw_frame.len());
        while batch.len() < config.batch_max_events && frame_bytes < config.batch_max_bytes {
            match rx.try_recv() {
                Ok(more) => {
                    frame_bytes += more.first().map_or(0, |e| e.raw_frame.len());
                    batch.extend(more);
                }
                Err(_) => break,
            }
        }
        let (Some(head), Some(last)) = (batch.first(), batch.last()) else {
            continue;
        };
        let (first_seq, last_seq) = (head.seq, last.seq);
        let state = StampState {
            next_seq: last_seq + 1,
            last_time_us: last.time_us,
            upstream_cursor: Some(last.upstream_seq),
        };
        let payload = match encoder.encode(&entry::records_of(&batch)) {
            Ok(p) => p,
            Err(e) => {
                ctl.end(format!("cannot encode a stream entry: {e}"));
                return;
            }
        };
        let encoded = Encoded {
            first_seq,
            last_seq,
            state,
            events: batch.len() as u64,
            payload,
        };
        drop(batch);
        if ctl.is_ended() || tx.send(encoded).is_err() {
            return;
        }
    }
}

/// Appends encoded batches in order, one in flight; retries while Redis is unreachable
/// and the lease is still valid.
fn send_loop(
    config: &ClusterConfig,
    keys: &Keys,
    shared: &ClusterShared,
    ctl: &TermCtl,
    encoded: Receiver<Encoded>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ctl.end(format!("appender runtime: {e}"));
            return;
        }
    };
    let mut link = match Link::new(&config.redis_url, config.redis_timeout) {
        Ok(l) => l,
        Err(e) => {
            ctl.end(e.to_string());
            return;
        }
    };
    // Bytes per event of recent entries, for the byte bound of the window.
    let mut bytes_per_event = 0f64;
    while let Ok(batch) = encoded.recv() {
        let per_event = batch.payload.len() as f64 / batch.events.max(1) as f64;
        bytes_per_event = if bytes_per_event == 0.0 {
            per_event
        } else {
            bytes_per_event * 0.95 + per_event * 0.05
        };
        let mut trim_below = ctl.trim_below.load(Ordering::Relaxed);
        // The byte bound wins over everything: Redis memory is the scarce resource.
        let max_events_by_bytes =
            (config.window_max_bytes as f64 / bytes_per_event.max(1.0)) as u64;
        let byte_floor = (batch.last_seq + 1).saturating_sub(max_events_by_bytes);
        trim_below = trim_below.max(byte_floor);
        let mut backoff = Duration::from_millis(20);
        loop {
            if !ctl.lease_valid() {
                ctl.end("the lease may have expired before this append; appending nothing".into());
                shared.fenced_appends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let started = Instant::now();
            let result = runtime.block_on(link.append(
                keys,
                &config.node_id,
                ctl.epoch,
                batch.first_seq,
                batch.last_seq,
                batch.state,
                trim_below,
                &batch.payload,
            ));
            match result {
                Ok(done) => {
                    shared.append_latency.record(started.elapsed());
                    shared.appends.fetch_add(1, Ordering::Relaxed);
                    shared
                        .appended_events
                        .fetch_add(batch.events, Ordering::Relaxed);
                    shared
                        .appended_bytes
                        .fetch_add(batch.payload.len() as u64, Ordering::Relaxed);
                    if done.trimmed > 0 {
                        shared.trims.fetch_add(1, Ordering::Relaxed);
                        shared
                            .trimmed_entries
                            .fetch_add(done.trimmed, Ordering::Relaxed);
                    }
                    break;
                }
                Err(ClusterError::Unavailable(e)) => {
                    shared.append_retries.fetch_add(1, Ordering::Relaxed);
                    shared.note_error(&ClusterError::Unavailable(e.clone()));
                    tracing::warn!(error = %e, first_seq = batch.first_seq, "append failed: redis unavailable; ingest waits and the append is retried");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    shared.fenced_appends.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(reason = e.reason(), error = %e, first_seq = batch.first_seq, "append refused by redis; this node wrote nothing and steps down");
                    ctl.end(e.to_string());
                    return;
                }
            }
        }
    }
}
