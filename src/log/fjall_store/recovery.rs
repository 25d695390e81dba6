//! Opening the embedded store: loading the index, and making the tail consistent after a
//! crash (see the commit protocol in the parent module).
//!
//! Owns: what open-time recovery checks and repairs, and the notes it reports. Must
//! never: refuse to open because the tail is torn (what does not verify is dropped and
//! reported), or remove bytes a committed index entry points at.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fjall::{PartitionHandle, PersistMode};

use crate::event::StampState;

use super::super::codec;
use super::super::store::{LogError, Payloads, RecoveryReport};
use super::layout::{
    data_path, decode_entry, decode_raw_floor, decode_resume, encode_raw_floor, encode_resume, key,
    resume_after, Stored, DATA_SUFFIX, RAW_FLOOR_KEY, RESUME_KEY,
};
use super::{backend, io, DataFiles, Files, FjallStore};

/// The index entries in seq order; unreadable entries and jumps are reported.
pub(super) fn load_index(
    index: &PartitionHandle,
    report: &mut RecoveryReport,
) -> Result<VecDeque<Stored>, LogError> {
    let mut segments = VecDeque::new();
    for item in index.iter() {
        let (k, v) = item.map_err(backend)?;
        match decode_entry(&v) {
            Some(s) if k.as_ref() == key(s.info.first_seq) => {
                if let Some(prev) = segments.back().map(|p: &Stored| p.info.last_seq) {
                    if s.info.first_seq != prev + 1 {
                        report.notes.push(format!(
                            "index jumps from seq {prev} to {}: events in between are lost",
                            s.info.first_seq
                        ));
                    }
                }
                segments.push_back(s)
            }
            _ => report
                .notes
                .push("unreadable index entry skipped".to_string()),
        }
    }
    Ok(segments)
}

/// Every data file under `data_dir`, opened, and the highest file id found.
pub(super) fn open_data_files(data_dir: &Path) -> Result<(DataFiles, Option<u64>), LogError> {
    let mut files = BTreeMap::new();
    let mut max_id = None;
    for entry in std::fs::read_dir(data_dir).map_err(|e| io("cannot list", data_dir, e))? {
        let entry = entry.map_err(|e| io("cannot list", data_dir, e))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(DATA_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let path = data_path(data_dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        files.insert(id, Arc::new(file));
        max_id = max_id.max(Some(id));
    }
    Ok((files, max_id))
}

impl FjallStore {
    /// Raises the raw floor past the oldest segments whose raw file is gone (a floor moved
    /// by a build that kept it elsewhere, or files removed by hand), so the floor always
    /// names a frame that is held.
    pub(super) fn check_raw_floor(&self, report: &mut RecoveryReport) -> Result<(), LogError> {
        let floor = self.raw_floor.load(Ordering::Acquire);
        let mut raised = floor;
        for s in self
            .segments
            .read()
            .map_err(|_| backend("poisoned"))?
            .iter()
        {
            if s.info.first_seq < raised {
                continue;
            }
            match s.raw_end() {
                Some((file, _)) if self.reads.raw.get(file).is_none() => {
                    raised = s.info.last_seq + 1;
                }
                _ => break,
            }
        }
        if raised > floor {
            report.notes.push(format!(
                "raw frames below seq {raised} were missing; the raw floor moved there from {floor}"
            ));
            self.state
                .insert(RAW_FLOOR_KEY, encode_raw_floor(raised))
                .map_err(backend)?;
            self.keyspace
                .persist(PersistMode::SyncAll)
                .map_err(backend)?;
            self.raw_floor.store(raised, Ordering::Release);
        }
        Ok(())
    }

    fn verify_segment(&self, s: &Stored) -> Result<(), LogError> {
        let mut buf = Vec::new();
        let frames = self.holds_raw(s);
        if !self.reads.read_values(s, frames, &mut buf)? {
            return Err(LogError::Corrupt("data or raw file missing".into()));
        }
        let (ev, fr) = buf.split_at(s.events_len as usize);
        let payloads = Payloads {
            raw: frames,
            ..Payloads::ALL
        };
        let decoded = codec::decode(ev, frames.then_some(fr), payloads)?;
        let i = &s.info;
        match (decoded.first(), decoded.last()) {
            (Some(a), Some(b))
                if a.seq == i.first_seq
                    && b.seq == i.last_seq
                    && b.time_us == i.last_time_us
                    && b.upstream_seq == i.last_upstream_seq =>
            {
                Ok(())
            }
            _ => Err(LogError::Corrupt(
                "segment does not match its index entry".into(),
            )),
        }
    }

    /// Drops newest segments until one decodes completely.
    pub(super) fn verify_tail(&self, report: &mut RecoveryReport) -> Result<(), LogError> {
        loop {
            let Some(last) = self
                .segments
                .read()
                .map_err(|_| backend("poisoned"))?
                .back()
                .copied()
            else {
                return Ok(());
            };
            match self.verify_segment(&last) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let i = last.info;
                    let msg = format!(
                        "newest segment (seq {}..={}) failed verification and was dropped: {e}",
                        i.first_seq, i.last_seq
                    );
                    tracing::warn!("{msg}");
                    report.notes.push(msg);
                    report.dropped_segments += 1;
                    report.dropped_events += i.last_seq - i.first_seq + 1;
                    self.index.remove(key(i.first_seq)).map_err(backend)?;
                    self.keyspace
                        .persist(PersistMode::SyncAll)
                        .map_err(backend)?;
                    self.segments
                        .write()
                        .map_err(|_| backend("poisoned"))?
                        .pop_back();
                    self.stored_bytes.fetch_sub(i.bytes, Ordering::Relaxed);
                }
            }
        }
    }

    /// Deletes data and raw files no held segment points into and truncates bytes past
    /// the last committed segment of each file (written by a commit that did not
    /// complete).
    pub(super) fn clean_files(&self, report: &mut RecoveryReport) -> Result<(), LogError> {
        let mut data_ends: BTreeMap<u64, u64> = BTreeMap::new();
        let mut raw_ends: BTreeMap<u64, u64> = BTreeMap::new();
        // Raw files some index entry names, held or not: one past them all was written by
        // a commit that was cut short.
        let mut newest_raw_named = None;
        for s in self
            .segments
            .read()
            .map_err(|_| backend("poisoned"))?
            .iter()
        {
            let end = data_ends.entry(s.file).or_insert(0);
            *end = (*end).max(s.end());
            if let Some((file, raw_end)) = s.raw_end() {
                newest_raw_named = newest_raw_named.max(Some(file));
                if self.holds_raw(s) {
                    let end = raw_ends.entry(file).or_insert(0);
                    *end = (*end).max(raw_end);
                }
            }
        }
        let oldest_data = data_ends.keys().next().copied();
        clean_dir(&self.reads.data, &data_ends, report, |id| {
            oldest_data.is_none_or(|o| id > o)
        })?;
        clean_dir(&self.reads.raw, &raw_ends, report, |id| {
            newest_raw_named.is_none_or(|n| id > n)
        })
    }

    pub(super) fn recover_resume(
        &self,
        report: &mut RecoveryReport,
    ) -> Result<StampState, LogError> {
        let stored = match self.state.get(RESUME_KEY).map_err(backend)? {
            Some(v) => {
                let r = decode_resume(&v);
                if r.is_none() {
                    report.notes.push("resume record unreadable".into());
                }
                r
            }
            None => None,
        };
        let last = self
            .segments
            .read()
            .map_err(|_| backend("poisoned"))?
            .back()
            .map(|s| s.info);
        let resume = match (stored, last) {
            (Some(r), Some(last)) if r.next_seq == last.last_seq + 1 => return Ok(r),
            (Some(r), Some(last)) => {
                report.notes.push(format!(
                    "resume record (next seq {}) disagrees with the newest segment (last seq {}); \
                     resuming after the segment",
                    r.next_seq, last.last_seq
                ));
                resume_after(&last)
            }
            (Some(r), None) => return Ok(r),
            (None, Some(last)) => {
                report
                    .notes
                    .push("resume record missing; derived from the newest segment".into());
                resume_after(&last)
            }
            (None, None) => return Ok(StampState::fresh()),
        };
        self.state
            .insert(RESUME_KEY, encode_resume(&resume))
            .map_err(backend)?;
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(backend)?;
        Ok(resume)
    }
}

/// Removes the files of `files` without an entry in `ends` (noting those `cut_short` says a
/// commit left) and truncates the others to their end.
fn clean_dir(
    files: &Files,
    ends: &BTreeMap<u64, u64>,
    report: &mut RecoveryReport,
    cut_short: impl Fn(u64) -> bool,
) -> Result<(), LogError> {
    let what = files.what;
    let mut open = files.open.write().map_err(|_| backend("poisoned"))?;
    let ids: Vec<u64> = open.keys().copied().collect();
    for id in ids {
        let path = files.path(id);
        match ends.get(&id) {
            None => {
                open.remove(&id);
                std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
                if cut_short(id) {
                    report.notes.push(format!(
                        "{what} file {id} held no committed segment (a commit was cut short) and was removed"
                    ));
                }
            }
            Some(&end) => {
                let Some(file) = open.get(&id) else { continue };
                let len = file
                    .metadata()
                    .map_err(|e| io("cannot stat", &path, e))?
                    .len();
                if len > end {
                    let padding = is_padding(file, end, len);
                    file.set_len(end)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| io("cannot truncate", &path, e))?;
                    if !padding {
                        report.notes.push(format!(
                            "{what} file {id}: {} uncommitted bytes after the last committed segment truncated",
                            len - end
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether the bytes of `file` from `end` to `len` are only the zeros a direct write pads
/// its last block with (see `append`): no commit was cut short there, so nothing to note.
fn is_padding(file: &File, end: u64, len: u64) -> bool {
    let block = super::append::BLOCK as u64;
    if len > end.div_ceil(block) * block {
        return false;
    }
    let mut tail = vec![0u8; (len - end) as usize];
    file.read_exact_at(&mut tail, end).is_ok() && tail.iter().all(|&b| b == 0)
}

/// The persisted raw floor (0, everything held, when none was ever written).
pub(super) fn load_raw_floor(
    state: &PartitionHandle,
    report: &mut RecoveryReport,
) -> Result<u64, LogError> {
    Ok(match state.get(RAW_FLOOR_KEY).map_err(backend)? {
        Some(v) => decode_raw_floor(&v).unwrap_or_else(|| {
            report
                .notes
                .push("raw floor record unreadable; recomputed from the raw files".into());
            0
        }),
        None => 0,
    })
}
