//! The embedded [`EventStore`]: fjall (a pure-Rust LSM tree) under the data directory.
//!
//! Owns: the on-disk layout and its crash recovery. Must never: let the resume record
//! and the events it covers be written in separate steps, rewrite retained data to free
//! space, or refuse to open because the tail is torn (it is verified and truncated).
//!
//! Layout: one fjall keyspace with four partitions, all keyed by a segment's first seq
//! (big-endian, so key order is seq order):
//! - `events` and `frames` (key-value separated: values live in append-only blob files,
//!   which are dropped whole once every value in them is deleted, so retention never
//!   copies retained data): the two values of [`codec`](super::codec);
//! - `index`: the [`Segment`] summary, loaded into memory at open (one small entry per
//!   ~256 KiB segment: ~80,000 entries for 20 GiB) for lookups by seq, time and upstream seq;
//! - `state`: the resume record (`next_seq`, `last_time_us`, upstream cursor).
//!
//! One [`EventStore::append`] is one fjall batch across the four partitions followed by a
//! journal fsync: atomic and durable together. Recovery: fjall replays its journal and
//! drops a torn last batch; then the newest segment is fully decoded (zstd checksums) and
//! dropped while it fails, and the resume record is checked against it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use fjall::{
    Config, GarbageCollection, Keyspace, KvSeparationOptions, PartitionCreateOptions,
    PartitionHandle, PersistMode,
};

use crate::event::Event;
use crate::ingest::StampState;

use super::codec::{self, Compression, Encoder};
use super::store::{
    Bounds, EventStore, LogError, Payloads, ReadLimits, RecoveryReport, Segment, SharedEvent,
};

const RESUME_KEY: &[u8] = b"resume";
const SEGMENT_ENTRY: usize = 7 * 8;

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct FjallConfig {
    pub dir: PathBuf,
    /// Uncompressed bytes per segment (cut at frame boundaries, and at every commit).
    pub segment_target_bytes: usize,
    /// Blob file size: the granularity at which deleted data is reclaimed.
    pub blob_file_bytes: u64,
    /// Journal budget before memtables are flushed (fjall's minimum is 24 MiB).
    pub max_journal_bytes: u64,
    /// Block and blob cache.
    pub cache_bytes: u64,
    /// Memtable size of the blob partitions: data leaves the journal for blob files when
    /// a memtable of this size is flushed.
    pub memtable_bytes: u32,
    pub compression: Compression,
}

impl FjallConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_target_bytes: 256 * 1024,
            blob_file_bytes: 64 * 1024 * 1024,
            max_journal_bytes: 128 * 1024 * 1024,
            cache_bytes: 64 * 1024 * 1024,
            memtable_bytes: 32 * 1024 * 1024,
            compression: Compression::default(),
        }
    }
}

pub struct FjallStore {
    keyspace: Keyspace,
    events: PartitionHandle,
    frames: PartitionHandle,
    index: PartitionHandle,
    state: PartitionHandle,
    segments: RwLock<VecDeque<Segment>>,
    resume: Mutex<StampState>,
    encoder: Mutex<Encoder>,
    stored_bytes: AtomicU64,
    config: FjallConfig,
}

fn backend(e: impl std::fmt::Display) -> LogError {
    LogError::Backend(e.to_string())
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn encode_segment(s: &Segment) -> [u8; SEGMENT_ENTRY] {
    let mut out = [0u8; SEGMENT_ENTRY];
    let fields = [
        s.first_seq,
        s.last_seq,
        s.first_time_us as u64,
        s.last_time_us as u64,
        s.first_upstream_seq as u64,
        s.last_upstream_seq as u64,
        s.bytes,
    ];
    for (chunk, v) in out.chunks_exact_mut(8).zip(fields) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode_segment(b: &[u8]) -> Option<Segment> {
    if b.len() != SEGMENT_ENTRY {
        return None;
    }
    let mut f = [0u64; 7];
    for (v, chunk) in f.iter_mut().zip(b.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(chunk);
        *v = u64::from_le_bytes(a);
    }
    Some(Segment {
        first_seq: f[0],
        last_seq: f[1],
        first_time_us: f[2] as i64,
        last_time_us: f[3] as i64,
        first_upstream_seq: f[4] as i64,
        last_upstream_seq: f[5] as i64,
        bytes: f[6],
    })
}

fn encode_resume(s: &StampState) -> [u8; 25] {
    let mut out = [0u8; 25];
    out[0..8].copy_from_slice(&s.next_seq.to_le_bytes());
    out[8..16].copy_from_slice(&s.last_time_us.to_le_bytes());
    out[16] = u8::from(s.upstream_cursor.is_some());
    out[17..25].copy_from_slice(&s.upstream_cursor.unwrap_or(0).to_le_bytes());
    out
}

fn decode_resume(b: &[u8]) -> Option<StampState> {
    if b.len() != 25 {
        return None;
    }
    let u = |r: std::ops::Range<usize>| -> Option<[u8; 8]> { b.get(r)?.try_into().ok() };
    Some(StampState {
        next_seq: u64::from_le_bytes(u(0..8)?),
        last_time_us: i64::from_le_bytes(u(8..16)?),
        upstream_cursor: match b[16] {
            0 => None,
            1 => Some(i64::from_le_bytes(u(17..25)?)),
            _ => return None,
        },
    })
}

fn resume_after(s: &Segment) -> StampState {
    StampState {
        next_seq: s.last_seq.saturating_add(1),
        last_time_us: s.last_time_us,
        upstream_cursor: Some(s.last_upstream_seq),
    }
}

impl FjallStore {
    /// Opens or creates the store, recovering from a torn tail. Never fails because of
    /// the tail: what does not verify is dropped and reported.
    pub fn open(config: FjallConfig) -> Result<(Self, RecoveryReport), LogError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| {
            LogError::Backend(format!("cannot create {}: {e}", config.dir.display()))
        })?;
        let keyspace = Config::new(&config.dir)
            .max_journaling_size(config.max_journal_bytes.max(24 * 1024 * 1024))
            .cache_size(config.cache_bytes)
            .open()
            .map_err(|e| {
                LogError::Backend(format!(
                    "cannot open the event store in {}: {e}",
                    config.dir.display()
                ))
            })?;
        let kv = || {
            PartitionCreateOptions::default()
                .max_memtable_size(config.memtable_bytes.max(1024 * 1024))
                .with_kv_separation(
                    KvSeparationOptions::default()
                        .file_target_size(config.blob_file_bytes.max(1024 * 1024))
                        .separation_threshold(512),
                )
        };
        let events = keyspace.open_partition("events", kv()).map_err(backend)?;
        let frames = keyspace.open_partition("frames", kv()).map_err(backend)?;
        let index = keyspace
            .open_partition("index", PartitionCreateOptions::default())
            .map_err(backend)?;
        let state = keyspace
            .open_partition("state", PartitionCreateOptions::default())
            .map_err(backend)?;
        let mut report = RecoveryReport::default();
        let mut segments = VecDeque::new();
        for item in index.iter() {
            let (k, v) = item.map_err(backend)?;
            match decode_segment(&v) {
                Some(s) if k.as_ref() == key(s.first_seq) => {
                    if let Some(prev) = segments.back().map(|p: &Segment| p.last_seq) {
                        if s.first_seq != prev + 1 {
                            report.notes.push(format!(
                                "index jumps from seq {prev} to {}: events in between are lost",
                                s.first_seq
                            ));
                        }
                    }
                    segments.push_back(s)
                }
                _ => report
                    .notes
                    .push("unreadable index entry skipped".to_string()),
            }
        }
        let store = Self {
            keyspace,
            events,
            frames,
            index,
            state,
            stored_bytes: AtomicU64::new(segments.iter().map(|s| s.bytes).sum()),
            segments: RwLock::new(segments),
            resume: Mutex::new(StampState::fresh()),
            encoder: Mutex::new(Encoder::new(config.compression)?),
            config,
        };
        store.verify_tail(&mut report)?;
        let resume = store.recover_resume(&mut report)?;
        *store.resume.lock().map_err(|_| backend("poisoned"))? = resume;
        Ok((store, report))
    }

    fn verify_segment(&self, s: &Segment) -> Result<(), LogError> {
        let ev = self
            .events
            .get(key(s.first_seq))
            .map_err(backend)?
            .ok_or_else(|| LogError::Corrupt("events value missing".into()))?;
        let fr = self
            .frames
            .get(key(s.first_seq))
            .map_err(backend)?
            .ok_or_else(|| LogError::Corrupt("frames value missing".into()))?;
        let decoded = codec::decode(&ev, Some(&fr), Payloads::ALL)?;
        match (decoded.first(), decoded.last()) {
            (Some(a), Some(b))
                if a.seq == s.first_seq
                    && b.seq == s.last_seq
                    && b.time_us == s.last_time_us
                    && b.upstream_seq == s.last_upstream_seq =>
            {
                Ok(())
            }
            _ => Err(LogError::Corrupt(
                "segment does not match its index entry".into(),
            )),
        }
    }

    /// Drops newest segments until one decodes completely.
    fn verify_tail(&self, report: &mut RecoveryReport) -> Result<(), LogError> {
        loop {
            let Some(last) = self
                .segments
                .read()
                .map_err(|_| backend("poisoned"))?
                .back()
                .copied()
            else {
                return Ok(());
            };
            match self.verify_segment(&last) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let msg = format!(
                        "newest segment (seq {}..={}) failed verification and was dropped: {e}",
                        last.first_seq, last.last_seq
                    );
                    tracing::warn!("{msg}");
                    report.notes.push(msg);
                    report.dropped_segments += 1;
                    report.dropped_events += last.last_seq - last.first_seq + 1;
                    let mut batch = self.keyspace.batch();
                    batch.remove(&self.events, key(last.first_seq));
                    batch.remove(&self.frames, key(last.first_seq));
                    batch.remove(&self.index, key(last.first_seq));
                    batch.commit().map_err(backend)?;
                    self.keyspace
                        .persist(PersistMode::SyncAll)
                        .map_err(backend)?;
                    self.segments
                        .write()
                        .map_err(|_| backend("poisoned"))?
                        .pop_back();
                    self.stored_bytes.fetch_sub(last.bytes, Ordering::Relaxed);
                }
            }
        }
    }

    fn recover_resume(&self, report: &mut RecoveryReport) -> Result<StampState, LogError> {
        let stored = match self.state.get(RESUME_KEY).map_err(backend)? {
            Some(v) => {
                let r = decode_resume(&v);
                if r.is_none() {
                    report.notes.push("resume record unreadable".into());
                }
                r
            }
            None => None,
        };
        let last = self
            .segments
            .read()
            .map_err(|_| backend("poisoned"))?
            .back()
            .copied();
        let resume = match (stored, last) {
            (Some(r), Some(last)) if r.next_seq == last.last_seq + 1 => return Ok(r),
            (Some(r), Some(last)) => {
                report.notes.push(format!(
                    "resume record (next seq {}) disagrees with the newest segment (last seq {}); \
                     resuming after the segment",
                    r.next_seq, last.last_seq
                ));
                resume_after(&last)
            }
            (Some(r), None) => return Ok(r),
            (None, Some(last)) => {
                report
                    .notes
                    .push("resume record missing; derived from the newest segment".into());
                resume_after(&last)
            }
            (None, None) => return Ok(StampState::fresh()),
        };
        self.state
            .insert(RESUME_KEY, encode_resume(&resume))
            .map_err(backend)?;
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        Ok(resume)
    }

    fn locate(&self, pred: impl Fn(&Segment) -> bool) -> Result<Option<Segment>, LogError> {
        let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
        let idx = segs.partition_point(|s| !pred(s));
        Ok(segs.get(idx).copied())
    }

    fn decode_meta(&self, s: &Segment) -> Result<Option<Vec<Event>>, LogError> {
        match self.events.get(key(s.first_seq)).map_err(backend)? {
            Some(v) => Ok(Some(codec::decode(
                &v,
                None,
                Payloads {
                    v1: false,
                    v2: false,
                    raw: false,
                },
            )?)),
            None => Ok(None),
        }
    }

    fn oldest_or_next(&self) -> u64 {
        match self.segments.read().ok().and_then(|s| s.front().copied()) {
            Some(s) => s.first_seq,
            None => self.resume.lock().map(|r| r.next_seq).unwrap_or(1),
        }
    }
}

impl EventStore for FjallStore {
    fn resume_state(&self) -> StampState {
        self.resume.lock().map(|r| *r).unwrap_or_default()
    }

    fn append(&self, events: &[SharedEvent], resume: StampState) -> Result<(), LogError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let expected = self.resume_state().next_seq;
        if first.seq != expected {
            return Err(LogError::OutOfOrder {
                expected,
                got: first.seq,
            });
        }
        let mut encoded = Vec::new();
        {
            let mut encoder = self.encoder.lock().map_err(|_| backend("poisoned"))?;
            for part in codec::split_segments(events, self.config.segment_target_bytes) {
                encoded.push(encoder.encode(part)?);
            }
        }
        let mut batch = self.keyspace.batch();
        for seg in &encoded {
            let k = key(seg.info.first_seq);
            batch.insert(&self.events, k, seg.events_value.as_slice());
            batch.insert(&self.frames, k, seg.frames_value.as_slice());
            batch.insert(&self.index, k, encode_segment(&seg.info));
        }
        batch.insert(&self.state, RESUME_KEY, encode_resume(&resume));
        batch.commit().map_err(backend)?;
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        let mut segs = self.segments.write().map_err(|_| backend("poisoned"))?;
        for seg in &encoded {
            self.stored_bytes
                .fetch_add(seg.info.bytes, Ordering::Relaxed);
            segs.push_back(seg.info);
        }
        drop(segs);
        *self.resume.lock().map_err(|_| backend("poisoned"))? = resume;
        Ok(())
    }

    fn read(
        &self,
        from_seq: u64,
        limits: ReadLimits,
        payloads: Payloads,
    ) -> Result<Vec<Event>, LogError> {
        let todo: Vec<u64> = {
            let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
            let Some(front) = segs.front() else {
                let next = self.resume_state().next_seq;
                return if from_seq < next {
                    Err(LogError::TooOld {
                        requested: from_seq,
                        oldest: next,
                    })
                } else {
                    Ok(Vec::new())
                };
            };
            if from_seq < front.first_seq {
                return Err(LogError::TooOld {
                    requested: from_seq,
                    oldest: front.first_seq,
                });
            }
            let idx = segs.partition_point(|s| s.last_seq < from_seq);
            // Enough segments for the event limit, assuming at least one event each.
            segs.iter()
                .skip(idx)
                .take(limits.max_events.clamp(1, 4096))
                .map(|s| s.first_seq)
                .collect()
        };
        let mut out: Vec<Event> = Vec::new();
        let mut bytes = 0usize;
        for first in todo {
            let Some(ev) = self.events.get(key(first)).map_err(backend)? else {
                if out.is_empty() {
                    return Err(LogError::TooOld {
                        requested: from_seq,
                        oldest: self.oldest_or_next(),
                    });
                }
                break;
            };
            let fr = if payloads.raw {
                match self.frames.get(key(first)).map_err(backend)? {
                    Some(f) => Some(f),
                    None => break,
                }
            } else {
                None
            };
            let mut prev_upstream = None;
            for event in codec::decode(&ev, fr.as_deref(), payloads)? {
                let first_of_frame =
                    event.op_index == 0 || prev_upstream != Some(event.upstream_seq);
                prev_upstream = Some(event.upstream_seq);
                if event.seq < from_seq {
                    continue;
                }
                let size = codec::payload_bytes(&event, first_of_frame);
                if out.len() >= limits.max_events
                    || (!out.is_empty() && bytes.saturating_add(size) > limits.max_bytes)
                {
                    return Ok(out);
                }
                bytes += size;
                out.push(event);
            }
        }
        Ok(out)
    }

    fn seq_at_or_after_time(&self, time_us: i64) -> Result<Option<u64>, LogError> {
        // Deleted concurrently: retry on the next candidate (bounded by segment count).
        for _ in 0..64 {
            let Some(seg) = self.locate(|s| s.last_time_us >= time_us)? else {
                return Ok(None);
            };
            if seg.first_time_us >= time_us {
                return Ok(Some(seg.first_seq));
            }
            if let Some(events) = self.decode_meta(&seg)? {
                return Ok(events.iter().find(|e| e.time_us >= time_us).map(|e| e.seq));
            }
        }
        Err(backend("segments vanish faster than they can be read"))
    }

    fn seq_after_upstream(&self, upstream_seq: i64) -> Result<Option<u64>, LogError> {
        for _ in 0..64 {
            let Some(seg) = self.locate(|s| s.last_upstream_seq > upstream_seq)? else {
                return Ok(None);
            };
            if seg.first_upstream_seq > upstream_seq {
                return Ok(Some(seg.first_seq));
            }
            if let Some(events) = self.decode_meta(&seg)? {
                return Ok(events
                    .iter()
                    .find(|e| e.upstream_seq > upstream_seq)
                    .map(|e| e.seq));
            }
        }
        Err(backend("segments vanish faster than they can be read"))
    }

    fn delete_before(&self, seq: u64) -> Result<u64, LogError> {
        let doomed: Vec<Segment> = {
            let mut segs = self.segments.write().map_err(|_| backend("poisoned"))?;
            let n = segs.partition_point(|s| s.last_seq < seq);
            segs.drain(..n).collect()
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for chunk in doomed.chunks(1024) {
            let mut batch = self.keyspace.batch();
            for s in chunk {
                batch.remove(&self.events, key(s.first_seq));
                batch.remove(&self.frames, key(s.first_seq));
                batch.remove(&self.index, key(s.first_seq));
                deleted += s.last_seq - s.first_seq + 1;
                self.stored_bytes.fetch_sub(s.bytes, Ordering::Relaxed);
            }
            batch.commit().map_err(backend)?;
        }
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        // Blob files whose every value is now deleted are removed whole; nothing retained
        // is rewritten.
        for p in [&self.events, &self.frames] {
            p.gc_scan().map_err(backend)?;
            p.gc_drop_stale_segments().map_err(backend)?;
        }
        Ok(deleted)
    }

    fn bounds(&self) -> Option<Bounds> {
        let segs = self.segments.read().ok()?;
        let (a, b) = (segs.front()?, segs.back()?);
        Some(Bounds {
            oldest_seq: a.first_seq,
            oldest_time_us: a.first_time_us,
            newest_seq: b.last_seq,
            newest_time_us: b.last_time_us,
            oldest_upstream_seq: a.first_upstream_seq,
            newest_upstream_seq: b.last_upstream_seq,
        })
    }

    fn segments(&self, max: usize) -> Vec<Segment> {
        self.segments
            .read()
            .map(|s| s.iter().take(max).copied().collect())
            .unwrap_or_default()
    }

    fn size_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    fn overhead_bytes(&self) -> u64 {
        // Journals before their memtables are flushed, plus one partly deleted blob file
        // per blob partition.
        self.config
            .max_journal_bytes
            .max(24 * 1024 * 1024)
            .saturating_add(2 * self.config.blob_file_bytes)
    }

    fn disk_bytes(&self) -> u64 {
        self.keyspace.disk_space()
    }
}
