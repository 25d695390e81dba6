//! The stored form of a segment: events in columns, each column compressed with zstd.
//!
//! Owns: the byte layout of a stored segment and its verification. Must never: store a
//! raw frame more than once (all events of a frame share it), trust a length it read
//! without bounds checks, or panic on bytes read back from storage (any malformed input is
//! a [`LogError::Corrupt`]).
//!
//! A segment is encoded as two values, so that a reader can skip the raw frames (~75% of
//! the bytes) when its wire does not need them:
//! - the *events value*: a header, then three zstd frames: the metadata column (per
//!   frame: upstream seq, receipt time, raw length, DID; per event: time, kind, op index,
//!   collection, payload lengths), the v1 JSON column and the v2 JSON column;
//! - the *frames value*: one zstd frame holding the raw frames back to back.
//!
//! Every zstd frame carries its content checksum, so a torn or flipped byte is detected on
//! decode. Store-independent: the two values are plain bytes that any `EventStore` can keep.

use std::cell::RefCell;

use bytes::Bytes;

use crate::event::{Event, EventKind};

use super::store::{EncodedSegment, LogError, Payloads, Segment, SharedEvent};

const EVENTS_MAGIC: &[u8; 4] = b"SLE1";
const FRAMES_MAGIC: &[u8; 4] = b"SLF1";
const EVENTS_HEADER: usize = 4 + 8 + 4 + 4 + 3 * 8;
const FRAMES_HEADER: usize = 4 + 8 + 4;
const NONE_U32: u32 = u32::MAX;
const NONE_U16: u16 = u16::MAX;

/// zstd levels for the columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Metadata and JSON columns: very compressible, level matters for retention.
    pub json_level: i32,
    /// Raw CBOR frames: CIDs and signatures are incompressible; a fast level loses little.
    pub raw_level: i32,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            json_level: 1,
            raw_level: -3,
        }
    }
}

/// Splits `events` (whole frames) into runs of whole frames of about `target_bytes`
/// uncompressed each.
pub fn split_segments(events: &[SharedEvent], target_bytes: usize) -> Vec<&[SharedEvent]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, event) in events.iter().enumerate() {
        let new_frame = i == 0 || starts_frame(&events[i - 1], event);
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

fn starts_frame(prev: &Event, event: &Event) -> bool {
    event.op_index == 0 || event.upstream_seq != prev.upstream_seq
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

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn put_i64(buf: &mut Vec<u8>, v: i64) {
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

fn kind_from(code: u8) -> Result<EventKind, LogError> {
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

fn corrupt(msg: impl Into<String>) -> LogError {
    LogError::Corrupt(msg.into())
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses with the content checksum on, so corruption is caught on decode.
pub struct Encoder {
    json: zstd::bulk::Compressor<'static>,
    raw: zstd::bulk::Compressor<'static>,
    /// Column and output buffers, reused from segment to segment (a fresh megabyte
    /// buffer per segment costs page faults and zeroing).
    bufs: [Vec<u8>; 4],
    scratch: Vec<u8>,
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
            bufs: Default::default(),
            scratch: Vec::new(),
        })
    }

    /// Encodes whole frames of consecutive events into one segment.
    pub fn encode(&mut self, events: &[SharedEvent]) -> Result<EncodedSegment, LogError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Err(LogError::Backend("cannot encode an empty segment".into()));
        };
        let [mut meta, mut v1, mut v2, mut raw] = std::mem::take(&mut self.bufs);
        for b in [&mut meta, &mut v1, &mut v2, &mut raw] {
            b.clear();
        }
        let result = self.encode_into(events, first, last, [&mut meta, &mut v1, &mut v2, &mut raw]);
        self.bufs = [meta, v1, v2, raw];
        result
    }

    fn encode_into(
        &mut self,
        events: &[SharedEvent],
        first: &Event,
        last: &Event,
        [meta, v1, v2, raw]: [&mut Vec<u8>; 4],
    ) -> Result<EncodedSegment, LogError> {
        let mut frames = 0u32;
        let mut i = 0;
        while i < events.len() {
            let head = &events[i];
            let mut end = i + 1;
            while end < events.len() && !starts_frame(&events[end - 1], &events[end]) {
                end += 1;
            }
            frames += 1;
            put_i64(meta, head.upstream_seq);
            put_i64(meta, head.received_us);
            put_u32(meta, len_u32(head.raw_frame.len(), "frame")?);
            raw.extend_from_slice(&head.raw_frame);
            let did = head.did.as_bytes();
            put_u16(
                meta,
                u16::try_from(did.len()).map_err(|_| LogError::Backend("DID too long".into()))?,
            );
            meta.extend_from_slice(did);
            put_u32(meta, len_u32(end - i, "frame event count")?);
            for event in &events[i..end] {
                put_i64(meta, event.time_us);
                meta.push(kind_code(event.kind));
                put_u16(meta, event.op_index);
                match &event.collection {
                    Some(c) if c.len() < usize::from(NONE_U16) => {
                        put_u16(meta, c.len() as u16);
                        meta.extend_from_slice(c.as_bytes());
                    }
                    Some(_) => return Err(LogError::Backend("collection too long".into())),
                    None => put_u16(meta, NONE_U16),
                }
                for (payload, column) in [(&event.v1_json, &mut *v1), (&event.v2_json, &mut *v2)] {
                    match payload {
                        Some(b) => {
                            let len = len_u32(b.len(), "payload")?;
                            if len == NONE_U32 {
                                return Err(LogError::Backend("payload too large".into()));
                            }
                            put_u32(meta, len);
                            column.extend_from_slice(b);
                        }
                        None => put_u32(meta, NONE_U32),
                    }
                }
            }
            i = end;
        }
        let scratch = &mut self.scratch;
        // Appends `data` compressed to `out`, returning the compressed length.
        let mut compress = |c: &mut zstd::bulk::Compressor<'static>,
                            data: &[u8],
                            out: &mut Vec<u8>|
         -> Result<usize, LogError> {
            if data.is_empty() {
                return Ok(0);
            }
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(data.len()));
            let n = c
                .compress_to_buffer(data, scratch)
                .map_err(|e| LogError::Backend(format!("zstd: {e}")))?;
            out.extend_from_slice(&scratch[..n]);
            Ok(n)
        };
        let count = len_u32(events.len(), "segment event count")?;
        let mut columns = Vec::with_capacity((meta.len() + v1.len() + v2.len()) / 3 + 64);
        let mut lens = [(0usize, 0usize); 3];
        for (data, len) in [&*meta, &*v1, &*v2].into_iter().zip(&mut lens) {
            *len = (compress(&mut self.json, data, &mut columns)?, data.len());
        }
        let mut events_value = Vec::with_capacity(EVENTS_HEADER + columns.len());
        events_value.extend_from_slice(EVENTS_MAGIC);
        put_u64(&mut events_value, first.seq);
        put_u32(&mut events_value, count);
        put_u32(&mut events_value, frames);
        for (c, plain) in lens {
            put_u32(&mut events_value, len_u32(c, "column")?);
            put_u32(&mut events_value, len_u32(plain, "column")?);
        }
        events_value.extend_from_slice(&columns);
        let mut frames_value = Vec::with_capacity(FRAMES_HEADER + raw.len() / 2 + 64);
        frames_value.extend_from_slice(FRAMES_MAGIC);
        put_u64(&mut frames_value, first.seq);
        put_u32(&mut frames_value, len_u32(raw.len(), "frames")?);
        compress(&mut self.raw, raw, &mut frames_value)?;
        let info = Segment {
            first_seq: first.seq,
            last_seq: last.seq,
            first_time_us: first.time_us,
            last_time_us: last.time_us,
            first_upstream_seq: first.upstream_seq,
            last_upstream_seq: last.upstream_seq,
            bytes: (events_value.len() + frames_value.len()) as u64,
        };
        Ok(EncodedSegment {
            info,
            events_value,
            frames_value,
        })
    }
}

/// A bounds-checked little-endian reader over stored bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], LogError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("truncated segment"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], LogError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, LogError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, LogError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, LogError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, LogError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, LogError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn str(&mut self, n: usize) -> Result<&'a str, LogError> {
        std::str::from_utf8(self.take(n)?).map_err(|_| corrupt("invalid UTF-8 in segment"))
    }
}

fn decompress(data: &[u8], plain_len: usize) -> Result<Bytes, LogError> {
    if plain_len == 0 {
        return if data.is_empty() {
            Ok(Bytes::new())
        } else {
            Err(corrupt("data in an empty column"))
        };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| LogError::Backend(format!("zstd: {e}")))?,
            );
        }
        let Some(d) = slot.as_mut() else {
            return Err(LogError::Backend("zstd context".into()));
        };
        let out = d
            .decompress(data, plain_len)
            .map_err(|e| corrupt(format!("column does not decompress: {e}")))?;
        if out.len() != plain_len {
            return Err(corrupt(format!(
                "column decompressed to {} bytes, expected {plain_len}",
                out.len()
            )));
        }
        Ok(Bytes::from(out))
    })
}

/// The header of an events value: first seq and event count.
pub fn events_header(events_value: &[u8]) -> Result<(u64, u32), LogError> {
    let mut c = Cursor::new(events_value);
    if c.take(4)? != EVENTS_MAGIC {
        return Err(corrupt("bad events magic"));
    }
    Ok((c.u64()?, c.u32()?))
}

/// Decodes a stored segment. `frames_value` is needed only when `payloads.raw`; with
/// [`Payloads::ALL`] every column is decompressed, so every checksum is checked.
pub fn decode(
    events_value: &[u8],
    frames_value: Option<&[u8]>,
    payloads: Payloads,
) -> Result<Vec<Event>, LogError> {
    let mut c = Cursor::new(events_value);
    if c.take(4)? != EVENTS_MAGIC {
        return Err(corrupt("bad events magic"));
    }
    let first_seq = c.u64()?;
    let count = c.u32()? as usize;
    let frames = c.u32()? as usize;
    let mut lens = [(0usize, 0usize); 3];
    for l in &mut lens {
        *l = (c.u32()? as usize, c.u32()? as usize);
    }
    let meta_c = c.take(lens[0].0)?;
    let v1_c = c.take(lens[1].0)?;
    let v2_c = c.take(lens[2].0)?;
    let meta = decompress(meta_c, lens[0].1)?;
    let v1 = if payloads.v1 {
        Some(decompress(v1_c, lens[1].1)?)
    } else {
        None
    };
    let v2 = if payloads.v2 {
        Some(decompress(v2_c, lens[2].1)?)
    } else {
        None
    };
    let raw = match (payloads.raw, frames_value) {
        (false, _) => None,
        (true, None) => return Err(corrupt("raw frames missing")),
        (true, Some(fv)) => {
            let mut f = Cursor::new(fv);
            if f.take(4)? != FRAMES_MAGIC {
                return Err(corrupt("bad frames magic"));
            }
            if f.u64()? != first_seq {
                return Err(corrupt("frames value belongs to another segment"));
            }
            let plain = f.u32()? as usize;
            Some(decompress(&fv[FRAMES_HEADER..], plain)?)
        }
    };
    let mut m = Cursor::new(&meta);
    // Each event takes at least 21 bytes of metadata: never trust the stored count for an
    // allocation.
    let mut out = Vec::with_capacity(count.min(meta.len() / 21));
    let (mut v1_pos, mut v2_pos, mut raw_pos) = (0usize, 0usize, 0usize);
    let slice =
        |col: &Option<Bytes>, pos: &mut usize, len: u32| -> Result<Option<Bytes>, LogError> {
            if len == NONE_U32 {
                return Ok(None);
            }
            let len = len as usize;
            let start = *pos;
            let end = start
                .checked_add(len)
                .ok_or_else(|| corrupt("payload length"))?;
            *pos = end;
            match col {
                None => Ok(None),
                Some(b) if end <= b.len() => Ok(Some(b.slice(start..end))),
                Some(_) => Err(corrupt("payload beyond its column")),
            }
        };
    for _ in 0..frames {
        let upstream_seq = m.i64()?;
        let received_us = m.i64()?;
        let raw_len = m.u32()? as usize;
        let did_len = usize::from(m.u16()?);
        let did = m.str(did_len)?;
        let n = m.u32()? as usize;
        let raw_frame = match &raw {
            Some(r) => {
                let end = raw_pos
                    .checked_add(raw_len)
                    .filter(|&e| e <= r.len())
                    .ok_or_else(|| corrupt("raw frame beyond its column"))?;
                let b = r.slice(raw_pos..end);
                raw_pos = end;
                b
            }
            None => Bytes::new(),
        };
        for _ in 0..n {
            let time_us = m.i64()?;
            let kind = kind_from(m.u8()?)?;
            let op_index = m.u16()?;
            let coll_len = m.u16()?;
            let collection = if coll_len == NONE_U16 {
                None
            } else {
                Some(m.str(usize::from(coll_len))?.to_owned())
            };
            let v1_json = slice(&v1, &mut v1_pos, m.u32()?)?;
            let v2_json = slice(&v2, &mut v2_pos, m.u32()?)?;
            let seq = first_seq
                .checked_add(out.len() as u64)
                .ok_or_else(|| corrupt("seq overflow"))?;
            out.push(Event {
                seq,
                time_us,
                upstream_seq,
                received_us,
                kind,
                did: did.to_owned(),
                collection,
                op_index,
                v1_json,
                v2_json,
                raw_frame: raw_frame.clone(),
            });
        }
    }
    if out.len() != count {
        return Err(corrupt(format!(
            "segment holds {} events, header says {count}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ev(seq: u64, upstream: i64, op: u16, frame: &Bytes) -> SharedEvent {
        Arc::new(Event {
            seq,
            time_us: 1000 + seq as i64,
            upstream_seq: upstream,
            received_us: 5,
            kind: if op == 0 && seq % 3 == 0 {
                EventKind::Identity
            } else {
                EventKind::Commit
            },
            did: format!("did:plc:{upstream}"),
            collection: (seq % 2 == 0).then(|| "app.bsky.feed.post".to_string()),
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
                Arc::new(e)
            })
            .collect();
        let size = |json_level| {
            let mut enc = Encoder::new(Compression {
                json_level,
                raw_level: -1,
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
