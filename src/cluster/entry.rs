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

/// Encodes records into an entry field, compressed at `level`.
pub fn encode(records: &[FrameRecord], level: i32) -> Result<Vec<u8>, EntryError> {
    let size: usize = records.iter().map(|r| HEADER + r.frame.len()).sum();
    let mut plain = Vec::with_capacity(size);
    for r in records {
        plain.extend_from_slice(&r.first_seq.to_le_bytes());
        plain.extend_from_slice(&r.first_time_us.to_le_bytes());
        plain.extend_from_slice(&r.upstream_seq.to_le_bytes());
        plain.extend_from_slice(&r.received_us.to_le_bytes());
        plain.extend_from_slice(&r.events.to_le_bytes());
        let len =
            u32::try_from(r.frame.len()).map_err(|_| EntryError::TooLarge(u32::MAX as usize))?;
        plain.extend_from_slice(&len.to_le_bytes());
        plain.extend_from_slice(&r.frame);
    }
    let mut out = Vec::with_capacity(plain.len() / 2 + 16);
    out.push(VERSION);
    let mut encoder =
        zstd::stream::Encoder::new(&mut out, level).map_err(|e| EntryError::Zstd(e.to_string()))?;
    encoder
        .include_checksum(true)
        .and_then(|_| encoder.set_pledged_src_size(Some(plain.len() as u64)))
        .map_err(|e| EntryError::Zstd(e.to_string()))?;
    std::io::Write::write_all(&mut encoder, &plain).map_err(|e| EntryError::Zstd(e.to_string()))?;
    encoder
        .finish()
        .map_err(|e| EntryError::Zstd(e.to_string()))?;
    Ok(out)
}

/// Decodes an entry field; `max_bytes` bounds the decompressed size.
pub fn decode(field: &[u8], max_bytes: usize) -> Result<Vec<FrameRecord>, EntryError> {
    let (&version, body) = field
        .split_first()
        .ok_or(EntryError::Malformed("empty entry"))?;
    if version != VERSION {
        return Err(EntryError::Version(version));
    }
    let mut plain = Vec::new();
    let decoder = zstd::stream::Decoder::new(body).map_err(|e| EntryError::Zstd(e.to_string()))?;
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    std::io::Read::read_to_end(&mut std::io::Read::take(decoder, limit), &mut plain)
        .map_err(|e| EntryError::Zstd(e.to_string()))?;
    if plain.len() > max_bytes {
        return Err(EntryError::TooLarge(max_bytes));
    }
    let plain = Bytes::from(plain);
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
    }
}
