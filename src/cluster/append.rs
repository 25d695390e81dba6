//! The leader's appender: one term's frames, batched, encoded and appended to the stream.
//!
//! Owns: batching what ingest queued, encoding each batch into an entry
//! (`entry::EntryEncoder`, one zstd context per term) on its own thread while earlier
//! batches are in flight, the fenced appends of the batches in order, up to
//! `append_in_flight` at once on one connection (`link::AppendCommands`: Redis checks each
//! when it reaches it), the byte bound of the window, and the term's own clock
//! ([`TermCtl`]). Must never: send an append after the term's clock says the lease may
//! have expired, count a batch as appended before Redis said so, retry a batch Redis
//! refused, or hold more than `append_in_flight` + 2 batches (one being encoded, one
//! encoded and waiting, the rest in flight).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::{
    AppendBatch, AppendCommands, AppendOutcome, Keys, Link, PendingReplies, ABORTS_BEFORE_GIVING_UP,
};
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
/// the term ends. Encoding runs on a second thread, one batch ahead of the appends in
/// flight, so the leader's CPU work and Redis's overlap; up to
/// `config.append_in_flight` appends are in flight at once, so Redis's work on one (its
/// fsync above all) overlaps the transfer of the next.
pub fn run(
    config: ClusterConfig,
    keys: Keys,
    shared: Arc<ClusterShared>,
    ctl: Arc<TermCtl>,
    rx: Receiver<Vec<Event>>,
) {
    let (tx, encoded) = tokio::sync::mpsc::channel::<Encoded>(1);
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
    shared.append_in_flight.store(0, Ordering::Relaxed);
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
    tx: tokio::sync::mpsc::Sender<Encoded>,
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
        if ctl.is_ended() || tx.blocking_send(encoded).is_err() {
            return;
        }
    }
}

/// One batch between its encoding and Redis's answer.
struct InFlight {
    batch: Encoded,
    commands: AppendCommands,
    /// The replies awaited; `None` until it is sent (again, after a lost connection).
    replies: Option<PendingReplies>,
    sent: Instant,
}

/// How the appender goes on after the oldest batch's answer.
enum Next {
    /// Done with it; the next one.
    Pop,
    /// Its transaction was aborted: send it and every later one again now (the later ones
    /// are refused by Redis, as they no longer continue the stream).
    Resend,
    /// Redis is unreachable: connect again and send every unanswered batch, after a wait.
    Reconnect,
    /// The term ends (the reason is recorded).
    End,
    /// Redis refused the entry inside the transaction, after its state was written: the
    /// term ends once the state is put back.
    StreamRefused {
        last_time_us: i64,
        upstream_cursor: Option<i64>,
    },
}

fn unavailable(shared: &ClusterShared, e: &ClusterError, first_seq: u64) {
    shared.append_retries.fetch_add(1, Ordering::Relaxed);
    shared.note_error(e);
    tracing::warn!(error = %e, first_seq, "append failed: redis unavailable; ingest waits and the append is retried");
}

fn refused(shared: &ClusterShared, ctl: &TermCtl, e: &ClusterError, first_seq: u64) {
    shared.fenced_appends.fetch_add(1, Ordering::Relaxed);
    tracing::error!(reason = e.reason(), error = %e, first_seq, "append refused by redis; this node wrote nothing and steps down");
    ctl.end(e.to_string());
}

/// What the oldest batch's replies mean for the appender.
fn answer(
    shared: &ClusterShared,
    ctl: &TermCtl,
    f: &InFlight,
    replies: Result<Vec<redis::Value>, ClusterError>,
    aborts: &mut usize,
) -> Next {
    let outcome = replies.and_then(|r| f.commands.outcome(&r));
    match outcome {
        Ok(AppendOutcome::Written { trimmed }) => {
            *aborts = 0;
            if trimmed > 0 {
                shared.trims.fetch_add(1, Ordering::Relaxed);
                shared.trimmed_entries.fetch_add(trimmed, Ordering::Relaxed);
            }
            appended(shared, f);
            Next::Pop
        }
        Ok(AppendOutcome::Already) => {
            *aborts = 0;
            appended(shared, f);
            Next::Pop
        }
        Ok(AppendOutcome::Aborted) => {
            shared.append_aborts.fetch_add(1, Ordering::Relaxed);
            *aborts += 1;
            if *aborts >= ABORTS_BEFORE_GIVING_UP {
                *aborts = 0;
                let e = ClusterError::Unavailable(format!(
                    "the append transaction was aborted {ABORTS_BEFORE_GIVING_UP} times in a row"
                ));
                unavailable(shared, &e, f.batch.first_seq);
                return Next::Reconnect;
            }
            Next::Resend
        }
        Ok(AppendOutcome::StreamRefused {
            detail,
            last_time_us,
            upstream_cursor,
        }) => {
            let e = ClusterError::Gap(format!(
                "the stream refused entry {}: {detail}",
                f.batch.last_seq
            ));
            refused(shared, ctl, &e, f.batch.first_seq);
            Next::StreamRefused {
                last_time_us,
                upstream_cursor,
            }
        }
        Err(e @ ClusterError::Unavailable(_)) => {
            unavailable(shared, &e, f.batch.first_seq);
            Next::Reconnect
        }
        Err(e) => {
            refused(shared, ctl, &e, f.batch.first_seq);
            Next::End
        }
    }
}

fn appended(shared: &ClusterShared, f: &InFlight) {
    shared.append_latency.record(f.sent.elapsed());
    shared.appends.fetch_add(1, Ordering::Relaxed);
    shared
        .appended_events
        .fetch_add(f.batch.events, Ordering::Relaxed);
    shared
        .appended_bytes
        .fetch_add(f.batch.payload.len() as u64, Ordering::Relaxed);
}

/// After Redis refused `refused`'s entry inside its transaction (the stream was changed
/// from outside), waits for the batches sent after it and puts the state back to before
/// it, unless one of them was written (then the stream has a hole there, which every
/// node's reader records as a discontinuity; logged).
async fn stream_refused_drain(
    link: &mut Link,
    keys: &Keys,
    refused: &InFlight,
    later: &mut std::collections::VecDeque<InFlight>,
    last_time_us: i64,
    upstream_cursor: Option<i64>,
) {
    let mut written_after = None;
    for f in later.iter_mut() {
        let Some(replies) = f.replies.take() else {
            continue;
        };
        if let Ok(AppendOutcome::Written { .. }) =
            replies.await.and_then(|r| f.commands.outcome(&r))
        {
            written_after = Some(f.batch.last_seq);
        }
    }
    match written_after {
        None => {
            link.restore_state(keys, refused.batch.first_seq, last_time_us, upstream_cursor)
                .await
        }
        Some(last) => tracing::error!(
            refused_from = refused.batch.first_seq,
            refused_through = refused.batch.last_seq,
            written_through = last,
            "the stream refused an entry (its last id was moved from outside) and a later \
             batch was written: the stream lacks these seqs; every node records the hole \
             as a discontinuity"
        ),
    }
}

/// Appends encoded batches in order, up to `config.append_in_flight` at once; on a lost
/// connection or an aborted transaction sends the unanswered ones again, in order, while
/// the lease is valid (Redis answers a batch that did land as already in).
fn send_loop(
    config: &ClusterConfig,
    keys: &Keys,
    shared: &ClusterShared,
    ctl: &TermCtl,
    mut encoded: tokio::sync::mpsc::Receiver<Encoded>,
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
    let limit = config.append_in_flight.max(1);
    runtime.block_on(async {
        // Bytes per event of recent entries, for the byte bound of the window.
        let mut bytes_per_event = 0f64;
        let mut queue: std::collections::VecDeque<InFlight> = Default::default();
        let mut input_open = true;
        let mut backoff = Duration::from_millis(20);
        let mut aborts = 0usize;
        loop {
            // Send what is not in flight yet, oldest first.
            let mut send_failed = None;
            for f in queue.iter_mut().filter(|f| f.replies.is_none()) {
                if ctl.is_ended() {
                    // Stepped down (the lease loop lost the lease): nothing more is sent.
                    return;
                }
                if !ctl.lease_valid() {
                    ctl.end(
                        "the lease may have expired before this append; appending nothing".into(),
                    );
                    shared.fenced_appends.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                f.sent = Instant::now();
                match link.send(f.commands.pipe.clone(), f.commands.replies).await {
                    Ok(r) => f.replies = Some(r),
                    Err(e) => {
                        send_failed = Some(e);
                        break;
                    }
                }
            }
            shared.append_in_flight.store(
                queue.iter().filter(|f| f.replies.is_some()).count() as u64,
                Ordering::Relaxed,
            );
            if let Some(e) = send_failed {
                match e {
                    ClusterError::Unavailable(_) => {
                        unavailable(shared, &e, queue.front().map_or(0, |f| f.batch.first_seq));
                        link.reset();
                        for f in queue.iter_mut() {
                            f.replies = None;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                        continue;
                    }
                    e => {
                        refused(
                            shared,
                            ctl,
                            &e,
                            queue.front().map_or(0, |f| f.batch.first_seq),
                        );
                        return;
                    }
                }
            }
            if queue.is_empty() && !input_open {
                return;
            }
            let room = input_open && queue.len() < limit;
            let oldest = async {
                match queue.front_mut().and_then(|f| f.replies.as_mut()) {
                    Some(replies) => replies.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                replies = oldest => {
                    let next = {
                        let Some(f) = queue.front() else { continue };
                        answer(shared, ctl, f, replies, &mut aborts)
                    };
                    match next {
                        Next::Pop => {
                            backoff = Duration::from_millis(20);
                            queue.pop_front();
                        }
                        Next::Resend => {
                            for f in queue.iter_mut() {
                                f.replies = None;
                            }
                        }
                        Next::Reconnect => {
                            link.reset();
                            for f in queue.iter_mut() {
                                f.replies = None;
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                        Next::End => return,
                        Next::StreamRefused {
                            last_time_us,
                            upstream_cursor,
                        } => {
                            if let Some(f) = queue.pop_front() {
                                stream_refused_drain(
                                    &mut link,
                                    keys,
                                    &f,
                                    &mut queue,
                                    last_time_us,
                                    upstream_cursor,
                                )
                                .await;
                            }
                            return;
                        }
                    }
                }
                batch = encoded.recv(), if room => {
                    let Some(batch) = batch else {
                        input_open = false;
                        continue;
                    };
                    let per_event = batch.payload.len() as f64 / batch.events.max(1) as f64;
                    bytes_per_event = if bytes_per_event == 0.0 {
                        per_event
                    } else {
                        bytes_per_event * 0.95 + per_event * 0.05
                    };
                    // The byte bound wins over everything: Redis memory is the scarce resource.
                    let max_events_by_bytes =
                        (config.window_max_bytes as f64 / bytes_per_event.max(1.0)) as u64;
                    let byte_floor = (batch.last_seq + 1).saturating_sub(max_events_by_bytes);
                    let trim_below = ctl.trim_below.load(Ordering::Relaxed).max(byte_floor);
                    let commands = AppendCommands::new(
                        keys,
                        &config.node_id,
                        ctl.epoch,
                        &AppendBatch {
                            first_seq: batch.first_seq,
                            last_seq: batch.last_seq,
                            state: batch.state,
                            trim_below,
                            payload: &batch.payload,
                        },
                    );
                    queue.push_back(InFlight {
                        batch,
                        commands,
                        replies: None,
                        sent: Instant::now(),
                    });
                }
            }
        }
    });
}
