//! Merging small segments: at the live rate the writer cuts a segment at every commit
//! (~50 events at 500 events/s), and a scan pays fixed work per segment (a zstd frame per
//! column, the DID and collection tables, a cache entry, a read-ahead hand-off), so a
//! store written live scanned several times slower than one written in bulk. Runs of such
//! segments are decoded and written again as full-size ones (`segment_target_bytes`): the
//! event columns encoded afresh, the raw frames (most of the bytes) kept as the writer
//! compressed them, a segment's zstd frame copied whole, so a raw frame is compressed
//! once ([`codec::Encoder::encode_merged`]; docs/DECISIONS.md, Event log, session 17).
//! Only segments holding less than `merge_keep_raw_bytes` of plain frames (low rates,
//! where a zstd frame that small costs ratio) have their frames compressed again,
//! together.
//!
//! Owns: which segments are merged, and the merge's commit: the new values are written
//! and synced to files of their own (not the commits' files, so the files of merged-away
//! segments empty out and are reclaimed whole), THEN one index batch replaces the run's
//! entries. The batch is the commit point, as for an append: a crash before it leaves
//! unreferenced bytes that open removes (the old entries still read the old bytes), a
//! crash after it leaves old bytes nothing points at, removed the same way.
//! Must never: change an event (the merged segment decodes to exactly the run's events),
//! compress again the frames of a segment that holds `merge_keep_raw_bytes` of them,
//! touch the newest segment, segments below the raw floor or with their frames in their
//! data file (the first layout), or run beside retention's deletions (the maintenance
//! lock). A reader that planned its read on the old entries keeps reading the old bytes
//! while their file is open; one that finds the file gone plans again
//! ([`FjallStore::read`](super::FjallStore)).

use std::sync::atomic::Ordering;

use super::super::codec::{self, MergeSource};
use super::super::store::{EncodedSegment, LogError, MergeStep};
use super::layout::{encode_entry, key, FramesAt, Stored};
use super::{backend, FjallStore, Pair};

/// A segment is merged when it stores less than the segment target divided by this (a
/// full segment of real events stores ~60% of its plain bytes, one cut by a commit at
/// the live rate a few percent).
const SMALL_DIVISOR: u64 = 4;
/// Stored bytes one merge step decodes at most, in segment targets.
const STEP_TARGETS: u64 = 8;

impl FjallStore {
    /// One merge step: the oldest run of small segments not yet judged (consecutive,
    /// at or above the raw floor, not the newest) is decoded, cut into groups of whole
    /// segments of at least the segment target each (plain bytes), and each group of two
    /// or more is written as one segment. A run's last group, short of the target, waits
    /// for more segments unless a full-size segment follows it.
    pub(super) fn merge_step(&self) -> Result<MergeStep, LogError> {
        if !self.config.merge_small_segments {
            return Ok(MergeStep::default());
        }
        let _m = self.maintenance.lock().map_err(|_| backend("poisoned"))?;
        let target = self.config.segment_target_bytes.max(1) as u64;
        let (run, closed, judged) = self.pick_run(target)?;
        let (Some(last), true) = (run.last(), run.len() >= 2) else {
            self.merge_from.fetch_max(judged, Ordering::Relaxed);
            return Ok(MergeStep::default());
        };
        let after_run = last.info.last_seq + 1;
        // Decode the run's events with their JSON; the raw frames stay compressed (the
        // writer compressed them once; see `codec::Encoder::encode_merged`).
        let mut decoded: Vec<(Stored, MergeSource, u64)> = Vec::with_capacity(run.len());
        let mut buf = Vec::new();
        for s in &run {
            if !self.reads.read_values(s, true, &mut buf)? {
                // Gone (retention cannot run meanwhile, so a file was removed by hand):
                // merge nothing now.
                return Ok(MergeStep::default());
            }
            let frames = buf.split_off(s.events_len as usize);
            let source = codec::decode_for_merge(&buf, frames)?;
            let plain = source.plain_bytes() as u64;
            decoded.push((*s, source, plain));
        }
        // Groups of whole segments, each reaching the target.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut plain) = (0, 0u64);
        for (i, (_, _, p)) in decoded.iter().enumerate() {
            plain += p;
            if plain >= target {
                groups.push(start..i + 1);
                start = i + 1;
                plain = 0;
            }
        }
        if closed && start < decoded.len() {
            groups.push(start..decoded.len());
            start = decoded.len();
        }
        // Judged up to the leftover, which waits for more segments.
        let judged = decoded
            .get(start)
            .map_or(after_run, |(s, _, _)| s.info.first_seq);
        groups.retain(|g| g.len() >= 2);
        if groups.is_empty() {
            self.merge_from.fetch_max(judged, Ordering::Relaxed);
            return Ok(MergeStep::default());
        }
        let level = self.config.compression.raw_level;
        let keep = self.config.merge_keep_raw_bytes;
        let mut encoder = self
            .take_encoders(1)?
            .pop()
            .ok_or_else(|| backend("no encoder"))?;
        let encoded: Result<Vec<EncodedSegment>, LogError> = groups
            .iter()
            .map(|g| {
                let sources: Vec<&MergeSource> =
                    decoded[g.clone()].iter().map(|(_, s, _)| s).collect();
                encoder.encode_merged(&sources, level, keep)
            })
            .collect();
        if let Ok(mut pool) = self.encoders.lock() {
            pool.push(encoder);
        }
        let encoded = encoded?;
        let replaced: Vec<Vec<Stored>> = groups
            .iter()
            .map(|g| decoded[g.clone()].iter().map(|(s, _, _)| *s).collect())
            .collect();
        let step = self.commit_merge(&encoded, &replaced)?;
        self.merge_from.fetch_max(judged, Ordering::Relaxed);
        self.reclaim_files()?;
        Ok(step)
    }

    /// The run to judge: consecutive small segments from where merging left off; whether
    /// a segment that is not small ends it (else it reaches the newest segment or the
    /// step's bound); and the seq up to which everything before the run was judged.
    fn pick_run(&self, target: u64) -> Result<(Vec<Stored>, bool, u64), LogError> {
        let floor = self.raw_floor.load(Ordering::Acquire);
        let from = self.merge_from.load(Ordering::Relaxed).max(floor);
        let segs = self.segments.read().map_err(|_| backend("poisoned"))?;
        let newest = segs.len().saturating_sub(1);
        let start = segs.partition_point(|s| s.info.first_seq < from);
        let small = |s: &Stored| {
            matches!(s.frames_at, FramesAt::Raw { .. }) && s.info.bytes < target / SMALL_DIVISOR
        };
        let mut run: Vec<Stored> = Vec::new();
        let mut judged = from;
        let mut bytes = 0u64;
        for s in segs.range(start.min(newest)..newest) {
            if !small(s) {
                if run.len() >= 2 {
                    return Ok((run, true, judged));
                }
                // A lone small segment between full ones stays as it is.
                run.clear();
                bytes = 0;
                judged = s.info.last_seq + 1;
                continue;
            }
            if bytes >= STEP_TARGETS * target {
                break;
            }
            bytes += s.info.bytes;
            run.push(*s);
        }
        Ok((run, false, judged))
    }

    /// Writes the merged segments and replaces each group of `replaced` by its one
    /// segment of `encoded`: values synced first, then one index batch (the commit point).
    fn commit_merge(
        &self,
        encoded: &[EncodedSegment],
        replaced: &[Vec<Stored>],
    ) -> Result<MergeStep, LogError> {
        let mut w = self.writer.lock().map_err(|_| backend("poisoned"))?;
        let written = match self.write_values(&mut w, true, encoded) {
            Ok(written) => written,
            Err(e) => {
                // Never append after bytes in an unknown state (see `append_encoded`).
                w.merged = Pair::default();
                return Err(e);
            }
        };
        let mut batch = self.keyspace.batch();
        for (new, old) in written.stored.iter().zip(replaced) {
            for o in old {
                if o.info.first_seq != new.info.first_seq {
                    batch.remove(&self.index, key(o.info.first_seq));
                }
            }
            batch.insert(&self.index, key(new.info.first_seq), encode_entry(new));
        }
        let committed = batch.commit().map_err(backend).and_then(|()| {
            self.keyspace
                .persist(fjall::PersistMode::SyncAll)
                .map_err(backend)
        });
        if let Err(e) = committed {
            w.merged = Pair::default();
            return Err(e);
        }
        let mut step = MergeStep::default();
        let mut segs = self.segments.write().map_err(|_| backend("poisoned"))?;
        for (new, old) in written.stored.iter().zip(replaced) {
            let (Some(first), Some(last)) = (old.first(), old.last()) else {
                continue;
            };
            let at = segs.partition_point(|s| s.info.first_seq < first.info.first_seq);
            // Only appends (at the back) and merges (under the maintenance lock held
            // here) change the index meanwhile, so the run is where it was.
            let end = segs.partition_point(|s| s.info.first_seq <= last.info.first_seq);
            if end - at != old.len() {
                return Err(backend("merged segments moved in the index"));
            }
            segs[at] = *new;
            segs.drain(at + 1..end);
            for o in old {
                self.stored_bytes.fetch_sub(o.info.bytes, Ordering::Relaxed);
                self.raw_bytes
                    .fetch_sub(o.info.raw_bytes, Ordering::Relaxed);
            }
            self.stored_bytes
                .fetch_add(new.info.bytes, Ordering::Relaxed);
            self.raw_bytes
                .fetch_add(new.info.raw_bytes, Ordering::Relaxed);
            step.merged += old.len() as u64;
            step.written += 1;
        }
        Ok(step)
    }
}
