//! The embedded store's on-disk encodings: index keys, index entries, the resume record
//! and data file names.
//!
//! Owns: the byte layout of what the fjall keyspace holds and how data files are named.
//! Must never: touch a file or the keyspace (pure functions), or accept an entry whose
//! fields contradict each other (it is reported as unreadable instead).

use std::path::{Path, PathBuf};

use crate::event::StampState;

use super::super::store::Segment;

pub(super) const RESUME_KEY: &[u8] = b"resume";
pub(super) const INDEX_ENTRY: usize = 7 * 8 + 8 + 8 + 4 + 4;
pub(super) const DATA_SUFFIX: &str = ".seg";

/// A segment and where its values are.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stored {
    pub(super) info: Segment,
    pub(super) file: u64,
    pub(super) offset: u64,
    pub(super) events_len: u32,
    pub(super) frames_len: u32,
}

impl Stored {
    pub(super) fn end(&self) -> u64 {
        self.offset + u64::from(self.events_len) + u64::from(self.frames_len)
    }
}

pub(super) fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(super) fn encode_entry(s: &Stored) -> [u8; INDEX_ENTRY] {
    let mut out = [0u8; INDEX_ENTRY];
    let i = &s.info;
    let fields = [
        i.first_seq,
        i.last_seq,
        i.first_time_us as u64,
        i.last_time_us as u64,
        i.first_upstream_seq as u64,
        i.last_upstream_seq as u64,
        i.bytes,
        s.file,
        s.offset,
    ];
    for (chunk, v) in out.chunks_exact_mut(8).zip(fields) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out[72..76].copy_from_slice(&s.events_len.to_le_bytes());
    out[76..80].copy_from_slice(&s.frames_len.to_le_bytes());
    out
}

pub(super) fn decode_entry(b: &[u8]) -> Option<Stored> {
    if b.len() != INDEX_ENTRY {
        return None;
    }
    let u64_at =
        |i: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    let u32_at =
        |i: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?)) };
    let s = Stored {
        info: Segment {
            first_seq: u64_at(0)?,
            last_seq: u64_at(8)?,
            first_time_us: u64_at(16)? as i64,
            last_time_us: u64_at(24)? as i64,
            first_upstream_seq: u64_at(32)? as i64,
            last_upstream_seq: u64_at(40)? as i64,
            bytes: u64_at(48)?,
        },
        file: u64_at(56)?,
        offset: u64_at(64)?,
        events_len: u32_at(72)?,
        frames_len: u32_at(76)?,
    };
    (s.info.first_seq <= s.info.last_seq
        && s.info.bytes == u64::from(s.events_len) + u64::from(s.frames_len))
    .then_some(s)
}

pub(super) fn encode_resume(s: &StampState) -> [u8; 25] {
    let mut out = [0u8; 25];
    out[0..8].copy_from_slice(&s.next_seq.to_le_bytes());
    out[8..16].copy_from_slice(&s.last_time_us.to_le_bytes());
    out[16] = u8::from(s.upstream_cursor.is_some());
    out[17..25].copy_from_slice(&s.upstream_cursor.unwrap_or(0).to_le_bytes());
    out
}

pub(super) fn decode_resume(b: &[u8]) -> Option<StampState> {
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

pub(super) fn resume_after(s: &Segment) -> StampState {
    StampState {
        next_seq: s.last_seq.saturating_add(1),
        last_time_us: s.last_time_us,
        upstream_cursor: Some(s.last_upstream_seq),
    }
}

pub(super) fn data_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}{DATA_SUFFIX}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(first_seq: u64, last_seq: u64, events_len: u32, frames_len: u32) -> Stored {
        Stored {
            info: Segment {
                first_seq,
                last_seq,
                first_time_us: -5,
                last_time_us: 1_700_000_000_000_000,
                first_upstream_seq: 41,
                last_upstream_seq: i64::MAX,
                bytes: u64::from(events_len) + u64::from(frames_len),
            },
            file: 7,
            offset: 1 << 40,
            events_len,
            frames_len,
        }
    }

    #[test]
    fn index_entry_round_trips() {
        let s = stored(10, 20, 1_000, u32::MAX);
        let back = decode_entry(&encode_entry(&s)).expect("a valid entry decodes");
        assert_eq!(back.info, s.info);
        assert_eq!(
            (back.file, back.offset, back.events_len, back.frames_len),
            (7, 1 << 40, 1_000, u32::MAX)
        );
        assert_eq!(back.end(), (1 << 40) + 1_000 + u64::from(u32::MAX));
    }

    #[test]
    fn index_entry_rejects_wrong_length_and_contradictions() {
        let bytes = encode_entry(&stored(10, 20, 100, 200));
        assert!(decode_entry(&bytes[..INDEX_ENTRY - 1]).is_none());
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(decode_entry(&longer).is_none());
        // Seqs going backwards.
        assert!(decode_entry(&encode_entry(&stored(21, 20, 100, 200))).is_none());
        // Stored bytes that are not the two values' lengths.
        let mut s = stored(10, 20, 100, 200);
        s.info.bytes += 1;
        assert!(decode_entry(&encode_entry(&s)).is_none());
    }

    #[test]
    fn keys_sort_in_seq_order() {
        let seqs = [0u64, 1, 255, 256, 65_535, 1 << 32, u64::MAX - 1, u64::MAX];
        for w in seqs.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} vs {}", w[0], w[1]);
        }
    }

    #[test]
    fn resume_record_round_trips_and_rejects_garbage() {
        for cursor in [None, Some(0), Some(-1), Some(i64::MAX)] {
            let r = StampState {
                next_seq: 99,
                last_time_us: -3,
                upstream_cursor: cursor,
            };
            assert_eq!(decode_resume(&encode_resume(&r)), Some(r));
        }
        let mut bad = encode_resume(&StampState::fresh());
        bad[16] = 2;
        assert_eq!(decode_resume(&bad), None, "the cursor flag is 0 or 1");
        assert_eq!(decode_resume(&bad[..24]), None);
    }

    #[test]
    fn resume_after_a_segment_continues_it() {
        let r = resume_after(&stored(10, 20, 1, 1).info);
        assert_eq!(r.next_seq, 21);
        assert_eq!(r.last_time_us, 1_700_000_000_000_000);
        assert_eq!(r.upstream_cursor, Some(i64::MAX));
    }

    #[test]
    fn data_files_are_named_in_id_order() {
        let dir = Path::new("/d");
        assert_eq!(data_path(dir, 3), PathBuf::from("/d/0000000000000003.seg"));
        assert!(data_path(dir, 9) < data_path(dir, 10));
    }
}
