//! The shape of one Redis Stream entry: a batch of whole upstream frames with their stamps.
//!
//! Owns: encoding a batch of stamped frames into the one field an entry carries, and
//! decoding it back. Must never: carry anything a follower can derive (the JSON forms are
//! re-encoded from the raw frame by the same ingest code as the leader's), accept bytes it
//! cannot fully account for, or allocate a declared length before checking it.
//!
//! Layout of the entry's `b` field: a version byte, then one zstd frame (with checksum)
//! holding, per upstream frame, a fixed 40-byte header
//! `[first seq u64][first time_us i64][upstream seq i64][received_us i64][events u32][frame
//! length u32]` (little endian) followed by the frame bytes. A frame's op events have
//! consecutive seqs and `time_us` from `first time_us` up, as ingest stamps them.

use bytes::Bytes;

use crate::event::Event;

const VERSION: u8 = 1;
const HEADER: usize = 40;

/// One upstream frame as the stream carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRecord {
    pub first_seq: u64,
    pub first_time_us: i64,
    pub upstream_seq: i64,
    pub received_us: i64,
    pub events: u32,
    pub frame: Bytes,
}

impl FrameRecord {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + u64::from(self.events.max(1)) - 1
    }
}

/// Why an entry could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry version {0} is not known")]
    Version(u8),
    #[error("entry does not decompress: {0}")]
    Zstd(String),
    #[error("entry is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("entry is larger than the limit of {0} bytes")]
    TooLarge(usize),
}

impl EntryError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            EntryError::Version(_) => "version",
            EntryError::Zstd(_) => "zstd",
            EntryError::Malformed(_) => "malformed",
            EntryError::TooLarge(_) => "too_large",
        }
    }
}

/// Groups one frame's events (as ingest produced them, in order) into frame records.
/// Events of one frame share the upstream seq and the raw frame.
pub fn records_of(events: &[Event]) -> Vec<FrameRecord> {
    let mut records: Vec<FrameRecord> = Vec::new();
    for event in events {
        match records.last_mut() {
            Some(r)
                if r.upstream_seq == event.upstream_seq
                    && event.op_index != 0
                    && r.last_seq() + 1 == event.seq =>
            {
                r.events += 1;
            }
            _ => records.push(FrameRecord {
                first_seq: event.seq,
                first_time_us: event.time_us,
                upstream_seq: event.upstream_seq,
                received_us: event.received_us,
                events: 1,
                frame: event.raw_frame.clone(),
            }),
        }
    }
    records
}

/// Encodes entries with one zstd context kept across calls (a new context per entry
/// cost about a third as much as compressing a small entry: docs/DECISIONS.md).
pub struct EntryEncoder {
    zstd: zstd::bulk::Compressor<'static>,
    plain: Vec<u8>,
}

impl EntryEncoder {
    pub fn new(level: i32) -> Result<Self, EntryError> {
        let mut zstd =
            zstd::bulk::Compressor::new(level).map_err(|e| EntryError::Zstd(e.to_string()))?;
        zstd.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(|e| EntryError::Zstd(e.to_string()))?;
        Ok(Self {
            zstd,
            plain: Vec::new(),
        })
    }

    /// Encodes records into an entry field.
    pub fn encode(&mut self, records: &[FrameRecord]) -> Result<Vec<u8>, EntryError> {
        let size: usize = records.iter().map(|r| HEADER + r.frame.len()).sum();
        let plain = &mut self.plain;
        plain.clear();
        plain.reserve(size);
        for r in records {
            plain.extend_from_slice(&r.first_seq.to_le_bytes());
            plain.extend_from_slice(&r.first_time_us.to_le_bytes());
            plain.extend_from_slice(&r.upstream_seq.to_le_bytes());
            plain.extend_from_slice(&r.received_us.to_le_bytes());
            plain.extend_from_slice(&r.events.to_le_bytes());
            let len = u32::try_from(r.frame.len())
                .map_err(|_| EntryError::TooLarge(u32::MAX as usize))?;
            plain.extend_from_slice(&len.to_le_bytes());
            plain.extend_from_slice(&r.frame);
        }
        // One frame with its content size (the whole input is known) and a checksum.
        let mut out = vec![0u8; 1 + zstd::zstd_safe::compress_bound(plain.len())];
        out[0] = VERSION;
        let written = self
            .zstd
            .compress_to_buffer(plain.as_slice(), &mut out[1..])
            .map_err(|e| EntryError::Zstd(e.to_string()))?;
        out.truncate(1 + written);
        // Keep a large batch's buffer only until the next, smaller one.
        if plain.capacity() > 4 * size.max(1 << 20) {
            *plain = Vec::new();
        }
        Ok(out)
    }
}

/// Decodes entries with one zstd context kept across calls.
pub struct EntryDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl EntryDecoder {
    pub fn new() -> Result<Self, EntryError> {
        Ok(Self {
            zstd: zstd::bulk::Decompressor::new().map_err(|e| EntryError::Zstd(e.to_string()))?,
        })
    }

    /// Decodes an entry field; `max_bytes` bounds the decompressed size, checked against
    /// the size the frame declares before anything is allocated.
    pub fn decode(
        &mut self,
        field: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<FrameRecord>, EntryError> {
        let (&version, body) = field
            .split_first()
            .ok_or(EntryError::Malformed("empty entry"))?;
        if version != VERSION {
            return Err(EntryError::Version(version));
        }
        let declared = zstd::zstd_safe::get_frame_content_size(body)
            .map_err(|_| EntryError::Zstd("not a zstd frame".into()))?
            .ok_or(EntryError::Malformed("zstd frame without its content size"))?;
        let size = usize::try_from(declared)
            .ok()
            .filter(|&n| n <= max_bytes)
            .ok_or(EntryError::TooLarge(max_bytes))?;
        let mut plain = vec![0u8; size];
        let written = self
            .zstd
            .decompress_to_buffer(body, plain.as_mut_slice())
            .map_err(|e| EntryError::Zstd(e.to_string()))?;
        if written != size {
            return Err(EntryError::Malformed("entry shorter than it declares"));
        }
        parse(Bytes::from(plain))
    }
}

/// Encodes records into an entry field, compressed at `level` (a context for one call).
pub fn encode(records: &[FrameRecord], level: i32) -> Result<Vec<u8>, EntryError> {
    EntryEncoder::new(level)?.encode(records)
}

/// Decodes an entry field; `max_bytes` bounds the decompressed size (a context for one
/// call).
pub fn decode(field: &[u8], max_bytes: usize) -> Result<Vec<FrameRecord>, EntryError> {
    EntryDecoder::new()?.decode(field, max_bytes)
}

/// The frame records of a decompressed entry.
fn parse(plain: Bytes) -> Result<Vec<FrameRecord>, EntryError> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < plain.len() {
        let head = plain
            .get(at..at + HEADER)
            .ok_or(EntryError::Malformed("truncated frame header"))?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&head[i..i + 4]);
            u32::from_le_bytes(b)
        };
        let len = u32_at(36) as usize;
        let start = at + HEADER;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= plain.len())
            .ok_or(EntryError::Malformed("frame longer than the entry"))?;
        let events = u32_at(32);
        if events == 0 {
            return Err(EntryError::Malformed("frame record without events"));
        }
        records.push(FrameRecord {
            first_seq: u64_at(0),
            first_time_us: u64_at(8) as i64,
            upstream_seq: u64_at(16) as i64,
            received_us: u64_at(24) as i64,
            events,
            frame: plain.slice(start..end),
        });
        at = end;
    }
    if records.is_empty() {
        return Err(EntryError::Malformed("entry without frames"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_an_error() {
        let records = vec![
            FrameRecord {
                first_seq: 7,
                first_time_us: 1_700_000_000_000_000,
                upstream_seq: 42,
                received_us: 1_700_000_000_000_100,
                events: 3,
                frame: Bytes::from_static(b"frame one"),
            },
            FrameRecord {
                first_seq: 10,
                first_time_us: 1_700_000_000_000_003,
                upstream_seq: 43,
                received_us: 1_700_000_000_000_200,
                events: 1,
                frame: Bytes::from_static(b"two"),
            },
        ];
        let field = encode(&records, 1).unwrap();
        assert_eq!(decode(&field, 1 << 20).unwrap(), records);
        assert_eq!(records[0].last_seq(), 9);
        assert_eq!(decode(&field, 10).unwrap_err().reason(), "too_large");
        let mut bad = field.clone();
        bad[0] = 9;
        assert_eq!(decode(&bad, 1 << 20).unwrap_err().reason(), "version");
        let mut flipped = field.clone();
        let last = flipped.len() - 6;
        flipped[last] ^= 0xff;
        assert!(decode(&flipped, 1 << 20).is_err());
        assert!(decode(&field[..field.len() - 3], 1 << 20).is_err());
        assert_eq!(decode(&[], 1 << 20).unwrap_err().reason(), "malformed");
        // One encoder and one decoder for many entries, as the appender and the reader
        // keep them.
        let mut encoder = EntryEncoder::new(-3).unwrap();
        let mut decoder = EntryDecoder::new().unwrap();
        for n in [1, 2, 1] {
            let field = encoder.encode(&records[..n]).unwrap();
            assert_eq!(decoder.decode(&field, 1 << 20).unwrap(), records[..n]);
        }
        // Entries written by the streaming encoder of earlier versions still decode.
        let mut old = vec![VERSION];
        let mut e = zstd::stream::Encoder::new(&mut old, 1).unwrap();
        e.include_checksum(true).unwrap();
        let plain = decoder.decode(&field, 1 << 20).unwrap();
        assert_eq!(plain, records);
        let mut bytes = Vec::new();
        for r in &records {
            for v in [
                r.first_seq,
                r.first_time_us as u64,
                r.upstream_seq as u64,
                r.received_us as u64,
            ] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes.extend_from_slice(&r.events.to_le_bytes());
            bytes.extend_from_slice(&(r.frame.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&r.frame);
        }
        e.set_pledged_src_size(Some(bytes.len() as u64)).unwrap();
        std::io::Write::write_all(&mut e, &bytes).unwrap();
        e.finish().unwrap();
        assert_eq!(decoder.decode(&old, 1 << 20).unwrap(), records);
        // A frame that declares more than the limit is refused before it is inflated.
        assert_eq!(
            decoder.decode(&old, bytes.len() - 1).unwrap_err().reason(),
            "too_large"
        );
    }
}
