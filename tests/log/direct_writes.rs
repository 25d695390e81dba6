//! Raw files written with `O_DIRECT` (the default): the same bytes as through the page
//! cache, read back exactly, reopened clean (the zero padding of a direct write's last
//! block is not an uncommitted tail), and what lies past the padding after a cut-short
//! commit is still truncated and reported. The store says whether its raw files are
//! written direct (`EventStore::direct_raw_writes`, the `sluice_log_direct_raw_writes`
//! gauge).

use std::path::{Path, PathBuf};

use crate::log_common::EventGen;
use sluice::event::{Event, StampState};
use sluice::log::{EventStore, FjallConfig, FjallStore, Payloads, ReadLimits};

fn config(dir: &Path, direct: bool) -> FjallConfig {
    let mut cfg = FjallConfig::new(dir.join("events"));
    cfg.segment_target_bytes = 32 * 1024;
    // Small files: commits roll over several raw files.
    cfg.blob_file_bytes = 256 * 1024;
    cfg.max_journal_bytes = 24 * 1024 * 1024;
    cfg.direct_raw_writes = direct;
    cfg
}

fn read_all(store: &FjallStore) -> Vec<Event> {
    let mut next = store.bounds().expect("events").oldest_seq;
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let got = store
            .read(next, ReadLimits::events(300), Payloads::ALL)
            .unwrap();
        let Some(last) = got.last() else { break };
        next = last.seq + 1;
        out.extend(got.into_iter().map(sluice::log::SharedEvent::into_event));
    }
    out
}

/// The raw files, by name, with their bytes.
fn raw_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let raw = dir.join("events").join("raw");
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&raw)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path.strip_prefix(&raw).unwrap().to_path_buf(), bytes)
        })
        .collect();
    out.sort();
    out
}

fn assert_all(got: &[Event], want: &[Event]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        crate::log_common::assert_same(g, w);
        assert_eq!(g.raw_frame, w.raw_frame, "seq {}", w.seq);
    }
}

#[test]
fn direct_raw_writes_store_the_same_bytes_and_reopen_clean() {
    let root = tempfile::tempdir().unwrap();
    let (direct_dir, buffered_dir) = (root.path().join("direct"), root.path().join("buffered"));
    let mut written = Vec::new();
    for (dir, direct) in [(&direct_dir, true), (&buffered_dir, false)] {
        let (store, report) = FjallStore::open(config(dir, direct)).unwrap();
        assert!(report.is_clean(), "{report:?}");
        // 170 frames in commits of 10: values of every size, files rolled mid-commit.
        written = EventGen::new(StampState::fresh()).append_frames(&store, 170);
        assert_all(&read_all(&store), &written);
    }
    let direct_files = raw_files(&direct_dir);
    assert!(direct_files.len() >= 3, "commits rolled over raw files");
    // A direct file ends with its last block's zero padding; reopening truncates it
    // without reporting a cut-short commit, and the files are then byte for byte those
    // written through the page cache.
    let padded = direct_files
        .iter()
        .zip(raw_files(&buffered_dir))
        .filter(|((_, d), (_, b))| d.len() > b.len())
        .count();
    assert!(padded > 0, "the test writes unaligned ends");
    for dir in [&direct_dir, &buffered_dir] {
        let (store, report) = FjallStore::open(config(dir, true)).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_all(&read_all(&store), &written);
    }
    assert!(raw_files(&direct_dir) == raw_files(&buffered_dir));
}

/// Bytes past a raw file's padding (a commit cut short after its direct write, before its
/// index batch) are truncated and reported as before; appends go on in a new file.
#[test]
fn a_cut_short_direct_write_is_truncated_and_reported() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let mut gen = EventGen::new(StampState::fresh());
    let mut written = {
        let (store, _) = FjallStore::open(config(&dir, true)).unwrap();
        gen.append_frames(&store, 30)
    };
    let (newest, bytes) = raw_files(&dir).pop().expect("a raw file");
    let path = dir.join("events").join("raw").join(newest);
    let mut torn = bytes.clone();
    torn.extend((0..10_000u32).map(|i| (i % 251) as u8 | 1));
    std::fs::write(&path, &torn).unwrap();
    let (store, report) = FjallStore::open(config(&dir, true)).unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("uncommitted bytes") && n.contains("raw file")),
        "{report:?}"
    );
    assert!(std::fs::metadata(&path).unwrap().len() <= bytes.len() as u64);
    written.extend(gen.append_frames(&store, 20));
    assert_all(&read_all(&store), &written);
}

/// Whether `dir`'s file system takes `O_DIRECT` (tmpfs refused it before Linux 6.6).
fn fs_takes_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("o-direct-probe");
    let taken = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    taken
}

/// The store says raw frames go past the page cache only once a raw file is written so:
/// never with the setting off, never before its first raw file, and with the setting on
/// exactly when the file system takes `O_DIRECT`; the same again after a reopen.
#[test]
fn the_store_says_whether_its_raw_files_are_written_direct() {
    let root = tempfile::tempdir().unwrap();
    let takes = fs_takes_direct(root.path());
    for direct in [true, false] {
        let dir = root.path().join(format!("store-{direct}"));
        for round in 0..2 {
            let (store, _) = FjallStore::open(config(&dir, direct)).unwrap();
            assert!(
                !store.direct_raw_writes(),
                "no raw file written yet (setting {direct}, round {round})"
            );
            EventGen::new(store.resume_state()).append_frames(&store, 40);
            assert_eq!(
                store.direct_raw_writes(),
                direct && takes,
                "setting {direct}, file system takes O_DIRECT: {takes}, round {round}"
            );
        }
    }
}
