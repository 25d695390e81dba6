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

mod catchup;
pub mod filter;
mod hub;
mod index;
mod subscription;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::event::Event;
use crate::wire::raw::FrameOnce;
use crate::wire::WireKind;

pub use catchup::{
    CatchupPool, CatchupThreads, PaceCost, PoolError, PoolStats, DEFAULT_PACE_BYTES_PER_SEC,
    DEFAULT_PACE_EVENTS_PER_SEC,
};
pub use hub::Hub;
pub use subscription::{Subscription, INDEX_STEP};

/// How a direct write from the dispatcher went (see [`DirectWrite`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// All of it is on the wire.
    Written,
    /// Part of it is; the connection holds the rest, which its session writes before
    /// anything else, under its write timeout. Counts as delivered.
    Handed,
    /// None of it (the socket would block, or the connection is closing or has a write
    /// of its own under way): the events go back to the subscriber's queue, in order.
    Refused,
}

/// A live subscriber's connection as the dispatcher writes to it directly: while the
/// subscriber's queue is empty and its session waits with nothing in hand, the
/// dispatcher encodes and writes the events itself (one non-blocking write, no task
/// woken), and hands over to the session only when the socket would block. Defined here
/// so the fan-out reaches the wire's encoding without importing it; the http layer
/// implements it.
pub trait DirectWrite: Send + Sync {
    /// Writes `events` (in seq order, at least one) without blocking. They are borrowed
    /// from the dispatcher's round: a delivery takes no reference on a shared event.
    fn try_write(&self, events: &[&Event]) -> Direct;
}

/// A filter's routing-index work that the index budget cannot pay for within the wait
/// allowed: nothing was reserved, and `would_wait` is how long it would have taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexBusy {
    pub would_wait: Duration,
}

/// Whether an event a subscriber's filter matched is sent on its `wire`: when the wire
/// carries the event, and on the raw wire only as the first of its frame's events this
/// subscriber is shown (`frames` is that subscriber's record; see [`FrameOnce`]). The
/// live path and catch-up both decide by this.
fn visible(wire: WireKind, event: &Event, frames: &mut FrameOnce) -> bool {
    match wire {
        WireKind::Raw => frames.first_sight(event),
        _ => wire.payload(event).is_some(),
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
    /// The catch-up pool's threads and their niceness ([`CatchupPool`]).
    pub catchup: CatchupThreads,
}

/// The hub's server-wide budgets with their per-IP shares, per second: routing-index
/// changes and catch-up scans; and the per-connection replay rate new subscriptions get
/// (see [`HubConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub index_total: u64,
    pub index_per_ip: u64,
    pub scan_total: u64,
    pub scan_per_ip: u64,
    pub replay_per_conn: u64,
}

impl HubConfig {
    pub fn budgets(&self) -> Budgets {
        Budgets {
            index_total: self.index_changes_per_sec,
            index_per_ip: self.index_changes_per_sec_per_ip,
            scan_total: self.scan_events_per_sec,
            scan_per_ip: self.scan_events_per_sec_per_ip,
            replay_per_conn: self.replay_events_per_sec,
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
            scan_events_per_sec: 100_000,
            scan_events_per_sec_per_ip: 50_000,
            catchup: CatchupThreads::default(),
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
    /// Direct writes from the dispatcher ([`DirectWrite`]), by outcome: written whole,
    /// written in part (the rest handed to the session), refused (the events queued).
    pub direct_written: AtomicU64,
    pub direct_handed: AtomicU64,
    pub direct_refused: AtomicU64,
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

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the first event logged after the subscription is made.
    Live,
    /// At this seq (inclusive), read from the log.
    From(u64),
}
