//! The log: sluice's durable, replayable record of every stamped event.
//!
//! Owns: the hot in-memory tail, the group-commit writer, the durable [`EventStore`]
//! (embedded [`FjallStore`] by default), retention, and cursor resolution for the wires.
//! Must never: hand out a seq twice, show a reader a gap, a duplicate or a reordering,
//! or grow memory with the speed of ingest or the slowness of a reader.
//!
//! # Seq continuity without a lease (the crash invariant)
//!
//! The store writes each batch of events together with the resume state (next seq, last
//! `time_us`, upstream cursor = upstream seq of the last event in the batch) in one atomic
//! step. On start, [`Log::open`] returns that state: `next_seq` = last durable seq + 1 and
//! the upstream cursor of the last durable event. Live readers may see an event from the
//! hot tail before it is durable. If the process dies then, the upstream re-sends every
//! frame after the durable cursor, and ingest stamps them deterministically (seq = next
//! seq in frame order, `time_us` from the frame and the durable `last_time_us`), so the
//! events get the same seqs in the same order: no gap and no duplicate appear in sluice's
//! seq space. (What can differ after a crash is only what depends on the wall clock at
//! receipt: `received_us`, and `time_us` where it had to be clamped to it.)
//!
//! # Reading
//!
//! [`LogReader::read_from`] serves from the hot tail when the seq is still there and from
//! the store otherwise; events leave the tail only once durable, so every seq below the
//! tail is in the store (or deleted by retention: [`LogError::TooOld`]). A reader keeps its
//! own cursor (last seq + 1) and calls again; [`LogReader::wait_for_newer`] parks it until
//! the log moves past a seq.

pub mod codec;
pub mod depth;
pub mod fjall_store;
pub mod retention;
pub mod store;
pub mod tail;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::event::{Event, StampState};

pub use codec::Compression;
pub use fjall_store::{FjallConfig, FjallStore};
pub use retention::{RawRetention, RetentionConfig, RetentionStats};
pub use store::{
    Bounds, EventStore, LogError, MergeStep, Payloads, ReadLimits, RecoveryReport, Segment,
    SharedEvent, WriterPace,
};
pub use tail::{HotTail, TailBounds, TailRead};
pub use writer::WriterStats;

/// Everything the log is configured with.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The embedded store lives in `<data_dir>/events`.
    pub data_dir: PathBuf,
    /// Hot tail ceiling, bytes of payload (default 128 MiB): see [`TailBounds`] and
    /// docs/DECISIONS.md "Subscriber writes" (session 15) and "Memory at the defaults".
    pub tail_max_bytes: usize,
    /// Hot tail bytes kept at any rate (default 32 MiB; capped by `tail_max_bytes`).
    pub tail_min_bytes: usize,
    /// Above `tail_min_bytes`, the tail keeps this much of the stream by receipt time
    /// (default 5 s), up to `tail_max_bytes`.
    pub tail_min_age: Duration,
    /// Commit at least this often while events are pending (default 100 ms).
    pub commit_interval: Duration,
    /// ...or as soon as this many events are pending (default 20,000).
    pub commit_max_events: usize,
    /// Bytes of payload queued for the writer before `append` blocks (default 32 MiB).
    pub queue_max_bytes: usize,
    pub retention: RetentionConfig,
    /// Uncompressed bytes per stored segment (default 1 MiB; commits cut segments too).
    pub segment_target_bytes: usize,
    /// Blob file size of the embedded store: the granularity of space reclamation.
    pub blob_file_bytes: u64,
    /// Journal budget of the embedded store (at least 24 MiB).
    pub max_journal_bytes: u64,
    /// Memtable size of the embedded store's blob partitions.
    pub memtable_bytes: u32,
    /// Block cache of the store's index keyspace.
    pub index_cache_bytes: u64,
    /// Decoded segments shared by concurrent cold readers (default 16 MiB).
    pub decoded_cache_bytes: usize,
    /// Segments decoded ahead of a sequential cold reader on a thread of their own
    /// (default 1; 0 = off).
    pub read_ahead_segments: usize,
    /// Where the read-ahead thread runs: it decodes for catch-up readers, so it yields
    /// the cores to the live path as the catch-up pool does (default nice 19; nice 0 =
    /// as the daemon).
    pub read_ahead_class: crate::priority::Background,
    pub compression: Compression,
    /// Threads compressing one commit's segments in parallel (default: available
    /// parallelism, at most 4).
    pub encode_threads: usize,
    /// Merge runs of small segments (cut by commits at the live rate) into full-size
    /// ones, on the retention thread (default on).
    pub merge_small_segments: bool,
    /// Plain raw-frame bytes from which a merged segment's frames are kept as the writer
    /// compressed them (default 128 KiB; see `fjall_store::FjallConfig::merge_keep_raw_bytes`).
    pub merge_keep_raw_bytes: usize,
    /// Write the raw files with `O_DIRECT`, past the page cache (default on; see
    /// `fjall_store::FjallConfig::direct_raw_writes`).
    pub direct_raw_writes: bool,
}

impl LogConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let store = FjallConfig::new("");
        Self {
            data_dir: data_dir.into(),
            tail_max_bytes: 128 * 1024 * 1024,
            tail_min_bytes: 32 * 1024 * 1024,
            tail_min_age: Duration::from_secs(5),
            commit_interval: Duration::from_millis(100),
            commit_max_events: 20_000,
            queue_max_bytes: 32 * 1024 * 1024,
            retention: RetentionConfig::default(),
            segment_target_bytes: store.segment_target_bytes,
            blob_file_bytes: store.blob_file_bytes,
            max_journal_bytes: store.max_journal_bytes,
            memtable_bytes: store.memtable_bytes,
            index_cache_bytes: store.cache_bytes,
            decoded_cache_bytes: store.decoded_cache_bytes,
            read_ahead_segments: store.read_ahead_segments,
            read_ahead_class: store.read_ahead_class,
            compression: store.compression,
            encode_threads: store.encode_threads,
            merge_small_segments: store.merge_small_segments,
            merge_keep_raw_bytes: store.merge_keep_raw_bytes,
            direct_raw_writes: store.direct_raw_writes,
        }
    }

    /// The embedded store's settings derived from this config.
    pub fn store_config(&self) -> FjallConfig {
        let mut c = FjallConfig::new(self.data_dir.join("events"));
        c.segment_target_bytes = self.segment_target_bytes;
        c.blob_file_bytes = self.blob_file_bytes;
        c.max_journal_bytes = self.max_journal_bytes;
        c.memtable_bytes = self.memtable_bytes;
        c.cache_bytes = self.index_cache_bytes;
        c.decoded_cache_bytes = self.decoded_cache_bytes;
        c.read_ahead_segments = self.read_ahead_segments;
        c.read_ahead_class = self.read_ahead_class;
        c.compression = self.compression;
        c.encode_threads = self.encode_threads;
        c.merge_small_segments = self.merge_small_segments;
        c.merge_keep_raw_bytes = self.merge_keep_raw_bytes;
        c.direct_raw_writes = self.direct_raw_writes;
        c
    }
}

/// Where a wire's cursor lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// sluice seq, inclusive (Jetstream v2).
    Seq(u64),
    /// Source time in unix µs, inclusive (Jetstream v1).
    TimeUs(i64),
    /// Upstream relay seq, exclusive (raw `subscribeRepos`).
    UpstreamAfter(i64),
}

/// The answer to [`LogReader::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Start reading at this seq.
    From(u64),
    /// The cursor is older than retention; `oldest` is the oldest seq held (v1 starts
    /// there, v2 answers `CursorTooOld`, raw sends `OutdatedCursor` then starts there).
    TooOld { oldest: u64 },
    /// Nothing at or after the cursor yet: follow live from `next`. Subscribe with
    /// `Start::From(next)`, not `Start::Live`: the subscription is made only after the
    /// websocket upgrade, and an event logged meanwhile belongs to this client.
    Live { next: u64 },
    /// Raw only: the upstream cursor is beyond anything seen (`FutureCursor`).
    Future { newest_upstream_seq: i64 },
}

struct Shared {
    store: Arc<dyn EventStore>,
    tail: Arc<HotTail>,
    durable: watch::Receiver<u64>,
    /// The writer advances it; `restart_at` moves it with the seq space.
    durable_tx: watch::Sender<u64>,
    writer_stats: Arc<WriterStats>,
    retention_stats: Arc<RetentionStats>,
}

/// The running log. Share it (`Arc<Log>`) between the ingest thread (which appends) and
/// whoever hands out [`LogReader`]s.
pub struct Log {
    shared: Arc<Shared>,
    queue: Arc<writer::Queue>,
    /// Serializes appends so the seq check and the enqueue are one step.
    append_lock: Mutex<()>,
    threads: Mutex<Threads>,
}

struct Threads {
    writer: Option<JoinHandle<Result<(), LogError>>>,
    retention: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Log {
    /// Opens the embedded store under `config.data_dir`, recovering a torn tail, and
    /// starts the writer and retention threads. Returns where ingest resumes stamping.
    pub fn open(config: LogConfig) -> Result<(Log, StampState), LogError> {
        let (store, report) = FjallStore::open(config.store_config())?;
        if report.is_clean() {
            tracing::info!(dir = %config.data_dir.display(), "event store opened");
        } else {
            tracing::warn!(
                dropped_segments = report.dropped_segments,
                dropped_events = report.dropped_events,
                notes = ?report.notes,
                "event store recovered from a damaged tail; the upstream will re-send what was lost"
            );
        }
        Self::open_with_store(Arc::new(store), config)
    }

    /// Starts the log over any store (tests, other backends).
    pub fn open_with_store(
        store: Arc<dyn EventStore>,
        config: LogConfig,
    ) -> Result<(Log, StampState), LogError> {
        let resume = store.resume_state();
        let tail = Arc::new(HotTail::with_bounds(
            resume.next_seq,
            TailBounds {
                min_bytes: config.tail_min_bytes,
                min_age: config.tail_min_age,
                max_bytes: config.tail_max_bytes,
            },
        ));
        let (durable_tx, durable_rx) = watch::channel(resume.next_seq.saturating_sub(1));
        let queue = Arc::new(writer::Queue::new(config.queue_max_bytes));
        let writer_stats = Arc::new(WriterStats::with_raw_levels(&[
            config.compression.raw_level,
            config.compression.raw_fast_level,
        ]));
        let retention_stats = Arc::new(RetentionStats::default());
        let durable_keep = durable_tx.clone();
        let writer = {
            let (queue, store, tail, stats) = (
                queue.clone(),
                store.clone(),
                tail.clone(),
                writer_stats.clone(),
            );
            let wc = writer::WriterConfig {
                commit_interval: config.commit_interval,
                commit_max_events: config.commit_max_events,
            };
            std::thread::Builder::new()
                .name("sluice-log-writer".into())
                .spawn(move || writer::run(queue, store, tail, durable_tx, stats, wc))
                .map_err(|e| LogError::Backend(format!("cannot start writer thread: {e}")))?
        };
        let retention = {
            let (stop_tx, stop_rx) = mpsc::channel();
            let (store, stats, rc) = (
                store.clone(),
                retention_stats.clone(),
                config.retention.clone(),
            );
            let handle = std::thread::Builder::new()
                .name("sluice-log-retention".into())
                .spawn(move || retention::run(store, rc, stats, stop_rx))
                .map_err(|e| LogError::Backend(format!("cannot start retention thread: {e}")))?;
            (stop_tx, handle)
        };
        let log = Log {
            shared: Arc::new(Shared {
                store,
                tail,
                durable: durable_rx,
                durable_tx: durable_keep,
                writer_stats,
                retention_stats,
            }),
            queue,
            append_lock: Mutex::new(()),
            threads: Mutex::new(Threads {
                writer: Some(writer),
                retention: Some(retention),
            }),
        };
        Ok((log, resume))
    }

    /// Appends one frame's (or several frames') events, in seq order, continuing the log.
    /// Visible to readers at once; durable within one commit interval. Blocks while the
    /// writer queue is full (backpressure). `OutOfOrder` if the seqs do not continue the
    /// log; `Closed` after [`close`](Self::close).
    pub fn append(&self, events: Vec<Event>) -> Result<(), LogError> {
        if events.is_empty() {
            return Ok(());
        }
        let _guard = self.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        let first = self.shared.tail.next_seq();
        let mut bytes = 0;
        let mut frames = 0usize;
        let mut starts = codec::FrameStarts::default();
        for (expected, event) in (first..).zip(&events) {
            if event.seq != expected {
                return Err(LogError::OutOfOrder {
                    expected,
                    got: event.seq,
                });
            }
            let starts_frame = starts.next(event);
            frames += usize::from(starts_frame);
            bytes += codec::payload_bytes(event, starts_frame);
        }
        // One run per frame: the tail may keep a frame's last events after its first
        // ones left, and a run is freed with its last event, so a run is never longer
        // than a frame (whose events share their raw frame anyway).
        let mut shared = Vec::with_capacity(events.len());
        if frames <= 1 {
            // The usual batch (ingest appends frame by frame): the batch itself is the
            // run, with nothing moved or allocated again.
            shared.extend(SharedEvent::iter(&Arc::new(events), 0));
        } else {
            let mut starts = codec::FrameStarts::default();
            let mut frame: Vec<Event> = Vec::new();
            for event in events {
                if starts.next(&event) && !frame.is_empty() {
                    shared.extend(SharedEvent::iter(&Arc::new(std::mem::take(&mut frame)), 0));
                }
                frame.push(event);
            }
            shared.extend(SharedEvent::iter(&Arc::new(frame), 0));
        }
        self.shared.tail.push(&shared);
        self.queue.push(shared, bytes)
    }

    /// Cluster nodes only: drops every event held and continues the seq space at
    /// `next_seq`, durably, after a discontinuity (the node was away longer than the shared
    /// stream's window). Readers then see `next_seq` as the oldest event: a cursor inside
    /// the hole gets its wire's too-old answer. Waits for pending appends to be durable.
    pub fn restart_at(&self, next_seq: u64) -> Result<(), LogError> {
        let _guard = self.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.tail.next_seq();
        if next_seq < current {
            return Err(LogError::OutOfOrder {
                expected: current,
                got: next_seq,
            });
        }
        if next_seq == current {
            return Ok(());
        }
        if !self.flush(Duration::from_secs(30)) {
            return Err(LogError::Backend(
                "the log did not become durable before moving its seq space".into(),
            ));
        }
        self.shared.store.restart_at(next_seq)?;
        self.shared.tail.restart_at(next_seq);
        self.shared.durable_tx.send_replace(next_seq - 1);
        Ok(())
    }

    /// A cheap, cloneable read handle.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// Waits until everything appended so far is durable, up to `timeout`. True if so.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = self.shared.tail.next_seq().saturating_sub(1);
        let deadline = std::time::Instant::now() + timeout;
        while *self.shared.durable.borrow() < target {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops accepting appends, commits what is queued, stops retention. Idempotent.
    pub fn close(&self) -> Result<(), LogError> {
        self.queue.close();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((stop, handle)) = threads.retention.take() {
            let _ = stop.send(());
            let _ = handle.join();
        }
        match threads.writer.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| LogError::Backend("log writer thread panicked".into()))?,
            None => Ok(()),
        }
    }

    pub fn writer_stats(&self) -> &WriterStats {
        &self.shared.writer_stats
    }

    pub fn retention_stats(&self) -> &RetentionStats {
        &self.shared.retention_stats
    }

    /// Bytes queued for the writer (bounded by `queue_max_bytes`).
    pub fn queued_bytes(&self) -> usize {
        self.queue.queued_bytes()
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "event log did not close cleanly");
        }
    }
}

/// Reads the log: hot tail first, store below it. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogReader {
    /// Up to `max_events` events from `seq` on with every payload, stopping before
    /// `max_bytes` of payload (at least one event is returned when one exists). Empty when
    /// `seq` is beyond the newest. `TooOld` when retention deleted `seq`.
    pub fn read_from(
        &self,
        seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, LogError> {
        self.read_from_with(
            seq,
            ReadLimits {
                max_events,
                max_bytes,
            },
            Payloads::ALL,
        )
    }

    /// Like [`read_from`](Self::read_from); events read from the store carry only the
    /// requested payloads (tail events always carry all of them).
    pub fn read_from_with(
        &self,
        seq: u64,
        limits: ReadLimits,
        payloads: Payloads,
    ) -> Result<Vec<SharedEvent>, LogError> {
        // Retention decides what exists: an event it deleted from the store may still sit
        // in the hot tail, but serving it would contradict `resolve` and the wires' floors.
        if let Some(bounds) = self.shared.store.bounds() {
            if seq < bounds.oldest_seq {
                return Err(LogError::TooOld {
                    requested: seq,
                    oldest: bounds.oldest_seq,
                });
            }
        }
        // The raw wire alone is bound by the raw floor (raw frames have their own
        // retention), for the same reason: the store's floor, not the tail's contents.
        if payloads.raw_only() {
            if let Some(oldest) = self.raw_floor().filter(|&f| seq < f) {
                return Err(LogError::TooOld {
                    requested: seq,
                    oldest,
                });
            }
        }
        match self
            .shared
            .tail
            .read_from(seq, limits.max_events, limits.max_bytes)
        {
            TailRead::Events(events) => Ok(events),
            TailRead::Before(tail_oldest) => {
                let events = self.shared.store.read(seq, limits, payloads)?;
                if events.is_empty() {
                    return Err(LogError::Backend(format!(
                        "seq {seq} is below the hot tail ({tail_oldest}) but not in the store"
                    )));
                }
                Ok(events)
            }
        }
    }

    /// The oldest seq whose raw frame is held, when raw retention has dropped frames the
    /// store still holds the JSON of (the raw wire's floor); `None` when every event held
    /// has its frame. Past the store's newest event when no stored frame is left: the
    /// raw wire then starts at the events not yet durable.
    pub fn raw_floor(&self) -> Option<u64> {
        let store = self.shared.store.bounds()?;
        match self.shared.store.raw_bounds() {
            Some(raw) if raw.oldest_seq > store.oldest_seq => Some(raw.oldest_seq),
            Some(_) => None,
            None => Some(store.newest_seq + 1),
        }
    }

    /// Newest appended seq (0 when none yet); may not be durable yet.
    pub fn newest_seq(&self) -> u64 {
        self.shared.tail.next_seq().saturating_sub(1)
    }

    /// Newest durable seq.
    pub fn durable_seq(&self) -> u64 {
        *self.shared.durable.borrow()
    }

    /// A receiver of the newest appended seq, for readers that follow live.
    pub fn watch_newest(&self) -> watch::Receiver<u64> {
        self.shared.tail.subscribe()
    }

    /// A receiver of the newest durable seq.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.shared.durable.clone()
    }

    /// Waits until the newest seq is greater than `seq`, and returns it.
    pub async fn wait_for_newer(&self, seq: u64) -> Result<u64, LogError> {
        let mut rx = self.shared.tail.subscribe();
        let newest = rx
            .wait_for(|&n| n > seq)
            .await
            .map_err(|_| LogError::Closed)?;
        Ok(*newest)
    }

    /// Oldest and newest events held (store and tail together).
    pub fn bounds(&self) -> Option<Bounds> {
        let store = self.shared.store.bounds();
        let tail = self
            .shared
            .tail
            .read_from(self.shared.tail.oldest_seq(), 1, 0);
        let tail_oldest = match tail {
            TailRead::Events(v) => v.into_iter().next(),
            TailRead::Before(_) => None,
        };
        let newest_seq = self.newest_seq();
        let tail_newest = match self.shared.tail.read_from(newest_seq, 1, 0) {
            TailRead::Events(v) => v.into_iter().next(),
            TailRead::Before(_) => None,
        };
        match (store, tail_oldest, tail_newest) {
            (Some(mut b), _, Some(n)) => {
                if n.seq > b.newest_seq {
                    b.newest_seq = n.seq;
                    b.newest_time_us = n.time_us;
                    b.newest_upstream_seq = n.upstream_seq;
                }
                Some(b)
            }
            (Some(b), _, None) => Some(b),
            (None, Some(o), Some(n)) => Some(Bounds {
                oldest_seq: o.seq,
                oldest_time_us: o.time_us,
                oldest_upstream_seq: o.upstream_seq,
                newest_seq: n.seq,
                newest_time_us: n.time_us,
                newest_upstream_seq: n.upstream_seq,
            }),
            _ => None,
        }
    }

    /// Where a wire cursor starts. See [`Cursor`] for each wire's semantics.
    pub fn resolve(&self, cursor: Cursor) -> Result<Resolved, LogError> {
        let next = self.newest_seq() + 1;
        let Some(b) = self.bounds() else {
            return Ok(match cursor {
                Cursor::UpstreamAfter(_) => Resolved::Live { next },
                Cursor::Seq(s) if s < next => Resolved::TooOld { oldest: next },
                _ => Resolved::Live { next },
            });
        };
        Ok(match cursor {
            Cursor::Seq(s) if s < b.oldest_seq => Resolved::TooOld {
                oldest: b.oldest_seq,
            },
            Cursor::Seq(s) if s > b.newest_seq => Resolved::Live { next },
            Cursor::Seq(s) => Resolved::From(s),
            Cursor::TimeUs(t) if t < b.oldest_time_us => Resolved::TooOld {
                oldest: b.oldest_seq,
            },
            Cursor::TimeUs(t) if t > b.newest_time_us => Resolved::Live { next },
            Cursor::TimeUs(t) => {
                let found = match self.shared.tail.seq_at_or_after_time(t) {
                    Some(found) => found,
                    // The tail starts after `t`: the answer is in the store, or, when the
                    // store has nothing that late (e.g. before the first commit), it is the
                    // tail's first event.
                    None => self
                        .shared
                        .store
                        .seq_at_or_after_time(t)?
                        .or(self.tail_front()),
                };
                found.map_or(Resolved::Live { next }, Resolved::From)
            }
            Cursor::UpstreamAfter(u) if u > b.newest_upstream_seq => Resolved::Future {
                newest_upstream_seq: b.newest_upstream_seq,
            },
            Cursor::UpstreamAfter(u) if u.saturating_add(1) < b.oldest_upstream_seq => {
                Resolved::TooOld {
                    oldest: self.raw_floor().unwrap_or(b.oldest_seq),
                }
            }
            // Below the raw floor the frames are gone though the JSON stays: the raw
            // wire's cursor contract follows the raw floor.
            Cursor::UpstreamAfter(u)
                if self
                    .raw_floor_upstream()
                    .is_some_and(|(_, f)| u.saturating_add(1) < f) =>
            {
                Resolved::TooOld {
                    oldest: self.raw_floor().unwrap_or(b.oldest_seq),
                }
            }
            Cursor::UpstreamAfter(u) => {
                let found = match self.shared.tail.seq_after_upstream(u) {
                    Some(found) => found,
                    // As for time: the store, else the tail's first event.
                    None => self
                        .shared
                        .store
                        .seq_after_upstream(u)?
                        .or(self.tail_front()),
                };
                found.map_or(Resolved::Live { next }, Resolved::From)
            }
        })
    }

    /// The raw floor and the upstream seq of the event there (`raw_floor`), when there
    /// is one and its event is held (in the store or the hot tail).
    fn raw_floor_upstream(&self) -> Option<(u64, i64)> {
        let floor = self.raw_floor()?;
        if let Some(raw) = self.shared.store.raw_bounds() {
            if raw.oldest_seq == floor {
                return Some((floor, raw.oldest_upstream_seq));
            }
        }
        match self.shared.tail.read_from(floor, 1, 0) {
            TailRead::Events(v) => v
                .into_iter()
                .next()
                .filter(|e| e.seq == floor)
                .map(|e| (floor, e.upstream_seq)),
            // Nothing after the store yet: every upstream seq held is below the floor.
            TailRead::Before(_) => None,
        }
        .or_else(|| {
            let b = self.shared.store.bounds()?;
            (floor > b.newest_seq).then_some((floor, b.newest_upstream_seq.saturating_add(1)))
        })
    }

    /// The oldest seq in the hot tail, if it holds any event.
    fn tail_front(&self) -> Option<u64> {
        self.shared.tail.oldest().map(|(seq, _)| seq)
    }

    /// The durable store, for metrics (size, disk bytes, segments).
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.shared.store
    }

    /// The hot tail, for metrics (bytes, length).
    pub fn tail(&self) -> &HotTail {
        &self.shared.tail
    }

    pub fn writer_commits(&self) -> u64 {
        self.shared.writer_stats.commits.load(Ordering::Relaxed)
    }
}
