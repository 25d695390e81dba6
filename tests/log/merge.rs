//! Merging small segments: commits at the live rate cut a segment each; merging rewrites
//! runs of them as full-size segments. Every event reads back exactly (every payload),
//! the files of merged-away segments are reclaimed, a reader scanning meanwhile gets
//! every event once, and both crash windows of a merge (values written but not indexed;
//! indexed but the old files not yet removed) open to the same events.

use crate::log_common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use log_common::assert_same;
use sluice::decode::DecodeLimits;
use sluice::event::{Event, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{EventStore, FjallConfig, FjallStore, Payloads, ReadLimits};
use sluice::upstream::capture::read_all;

const TARGET: usize = 64 * 1024;

/// Merges keep every segment's raw frames as stored (the test's frames are small, so the
/// default would compress them all again).
fn config(dir: &Path) -> FjallConfig {
    config_keeping(dir, 0)
}

fn config_keeping(dir: &Path, keep_raw_bytes: usize) -> FjallConfig {
    let mut c = FjallConfig::new(dir.join("events"));
    c.segment_target_bytes = TARGET;
    // Small files, so merged-away segments fill and empty several of them.
    c.blob_file_bytes = 256 * 1024;
    c.merge_keep_raw_bytes = keep_raw_bytes;
    c
}

/// Bytes of a frames value besides its zstd frames (magic, first seq, plain length).
const FRAMES_HEADER: u64 = 16;

/// `fixtures/synth-1000.bin`'s first `n` frames, ingested: one Vec of events per frame.
fn synth_frames(n: usize) -> Vec<Vec<Event>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/synth-1000.bin");
    let frames = read_all(&path, 8 << 20).unwrap();
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut out = Vec::new();
    for (i, f) in frames.into_iter().take(n).enumerate() {
        if let IngestOutcome::Events(e) =
            ingestor.ingest(Bytes::from(f), 1_800_000_000_000_000 + i as i64)
        {
            out.push(e);
        }
    }
    out
}

/// Appends `frames` in commits of `per_commit` frames, as the writer commits at a live
/// rate (a segment per commit); every event appended.
fn append_in_commits(store: &FjallStore, frames: &[Vec<Event>], per_commit: usize) -> Vec<Event> {
    let mut all = Vec::new();
    for chunk in frames.chunks(per_commit) {
        let batch: Vec<sluice::log::SharedEvent> = chunk
            .iter()
            .flatten()
            .cloned()
            .map(sluice::log::SharedEvent::new)
            .collect();
        let last = batch.last().unwrap();
        let resume = StampState {
            next_seq: last.seq + 1,
            last_time_us: last.time_us,
            upstream_cursor: Some(last.upstream_seq),
        };
        store.append(&batch, resume).unwrap();
        all.extend(batch.iter().map(|e| (**e).clone()));
    }
    all
}

fn read_store(store: &dyn EventStore, payloads: Payloads, chunk: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut next = 1;
    for _ in 0..100_000 {
        let got = store
            .read(next, ReadLimits::events(chunk), payloads)
            .expect("read");
        let Some(last) = got.last() else { break };
        next = last.seq + 1;
        out.extend(got.into_iter().map(sluice::log::SharedEvent::into_event));
    }
    out
}

fn assert_reads_exactly(store: &dyn EventStore, written: &[Event]) {
    for payloads in [Payloads::ALL, Payloads::V1, Payloads::V2, Payloads::RAW] {
        let got = read_store(store, payloads, 61);
        assert_eq!(got.len(), written.len(), "{payloads:?}");
        for (want, got) in written.iter().zip(&got) {
            assert_same(&crate::with_payloads(want, payloads), got);
        }
    }
}

/// Merge steps until one merges nothing; the segments merged.
fn merge_all(store: &FjallStore) -> u64 {
    merge_all_counted(store).0
}

/// [`merge_all`], and the segments they were merged into.
fn merge_all_counted(store: &FjallStore) -> (u64, u64) {
    let (mut merged, mut written) = (0, 0);
    for _ in 0..10_000 {
        let step = store.merge_small_segments().unwrap();
        if step.merged == 0 {
            return (merged, written);
        }
        assert!(step.written < step.merged, "{step:?}");
        merged += step.merged;
        written += step.written;
    }
    panic!("merging never ends");
}

fn files_bytes(dir: &Path) -> u64 {
    ["data", "raw"]
        .iter()
        .flat_map(|d| std::fs::read_dir(dir.join("events").join(d)).unwrap())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn file_names(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = ["data", "raw"]
        .iter()
        .flat_map(|d| std::fs::read_dir(dir.join("events").join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

#[test]
fn small_segments_merge_into_full_ones_and_read_back_exactly() {
    merge_and_read_back(0);
}

/// The merge before session 17: every raw frame decoded and compressed again (the
/// segments' frames are all below the bound), which is still what small ones get.
#[test]
fn small_segments_whose_frames_are_compressed_again_read_back_exactly() {
    merge_and_read_back(TARGET * 2);
}

fn merge_and_read_back(keep_raw_bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = |dir: &Path| config_keeping(dir, keep_raw_bytes);
    let frames = synth_frames(600);
    let (store, _) = FjallStore::open(config(dir.path())).unwrap();
    // Two frames per commit: segments far below the target, as at the live rate.
    let written = append_in_commits(&store, &frames, 2);
    let small = store.segments(usize::MAX);
    assert_eq!(small.len(), frames.len().div_ceil(2));
    let stored_before = store.size_bytes();
    let raw_before = store.raw_size_bytes();

    let (merged, merged_into) = merge_all_counted(&store);
    if keep_raw_bytes == 0 {
        // Every segment's zstd frame kept byte for byte: the merged frames values hold
        // the same zstd frames, less one header per segment merged away.
        assert_eq!(
            store.raw_size_bytes(),
            raw_before - FRAMES_HEADER * (merged - merged_into)
        );
    } else {
        assert!(
            store.raw_size_bytes() < raw_before - FRAMES_HEADER * (merged - merged_into),
            "frames compressed together store less: {} vs {raw_before}",
            store.raw_size_bytes()
        );
    }
    let segs = store.segments(usize::MAX);
    assert!(
        merged as usize >= small.len() * 3 / 4,
        "{merged} of {} merged",
        small.len()
    );
    assert!(
        segs.len() * 4 < small.len(),
        "{} segments left of {}",
        segs.len(),
        small.len()
    );
    // Contiguous, and the newest segment untouched.
    for w in segs.windows(2) {
        assert_eq!(w[1].first_seq, w[0].last_seq + 1);
    }
    assert_eq!(segs.last(), small.last());
    assert!(
        store.size_bytes() < stored_before,
        "larger segments compress better: {} vs {stored_before}",
        store.size_bytes()
    );
    assert_reads_exactly(&store, &written);
    // The merged-away segments' files are removed: what is on disk is what is held, plus
    // at most the two files being appended to in each directory.
    assert!(
        files_bytes(dir.path()) <= store.size_bytes() + 4 * 256 * 1024,
        "{} on disk for {} held",
        files_bytes(dir.path()),
        store.size_bytes()
    );
    // Nothing left to merge: a second pass merges nothing.
    assert_eq!(merge_all(&store), 0);
    drop(store);

    // Reopened: clean, the same events, and it keeps appending and merging.
    let (store, report) = FjallStore::open(config(dir.path())).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_reads_exactly(&store, &written);
    let more = synth_frames(900);
    let mut written = written;
    let next = written.len();
    // The same ingest's later frames continue the seqs.
    written.extend(append_in_commits(&store, &more[600..], 3));
    assert!(written.len() > next);
    assert!(merge_all(&store) > 0);
    assert_reads_exactly(&store, &written);
}

#[test]
fn a_reader_scanning_while_segments_merge_gets_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let frames = synth_frames(800);
    let (store, _) = FjallStore::open(config(dir.path())).unwrap();
    let written = append_in_commits(&store, &frames, 1);
    let store = Arc::new(store);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let mut scans = Vec::new();
            // Small reads, V1 and raw in turn, until the merging is over (and one more).
            for round in 0..10_000 {
                let finished = done.load(Ordering::Acquire);
                let payloads = if round % 2 == 0 {
                    Payloads::V1
                } else {
                    Payloads::RAW
                };
                scans.push((payloads, read_store(store.as_ref(), payloads, 7)));
                if finished {
                    break;
                }
            }
            scans
        })
    };
    let merged = merge_all(&store);
    done.store(true, Ordering::Release);
    let scans = reader.join().unwrap();
    assert!(merged > 100, "{merged}");
    assert!(scans.len() >= 2);
    for (payloads, got) in scans {
        assert_eq!(got.len(), written.len(), "{payloads:?}");
        for (want, got) in written.iter().zip(&got) {
            assert_same(&crate::with_payloads(want, payloads), got);
        }
    }
}

/// Copies the data and raw files of `from` that `to` does not have.
fn add_missing_files(from: &Path, to: &Path) -> usize {
    let mut added = 0;
    for d in ["data", "raw"] {
        for entry in std::fs::read_dir(from.join("events").join(d)).unwrap() {
            let entry = entry.unwrap();
            let target = to.join("events").join(d).join(entry.file_name());
            if !target.exists() {
                std::fs::copy(entry.path(), &target).unwrap();
                added += 1;
            }
        }
    }
    added
}

#[test]
fn a_merge_cut_short_at_either_side_of_its_commit_opens_to_the_same_events() {
    let root = tempfile::tempdir().unwrap();
    let live = root.path().join("live");
    let frames = synth_frames(400);
    let written = {
        let (store, _) = FjallStore::open(config(&live)).unwrap();
        append_in_commits(&store, &frames, 1)
    };
    let small = frames.len();
    let before = root.path().join("before");
    crate::copy_dir(&live, &before);
    let merged_segments = {
        let (store, _) = FjallStore::open(config(&live)).unwrap();
        assert!(merge_all(&store) > 0);
        store.segments(usize::MAX).len()
    };
    assert!(merged_segments * 4 < small);

    // 1. The merged values were written and synced, the index batch never committed:
    // the old index with every file of both.
    let cut_before = root.path().join("cut-before-commit");
    crate::copy_dir(&before, &cut_before);
    assert!(add_missing_files(&live, &cut_before) > 0);
    let files_with_merged = file_names(&cut_before);
    {
        let (store, report) = FjallStore::open(config(&cut_before)).unwrap();
        assert_eq!(store.segments(usize::MAX).len(), small);
        assert!(
            !report.notes.is_empty(),
            "the unreferenced merged values are reported"
        );
        assert!(
            file_names(&cut_before).len() < files_with_merged.len(),
            "and removed"
        );
        assert_reads_exactly(&store, &written);
    }

    // 2. The index batch committed, the merged-away segments' files not yet removed: the
    // new index with every file of both.
    let cut_after = root.path().join("cut-after-commit");
    crate::copy_dir(&live, &cut_after);
    assert!(add_missing_files(&before, &cut_after) > 0);
    let files_with_old = file_names(&cut_after);
    {
        let (store, _) = FjallStore::open(config(&cut_after)).unwrap();
        assert_eq!(store.segments(usize::MAX).len(), merged_segments);
        assert!(
            file_names(&cut_after).len() < files_with_old.len(),
            "the old files nothing points at are removed"
        );
        assert_reads_exactly(&store, &written);
    }
}
