//! The hub: the registry of subscribers, the routing index under one lock, the budgets
//! filter changes and replays draw on, and the dispatcher that pushes each logged event
//! into the queues of the live subscribers that want it.
//!
//! Owns the dispatcher and the live half of each subscriber (its queue and its index
//! entry), and the dispatcher's direct writes to live subscribers whose session waits
//! with nothing in hand ([`DirectWrite`]), paced like the session's (events within the
//! interval of the last write wait in the queue for the dispatcher's one timer). Must
//! never write to a subscriber more than once per its pacing interval, block on a
//! subscriber, copy an event per subscriber, let a queue pass its bounds (an overflowing
//! subscriber leaves the index for catch-up; a refused direct write puts back at most
//! `DIRECT_MAX_EVENTS`), write to a subscriber under the lock, or hold the lock for more
//! than one batch or one index step.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::catchup::CatchupPool;
use super::filter::{Filter, KindSet};
use super::index::Index;
use super::{
    visible, Budgets, Direct, DirectWrite, HubConfig, HubStats, IndexBusy, Start, MAX_INDEX_WAIT,
};
use crate::event::Event;
use crate::log::{LogReader, SharedEvent};
use crate::rate::SharedBudget;
use crate::wire::raw::FrameOnce;
use crate::wire::WireKind;

pub(super) struct Queue {
    pub(super) events: VecDeque<SharedEvent>,
    pub(super) bytes: usize,
    pub(super) overflowed: bool,
    /// The session waits for its next batch with nothing in hand (set when it found the
    /// queue empty, cleared when it takes events): a direct write cannot overtake
    /// anything it holds.
    pub(super) parked: bool,
    /// The dispatcher is writing to this subscriber directly (set under the hub's lock,
    /// cleared after the write): the session takes nothing from the queue meanwhile, so
    /// what is queued behind the direct write stays behind it.
    pub(super) claimed: bool,
    /// Part of a direct write is left for the session to write (wakes it with an empty
    /// batch).
    pub(super) handed: bool,
    /// The last seq written directly (or handed over): delivered, for the resume
    /// position; every queued event is newer.
    pub(super) direct_through: u64,
    /// The raw frames written directly (see [`FrameOnce`]).
    pub(super) direct_frames: FrameOnce,
    /// The last write to this subscriber by either path (the dispatcher's direct writes
    /// set it; the session's are published when it parks): a direct write waits until it
    /// is the subscriber's pacing interval old.
    pub(super) last_write: Option<Instant>,
    /// The queued events are the dispatcher's to write at this instant (the pacing
    /// interval after `last_write`), the session still parked: they do not wake it.
    /// Cleared when anyone takes them.
    pub(super) deferred_until: Option<Instant>,
}

impl Queue {
    fn new() -> Self {
        Queue {
            events: VecDeque::new(),
            bytes: 0,
            overflowed: false,
            parked: false,
            claimed: false,
            handed: false,
            direct_through: 0,
            direct_frames: FrameOnce::default(),
            last_write: None,
            deferred_until: None,
        }
    }

    /// Moves up to `max` events from the front to the end of `into`; the bytes they held
    /// on `wire` (given back from the queue's bound).
    pub(super) fn take_front(
        &mut self,
        max: usize,
        wire: WireKind,
        into: &mut Vec<SharedEvent>,
    ) -> usize {
        let n = self.events.len().min(max);
        let from = into.len();
        into.extend(self.events.drain(..n));
        let bytes: usize = into[from..]
            .iter()
            .map(|e| wire.payload(e).map_or(0, Bytes::len))
            .sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        bytes
    }
}

pub(super) struct SubShared {
    pub(super) queue: Mutex<Queue>,
    pub(super) notify: Notify,
}

pub(super) struct Entry {
    shared: Arc<SubShared>,
    /// Shared so that replacing it under the hub's lock is a pointer swap; the old one is
    /// dropped after the lock is released. Replaced only through [`Entry::swap_filter`],
    /// which keeps `kinds` in step.
    pub(super) filter: Arc<Filter>,
    /// `KindSet::of(&filter)`, here so that a candidate found by its collection is
    /// decided without following the filter's pointer.
    kinds: KindSet,
    wire: WireKind,
    /// Live subscribers are in the index; overflowed ones are not.
    pub(super) live: bool,
    pub(super) last_pushed: u64,
    /// The raw frames pushed so far (the live half of the subscriber's record; the
    /// subscription keeps the other half while it catches up).
    pub(super) frames: FrameOnce,
    /// The connection, when the dispatcher may write to it directly, and the least time
    /// between two writes to it (`--coalesce-us`).
    pub(super) direct: Option<(Arc<dyn DirectWrite>, Duration)>,
}

impl Entry {
    /// Makes `filter` the entry's filter; the one replaced.
    pub(super) fn swap_filter(&mut self, filter: Arc<Filter>) -> Arc<Filter> {
        self.kinds = KindSet::of(&filter);
        std::mem::replace(&mut self.filter, filter)
    }
}

pub(super) struct HubState {
    /// Every event up to this seq has been offered to the live subscribers.
    pub(super) dispatched_through: u64,
    /// Looked up once per candidate of every event: hashed with rustc-hash's Fx rather
    /// than SipHash (the ids are the hub's own counter, not a client's choice, so there
    /// is no flooding to resist).
    pub(super) entries: FxHashMap<u64, Entry>,
    pub(super) index: Index,
    next_id: u64,
}

pub(super) struct HubInner {
    pub(super) reader: LogReader,
    pub(super) config: HubConfig,
    pub(super) state: Mutex<HubState>,
    pub(super) stats: HubStats,
    pub(super) cold_reads: Semaphore,
    /// Bumped after each dispatched batch, for subscribers waiting to rejoin.
    pub(super) dispatched: tokio::sync::watch::Sender<u64>,
    /// Index entries that may still change this second, in total and per client IP.
    /// Every insertion pays for itself and for its removal later, which cannot be refused
    /// (a disconnect, an overflow).
    pub(super) index_budget: Mutex<SharedBudget<IpAddr>>,
    /// Events catch-up reads may still scan this second, in total and per client IP.
    pub(super) scan_budget: Mutex<SharedBudget<IpAddr>>,
    /// The per-connection replay rate a new subscription gets, events per second
    /// (`config.replay_events_per_sec` until a reload changes it).
    pub(super) replay_rate: AtomicU64,
    /// Where subscribers in catch-up read and write, below the live path's priority.
    pub(super) catchup: CatchupPool,
}

impl HubInner {
    /// Reserves the index work of putting `filter` into the index (and later taking it
    /// out): how long to wait before doing it, or the wait it would have been when that
    /// exceeds `max_wait` (nothing is reserved then; the caller counts why).
    pub(super) fn reserve_index(
        &self,
        filter: &Filter,
        max_wait: Duration,
        peer: Option<IpAddr>,
    ) -> Result<Duration, IndexBusy> {
        let cost = 2.0 * filter.index_entries() as f64;
        let reserved = self
            .index_budget
            .lock()
            .take_within(peer, cost, max_wait)
            .map_err(|refused| IndexBusy {
                would_wait: refused.would_wait,
            });
        if reserved.is_ok_and(|wait| !wait.is_zero()) {
            self.stats.index_waits.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// [`HubInner::reserve_index`] for a client's subscribe or filter change: waits up to
    /// [`MAX_INDEX_WAIT`], and a refusal is counted.
    pub(super) fn reserve_index_for_client(
        &self,
        filter: &Filter,
        peer: Option<IpAddr>,
    ) -> Result<Duration, IndexBusy> {
        let reserved = self.reserve_index(filter, MAX_INDEX_WAIT, peer);
        if reserved.is_err() {
            self.stats.index_refusals.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// Registers a subscriber with `filter` on `wire`: one starting live enters the index
    /// now, one starting from the log when it catches up (it counts as catching up).
    pub(super) fn register(&self, wire: WireKind, filter: &Filter, start: Start) -> Registered {
        let shared = Arc::new(SubShared {
            queue: Mutex::new(Queue::new()),
            notify: Notify::new(),
        });
        let mut state = self.state.lock();
        let id = state.next_id;
        state.next_id += 1;
        let (seen_through, live) = match start {
            // Live means "after what is logged now", not "after what is dispatched": the
            // dispatcher can trail the log (never lead it), and events logged before the
            // connection are not live to it.
            Start::Live => (self.reader.newest_seq(), true),
            Start::From(seq) => (seq.max(1) - 1, false),
        };
        if live {
            state.index.insert(id, filter);
        } else {
            self.stats.catchups_active.fetch_add(1, Ordering::Relaxed);
        }
        state.entries.insert(
            id,
            Entry {
                shared: shared.clone(),
                filter: Arc::new(filter.clone()),
                kinds: KindSet::of(filter),
                wire,
                live,
                last_pushed: seen_through,
                frames: FrameOnce::default(),
                direct: None,
            },
        );
        drop(state);
        self.stats.subscribers[wire.index()].fetch_add(1, Ordering::Relaxed);
        Registered {
            id,
            shared,
            seen_through,
        }
    }
}

/// A subscriber as the hub registered it.
pub(super) struct Registered {
    pub(super) id: u64,
    pub(super) shared: Arc<SubShared>,
    /// Every event up to this seq counts as delivered or filtered out.
    pub(super) seen_through: u64,
}

/// The fan-out hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    pub(super) inner: Arc<HubInner>,
}

impl Hub {
    /// Creates the hub, starts its dispatcher, which follows the log from its newest
    /// event, and its catch-up pool. Must be called inside a tokio runtime. Fails only
    /// when the pool's threads cannot be started.
    pub fn start(reader: LogReader, config: HubConfig) -> std::io::Result<Hub> {
        let newest = reader.newest_seq();
        let (dispatched, _) = tokio::sync::watch::channel(newest);
        let index_rate = config.index_changes_per_sec as f64;
        let index_ip_rate = config.index_changes_per_sec_per_ip as f64;
        let scan_rate = config.scan_events_per_sec as f64;
        let scan_ip_rate = config.scan_events_per_sec_per_ip as f64;
        let inner = Arc::new(HubInner {
            index_budget: Mutex::new(SharedBudget::new(
                index_rate,
                index_rate,
                index_ip_rate,
                index_ip_rate,
            )),
            scan_budget: Mutex::new(SharedBudget::new(
                scan_rate,
                scan_rate,
                scan_ip_rate,
                scan_ip_rate,
            )),
            cold_reads: Semaphore::new(config.cold_read_concurrency.max(1)),
            replay_rate: AtomicU64::new(config.replay_events_per_sec),
            catchup: CatchupPool::start(config.catchup)?,
            reader,
            config,
            state: Mutex::new(HubState {
                dispatched_through: newest,
                entries: FxHashMap::default(),
                index: Index::default(),
                next_id: 1,
            }),
            stats: HubStats::default(),
            dispatched,
        });
        tokio::spawn(dispatch_loop(inner.clone()));
        Ok(Hub { inner })
    }

    /// Stops the catch-up pool (shutdown): work under way gets a short grace, then
    /// subscribers still catching up end as closed. Blocks for that grace at most.
    pub fn stop_catchup(&self) {
        self.inner.catchup.stop();
    }

    /// The catch-up pool, for its state.
    pub fn catchup(&self) -> &CatchupPool {
        &self.inner.catchup
    }

    pub fn stats(&self) -> &HubStats {
        &self.inner.stats
    }

    /// Subscriber entries in the routing index (a subscriber counts once per key it is
    /// listed under): what dispatch visits at most, and what filter changes must leave
    /// exact.
    pub fn index_size(&self) -> usize {
        self.inner.state.lock().index.entries()
    }

    /// Events waiting in all live queues.
    pub fn queued_events(&self) -> usize {
        let state = self.inner.state.lock();
        state
            .entries
            .values()
            .map(|e| e.shared.queue.lock().events.len())
            .sum()
    }

    pub fn reader(&self) -> &LogReader {
        &self.inner.reader
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// New rates of the index and scan budgets, in total and per client IP (SIGHUP);
    /// what has accrued is kept up to the new bursts (each burst is a second's worth).
    /// The replay rate applies to subscriptions made from now on.
    pub fn set_budgets(&self, budgets: Budgets) {
        self.inner
            .replay_rate
            .store(budgets.replay_per_conn, Ordering::Relaxed);
        let rate = |r: u64| r as f64;
        let (index, index_ip) = (rate(budgets.index_total), rate(budgets.index_per_ip));
        let (scan, scan_ip) = (rate(budgets.scan_total), rate(budgets.scan_per_ip));
        self.inner
            .index_budget
            .lock()
            .set_limits(index, index, index_ip, index_ip);
        self.inner
            .scan_budget
            .lock()
            .set_limits(scan, scan, scan_ip, scan_ip);
    }

    /// The rates of the index and scan budgets in force.
    pub fn budgets(&self) -> Budgets {
        let (index_total, index_per_ip) = self.inner.index_budget.lock().rates();
        let (scan_total, scan_per_ip) = self.inner.scan_budget.lock().rates();
        Budgets {
            index_total: index_total as u64,
            index_per_ip: index_per_ip as u64,
            scan_total: scan_total as u64,
            scan_per_ip: scan_per_ip as u64,
            replay_per_conn: self.inner.replay_rate.load(Ordering::Relaxed),
        }
    }

    /// Reserves the index work of a subscription with `filter` from `start`: how long to
    /// wait before [`Hub::subscribe`], or (nothing reserved) the wait over
    /// [`MAX_INDEX_WAIT`] it would have been. A subscription that starts from the log
    /// enters the index only when it catches up, and pays then.
    pub fn reserve_subscribe(&self, filter: &Filter, start: Start) -> Result<Duration, IndexBusy> {
        self.reserve_subscribe_from(filter, start, None)
    }

    /// [`Hub::reserve_subscribe`] for a client at `peer`, which pays from its own share
    /// of the index budget too.
    pub fn reserve_subscribe_from(
        &self,
        filter: &Filter,
        start: Start,
        peer: Option<IpAddr>,
    ) -> Result<Duration, IndexBusy> {
        match start {
            Start::Live => self.inner.reserve_index_for_client(filter, peer),
            Start::From(_) => Ok(Duration::ZERO),
        }
    }

    /// Gives back the index work reserved for `filter` that will not be done (the client
    /// left before it was applied).
    pub fn refund_index(&self, filter: &Filter, peer: Option<IpAddr>) {
        let cost = 2.0 * filter.index_entries() as f64;
        self.inner.index_budget.lock().refund(peer, cost);
    }

    /// A permit of the fair pool for reads below the hot tail, waiting up to `max_wait`.
    pub async fn cold_read_permit(
        &self,
        max_wait: Duration,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        tokio::time::timeout(max_wait, self.inner.cold_reads.acquire())
            .await
            .ok()?
            .ok()
    }
}

async fn dispatch_loop(inner: Arc<HubInner>) {
    let mut newest = inner.reader.watch_newest();
    let mut round = Round::default();
    loop {
        if round.next_flush.is_some_and(|at| at <= Instant::now()) {
            flush_deferred(&inner, &mut round);
        }
        let from = inner.state.lock().dispatched_through + 1;
        if inner.reader.newest_seq() < from {
            let changed = match round.next_flush {
                // Paced writes are due then: one timer for every subscriber that waits.
                Some(at) => tokio::select! {
                    changed = newest.changed() => changed,
                    () = tokio::time::sleep_until(at) => Ok(()),
                },
                None => newest.changed().await,
            };
            if changed.is_err() {
                return;
            }
            continue;
        }
        match inner.reader.read_from(from, 1024, 64 * 1024 * 1024) {
            Ok(events) => dispatch(&inner, &events, &mut round),
            Err(_) => {
                // The dispatcher fell out of the log (it should never lag that far): move
                // every live subscriber to catch-up, which handles it per subscriber, and
                // jump to the newest event.
                let mut state = inner.state.lock();
                let newest_seq = inner.reader.newest_seq();
                tracing::error!(from, newest_seq, "fan-out dispatcher could not read the log; moving live subscribers to catch-up");
                let ids: Vec<u64> = state
                    .entries
                    .iter()
                    .filter(|(_, e)| e.live)
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    overflow(&inner, &mut state, id);
                }
                state.dispatched_through = newest_seq;
            }
        }
    }
}

/// Most events one subscriber is written directly per round (and at most the queue's
/// byte bound); later ones of the round go to its queue, behind them (the session takes
/// nothing while the write is under way).
const DIRECT_MAX_EVENTS: usize = 64;

/// Most subscribers the dispatcher writes directly in one turn of its loop, in a dispatch
/// round or a flush of paced writes; the others that are due wait in their queues for the
/// next turns (`Queue::deferred_until`, their sessions left asleep), and between two turns
/// the dispatcher dispatches whatever the log received meanwhile. At ~7 µs a write this
/// is ~0.25 ms of writing per turn: a busy stream's writes to 200 subscribers (1.5–2 ms)
/// no longer hold up the next events' dispatch, and an event that comes meanwhile joins
/// the writes not yet made instead of waiting out one more interval.
const DIRECT_SLICE: usize = 32;

/// The direct writes of one dispatch round, collected under the hub's lock and made after
/// it (scratch space kept across rounds), and the paced writes waiting for their time.
#[derive(Default)]
struct Round {
    targets: Vec<Target>,
    /// Emptied `Target::picks` kept for the next rounds: a target allocates nothing once
    /// the dispatcher has run a few rounds.
    spare: Vec<Vec<u32>>,
    /// Emptied [`flush_deferred`] list of the events it took from the queues, kept for the
    /// next flush like `spare`.
    taken: Vec<SharedEvent>,
    /// Subscriber id -> its place in `targets`.
    slots: FxHashMap<u64, usize>,
    /// Subscribers written within their pacing interval whose newer events wait in their
    /// queue for the dispatcher (`Queue::deferred_until`); one entry per deferral, at most
    /// one live per subscriber (a stale one is dropped when its time comes).
    deferred: Vec<Deferred>,
    /// The earliest time in `deferred`.
    next_flush: Option<Instant>,
}

struct Deferred {
    at: Instant,
    writer: Arc<dyn DirectWrite>,
    shared: Arc<SubShared>,
    wire: WireKind,
}

struct Target {
    writer: Arc<dyn DirectWrite>,
    shared: Arc<SubShared>,
    /// The events written, as places in the round's events (the batch the dispatcher
    /// read, or what a deferred flush took from the queues): borrowed for the write, so
    /// delivering an event costs no refcount round trip on it per subscriber, and cloned
    /// only when a refused write puts them back in the queue.
    picks: Vec<u32>,
    /// Bytes of `picks` on the subscriber's wire: at most the queue's byte bound (or one
    /// event), so a refused write puts back no more than a queue's worth.
    bytes: usize,
}

fn dispatch(inner: &HubInner, events: &[SharedEvent], round: &mut Round) {
    // One reading for the round: whether a subscriber's last write is a pacing interval
    // old, and the due time of a subscriber left for the next turn (each write itself is
    // stamped when made: `write_directly`).
    let now = Instant::now();
    let mut state = inner.state.lock();
    let mut overflowed = Vec::new();
    // A read is at most 1,024 events (`dispatch_loop`), so every place fits a u32.
    for (place, event) in (0u32..).zip(events) {
        if event.seq <= state.dispatched_through {
            continue;
        }
        let HubState { entries, index, .. } = &mut *state;
        index.candidates(event, |id, via| {
            let Some(entry) = entries.get_mut(&id) else {
                return;
            };
            if entry.last_pushed >= event.seq || !entry.live {
                return;
            }
            entry.last_pushed = event.seq;
            let wanted = via.wants(&entry.filter, entry.kinds, event);
            debug_assert_eq!(wanted, entry.filter.matches(event), "{via:?}");
            if !wanted || !visible(entry.wire, event, &mut entry.frames) {
                return;
            }
            let size = entry.wire.payload(event).map_or(0, Bytes::len);
            let mut queue = entry.shared.queue.lock();
            if let Some((writer, pace)) = &entry.direct {
                if queue.claimed {
                    let slot = round.slots.get(&id).map(|&i| &mut round.targets[i]);
                    let fits = |t: &&mut Target| {
                        t.picks.len() < DIRECT_MAX_EVENTS
                            && t.bytes + size <= inner.config.queue_max_bytes
                    };
                    if let Some(target) = slot.filter(fits) {
                        target.picks.push(place);
                        target.bytes += size;
                        return;
                    }
                } else if queue.parked && queue.events.is_empty() && !queue.overflowed {
                    let due = queue.last_write.map(|at| at + *pace).filter(|&at| at > now);
                    // Due now but this turn's writes are taken: the next turn's, in order.
                    let due = due.or((round.targets.len() >= DIRECT_SLICE).then_some(now));
                    match due {
                        None => {
                            queue.claimed = true;
                            round.slots.insert(id, round.targets.len());
                            let mut picks = round.spare.pop().unwrap_or_default();
                            picks.push(place);
                            round.targets.push(Target {
                                writer: writer.clone(),
                                shared: entry.shared.clone(),
                                picks,
                                bytes: size,
                            });
                            return;
                        }
                        // Written within the interval (or no room left in this turn):
                        // queued (below) for the dispatcher to write when the interval is
                        // up, the session left asleep.
                        Some(at) => {
                            queue.deferred_until = Some(at);
                            round.next_flush = Some(round.next_flush.map_or(at, |t| t.min(at)));
                            round.deferred.push(Deferred {
                                at,
                                writer: writer.clone(),
                                shared: entry.shared.clone(),
                                wire: entry.wire,
                            });
                        }
                    }
                }
            }
            if queue.events.len() >= inner.config.queue_max_events
                || (queue.bytes + size > inner.config.queue_max_bytes && !queue.events.is_empty())
            {
                queue.overflowed = true;
                drop(queue);
                entry.shared.notify.notify_one();
                overflowed.push(id);
                return;
            }
            queue.events.push_back(event.clone());
            queue.bytes += size;
            let wake = !queue.claimed && queue.deferred_until.is_none();
            drop(queue);
            if wake {
                entry.shared.notify.notify_one();
            }
        });
        for id in overflowed.drain(..) {
            overflow(inner, &mut state, id);
        }
        state.dispatched_through = event.seq;
    }
    let through = state.dispatched_through;
    drop(state);
    write_directly(inner, round, events);
    inner.dispatched.send_replace(through);
}

/// Makes the round's direct writes, in event order per subscriber, outside the hub's
/// lock (each target's picks are places in `events`); then releases each claim, records
/// the time each write was made as that subscriber's last write, and wakes the session
/// only when it has something to do (queued events, a handed-over rest, an overflow).
///
/// The time of the write itself, not of the round's start: stamped with the round's
/// start, every subscriber of a round shared its next deadline, so in a busy stream one
/// timer wakeup flushed nearly all of them back to back (~190 writes, 1.5–2 ms at 2,000
/// × 200) and their readers got them as one burst. Stamped as made, the subscribers of
/// a round fall due over as long as the round took, and the next turns write them in
/// smaller groups (at most [`DIRECT_SLICE`] each) spread over the interval; and no
/// subscriber is written again sooner than its interval after its last write really was.
fn write_directly(inner: &HubInner, round: &mut Round, events: &[SharedEvent]) {
    round.slots.clear();
    if round.targets.is_empty() {
        return;
    }
    // The events of one write, borrowed from `events` (one vector per round, not one per
    // subscriber).
    let mut batch: Vec<&Event> = Vec::with_capacity(DIRECT_MAX_EVENTS);
    let mut outcomes = [0u64; 3];
    for mut target in round.targets.drain(..) {
        batch.clear();
        batch.extend(target.picks.iter().map(|&i| &*events[i as usize]));
        let outcome = target.writer.try_write(&batch);
        let made = Instant::now();
        outcomes[outcome as usize] += 1;
        let mut queue = target.shared.queue.lock();
        queue.claimed = false;
        match outcome {
            Direct::Written | Direct::Handed => {
                queue.last_write = Some(made);
                if let Some(last) = batch.last() {
                    queue.direct_through = last.seq;
                    queue.direct_frames.sent(last);
                }
                queue.handed |= outcome == Direct::Handed;
            }
            Direct::Refused => {
                // Older than anything queued behind them this round. The queue may pass
                // its bounds by this round's direct events (at most `DIRECT_MAX_EVENTS`
                // and a queue's bytes); its next push then overflows it.
                queue.bytes += target.bytes;
                for &i in target.picks.iter().rev() {
                    queue.events.push_front(events[i as usize].clone());
                }
            }
        }
        let wake = !queue.events.is_empty() || queue.handed || queue.overflowed;
        drop(queue);
        if wake {
            target.shared.notify.notify_one();
        }
        target.picks.clear();
        round.spare.push(target.picks);
    }
    // Counted once a round: the counters are shared by every thread.
    let stats = &inner.stats;
    for (outcome, stat) in [
        (Direct::Written, &stats.direct_written),
        (Direct::Handed, &stats.direct_handed),
        (Direct::Refused, &stats.direct_refused),
    ] {
        if outcomes[outcome as usize] > 0 {
            stat.fetch_add(outcomes[outcome as usize], Ordering::Relaxed);
        }
    }
}

/// Writes the queued events of subscribers whose pacing interval is up
/// ([`Queue::deferred_until`]) while their session still waits with nothing in hand: at
/// most `DIRECT_MAX_EVENTS` each, through [`write_directly`] (the rest, if any, wakes the
/// session), and at most [`DIRECT_SLICE`] subscribers, in the order they were deferred; the
/// others stay due for the loop's next turns. A session that took its events meanwhile
/// (woken for something else) wrote them itself, paced from the same last write.
fn flush_deferred(inner: &HubInner, round: &mut Round) {
    let now = Instant::now();
    let mut next_flush = None;
    let mut deferred = std::mem::take(&mut round.deferred);
    // What the due subscribers' queues held, one after the other: the round's events,
    // each target's picks a run of places in it.
    let mut taken = std::mem::take(&mut round.taken);
    deferred.retain(|d| {
        if d.at > now || round.targets.len() >= DIRECT_SLICE {
            next_flush = Some(next_flush.map_or(d.at, |t: Instant| t.min(d.at)));
            return true;
        }
        let mut queue = d.shared.queue.lock();
        // Stale: taken by the session, or deferred again for a later time (whose entry
        // is further on in the list).
        if queue.deferred_until.is_none_or(|at| at > now) {
            return false;
        }
        queue.deferred_until = None;
        if !queue.parked || queue.claimed || queue.overflowed || queue.events.is_empty() {
            return false;
        }
        let from = taken.len();
        let bytes = queue.take_front(DIRECT_MAX_EVENTS, d.wire, &mut taken);
        queue.claimed = true;
        drop(queue);
        let mut picks = round.spare.pop().unwrap_or_default();
        // The taken events of one flush are at most `DIRECT_MAX_EVENTS` per subscriber,
        // and their places fit a u32 as a dispatch read's do.
        picks.extend((from..taken.len()).map(|i| i as u32));
        round.targets.push(Target {
            writer: d.writer.clone(),
            shared: d.shared.clone(),
            picks,
            bytes,
        });
        false
    });
    round.deferred = deferred;
    round.next_flush = next_flush;
    write_directly(inner, round, &taken);
    taken.clear();
    round.taken = taken;
}

pub(super) fn overflow(inner: &HubInner, state: &mut HubState, id: u64) {
    let HubState { entries, index, .. } = state;
    if let Some(entry) = entries.get_mut(&id) {
        if entry.live {
            entry.live = false;
            index.remove(id, &entry.filter);
            entry.shared.queue.lock().overflowed = true;
            entry.shared.notify.notify_one();
            inner.stats.overflows.fetch_add(1, Ordering::Relaxed);
        }
    }
}
