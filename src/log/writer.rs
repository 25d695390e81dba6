//! Group commit: one thread turns queued appends into durable store batches.
//!
//! Owns: the bounded hand-off queue between the ingest thread and the store, the commit
//! cadence, and advancing the durable seq. Must never: let the queue grow past its byte
//! bound (a full queue blocks the appender, which stops ingest, which stops reading the
//! upstream socket: backpressure instead of memory growth), drop or reorder a batch, or
//! mark an event durable before the store said so.
//!
//! Cadence: a commit starts when `commit_max_events` are queued or `commit_interval` after
//! the first uncommitted event arrived, whichever is first; under a backlog (an append
//! waited for room in the queue) it starts with what is queued, a full queue's worth, so
//! the appends that refill the queue overlap its encoding. Trade-off: a longer interval
//! or a larger batch means fewer fsyncs and larger, better-compressed segments (higher
//! throughput, smaller disk) but a longer window of events that live readers saw and a
//! crash loses; those are re-fetched from the upstream after restart and re-stamped with
//! the same seqs (see the crate-level invariant in [`super`]), so the window costs
//! re-download time, never a gap. While a commit runs the next batch accumulates, so under
//! load batches grow by themselves and the fsync rate stays bounded.
//!
//! Pipeline: the writer thread encodes (compresses) a group while a committer thread
//! writes and syncs the previous one; they meet in a rendezvous channel, so besides the
//! byte-bounded queue at most two groups (`2 * commit_max_events` events) are in flight.
//! Those are the only events in the hot tail beyond its byte bound (it cannot evict what
//! is not durable).
//!
//! Pace: each group is handed to the store's encoder with whether the writer keeps up
//! ([`WriterPace`]): a group gathered over the interval with nothing waiting behind it is
//! `KeepingUp` (the store spends more CPU on smaller raw frames); a full group, one during
//! which an append waited for room, or one whose first event waited longer than an
//! interval to be taken is `Behind` (the store takes its fast level, so the backlog
//! drains). The raw level of every committed segment is counted in [`WriterStats`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::event::StampState;
use crate::logging::RateLimited;

use super::store::{EncodedSegment, EventStore, LogError, SharedEvent, WriterPace};
use super::tail::HotTail;

struct QueueState {
    /// Appends with their payload bytes and when they were queued.
    items: VecDeque<(Vec<SharedEvent>, usize, Instant)>,
    bytes: usize,
    closed: bool,
    /// An append waited for room since the writer last took a group: a backlog.
    push_waited: bool,
    /// Events queued (an empty append counts as one).
    events: usize,
    /// Queued events at which an append wakes the writer: 1 while it waits for a first
    /// event, what would fill its group while it gathers one, never while it is encoding.
    /// Waking it for every append, when all it can do is wait out the interval, cost a
    /// futex call and a context switch per upstream frame.
    wake_at: usize,
}

/// A queue bounded by bytes: `push` blocks while full.
pub struct Queue {
    state: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    max_bytes: usize,
}

impl Queue {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                push_waited: false,
                events: 0,
                wake_at: 1,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            max_bytes: max_bytes.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues, blocking while the queue holds `max_bytes` (an item larger than the bound
    /// waits for an empty queue).
    pub fn push(&self, events: Vec<SharedEvent>, bytes: usize) -> Result<(), LogError> {
        let mut st = self.lock();
        while !st.closed && !st.items.is_empty() && st.bytes + bytes > self.max_bytes {
            // Full: a writer gathering a group gets no more from waiting for its wake-up
            // count (the queue cannot reach it), so it is woken to take what is queued.
            // Without this it slept out the commit interval with the appender blocked.
            self.not_empty.notify_one();
            st.push_waited = true;
            st = self.not_full.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.closed {
            return Err(LogError::Closed);
        }
        st.bytes += bytes;
        st.events += events.len().max(1);
        st.items.push_back((events, bytes, Instant::now()));
        let wake = st.events >= st.wake_at;
        drop(st);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The next group to commit and whether the writer is keeping up (see the module
    /// header); `None` once closed and drained.
    fn take_group(
        &self,
        max_events: usize,
        interval: Duration,
    ) -> Option<(Vec<SharedEvent>, WriterPace)> {
        let mut st = self.lock();
        while st.items.is_empty() && !st.closed {
            st.wake_at = 1;
            st = self.not_empty.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let started = Instant::now();
        // Queued longer than an interval before the writer came for it: the writer was
        // still busy with earlier groups.
        let late = match st.items.front() {
            Some((_, _, queued_at)) => started.duration_since(*queued_at) > interval,
            None => return None,
        };
        let deadline = started + interval;
        let mut group: Vec<SharedEvent> = Vec::new();
        loop {
            while group.len() < max_events {
                let Some((events, bytes, _)) = st.items.pop_front() else {
                    break;
                };
                st.bytes -= bytes;
                st.events -= events.len().max(1);
                group.extend(events);
            }
            self.not_full.notify_all();
            let now = Instant::now();
            // A backlog (an append waited for room): what was queued is all the queue
            // holds, so it is taken now and encoded while the appends refill the queue.
            // Gathering a whole group first left the encoders idle while the appender
            // refilled the queue, several times per group (DECISIONS.md, "Session 13").
            let backlog = st.push_waited;
            if group.len() >= max_events || st.closed || now >= deadline || backlog {
                st.wake_at = usize::MAX;
                let behind = late || group.len() >= max_events || st.push_waited;
                st.push_waited = false;
                let pace = if behind {
                    WriterPace::Behind
                } else {
                    WriterPace::KeepingUp
                };
                return Some((group, pace));
            }
            st.wake_at = max_events - group.len();
            st = self
                .not_empty
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Counters of the writer, readable from anywhere.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub events_committed: AtomicU64,
    pub commit_failures: AtomicU64,
    /// Duration of the last commit, µs.
    pub last_commit_us: AtomicU64,
    /// Committed segments by the zstd level of their raw frames, ordered by level.
    raw_levels: Mutex<Vec<(i32, u64)>>,
}

impl WriterStats {
    /// Stats that list `levels` (the configured raw levels) from the start, at zero.
    pub fn with_raw_levels(levels: &[i32]) -> Self {
        let stats = Self::default();
        for &level in levels {
            stats.add_raw_segments(level, 0);
        }
        stats
    }

    fn add_raw_segments(&self, level: i32, n: u64) {
        let mut levels = self.raw_levels.lock().unwrap_or_else(|p| p.into_inner());
        match levels.binary_search_by_key(&level, |e| e.0) {
            Ok(i) => levels[i].1 += n,
            Err(i) => levels.insert(i, (level, n)),
        }
    }

    /// Committed segments per raw zstd level, ordered by level (every configured level
    /// listed, also at zero).
    pub fn raw_level_segments(&self) -> Vec<(i32, u64)> {
        self.raw_levels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct WriterConfig {
    pub commit_interval: Duration,
    pub commit_max_events: usize,
}

/// Runs until the queue is closed and drained, in two stages: this thread takes a group
/// and encodes it (compression, the CPU-heavy part, itself spread over the store's encode
/// threads) while a committer thread writes and syncs the previous group. The hand-off
/// is a rendezvous, so at most two groups are outside the queue (one encoding, one
/// committing), and groups commit strictly in order.
///
/// Retries a failing encode or commit with backoff, holding its batch (so the queue fills
/// and ingest stops); after the queue is closed it gives up after a few retries and
/// returns the error.
pub fn run(
    queue: Arc<Queue>,
    store: Arc<dyn EventStore>,
    tail: Arc<HotTail>,
    durable: watch::Sender<u64>,
    stats: Arc<WriterStats>,
    config: WriterConfig,
) -> Result<(), LogError> {
    let max_events = config.commit_max_events.max(1);
    let (tx, rx) = mpsc::sync_channel::<(Vec<SharedEvent>, Vec<EncodedSegment>)>(0);
    std::thread::scope(|s| {
        let committer = std::thread::Builder::new()
            .name("sluice-log-commit".into())
            .spawn_scoped(s, || {
                commit_loop(rx, &*store, &tail, &durable, &stats, &queue)
            })
            .map_err(|e| LogError::Backend(format!("cannot start the commit thread: {e}")))?;
        let mut encoded_result = Ok(());
        let mut failure_log = RateLimited::new(5, Duration::from_secs(30));
        while let Some((group, pace)) = queue.take_group(max_events, config.commit_interval) {
            if group.is_empty() {
                continue;
            }
            let encoded = match retry(
                "encode",
                group[0].seq,
                &stats,
                &queue,
                &mut failure_log,
                || store.encode(&group, pace),
            ) {
                Ok(encoded) => encoded,
                Err(e) => {
                    encoded_result = Err(e);
                    break;
                }
            };
            if tx.send((group, encoded)).is_err() {
                // The committer stopped on an error it returns below.
                break;
            }
        }
        drop(tx);
        let committed = committer
            .join()
            .map_err(|_| LogError::Backend("log commit thread panicked".into()))?;
        committed.and(encoded_result)
    })
}

/// Commits encoded groups in order, advancing the durable seq after each.
fn commit_loop(
    rx: mpsc::Receiver<(Vec<SharedEvent>, Vec<EncodedSegment>)>,
    store: &dyn EventStore,
    tail: &HotTail,
    durable: &watch::Sender<u64>,
    stats: &WriterStats,
    queue: &Queue,
) -> Result<(), LogError> {
    let mut failure_log = RateLimited::new(5, Duration::from_secs(30));
    for (group, encoded) in rx {
        let Some(last) = group.last() else { continue };
        let resume = StampState {
            next_seq: last.seq + 1,
            last_time_us: last.time_us,
            upstream_cursor: Some(last.upstream_seq),
        };
        // The last successful attempt's duration, not the retries'.
        let mut took = Duration::ZERO;
        retry(
            "commit",
            group[0].seq,
            stats,
            queue,
            &mut failure_log,
            || {
                let started = Instant::now();
                let result = store.append_encoded(&group, &encoded, resume);
                took = started.elapsed();
                result
            },
        )?;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        for segment in &encoded {
            stats.add_raw_segments(segment.raw_level, 1);
        }
        stats
            .events_committed
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        stats.last_commit_us.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        tail.set_durable(last.seq);
        durable.send_replace(last.seq);
        store.recycle(encoded);
    }
    Ok(())
}

/// Runs `attempt` (an encode or commit of the group starting at `first_seq`) until it
/// succeeds, holding the group meanwhile so the queue fills and ingest stops. Each failure
/// is counted and logged (rate-limited), then retried after a backoff doubling from 50 ms
/// to 5 s. Gives up after five failures once the queue is closed, and at once on
/// `OutOfOrder`, which retrying cannot heal (the store and the log disagree).
fn retry<T>(
    what: &str,
    first_seq: u64,
    stats: &WriterStats,
    queue: &Queue,
    failure_log: &mut RateLimited,
    mut attempt: impl FnMut() -> Result<T, LogError>,
) -> Result<T, LogError> {
    let mut backoff = Duration::from_millis(50);
    let mut failures_after_close = 0;
    loop {
        let e = match attempt() {
            Ok(value) => return Ok(value),
            Err(e @ LogError::OutOfOrder { .. }) => {
                tracing::error!(error = %e, "event store refused an out-of-order batch");
                return Err(e);
            }
            Err(e) => e,
        };
        stats.commit_failures.fetch_add(1, Ordering::Relaxed);
        if let (true, suppressed) = failure_log.check() {
            tracing::error!(error = %e, suppressed, first_seq, "event store {what} failed; retrying (ingest is held back)");
        }
        if queue.lock().closed {
            failures_after_close += 1;
            if failures_after_close >= 5 {
                return Err(e);
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    fn events(n: usize) -> Vec<SharedEvent> {
        (0..n)
            .map(|i| {
                SharedEvent::new(Event {
                    seq: i as u64 + 1,
                    time_us: 0,
                    upstream_seq: 0,
                    received_us: 0,
                    kind: EventKind::Identity,
                    did: "".into(),
                    collection: None,
                    op_index: 0,
                    v1_json: None,
                    v2_json: None,
                    raw_frame: bytes::Bytes::new(),
                })
            })
            .collect()
    }

    /// Runs `take_group` on another thread and hands back its result.
    fn take_in_background(
        queue: &Arc<Queue>,
        max_events: usize,
        interval: Duration,
    ) -> mpsc::Receiver<Option<(Vec<SharedEvent>, WriterPace)>> {
        let (tx, rx) = mpsc::channel();
        let queue = Arc::clone(queue);
        std::thread::spawn(move || {
            let _ = tx.send(queue.take_group(max_events, interval));
        });
        rx
    }

    /// How long a test waits for a group before failing: generous (the taking thread can be
    /// starved for long on a loaded machine: CI's two cores, other tests beside it), and
    /// shorter than the 60 s intervals the tests use to mean "never".
    const PATIENCE: Duration = Duration::from_secs(30);

    /// The size of the group taken; panics after [`PATIENCE`] (a missed wakeup: the writer
    /// would sleep until the interval, or forever).
    fn group_len(rx: &mpsc::Receiver<Option<(Vec<SharedEvent>, WriterPace)>>) -> Option<usize> {
        group_of(rx).map(|(len, _)| len)
    }

    /// The size and pace of the group taken; panics after [`PATIENCE`] as [`group_len`].
    fn group_of(
        rx: &mpsc::Receiver<Option<(Vec<SharedEvent>, WriterPace)>>,
    ) -> Option<(usize, WriterPace)> {
        rx.recv_timeout(PATIENCE)
            .expect("take_group did not return within PATIENCE")
            .map(|(g, pace)| (g.len(), pace))
    }

    /// The size and pace of the group a writer gathering over `interval` takes of `n`
    /// events appended while it waits, from a round the machine ran on time. A group not
    /// full returns an interval after the writer starts on it, so when the append and the
    /// group's return are at most two intervals apart, the append cannot have waited longer
    /// than an interval for the writer, and the pace must say it kept up. A round the
    /// machine delayed more (the writer thread not scheduled for an interval: CI's loaded
    /// cores) is rightly late and says nothing here: it is done again, for at most
    /// [`PATIENCE`].
    fn group_on_time(queue: &Arc<Queue>, n: usize, interval: Duration) -> (usize, WriterPace) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let rx = take_in_background(queue, 1000, interval);
            let appended = Instant::now();
            queue.push(events(n), 10).unwrap();
            let group = group_of(&rx).expect("a group, not a closed queue");
            if appended.elapsed() <= 2 * interval {
                return group;
            }
            assert!(
                Instant::now() < deadline,
                "no round ran within two intervals of its append for {PATIENCE:?}"
            );
        }
    }

    #[test]
    fn a_first_append_wakes_an_idle_writer() {
        let queue = Arc::new(Queue::new(1 << 20));
        let rx = take_in_background(&queue, 1000, Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(50));
        queue.push(events(2), 10).unwrap();
        assert_eq!(group_len(&rx), Some(2));
    }

    #[test]
    fn appends_that_fill_the_group_wake_the_writer_before_the_interval() {
        let queue = Arc::new(Queue::new(1 << 20));
        let started = Instant::now();
        let rx = take_in_background(&queue, 3, Duration::from_secs(60));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            queue.push(events(1), 10).unwrap();
        }
        assert_eq!(group_len(&rx), Some(3));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "woken before the 60 s interval"
        );
        // A group takes whole appends: one larger than the group is not split.
        queue.push(events(2), 10).unwrap();
        let rx = take_in_background(&queue, 1, Duration::from_secs(60));
        assert_eq!(group_len(&rx), Some(2), "a whole append is taken at once");
    }

    /// A queue that fills (by bytes) before the group's event count is reached wakes the
    /// gathering writer, which takes what is queued at once (a backlog: it does not wait
    /// for the group to fill) and lets the appender go on: appends never wait out the
    /// commit interval (here 60 s) behind a full queue.
    #[test]
    fn a_full_queue_hands_the_writer_what_is_queued() {
        let queue = Arc::new(Queue::new(100));
        let (tx, rx) = mpsc::channel();
        let taker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                while let Some((group, pace)) = queue.take_group(1000, Duration::from_secs(60)) {
                    let _ = tx.send((group.len(), pace));
                }
            })
        };
        let pusher = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                for _ in 0..10 {
                    queue.push(events(1), 60).unwrap();
                }
            })
        };
        let started = Instant::now();
        while !pusher.is_finished() {
            assert!(
                started.elapsed() < PATIENCE,
                "appends blocked behind a full queue"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        queue.close();
        taker.join().expect("taker");
        let groups: Vec<(usize, WriterPace)> = rx.try_iter().collect();
        assert_eq!(groups.iter().map(|g| g.0).sum::<usize>(), 10, "{groups:?}");
        // The queue holds one 60-byte append at a time, so no group holds more than it and
        // the one that waited for room: taken as the backlog built, not gathered to 1,000.
        assert!(groups.iter().all(|g| g.0 <= 2), "{groups:?}");
        // Every group but one taken at the close had an append waiting behind it.
        let behind = groups.iter().filter(|g| g.1 == WriterPace::Behind).count();
        assert!(behind + 1 >= groups.len(), "{groups:?}");
    }

    /// The pace the writer reports: a group gathered over the interval with nothing behind
    /// it keeps up; a full group, and a group whose first append waited longer than an
    /// interval for the writer, are behind. The next group after a backlog keeps up again.
    /// (Keeping up is asserted of rounds the machine ran on time: [`group_on_time`].)
    #[test]
    fn groups_taken_with_a_backlog_are_behind() {
        let queue = Arc::new(Queue::new(1 << 20));
        let interval = Duration::from_millis(30);
        assert_eq!(
            group_on_time(&queue, 3, interval),
            (3, WriterPace::KeepingUp)
        );

        // Full: the group's event count was reached before the interval.
        queue.push(events(5), 10).unwrap();
        let rx = take_in_background(&queue, 4, Duration::from_secs(60));
        assert_eq!(group_of(&rx), Some((5, WriterPace::Behind)));

        // Late: queued while the writer was busy elsewhere, for longer than an interval.
        queue.push(events(2), 10).unwrap();
        std::thread::sleep(2 * interval);
        let rx = take_in_background(&queue, 1000, interval);
        assert_eq!(group_of(&rx), Some((2, WriterPace::Behind)));

        assert_eq!(
            group_on_time(&queue, 1, interval),
            (1, WriterPace::KeepingUp)
        );
    }

    #[test]
    fn a_partial_group_is_taken_at_the_interval_and_close_ends_the_writer() {
        let queue = Arc::new(Queue::new(1 << 20));
        queue.push(events(4), 10).unwrap();
        let started = Instant::now();
        let rx = take_in_background(&queue, 1000, Duration::from_millis(100));
        assert_eq!(group_len(&rx), Some(4));
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(queue.queued_bytes(), 0);

        let rx = take_in_background(&queue, 1000, Duration::from_secs(60));
        queue.push(events(1), 10).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        queue.close();
        assert_eq!(
            group_len(&rx),
            Some(1),
            "close hands over what was gathered"
        );
        let rx = take_in_background(&queue, 1000, Duration::from_secs(60));
        assert_eq!(group_len(&rx), None);
    }
}
