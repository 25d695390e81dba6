//! The stored form of a segment: events in columns, each column compressed with zstd.
//!
//! Owns: the byte layout of a stored segment, its verification, and reading every layout
//! sluice has written (format 1 in [`format1`], read in place). Must never: store a raw
//! frame more than once (all events of a frame share it), store an event's JSON twice
//! (v1 and v2 are assembled on read from what they share, [`body`]), trust a length it
//! read without bounds checks, or panic on bytes read back from storage (any malformed
//! input is a [`LogError::Corrupt`]).
//!
//! A segment is encoded as two values, so that a reader can skip the raw frames when its
//! wire does not need them:
//! - the *events value* (format 2, `SLE2`): a header (magic, first seq, event count,
//!   frame count, a (compressed, plain) length pair per column), then eight columns, each
//!   its own zstd frame so that like is compressed with like:
//!   - `meta`: per frame the upstream seq, receipt time (both as deltas), raw length, DID
//!     number and event count; per event the time delta, kind, op index, collection
//!     number, how its JSON is stored and the lengths of its variable parts (varints);
//!   - `dict`: the segment's distinct DIDs and collections, each once;
//!   - `strs`: revs, rkeys and CIDs that have no compact binary form;
//!   - `revs`, `rkeys`: TIDs as 64-bit integers;
//!   - `cids`: CIDs as bytes (half the size of their base32 text);
//!   - `records`: record JSON;
//!   - `other`: identity/account/sync bodies, `tooBig` summaries, and events stored
//!     verbatim (whatever does not split exactly);
//! - the *frames value* (`SLF1`: magic, first seq, plain length): the raw frames back to
//!   back, compressed as one zstd frame by a commit, or as several back to back by a merge
//!   ([`Encoder::encode_merged`] keeps each merged segment's zstd frame as the writer
//!   made it, so a raw frame is compressed once); a decoder reads them as one column
//!   (zstd decodes concatenated frames), so every frames value sluice has written reads
//!   the same way.
//!
//! Every zstd frame carries its content checksum, so a torn or flipped byte is detected on
//! decode. Store-independent: the two values are plain bytes that any `EventStore` can keep.

pub mod body;
mod format1;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::{Event, EventKind};

use super::store::{EncodedSegment, LogError, Payloads, Segment, SharedEvent, WriterPace};
use body::{CommitParts, RecordPart, Split};

const EVENTS_MAGIC: &[u8; 4] = b"SLE2";
const FRAMES_MAGIC: &[u8; 4] = b"SLF1";
const FRAMES_HEADER: usize = 4 + 8 + 4;
pub(super) const NONE_U32: u32 = u32::MAX;
pub(super) const NONE_U16: u16 = u16::MAX;

const C_META: usize = 0;
const C_DICT: usize = 1;
const C_STRS: usize = 2;
const C_REVS: usize = 3;
const C_RKEYS: usize = 4;
const C_CIDS: usize = 5;
const C_RECORDS: usize = 6;
const C_OTHER: usize = 7;
const COLUMNS: usize = 8;
const EVENTS_HEADER: usize = 4 + 8 + 4 + 4 + COLUMNS * 8;

/// How an event's JSON is stored (low 3 bits of its shape byte; bit 3: shows on v1,
/// bit 4: shows on v2).
const SHAPE_NOTHING: u8 = 0;
const SHAPE_VERBATIM: u8 = 1;
const SHAPE_COMMIT: u8 = 2;
const SHAPE_WRAPPED: u8 = 3;
const SHAPE_TOO_BIG: u8 = 4;
const SHAPE_V1: u8 = 1 << 3;
const SHAPE_V2: u8 = 1 << 4;

/// Commit flags: bits 0-1 action, 2-3 record part, then these.
const F_CID: u8 = 1 << 4;
const F_CID_BIN: u8 = 1 << 5;
const F_REV_TID: u8 = 1 << 6;
const F_RKEY_TID: u8 = 1 << 7;

/// zstd levels for the columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Metadata and JSON columns: very compressible, level matters for retention.
    pub json_level: i32,
    /// Raw CBOR frames while the log writer keeps up (the live rate): CIDs and signatures
    /// are mostly incompressible, so this buys ~3% of raw retention over the fast level
    /// for ~3x its CPU, which the live rate leaves idle.
    pub raw_level: i32,
    /// Raw CBOR frames of a group the writer takes behind (a backlog building: catching
    /// up after an outage, a burst): the cheap level, so the writer keeps pace. Equal to
    /// `raw_level` for one fixed level.
    pub raw_fast_level: i32,
}

impl Compression {
    /// The raw frames' level for a group the writer took at `pace`.
    pub fn raw_level_at(&self, pace: WriterPace) -> i32 {
        match pace {
            WriterPace::KeepingUp => self.raw_level,
            WriterPace::Behind => self.raw_fast_level,
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            json_level: 1,
            raw_level: 3,
            raw_fast_level: -3,
        }
    }
}

/// Splits `events` (whole frames) into runs of whole frames of about `target_bytes`
/// uncompressed each.
pub fn split_segments(events: &[SharedEvent], target_bytes: usize) -> Vec<&[SharedEvent]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    let mut starts = FrameStarts::default();
    for (i, event) in events.iter().enumerate() {
        let new_frame = starts.next(event);
        if new_frame && i > start && bytes >= target_bytes {
            out.push(&events[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += payload_bytes(event, new_frame);
    }
    if start < events.len() {
        out.push(&events[start..]);
    }
    out
}

/// Tells, event by event in log order, which events start their upstream frame (`op_index`
/// 0, or another frame than the previous event's): those carry the frame's bytes in every
/// size account, the later events of the frame share them.
#[derive(Debug, Default)]
pub struct FrameStarts {
    prev_upstream: Option<i64>,
}

impl FrameStarts {
    /// Whether `event`, the next in log order, starts its frame.
    pub fn next(&mut self, event: &Event) -> bool {
        let starts = starts_frame_after(self.prev_upstream, event);
        self.prev_upstream = Some(event.upstream_seq);
        starts
    }
}

/// Whether `event` starts its frame, after an event of the frame `prev_upstream` (none:
/// `event` is the first looked at).
fn starts_frame_after(prev_upstream: Option<i64>, event: &Event) -> bool {
    event.op_index == 0 || prev_upstream != Some(event.upstream_seq)
}

/// Uncompressed payload bytes of an event; the raw frame counts with the frame's first.
pub fn payload_bytes(event: &Event, first_of_frame: bool) -> usize {
    let json =
        event.v1_json.as_ref().map_or(0, Bytes::len) + event.v2_json.as_ref().map_or(0, Bytes::len);
    json + if first_of_frame {
        event.raw_frame.len()
    } else {
        0
    }
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn len_u32(len: usize, what: &str) -> Result<u32, LogError> {
    u32::try_from(len).map_err(|_| LogError::Backend(format!("{what} of {len} bytes too large")))
}

fn kind_code(kind: EventKind) -> u8 {
    match kind {
        EventKind::Commit => 0,
        EventKind::CommitTooBig => 1,
        EventKind::CommitEmpty => 2,
        EventKind::Identity => 3,
        EventKind::Account => 4,
        EventKind::Sync => 5,
        EventKind::Unknown => 6,
    }
}

pub(super) fn kind_from(code: u8) -> Result<EventKind, LogError> {
    Ok(match code {
        0 => EventKind::Commit,
        1 => EventKind::CommitTooBig,
        2 => EventKind::CommitEmpty,
        3 => EventKind::Identity,
        4 => EventKind::Account,
        5 => EventKind::Sync,
        6 => EventKind::Unknown,
        other => return Err(corrupt(format!("unknown event kind {other}"))),
    })
}

/// The seq of a segment's `index`th event (seqs are consecutive within a segment).
pub(super) fn seq_at(first_seq: u64, index: usize) -> Result<u64, LogError> {
    first_seq
        .checked_add(index as u64)
        .ok_or_else(|| corrupt("seq overflow"))
}

pub(super) fn corrupt(msg: impl Into<String>) -> LogError {
    LogError::Corrupt(msg.into())
}

fn put_var(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

fn record_code(r: RecordPart) -> u8 {
    match r {
        RecordPart::Json => 0,
        RecordPart::Missing => 1,
        RecordPart::Undecodable => 2,
        RecordPart::None => 3,
    }
}

fn record_from(code: u8) -> RecordPart {
    match code & 3 {
        0 => RecordPart::Json,
        1 => RecordPart::Missing,
        2 => RecordPart::Undecodable,
        _ => RecordPart::None,
    }
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses with the content checksum on, so corruption is caught on decode.
pub struct Encoder {
    json: zstd::bulk::Compressor<'static>,
    raw: zstd::bulk::Compressor<'static>,
    /// The level `raw` is set to (changed per segment by [`Encoder::encode_at`]).
    raw_level: i32,
    /// The level [`Encoder::encode`] uses.
    default_raw_level: i32,
    /// Column buffers, reused from segment to segment (a fresh megabyte buffer per
    /// segment costs page faults and zeroing).
    cols: [Vec<u8>; COLUMNS],
    raw_buf: Vec<u8>,
    check: Vec<u8>,
}

impl Encoder {
    pub fn new(compression: Compression) -> Result<Self, LogError> {
        let make = |level: i32| -> Result<zstd::bulk::Compressor<'static>, LogError> {
            let mut c = zstd::bulk::Compressor::new(level)
                .map_err(|e| LogError::Backend(format!("zstd: {e}")))?;
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .map_err(|e| LogError::Backend(format!("zstd: {e}")))?;
            Ok(c)
        };
        Ok(Self {
            json: make(compression.json_level)?,
            raw: make(compression.raw_level)?,
            raw_level: compression.raw_level,
            default_raw_level: compression.raw_level,
            cols: Default::default(),
            raw_buf: Vec::new(),
            check: Vec::new(),
        })
    }

    /// Encodes whole frames of consecutive events into one segment, the raw frames at
    /// the configured `raw_level`.
    pub fn encode(&mut self, events: &[SharedEvent]) -> Result<EncodedSegment, LogError> {
        self.encode_at(events, self.default_raw_level)
    }

    /// [`Encoder::encode`] with the raw frames at zstd level `raw_level` (any level reads
    /// back the same way: a zstd frame does not depend on the level that made it).
    pub fn encode_at(
        &mut self,
        events: &[SharedEvent],
        raw_level: i32,
    ) -> Result<EncodedSegment, LogError> {
        self.encode_into(events, raw_level, [Vec::new(), Vec::new()])
    }

    /// [`Encoder::encode_at`] into `buffers` (the events value's and the frames value's,
    /// cleared first): buffers of an earlier segment, already faulted in, cost no page
    /// faults when they are large enough.
    pub fn encode_into(
        &mut self,
        events: &[SharedEvent],
        raw_level: i32,
        buffers: [Vec<u8>; 2],
    ) -> Result<EncodedSegment, LogError> {
        let [mut events_value, mut frames_value] = buffers;
        let first = self.prepare(events, raw_level)?;
        let frames = self.fill_columns(events, None)?;
        self.put_events_value(events, frames, &mut events_value)?;
        frames_value.clear();
        frames_value.reserve(FRAMES_HEADER + zstd::zstd_safe::compress_bound(self.raw_buf.len()));
        frames_value.extend_from_slice(FRAMES_MAGIC);
        put_u64(&mut frames_value, first);
        put_u32(&mut frames_value, len_u32(self.raw_buf.len(), "frames")?);
        compress_into(&mut self.raw, &self.raw_buf, &mut frames_value)?;
        Ok(Self::segment(events, events_value, frames_value, raw_level))
    }

    /// One segment of the events of `sources` (consecutive segments, in order), for a
    /// merge: the event columns encoded afresh, the raw frames kept as their segments
    /// stored them (compressed once, by the writer) when a segment's frames hold at least
    /// `keep_min_plain` plain bytes; the frames of smaller ones (and of any layout stored
    /// otherwise) are compressed together at `raw_level`, in zstd frames of at least
    /// `keep_min_plain` plain bytes but the last. The frames value then holds several
    /// zstd frames back to back, each with its own checksum; a decoder reads them as one
    /// column ([`decode`]).
    pub fn encode_merged(
        &mut self,
        sources: &[&MergeSource],
        raw_level: i32,
        keep_min_plain: usize,
    ) -> Result<EncodedSegment, LogError> {
        let events: Vec<SharedEvent> = sources
            .iter()
            .flat_map(|s| s.events.iter().cloned())
            .collect();
        let first = self.prepare(&events, raw_level)?;
        let mut lens = sources.iter().flat_map(|s| s.frame_lens.iter().copied());
        let frames = self.fill_columns(&events, Some(&mut lens))?;
        let mut events_value = Vec::new();
        self.put_events_value(&events, frames, &mut events_value)?;
        let plain: usize = sources.iter().map(|s| s.raw_plain()).sum();
        let kept: usize = sources.iter().map(|s| s.raw_stored()).sum();
        let mut frames_value = Vec::with_capacity(
            FRAMES_HEADER + kept + zstd::zstd_safe::compress_bound(keep_min_plain.min(plain)),
        );
        frames_value.extend_from_slice(FRAMES_MAGIC);
        put_u64(&mut frames_value, first);
        put_u32(&mut frames_value, len_u32(plain, "frames")?);
        // `raw_buf` holds the plain frames waiting to be compressed together.
        for s in sources {
            match &s.raw {
                MergeRaw::Stored { value, plain } if *plain >= keep_min_plain => {
                    compress_into(&mut self.raw, &self.raw_buf, &mut frames_value)?;
                    self.raw_buf.clear();
                    frames_value.extend_from_slice(&value[FRAMES_HEADER..]);
                }
                MergeRaw::Stored { value, plain } => {
                    let b = decompress(&value[FRAMES_HEADER..], *plain)?;
                    self.raw_buf.extend_from_slice(&b);
                }
                MergeRaw::Plain(b) => self.raw_buf.extend_from_slice(b),
            }
            if self.raw_buf.len() >= keep_min_plain {
                compress_into(&mut self.raw, &self.raw_buf, &mut frames_value)?;
                self.raw_buf.clear();
            }
        }
        compress_into(&mut self.raw, &self.raw_buf, &mut frames_value)?;
        self.raw_buf.clear();
        Ok(Self::segment(
            &events,
            events_value,
            frames_value,
            raw_level,
        ))
    }

    /// Sets the raw level and clears the columns; the segment's first seq.
    fn prepare(&mut self, events: &[SharedEvent], raw_level: i32) -> Result<u64, LogError> {
        let Some(first) = events.first() else {
            return Err(LogError::Backend("cannot encode an empty segment".into()));
        };
        if raw_level != self.raw_level {
            self.raw
                .set_compression_level(raw_level)
                .map_err(|e| LogError::Backend(format!("zstd level {raw_level}: {e}")))?;
            self.raw_level = raw_level;
        }
        for c in &mut self.cols {
            c.clear();
        }
        self.raw_buf.clear();
        Ok(first.seq)
    }

    /// The events value of the filled columns, into `events_value` (cleared first).
    fn put_events_value(
        &mut self,
        events: &[SharedEvent],
        frames: u32,
        events_value: &mut Vec<u8>,
    ) -> Result<(), LogError> {
        let first = events.first().map_or(0, |e| e.seq);
        let count = len_u32(events.len(), "segment event count")?;
        // Room for the worst case up front: each column compresses straight into it.
        events_value.clear();
        events_value.reserve(
            EVENTS_HEADER
                + self
                    .cols
                    .iter()
                    .map(|c| zstd::zstd_safe::compress_bound(c.len()))
                    .sum::<usize>(),
        );
        events_value.extend_from_slice(EVENTS_MAGIC);
        put_u64(events_value, first);
        put_u32(events_value, count);
        put_u32(events_value, frames);
        let lens_at = events_value.len();
        events_value.resize(EVENTS_HEADER, 0);
        for (i, col) in self.cols.iter().enumerate() {
            let n = compress_into(&mut self.json, col, events_value)?;
            let at = lens_at + i * 8;
            events_value[at..at + 4].copy_from_slice(&len_u32(n, "column")?.to_le_bytes());
            events_value[at + 4..at + 8]
                .copy_from_slice(&len_u32(col.len(), "column")?.to_le_bytes());
        }
        Ok(())
    }

    fn segment(
        events: &[SharedEvent],
        events_value: Vec<u8>,
        frames_value: Vec<u8>,
        raw_level: i32,
    ) -> EncodedSegment {
        let (first, last) = (events.first(), events.last());
        let info = Segment {
            first_seq: first.map_or(0, |e| e.seq),
            last_seq: last.map_or(0, |e| e.seq),
            first_time_us: first.map_or(0, |e| e.time_us),
            last_time_us: last.map_or(0, |e| e.time_us),
            first_upstream_seq: first.map_or(0, |e| e.upstream_seq),
            last_upstream_seq: last.map_or(0, |e| e.upstream_seq),
            bytes: (events_value.len() + frames_value.len()) as u64,
            raw_bytes: frames_value.len() as u64,
        };
        EncodedSegment {
            info,
            events_value,
            frames_value,
            raw_level,
        }
    }

    /// Writes every column of `events`; returns the frame count. The raw frames go to
    /// `raw_buf`, or with `raw_lens` (a merge keeping them as stored) only their lengths,
    /// one per frame in order, are written.
    fn fill_columns(
        &mut self,
        events: &[SharedEvent],
        mut raw_lens: Option<&mut dyn Iterator<Item = usize>>,
    ) -> Result<u32, LogError> {
        let [meta, dict, strs, revs, rkeys, cids, records, other] = &mut self.cols;
        let check = &mut self.check;
        let mut dids: HashMap<&str, u64> = HashMap::new();
        let mut collections: HashMap<&str, u64> = HashMap::new();
        let mut did_list: Vec<&str> = Vec::new();
        let mut collection_list: Vec<&str> = Vec::new();
        let (mut prev_upstream, mut prev_received, mut prev_time) = (0i64, 0i64, 0i64);
        let mut frames = 0u32;
        let mut i = 0;
        while i < events.len() {
            let head = &events[i];
            let mut end = i + 1;
            while end < events.len()
                && !starts_frame_after(Some(events[end - 1].upstream_seq), &events[end])
            {
                end += 1;
            }
            frames += 1;
            put_var(meta, zigzag(head.upstream_seq.wrapping_sub(prev_upstream)));
            put_var(meta, zigzag(head.received_us.wrapping_sub(prev_received)));
            prev_upstream = head.upstream_seq;
            prev_received = head.received_us;
            let raw_len = match raw_lens.as_mut() {
                None => {
                    self.raw_buf.extend_from_slice(&head.raw_frame);
                    head.raw_frame.len()
                }
                Some(lens) => lens
                    .next()
                    .ok_or_else(|| corrupt("fewer raw frame lengths than frames"))?,
            };
            put_var(meta, raw_len as u64);
            let next = did_list.len() as u64;
            let did = *dids.entry(&*head.did).or_insert_with(|| {
                did_list.push(&*head.did);
                next
            });
            put_var(meta, did);
            put_var(meta, (end - i) as u64);
            for event in &events[i..end] {
                put_var(meta, zigzag(event.time_us.wrapping_sub(prev_time)));
                prev_time = event.time_us;
                meta.push(kind_code(event.kind));
                put_var(meta, u64::from(event.op_index));
                let collection = match &event.collection {
                    Some(c) => {
                        let next = collection_list.len() as u64;
                        1 + *collections.entry(&**c).or_insert_with(|| {
                            collection_list.push(&**c);
                            next
                        })
                    }
                    None => 0,
                };
                put_var(meta, collection);
                let split = body::split(event, check);
                let presence = if event.v1_json.is_some() { SHAPE_V1 } else { 0 }
                    | if event.v2_json.is_some() { SHAPE_V2 } else { 0 };
                match split {
                    Split::Nothing => meta.push(SHAPE_NOTHING),
                    Split::Verbatim { v1, v2 } => {
                        meta.push(SHAPE_VERBATIM | presence);
                        for part in [v1, v2].into_iter().flatten() {
                            put_var(meta, part.len() as u64);
                            other.extend_from_slice(part);
                        }
                    }
                    Split::Wrapped { body, .. } => {
                        meta.push(SHAPE_WRAPPED | presence);
                        put_var(meta, body.len() as u64);
                        other.extend_from_slice(body);
                    }
                    Split::TooBig { tail } => {
                        meta.push(SHAPE_TOO_BIG | presence);
                        put_var(meta, tail.len() as u64);
                        other.extend_from_slice(tail);
                    }
                    Split::Commit(p) => {
                        meta.push(SHAPE_COMMIT | presence);
                        let flags_at = meta.len();
                        let mut flags = p.action | (record_code(p.record) << 2);
                        meta.push(0);
                        match body::tid_value(p.rev) {
                            Some(v) => {
                                flags |= F_REV_TID;
                                revs.extend_from_slice(&v.to_le_bytes());
                            }
                            None => {
                                put_var(meta, p.rev.len() as u64);
                                strs.extend_from_slice(p.rev);
                            }
                        }
                        match body::tid_value(p.rkey) {
                            Some(v) => {
                                flags |= F_RKEY_TID;
                                rkeys.extend_from_slice(&v.to_le_bytes());
                            }
                            None => {
                                put_var(meta, p.rkey.len() as u64);
                                strs.extend_from_slice(p.rkey);
                            }
                        }
                        if p.record == RecordPart::Json {
                            put_var(meta, p.record_json.len() as u64);
                            records.extend_from_slice(p.record_json);
                        }
                        if let Some(cid) = p.cid {
                            flags |= F_CID;
                            let start = cids.len();
                            if body::cid_bytes(cid, cids) {
                                flags |= F_CID_BIN;
                                put_var(meta, (cids.len() - start) as u64);
                            } else {
                                put_var(meta, cid.len() as u64);
                                strs.extend_from_slice(cid);
                            }
                        }
                        meta[flags_at] = flags;
                    }
                }
            }
            i = end;
        }
        if raw_lens.is_some_and(|lens| lens.next().is_some()) {
            return Err(corrupt("more raw frame lengths than frames"));
        }
        for list in [&did_list, &collection_list] {
            put_var(dict, list.len() as u64);
            for s in list.iter() {
                put_var(dict, s.len() as u64);
                dict.extend_from_slice(s.as_bytes());
            }
        }
        Ok(frames)
    }
}

/// Appends `data` compressed to `out`, returning the compressed length (0 for no data).
/// zstd writes straight into `out`'s spare room (reserved to the worst case), so the
/// compressed bytes are not copied again.
fn compress_into(
    c: &mut zstd::bulk::Compressor<'static>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, LogError> {
    if data.is_empty() {
        return Ok(0);
    }
    let at = out.len();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    let mut dest = std::io::Cursor::new(&mut *out);
    dest.set_position(at as u64);
    let n = c
        .compress_to_buffer(data, &mut dest)
        .map_err(|e| LogError::Backend(format!("zstd: {e}")))?;
    debug_assert_eq!(out.len(), at + n);
    Ok(n)
}

/// A bounds-checked little-endian reader over stored bytes.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], LogError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("truncated segment"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], LogError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(super) fn var(&mut self) -> Result<u64, LogError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }
    pub(super) fn u8(&mut self) -> Result<u8, LogError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, LogError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, LogError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, LogError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(super) fn i64(&mut self) -> Result<i64, LogError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(super) fn str(&mut self, n: usize) -> Result<&'a str, LogError> {
        std::str::from_utf8(self.take(n)?).map_err(|_| corrupt("invalid UTF-8 in segment"))
    }
}

/// Runs `f` with this thread's zstd decompression context.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<T, LogError>,
) -> Result<T, LogError> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| LogError::Backend(format!("zstd: {e}")))?,
            );
        }
        match slot.as_mut() {
            Some(d) => f(d),
            None => Err(LogError::Backend("zstd context".into())),
        }
    })
}

/// Checks that a column decompressed to exactly its stored plain length.
fn check_plain(got: usize, plain_len: usize) -> Result<(), LogError> {
    if got != plain_len {
        return Err(corrupt(format!(
            "column decompressed to {got} bytes, expected {plain_len}"
        )));
    }
    Ok(())
}

/// Decompresses one column into a fresh buffer of its own (for columns whose bytes the
/// decoded events keep: the raw frames, and format 1's messages).
pub(super) fn decompress(data: &[u8], plain_len: usize) -> Result<Bytes, LogError> {
    if plain_len == 0 {
        return if data.is_empty() {
            Ok(Bytes::new())
        } else {
            Err(corrupt("data in an empty column"))
        };
    }
    with_decompressor(|d| {
        let out = d
            .decompress(data, plain_len)
            .map_err(|e| corrupt(format!("column does not decompress: {e}")))?;
        check_plain(out.len(), plain_len)?;
        Ok(Bytes::from(out))
    })
}

/// Checks a column's stored plain length against what its zstd frame declares (the
/// encoder always writes the content size), before a buffer is sized from it.
fn check_declared(data: &[u8], plain_len: usize) -> Result<(), LogError> {
    if data.is_empty() && plain_len == 0 {
        return Ok(());
    }
    match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n == plain_len as u64 => Ok(()),
        _ => Err(corrupt(format!(
            "column's frame does not declare its {plain_len} plain bytes"
        ))),
    }
}

/// Decompresses one column into `dest`, which is exactly its plain length.
fn decompress_into(data: &[u8], plain_len: usize, dest: &mut [u8]) -> Result<(), LogError> {
    if plain_len == 0 {
        return if data.is_empty() {
            Ok(())
        } else {
            Err(corrupt("data in an empty column"))
        };
    }
    with_decompressor(|d| {
        let n = d
            .decompress_to_buffer(data, dest)
            .map_err(|e| corrupt(format!("column does not decompress: {e}")))?;
        check_plain(n, plain_len)
    })
}

/// The raw frames of a segment, when `payloads.raw` asks for them.
fn frames_column(
    first_seq: u64,
    frames_value: Option<&[u8]>,
    payloads: Payloads,
) -> Result<Option<Bytes>, LogError> {
    match (payloads.raw, frames_value) {
        (false, _) => Ok(None),
        (true, None) => Err(corrupt("raw frames missing")),
        (true, Some(fv)) => {
            let mut f = Cursor::new(fv);
            if f.take(4)? != FRAMES_MAGIC {
                return Err(corrupt("bad frames magic"));
            }
            if f.u64()? != first_seq {
                return Err(corrupt("frames value belongs to another segment"));
            }
            let plain = f.u32()? as usize;
            Ok(Some(decompress(&fv[FRAMES_HEADER..], plain)?))
        }
    }
}

/// The header of an events value (any format): first seq and event count.
pub fn events_header(events_value: &[u8]) -> Result<(u64, u32), LogError> {
    let mut c = Cursor::new(events_value);
    let magic = c.take(4)?;
    if magic != EVENTS_MAGIC && magic != format1::MAGIC {
        return Err(corrupt("bad events magic"));
    }
    Ok((c.u64()?, c.u32()?))
}

/// The columns of a current-layout events value: (name, compressed bytes, plain bytes),
/// for benches and tests that account for where stored bytes go.
pub fn column_sizes(events_value: &[u8]) -> Result<Vec<(&'static str, usize, usize)>, LogError> {
    const NAMES: [&str; COLUMNS] = [
        "meta", "dict", "strs", "revs", "rkeys", "cids", "records", "other",
    ];
    let mut c = Cursor::new(events_value);
    if c.take(4)? != EVENTS_MAGIC {
        return Err(corrupt("not a current-layout events value"));
    }
    c.take(16)?;
    NAMES
        .iter()
        .map(|&name| Ok((name, c.u32()? as usize, c.u32()? as usize)))
        .collect()
}

/// Decodes a stored segment of any format. `frames_value` is needed only when
/// `payloads.raw`; with [`Payloads::ALL`] every column is decompressed, so every checksum
/// is checked.
pub fn decode(
    events_value: &[u8],
    frames_value: Option<&[u8]>,
    payloads: Payloads,
) -> Result<Vec<Event>, LogError> {
    decode_with(
        events_value,
        frames_value,
        payloads,
        &mut DecodeScratch::default(),
    )
}

/// [`decode`] with buffers kept from an earlier decode: a reader that decodes segment
/// after segment reuses them instead of allocating (and faulting in) its columns afresh.
pub fn decode_with(
    events_value: &[u8],
    frames_value: Option<&[u8]>,
    payloads: Payloads,
    scratch: &mut DecodeScratch,
) -> Result<Vec<Event>, LogError> {
    match events_value.get(..4) {
        Some(m) if m == EVENTS_MAGIC => {
            decode_current(events_value, frames_value, payloads, scratch, None)
        }
        Some(m) if m == format1::MAGIC => format1::decode(events_value, frames_value, payloads),
        _ => Err(corrupt("bad events magic")),
    }
}

/// A stored segment decoded for a merge ([`Encoder::encode_merged`]): its events with
/// their JSON but no raw frames, each frame's raw length, and its raw frames.
#[derive(Debug)]
pub struct MergeSource {
    pub events: Vec<SharedEvent>,
    frame_lens: Vec<usize>,
    raw: MergeRaw,
}

/// A merged segment's raw frames.
#[derive(Debug)]
enum MergeRaw {
    /// The frames value as stored (header and zstd frames), checked in structure: its
    /// frames declare `plain` bytes in all, which its events' frames add up to. Its
    /// checksums are checked when it is read.
    Stored { value: Vec<u8>, plain: usize },
    /// Plain frames of a layout that stores them otherwise.
    Plain(Vec<u8>),
}

impl MergeSource {
    /// Plain bytes of the raw frames.
    pub fn raw_plain(&self) -> usize {
        match &self.raw {
            MergeRaw::Stored { plain, .. } => *plain,
            MergeRaw::Plain(b) => b.len(),
        }
    }

    /// Stored bytes of the raw frames (their zstd frames), as kept.
    fn raw_stored(&self) -> usize {
        match &self.raw {
            MergeRaw::Stored { value, .. } => value.len().saturating_sub(FRAMES_HEADER),
            MergeRaw::Plain(_) => 0,
        }
    }

    /// Plain bytes of the segment (JSON and raw frames), as [`payload_bytes`] counts them.
    pub fn plain_bytes(&self) -> usize {
        self.raw_plain()
            + self
                .events
                .iter()
                .map(|e| payload_bytes(e, false))
                .sum::<usize>()
    }
}

/// Decodes a stored segment for a merge: every JSON column (so their checksums are
/// checked), the raw frames left compressed and checked in structure only (each zstd
/// frame's declared size; their checksums are checked whenever they are read).
pub fn decode_for_merge(
    events_value: &[u8],
    frames_value: Vec<u8>,
) -> Result<MergeSource, LogError> {
    let json = Payloads {
        v1: true,
        v2: true,
        raw: false,
    };
    if events_value.get(..4) != Some(EVENTS_MAGIC.as_slice()) {
        // Another layout: every payload decoded, the frames compressed again.
        let events = decode(events_value, Some(&frames_value), Payloads::ALL)?;
        let mut starts = FrameStarts::default();
        let mut frame_lens = Vec::new();
        let mut plain = Vec::new();
        for e in &events {
            if starts.next(e) {
                frame_lens.push(e.raw_frame.len());
                plain.extend_from_slice(&e.raw_frame);
            }
        }
        let events = events
            .into_iter()
            .map(|mut e| {
                e.raw_frame = Bytes::new();
                e
            })
            .collect();
        return Ok(MergeSource {
            events: SharedEvent::run(events),
            frame_lens,
            raw: MergeRaw::Plain(plain),
        });
    }
    let mut frame_lens = Vec::new();
    let events = decode_current(
        events_value,
        None,
        json,
        &mut DecodeScratch::default(),
        Some(&mut frame_lens),
    )?;
    let first_seq = events.first().map_or(0, |e| e.seq);
    let mut f = Cursor::new(&frames_value);
    if f.take(4)? != FRAMES_MAGIC {
        return Err(corrupt("bad frames magic"));
    }
    if f.u64()? != first_seq {
        return Err(corrupt("frames value belongs to another segment"));
    }
    let plain = f.u32()? as usize;
    if frame_lens.iter().try_fold(0usize, |a, &l| a.checked_add(l)) != Some(plain) {
        return Err(corrupt("raw frame lengths do not add up to the frames"));
    }
    let mut rest = &frames_value[FRAMES_HEADER..];
    let mut declared = 0u64;
    while !rest.is_empty() {
        let n = zstd::zstd_safe::find_frame_compressed_size(rest)
            .ok()
            .filter(|&n| n > 0 && n <= rest.len())
            .ok_or_else(|| corrupt("raw frames are not whole zstd frames"))?;
        match zstd::zstd_safe::get_frame_content_size(&rest[..n]) {
            Ok(Some(size)) => declared = declared.saturating_add(size),
            _ => return Err(corrupt("a raw zstd frame does not declare its size")),
        }
        rest = &rest[n..];
    }
    if declared != plain as u64 {
        return Err(corrupt(format!(
            "raw zstd frames declare {declared} bytes, the frames value {plain}"
        )));
    }
    Ok(MergeSource {
        events: SharedEvent::run(events),
        frame_lens,
        raw: MergeRaw::Stored {
            value: frames_value,
            plain,
        },
    })
}

/// What a decode needs only while it runs (the plain columns: the events it returns
/// hold their own assembled JSON and raw frames, never these), kept to be reused.
#[derive(Debug, Default)]
pub struct DecodeScratch {
    columns: Vec<u8>,
}

impl DecodeScratch {
    /// Bytes held between decodes.
    pub fn capacity(&self) -> usize {
        self.columns.capacity()
    }
}

/// A column's bytes from `pos` on, `len` long (`None` when the column was not read).
fn part<'a>(col: Option<&'a [u8]>, pos: &mut usize, len: usize) -> Result<&'a [u8], LogError> {
    let start = *pos;
    let end = start
        .checked_add(len)
        .ok_or_else(|| corrupt("length overflow"))?;
    *pos = end;
    match col {
        None => Ok(&[]),
        Some(b) => b
            .get(start..end)
            .ok_or_else(|| corrupt("value beyond its column")),
    }
}

fn tid_at(col: Option<&[u8]>, pos: &mut usize) -> Result<u64, LogError> {
    let b = part(col, pos, 8)?;
    Ok(match b.try_into() {
        Ok(a) => u64::from_le_bytes(a),
        Err(_) => 0,
    })
}

/// Fixed bytes of an assembled message besides its variable parts (DID, collection,
/// record, CID and the `other` column's bodies): the longest envelope (v2's, with a
/// 20-digit seq and its RFC 3339 time) plus a commit's keys and two TIDs, rounded up.
const ASSEMBLED_FIXED_BYTES: usize = 320;

/// `raw_lens`, when given, gets each frame's raw length in order (whether or not the raw
/// frames are read).
fn decode_current(
    events_value: &[u8],
    frames_value: Option<&[u8]>,
    payloads: Payloads,
    scratch: &mut DecodeScratch,
    mut raw_lens: Option<&mut Vec<usize>>,
) -> Result<Vec<Event>, LogError> {
    let mut c = Cursor::new(events_value);
    c.take(4)?;
    let first_seq = c.u64()?;
    let count = c.u32()? as usize;
    let frames = c.u32()? as usize;
    let mut lens = [(0usize, 0usize); COLUMNS];
    for l in &mut lens {
        *l = (c.u32()? as usize, c.u32()? as usize);
    }
    let json = payloads.v1 || payloads.v2;
    let wanted = |i: usize| i == C_META || i == C_DICT || json;
    // Every wanted column decompressed straight into one buffer, at known offsets. A
    // plain length is trusted for the buffer only when the column's zstd frame says the
    // same.
    let mut ranges = [(0usize, 0usize); COLUMNS];
    let mut data: [&[u8]; COLUMNS] = [&[]; COLUMNS];
    let mut total = 0usize;
    for (i, (clen, plain)) in lens.into_iter().enumerate() {
        data[i] = c.take(clen)?;
        if wanted(i) {
            check_declared(data[i], plain)?;
            let end = total
                .checked_add(plain)
                .ok_or_else(|| corrupt("column lengths overflow"))?;
            ranges[i] = (total, end);
            total = end;
        }
    }
    let buf = &mut scratch.columns;
    if buf.len() < total {
        buf.resize(total, 0);
    }
    for (i, (start, end)) in ranges.into_iter().enumerate() {
        if wanted(i) {
            decompress_into(data[i], end - start, &mut buf[start..end])?;
        }
    }
    let buf = &scratch.columns[..total];
    let cols: [Option<&[u8]>; COLUMNS] =
        std::array::from_fn(|i| wanted(i).then(|| &buf[ranges[i].0..ranges[i].1]));
    let raw = frames_column(first_seq, frames_value, payloads)?;
    let dict = cols[C_DICT].unwrap_or_default();
    let mut d = Cursor::new(dict);
    // The segment's DIDs and collections, one shared copy each: its events point at them
    // (no string is made per event).
    let mut tables: [Vec<Arc<str>>; 2] = Default::default();
    // The longest entry of each table, for the assembled messages' reservation.
    let mut longest = [0usize; 2];
    for (table, longest) in tables.iter_mut().zip(&mut longest) {
        let n = d.var()? as usize;
        // Each entry takes at least one byte: never trust a stored count for an allocation.
        table.reserve(n.min(dict.len()));
        for _ in 0..n {
            let len = d.var()? as usize;
            table.push(Arc::from(d.str(len)?));
            *longest = (*longest).max(len);
        }
    }
    let [dids, collections] = tables;
    let meta = cols[C_META].unwrap_or_default();
    let mut m = Cursor::new(meta);
    // Each event takes at least 5 bytes of metadata.
    let mut out: Vec<Event> = Vec::with_capacity(count.min(meta.len() / 5));
    let mut pos = [0usize; COLUMNS];
    let mut wire_out: [Vec<u8>; 2] = Default::default();
    if json {
        // One reservation that holds the whole segment's messages (sized from what was
        // decompressed, never from a stored count), so assembling never moves them: the
        // columns' variable parts (a binary CID grows to at most twice its bytes as
        // text), and per event its envelope, DID and collection, escaped (at most six
        // bytes per byte).
        let len = |i: usize| cols[i].map_or(0, <[u8]>::len);
        let reserve = len(C_RECORDS)
            + len(C_OTHER)
            + len(C_STRS)
            + 2 * len(C_CIDS)
            + out.capacity() * (ASSEMBLED_FIXED_BYTES + 6 * (longest[0] + longest[1]));
        for (slot, on) in [(0, payloads.v1), (1, payloads.v2)] {
            if on {
                wire_out[slot].reserve_exact(reserve);
            }
        }
    }
    let mut ranges: Vec<[(u32, u32); 2]> = Vec::with_capacity(out.capacity());
    let (mut rev_buf, mut rkey_buf, mut cid_buf) = (Vec::new(), Vec::new(), Vec::new());
    let (mut upstream_seq, mut received_us, mut time_us) = (0i64, 0i64, 0i64);
    let mut raw_pos = 0usize;
    for _ in 0..frames {
        upstream_seq = upstream_seq.wrapping_add(unzigzag(m.var()?));
        received_us = received_us.wrapping_add(unzigzag(m.var()?));
        let raw_len = m.var()? as usize;
        if let Some(lens) = raw_lens.as_deref_mut() {
            lens.push(raw_len);
        }
        let did = dids
            .get(m.var()? as usize)
            .ok_or_else(|| corrupt("DID number beyond the table"))?;
        let n = m.var()? as usize;
        let raw_frame = next_raw_frame(raw.as_ref(), &mut raw_pos, raw_len)?;
        for _ in 0..n {
            time_us = time_us.wrapping_add(unzigzag(m.var()?));
            let kind = kind_from(m.u8()?)?;
            let op_index = u16::try_from(m.var()?).map_err(|_| corrupt("op index out of range"))?;
            let collection = match m.var()? {
                0 => None,
                k => {
                    Some(Arc::clone(collections.get(k as usize - 1).ok_or_else(
                        || corrupt("collection number beyond the table"),
                    )?))
                }
            };
            let seq = seq_at(first_seq, out.len())?;
            let event = Event {
                seq,
                time_us,
                upstream_seq,
                received_us,
                kind,
                did: Arc::clone(did),
                collection,
                op_index,
                v1_json: None,
                v2_json: None,
                raw_frame: raw_frame.clone(),
            };
            let shape = m.u8()?;
            let split = match shape & 7 {
                SHAPE_NOTHING => Split::Nothing,
                SHAPE_VERBATIM => {
                    let mut v = [None, None];
                    for (bit, slot) in [(SHAPE_V1, 0), (SHAPE_V2, 1)] {
                        if shape & bit != 0 {
                            let len = m.var()? as usize;
                            v[slot] = Some(part(cols[C_OTHER], &mut pos[C_OTHER], len)?);
                        }
                    }
                    Split::Verbatim { v1: v[0], v2: v[1] }
                }
                SHAPE_WRAPPED => {
                    let len = m.var()? as usize;
                    Split::Wrapped {
                        v1: shape & SHAPE_V1 != 0,
                        body: part(cols[C_OTHER], &mut pos[C_OTHER], len)?,
                    }
                }
                SHAPE_TOO_BIG => {
                    let len = m.var()? as usize;
                    Split::TooBig {
                        tail: part(cols[C_OTHER], &mut pos[C_OTHER], len)?,
                    }
                }
                SHAPE_COMMIT => {
                    let flags = m.u8()?;
                    rev_buf.clear();
                    rkey_buf.clear();
                    cid_buf.clear();
                    if flags & F_REV_TID != 0 {
                        body::push_tid(&mut rev_buf, tid_at(cols[C_REVS], &mut pos[C_REVS])?);
                    } else {
                        let len = m.var()? as usize;
                        rev_buf.extend_from_slice(part(cols[C_STRS], &mut pos[C_STRS], len)?);
                    }
                    if flags & F_RKEY_TID != 0 {
                        body::push_tid(&mut rkey_buf, tid_at(cols[C_RKEYS], &mut pos[C_RKEYS])?);
                    } else {
                        let len = m.var()? as usize;
                        rkey_buf.extend_from_slice(part(cols[C_STRS], &mut pos[C_STRS], len)?);
                    }
                    let record = record_from(flags >> 2);
                    let record_json = if record == RecordPart::Json {
                        let len = m.var()? as usize;
                        part(cols[C_RECORDS], &mut pos[C_RECORDS], len)?
                    } else {
                        &[]
                    };
                    let cid = if flags & F_CID != 0 {
                        let len = m.var()? as usize;
                        if flags & F_CID_BIN != 0 {
                            body::push_cid(
                                &mut cid_buf,
                                part(cols[C_CIDS], &mut pos[C_CIDS], len)?,
                            );
                        } else {
                            cid_buf.extend_from_slice(part(cols[C_STRS], &mut pos[C_STRS], len)?);
                        }
                        true
                    } else {
                        false
                    };
                    Split::Commit(CommitParts {
                        rev: &rev_buf,
                        action: flags & 3,
                        rkey: &rkey_buf,
                        record,
                        record_json,
                        cid: cid.then_some(cid_buf.as_slice()),
                    })
                }
                other => return Err(corrupt(format!("unknown JSON shape {other}"))),
            };
            let mut range = [(0u32, u32::MAX); 2];
            for (slot, wanted) in [(0usize, payloads.v1), (1, payloads.v2)] {
                if !wanted {
                    continue;
                }
                let buf = &mut wire_out[slot];
                let start = buf.len();
                if body::assemble(&event, did, &split, slot == 0, buf) {
                    range[slot] = (
                        len_u32(start, "assembled JSON")?,
                        len_u32(buf.len(), "assembled JSON")?,
                    );
                }
            }
            ranges.push(range);
            // Its messages are set below, once the segment's buffers are done.
            out.push(event);
        }
    }
    if out.len() != count {
        return Err(corrupt(format!(
            "segment holds {} events, header says {count}",
            out.len()
        )));
    }
    if json {
        // Escaped DIDs and collections rarely come near the bound: give the surplus back
        // (in place), since cached segments hold these buffers.
        for buf in &mut wire_out {
            if buf.capacity() > buf.len() + buf.len() / 4 {
                buf.shrink_to_fit();
            }
        }
        let [v1, v2] = wire_out.map(Bytes::from);
        for (event, [r1, r2]) in out.iter_mut().zip(&ranges) {
            if r1.1 == u32::MAX && r2.1 == u32::MAX {
                continue;
            }
            if r1.1 != u32::MAX {
                event.v1_json = Some(v1.slice(r1.0 as usize..r1.1 as usize));
            }
            if r2.1 != u32::MAX {
                event.v2_json = Some(v2.slice(r2.0 as usize..r2.1 as usize));
            }
        }
    }
    Ok(out)
}

/// The next `len` bytes of the raw-frame column (both layouts store frames back to back in
/// it), advancing `pos`; empty when the read did not ask for raw frames.
fn next_raw_frame(raw: Option<&Bytes>, pos: &mut usize, len: usize) -> Result<Bytes, LogError> {
    let Some(raw) = raw else {
        return Ok(Bytes::new());
    };
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= raw.len())
        .ok_or_else(|| corrupt("raw frame beyond its column"))?;
    let frame = raw.slice(*pos..end);
    *pos = end;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, upstream: i64, op: u16, frame: &Bytes) -> SharedEvent {
        SharedEvent::new(Event {
            seq,
            time_us: 1000 + seq as i64,
            upstream_seq: upstream,
            received_us: 5,
            kind: if op == 0 && seq % 3 == 0 {
                EventKind::Identity
            } else {
                EventKind::Commit
            },
            did: format!("did:plc:{upstream}").into(),
            collection: (seq % 2 == 0).then(|| "app.bsky.feed.post".into()),
            op_index: op,
            v1_json: (seq % 5 != 0).then(|| Bytes::from(format!("{{\"v1\":{seq}}}"))),
            v2_json: Some(Bytes::from(format!("{{\"v2\":{seq}}}"))),
            raw_frame: frame.clone(),
        })
    }

    #[test]
    fn round_trip_and_corruption() {
        let f1 = Bytes::from_static(b"frame-one");
        let f2 = Bytes::from_static(b"frame-two-longer");
        let events = vec![ev(7, 100, 0, &f1), ev(8, 100, 1, &f1), ev(9, 101, 0, &f2)];
        let mut enc = Encoder::new(Compression::default()).unwrap();
        let seg = enc.encode(&events).unwrap();
        assert_eq!(seg.info.first_seq, 7);
        assert_eq!(seg.info.last_seq, 9);
        let back = decode(&seg.events_value, Some(&seg.frames_value), Payloads::ALL).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in events.iter().zip(&back) {
            assert_eq!(a.seq, b.seq);
            assert_eq!(a.time_us, b.time_us);
            assert_eq!(a.upstream_seq, b.upstream_seq);
            assert_eq!(a.kind, b.kind);
            assert_eq!(a.did, b.did);
            assert_eq!(a.collection, b.collection);
            assert_eq!(a.op_index, b.op_index);
            assert_eq!(a.v1_json, b.v1_json);
            assert_eq!(a.v2_json, b.v2_json);
            assert_eq!(a.raw_frame, b.raw_frame);
        }
        let v1_only = decode(&seg.events_value, None, Payloads::V1).unwrap();
        assert!(v1_only[0].raw_frame.is_empty() && v1_only[0].v2_json.is_none());
        for i in 0..seg.events_value.len() {
            let mut bad = seg.events_value.clone();
            bad[i] ^= 0x55;
            let _ = decode(&bad, Some(&seg.frames_value), Payloads::ALL);
        }
        let mut bad = seg.events_value.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        assert!(decode(&bad, Some(&seg.frames_value), Payloads::ALL).is_err());
        bad.truncate(n - 5);
        assert!(decode(&bad, None, Payloads::V1).is_err());
    }

    /// Events of `frames` frames of 1-3 events each from `seq` on, each frame `size`
    /// bytes of frame-specific content (zstd finds little across frames).
    fn frames_of(seq: u64, frames: u64, size: usize) -> Vec<SharedEvent> {
        let mut out = Vec::new();
        let mut next = seq;
        for f in 0..frames {
            let upstream = 1000 + (seq + f) as i64;
            let mut x = (upstream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let body: Vec<u8> = (0..size)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i % 3 == 0 {
                        b'a' + (i % 7) as u8
                    } else {
                        x as u8
                    }
                })
                .collect();
            let frame = Bytes::from(body);
            for op in 0..=(f % 3) as u16 {
                out.push(ev(next, upstream, op, &frame));
                next += 1;
            }
        }
        out
    }

    /// Stores `segments` as committed segments are stored, then decodes them for a merge.
    fn merge_sources(enc: &mut Encoder, segments: &[Vec<SharedEvent>]) -> Vec<MergeSource> {
        segments
            .iter()
            .map(|events| {
                let seg = enc.encode(events).unwrap();
                decode_for_merge(&seg.events_value, seg.frames_value).unwrap()
            })
            .collect()
    }

    /// The zstd frames a frames value holds.
    fn zstd_frames(frames_value: &[u8]) -> usize {
        let mut rest = &frames_value[FRAMES_HEADER..];
        let mut n = 0;
        while !rest.is_empty() {
            let len = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            rest = &rest[len..];
            n += 1;
        }
        n
    }

    #[test]
    fn a_merge_keeps_large_segments_frames_and_compresses_small_ones_again() {
        let sizes = [(40u64, 4000usize), (3, 500), (2, 700), (30, 4000), (1, 300)];
        let mut segments = Vec::new();
        let mut seq = 1;
        for (frames, size) in sizes {
            let events = frames_of(seq, frames, size);
            seq += events.len() as u64;
            segments.push(events);
        }
        let all: Vec<SharedEvent> = segments.iter().flatten().cloned().collect();
        let mut enc = Encoder::new(Compression::default()).unwrap();
        let sources = merge_sources(&mut enc, &segments);
        let refs: Vec<&MergeSource> = sources.iter().collect();
        // Kept: 40 x 4000 and 30 x 4000 plain bytes are at least 64 KiB; the three small
        // ones between and after are compressed again, together up to the next kept one.
        let merged = enc.encode_merged(&refs, 3, 64 * 1024).unwrap();
        assert_eq!(zstd_frames(&merged.frames_value), 4);
        let kept = &merged.frames_value[FRAMES_HEADER..];
        // The first segment's zstd frame is in it byte for byte.
        let first = enc.encode(&segments[0]).unwrap();
        let first = &first.frames_value[FRAMES_HEADER..];
        assert_eq!(&kept[..first.len()], first);
        let check = |seg: &EncodedSegment| {
            let back = decode(&seg.events_value, Some(&seg.frames_value), Payloads::ALL).unwrap();
            assert_eq!(back.len(), all.len());
            for (a, b) in all.iter().zip(&back) {
                assert_eq!(
                    (a.seq, a.upstream_seq, a.op_index),
                    (b.seq, b.upstream_seq, b.op_index)
                );
                assert_eq!((&a.v1_json, &a.v2_json), (&b.v1_json, &b.v2_json));
                assert_eq!(a.raw_frame, b.raw_frame, "raw of seq {}", a.seq);
            }
        };
        check(&merged);
        // Every zstd frame carries its checksum: a flipped byte anywhere in the frames is
        // an error, never other frames and never a panic.
        let body = FRAMES_HEADER..merged.frames_value.len();
        for i in body.step_by(97) {
            let mut bad = merged.frames_value.clone();
            bad[i] ^= 0x20;
            assert!(
                decode(&merged.events_value, Some(&bad), Payloads::RAW).is_err(),
                "flip at {i} not detected"
            );
        }
        // Everything kept (0), and everything compressed again (what the merge did before
        // session 17): the latter is byte for byte the segment a commit of all the events
        // stores, so stores merged before read as they did.
        let kept_all = enc.encode_merged(&refs, 3, 0).unwrap();
        assert_eq!(zstd_frames(&kept_all.frames_value), segments.len());
        check(&kept_all);
        let again = enc.encode_merged(&refs, 3, usize::MAX).unwrap();
        let whole = enc.encode_at(&all, 3).unwrap();
        assert_eq!(again.frames_value, whole.frames_value);
        assert_eq!(again.events_value, whole.events_value);
        assert_eq!(again.info, whole.info);
        assert_eq!(zstd_frames(&again.frames_value), 1);
    }

    #[test]
    fn a_segment_whose_frames_do_not_add_up_is_not_merged() {
        let events = frames_of(1, 5, 2000);
        let mut enc = Encoder::new(Compression::default()).unwrap();
        let seg = enc.encode(&events).unwrap();
        let fv = &seg.frames_value;
        // Truncated zstd frame, a frame cut at its end, bytes after it, a header that
        // declares other plain bytes, another segment's seq: errors, never a panic.
        let mut cases: Vec<Vec<u8>> = vec![
            fv[..fv.len() - 1].to_vec(),
            fv[..FRAMES_HEADER + 3].to_vec(),
            [fv.as_slice(), b"junk"].concat(),
            fv[..FRAMES_HEADER].to_vec(),
        ];
        let mut plain = fv.clone();
        plain[12] ^= 1;
        cases.push(plain);
        let mut seq = fv.clone();
        seq[4] ^= 1;
        cases.push(seq);
        for (i, bad) in cases.into_iter().enumerate() {
            assert!(
                decode_for_merge(&seg.events_value, bad).is_err(),
                "case {i} accepted"
            );
        }
        assert!(decode_for_merge(&seg.events_value, fv.clone()).is_ok());
    }

    #[test]
    fn json_level_is_applied() {
        let f = Bytes::from_static(b"frame");
        let events: Vec<_> = (1..400u64)
            .map(|i| {
                let mut e = (*ev(i, i as i64, 0, &f)).clone();
                e.v1_json = Some(Bytes::from(format!(
                    "{{\"did\":\"did:plc:{}\",\"time_us\":{},\"kind\":\"commit\",\"text\":\"post number {} says {}\"}}",
                    i % 37,
                    1_700_000_000_000_000u64 + i * 977,
                    i,
                    i * i % 1013
                )));
                SharedEvent::new(e)
            })
            .collect();
        let size = |json_level| {
            let mut enc = Encoder::new(Compression {
                json_level,
                raw_level: -1,
                raw_fast_level: -1,
            })
            .unwrap();
            let seg = enc.encode(&events).unwrap();
            // The reused buffers give the same bytes on a second encode.
            assert_eq!(enc.encode(&events).unwrap().events_value, seg.events_value);
            let back = decode(&seg.events_value, Some(&seg.frames_value), Payloads::ALL).unwrap();
            assert_eq!(back.len(), events.len());
            seg.events_value.len()
        };
        let (fast, strong) = (size(1), size(19));
        eprintln!("events value: level 1 {fast} B, level 19 {strong} B");
        assert!(strong < fast, "the level changes the output");
    }

    /// One scratch buffer decoding segments of different sizes in turn (large, small,
    /// large again, with every payload choice) gives every event exactly, and a stored
    /// plain length that disagrees with its column's frame is refused before any buffer
    /// is sized from it.
    #[test]
    fn reused_decode_buffers_give_every_event_exactly() {
        let segment = |first: u64, frames: u64| -> Vec<SharedEvent> {
            let mut out = Vec::new();
            for k in 0..frames {
                let frame = Bytes::from(vec![(k % 251) as u8; 40 + (k as usize * 13) % 900]);
                let seq = first + out.len() as u64;
                out.push(ev(seq, 10_000 + (first + k) as i64, 0, &frame));
                if k % 3 == 0 {
                    out.push(ev(seq + 1, 10_000 + (first + k) as i64, 1, &frame));
                }
            }
            out
        };
        let mut enc = Encoder::new(Compression::default()).unwrap();
        let large = segment(1, 400);
        let small = segment(1000, 3);
        let medium = segment(2000, 90);
        let order = [&large, &small, &large, &medium, &small];
        let encoded: Vec<_> = order
            .iter()
            .map(|&events| (events, enc.encode(events).unwrap()))
            .collect();
        let mut scratch = DecodeScratch::default();
        for payloads in [Payloads::ALL, Payloads::V1, Payloads::V2, Payloads::RAW] {
            for (events, seg) in &encoded {
                let frames = payloads.raw.then_some(seg.frames_value.as_slice());
                let got = decode_with(&seg.events_value, frames, payloads, &mut scratch).unwrap();
                assert_eq!(got.len(), events.len());
                for (want, got) in events.iter().zip(&got) {
                    assert_eq!((want.seq, want.time_us), (got.seq, got.time_us));
                    assert_eq!(want.upstream_seq, got.upstream_seq);
                    assert_eq!((&want.did, &want.collection), (&got.did, &got.collection));
                    let v1 = want.v1_json.as_ref().filter(|_| payloads.v1);
                    let v2 = want.v2_json.as_ref().filter(|_| payloads.v2);
                    assert_eq!(got.v1_json.as_ref(), v1, "v1 of seq {}", want.seq);
                    assert_eq!(got.v2_json.as_ref(), v2, "v2 of seq {}", want.seq);
                    if payloads.raw {
                        assert_eq!(got.raw_frame, want.raw_frame, "raw of seq {}", want.seq);
                    } else {
                        assert!(got.raw_frame.is_empty());
                    }
                }
            }
        }
        assert!(scratch.capacity() > 0, "the buffer is kept between decodes");
        // The records column's plain length (header slot 6) made huge: refused as corrupt.
        let (_, seg) = &encoded[0];
        let mut bad = seg.events_value.clone();
        let at = 4 + 8 + 4 + 4 + C_RECORDS * 8 + 4;
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_with(&bad, None, Payloads::V1, &mut scratch),
            Err(LogError::Corrupt(_))
        ));
    }

    #[test]
    fn split_keeps_frames_whole() {
        let f = Bytes::from(vec![0u8; 100]);
        let events: Vec<_> = (0..10u64)
            .map(|i| ev(i + 1, (i / 2) as i64, (i % 2) as u16, &f))
            .collect();
        let parts = split_segments(&events, 150);
        assert!(parts.len() > 1);
        for p in &parts {
            assert_eq!(p[0].op_index, 0);
        }
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 10);
    }
}
