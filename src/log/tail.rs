//! The hot tail: the most recent events in memory, shared by reference.
//!
//! Owns: a contiguous run of the newest events (by seq), bounded by payload bytes, and the
//! notification of new events. Must never: hold a gap (events enter in seq order and leave
//! from the front only), evict an event that is not yet durable (a reader that finds an
//! event missing from the tail must find it in the store), or copy payload bytes (events
//! are shared handles whose payloads are refcounted `Bytes`).
//!
//! Bound: sized by time under a byte ceiling ([`TailBounds`]). It keeps `min_bytes` of
//! payloads at any rate, more while its oldest event was received less than `min_age`
//! before its newest, and never more than `max_bytes` (a raw frame counts once, with its
//! first event). Ages are differences of the events' own receipt stamps, never the clock
//! now. The tail can exceed `max_bytes` only by events not yet durable, which the writer
//! queue bounds, and by the earlier events of a frame whose later events it still holds
//! (a frame's events share one allocation, freed with the last of them).

use std::collections::VecDeque;
use std::sync::RwLock;
use std::time::Duration;

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

/// How much the tail holds (docs/DECISIONS.md, "Subscriber writes", session 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailBounds {
    /// Payload bytes kept whatever their age (capped by `max_bytes`).
    pub min_bytes: usize,
    /// Above `min_bytes`, events are kept while the oldest was received less than this
    /// before the newest: at high rates the tail holds this many seconds of the stream.
    pub min_age: Duration,
    /// The ceiling: the tail never holds more durable payload bytes than this.
    pub max_bytes: usize,
}

impl TailBounds {
    /// A tail of `bytes` at any rate (no time rule).
    pub fn fixed(bytes: usize) -> Self {
        Self {
            min_bytes: bytes,
            min_age: Duration::ZERO,
            max_bytes: bytes,
        }
    }
}

pub struct HotTail {
    inner: RwLock<Inner>,
    /// `bounds.min_bytes`, capped by `max_bytes`.
    floor_bytes: usize,
    max_bytes: usize,
    min_age_us: i64,
    newest: watch::Sender<u64>,
}

impl HotTail {
    /// An empty tail of at most `max_bytes` whose first event will be `next_seq`.
    pub fn new(next_seq: u64, max_bytes: usize) -> Self {
        Self::with_bounds(next_seq, TailBounds::fixed(max_bytes))
    }

    /// An empty tail sized by `bounds` whose first event will be `next_seq`.
    pub fn with_bounds(next_seq: u64, bounds: TailBounds) -> Self {
        let (newest, _) = watch::channel(next_seq.saturating_sub(1));
        Self {
            inner: RwLock::new(Inner {
                events: VecDeque::new(),
                next_seq,
                bytes: 0,
                durable_seq: next_seq.saturating_sub(1),
            }),
            floor_bytes: bounds.min_bytes.min(bounds.max_bytes),
            max_bytes: bounds.max_bytes,
            min_age_us: i64::try_from(bounds.min_age.as_micros()).unwrap_or(i64::MAX),
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

    /// Drops durable events from the front while the tail is above its ceiling, or above
    /// its floor and still spanning `min_age` of receipt time without its front event.
    fn evict(&self, inner: &mut Inner) {
        let newest_us = inner.events.back().map_or(0, |(e, _)| e.received_us);
        while inner.bytes > self.floor_bytes {
            match inner.events.front() {
                Some((e, size)) if e.seq <= inner.durable_seq => {
                    let size = *size;
                    if inner.bytes <= self.max_bytes {
                        // Under the ceiling: keep the front unless the rest spans min_age.
                        let next_us = inner
                            .events
                            .get(1)
                            .map_or(newest_us, |(n, _)| n.received_us);
                        if newest_us.saturating_sub(next_us) < self.min_age_us {
                            break;
                        }
                    }
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

    /// Receipt time the tail spans, oldest to newest event, µs (0 when it holds fewer
    /// than two).
    pub fn span_us(&self) -> i64 {
        let inner = self.read_inner();
        match (inner.events.front(), inner.events.back()) {
            (Some((a, _)), Some((b, _))) => b.received_us.saturating_sub(a.received_us).max(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver of the newest appended seq (0 before any).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::event::{Event, EventKind};

    /// One event per frame, `payload` bytes of frame, received at `received_us`.
    fn event(seq: u64, received_us: i64, payload: usize) -> SharedEvent {
        SharedEvent::new(Event {
            seq,
            time_us: received_us,
            upstream_seq: seq as i64,
            received_us,
            kind: EventKind::Commit,
            did: Arc::from("did:plc:tail"),
            collection: Some(Arc::from("app.bsky.feed.like")),
            op_index: 0,
            v1_json: None,
            v2_json: None,
            raw_frame: Bytes::from(vec![0u8; payload]),
        })
    }

    /// Bytes the tail counts for one event of `payload` bytes.
    const OVERHEAD: usize = 64;

    /// Pushes `n` durable events from `seq`, `gap_us` of receipt time apart.
    fn push_durable(tail: &HotTail, seq: u64, n: u64, t0: i64, gap_us: i64, payload: usize) {
        for i in 0..n {
            tail.push(&[event(seq + i, t0 + i as i64 * gap_us, payload)]);
            tail.set_durable(seq + i);
        }
    }

    fn bounds(min_events: usize, secs: u64, max_events: usize) -> TailBounds {
        TailBounds {
            min_bytes: min_events * (1000 + OVERHEAD),
            min_age: Duration::from_secs(secs),
            max_bytes: max_events * (1000 + OVERHEAD),
        }
    }

    #[test]
    fn at_a_low_rate_the_floor_in_bytes_decides() {
        // 1 event a second, floor 10 events, 5 s minimum age, ceiling 100 events: the
        // floor holds more than 5 s, so the tail holds exactly the floor.
        let tail = HotTail::with_bounds(1, bounds(10, 5, 100));
        push_durable(&tail, 1, 50, 0, 1_000_000, 1000);
        assert_eq!(tail.len(), 10);
        assert_eq!(tail.oldest_seq(), 41);
        assert_eq!(tail.bytes(), 10 * (1000 + OVERHEAD));
    }

    #[test]
    fn at_a_high_rate_it_keeps_the_minimum_age_under_the_ceiling() {
        // 100 events a second (10 ms apart), floor 10 events, 2 s minimum age, ceiling
        // 1,000 events: it keeps every event received within 2 s of the newest.
        let tail = HotTail::with_bounds(1, bounds(10, 2, 1000));
        push_durable(&tail, 1, 500, 0, 10_000, 1000);
        // Newest received at 4.99 s: 2.99 s and later are younger than 2 s (201 events).
        assert_eq!(tail.oldest_seq(), 300);
        assert_eq!(tail.len(), 201);
        assert!(tail.span_us() >= 2_000_000, "span {}", tail.span_us());
        let oldest_kept = match tail.read_from(300, 1, usize::MAX) {
            TailRead::Events(e) => e[0].received_us,
            TailRead::Before(s) => panic!("seq 300 is before the tail ({s})"),
        };
        assert_eq!(oldest_kept, 2_990_000);
        assert!(matches!(
            tail.read_from(299, 1, usize::MAX),
            TailRead::Before(300)
        ));
    }

    #[test]
    fn at_the_ceiling_it_evicts_younger_events() {
        // 1,000 events a second, 10 s minimum age, ceiling 50 events: the ceiling wins.
        let tail = HotTail::with_bounds(1, bounds(10, 10, 50));
        push_durable(&tail, 1, 400, 0, 1_000, 1000);
        assert_eq!(tail.len(), 50);
        assert_eq!(tail.oldest_seq(), 351);
        assert!(tail.bytes() <= 50 * (1000 + OVERHEAD));
        assert!(tail.span_us() < 10_000_000);
    }

    #[test]
    fn when_the_rate_falls_it_shrinks_back_to_the_floor() {
        let tail = HotTail::with_bounds(1, bounds(10, 2, 1000));
        // A burst: 300 events 1 ms apart (all within 2 s: all kept).
        push_durable(&tail, 1, 300, 0, 1_000, 1000);
        assert_eq!(tail.len(), 300);
        // Then one event 10 s later: everything else is older than 2 s, the floor stays.
        push_durable(&tail, 301, 1, 10_000_000, 0, 1000);
        assert_eq!(tail.len(), 10);
        assert_eq!(tail.oldest_seq(), 292);
    }

    #[test]
    fn events_not_yet_durable_are_never_evicted() {
        let tail = HotTail::with_bounds(1, bounds(1, 0, 5));
        for seq in 1..=20 {
            tail.push(&[event(seq, seq as i64 * 1_000_000, 1000)]);
        }
        assert_eq!(tail.len(), 20, "nothing durable: all kept over the ceiling");
        tail.set_durable(12);
        assert_eq!(tail.oldest_seq(), 13, "only durable events leave");
        tail.set_durable(20);
        assert_eq!(tail.len(), 1, "the floor, with no minimum age");
    }

    #[test]
    fn a_floor_above_the_ceiling_is_capped_by_it() {
        let tail = HotTail::with_bounds(1, bounds(100, 0, 10));
        push_durable(&tail, 1, 50, 0, 1_000_000, 1000);
        assert_eq!(tail.len(), 10);
        let fixed = HotTail::new(1, 10 * (1000 + OVERHEAD));
        push_durable(&fixed, 1, 50, 0, 1, 1000);
        assert_eq!(fixed.len(), 10, "new() is a fixed size whatever the rate");
    }
}
