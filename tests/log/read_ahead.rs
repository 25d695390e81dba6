//! The store's read-ahead: a sequential reader gets every event exactly while the
//! segment after the one it decodes is decoded on another thread, read-ahead ends with
//! the log, and a segment that does not decode is reported to the reader (never skipped,
//! never a hang) while the read-ahead keeps serving the segments after it.

use crate::log_common;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use log_common::EventGen;
use sluice::event::StampState;
use sluice::log::{EventStore, FjallConfig, FjallStore, LogError, Payloads, ReadLimits};

fn config(dir: &std::path::Path) -> FjallConfig {
    let mut c = FjallConfig::new(dir.join("events"));
    c.segment_target_bytes = 64 * 1024;
    c.read_ahead_segments = 1;
    c
}

/// Reads from `from` in reads of `chunk` events until the end or an error.
fn scan(
    store: &FjallStore,
    from: u64,
    chunk: usize,
    payloads: Payloads,
) -> (Vec<sluice::log::SharedEvent>, Option<LogError>) {
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..100_000 {
        match store.read(next, ReadLimits::events(chunk), payloads) {
            Ok(got) => {
                let Some(last) = got.last() else { break };
                next = last.seq + 1;
                out.extend(got);
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sequential_reads_with_read_ahead_return_every_event_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = FjallStore::open(config(dir.path())).unwrap();
    let written = EventGen::new(StampState::fresh()).append_frames(&store, 300);
    let segments = store.segments(usize::MAX);
    assert!(segments.len() >= 8, "{} segments", segments.len());

    // A read that ends with the first segment asked for the second to be decoded ahead;
    // the next read finds it decoded and shares it.
    let first = segments[0];
    let n = (first.last_seq - first.first_seq + 1) as usize;
    let got = store.read(1, ReadLimits::events(n), Payloads::V1).unwrap();
    assert_eq!(got.len(), n);
    wait_until("the second segment decoded ahead", || {
        store.read_ahead_decodes() == 1
    });
    let (decoded, shared) = store.decoded_cache_counts();
    assert_eq!((decoded, shared), (1, 0));
    let got = store
        .read(first.last_seq + 1, ReadLimits::events(1), Payloads::V1)
        .unwrap();
    assert_eq!(got[0].seq, first.last_seq + 1);
    assert_eq!(
        store.decoded_cache_counts(),
        (1, 1),
        "served by the read-ahead"
    );

    // Whole scans with every payload choice, in reads that end mid-segment: every event
    // exactly, and each segment decoded once, by the reader or ahead of it (nothing
    // beyond the newest segment).
    let before = store.decoded_cache_counts().0 + store.read_ahead_decodes();
    for payloads in [Payloads::ALL, Payloads::V2, Payloads::RAW] {
        let (got, err) = scan(&store, 1, 37, payloads);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got.len(), written.len());
        for (want, got) in written.iter().zip(&got) {
            log_common::assert_same(&crate::with_payloads(want, payloads), got);
        }
    }
    let after = store.decoded_cache_counts().0 + store.read_ahead_decodes();
    assert_eq!(after - before, 3 * segments.len() as u64);
}

#[test]
fn a_segment_that_does_not_decode_is_reported_and_read_ahead_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (written, segments) = {
        let (store, _) = FjallStore::open(config(dir.path())).unwrap();
        let written = EventGen::new(StampState::fresh()).append_frames(&store, 300);
        (written, store.segments(usize::MAX))
    };
    assert!(segments.len() >= 8);
    // Garble the middle of the third segment's events value (all in the one data file,
    // back to back; recovery verifies only the newest segment, so this one stays).
    let bad = segments[2];
    let offset: u64 = segments[..2].iter().map(|s| s.bytes - s.raw_bytes).sum();
    let len = bad.bytes - bad.raw_bytes;
    let files: Vec<_> = std::fs::read_dir(dir.path().join("events/data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let path = &files[0];
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[(offset + len / 2) as usize..(offset + len / 2 + 16) as usize] {
        *b ^= 0xA5;
    }
    std::fs::write(path, bytes).unwrap();

    let (store, report) = FjallStore::open(config(dir.path())).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let store = Arc::new(store);
    // The read-ahead meets the bad segment (a read of exactly the second segment asks for
    // the third), and goes on after it: a read of exactly the fourth asks for the fifth,
    // decoded ahead in its turn.
    let exactly = |s: sluice::log::Segment| {
        let n = (s.last_seq - s.first_seq + 1) as usize;
        let got = store
            .read(s.first_seq, ReadLimits::events(n), Payloads::V2)
            .unwrap();
        assert_eq!(got.len(), n);
    };
    exactly(segments[1]);
    wait_until("the bad segment tried ahead", || {
        store.read_ahead_decodes() == 1
    });
    exactly(segments[3]);
    wait_until("the fifth segment decoded ahead", || {
        store.read_ahead_decodes() == 2
    });
    // A failed decode is not kept: the bad segment is reported to every read of it.
    assert!(matches!(
        store.read(bad.first_seq, ReadLimits::events(1), Payloads::V2),
        Err(LogError::Corrupt(_))
    ));
    // A sequential scan stops there with the error (on a thread: a hang fails the test
    // instead of stopping it), after every event before it exactly.
    let (tx, rx) = mpsc::channel();
    let reader = Arc::clone(&store);
    std::thread::spawn(move || {
        // Reads of one event: a read that reaches the bad segment fails whole.
        let _ = tx.send(scan(&reader, 1, 1, Payloads::V1));
    });
    let (got, err) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the scan ends");
    assert!(matches!(err, Some(LogError::Corrupt(_))), "{err:?}");
    assert_eq!(
        got.len() as u64,
        bad.first_seq - 1,
        "everything before it, nothing of it"
    );
    for (want, got) in written.iter().zip(&got) {
        log_common::assert_same(&crate::with_payloads(want, Payloads::V1), got);
    }
    // The segments after it read as before.
    let (got, err) = scan(&store, bad.last_seq + 1, 29, Payloads::V1);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.len() as u64, written.len() as u64 - bad.last_seq);
    for (want, got) in written[bad.last_seq as usize..].iter().zip(&got) {
        log_common::assert_same(&crate::with_payloads(want, Payloads::V1), got);
    }
}

/// Niceness of every thread of this process whose name starts with `prefix` (Linux
/// `/proc`; thread names are cut to 15 bytes there).
fn thread_nices(prefix: &str) -> Vec<i64> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name start with the state (field 3); the
        // niceness is field 19.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        let nice = after_name.split_whitespace().nth(16).unwrap();
        nices.push(nice.parse().unwrap());
    }
    nices
}

#[test]
fn the_read_ahead_thread_yields_the_cores_to_the_live_path() {
    // It decodes for catch-up readers, which take what live delivery leaves: the store's
    // default niceness is the catch-up pool's (19). Every test here uses the default, so
    // every read-ahead thread of this process must be at 19.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = FjallStore::open(config(dir.path())).unwrap();
    assert_eq!(
        FjallConfig::new("x").read_ahead_class,
        sluice::priority::Background::Nice(19)
    );
    wait_until("the read-ahead thread lowered its priority", || {
        let nices = thread_nices("sluice-log-read");
        !nices.is_empty() && nices.iter().all(|&n| n == 19)
    });
    drop(store);
}
