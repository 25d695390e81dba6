//! The embedded store's read side: reading and decoding segments, the cache of decoded
//! segments shared by concurrent cold readers, and the read-ahead thread.
//!
//! Owns: which decoded segments are held, their byte bound, the hit/miss counters, the
//! buffers decodes reuse, and the read-ahead thread with its bounded request queue.
//! Must never: decode a segment once per reader while another reader is decoding it, hold
//! more decoded payload than `decoded_cache_bytes` beyond the entries being inserted, keep
//! more than [`KEPT_READ_BUFFERS`] buffers of at most [`KEPT_READ_BUFFER_BYTES`], or let
//! read-ahead make a reader wait for a decode it did not need (a request is a hint: one
//! that finds the queue full is dropped; one whose segment is already decoded or being
//! decoded is skipped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use super::super::codec;
use super::super::store::{LogError, Payloads};
use super::layout::{FramesAt, Stored};
use super::{backend, Files};
use crate::event::Event;

/// One decoded segment: the first reader decodes it, concurrent readers of the same
/// segment wait for that and share its events (one run: one allocation for the events,
/// their JSON slices of one buffer per wire), so a cold segment is decompressed and its v1 or v2 messages assembled once
/// however many subscribers replay it.
type DecodedCell = Arc<OnceLock<Result<Arc<Vec<Event>>, LogError>>>;

struct DecodedEntry {
    /// Which segment: its seqs and where its events value is (a merged segment starts at
    /// the seq of the first segment it replaced, so the seq alone does not say).
    key: (u64, u64, u64, u64),
    payloads: Payloads,
    /// Payload bytes held once decoded (0 while decoding).
    bytes: usize,
    cell: DecodedCell,
}

/// Recently decoded segments, newest last, bounded by `decoded_cache_bytes`.
#[derive(Default)]
struct DecodedCache {
    entries: VecDeque<DecodedEntry>,
    bytes: usize,
}

/// Counters of the decoded-segment cache.
#[derive(Debug, Default)]
pub struct DecodedStats {
    /// Segment reads served by a decode another read (or the read-ahead) made or was
    /// making.
    pub hits: AtomicU64,
    /// Segment reads that decoded.
    pub misses: AtomicU64,
    /// Segments the read-ahead thread decoded before a reader asked for them.
    pub read_ahead: AtomicU64,
}

/// Buffers one segment decode needs only while it runs: the values read from the files
/// and the plain columns. The events a decode returns own their bytes, so these go back
/// to a small pool and the next decode (of any size) reuses them instead of allocating and
/// faulting in a fresh megabyte per segment.
#[derive(Default)]
struct ReadBuffers {
    values: Vec<u8>,
    scratch: codec::DecodeScratch,
}

/// Buffers kept between decodes: about as many as decode at once (the cold reads the hub
/// admits at a time, and the read-ahead).
const KEPT_READ_BUFFERS: usize = 4;
/// A kept pair of buffers holds at most this (a 1 MiB segment of frames and its columns
/// fit several times over).
const KEPT_READ_BUFFER_BYTES: usize = 8 << 20;
/// Read-ahead requests waiting at most; more are dropped (they are hints).
const READ_AHEAD_QUEUE: usize = 16;

/// Who asks for a segment's decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asker {
    /// A read that needs the events now (waits for a decode in progress).
    Reader,
    /// The read-ahead thread: decodes only what nobody holds or is decoding.
    ReadAhead,
}

/// What reading a segment needs, shared by the store and its read-ahead thread.
pub(super) struct Reads {
    pub(super) data: Files,
    pub(super) raw: Files,
    cache: Mutex<DecodedCache>,
    pub(super) stats: DecodedStats,
    buffers: Mutex<Vec<ReadBuffers>>,
    /// Decoded payload bytes the cache keeps (0: none, every read decodes for itself).
    cache_limit: usize,
}

/// The sending half of the read-ahead thread's queue (the thread ends when it is dropped
/// with the store).
pub(super) struct ReadAhead {
    tx: SyncSender<(Stored, Payloads)>,
    /// Segments requested after each segment a reader decodes itself.
    pub(super) segments: usize,
}

impl ReadAhead {
    /// Starts the read-ahead thread over `reads`; `None` when `segments` is 0 or the cache
    /// is off (a decode ahead would have nowhere to wait for its reader).
    /// The thread runs in `class` (nice 0: the daemon's priority): it decodes for
    /// catch-up readers, which take what the live path leaves of the cores.
    pub(super) fn start(
        reads: &Arc<Reads>,
        segments: usize,
        class: crate::priority::Background,
    ) -> Result<Option<Self>, LogError> {
        if segments == 0 || reads.cache_limit == 0 {
            return Ok(None);
        }
        let (tx, rx) = sync_channel::<(Stored, Payloads)>(READ_AHEAD_QUEUE);
        let reads = Arc::clone(reads);
        std::thread::Builder::new()
            .name("sluice-log-read-ahead".into())
            .spawn(move || {
                crate::priority::lower_this_thread_or_log(class, "log read-ahead");
                for (s, payloads) in rx {
                    // A failed decode ahead is not remembered (a failed entry leaves the
                    // cache); the reader that needs the segment decodes it and reports.
                    let _ = reads.decoded(&s, payloads, Asker::ReadAhead);
                }
            })
            .map_err(|e| backend(format!("cannot start the log read-ahead thread: {e}")))?;
        Ok(Some(Self { tx, segments }))
    }

    /// Asks for `s` to be decoded ahead; dropped when the queue is full.
    pub(super) fn request(&self, s: Stored, payloads: Payloads) {
        // Full: the thread is behind and the reader decodes for itself. Disconnected:
        // the thread is gone (it only ends with the store).
        let _ = self.tx.try_send((s, payloads));
    }
}

impl Reads {
    pub(super) fn new(data: Files, raw: Files, cache_limit: usize) -> Self {
        Self {
            data,
            raw,
            cache: Mutex::new(DecodedCache::default()),
            stats: DecodedStats::default(),
            buffers: Mutex::new(Vec::new()),
            cache_limit,
        }
    }

    /// Reads a segment's events value, and its frames value too when `frames`, into
    /// `buf` (frames after events); `false` when a file holding them is gone (deleted by
    /// retention).
    pub(super) fn read_values(
        &self,
        s: &Stored,
        frames: bool,
        buf: &mut Vec<u8>,
    ) -> Result<bool, LogError> {
        use std::os::unix::fs::FileExt;
        let Some(file) = self.data.get(s.file) else {
            return Ok(false);
        };
        let unreadable = |what: &str, id: u64, e: std::io::Error| {
            LogError::Corrupt(format!(
                "segment {}..={} unreadable in {what} file {id}: {e}",
                s.info.first_seq, s.info.last_seq
            ))
        };
        let events_len = s.events_len as usize;
        let frames_len = if frames { s.frames_len as usize } else { 0 };
        // Every byte is read over: a reused buffer is only zeroed where it grows.
        buf.resize(events_len + frames_len, 0);
        match s.frames_at {
            FramesAt::Raw {
                file: raw_id,
                offset,
            } if frames => {
                let Some(raw) = self.raw.get(raw_id) else {
                    return Ok(false);
                };
                let (ev, fr) = buf.split_at_mut(events_len);
                file.read_exact_at(ev, s.offset)
                    .map_err(|e| unreadable("data", s.file, e))?;
                raw.read_exact_at(fr, offset)
                    .map_err(|e| unreadable("raw", raw_id, e))?;
            }
            // The frames, if wanted, follow the events in the data file.
            _ => file
                .read_exact_at(buf, s.offset)
                .map_err(|e| unreadable("data", s.file, e))?,
        }
        Ok(true)
    }

    /// The events of segment `s` with `payloads`, decoded once for every concurrent reader
    /// while the cache holds them; `None` when the segment's data file is gone (and for
    /// the read-ahead, when someone else holds or is decoding the segment). A reader that
    /// decodes the segment itself calls `claimed` first (to ask for read-ahead).
    pub(super) fn decoded(
        &self,
        s: &Stored,
        payloads: Payloads,
        asker: Asker,
    ) -> Result<Option<Arc<Vec<Event>>>, LogError> {
        self.decoded_then(s, payloads, asker, || {})
    }

    /// [`decoded`](Self::decoded), calling `claimed` when this call decodes the segment.
    pub(super) fn decoded_then(
        &self,
        s: &Stored,
        payloads: Payloads,
        asker: Asker,
        claimed: impl FnOnce(),
    ) -> Result<Option<Arc<Vec<Event>>>, LogError> {
        let limit = self.cache_limit;
        let decode = || -> Result<Option<Vec<Event>>, LogError> {
            let mut bufs = self.take_buffers();
            let result = self.decode_into(s, payloads, &mut bufs);
            self.give_back_buffers(bufs);
            result
        };
        if limit == 0 {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(decode()?.map(Arc::new));
        }
        let first_seq = s.info.first_seq;
        let key = (first_seq, s.info.last_seq, s.file, s.offset);
        let (cell, mine) = {
            let mut cache = self.cache.lock().map_err(|_| backend("poisoned"))?;
            match cache
                .entries
                .iter()
                .find(|e| e.key == key && e.payloads == payloads)
            {
                Some(_) if asker == Asker::ReadAhead => return Ok(None),
                Some(e) => (e.cell.clone(), false),
                None => {
                    let cell: DecodedCell = Arc::new(OnceLock::new());
                    cache.entries.push_back(DecodedEntry {
                        key,
                        payloads,
                        bytes: 0,
                        cell: cell.clone(),
                    });
                    (cell, true)
                }
            }
        };
        let counter = match (mine, asker) {
            (true, Asker::Reader) => &self.stats.misses,
            (true, Asker::ReadAhead) => &self.stats.read_ahead,
            (false, _) => &self.stats.hits,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if mine {
            claimed();
        }
        // Concurrent readers of this segment block here until the first has decoded it.
        let result = cell
            .get_or_init(|| match decode() {
                Ok(Some(events)) => Ok(Arc::new(events)),
                // Gone: told apart from real errors below (the seqs are not used).
                Ok(None) => Err(LogError::TooOld {
                    requested: first_seq,
                    oldest: first_seq,
                }),
                Err(e) => Err(e),
            })
            .clone();
        // Entries the bound pushes out, dropped after the lock is released: dropping a
        // segment nobody else holds frees each of its events, which must not hold up
        // the other readers and the read-ahead waiting for the cache.
        let mut evicted = Vec::new();
        if mine {
            let size = match &result {
                Ok(events) => {
                    let mut starts = codec::FrameStarts::default();
                    events
                        .iter()
                        .map(|e| codec::payload_bytes(e, starts.next(e)) + 160)
                        .sum()
                }
                Err(_) => 0,
            };
            let mut cache = self.cache.lock().map_err(|_| backend("poisoned"))?;
            if let Some(entry) = cache
                .entries
                .iter_mut()
                .find(|e| Arc::ptr_eq(&e.cell, &cell))
            {
                entry.bytes = size;
            }
            cache.bytes += size;
            if result.is_err() {
                cache.entries.retain(|e| !Arc::ptr_eq(&e.cell, &cell));
            }
            // Oldest first out, until the decoded payloads fit the bound.
            while cache.bytes > limit {
                let Some(old) = cache.entries.pop_front() else {
                    break;
                };
                cache.bytes = cache.bytes.saturating_sub(old.bytes);
                evicted.push(old);
            }
        }
        drop(evicted);
        match result {
            Ok(events) => Ok(Some(events)),
            Err(LogError::TooOld { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads and decodes segment `s` with `payloads`, using `bufs`; `None` when a file
    /// holding it is gone.
    fn decode_into(
        &self,
        s: &Stored,
        payloads: Payloads,
        bufs: &mut ReadBuffers,
    ) -> Result<Option<Vec<Event>>, LogError> {
        if !self.read_values(s, payloads.raw, &mut bufs.values)? {
            return Ok(None);
        }
        let (ev, fr) = bufs.values.split_at(s.events_len as usize);
        let events =
            codec::decode_with(ev, payloads.raw.then_some(fr), payloads, &mut bufs.scratch)?;
        Ok(Some(events))
    }

    fn take_buffers(&self) -> ReadBuffers {
        self.buffers
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_default()
    }

    /// Keeps `bufs` for the next decode, unless enough are kept or they grew past
    /// [`KEPT_READ_BUFFER_BYTES`] (a segment of unusually large frames).
    fn give_back_buffers(&self, bufs: ReadBuffers) {
        if bufs.values.capacity() + bufs.scratch.capacity() > KEPT_READ_BUFFER_BYTES {
            return;
        }
        if let Ok(mut pool) = self.buffers.lock() {
            if pool.len() < KEPT_READ_BUFFERS {
                pool.push(bufs);
            }
        }
    }
}
