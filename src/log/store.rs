//! The durable event store contract, independent of where the bytes live.
//!
//! Owns: the [`EventStore`] trait and the plain types it speaks (bounds, segments, read
//! limits, payload selection, recovery report, errors). Must never: assume a local disk
//! (fjall is the one implementation today; the trait is the seam for another), hold
//! events in memory beyond a read, or hand out an event that is not durable.
//!
//! Unit of storage: a *segment* is a run of consecutive events (whole upstream frames)
//! written together; it is the unit of retention, so `delete_before` works at segment
//! granularity and may keep up to one segment below the requested seq.

use std::sync::Arc;

use crate::event::{Event, StampState};

/// An event shared between the hot tail, the writer and every reader: a handle on one
/// event of a *run*, events that live in one shared allocation (a decoded segment's
/// events; the events ingest made of one frame). It derefs to its [`Event`]. A clone
/// costs one refcount on the run, and the run, every event of it, is freed with its last
/// handle: a scan allocates once per decoded segment instead of once per event, and
/// dropping a segment sweeps contiguous memory. Holding one event of a run holds the
/// whole run (as holding one event of a decoded segment already held the segment's
/// message buffer), so runs are never longer than one segment or one frame.
#[derive(Clone)]
pub struct SharedEvent {
    run: Arc<Vec<Event>>,
    /// Always within `run` (checked where a handle is made).
    index: u32,
}

impl SharedEvent {
    /// A run of one event.
    pub fn new(event: Event) -> Self {
        Self {
            run: Arc::new(vec![event]),
            index: 0,
        }
    }

    /// One handle per event of `events`, all sharing one run (one allocation besides the
    /// vector's own).
    pub fn run(events: Vec<Event>) -> Vec<SharedEvent> {
        let run = Arc::new(events);
        Self::iter(&run, 0).collect()
    }

    /// The handle on event `index` of a shared `run`, `None` beyond it.
    #[inline]
    pub fn at(run: &Arc<Vec<Event>>, index: usize) -> Option<Self> {
        let index = u32::try_from(index).ok().filter(|_| index < run.len())?;
        Some(SharedEvent {
            run: Arc::clone(run),
            index,
        })
    }

    /// Handles on the events of `run` from index `from` on, in order.
    pub fn iter(run: &Arc<Vec<Event>>, from: usize) -> impl Iterator<Item = SharedEvent> + '_ {
        // A run never holds more than u32::MAX events (a segment's count is a u32).
        (from..run.len().min(u32::MAX as usize)).map(move |i| SharedEvent {
            run: Arc::clone(run),
            index: i as u32,
        })
    }

    /// The event itself: moved out when this is the last handle on its run, cloned
    /// otherwise.
    pub fn into_event(self) -> Event {
        let index = self.index as usize;
        match Arc::try_unwrap(self.run) {
            Ok(mut run) => run.swap_remove(index),
            Err(run) => run[index].clone(),
        }
    }

    /// Whether `a` and `b` are the same shared event (not merely equal ones).
    pub fn ptr_eq(a: &SharedEvent, b: &SharedEvent) -> bool {
        Arc::ptr_eq(&a.run, &b.run) && a.index == b.index
    }
}

impl From<Event> for SharedEvent {
    fn from(event: Event) -> Self {
        Self::new(event)
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = Event;

    #[inline]
    fn deref(&self) -> &Event {
        &self.run[self.index as usize]
    }
}

impl AsRef<Event> for SharedEvent {
    fn as_ref(&self) -> &Event {
        self
    }
}

impl std::fmt::Debug for SharedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// Which encoded payloads a read must fill in. Unrequested payloads come back empty
/// (`None` for v1/v2, an empty `raw_frame`), which lets a v1 replay skip the raw frames,
/// the bulk of the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payloads {
    pub v1: bool,
    pub v2: bool,
    pub raw: bool,
}

impl Payloads {
    pub const ALL: Payloads = Payloads {
        v1: true,
        v2: true,
        raw: true,
    };
    pub const V1: Payloads = Payloads {
        v1: true,
        v2: false,
        raw: false,
    };
    pub const V2: Payloads = Payloads {
        v1: false,
        v2: true,
        raw: false,
    };
    pub const RAW: Payloads = Payloads {
        v1: false,
        v2: false,
        raw: true,
    };

    /// What a reader of `wire` needs.
    pub const fn of_wire(wire: crate::wire::WireKind) -> Payloads {
        match wire {
            crate::wire::WireKind::JetstreamV1 => Payloads::V1,
            crate::wire::WireKind::JetstreamV2 => Payloads::V2,
            crate::wire::WireKind::Raw => Payloads::RAW,
        }
    }

    /// A read for the raw wire alone: it is bound by the raw floor (raw frames have their
    /// own retention). A read that also wants JSON is bound by the JSON floor only, and
    /// events below the raw floor come back without their raw frame.
    pub const fn raw_only(self) -> bool {
        self.raw && !self.v1 && !self.v2
    }
}

/// How much one read may return. At least one event is returned when one exists, even if
/// it alone exceeds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    pub max_events: usize,
    /// Sum of the requested payload bytes (a raw frame counts once, with its first event).
    pub max_bytes: usize,
}

impl ReadLimits {
    pub const fn events(max_events: usize) -> Self {
        Self {
            max_events,
            max_bytes: usize::MAX,
        }
    }
}

/// Oldest and newest events held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub oldest_seq: u64,
    pub oldest_time_us: i64,
    pub newest_seq: u64,
    pub newest_time_us: i64,
    pub oldest_upstream_seq: i64,
    pub newest_upstream_seq: i64,
}

impl Bounds {
    /// What the segments from `oldest` to `newest` (inclusive) hold.
    pub fn spanning(oldest: Segment, newest: Segment) -> Self {
        Bounds {
            oldest_seq: oldest.first_seq,
            oldest_time_us: oldest.first_time_us,
            newest_seq: newest.last_seq,
            newest_time_us: newest.last_time_us,
            oldest_upstream_seq: oldest.first_upstream_seq,
            newest_upstream_seq: newest.last_upstream_seq,
        }
    }
}

/// A retention unit, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time_us: i64,
    pub last_time_us: i64,
    pub first_upstream_seq: i64,
    pub last_upstream_seq: i64,
    /// Stored (compressed) bytes of this segment.
    pub bytes: u64,
    /// The part of `bytes` that is raw frames stored apart from the JSON (what raw
    /// retention can free before the segment goes); 0 when the frames share the JSON's
    /// file (segments written before raw frames had their own files).
    pub raw_bytes: u64,
}

/// One segment as the codec encoded it (`log::codec`), ready to be stored.
#[derive(Debug, Clone)]
pub struct EncodedSegment {
    pub info: Segment,
    pub events_value: Vec<u8>,
    pub frames_value: Vec<u8>,
    /// The zstd level its raw frames were compressed at.
    pub raw_level: i32,
}

/// Whether the log writer keeps up with the appends: how it took the group it hands to
/// [`EventStore::encode`], which may spend more CPU on a smaller encoding while it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterPace {
    /// The group was gathered over the commit interval with nothing waiting behind it.
    KeepingUp,
    /// A backlog is building: the group filled, an append waited for room in the queue,
    /// or its first event had waited longer than a commit interval to be taken.
    Behind,
}

/// What one [`EventStore::merge_small_segments`] step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStep {
    /// Small segments replaced.
    pub merged: u64,
    /// Segments written in their place.
    pub written: u64,
}

/// What opening a store found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments at the tail that failed verification and were removed.
    pub dropped_segments: u64,
    /// Events in those segments.
    pub dropped_events: u64,
    /// Human-readable notes on what was found (torn tail, resume record disagreement...).
    pub notes: Vec<String>,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        self.dropped_segments == 0 && self.notes.is_empty()
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The requested seq was deleted by retention (or never stored).
    #[error("seq {requested} is older than the oldest retained event {oldest}")]
    TooOld { requested: u64, oldest: u64 },
    /// Appended events do not continue the log's seq space.
    #[error("append out of order: expected seq {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("the log is closed")]
    Closed,
}

/// The durable store. Implementations are internally synchronized: one writer (the
/// group-commit thread), one retention task and any number of readers call concurrently.
pub trait EventStore: Send + Sync + 'static {
    /// Where stamping resumes: `next_seq` = last durable seq + 1, `upstream_cursor` = the
    /// upstream seq of the last durable event, as written by the last [`append`].
    ///
    /// [`append`]: EventStore::append
    fn resume_state(&self) -> StampState;

    /// Appends `events` (consecutive seqs continuing the store, whole frames) and `resume`
    /// in ONE atomic, durable step: after it returns, both survive a crash; if it fails or
    /// the process dies inside it, neither is visible after restart.
    fn append(&self, events: &[SharedEvent], resume: StampState) -> Result<(), LogError>;

    /// The CPU half of [`append`]: compresses `events` into stored segments without
    /// touching storage, so the writer can encode the next batch while the previous one
    /// commits. `pace` says whether the writer keeps up (the store may then spend more
    /// CPU for fewer bytes). Backends that encode inside `append` keep the default
    /// (nothing).
    ///
    /// [`append`]: EventStore::append
    fn encode(
        &self,
        events: &[SharedEvent],
        pace: WriterPace,
    ) -> Result<Vec<EncodedSegment>, LogError> {
        let _ = (events, pace);
        Ok(Vec::new())
    }

    /// Takes back a committed group's segments: a backend may keep their buffers for the
    /// segments it encodes next (fresh buffers cost page faults). The default drops them.
    fn recycle(&self, encoded: Vec<EncodedSegment>) {
        drop(encoded);
    }

    /// The I/O half: commits `events`, as `encoded` by [`encode`](EventStore::encode), and
    /// `resume`, with exactly the guarantees of [`append`](EventStore::append).
    fn append_encoded(
        &self,
        events: &[SharedEvent],
        encoded: &[EncodedSegment],
        resume: StampState,
    ) -> Result<(), LogError> {
        let _ = encoded;
        self.append(events, resume)
    }

    /// Events with seq >= `from_seq`, in order, starting exactly at `from_seq` unless it
    /// is beyond the newest (empty result). `TooOld` if `from_seq` is below the oldest.
    /// Shared: concurrent readers of a segment get the same events (a refcount each, no
    /// copy of their strings).
    fn read(
        &self,
        from_seq: u64,
        limits: ReadLimits,
        payloads: Payloads,
    ) -> Result<Vec<SharedEvent>, LogError>;

    /// The first seq whose `time_us` >= `time_us` (inclusive), `None` if all are older.
    fn seq_at_or_after_time(&self, time_us: i64) -> Result<Option<u64>, LogError>;

    /// The first seq whose upstream seq is > `upstream_seq` (exclusive), `None` if none.
    /// Assumes upstream seqs increase along sluice's seq space (one upstream numbering).
    fn seq_after_upstream(&self, upstream_seq: i64) -> Result<Option<u64>, LogError>;

    /// Deletes every whole segment whose last seq is < `seq`; returns events deleted.
    /// Must not rewrite retained data.
    fn delete_before(&self, seq: u64) -> Result<u64, LogError>;

    /// Drops every event held and makes `next_seq` (beyond the newest) the seq the next
    /// append starts at, durably: a cluster node that was away longer than the shared
    /// stream's window resumes where the stream starts. Backends without it refuse.
    fn restart_at(&self, next_seq: u64) -> Result<(), LogError> {
        let _ = next_seq;
        Err(LogError::Backend(
            "this store cannot move its seq space forward".into(),
        ))
    }

    /// Oldest and newest durable events, `None` when empty.
    fn bounds(&self) -> Option<Bounds>;

    /// Up to `max` segments, oldest first.
    fn segments(&self, max: usize) -> Vec<Segment>;

    /// Stored bytes of retained segments, raw frames held included.
    fn size_bytes(&self) -> u64;

    /// The part of [`size_bytes`](EventStore::size_bytes) that is raw frames stored apart
    /// from the JSON and still held (what raw retention counts). Zero for backends that
    /// keep frames with their events.
    fn raw_size_bytes(&self) -> u64 {
        0
    }

    /// Whether raw frames are being written past the page cache (`O_DIRECT`): the raw
    /// file written last was opened so, which needs the setting on, a file system that
    /// takes it, and no direct write refused since. False before this process wrote its
    /// first raw file, and for backends without raw files of their own.
    fn direct_raw_writes(&self) -> bool {
        false
    }

    /// Oldest and newest durable events whose raw frame is held, `None` when none is.
    /// Backends without raw retention hold every event's frame.
    fn raw_bounds(&self) -> Option<Bounds> {
        self.bounds()
    }

    /// Drops the raw frames of every whole segment whose last seq is < `seq`, keeping
    /// their JSON; returns the events whose frames were dropped. The new raw floor is
    /// durable before any frame's bytes go. Backends without raw retention drop nothing.
    fn delete_raw_before(&self, seq: u64) -> Result<u64, LogError> {
        let _ = seq;
        Ok(0)
    }

    /// One step of merging small segments (cut short by commits at the live rate) into
    /// full-size ones, so that a scan pays its per-segment work as rarely as on bulk-written
    /// data. Rewrites retained events without changing any of them; crash-safe like an
    /// append. Backends without it merge nothing.
    fn merge_small_segments(&self) -> Result<MergeStep, LogError> {
        Ok(MergeStep::default())
    }

    /// Bytes the backend may use beyond `size_bytes` (journals, not yet reclaimed files):
    /// retention keeps `size_bytes` under the cap minus this, so the total stays under the
    /// cap. Zero for backends without such overhead.
    fn overhead_bytes(&self) -> u64 {
        0
    }

    /// Segment reads that decoded, and those served by another read's decode (the
    /// embedded store's shared cache of decoded segments); zeros without such a cache.
    fn decoded_cache_counts(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Segments decoded ahead of the readers that then read them (the embedded store's
    /// read-ahead); zero without read-ahead.
    fn read_ahead_decodes(&self) -> u64 {
        0
    }

    /// Bytes actually used on the medium, when the backend can tell.
    fn disk_bytes(&self) -> u64 {
        self.size_bytes()
    }
}
