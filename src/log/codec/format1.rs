//! The first segment layout (`SLE1`), read in place: data dirs written before the current
//! layout keep serving every event they hold.
//!
//! Owns: decoding format 1 events values. Must never: be written again (the encoder only
//! writes the current layout), or panic on stored bytes.
//!
//! Format 1 events value: magic, first seq (u64), event count (u32), frame count (u32),
//! three (compressed, plain) u32 length pairs, then three zstd frames: the metadata column
//! (per frame: upstream seq, receipt time, raw length, DID, event count; per event: time,
//! kind, op index, collection, v1 and v2 lengths), the v1 JSON column, the v2 JSON column.

use std::sync::Arc;

use bytes::Bytes;

use crate::event::Event;

use super::{
    corrupt, decompress, frames_column, kind_from, next_raw_frame, seq_at, Cursor, NONE_U16,
    NONE_U32,
};
use crate::log::store::{LogError, Payloads};

pub(super) const MAGIC: &[u8; 4] = b"SLE1";

/// Decodes a format 1 events value (and its frames value when `payloads.raw`).
pub(super) fn decode(
    events_value: &[u8],
    frames_value: Option<&[u8]>,
    payloads: Payloads,
) -> Result<Vec<Event>, LogError> {
    let mut c = Cursor::new(events_value);
    if c.take(4)? != MAGIC {
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
    let raw = frames_column(first_seq, frames_value, payloads)?;
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
        let did: Arc<str> = Arc::from(m.str(did_len)?);
        let n = m.u32()? as usize;
        let raw_frame = next_raw_frame(raw.as_ref(), &mut raw_pos, raw_len)?;
        for _ in 0..n {
            let time_us = m.i64()?;
            let kind = kind_from(m.u8()?)?;
            let op_index = m.u16()?;
            let coll_len = m.u16()?;
            let collection = if coll_len == NONE_U16 {
                None
            } else {
                Some(Arc::from(m.str(usize::from(coll_len))?))
            };
            let v1_json = slice(&v1, &mut v1_pos, m.u32()?)?;
            let v2_json = slice(&v2, &mut v2_pos, m.u32()?)?;
            let seq = seq_at(first_seq, out.len())?;
            out.push(Event {
                seq,
                time_us,
                upstream_seq,
                received_us,
                kind,
                did: Arc::clone(&did),
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
