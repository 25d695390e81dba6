//! The embedded [`EventStore`]: append-only segment data files plus a fjall keyspace (a
//! pure-Rust LSM tree) for the index and the resume record, under the data directory.
//!
//! Owns: the on-disk layout and its crash recovery. Must never: let the resume record
//! and the events it covers become visible in separate steps, rewrite retained data to
//! free space, or refuse to open because the tail is torn (it is verified and truncated).
//!
//! Layout, under `dir`:
//! - `data/<id>.seg`: append-only data files (rolled at `blob_file_bytes`) holding each
//!   segment's two values of [`codec`](super::codec) back to back, written ONCE. Retention
//!   deletes a file whole once every segment in it is deleted, so it never copies
//!   retained data.
//! - a fjall keyspace with two small partitions: `segments`, keyed by a segment's first seq
//!   (big-endian, so key order is seq order), holding its [`Segment`] summary and where its
//!   values are (file, offset, lengths), loaded into memory at open (one small entry per
//!   segment: ~30,000 entries for 20 GiB) for lookups by seq, time and upstream seq; and
//!   `state`, the resume record (`next_seq`, `last_time_us`, upstream cursor).
//!
//! One commit ([`EventStore::append_encoded`]) writes the values to the data file and
//! `fdatasync`s it, THEN writes one fjall batch (the index entries pointing at those bytes
//! and the resume record) and fsyncs the journal. The fjall batch is the commit point: it
//! only ever points at bytes already durable, and it is atomic (fjall drops a torn or
//! checksum-failing last batch at open). Bytes written without a committed batch (a crash
//! between the two steps, a failed commit) are unreferenced: recovery truncates them (and
//! deletes data files nothing points into), and appends after an open or a failure always
//! go to a fresh file. Then the newest segment is fully decoded (zstd checksums) and
//! dropped while it fails, and the resume record is checked against it.
//!
//! Why not fjall's own key-value separation (the first design): every value went through
//! the journal and then again into a blob file when its memtable was flushed, twice the
//! disk writes; at 100,000 events/s of real events that is more than this disk's ~550
//! MB/s. See `docs/DECISIONS.md`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};

use crate::event::{Event, StampState};

use super::codec::{self, Compression, Encoder};
use super::store::{
    Bounds, EncodedSegment, EventStore, LogError, MergeStep, Payloads, ReadLimits, RecoveryReport,
    Segment, SharedEvent, WriterPace,
};

mod append;
mod decoded;
mod layout;
mod merge;
mod recovery;

use append::FileAppend;
pub use decoded::DecodedStats;
use decoded::{Asker, ReadAhead, Reads};
use layout::{
    data_path, encode_entry, encode_raw_floor, encode_resume, key, FramesAt, Stored, RAW_FLOOR_KEY,
    RESUME_KEY,
};

/// The length fjall (2.x) gives its active journal file up front (sparse: its blocks are
/// allocated as the index is written).
pub const ACTIVE_JOURNAL_BYTES: u64 = 32 * 1024 * 1024;

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct FjallConfig {
    pub dir: PathBuf,
    /// Uncompressed bytes per segment (cut at frame boundaries, and at every commit).
    pub segment_target_bytes: usize,
    /// Data file size: the granularity at which deleted data is reclaimed.
    pub blob_file_bytes: u64,
    /// Journal budget before memtables are flushed (fjall's minimum is 24 MiB).
    pub max_journal_bytes: u64,
    /// Block cache of the index keyspace.
    pub cache_bytes: u64,
    /// Memtable size of the index partition.
    pub memtable_bytes: u32,
    pub compression: Compression,
    /// Threads that compress the segments of one commit in parallel (default: the
    /// available parallelism, at most 4).
    pub encode_threads: usize,
    /// Files the index keyspace keeps open at most (fjall's default is 900): part of the
    /// descriptors `--fd-reserve` keeps from clients, with one per data file.
    pub max_open_files: usize,
    /// Decoded segments kept for concurrent readers, bytes of payload (0: none kept).
    pub decoded_cache_bytes: usize,
    /// Segments decoded ahead, on a thread of their own, after each segment a reader
    /// decodes itself (0: no read-ahead; needs the decoded-segment cache).
    pub read_ahead_segments: usize,
    /// Where the read-ahead thread runs (catch-up work; nice 0 = the daemon's priority).
    pub read_ahead_class: crate::priority::Background,
    /// Whether runs of small segments (cut by commits at the live rate) are merged into
    /// full-size ones ([`EventStore::merge_small_segments`]).
    pub merge_small_segments: bool,
    /// A merge keeps a segment's raw frames as stored (compressed once, by the writer)
    /// when they hold at least this many plain bytes; smaller ones are compressed again
    /// together into zstd frames of at least this size (default 128 KiB: a zstd frame
    /// of ~128 KiB of real frames stores ~0.5% more than one of a whole segment).
    pub merge_keep_raw_bytes: usize,
    /// Whether the raw files are written with `O_DIRECT` (when the file system takes
    /// it): no page-cache pages allocated for the frames, the commit's largest CPU cost
    /// under a backlog (module `append`). The JSON data files stay buffered, so the
    /// recent JSON that replays read stays in the page cache.
    pub direct_raw_writes: bool,
}

impl FjallConfig {
    /// Bytes a store with these settings may use beyond its segments'
    /// ([`EventStore::overhead_bytes`]): the index journals (sealed ones up to the budget,
    /// and the active one fjall preallocates), plus in each of the data and raw
    /// directories the partly deleted oldest file and the unreferenced tail of a file a
    /// failed commit left; with merging, also the commits' files whose segments are
    /// partly merged away (the current one and the one before it) in each directory.
    pub fn overhead_bytes(&self) -> u64 {
        let files = if self.merge_small_segments { 8 } else { 4 };
        self.max_journal_bytes
            .max(24 * 1024 * 1024)
            .saturating_add(ACTIVE_JOURNAL_BYTES)
            .saturating_add(files * self.blob_file_bytes)
    }

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_target_bytes: 1024 * 1024,
            blob_file_bytes: 64 * 1024 * 1024,
            max_journal_bytes: 128 * 1024 * 1024,
            cache_bytes: 16 * 1024 * 1024,
            memtable_bytes: 8 * 1024 * 1024,
            compression: Compression::default(),
            encode_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
            max_open_files: 256,
            decoded_cache_bytes: 16 * 1024 * 1024,
            read_ahead_segments: 1,
            read_ahead_class: crate::priority::Background::Nice(19),
            merge_small_segments: true,
            merge_keep_raw_bytes: 128 * 1024,
            direct_raw_writes: true,
        }
    }
}

/// The open files of one directory, by id.
type DataFiles = BTreeMap<u64, Arc<File>>;

/// One directory of append-only files: `data/` (events values) or `raw/` (frames values).
struct Files {
    dir: PathBuf,
    open: RwLock<DataFiles>,
    /// What the files hold ("data", "raw"), for messages.
    what: &'static str,
}

impl Files {
    fn get(&self, id: u64) -> Option<Arc<File>> {
        self.open.read().ok()?.get(&id).cloned()
    }

    fn path(&self, id: u64) -> PathBuf {
        data_path(&self.dir, id)
    }

    /// Bytes the files take on disk.
    fn disk_bytes(&self) -> u64 {
        self.open
            .read()
            .map(|f| {
                f.values()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Forgets the files not in `referenced`; returns them, to be removed outside the
    /// writer lock.
    fn take_unreferenced(
        &self,
        referenced: &std::collections::BTreeSet<u64>,
    ) -> Result<Vec<u64>, LogError> {
        let mut files = self.open.write().map_err(|_| backend("poisoned"))?;
        let gone: Vec<u64> = files
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in &gone {
            files.remove(id);
        }
        Ok(gone)
    }

    fn remove(&self, ids: Vec<u64>) {
        for id in ids {
            // Readers holding the file keep reading it; the space is freed when they drop it.
            let path = self.path(id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an expired {} file", self.what);
            }
        }
    }
}

/// The file of one directory being appended to.
type Appender = Option<FileAppend>;

/// A data file and a raw file being appended to.
#[derive(Default)]
struct Pair {
    data: Appender,
    raw: Appender,
}

/// What is being appended to: the commits' files, and apart from them the files merged
/// segments go to (so that files of merged-away segments empty out and are reclaimed
/// whole, instead of holding merged data that lives on).
struct Writer {
    commits: Pair,
    merged: Pair,
    /// The next file id of each directory (shared by both pairs).
    next_data: u64,
    next_raw: u64,
}

impl Writer {
    /// The files being appended to, of `data` (else raw): never reclaimed.
    fn current(&self, data: bool) -> [Option<u64>; 2] {
        let id = |a: &Appender| a.as_ref().map(|a| a.id);
        if data {
            [id(&self.commits.data), id(&self.merged.data)]
        } else {
            [id(&self.commits.raw), id(&self.merged.raw)]
        }
    }
}

/// Values written to the files and not yet committed to the index.
struct Written {
    stored: Vec<Stored>,
    touched: Vec<Arc<File>>,
    data_created: bool,
    raw_created: bool,
}

pub struct FjallStore {
    keyspace: Keyspace,
    index: PartitionHandle,
    state: PartitionHandle,
    segments: RwLock<VecDeque<Stored>>,
    writer: Mutex<Writer>,
    /// Held by whatever replaces or deletes index entries other than the newest
    /// (retention, raw retention, merging), one at a time.
    maintenance: Mutex<()>,
    /// Segments below this seq were judged by merging already (this process).
    merge_from: AtomicU64,
    resume: Mutex<StampState>,
    /// The oldest seq whose raw frame may be held: segments wholly below it keep only
    /// their JSON. Durable (`RAW_FLOOR_KEY`) before any frame below it is removed.
    raw_floor: AtomicU64,
    /// Whether new raw files are written with `O_DIRECT` (the setting, until the file
    /// system refuses a direct write).
    direct_raw: AtomicBool,
    /// Whether the raw file written last was opened with `O_DIRECT` (false before the
    /// first one of this process): the setting, the file system and a refusal together.
    direct_raw_in_effect: AtomicBool,
    encoders: Mutex<Vec<Encoder>>,
    /// Value buffers of committed segments, for the next segments' values (see
    /// [`EventStore::recycle`]).
    spare: Mutex<SpareValues>,
    /// The files and what reads them (the decoded-segment cache), shared with the
    /// read-ahead thread.
    reads: Arc<Reads>,
    /// Decodes ahead of sequential readers; `None` when off.
    read_ahead: Option<ReadAhead>,
    stored_bytes: AtomicU64,
    /// Bytes of raw frames in raw files at or above the raw floor.
    raw_bytes: AtomicU64,
    config: FjallConfig,
}

/// Buffers of committed segments' values, reused for the next segments' values: fresh
/// buffers of ~1 MiB cost ~1.5 µs of page faults per event at a sustained append
/// (DECISIONS.md, "Event log", session 13). Holds at most the buffers of the last group
/// committed (events and frames values apart, as they differ in size), so it never holds
/// more than the one group the writer bounds already, and shrinks back with the groups
/// once the writer keeps up (one segment per commit at the live rate).
#[derive(Default)]
struct SpareValues {
    events: Vec<Vec<u8>>,
    frames: Vec<Vec<u8>>,
}

impl SpareValues {
    /// Buffers for one segment's two values (empty ones when none are spare).
    fn take(&mut self) -> [Vec<u8>; 2] {
        [
            self.events.pop().unwrap_or_default(),
            self.frames.pop().unwrap_or_default(),
        ]
    }

    /// Keeps the values of a committed group, at most as many of each as it had.
    fn keep(&mut self, encoded: Vec<EncodedSegment>) {
        let n = encoded.len();
        for seg in encoded {
            self.events.push(seg.events_value);
            self.frames.push(seg.frames_value);
        }
        for spare in [&mut self.events, &mut self.frames] {
            if spare.len() > n {
                spare.drain(..spare.len() - n);
            }
        }
    }
}

/// Adds `f` to the files a commit syncs, once.
fn note_touched(touched: &mut Vec<Arc<File>>, f: Arc<File>) {
    if !touched.iter().any(|t| Arc::ptr_eq(t, &f)) {
        touched.push(f);
    }
}

fn backend(e: impl std::fmt::Display) -> LogError {
    LogError::Backend(e.to_string())
}

fn io(what: &str, path: &Path, e: std::io::Error) -> LogError {
    LogError::Backend(format!("{what} {}: {e}", path.display()))
}

impl FjallStore {
    /// Opens or creates the store, recovering from a torn tail. Never fails because of
    /// the tail: what does not verify is dropped and reported.
    pub fn open(config: FjallConfig) -> Result<(Self, RecoveryReport), LogError> {
        let data_dir = config.dir.join("data");
        let raw_dir = config.dir.join("raw");
        for dir in [&data_dir, &raw_dir] {
            std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        }
        let keyspace = Config::new(&config.dir)
            .max_journaling_size(config.max_journal_bytes.max(24 * 1024 * 1024))
            .cache_size(config.cache_bytes)
            .max_open_files(config.max_open_files)
            .open()
            .map_err(|e| {
                LogError::Backend(format!(
                    "cannot open the event store in {}: {e}",
                    config.dir.display()
                ))
            })?;
        let index = keyspace
            .open_partition(
                "segments",
                PartitionCreateOptions::default()
                    .max_memtable_size(config.memtable_bytes.max(1024 * 1024)),
            )
            .map_err(backend)?;
        let state = keyspace
            .open_partition("state", PartitionCreateOptions::default())
            .map_err(backend)?;
        let mut report = RecoveryReport::default();
        let segments = recovery::load_index(&index, &mut report)?;
        let raw_floor = recovery::load_raw_floor(&state, &mut report)?;
        let (data_files, data_max) = recovery::open_data_files(&data_dir)?;
        let (raw_files, raw_max) = recovery::open_data_files(&raw_dir)?;
        let reads = Arc::new(Reads::new(
            Files {
                dir: data_dir,
                open: RwLock::new(data_files),
                what: "data",
            },
            Files {
                dir: raw_dir,
                open: RwLock::new(raw_files),
                what: "raw",
            },
            config.decoded_cache_bytes,
        ));
        let read_ahead =
            ReadAhead::start(&reads, config.read_ahead_segments, config.read_ahead_class)?;
        let store = Self {
            keyspace,
            index,
            state,
            stored_bytes: AtomicU64::new(segments.iter().map(|s| s.info.bytes).sum()),
            raw_bytes: AtomicU64::new(0),
            segments: RwLock::new(segments),
            writer: Mutex::new(Writer {
                commits: Pair::default(),
                merged: Pair::default(),
                next_data: data_max.map_or(1, |m: u64| m + 1),
                next_raw: raw_max.map_or(1, |m: u64| m + 1),
            }),
            maintenance: Mutex::new(()),
            merge_from: AtomicU64::new(0),
            resume: Mutex::new(StampState::fresh()),
            raw_floor: AtomicU64::new(raw_floor),
            direct_raw: AtomicBool::new(config.direct_raw_writes),
            direct_raw_in_effect: AtomicBool::new(false),
            encoders: Mutex::new(Vec::new()),
            spare: Mutex::new(SpareValues::default()),
            reads,
            read_ahead,
            config,
        };
        store.check_raw_floor(&mut report)?;
        store.verify_tail(&mut report)?;
        store.clean_files(&mut report)?;
        store.recount_bytes()?;
        let resume = store.recover_resume(&mut report)?;
        *store.resume.lock().map_err(|_| backend("poisoned"))? = resume;
        Ok((store, report))
    }

    /// Whether segment `s`'s raw frames are still held (it is at or above the raw floor).
    fn holds_raw(&self, s: &Stored) -> bool {
        s.info.first_seq >= self.raw_floor.load(Ordering::Acquire)
    }

    /// Sets the stored and the held raw bytes from the segments: raw frames count while
    /// the segment is at or above the raw floor.
    fn recount_bytes(&self) -> Result<(), LogError> {
        let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
        let (mut stored, mut raw) = (0, 0);
        for s in segs.iter() {
            if self.holds_raw(s) {
                stored += s.info.bytes;
                raw += s.info.raw_bytes;
            } else {
                stored += s.info.bytes - s.info.raw_bytes;
            }
        }
        self.stored_bytes.store(stored, Ordering::Relaxed);
        self.raw_bytes.store(raw, Ordering::Relaxed);
        Ok(())
    }

    /// Asks the read-ahead thread for the segments after `s` (a reader is decoding `s`
    /// itself, so it will want them next), with what `payloads` gets from each.
    fn read_ahead_after(&self, s: &Stored, payloads: Payloads) {
        let Some(ahead) = &self.read_ahead else {
            return;
        };
        let Ok(segs) = self.segments.read() else {
            return;
        };
        let next = segs.partition_point(|x| x.info.first_seq <= s.info.first_seq);
        for n in segs.iter().skip(next).take(ahead.segments) {
            let wanted = Payloads {
                raw: payloads.raw && self.holds_raw(n),
                ..payloads
            };
            if payloads.raw_only() && !wanted.raw {
                break;
            }
            ahead.request(*n, wanted);
        }
    }

    fn locate(&self, pred: impl Fn(&Segment) -> bool) -> Result<Option<Stored>, LogError> {
        let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
        let idx = segs.partition_point(|s| !pred(&s.info));
        Ok(segs.get(idx).copied())
    }

    fn decode_meta(&self, s: &Stored) -> Result<Option<Vec<Event>>, LogError> {
        let mut buf = Vec::new();
        if !self.reads.read_values(s, false, &mut buf)? {
            return Ok(None);
        }
        let none = Payloads {
            v1: false,
            v2: false,
            raw: false,
        };
        Ok(Some(codec::decode(&buf, None, none)?))
    }

    fn oldest_or_next(&self) -> u64 {
        match self.segments.read().ok().and_then(|s| s.front().copied()) {
            Some(s) => s.info.first_seq,
            None => self.resume.lock().map(|r| r.next_seq).unwrap_or(1),
        }
    }

    /// The oldest seq whose raw frame is held, or the next seq when none is.
    fn raw_oldest_or_next(&self) -> u64 {
        let floor = self.raw_floor.load(Ordering::Acquire);
        let held = self.segments.read().ok().and_then(|segs| {
            let idx = segs.partition_point(|s| s.info.first_seq < floor);
            segs.get(idx).map(|s| s.info.first_seq)
        });
        held.unwrap_or_else(|| self.resume.lock().map(|r| r.next_seq).unwrap_or(1))
    }

    /// The file of `files` to append at, rolling to a new one when the current is full
    /// (or after a failure, when its end is unknown). A file rolled off is finished (its
    /// staged bytes written) and its handle to sync added to `touched`. True in the second
    /// field if created.
    fn writable<'a>(
        &self,
        files: &Files,
        a: &'a mut Appender,
        next_file: &mut u64,
        direct: bool,
        touched: &mut Vec<Arc<File>>,
    ) -> Result<(&'a mut FileAppend, bool), LogError> {
        let full = a
            .as_ref()
            .is_none_or(|f| f.end >= self.config.blob_file_bytes.max(1));
        let mut created = false;
        if full {
            if let Some(old) = a.as_mut() {
                old.finish_last()
                    .map_err(|e| io("cannot write", &files.path(old.id), e))?;
                note_touched(touched, old.sync_handle());
            }
            let id = *next_file;
            *next_file += 1;
            let path = files.path(id);
            let file = Arc::new(append::create(&path).map_err(|e| io("cannot create", &path, e))?);
            files
                .open
                .write()
                .map_err(|_| backend("poisoned"))?
                .insert(id, file.clone());
            *a = Some(FileAppend::new(id, file, &path, direct));
            created = true;
        }
        match a.as_mut() {
            Some(f) => Ok((f, created)),
            None => Err(backend("no file to append to")),
        }
    }

    /// Writes the values of `encoded` to the files of `merged` (else the commits' pair)
    /// and syncs them (and their directories when a file was created): the first half of
    /// a commit, before the index batch that makes them visible.
    fn write_values(
        &self,
        w: &mut Writer,
        merged: bool,
        encoded: &[EncodedSegment],
    ) -> Result<Written, LogError> {
        let Writer {
            commits,
            merged: merged_pair,
            next_data,
            next_raw,
        } = w;
        let pair = if merged { merged_pair } else { commits };
        let direct = self.direct_raw.load(Ordering::Relaxed);
        let mut out = Written {
            stored: Vec::with_capacity(encoded.len()),
            touched: Vec::new(),
            data_created: false,
            raw_created: false,
        };
        for seg in encoded {
            let events_len = u32::try_from(seg.events_value.len())
                .map_err(|_| backend("events value too large"))?;
            let frames_len = u32::try_from(seg.frames_value.len())
                .map_err(|_| backend("frames value too large"))?;
            let (data, new) = self.writable(
                &self.reads.data,
                &mut pair.data,
                next_data,
                false,
                &mut out.touched,
            )?;
            out.data_created |= new;
            let (id, pos) = (data.id, data.write(&seg.events_value));
            let pos = pos.map_err(|e| io("cannot write", &self.reads.data.path(id), e))?;
            note_touched(&mut out.touched, data.sync_handle());
            let (raw, new) = self.writable(
                &self.reads.raw,
                &mut pair.raw,
                next_raw,
                direct,
                &mut out.touched,
            )?;
            out.raw_created |= new;
            if new {
                self.direct_raw_in_effect
                    .store(raw.is_direct(), Ordering::Relaxed);
            }
            let (raw_id, raw_pos) = (raw.id, raw.write(&seg.frames_value));
            let raw_pos = raw_pos.map_err(|e| self.raw_write_failed(raw, e))?;
            note_touched(&mut out.touched, raw.sync_handle());
            out.stored.push(Stored {
                info: Segment {
                    raw_bytes: u64::from(frames_len),
                    ..seg.info
                },
                file: id,
                offset: pos,
                events_len,
                frames_len,
                frames_at: FramesAt::Raw {
                    file: raw_id,
                    offset: raw_pos,
                },
            });
        }
        if let Some(data) = pair.data.as_mut() {
            data.finish()
                .map_err(|e| io("cannot write", &self.reads.data.path(data.id), e))?;
        }
        if let Some(raw) = pair.raw.as_mut() {
            raw.finish().map_err(|e| self.raw_write_failed(raw, e))?;
        }
        for f in &out.touched {
            f.sync_data()
                .map_err(|e| backend(format!("cannot sync a data file: {e}")))?;
        }
        for (created, files) in [
            (out.data_created, &self.reads.data),
            (out.raw_created, &self.reads.raw),
        ] {
            if created {
                File::open(&files.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("cannot sync", &files.dir, e))?;
            }
        }
        Ok(out)
    }

    /// The error of a failed write to the raw file `raw`. A direct write the file system
    /// refuses as invalid (alignment it does not take) turns direct writes off for the
    /// files created from now on, so the retry of the commit (on a new file) succeeds.
    fn raw_write_failed(&self, raw: &FileAppend, e: std::io::Error) -> LogError {
        if raw.is_direct() && e.kind() == std::io::ErrorKind::InvalidInput {
            self.direct_raw_in_effect.store(false, Ordering::Relaxed);
            if self.direct_raw.swap(false, Ordering::Relaxed) {
                tracing::warn!(error = %e, "the file system refused a direct write of raw frames; writing them through the page cache from now on");
            }
        }
        io("cannot write", &self.reads.raw.path(raw.id), e)
    }

    fn write_and_commit(
        &self,
        w: &mut Writer,
        encoded: &[EncodedSegment],
        resume: StampState,
    ) -> Result<(), LogError> {
        let stored = self.write_values(w, false, encoded)?.stored;
        // The commit point: index entries pointing at durable bytes, and the resume state.
        let mut batch = self.keyspace.batch();
        for s in &stored {
            batch.insert(&self.index, key(s.info.first_seq), encode_entry(s));
        }
        batch.insert(&self.state, RESUME_KEY, encode_resume(&resume));
        batch.commit().map_err(backend)?;
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        let mut segs = self.segments.write().map_err(|_| backend("poisoned"))?;
        for s in &stored {
            self.stored_bytes.fetch_add(s.info.bytes, Ordering::Relaxed);
            // New segments are above the raw floor (it never passes the newest segment).
            self.raw_bytes
                .fetch_add(s.info.raw_bytes, Ordering::Relaxed);
            segs.push_back(*s);
        }
        drop(segs);
        *self.resume.lock().map_err(|_| backend("poisoned"))? = resume;
        Ok(())
    }

    /// Removes the files of both directories no retained segment reads (raw files: none
    /// at or above the raw floor) and not being appended to. Under the writer lock, so no
    /// commit lands in a file while it is judged. (Merging writes older data to newer
    /// files, so a file's id says nothing about whether it is still read.)
    fn reclaim_files(&self) -> Result<(), LogError> {
        let w = self.writer.lock().map_err(|_| backend("poisoned"))?;
        let mut data_refs: std::collections::BTreeSet<u64> =
            w.current(true).into_iter().flatten().collect();
        let mut raw_refs: std::collections::BTreeSet<u64> =
            w.current(false).into_iter().flatten().collect();
        {
            let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
            let floor = self.raw_floor.load(Ordering::Acquire);
            for s in segs.iter() {
                data_refs.insert(s.file);
                if s.info.first_seq >= floor {
                    if let Some((file, _)) = s.raw_end() {
                        raw_refs.insert(file);
                    }
                }
            }
        }
        let data_gone = self.reads.data.take_unreferenced(&data_refs)?;
        let raw_gone = self.reads.raw.take_unreferenced(&raw_refs)?;
        drop(w);
        self.reads.data.remove(data_gone);
        self.reads.raw.remove(raw_gone);
        Ok(())
    }

    /// One read as planned on the index as it is now; `None` when a segment of the plan
    /// was merged away and its file removed before this read got to it (plan again).
    fn read_planned(
        &self,
        from_seq: u64,
        limits: ReadLimits,
        payloads: Payloads,
    ) -> Result<Option<Vec<SharedEvent>>, LogError> {
        if payloads.raw_only() {
            let oldest = self.raw_oldest_or_next();
            if from_seq < oldest {
                return Err(LogError::TooOld {
                    requested: from_seq,
                    oldest,
                });
            }
        }
        let todo: Vec<Stored> = {
            let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
            let Some(front) = segs.front() else {
                let next = self.resume_state().next_seq;
                return if from_seq < next {
                    Err(LogError::TooOld {
                        requested: from_seq,
                        oldest: next,
                    })
                } else {
                    Ok(Some(Vec::new()))
                };
            };
            if from_seq < front.info.first_seq {
                return Err(LogError::TooOld {
                    requested: from_seq,
                    oldest: front.info.first_seq,
                });
            }
            let idx = segs.partition_point(|s| s.info.last_seq < from_seq);
            // Enough segments for the event limit.
            let mut events = 0u64;
            let want = limits.max_events.max(1) as u64;
            segs.iter()
                .skip(idx)
                .take(4096)
                .take_while(|s| {
                    let more = events < want;
                    events += s.info.last_seq + 1 - s.info.first_seq.max(from_seq);
                    more
                })
                .copied()
                .collect()
        };
        let mut out: Vec<SharedEvent> = Vec::with_capacity(limits.max_events.min(8192));
        let mut bytes = 0usize;
        for s in todo {
            // Below the raw floor a segment has only its JSON: a read that wants JSON too
            // gets its events without raw frames (a raw-only read was refused above).
            let wanted = Payloads {
                raw: payloads.raw && self.holds_raw(&s),
                ..payloads
            };
            // A raw-only read whose segment lost its frames meanwhile (the floor moved
            // during the read) ends as if the segment were gone, never with empty frames.
            let decoded = if payloads.raw_only() && !wanted.raw {
                None
            } else {
                self.reads.decoded_then(&s, wanted, Asker::Reader, || {
                    self.read_ahead_after(&s, payloads)
                })?
            };
            let Some(decoded) = decoded else {
                if out.is_empty() && self.merged_away(&s) {
                    return Ok(None);
                }
                if out.is_empty() {
                    return Err(LogError::TooOld {
                        requested: from_seq,
                        oldest: if payloads.raw_only() {
                            self.raw_oldest_or_next()
                        } else {
                            self.oldest_or_next()
                        },
                    });
                }
                break;
            };
            // Which events of the segment this read takes: from `from_seq`, within the
            // limits. They are shared with the cache and with every other reader of the
            // segment: taking one costs a refcount.
            let mut starts = codec::FrameStarts::default();
            for (i, event) in decoded.iter().enumerate() {
                let first_of_frame = starts.next(event);
                if event.seq < from_seq {
                    continue;
                }
                let size = codec::payload_bytes(event, first_of_frame);
                if out.len() >= limits.max_events
                    || (!out.is_empty() && bytes.saturating_add(size) > limits.max_bytes)
                {
                    return Ok(Some(out));
                }
                bytes += size;
                out.extend(SharedEvent::at(&decoded, i));
            }
        }
        Ok(Some(out))
    }

    /// Whether `s` is no longer in the index but the events it held still are (a merge
    /// replaced it).
    fn merged_away(&self, s: &Stored) -> bool {
        let Ok(segs) = self.segments.read() else {
            return false;
        };
        let held = segs.partition_point(|x| x.info.first_seq < s.info.first_seq);
        let same = segs.get(held).is_some_and(|x| {
            x.info.last_seq == s.info.last_seq && x.file == s.file && x.offset == s.offset
        });
        !same
            && segs
                .front()
                .is_some_and(|f| f.info.first_seq <= s.info.first_seq)
    }

    fn take_encoders(&self, n: usize) -> Result<Vec<Encoder>, LogError> {
        let mut pool = self.encoders.lock().map_err(|_| backend("poisoned"))?;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match pool.pop() {
                Some(e) => out.push(e),
                None => out.push(Encoder::new(self.config.compression)?),
            }
        }
        Ok(out)
    }
}

impl EventStore for FjallStore {
    fn resume_state(&self) -> StampState {
        self.resume.lock().map(|r| *r).unwrap_or_default()
    }

    fn append(&self, events: &[SharedEvent], resume: StampState) -> Result<(), LogError> {
        let encoded = self.encode(events, WriterPace::KeepingUp)?;
        self.append_encoded(events, &encoded, resume)
    }

    /// Compresses the segments of a batch, on up to `encode_threads` threads, the raw
    /// frames at the level for `pace` ([`Compression::raw_level_at`]).
    fn encode(
        &self,
        events: &[SharedEvent],
        pace: WriterPace,
    ) -> Result<Vec<EncodedSegment>, LogError> {
        let level = self.config.compression.raw_level_at(pace);
        let parts = codec::split_segments(events, self.config.segment_target_bytes);
        let threads = self.config.encode_threads.clamp(1, parts.len().max(1));
        let mut encoders = self.take_encoders(threads)?;
        let encode_one = |enc: &mut Encoder, part: &[SharedEvent]| {
            let buffers = match self.spare.lock() {
                Ok(mut spare) => spare.take(),
                Err(_) => Default::default(),
            };
            enc.encode_into(part, level, buffers)
        };
        let result = if threads == 1 {
            match encoders.first_mut() {
                Some(enc) => parts.iter().map(|p| encode_one(enc, p)).collect(),
                None => Err(backend("no encoder")),
            }
        } else {
            let per = parts.len().div_ceil(threads);
            std::thread::scope(|s| {
                let mut chunks = parts.chunks(per).zip(encoders.iter_mut());
                let Some((mine, my_enc)) = chunks.next() else {
                    return Ok(Vec::new());
                };
                let handles = chunks
                    .map(|(chunk, enc)| {
                        std::thread::Builder::new()
                            .name("sluice-log-enc".into())
                            .spawn_scoped(s, move || {
                                chunk
                                    .iter()
                                    .map(|p| encode_one(enc, p))
                                    .collect::<Result<Vec<_>, _>>()
                            })
                            .map_err(|e| backend(format!("cannot start an encoder thread: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut out: Vec<EncodedSegment> = mine
                    .iter()
                    .map(|p| encode_one(my_enc, p))
                    .collect::<Result<_, _>>()?;
                for h in handles {
                    out.extend(
                        h.join()
                            .map_err(|_| backend("segment encoder thread panicked"))??,
                    );
                }
                Ok(out)
            })
        };
        if let Ok(mut pool) = self.encoders.lock() {
            pool.extend(encoders);
        }
        result
    }

    fn recycle(&self, encoded: Vec<EncodedSegment>) {
        if let Ok(mut spare) = self.spare.lock() {
            spare.keep(encoded);
        }
    }

    fn append_encoded(
        &self,
        events: &[SharedEvent],
        encoded: &[EncodedSegment],
        resume: StampState,
    ) -> Result<(), LogError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let mut w = self.writer.lock().map_err(|_| backend("poisoned"))?;
        let expected = self.resume_state().next_seq;
        if first.seq != expected {
            return Err(LogError::OutOfOrder {
                expected,
                got: first.seq,
            });
        }
        let covers = encoded.first().map(|s| s.info.first_seq) == Some(first.seq)
            && encoded.last().map(|s| s.info.last_seq) == Some(last.seq)
            && encoded
                .windows(2)
                .all(|p| p[1].info.first_seq == p[0].info.last_seq + 1);
        if !covers {
            return Err(backend("encoded segments do not cover the batch"));
        }
        let result = self.write_and_commit(&mut w, encoded, resume);
        if result.is_err() {
            // Never append after bytes in an unknown state: the next commit takes a new
            // file; what was written here is unreferenced and removed at the next open.
            w.commits = Pair::default();
        }
        result
    }

    fn read(
        &self,
        from_seq: u64,
        limits: ReadLimits,
        payloads: Payloads,
    ) -> Result<Vec<SharedEvent>, LogError> {
        // A read planned on segments that a merge then replaced, and whose file is gone
        // by the time it gets there, plans again (a merge replaces a run at most once per
        // step, so this ends quickly).
        for _ in 0..64 {
            if let Some(out) = self.read_planned(from_seq, limits, payloads)? {
                return Ok(out);
            }
        }
        Err(backend("segments are merged faster than they can be read"))
    }

    fn seq_at_or_after_time(&self, time_us: i64) -> Result<Option<u64>, LogError> {
        // Deleted concurrently: retry on the next candidate (bounded by segment count).
        for _ in 0..64 {
            let Some(seg) = self.locate(|s| s.last_time_us >= time_us)? else {
                return Ok(None);
            };
            if seg.info.first_time_us >= time_us {
                return Ok(Some(seg.info.first_seq));
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
            if seg.info.first_upstream_seq > upstream_seq {
                return Ok(Some(seg.info.first_seq));
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

    fn restart_at(&self, next_seq: u64) -> Result<(), LogError> {
        let current = self.resume_state();
        if next_seq < current.next_seq {
            return Err(LogError::OutOfOrder {
                expected: current.next_seq,
                got: next_seq,
            });
        }
        self.delete_before(u64::MAX)?;
        let resume = StampState {
            next_seq,
            ..current
        };
        let _w = self.writer.lock().map_err(|_| backend("poisoned"))?;
        let mut batch = self.keyspace.batch();
        batch.insert(&self.state, RESUME_KEY, encode_resume(&resume));
        batch.commit().map_err(backend)?;
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        *self.resume.lock().map_err(|_| backend("poisoned"))? = resume;
        Ok(())
    }

    fn delete_before(&self, seq: u64) -> Result<u64, LogError> {
        let _m = self.maintenance.lock().map_err(|_| backend("poisoned"))?;
        let doomed: Vec<Stored> = {
            let mut segs = self.segments.write().map_err(|_| backend("poisoned"))?;
            let n = segs.partition_point(|s| s.info.last_seq < seq);
            segs.drain(..n).collect()
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for chunk in doomed.chunks(1024) {
            let mut batch = self.keyspace.batch();
            for s in chunk {
                batch.remove(&self.index, key(s.info.first_seq));
                deleted += s.info.last_seq - s.info.first_seq + 1;
                if self.holds_raw(s) {
                    self.stored_bytes.fetch_sub(s.info.bytes, Ordering::Relaxed);
                    self.raw_bytes
                        .fetch_sub(s.info.raw_bytes, Ordering::Relaxed);
                } else {
                    // Its frames were already dropped (and no longer counted).
                    self.stored_bytes
                        .fetch_sub(s.info.bytes - s.info.raw_bytes, Ordering::Relaxed);
                }
            }
            batch.commit().map_err(backend)?;
        }
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        // Files wholly below the oldest retained segment are removed whole; nothing
        // retained is rewritten.
        self.reclaim_files()?;
        Ok(deleted)
    }

    fn delete_raw_before(&self, seq: u64) -> Result<u64, LogError> {
        let _m = self.maintenance.lock().map_err(|_| backend("poisoned"))?;
        // The writer lock keeps appends out while the floor moves (new segments are
        // always above it).
        let w = self.writer.lock().map_err(|_| backend("poisoned"))?;
        let old = self.raw_floor.load(Ordering::Acquire);
        let (floor, dropped, freed) = {
            let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
            let n = segs.partition_point(|s| s.info.last_seq < seq);
            let floor = match segs.get(n) {
                Some(s) => s.info.first_seq,
                None => {
                    self.resume
                        .lock()
                        .map_err(|_| backend("poisoned"))?
                        .next_seq
                }
            };
            let newly: Vec<&Stored> = segs
                .iter()
                .take(n)
                .filter(|s| s.info.first_seq >= old)
                .collect();
            let dropped = newly
                .iter()
                .map(|s| s.info.last_seq - s.info.first_seq + 1)
                .sum::<u64>();
            (floor, dropped, newly.iter().map(|s| s.info.raw_bytes).sum())
        };
        if floor <= old {
            return Ok(0);
        }
        // Durable before any frame goes: after a crash the floor is where it was said to
        // be, and recovery removes the raw files nothing above it reads.
        self.state
            .insert(RAW_FLOOR_KEY, encode_raw_floor(floor))
            .map_err(backend)?;
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        self.raw_floor.store(floor, Ordering::Release);
        self.raw_bytes.fetch_sub(freed, Ordering::Relaxed);
        self.stored_bytes.fetch_sub(freed, Ordering::Relaxed);
        drop(w);
        self.reclaim_files()?;
        Ok(dropped)
    }

    fn bounds(&self) -> Option<Bounds> {
        let segs = self.segments.read().ok()?;
        Some(Bounds::spanning(segs.front()?.info, segs.back()?.info))
    }

    fn segments(&self, max: usize) -> Vec<Segment> {
        self.segments
            .read()
            .map(|s| s.iter().take(max).map(|s| s.info).collect())
            .unwrap_or_default()
    }

    fn size_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    fn raw_size_bytes(&self) -> u64 {
        self.raw_bytes.load(Ordering::Relaxed)
    }

    fn direct_raw_writes(&self) -> bool {
        self.direct_raw_in_effect.load(Ordering::Relaxed)
    }

    fn raw_bounds(&self) -> Option<Bounds> {
        let floor = self.raw_floor.load(Ordering::Acquire);
        let segs = self.segments.read().ok()?;
        let oldest = segs
            .get(segs.partition_point(|s| s.info.first_seq < floor))?
            .info;
        Some(Bounds::spanning(oldest, segs.back()?.info))
    }

    fn merge_small_segments(&self) -> Result<MergeStep, LogError> {
        self.merge_step()
    }

    fn overhead_bytes(&self) -> u64 {
        self.config.overhead_bytes()
    }

    fn decoded_cache_counts(&self) -> (u64, u64) {
        (
            self.reads.stats.misses.load(Ordering::Relaxed),
            self.reads.stats.hits.load(Ordering::Relaxed),
        )
    }

    fn read_ahead_decodes(&self) -> u64 {
        self.reads.stats.read_ahead.load(Ordering::Relaxed)
    }

    fn disk_bytes(&self) -> u64 {
        self.keyspace
            .disk_space()
            .saturating_add(self.reads.data.disk_bytes())
            .saturating_add(self.reads.raw.disk_bytes())
    }
}
