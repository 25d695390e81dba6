//! The checkpoint file: a seq lease and the upstream resume cursor, written atomically.
//!
//! Seqs are leased in blocks: before the first seq of a block is used, the end of the
//! block is made durable. After a crash, stamping resumes past the lease, so a seq that
//! may have been seen by anyone is never handed out again (at the cost of a gap of at
//! most one block). The upstream cursor is saved with each lease and on demand; after a
//! crash ingest resumes from it and the upstream re-sends what came after.
//!
//! Must never write the file in place: a torn write would lose the lease.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ingest::StampState;

const FILE_NAME: &str = "checkpoint.json";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct OnDisk {
    /// Every seq up to and including this one may have been used.
    seq_leased_through: u64,
    last_time_us: i64,
    upstream_cursor: Option<i64>,
}

pub struct Checkpoint {
    path: PathBuf,
    lease_block: u64,
    leased_through: u64,
}

impl Checkpoint {
    /// Opens (or creates) the checkpoint in `dir` and returns where stamping resumes.
    pub fn open(dir: &Path, lease_block: u64) -> anyhow::Result<(Self, StampState)> {
        fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let on_disk = match fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice::<OnDisk>(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "checkpoint {} is unreadable ({e}); move it aside to start a new seq space",
                    path.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("cannot read checkpoint {}: {e}", path.display()),
        };
        let state = match on_disk {
            Some(d) => StampState {
                next_seq: d.seq_leased_through.saturating_add(1),
                last_time_us: d.last_time_us,
                upstream_cursor: d.upstream_cursor,
            },
            None => StampState::fresh(),
        };
        let checkpoint = Self {
            path,
            lease_block: lease_block.max(1),
            leased_through: state.next_seq - 1,
        };
        Ok((checkpoint, state))
    }

    /// Makes sure seqs up to `through` are leased, extending the lease durably if needed.
    /// Call before handing those seqs to anyone.
    pub fn ensure_leased(&mut self, through: u64, state: &StampState) -> anyhow::Result<()> {
        if through <= self.leased_through {
            return Ok(());
        }
        let new_lease = through.saturating_add(self.lease_block);
        self.write(new_lease, state)?;
        self.leased_through = new_lease;
        Ok(())
    }

    /// Saves the cursor and time without extending the lease.
    pub fn save(&mut self, state: &StampState) -> anyhow::Result<()> {
        self.write(self.leased_through, state)
    }

    fn write(&self, leased_through: u64, state: &StampState) -> anyhow::Result<()> {
        let on_disk = OnDisk {
            seq_leased_through: leased_through,
            last_time_us: state.last_time_us,
            upstream_cursor: state.upstream_cursor,
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::File::create(&tmp)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
        file.write_all(&serde_json::to_vec(&on_disk)?)?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_survives_reopen_without_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cp, mut state) = Checkpoint::open(dir.path(), 10).unwrap();
        assert_eq!(state.next_seq, 1);
        cp.ensure_leased(1, &state).unwrap();
        state.next_seq = 6;
        state.upstream_cursor = Some(99);
        state.last_time_us = 1234;
        cp.save(&state).unwrap();
        drop(cp);
        let (_, resumed) = Checkpoint::open(dir.path(), 10).unwrap();
        assert!(resumed.next_seq > 5, "seq 1..=5 may have been used");
        assert_eq!(resumed.upstream_cursor, Some(99));
        assert_eq!(resumed.last_time_us, 1234);
    }

    #[test]
    fn corrupt_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = Checkpoint::open(dir.path(), 10).err().unwrap().to_string();
        assert!(err.contains("unreadable"), "{err}");
    }
}
