//! The hot tail: the most recent events in memory, shared by reference.
//!
//! Owns: a contiguous run of the newest events (by seq), bounded by payload bytes, and the
//! notification of new events. Must never: hold a gap (events enter in seq order and leave
//! from the front only), evict an event that is not yet durable (a reader that finds an
//! event missing from the tail must find it in the store), or copy payload bytes (events
//! are shared handles whose payloads are refcounted `Bytes`).
//!
//! Bound: `max_bytes` of payloads (a raw frame counts once, with its first event). The
//! tail can exceed it only by events not yet durable, which the writer queue bounds, and
//! by the earlier events of a frame whose later events it still holds (a frame's events
//! share one allocation, freed with the last of them).

use std::collections::VecDeque;
use std::sync::RwLock;

use tokio::sync::watch;

use super::codec::{payload_bytes, FrameStarts};
use super::store::SharedEvent;

struct Inner {
    events: VecDeque<(SharedEvent, usize)>,
    /// Seq the next appended event must have.
    next_seq: u64,
    bytes: usize,
    durable_seq: u64,
}

/// What a tail read found.
#[derive(Debug)]
pub enum TailRead {
    /// Events from the requested seq on (empty when it is beyond the newest).
    Events(Vec<SharedEvent>),
    /// The requested seq is older than the tail, whose oldest is given: read the store.
    Before(u64),
}

pub struct HotTail {
    inner: RwLock<Inner>,
    max_bytes: usize,
    newest: watch::Sender<u64>,
}

impl HotTail {
    /// An empty tail whose first event will be `next_seq`.
    pub fn new(next_seq: u64, max_bytes: usize) -> Self {
        let (newest, _) = watch::channel(next_seq.saturating_sub(1));
        Self {
            inner: RwLock::new(Inner {
                events: VecDeque::new(),
                next_seq,
                bytes: 0,
                durable_seq: next_seq.saturating_sub(1),
            }),
            max_bytes,
            newest,
        }
    }

    fn read_inner(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_inner(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The seq the next appended event must carry.
    pub fn next_seq(&self) -> u64 {
        self.read_inner().next_seq
    }

    /// Appends events that continue the tail (checked by the caller) and wakes waiters.
    pub fn push(&self, events: &[SharedEvent]) {
        let Some(last) = events.last() else { return };
        {
            let mut inner = self.write_inner();
            let mut starts = FrameStarts::default();
            for e in events {
                let size = payload_bytes(e, starts.next(e)) + 64;
                inner.bytes += size;
                inner.events.push_back((e.clone(), size));
            }
            inner.next_seq = last.seq + 1;
            self.evict(&mut inner);
        }
        self.newest.send_replace(last.seq);
    }

    /// Drops every event and makes `next_seq` the next one (see `Log::restart_at`).
    pub fn restart_at(&self, next_seq: u64) {
        {
            let mut inner = self.write_inner();
            inner.events.clear();
            inner.bytes = 0;
            inner.next_seq = next_seq;
            inner.durable_seq = next_seq.saturating_sub(1);
        }
        self.newest.send_replace(next_seq.saturating_sub(1));
    }

    /// Marks everything up to `seq` durable, making it evictable.
    pub fn set_durable(&self, seq: u64) {
        let mut inner = self.write_inner();
        inner.durable_seq = inner.durable_seq.max(seq);
        self.evict(&mut inner);
    }

    fn evict(&self, inner: &mut Inner) {
        while inner.bytes > self.max_bytes {
            match inner.events.front() {
                Some((e, size)) if e.seq <= inner.durable_seq => {
                    inner.bytes -= size;
                    inner.events.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Up to `max_events` events from `seq` on, stopping before `max_bytes` of payloads
    /// (at least one event is returned when there is one).
    pub fn read_from(&self, seq: u64, max_events: usize, max_bytes: usize) -> TailRead {
        let inner = self.read_inner();
        let oldest = inner.events.front().map_or(inner.next_seq, |(e, _)| e.seq);
        if seq < oldest {
            return TailRead::Before(oldest);
        }
        let start = (seq - oldest) as usize;
        let mut out = Vec::with_capacity(max_events.min(inner.events.len().saturating_sub(start)));
        let mut bytes = 0usize;
        for (e, size) in inner.events.range(start.min(inner.events.len())..) {
            if out.len() >= max_events || (!out.is_empty() && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            out.push(e.clone());
        }
        TailRead::Events(out)
    }

    /// The oldest seq in the tail, or the next seq when it is empty.
    pub fn oldest_seq(&self) -> u64 {
        let inner = self.read_inner();
        inner.events.front().map_or(inner.next_seq, |(e, _)| e.seq)
    }

    /// The first seq at or after `time_us` if the tail can answer: `Some(Some(seq))`
    /// found, `Some(None)` every tail event is older, `None` the answer is older than the
    /// tail (ask the store).
    pub fn seq_at_or_after_time(&self, time_us: i64) -> Option<Option<u64>> {
        let inner = self.read_inner();
        let front = inner.events.front()?;
        if front.0.time_us > time_us {
            return None;
        }
        let idx = inner.events.partition_point(|(e, _)| e.time_us < time_us);
        Some(inner.events.get(idx).map(|(e, _)| e.seq))
    }

    /// Same as [`seq_at_or_after_time`](Self::seq_at_or_after_time), for the first
    /// upstream seq strictly greater than `upstream_seq`.
    pub fn seq_after_upstream(&self, upstream_seq: i64) -> Option<Option<u64>> {
        let inner = self.read_inner();
        let front = inner.events.front()?;
        if front.0.upstream_seq > upstream_seq {
            return None;
        }
        let idx = inner
            .events
            .partition_point(|(e, _)| e.upstream_seq <= upstream_seq);
        Some(inner.events.get(idx).map(|(e, _)| e.seq))
    }

    /// Oldest (seq, time) in the tail.
    pub fn oldest(&self) -> Option<(u64, i64)> {
        let inner = self.read_inner();
        inner.events.front().map(|(e, _)| (e.seq, e.time_us))
    }

    /// Newest (seq, time) in the tail.
    pub fn newest(&self) -> Option<(u64, i64)> {
        let inner = self.read_inner();
        inner.events.back().map(|(e, _)| (e.seq, e.time_us))
    }

    /// Payload bytes held (plus a small per-event overhead).
    pub fn bytes(&self) -> usize {
        self.read_inner().bytes
    }

    pub fn len(&self) -> usize {
        self.read_inner().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver of the newest appended seq (0 before any).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }
}
