//! Fan-out: routes each logged event to the subscribers that want it.
//!
//! Owns the subscriber registry, the routing index (collection / namespace prefix / DID /
//! everyone), each subscriber's bounded queue of shared events, and the switch between the
//! live path and catch-up from the log. Must never: copy an event per subscriber (queues
//! hold `Arc`s of pre-encoded events), block on a subscriber, let a queue grow past its
//! bounds, or let a subscriber see a gap, a duplicate or a reordering.
//!
//! # Live and catch-up
//!
//! One dispatcher task follows the log and pushes each event into the queues of matching
//! *live* subscribers. A queue that would exceed its bounds is marked overflowed and its
//! subscriber leaves the index: under the default `catchup` policy it first drains what
//! its queue holds, then reads the log itself from the seq after the last one it saw, at
//! its own pace, and rejoins the index once it has seen everything the dispatcher has
//! dispatched (the check and the rejoin happen under the dispatcher's lock, so no event
//! falls between the two paths; any overlap is dropped by seq). Under `disconnect` it is
//! ended with `ConsumerTooSlow`. A subscriber that starts from a cursor begins in catch-up.

pub mod filter;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};

use crate::event::{Event, EventKind};
use crate::log::{LogError, LogReader, SharedEvent};
use crate::rate::{SharedBudget, TokenBucket};
use crate::wire::WireKind;
use filter::{collection_prefixes, Filter};

/// A filter's routing-index work that the index budget cannot pay for within the wait
/// allowed: nothing was reserved, and `would_wait` is how long it would have taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexBusy {
    pub would_wait: Duration,
}

/// Whether the event is sent on `wire` to a subscriber with `filter`. The raw wire sends
/// a frame once: with its first event, or with the first event that matches a collection
/// filter (the connection drops later events of the same frame).
fn visible(wire: WireKind, event: &Event, filter: &Filter) -> bool {
    match wire {
        WireKind::Raw if !filter.has_collections() => crate::wire::raw::frame_of(event).is_some(),
        WireKind::Raw => true,
        _ => wire.payload(event).is_some(),
    }
}

/// Which stored payloads a catch-up read of `wire` needs.
fn payloads(wire: WireKind) -> crate::log::Payloads {
    match wire {
        WireKind::JetstreamV1 => crate::log::Payloads::V1,
        WireKind::JetstreamV2 => crate::log::Payloads::V2,
        WireKind::Raw => crate::log::Payloads::RAW,
    }
}

/// What happens to a subscriber whose queue overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Lossless: leave the live path, read the log at its own pace, rejoin when caught up.
    Catchup,
    /// The strict relay behaviour: `ConsumerTooSlow`, then close.
    Disconnect,
}

impl std::str::FromStr for SlowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "catchup" => Ok(SlowPolicy::Catchup),
            "disconnect" => Ok(SlowPolicy::Disconnect),
            other => Err(format!(
                "slow-consumer policy must be catchup or disconnect, not {other:?}"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Per-subscriber queue bound, events.
    pub queue_max_events: usize,
    /// Per-subscriber queue bound, bytes of the subscriber's wire payload.
    pub queue_max_bytes: usize,
    /// Events read from the log per catch-up step.
    pub catchup_batch: usize,
    /// Bytes read from the log per catch-up step (at least one event). A subscriber holds
    /// its batch while writing it, and a batch read below the hot tail is its own copy, so
    /// this times the subscribers in catch-up bounds what catch-up keeps resident.
    pub catchup_batch_bytes: usize,
    /// Concurrent reads below the hot tail (cold replays), across all subscribers.
    pub cold_read_concurrency: usize,
    /// Per-connection ceiling while catching up, events per second.
    pub replay_events_per_sec: u64,
    /// Routing-index entries added or removed per second, hub-wide (burst as many): the
    /// bound on how long filter changes can hold the lock every dispatch needs.
    pub index_changes_per_sec: u64,
    /// The share of that one client IP may use (burst as many).
    pub index_changes_per_sec_per_ip: u64,
    /// Events catch-up reads may scan per second, hub-wide (burst as many), whether or
    /// not they match: the bound on the CPU replays take.
    pub scan_events_per_sec: u64,
    /// The share of that one client IP may use (burst as many).
    pub scan_events_per_sec_per_ip: u64,
}

/// The hub's server-wide budgets with their per-IP shares, per second: routing-index
/// changes and catch-up scans (see [`HubConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub index_total: u64,
    pub index_per_ip: u64,
    pub scan_total: u64,
    pub scan_per_ip: u64,
}

impl HubConfig {
    pub fn budgets(&self) -> Budgets {
        Budgets {
            index_total: self.index_changes_per_sec,
            index_per_ip: self.index_changes_per_sec_per_ip,
            scan_total: self.scan_events_per_sec,
            scan_per_ip: self.scan_events_per_sec_per_ip,
        }
    }
}

/// Longest a subscribe or filter change waits for the index budget; one that would wait
/// longer is refused (HTTP 503 or close 1013) instead of queueing without end.
pub const MAX_INDEX_WAIT: Duration = Duration::from_secs(5);

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue_max_events: 4096,
            queue_max_bytes: 8 * 1024 * 1024,
            catchup_batch: 512,
            catchup_batch_bytes: 1024 * 1024,
            cold_read_concurrency: 4,
            replay_events_per_sec: 200_000,
            index_changes_per_sec: 200_000,
            index_changes_per_sec_per_ip: 50_000,
            scan_events_per_sec: 1_000_000,
            scan_events_per_sec_per_ip: 200_000,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub overflows: AtomicU64,
    pub rejoins: AtomicU64,
    pub catchups_active: AtomicU64,
    pub cold_reads: AtomicU64,
    pub subscribers: [AtomicU64; 3],
    /// Subscribes and filter changes that waited for the index budget.
    pub index_waits: AtomicU64,
    /// Subscribes and filter changes refused because the wait would exceed
    /// [`MAX_INDEX_WAIT`].
    pub index_refusals: AtomicU64,
    /// Caught-up subscribers that stayed on the log one more round for want of budget.
    pub rejoins_deferred: AtomicU64,
}

impl HubStats {
    pub fn subscribers(&self, wire: WireKind) -> u64 {
        self.subscribers[wire.index()].load(Ordering::Relaxed)
    }
}

/// Why a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Its position fell out of retention; `oldest` is the oldest seq still held.
    TooOld { oldest: u64 },
    /// Queue overflow under the `disconnect` policy.
    TooSlow,
    /// The log closed (shutdown).
    Closed,
    /// The log failed to read.
    ReadFailed(String),
}

struct Queue {
    events: VecDeque<SharedEvent>,
    bytes: usize,
    overflowed: bool,
}

struct SubShared {
    queue: Mutex<Queue>,
    notify: Notify,
}

struct Entry {
    shared: Arc<SubShared>,
    /// Shared so that replacing it under the hub's lock is a pointer swap; the old one is
    /// dropped after the lock is released.
    filter: Arc<Filter>,
    wire: WireKind,
    /// Live subscribers are in the index; overflowed ones are not.
    live: bool,
    last_pushed: u64,
}

#[derive(Default)]
struct Index {
    everyone: Vec<u64>,
    by_did: HashMap<String, Vec<u64>>,
    by_collection: HashMap<String, Vec<u64>>,
    by_prefix: HashMap<String, Vec<u64>>,
    /// Collection-filtered subscribers (no DID filter): they still get non-commit events.
    non_commit: Vec<u64>,
}

fn add(list: &mut Vec<u64>, id: u64) {
    list.push(id);
}

fn remove(list: &mut Vec<u64>, id: u64) {
    if let Some(pos) = list.iter().position(|&x| x == id) {
        list.swap_remove(pos);
    }
}

fn remove_keyed(map: &mut HashMap<String, Vec<u64>>, key: &str, id: u64) {
    if let Some(list) = map.get_mut(key) {
        remove(list, id);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

impl Index {
    /// Keyed as `Filter::index_entries` counts, which prices this for the index budget.
    fn insert(&mut self, id: u64, filter: &Filter) {
        if !filter.dids.is_empty() {
            for did in &filter.dids {
                add(self.by_did.entry(did.clone()).or_default(), id);
            }
        } else if filter.has_collections() {
            for c in &filter.collections {
                add(self.by_collection.entry(c.clone()).or_default(), id);
            }
            for p in &filter.prefixes {
                add(self.by_prefix.entry(p.clone()).or_default(), id);
            }
            add(&mut self.non_commit, id);
        } else {
            add(&mut self.everyone, id);
        }
    }

    fn remove(&mut self, id: u64, filter: &Filter) {
        if !filter.dids.is_empty() {
            for did in &filter.dids {
                remove_keyed(&mut self.by_did, did, id);
            }
        } else if filter.has_collections() {
            for c in &filter.collections {
                remove_keyed(&mut self.by_collection, c, id);
            }
            for p in &filter.prefixes {
                remove_keyed(&mut self.by_prefix, p, id);
            }
            remove(&mut self.non_commit, id);
        } else {
            remove(&mut self.everyone, id);
        }
    }

    /// Calls `f` with every subscriber that may want the event (possibly twice; the caller
    /// dedups by seq). Cost is proportional to the candidates, not to all subscribers.
    fn candidates(&self, event: &Event, mut f: impl FnMut(u64)) {
        self.everyone.iter().for_each(|&id| f(id));
        if let Some(list) = self.by_did.get(&event.did) {
            list.iter().for_each(|&id| f(id));
        }
        match (&event.kind, &event.collection) {
            (EventKind::Commit, Some(collection)) => {
                if let Some(list) = self.by_collection.get(collection) {
                    list.iter().for_each(|&id| f(id));
                }
                if !self.by_prefix.is_empty() {
                    for prefix in collection_prefixes(collection) {
                        if let Some(list) = self.by_prefix.get(prefix) {
                            list.iter().for_each(|&id| f(id));
                        }
                    }
                }
            }
            _ => self.non_commit.iter().for_each(|&id| f(id)),
        }
    }
}

struct HubState {
    /// Every event up to this seq has been offered to the live subscribers.
    dispatched_through: u64,
    entries: HashMap<u64, Entry>,
    index: Index,
    next_id: u64,
}

struct HubInner {
    reader: LogReader,
    config: HubConfig,
    state: Mutex<HubState>,
    stats: HubStats,
    cold_reads: Semaphore,
    /// Bumped after each dispatched batch, for subscribers waiting to rejoin.
    dispatched: tokio::sync::watch::Sender<u64>,
    /// Index entries that may still change this second, in total and per client IP.
    /// Every insertion pays for itself and for its removal later, which cannot be refused
    /// (a disconnect, an overflow).
    index_budget: Mutex<SharedBudget<IpAddr>>,
    /// Events catch-up reads may still scan this second, in total and per client IP.
    scan_budget: Mutex<SharedBudget<IpAddr>>,
}

impl HubInner {
    /// Reserves the index work of putting `filter` into the index (and later taking it
    /// out): how long to wait before doing it, or the wait it would have been when that
    /// exceeds `max_wait` (nothing is reserved then; the caller counts why).
    fn reserve_index(
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
            .map_err(|would_wait| IndexBusy { would_wait });
        if reserved.is_ok_and(|wait| !wait.is_zero()) {
            self.stats.index_waits.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// [`HubInner::reserve_index`] for a client's subscribe or filter change: waits up to
    /// [`MAX_INDEX_WAIT`], and a refusal is counted.
    fn reserve_index_for_client(
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
}

/// The fan-out hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the first event logged after the subscription is made.
    Live,
    /// At this seq (inclusive), read from the log.
    From(u64),
}

impl Hub {
    /// Creates the hub and starts its dispatcher, which follows the log from its newest
    /// event. Must be called inside a tokio runtime.
    pub fn start(reader: LogReader, config: HubConfig) -> Hub {
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
            reader,
            config,
            state: Mutex::new(HubState {
                dispatched_through: newest,
                entries: HashMap::new(),
                index: Index::default(),
                next_id: 1,
            }),
            stats: HubStats::default(),
            dispatched,
        });
        tokio::spawn(dispatch_loop(inner.clone()));
        Hub { inner }
    }

    pub fn stats(&self) -> &HubStats {
        &self.inner.stats
    }

    /// Subscriber entries in the routing index (a subscriber counts once per key it is
    /// listed under): what dispatch visits at most, and what filter changes must leave
    /// exact.
    pub fn index_size(&self) -> usize {
        let state = self.inner.state.lock();
        let index = &state.index;
        let keyed = |map: &HashMap<String, Vec<u64>>| map.values().map(Vec::len).sum::<usize>();
        index.everyone.len()
            + index.non_commit.len()
            + keyed(&index.by_did)
            + keyed(&index.by_collection)
            + keyed(&index.by_prefix)
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
    pub fn set_budgets(&self, budgets: Budgets) {
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

    /// Registers a subscriber. Callers reserve its index work first
    /// ([`Hub::reserve_subscribe`]).
    pub fn subscribe(
        &self,
        wire: WireKind,
        filter: Filter,
        policy: SlowPolicy,
        start: Start,
    ) -> Subscription {
        let shared = Arc::new(SubShared {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                bytes: 0,
                overflowed: false,
            }),
            notify: Notify::new(),
        });
        let mut state = self.inner.state.lock();
        let id = state.next_id;
        state.next_id += 1;
        let (mode, seen_through, live) = match start {
            // Live means "after what is logged now", not "after what is dispatched": the
            // dispatcher can trail the log (never lead it), and events logged before the
            // connection are not live to it.
            Start::Live => (Mode::Live, self.inner.reader.newest_seq(), true),
            Start::From(seq) => (Mode::CatchUp { next: seq.max(1) }, seq.max(1) - 1, false),
        };
        if live {
            state.index.insert(id, &filter);
        } else {
            self.inner
                .stats
                .catchups_active
                .fetch_add(1, Ordering::Relaxed);
        }
        state.entries.insert(
            id,
            Entry {
                shared: shared.clone(),
                filter: Arc::new(filter.clone()),
                wire,
                live,
                last_pushed: seen_through,
            },
        );
        drop(state);
        self.inner.stats.subscribers[wire.index()].fetch_add(1, Ordering::Relaxed);
        Subscription {
            hub: self.inner.clone(),
            id,
            shared,
            wire,
            filter,
            policy,
            mode,
            seen_through,
            tokens: TokenBucket::new(
                self.inner.config.replay_events_per_sec as f64,
                self.inner.config.replay_events_per_sec as f64,
            ),
            peer: None,
        }
    }
}

async fn dispatch_loop(inner: Arc<HubInner>) {
    let mut newest = inner.reader.watch_newest();
    loop {
        let from = inner.state.lock().dispatched_through + 1;
        if inner.reader.newest_seq() < from {
            if newest.changed().await.is_err() {
                return;
            }
            continue;
        }
        match inner.reader.read_from(from, 1024, 64 * 1024 * 1024) {
            Ok(events) => dispatch(&inner, &events),
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

fn dispatch(inner: &HubInner, events: &[SharedEvent]) {
    let mut state = inner.state.lock();
    let mut overflowed = Vec::new();
    for event in events {
        if event.seq <= state.dispatched_through {
            continue;
        }
        let HubState { entries, index, .. } = &mut *state;
        index.candidates(event, |id| {
            let Some(entry) = entries.get_mut(&id) else {
                return;
            };
            if entry.last_pushed >= event.seq || !entry.live {
                return;
            }
            entry.last_pushed = event.seq;
            if !entry.filter.matches(event) || !visible(entry.wire, event, &entry.filter) {
                return;
            }
            let size = entry.wire.payload(event).map_or(0, Bytes::len);
            let mut queue = entry.shared.queue.lock();
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
            drop(queue);
            entry.shared.notify.notify_one();
        });
        for id in overflowed.drain(..) {
            overflow(inner, &mut state, id);
        }
        state.dispatched_through = event.seq;
    }
    let through = state.dispatched_through;
    drop(state);
    inner.dispatched.send_replace(through);
}

fn overflow(inner: &HubInner, state: &mut HubState, id: u64) {
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

/// One subscriber's view of the stream. Dropping it unregisters the subscriber.
pub struct Subscription {
    hub: Arc<HubInner>,
    id: u64,
    shared: Arc<SubShared>,
    wire: WireKind,
    filter: Filter,
    policy: SlowPolicy,
    mode: Mode,
    /// Every event up to this seq has been delivered or filtered out.
    seen_through: u64,
    /// Paces this connection's catch-up reads (`--replay-events-per-sec`).
    tokens: TokenBucket,
    /// The client's address: its share of the index and scan budgets.
    peer: Option<IpAddr>,
}

impl Subscription {
    pub fn wire(&self) -> WireKind {
        self.wire
    }

    pub fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Live)
    }

    /// The last seq delivered or filtered out: where a resume would continue from.
    pub fn seen_through(&self) -> u64 {
        self.seen_through
    }

    /// Reserves the index work of replacing the filter with `filter`: how long to wait
    /// before [`Subscription::set_filter`], or (nothing reserved) the wait over
    /// [`MAX_INDEX_WAIT`] it would have been. The old filter's removal was paid when it
    /// went in.
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
        let shared = Arc::new(filter.clone());
        let old = std::mem::replace(&mut self.filter, filter);
        let new = &self.filter;
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
                std::mem::replace(&mut entry.filter, shared)
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
                    remove_keyed(&mut index.by_did, did, id);
                }
                return entries
                    .get_mut(&id)
                    .map(|e| std::mem::replace(&mut e.filter, shared));
            }
            for did in chunk {
                add(index.by_did.entry((*did).clone()).or_default(), id);
            }
        }
        let (retired, live) = {
            let mut state = self.hub.state.lock();
            match state.entries.get_mut(&id) {
                Some(entry) => (
                    Some(std::mem::replace(&mut entry.filter, shared)),
                    entry.live,
                ),
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
                remove_keyed(&mut state.index.by_did, did, id);
            }
        }
        retired
    }

    /// The next events for this subscriber, in seq order, at most `max`. Waits while there
    /// are none. Never returns an empty batch.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<SharedEvent>, End> {
        let max = max.max(1);
        loop {
            match self.mode {
                Mode::Live => {
                    let (batch, drained_overflow) = self.take_queued(max);
                    if !batch.is_empty() {
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
                    let events = self.read_log(next, max).await?;
                    let Some(last) = events.last() else {
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
                    let last_seq = last.seq;
                    let wanted: Vec<SharedEvent> = events
                        .into_iter()
                        .filter(|e| {
                            e.seq > self.seen_through
                                && self.filter.matches(e)
                                && visible(self.wire, e, &self.filter)
                        })
                        .collect();
                    self.seen_through = self.seen_through.max(last_seq);
                    self.mode = Mode::CatchUp { next: last_seq + 1 };
                    if !wanted.is_empty() {
                        return Ok(wanted);
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
            Mode::Live => self.take_queued(max.max(1)).0,
            Mode::CatchUp { .. } => Vec::new(),
        }
    }

    /// Takes up to `max` queued events newer than `seen_through`, and whether the queue
    /// had overflowed and is now empty (time to switch to catch-up).
    fn take_queued(&mut self, max: usize) -> (Vec<SharedEvent>, bool) {
        let (mut batch, drained_overflow) = {
            let mut queue = self.shared.queue.lock();
            let n = queue.events.len().min(max);
            let batch: Vec<SharedEvent> = queue.events.drain(..n).collect();
            let freed: usize = batch
                .iter()
                .map(|e| self.wire.payload(e).map_or(0, Bytes::len))
                .sum();
            queue.bytes = queue.bytes.saturating_sub(freed);
            (batch, queue.overflowed && queue.events.is_empty())
        };
        batch.retain(|e| e.seq > self.seen_through);
        if let Some(last) = batch.last() {
            self.seen_through = last.seq;
        }
        (batch, drained_overflow)
    }

    async fn read_log(&mut self, next: u64, max: usize) -> Result<Vec<SharedEvent>, End> {
        let max = max.min(self.hub.config.catchup_batch.max(1));
        // Paid for every event the read may scan, matched or not: a filter that matches
        // nothing costs the same CPU as one that matches everything. First this
        // connection's rate and its address's share, then (once those are paid) the
        // server's total: an address with many replays queues on its own share and
        // takes from the total only at that share's pace.
        let wait = self.tokens.take_on_credit(max as f64).max(
            self.hub
                .scan_budget
                .lock()
                .take_share_on_credit(self.peer, max as f64),
        );
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let wait = self.hub.scan_budget.lock().take_total_on_credit(max as f64);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let reader = self.hub.reader.clone();
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
            let payloads = payloads(self.wire);
            tokio::task::spawn_blocking(move || reader.read_from_with(next, limits, payloads))
                .await
                .map_err(|e| End::ReadFailed(e.to_string()))?
        } else {
            reader.read_from(next, max, self.hub.config.catchup_batch_bytes)
        };
        match result {
            Ok(events) => Ok(events),
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
        }
        entry.live = true;
        entry.last_pushed = self.seen_through;
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
