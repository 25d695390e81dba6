//! Appending values to one data or raw file, buffered or with `O_DIRECT`.
//!
//! Owns: where the next value of a file goes, and getting a commit's values onto the disk
//! before its sync. Must never: change a byte the index already points at (a direct write
//! rewrites the file's last partial block, with exactly the bytes it already holds), or
//! report a value written before its bytes were handed to the kernel.
//!
//! Why direct writes (raw files): writing a commit's values through the page cache made
//! the kernel allocate a new cached page for every 4 KiB written, which cost the commit
//! thread ~4-5 µs of CPU per event at a sustained append (DECISIONS.md, "Event log",
//! sessions 13-14); the raw frames are ~90% of those bytes and only the raw wire reads
//! them. With `O_DIRECT` the disk reads the bytes from our buffer. It needs block-aligned
//! offsets, lengths and memory, so values are staged in an aligned buffer that starts at
//! the block boundary at or below the file's end (holding the bytes of the last partial
//! block, already written, again) and written padded with zeros to a whole block. The
//! padding lies past every committed value: the next write overwrites it, and recovery
//! truncates it like any other unreferenced tail.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// The alignment of direct writes: offsets, lengths and buffer addresses. 4 KiB covers
/// every logical block size up to the page size.
pub(super) const BLOCK: usize = 4096;

/// Staged bytes written before more are staged, so a large group goes to the disk in
/// pieces of about this size instead of one buffer the size of the group.
const FLUSH_BYTES: usize = 4 << 20;

/// The file of one directory being appended to.
pub(super) struct FileAppend {
    pub(super) id: u64,
    /// The handle readers share (buffered).
    pub(super) file: Arc<File>,
    /// Where the next value goes.
    pub(super) end: u64,
    direct: Option<Direct>,
}

/// Creates a new data or raw file to append to (never an existing one: a file's bytes
/// belong to the commits that wrote them), readable through the same handle.
pub(super) fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// A file's `O_DIRECT` handle and the bytes staged for it.
struct Direct {
    file: Arc<File>,
    /// Bytes from `start` (block aligned): the file's last partial block as written, then
    /// values not yet written.
    staged: AlignedBuf,
    start: u64,
}

impl FileAppend {
    /// Appends to the new, empty file `file` (created at `path`), with direct writes when
    /// `direct` and the file system takes `O_DIRECT` (else buffered, silently: tmpfs
    /// before Linux 6.6, some network file systems).
    pub(super) fn new(id: u64, file: Arc<File>, path: &Path, direct: bool) -> Self {
        let direct = direct
            .then(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten()
            .map(|f| Direct {
                file: Arc::new(f),
                staged: AlignedBuf::default(),
                start: 0,
            });
        Self {
            id,
            file,
            end: 0,
            direct,
        }
    }

    /// Whether this file is written with `O_DIRECT`.
    pub(super) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Appends `value`; returns where it starts. A direct file may hold it staged until
    /// [`FileAppend::finish`].
    pub(super) fn write(&mut self, value: &[u8]) -> io::Result<u64> {
        let at = self.end;
        match &mut self.direct {
            None => self.file.write_all_at(value, at)?,
            Some(d) => {
                d.staged.push(value);
                if d.staged.len() >= FLUSH_BYTES {
                    d.write_staged(false)?;
                }
            }
        }
        self.end = at + value.len() as u64;
        Ok(at)
    }

    /// Writes whatever is staged (a direct file's last block padded with zeros). After
    /// this every value written is with the kernel and [`FileAppend::sync`] makes it
    /// durable.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        match &mut self.direct {
            Some(d) => d.write_staged(true),
            None => Ok(()),
        }
    }

    /// [`FileAppend::finish`] for a file that gets nothing more (rolled): a direct file is
    /// also cut back to its end, so no padding stays on disk until the next open.
    pub(super) fn finish_last(&mut self) -> io::Result<()> {
        self.finish()?;
        if self.direct.is_some() {
            self.file.set_len(self.end)?;
        }
        Ok(())
    }

    /// The handle whose `fdatasync` makes this file's writes durable.
    pub(super) fn sync_handle(&self) -> Arc<File> {
        match &self.direct {
            Some(d) => d.file.clone(),
            None => self.file.clone(),
        }
    }
}

impl Direct {
    /// Writes the staged whole blocks (with `all`, also the last partial block padded with
    /// zeros) and keeps the last partial block staged, to be written again with what
    /// follows it.
    fn write_staged(&mut self, all: bool) -> io::Result<()> {
        let len = self.staged.len();
        let whole = len - len % BLOCK;
        let out = if all {
            self.staged.padded()
        } else {
            self.staged.prefix(whole)
        };
        if out.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(out, self.start)?;
        self.start += whole as u64;
        self.staged.drop_front(whole);
        Ok(())
    }
}

/// A byte buffer whose start is [`BLOCK`]-aligned in memory, reused from write to write
/// (no allocation or page faults once it has grown to a group's size).
#[derive(Default)]
struct AlignedBuf {
    mem: Vec<u8>,
    /// Where the aligned start is in `mem`.
    at: usize,
    len: usize,
}

impl AlignedBuf {
    fn len(&self) -> usize {
        self.len
    }

    /// Room for `len` bytes rounded up to a block after the start.
    fn reserve(&mut self, len: usize) {
        let need = len.div_ceil(BLOCK) * BLOCK;
        if self.at + need <= self.mem.len() {
            return;
        }
        let cap = need.max(self.mem.len().saturating_sub(BLOCK) * 2);
        let mut mem = vec![0u8; cap + BLOCK];
        let at = mem.as_ptr().align_offset(BLOCK);
        mem[at..at + self.len].copy_from_slice(&self.mem[self.at..self.at + self.len]);
        self.mem = mem;
        self.at = at;
    }

    fn push(&mut self, data: &[u8]) {
        self.reserve(self.len + data.len());
        let from = self.at + self.len;
        self.mem[from..from + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    fn prefix(&self, n: usize) -> &[u8] {
        &self.mem[self.at..self.at + n.min(self.len)]
    }

    /// The bytes padded with zeros to whole blocks.
    fn padded(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(BLOCK) * BLOCK;
        self.reserve(padded);
        let from = self.at + self.len;
        self.mem[from..self.at + padded].fill(0);
        &self.mem[self.at..self.at + padded]
    }

    /// Drops the first `n` bytes (a multiple of [`BLOCK`]), keeping the rest at the start.
    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.mem
            .copy_within(self.at + n..self.at + self.len, self.at);
        self.len -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of odd sizes (smaller and larger than a block, and larger than the flush
    /// size) land back to back at the offsets `write` returned, with direct writes and
    /// without, and a direct file ends with at most a block of zeros past the last value.
    #[test]
    fn values_land_back_to_back_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            1usize,
            4095,
            4096,
            4097,
            10,
            FLUSH_BYTES + 123,
            7,
            0,
            3 * BLOCK,
        ];
        for direct in [true, false] {
            let path = dir.path().join(format!("f-{direct}"));
            let file = Arc::new(create(&path).unwrap());
            let mut a = FileAppend::new(1, file.clone(), &path, direct);
            // Where the file system refuses O_DIRECT (tmpfs) the file is written through
            // the page cache, and the rest of the test checks that fallback instead.
            let fs_takes_direct = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .is_ok();
            assert_eq!(a.is_direct(), direct && fs_takes_direct);
            let mut expected = Vec::new();
            for (round, chunk) in sizes.chunks(3).enumerate() {
                for (i, &n) in chunk.iter().enumerate() {
                    let value: Vec<u8> = (0..n).map(|j| (j * 7 + i + round) as u8 | 1).collect();
                    let at = a.write(&value).unwrap();
                    assert_eq!(at, expected.len() as u64);
                    expected.extend_from_slice(&value);
                }
                // A commit: everything written so far reads back through the readers'
                // handle.
                a.finish().unwrap();
                a.sync_handle().sync_data().unwrap();
                let mut got = vec![0u8; expected.len()];
                file.read_exact_at(&mut got, 0).unwrap();
                assert!(got == expected, "round {round}, direct {direct}");
            }
            let len = file.metadata().unwrap().len();
            assert_eq!(a.end, expected.len() as u64);
            if a.is_direct() {
                assert!(len >= a.end && len < a.end + BLOCK as u64, "{len}");
                let mut tail = vec![1u8; (len - a.end) as usize];
                file.read_exact_at(&mut tail, a.end).unwrap();
                assert!(tail.iter().all(|&b| b == 0), "the padding is zeros");
            } else {
                assert_eq!(len, a.end);
            }
            // A rolled file is cut back to its end.
            a.finish_last().unwrap();
            assert_eq!(file.metadata().unwrap().len(), a.end);
        }
    }
}
