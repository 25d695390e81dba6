//! Opening the embedded store: loading the index, and making the tail consistent after a
//! crash (see the commit protocol in the parent module).
//!
//! Owns: what open-time recovery checks and repairs, and the notes it reports. Must
//! never: refuse to open because the tail is torn (what does not verify is dropped and
//! reported), or remove bytes a committed index entry points at.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fjall::{PartitionHandle, PersistMode};

use crate::event::StampState;

use super::super::codec;
use super::super::store::{LogError, Payloads, RecoveryReport};
use super::layout::{
    data_path, decode_entry, decode_resume, encode_resume, key, resume_after, Stored, DATA_SUFFIX,
    RESUME_KEY,
};
use super::{backend, io, DataFiles, FjallStore};

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
    fn verify_segment(&self, s: &Stored) -> Result<(), LogError> {
        let mut buf = Vec::new();
        if !self.read_values(s, true, &mut buf)? {
            return Err(LogError::Corrupt("data file missing".into()));
        }
        let (ev, fr) = buf.split_at(s.events_len as usize);
        let decoded = codec::decode(ev, Some(fr), Payloads::ALL)?;
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

    /// Deletes data files no segment points into and truncates bytes past the last
    /// committed segment of each file (written by a commit that did not complete).
    pub(super) fn clean_files(&self, report: &mut RecoveryReport) -> Result<(), LogError> {
        let mut ends: BTreeMap<u64, u64> = BTreeMap::new();
        for s in self
            .segments
            .read()
            .map_err(|_| backend("poisoned"))?
            .iter()
        {
            let end = ends.entry(s.file).or_insert(0);
            *end = (*end).max(s.end());
        }
        let oldest = ends.keys().next().copied();
        let mut files = self.files.write().map_err(|_| backend("poisoned"))?;
        let ids: Vec<u64> = files.keys().copied().collect();
        for id in ids {
            let path = data_path(&self.data_dir, id);
            match ends.get(&id) {
                None => {
                    files.remove(&id);
                    std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
                    if oldest.is_none_or(|o| id > o) {
                        report.notes.push(format!(
                            "data file {id} held no committed segment (a commit was cut short) and was removed"
                        ));
                    }
                }
                Some(&end) => {
                    let Some(file) = files.get(&id) else { continue };
                    let len = file
                        .metadata()
                        .map_err(|e| io("cannot stat", &path, e))?
                        .len();
                    if len > end {
                        file.set_len(end)
                            .and_then(|()| file.sync_all())
                            .map_err(|e| io("cannot truncate", &path, e))?;
                        report.notes.push(format!(
                            "data file {id}: {} uncommitted bytes after the last committed segment truncated",
                            len - end
                        ));
                    }
                }
            }
        }
        Ok(())
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
