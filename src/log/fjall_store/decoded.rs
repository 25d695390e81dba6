//! The embedded store's cache of decoded segments, shared by concurrent cold readers.
//!
//! Owns: which decoded segments are held, their byte bound and the hit/miss counters.
//! Must never: decode a segment once per reader while another reader is decoding it, or
//! hold more decoded payload than `decoded_cache_bytes` beyond the entry being inserted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::event::Event;

use super::super::codec;
use super::super::store::{LogError, Payloads};
use super::layout::Stored;
use super::{backend, FjallStore};

/// One decoded segment: the first reader decodes it, concurrent readers of the same
/// segment wait for that and share its events (their JSON is slices of one buffer per
/// wire), so a cold segment is decompressed and its v1 or v2 messages assembled once
/// however many subscribers replay it.
type DecodedCell = Arc<OnceLock<Result<Arc<Vec<Event>>, LogError>>>;

struct DecodedEntry {
    first_seq: u64,
    payloads: Payloads,
    /// Payload bytes held once decoded (0 while decoding).
    bytes: usize,
    cell: DecodedCell,
}

/// Recently decoded segments, newest last, bounded by `decoded_cache_bytes`.
#[derive(Default)]
pub(super) struct DecodedCache {
    entries: VecDeque<DecodedEntry>,
    bytes: usize,
}

/// Counters of the decoded-segment cache.
#[derive(Debug, Default)]
pub struct DecodedStats {
    /// Segment reads served by a decode another read made (or was making).
    pub hits: AtomicU64,
    /// Segment reads that decoded.
    pub misses: AtomicU64,
}

impl FjallStore {
    /// The events of segment `s` with `payloads`, decoded once for every concurrent reader
    /// while the cache holds them; `None` when the segment's data file is gone.
    pub(super) fn decoded(
        &self,
        s: &Stored,
        payloads: Payloads,
    ) -> Result<Option<Arc<Vec<Event>>>, LogError> {
        let limit = self.config.decoded_cache_bytes;
        let decode = || -> Result<Option<Vec<Event>>, LogError> {
            let mut buf = Vec::new();
            if !self.read_values(s, payloads.raw, &mut buf)? {
                return Ok(None);
            }
            let (ev, fr) = buf.split_at(s.events_len as usize);
            codec::decode(ev, payloads.raw.then_some(fr), payloads).map(Some)
        };
        if limit == 0 {
            self.decoded_stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(decode()?.map(Arc::new));
        }
        let first_seq = s.info.first_seq;
        let (cell, mine) = {
            let mut cache = self.decoded.lock().map_err(|_| backend("poisoned"))?;
            match cache
                .entries
                .iter()
                .find(|e| e.first_seq == first_seq && e.payloads == payloads)
            {
                Some(e) => (e.cell.clone(), false),
                None => {
                    let cell: DecodedCell = Arc::new(OnceLock::new());
                    cache.entries.push_back(DecodedEntry {
                        first_seq,
                        payloads,
                        bytes: 0,
                        cell: cell.clone(),
                    });
                    (cell, true)
                }
            }
        };
        let counter = if mine {
            &self.decoded_stats.misses
        } else {
            &self.decoded_stats.hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Concurrent readers of this segment block here until the first has decoded it.
        let result = cell
            .get_or_init(|| match decode() {
                Ok(Some(events)) => Ok(Arc::new(events)),
                Ok(None) => Err(LogError::TooOld {
                    requested: first_seq,
                    oldest: self.oldest_or_next(),
                }),
                Err(e) => Err(e),
            })
            .clone();
        if mine {
            let mut cache = self.decoded.lock().map_err(|_| backend("poisoned"))?;
            let size = match &result {
                Ok(events) => {
                    let mut starts = codec::FrameStarts::default();
                    events
                        .iter()
                        .map(|e| codec::payload_bytes(e, starts.next(e)) + 160)
                        .sum()
                }
                Err(_) => 0,
            };
            if let Some(entry) = cache
                .entries
                .iter_mut()
                .find(|e| Arc::ptr_eq(&e.cell, &cell))
            {
                entry.bytes = size;
            }
            cache.bytes += size;
            if result.is_err() {
                cache.entries.retain(|e| !Arc::ptr_eq(&e.cell, &cell));
            }
            // Oldest first out, until the decoded payloads fit the bound.
            while cache.bytes > limit {
                let Some(old) = cache.entries.pop_front() else {
                    break;
                };
                cache.bytes = cache.bytes.saturating_sub(old.bytes);
            }
        }
        match result {
            Ok(events) => Ok(Some(events)),
            Err(LogError::TooOld { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Decoded-segment cache counters.
    pub fn decoded_stats(&self) -> &DecodedStats {
        &self.decoded_stats
    }
}
