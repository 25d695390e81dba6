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
/// The raw floor: the oldest seq whose raw frame may still be held (8 bytes, LE).
pub(super) const RAW_FLOOR_KEY: &[u8] = b"raw_floor";
/// An index entry whose segment's frames follow its events value in the data file
/// (written before raw frames had their own files).
pub(super) const INDEX_ENTRY_JOINED: usize = 7 * 8 + 8 + 8 + 4 + 4;
/// An index entry whose segment's frames are in a raw file: the joined entry plus the raw
/// file's id and the offset there.
pub(super) const INDEX_ENTRY: usize = INDEX_ENTRY_JOINED + 8 + 8;
pub(super) const DATA_SUFFIX: &str = ".seg";

/// Where a segment's frames value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FramesAt {
    /// Right after the events value, in the same data file.
    Joined,
    /// In raw file `file` at `offset`.
    Raw { file: u64, offset: u64 },
}

/// A segment and where its values are.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stored {
    pub(super) info: Segment,
    pub(super) file: u64,
    pub(super) offset: u64,
    pub(super) events_len: u32,
    pub(super) frames_len: u32,
    pub(super) frames_at: FramesAt,
}

impl Stored {
    /// Where this segment's bytes end in its data file.
    pub(super) fn end(&self) -> u64 {
        let joined = match self.frames_at {
            FramesAt::Joined => u64::from(self.frames_len),
            FramesAt::Raw { .. } => 0,
        };
        self.offset + u64::from(self.events_len) + joined
    }

    /// The raw file and where this segment's frames end in it, if they are in one.
    pub(super) fn raw_end(&self) -> Option<(u64, u64)> {
        match self.frames_at {
            FramesAt::Joined => None,
            FramesAt::Raw { file, offset } => Some((file, offset + u64::from(self.frames_len))),
        }
    }
}

pub(super) fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The index entry of `s`: the joined form for a segment whose frames are in its data file
/// (never written any more, but kept readable), the longer form otherwise.
pub(super) fn encode_entry(s: &Stored) -> Vec<u8> {
    let mut out = vec![0u8; INDEX_ENTRY_JOINED];
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
    if let FramesAt::Raw { file, offset } = s.frames_at {
        out.extend_from_slice(&file.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    out
}

pub(super) fn decode_entry(b: &[u8]) -> Option<Stored> {
    if b.len() != INDEX_ENTRY && b.len() != INDEX_ENTRY_JOINED {
        return None;
    }
    let u64_at =
        |i: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    let u32_at =
        |i: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?)) };
    let frames_len = u32_at(76)?;
    let frames_at = if b.len() == INDEX_ENTRY {
        FramesAt::Raw {
            file: u64_at(80)?,
            offset: u64_at(88)?,
        }
    } else {
        FramesAt::Joined
    };
    let s = Stored {
        info: Segment {
            first_seq: u64_at(0)?,
            last_seq: u64_at(8)?,
            first_time_us: u64_at(16)? as i64,
            last_time_us: u64_at(24)? as i64,
            first_upstream_seq: u64_at(32)? as i64,
            last_upstream_seq: u64_at(40)? as i64,
            bytes: u64_at(48)?,
            raw_bytes: match frames_at {
                FramesAt::Joined => 0,
                FramesAt::Raw { .. } => u64::from(frames_len),
            },
        },
        file: u64_at(56)?,
        offset: u64_at(64)?,
        events_len: u32_at(72)?,
        frames_len,
        frames_at,
    };
    (s.info.first_seq <= s.info.last_seq
        && s.info.bytes == u64::from(s.events_len) + u64::from(s.frames_len))
    .then_some(s)
}

pub(super) fn encode_raw_floor(seq: u64) -> [u8; 8] {
    seq.to_le_bytes()
}

pub(super) fn decode_raw_floor(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
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
                raw_bytes: u64::from(frames_len),
            },
            file: 7,
            offset: 1 << 40,
            events_len,
            frames_len,
            frames_at: FramesAt::Raw {
                file: 3,
                offset: 500,
            },
        }
    }

    #[test]
    fn index_entry_round_trips() {
        let s = stored(10, 20, 1_000, u32::MAX);
        let bytes = encode_entry(&s);
        assert_eq!(bytes.len(), INDEX_ENTRY);
        let back = decode_entry(&bytes).expect("a valid entry decodes");
        assert_eq!(back.info, s.info);
        assert_eq!(
            (back.file, back.offset, back.events_len, back.frames_len),
            (7, 1 << 40, 1_000, u32::MAX)
        );
        assert_eq!(back.frames_at, s.frames_at);
        assert_eq!(
            back.end(),
            (1 << 40) + 1_000,
            "the frames are not in the data file"
        );
        assert_eq!(back.raw_end(), Some((3, 500 + u64::from(u32::MAX))));
    }

    #[test]
    fn joined_entries_of_the_earlier_form_still_read() {
        let mut s = stored(10, 20, 100, 200);
        s.frames_at = FramesAt::Joined;
        s.info.raw_bytes = 0;
        let bytes = encode_entry(&s);
        assert_eq!(bytes.len(), INDEX_ENTRY_JOINED);
        let back = decode_entry(&bytes).expect("a joined entry decodes");
        assert_eq!(back.frames_at, FramesAt::Joined);
        assert_eq!(
            back.info.raw_bytes, 0,
            "joined frames leave with their JSON, raw retention cannot free them"
        );
        assert_eq!(back.end(), (1 << 40) + 300);
        assert_eq!(back.raw_end(), None);
    }

    #[test]
    fn raw_floor_round_trips() {
        assert_eq!(decode_raw_floor(&encode_raw_floor(77)), Some(77));
        assert_eq!(decode_raw_floor(&[1, 2, 3]), None);
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
