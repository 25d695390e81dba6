//! Property: with ingest appending concurrently, readers starting at random cursors see a
//! gapless, duplicate-free, ordered stream across the hot-tail / durable-store boundary.

use crate::log_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log_common::{test_config, EventGen};
use proptest::prelude::*;
use sluice::event::{Event, StampState};
use sluice::log::{Log, LogError};

fn run_case(
    frames: usize,
    tail_bytes: usize,
    commit_ms: u64,
    chunks: Vec<usize>,
    starts: Vec<f64>,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.tail_max_bytes = tail_bytes;
    config.commit_interval = Duration::from_millis(commit_ms);
    config.segment_target_bytes = 16 * 1024;
    let (log, state) = Log::open(config).unwrap();
    let log = Arc::new(log);
    let mut gen = EventGen::new(state);
    let all: Vec<Vec<Event>> = (0..frames).map(|_| gen.next_frame()).collect();
    let expected: Arc<Vec<(u64, i64, i64)>> = Arc::new(
        all.iter()
            .flatten()
            .map(|e| (e.seq, e.upstream_seq, e.time_us))
            .collect(),
    );
    let last_seq = expected.last().map_or(0, |e| e.0);
    let done = Arc::new(AtomicBool::new(false));

    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for (i, frame) in all.into_iter().enumerate() {
                log.append(frame).unwrap();
                if i % 16 == 0 {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
        })
    };

    let mut readers = Vec::new();
    for (r, (chunk, start)) in chunks.into_iter().zip(starts).enumerate() {
        let reader = log.reader();
        let expected = expected.clone();
        let done = done.clone();
        readers.push(std::thread::spawn(move || -> Result<usize, String> {
            // Start at a random point of what exists when the reader arrives.
            std::thread::sleep(Duration::from_millis(r as u64 * 3));
            let newest = reader.newest_seq().max(1);
            let mut next = 1 + ((newest as f64 - 1.0) * start) as u64;
            let first = next;
            let deadline = Instant::now() + Duration::from_secs(60);
            while next <= last_seq {
                if Instant::now() > deadline {
                    return Err(format!("reader {r} stuck at {next}"));
                }
                let got = match reader.read_from(next, chunk, 256 * 1024) {
                    Ok(got) => got,
                    Err(LogError::TooOld { .. }) => return Err("unexpected TooOld".into()),
                    Err(e) => return Err(e.to_string()),
                };
                if got.is_empty() {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                for e in got {
                    if e.seq != next {
                        return Err(format!("reader {r}: expected seq {next}, got {}", e.seq));
                    }
                    let (seq, up, t) = expected[(e.seq - 1) as usize];
                    if (e.seq, e.upstream_seq, e.time_us) != (seq, up, t) {
                        return Err(format!("reader {r}: wrong content at seq {seq}"));
                    }
                    if e.v1_json.is_none() && e.v2_json.is_none() && e.raw_frame.is_empty() {
                        return Err(format!("reader {r}: empty payloads at seq {seq}"));
                    }
                    next += 1;
                }
            }
            let _ = done.load(Ordering::Relaxed);
            Ok((next - first) as usize)
        }));
    }
    writer.join().unwrap();
    done.store(true, Ordering::Relaxed);
    for r in readers {
        let res = r.join().unwrap();
        prop_assert!(res.is_ok(), "{:?}", res);
    }
    prop_assert!(log.flush(Duration::from_secs(30)));
    // After everything is durable, a full read from 1 crosses into the store.
    let reader = log.reader();
    let mut next = 1;
    for _ in 0..10_000 {
        let got = reader.read_from(next, 97, usize::MAX).unwrap();
        if got.is_empty() {
            break;
        }
        for e in got {
            prop_assert_eq!(e.seq, next);
            next += 1;
        }
    }
    prop_assert_eq!(next, last_seq + 1);
    prop_assert!(
        reader.tail().oldest_seq() > 1,
        "the small tail evicted: the boundary was crossed"
    );
    log.close().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn replay_then_live_is_gapless(
        frames in 200usize..450,
        tail_bytes in 32usize * 1024..512 * 1024,
        commit_ms in 1u64..40,
        chunks in proptest::collection::vec(1usize..300, 3..6),
        starts in proptest::collection::vec(0.0f64..1.0, 6),
    ) {
        run_case(frames, tail_bytes, commit_ms, chunks, starts)?;
    }
}

#[test]
fn restart_state_is_fresh_for_empty_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, state) = Log::open(test_config(dir.path())).unwrap();
    assert_eq!(state, StampState::fresh());
}
