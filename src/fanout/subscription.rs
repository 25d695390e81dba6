//! One subscriber's view of the stream: its batches in seq order from the live queue
//! or from the log, the switch between the two, and its filter changes.
//!
//! Owns the subscriber's position (`seen_through`), its catch-up reads (paced by its own
//! rate and its address's share of the scan budget) and its rejoin to the live path.
//! Must never show a gap, a duplicate or a reordering across the switch (every event
//! delivered has a seq above `seen_through`), or change the routing index by more than
//! [`INDEX_STEP`] entries per hold of the hub's lock.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::filter::Filter;
use super::hub::{Hub, HubInner, HubState, SubShared};
use super::{visible, DirectWrite, End, IndexBusy, PaceCost, PoolError, SlowPolicy, Start};
use crate::log::{LogError, SharedEvent};
use crate::rate::TokenBucket;
use crate::wire::raw::FrameOnce;
use crate::wire::WireKind;

enum Mode {
    Live,
    CatchUp { next: u64 },
}

/// What an attempt to rejoin the live path came to.
enum Rejoin {
    Done,
    /// The dispatcher has not reached this subscriber's position yet.
    Behind,
    /// The index budget cannot pay for this filter for this long.
    NoBudget(Duration),
}

/// Most routing-index entries a filter change adds or removes per hold of the hub's
/// lock (~0.1-0.2 µs each).
pub const INDEX_STEP: usize = 1024;

/// Longest a caught-up subscriber waits before trying to rejoin again.
const REJOIN_RETRY: Duration = Duration::from_millis(50);

/// A catch-up read paid for and not yet done: how many events, and until when it waits
/// for the connection's rate and its address's share (`Share`) or then for the total
/// (`Total`). Kept on the subscription so that a read cancelled while it waits (the
/// session's `select!` woke for a client message or a timer) resumes the same wait
/// instead of paying again: a wait longer than the session's wakeups would otherwise
/// never end.
#[derive(Debug, Clone, Copy)]
enum Paid {
    Share(usize, tokio::time::Instant),
    Total(usize, tokio::time::Instant),
}

/// One subscriber's view of the stream. Dropping it unregisters the subscriber.
pub struct Subscription {
    hub: Arc<HubInner>,
    id: u64,
    shared: Arc<SubShared>,
    wire: WireKind,
    /// Shared with the catch-up reads under way on the pool, which filter by it.
    filter: Arc<Filter>,
    policy: SlowPolicy,
    mode: Mode,
    /// Every event up to this seq has been delivered or filtered out.
    seen_through: u64,
    /// Paces this connection's catch-up reads (`--replay-events-per-sec`).
    tokens: TokenBucket,
    /// The catch-up read paid for and under way, if any.
    paid: Option<Paid>,
    /// The client's address: its share of the index and scan budgets.
    peer: Option<IpAddr>,
    /// The raw frames delivered so far: what catch-up must not send again, handed to the
    /// hub's entry when the subscriber rejoins the live path.
    frames: FrameOnce,
    /// The last write to this subscriber, by the session or (as of its last look at the
    /// queue) by the dispatcher.
    last_write: Option<tokio::time::Instant>,
}

impl Hub {
    /// Registers a subscriber. Callers reserve its index work first
    /// ([`Hub::reserve_subscribe`]).
    pub fn subscribe(
        &self,
        wire: WireKind,
        filter: Filter,
        policy: SlowPolicy,
        start: Start,
    ) -> Subscription {
        let registered = self.inner.register(wire, &filter, start);
        let mode = match start {
            Start::Live => Mode::Live,
            Start::From(seq) => Mode::CatchUp { next: seq.max(1) },
        };
        let rate = self.inner.replay_rate.load(Ordering::Relaxed) as f64;
        Subscription {
            hub: self.inner.clone(),
            id: registered.id,
            shared: registered.shared,
            wire,
            filter: Arc::new(filter),
            policy,
            mode,
            seen_through: registered.seen_through,
            tokens: TokenBucket::new(rate, rate),
            paid: None,
            peer: None,
            frames: FrameOnce::default(),
            last_write: None,
        }
    }
}

impl Subscription {
    pub fn wire(&self) -> WireKind {
        self.wire
    }

    pub fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Live)
    }

    /// Runs `work` (this subscriber's catch-up write of `cost`, [`Self::pace_cost`]) on
    /// the catch-up pool, below the live path's priority and at the server-wide catch-up
    /// pace ([`run_paced`](super::CatchupPool::run_paced)); `Err` once the pool has
    /// stopped or if the write panicked.
    pub async fn on_catchup_pool<F>(&self, cost: PaceCost, work: F) -> Result<F::Output, PoolError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.hub.catchup.run_paced(cost, work).await
    }

    /// What a catch-up write of `events` pays into the pace: the bytes of their payloads
    /// on this subscriber's wire (before compression), and the events that have one.
    pub fn pace_cost(&self, events: &[SharedEvent]) -> PaceCost {
        let mut cost = PaceCost::default();
        for payload in events.iter().filter_map(|e| self.wire.payload(e)) {
            cost.bytes += payload.len() as u64;
            cost.events += 1;
        }
        cost
    }

    /// The last seq delivered or filtered out: where a resume would continue from.
    pub fn seen_through(&self) -> u64 {
        self.seen_through
    }

    /// Reserves the index work of replacing the filter with `filter`: how long to wait
    /// before [`Subscription::set_filter`], or (nothing reserved) the wait over
    /// [`MAX_INDEX_WAIT`](super::MAX_INDEX_WAIT) it would have been. The old filter's
    /// removal was paid when it went in.
    pub fn reserve_filter_change(&self, filter: &Filter) -> Result<Duration, IndexBusy> {
        self.hub.reserve_index_for_client(filter, self.peer)
    }

    /// Gives back what [`Subscription::reserve_filter_change`] took for a filter that
    /// will not be applied.
    pub fn refund_filter_change(&self, filter: &Filter) {
        let cost = 2.0 * filter.index_entries() as f64;
        self.hub.index_budget.lock().refund(self.peer, cost);
    }

    /// The client's address, whose shares of the index and scan budgets this
    /// subscription draws on from now.
    pub fn set_peer(&mut self, peer: IpAddr) {
        self.peer = Some(peer);
    }

    /// Lets the dispatcher write this subscriber's live events to `writer` itself while
    /// the session waits with nothing in hand ([`DirectWrite`]), at most one write (by
    /// either path) per `pace`: events within `pace` of the last write are queued and
    /// the dispatcher writes them together when the interval is up, without waking the
    /// session.
    pub fn set_direct(&self, writer: Arc<dyn DirectWrite>, pace: Duration) {
        if let Some(entry) = self.hub.state.lock().entries.get_mut(&self.id) {
            entry.direct = Some((writer, pace));
        }
    }

    /// Records a write the session made at `at` (told to the dispatcher when the session
    /// next parks).
    pub fn wrote(&mut self, at: tokio::time::Instant) {
        self.last_write = Some(at);
    }

    /// The last write to this subscriber by either path, as of the session's last look
    /// at its queue: what its pacing counts from.
    pub fn last_write(&self) -> Option<tokio::time::Instant> {
        self.last_write
    }

    /// The filter in force.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Replaces the filter (Jetstream v1 `options_update`), effective from the next event.
    /// Callers reserve its index work first ([`Subscription::reserve_filter_change`]).
    ///
    /// Between two DID filters only the difference is applied, and in steps of at most
    /// [`INDEX_STEP`] entries per hold of the hub's lock (DIDs the new filter adds, then
    /// the swap of the filter, then DIDs it drops), so the dispatcher, which needs that
    /// lock for every batch, waits for at most one step: a 10,000-DID update held it for
    /// the whole swap, and on a loaded machine for however long the holder was
    /// descheduled meanwhile. Meanwhile the index holds both filters' DIDs; the
    /// dispatcher checks each candidate against the entry's filter, so the subscriber
    /// gets exactly the old filter's events before the swap and the new one's after.
    pub fn set_filter(&mut self, filter: Filter) {
        let shared = Arc::new(filter);
        let old = std::mem::replace(&mut self.filter, shared.clone());
        let new = &*self.filter;
        let retired = if !old.dids.is_empty() && !new.dids.is_empty() {
            let added: Vec<&String> = new.dids.difference(&old.dids).collect();
            let dropped: Vec<&String> = old.dids.difference(&new.dids).collect();
            self.swap_dids(&added, &dropped, shared)
        } else {
            let mut state = self.hub.state.lock();
            let HubState { entries, index, .. } = &mut *state;
            entries.get_mut(&self.id).map(|entry| {
                if entry.live {
                    index.remove(self.id, &old);
                    index.insert(self.id, new);
                }
                entry.swap_filter(shared)
            })
        };
        // The filter replaced is freed here, outside the lock.
        drop(retired);
    }

    /// [`Subscription::set_filter`] between two DID filters: `added` go into the index in
    /// steps, the entry's filter becomes `shared`, then `dropped` leave in steps. Returns
    /// the filter replaced.
    fn swap_dids(
        &self,
        added: &[&String],
        dropped: &[&String],
        shared: Arc<Filter>,
    ) -> Option<Arc<Filter>> {
        let id = self.id;
        for (step, chunk) in added.chunks(INDEX_STEP).enumerate() {
            let mut state = self.hub.state.lock();
            let HubState { entries, index, .. } = &mut *state;
            let live = entries.get(&id).is_some_and(|e| e.live);
            if !live {
                // It overflowed meanwhile: the dispatcher took its (old) filter out of
                // the index, so the additions made so far come out too; it enters the
                // index with its new filter when it rejoins.
                for did in added[..step * INDEX_STEP].iter() {
                    index.remove_did(did, id);
                }
                return entries.get_mut(&id).map(|e| e.swap_filter(shared));
            }
            for did in chunk {
                index.add_did(did, id);
            }
        }
        let (retired, live) = {
            let mut state = self.hub.state.lock();
            match state.entries.get_mut(&id) {
                Some(entry) => (Some(entry.swap_filter(shared)), entry.live),
                None => (None, false),
            }
        };
        // Live at the swap: the old filter's own DIDs are left to remove (also if it
        // overflows meanwhile: the dispatcher then removes the new filter's). Not live:
        // it overflowed after the additions, and the dispatcher removed the old filter's
        // DIDs, so the additions are what is left.
        let leftover = if live { dropped } else { added };
        for chunk in leftover.chunks(INDEX_STEP) {
            let mut state = self.hub.state.lock();
            for did in chunk {
                state.index.remove_did(did, id);
            }
        }
        retired
    }

    /// The next events for this subscriber, in seq order, at most `max`. Waits while there
    /// are none. An empty batch means only that the connection holds the rest of a direct
    /// write for the session to write ([`super::Direct::Handed`]).
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<SharedEvent>, End> {
        let max = max.max(1);
        loop {
            match self.mode {
                Mode::Live => {
                    let (batch, drained_overflow, handed) = self.take_queued(max, true);
                    if !batch.is_empty() || handed {
                        return Ok(batch);
                    }
                    if drained_overflow {
                        if self.policy == SlowPolicy::Disconnect {
                            return Err(End::TooSlow);
                        }
                        tracing::debug!(
                            id = self.id,
                            seen_through = self.seen_through,
                            "subscriber moved to catch-up"
                        );
                        self.hub
                            .stats
                            .catchups_active
                            .fetch_add(1, Ordering::Relaxed);
                        self.mode = Mode::CatchUp {
                            next: self.seen_through + 1,
                        };
                        continue;
                    }
                    self.shared.notify.notified().await;
                }
                Mode::CatchUp { next } => {
                    let read = self.read_log(next, max).await?;
                    let Some(last_seq) = read.last else {
                        match self.try_rejoin(next) {
                            Rejoin::Done => {}
                            Rejoin::Behind => {
                                // The dispatcher has not caught up with the log yet.
                                let mut dispatched = self.hub.dispatched.subscribe();
                                let _ = tokio::time::timeout(
                                    REJOIN_RETRY,
                                    dispatched.wait_for(|&d| d + 1 >= next),
                                )
                                .await;
                            }
                            // Whatever is logged meanwhile is read from the log next round.
                            Rejoin::NoBudget(wait) => {
                                tokio::time::sleep(wait.min(REJOIN_RETRY)).await
                            }
                        }
                        continue;
                    };
                    self.frames = read.frames;
                    self.seen_through = self.seen_through.max(last_seq);
                    self.mode = Mode::CatchUp { next: last_seq + 1 };
                    if !read.wanted.is_empty() {
                        return Ok(read.wanted);
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// What is already queued for a live subscriber, at most `max`, without waiting: empty
    /// when nothing is, or while catching up (catch-up reads are large already). Lets a
    /// session that paused to coalesce writes pick up what arrived meanwhile without being
    /// woken once per event.
    pub fn try_next_batch(&mut self, max: usize) -> Vec<SharedEvent> {
        match self.mode {
            Mode::Live => self.take_queued(max.max(1), false).0,
            Mode::CatchUp { .. } => Vec::new(),
        }
    }

    /// Takes up to `max` queued events newer than `seen_through`, whether the queue had
    /// overflowed and is now empty (time to switch to catch-up), and whether a direct
    /// write left its rest to the session. Nothing while the dispatcher writes directly
    /// (what is queued is behind that write). With `park`, a queue found empty marks the
    /// session as waiting with nothing in hand, which lets the dispatcher write to it
    /// directly.
    fn take_queued(&mut self, max: usize, park: bool) -> (Vec<SharedEvent>, bool, bool) {
        let (mut batch, drained_overflow, handed) = {
            let mut queue = self.shared.queue.lock();
            // What the dispatcher wrote directly is delivered; every queued event is newer.
            if queue.direct_through > self.seen_through {
                self.seen_through = queue.direct_through;
                self.frames = queue.direct_frames;
            }
            // Both paths' last writes, for the session's pacing and the dispatcher's.
            let last_write = queue.last_write.max(self.last_write);
            queue.last_write = last_write;
            self.last_write = last_write;
            if queue.claimed {
                return (Vec::new(), false, false);
            }
            let handed = std::mem::take(&mut queue.handed);
            let mut batch = Vec::new();
            queue.take_front(max, self.wire, &mut batch);
            if !batch.is_empty() {
                queue.parked = false;
                queue.deferred_until = None;
            } else if park {
                queue.parked = true;
            }
            (batch, queue.overflowed && queue.events.is_empty(), handed)
        };
        batch.retain(|e| e.seq > self.seen_through);
        if let Some(last) = batch.last() {
            self.seen_through = last.seq;
        }
        // The hub pushed these as first sights of their frames; catch-up continues from
        // what was delivered.
        if let Some(last) = batch.last() {
            self.frames.sent(last);
        }
        (batch, drained_overflow, handed)
    }

    async fn read_log(&mut self, next: u64, max: usize) -> Result<Picked, End> {
        let max = max.min(self.hub.config.catchup_batch.max(1));
        // Paid for every event the read may scan, matched or not: a filter that matches
        // nothing costs the same CPU as one that matches everything. First this
        // connection's rate and its address's share, then (once those are paid) the
        // server's total: an address with many replays queues on its own share and
        // takes from the total only at that share's pace.
        let max = loop {
            let paid = match self.paid {
                Some(paid) => paid,
                None => {
                    let wait = self.tokens.take_on_credit(max as f64).max(
                        self.hub
                            .scan_budget
                            .lock()
                            .take_share_on_credit(self.peer, max as f64),
                    );
                    Paid::Share(max, tokio::time::Instant::now() + wait)
                }
            };
            self.paid = Some(paid);
            match paid {
                Paid::Share(n, until) => {
                    sleep_until_due(until).await;
                    let wait = self.hub.scan_budget.lock().take_total_on_credit(n as f64);
                    self.paid = Some(Paid::Total(n, tokio::time::Instant::now() + wait));
                }
                Paid::Total(n, until) => {
                    sleep_until_due(until).await;
                    // What was paid for, at most what is asked now.
                    break n.min(max);
                }
            }
        };
        let result = self.read_paid(next, max).await;
        self.paid = None;
        result
    }

    /// The catch-up read itself, once paid for, and what of it this subscriber gets
    /// ([`pick`]). A read below the hot tail is picked where it is read, on the catch-up
    /// pool: the events the filter drops are dropped there, and the session's worker
    /// gets only what it writes.
    async fn read_paid(&self, next: u64, max: usize) -> Result<Picked, End> {
        let reader = self.hub.reader.clone();
        let picking = Picking {
            seen_through: self.seen_through,
            filter: self.filter.clone(),
            wire: self.wire,
            frames: self.frames,
        };
        let cold = next < reader.tail().oldest_seq();
        let result = if cold {
            let _permit = self
                .hub
                .cold_reads
                .acquire()
                .await
                .map_err(|_| End::Closed)?;
            self.hub.stats.cold_reads.fetch_add(1, Ordering::Relaxed);
            let limits = crate::log::ReadLimits {
                max_events: max,
                max_bytes: self.hub.config.catchup_batch_bytes,
            };
            let payloads = crate::log::Payloads::of_wire(self.wire);
            // On the catch-up pool's threads, below the live path's priority.
            self.hub
                .catchup
                .read(move || {
                    reader
                        .read_from_with(next, limits, payloads)
                        .map(|events| picking.pick(events))
                })
                .await
                .map_err(cold_read_end)?
        } else {
            reader
                .read_from(next, max, self.hub.config.catchup_batch_bytes)
                .map(|events| picking.pick(events))
        };
        match result {
            Ok(picked) => Ok(picked),
            Err(LogError::TooOld { oldest, .. }) => Err(End::TooOld { oldest }),
            Err(LogError::Closed) => Err(End::Closed),
            Err(e) => Err(End::ReadFailed(e.to_string())),
        }
    }

    /// Rejoins the live path if this subscriber has seen everything dispatched so far.
    fn try_rejoin(&mut self, next: u64) -> Rejoin {
        let mut state = self.hub.state.lock();
        if next.saturating_sub(1) < state.dispatched_through {
            return Rejoin::Behind;
        }
        let HubState { entries, index, .. } = &mut *state;
        let Some(entry) = entries.get_mut(&self.id) else {
            return Rejoin::Behind;
        };
        // Without budget the subscriber stays on the log a while longer: it loses
        // nothing, and one that cycles between live and catch-up cannot churn the index
        // faster than the budget allows.
        if let Err(IndexBusy { would_wait: wait }) =
            self.hub
                .reserve_index(&entry.filter, Duration::ZERO, self.peer)
        {
            self.hub
                .stats
                .rejoins_deferred
                .fetch_add(1, Ordering::Relaxed);
            return Rejoin::NoBudget(wait);
        }
        {
            let mut queue = self.shared.queue.lock();
            queue.events.clear();
            queue.bytes = 0;
            queue.overflowed = false;
            queue.parked = false;
            queue.deferred_until = None;
        }
        entry.live = true;
        entry.last_pushed = self.seen_through;
        entry.frames = self.frames;
        index.insert(self.id, &entry.filter);
        drop(state);
        self.mode = Mode::Live;
        self.hub.stats.rejoins.fetch_add(1, Ordering::Relaxed);
        self.hub
            .stats
            .catchups_active
            .fetch_sub(1, Ordering::Relaxed);
        Rejoin::Done
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.hub.state.lock();
        let HubState { entries, index, .. } = &mut *state;
        if let Some(entry) = entries.remove(&self.id) {
            if entry.live {
                index.remove(self.id, &entry.filter);
            }
        }
        drop(state);
        if !self.is_live() {
            self.hub
                .stats
                .catchups_active
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.hub.stats.subscribers[self.wire.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits until `until`, without a timer when it has passed (a catch-up read within its
/// budget, the usual case: two timers per read were a share of the time driver's lock,
/// which the live path's timers use too).
async fn sleep_until_due(until: tokio::time::Instant) {
    if until > tokio::time::Instant::now() {
        tokio::time::sleep_until(until).await;
    }
}

/// What a catch-up read is filtered by: the subscriber's position, filter and wire as of
/// the read (a copy, so a read cancelled or still on the pool changes nothing).
struct Picking {
    seen_through: u64,
    filter: Arc<Filter>,
    wire: WireKind,
    frames: FrameOnce,
}

/// One catch-up read as the session takes it: the events it delivers, and how far the
/// read went.
struct Picked {
    /// The events read that this subscriber gets, in seq order.
    wanted: Vec<SharedEvent>,
    /// The last seq read (delivered or filtered out); `None` when nothing was read.
    last: Option<u64>,
    /// The raw frames delivered, with `wanted`'s.
    frames: FrameOnce,
}

impl Picking {
    /// The events of `events` (one read, in seq order) newer than `seen_through` that
    /// the filter matches and the wire shows; the rest are dropped here.
    fn pick(mut self, events: Vec<SharedEvent>) -> Picked {
        let last = events.last().map(|e| e.seq);
        let wanted = events
            .into_iter()
            .filter(|e| {
                e.seq > self.seen_through
                    && self.filter.matches(e)
                    && visible(self.wire, e, &mut self.frames)
            })
            .collect();
        Picked {
            wanted,
            last,
            frames: self.frames,
        }
    }
}

/// How a catch-up stream ends when its cold read on the pool gave nothing: at shutdown
/// as the log closing, and on a panic in the read (a bug) as a failed read, so the
/// subscriber is told of an internal error rather than of a restart.
fn cold_read_end(e: PoolError) -> End {
    match e {
        PoolError::Stopped => End::Closed,
        PoolError::Panicked(message) => {
            End::ReadFailed(format!("the log read panicked: {message}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicked_cold_read_ends_as_a_failed_read_and_a_stop_as_closed() {
        assert_eq!(cold_read_end(PoolError::Stopped), End::Closed);
        assert!(matches!(
            cold_read_end(PoolError::Panicked("boom".into())),
            End::ReadFailed(m) if m.contains("boom")
        ));
    }

    fn event(seq: u64, upstream_seq: i64, op_index: u16, collection: &str) -> SharedEvent {
        SharedEvent::new(crate::event::Event {
            seq,
            time_us: seq as i64,
            upstream_seq,
            received_us: 0,
            kind: crate::event::EventKind::Commit,
            did: "did:plc:a".into(),
            collection: Some(collection.into()),
            op_index,
            v1_json: Some(bytes::Bytes::from_static(b"{}")),
            v2_json: None,
            raw_frame: bytes::Bytes::from_static(b"frame"),
        })
    }

    fn filter_of(collections: &[&str]) -> Arc<Filter> {
        let collections: Vec<String> = collections.iter().map(|c| (*c).to_owned()).collect();
        Arc::new(Filter::build(&collections, &[], &[], &Default::default()).unwrap())
    }

    #[test]
    fn a_catchup_read_is_picked_by_position_filter_and_wire_and_reports_how_far_it_went() {
        let events = vec![
            event(4, 40, 0, "app.bsky.feed.like"),
            event(5, 41, 0, "app.bsky.feed.post"),
            event(6, 41, 1, "app.bsky.feed.post"),
            event(7, 42, 0, "app.bsky.feed.like"),
            event(8, 43, 0, "app.bsky.graph.follow"),
        ];
        // Seq 4 was seen; likes are filtered out; the tail of the read (8) neither.
        let v1 = Picking {
            seen_through: 4,
            filter: filter_of(&["app.bsky.feed.post"]),
            wire: WireKind::JetstreamV1,
            frames: FrameOnce::default(),
        }
        .pick(events.clone());
        let seqs = |p: &Picked| p.wanted.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&v1), [5, 6]);
        assert_eq!(
            v1.last,
            Some(8),
            "the read went to its last event, matched or not"
        );
        // v2 shows nothing of these (no v2 JSON), and still covers the read.
        let v2 = Picking {
            seen_through: 0,
            filter: filter_of(&[]),
            wire: WireKind::JetstreamV2,
            frames: FrameOnce::default(),
        }
        .pick(events.clone());
        assert!(v2.wanted.is_empty());
        assert_eq!(v2.last, Some(8));
        // Raw: one event per frame, and the frames delivered are carried on.
        let mut frames = FrameOnce::default();
        frames.sent(&events[0]);
        let raw = Picking {
            seen_through: 0,
            filter: filter_of(&[]),
            wire: WireKind::Raw,
            frames,
        }
        .pick(events.clone());
        assert_eq!(seqs(&raw), [5, 7, 8], "frame 40 was sent before, 41 once");
        let mut after = raw.frames;
        assert!(!after.first_sight(&events[4]), "frame 43 counts as sent");
        assert_eq!(
            Picking {
                seen_through: 0,
                filter: filter_of(&[]),
                wire: WireKind::JetstreamV1,
                frames: FrameOnce::default(),
            }
            .pick(Vec::new())
            .last,
            None
        );
    }
}
