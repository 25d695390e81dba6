//! The event log: append, read through tail and store, cursor lookups, restart, torn tails.

use crate::log_common;

use std::time::Duration;

use log_common::{assert_same, test_config, EventGen};
use sluice::event::{Event, StampState};
use sluice::log::{Cursor, Log, LogError, Payloads, ReadLimits, Resolved};

fn read_all(log: &Log, from: u64, chunk: usize) -> Vec<sluice::log::SharedEvent> {
    let reader = log.reader();
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..100_000 {
        let got = reader.read_from(next, chunk, usize::MAX).expect("read");
        if got.is_empty() {
            break;
        }
        for e in &got {
            assert_eq!(e.seq, next, "gapless and in order");
            next += 1;
        }
        out.extend(got);
    }
    out
}

fn append_frames(log: &Log, gen: &mut EventGen, frames: usize) -> Vec<Event> {
    let mut all = Vec::new();
    for _ in 0..frames {
        let f = gen.next_frame();
        all.extend(f.iter().cloned());
        log.append(f).expect("append");
    }
    all
}

#[test]
fn append_read_lookup_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    assert_eq!(state, StampState::fresh());
    let mut gen = EventGen::new(state);
    let written = append_frames(&log, &mut gen, 400);
    assert!(log.flush(Duration::from_secs(30)));
    let got = read_all(&log, 1, 37);
    assert_eq!(got.len(), written.len());
    for (a, b) in written.iter().zip(&got) {
        assert_same(a, b);
    }
    // Out-of-order append is refused and changes nothing.
    let mut bad = gen.next_frame();
    bad[0].seq += 5;
    assert!(matches!(log.append(bad), Err(LogError::OutOfOrder { .. })));
    gen.state.next_seq -= gen.state.next_seq - written.len() as u64 - 1;
    gen.state.upstream_cursor = Some(written.last().unwrap().upstream_seq);
    gen.state.last_time_us = written.last().unwrap().time_us;
    log.close().unwrap();
    drop(log);

    // Reopen: the tail is empty, everything comes from the store.
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    let last = written.last().unwrap();
    assert_eq!(state.next_seq, last.seq + 1);
    assert_eq!(state.upstream_cursor, Some(last.upstream_seq));
    assert_eq!(state.last_time_us, last.time_us);
    let got = read_all(&log, 1, 53);
    assert_eq!(got.len(), written.len());
    for (a, b) in written.iter().zip(&got) {
        assert_same(a, b);
    }
    // From a cursor in the middle, with a byte limit, and with only v1.
    let mid = written[written.len() / 2].seq;
    let part = log.reader().read_from(mid, 10, 1).unwrap();
    assert_eq!(part.len(), 1, "at least one event even past max_bytes");
    assert_eq!(part[0].seq, mid);
    let v1 = log
        .reader()
        .read_from_with(mid, ReadLimits::events(5), Payloads::V1)
        .unwrap();
    assert_eq!(v1[0].seq, mid);
    assert!(v1[0].raw_frame.is_empty() && v1[0].v2_json.is_none());
    assert_eq!(v1[0].v1_json, written[(mid - 1) as usize].v1_json);

    // Cursor lookups.
    let r = log.reader();
    let e = &written[100];
    assert_eq!(
        r.resolve(Cursor::Seq(e.seq)).unwrap(),
        Resolved::From(e.seq)
    );
    assert_eq!(
        r.resolve(Cursor::TimeUs(e.time_us)).unwrap(),
        Resolved::From(e.seq)
    );
    let prev = &written[99];
    assert_eq!(
        r.resolve(Cursor::TimeUs(prev.time_us + 1)).unwrap(),
        Resolved::From(e.seq),
        "time cursor is inclusive of the first event at or after it"
    );
    let first_after = written
        .iter()
        .find(|x| x.upstream_seq > e.upstream_seq)
        .unwrap();
    assert_eq!(
        r.resolve(Cursor::UpstreamAfter(e.upstream_seq)).unwrap(),
        Resolved::From(first_after.seq),
        "upstream cursor is exclusive"
    );
    assert_eq!(
        r.resolve(Cursor::Seq(0)).unwrap(),
        Resolved::TooOld { oldest: 1 }
    );
    let next = last.seq + 1;
    assert_eq!(
        r.resolve(Cursor::Seq(next + 10)).unwrap(),
        Resolved::Live { next }
    );
    assert_eq!(
        r.resolve(Cursor::TimeUs(i64::MAX)).unwrap(),
        Resolved::Live { next }
    );
    assert_eq!(
        r.resolve(Cursor::UpstreamAfter(last.upstream_seq + 5))
            .unwrap(),
        Resolved::Future {
            newest_upstream_seq: last.upstream_seq
        }
    );
    assert_eq!(
        r.resolve(Cursor::UpstreamAfter(last.upstream_seq)).unwrap(),
        Resolved::Live { next }
    );
    let b = r.bounds().unwrap();
    assert_eq!((b.oldest_seq, b.newest_seq), (1, last.seq));
    assert_eq!(
        (b.oldest_time_us, b.newest_time_us),
        (written[0].time_us, last.time_us)
    );

    // Appends continue the seq space after restart; lookups span store and tail.
    let mut gen = EventGen::new(state);
    let more = append_frames(&log, &mut gen, 50);
    assert_eq!(more[0].seq, last.seq + 1);
    let got = read_all(&log, 1, 64);
    assert_eq!(got.len(), written.len() + more.len());
    assert_eq!(
        r.resolve(Cursor::TimeUs(more[3].time_us)).unwrap(),
        Resolved::From(more[3].seq)
    );
}

fn newest_journal(dir: &std::path::Path) -> std::path::PathBuf {
    let jdir = dir.join("events").join("journals");
    let mut files: Vec<_> = std::fs::read_dir(&jdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    });
    files.pop().expect("a journal file")
}

/// Where the written data of a (preallocated, zero-filled) journal ends.
fn data_end(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |p| p as u64 + 1)
}

/// Writes `commits` commits, closes, damages the store with `damage`, reopens and checks
/// that the log resumes consistently and stays gapless.
fn damage_and_recover(damage: impl FnOnce(&std::path::Path)) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    let mut gen = EventGen::new(state);
    let mut written = Vec::new();
    for _ in 0..6 {
        written.extend(append_frames(&log, &mut gen, 20));
        assert!(log.flush(Duration::from_secs(30)));
    }
    log.close().unwrap();
    drop(log);
    damage(dir.path());
    let (log, state) =
        Log::open(test_config(dir.path())).expect("a damaged tail never prevents start");
    let durable = state.next_seq - 1;
    assert!(durable <= written.len() as u64);
    let got = read_all(&log, 1, 100);
    assert_eq!(
        got.len() as u64,
        durable,
        "everything up to the resume point is readable"
    );
    for (a, b) in written.iter().zip(&got) {
        assert_same(a, b);
    }
    if durable > 0 {
        let last = &written[durable as usize - 1];
        assert_eq!(state.upstream_cursor, Some(last.upstream_seq));
        assert_eq!(state.last_time_us, last.time_us);
    }
    // Ingest re-stamps from the resume point: the same events get the same seqs again.
    let mut regen = EventGen::new(StampState::fresh());
    let mut replayed = Vec::new();
    while replayed.len() < written.len() {
        replayed.extend(regen.next_frame());
    }
    let resend: Vec<Event> = replayed.into_iter().skip(durable as usize).collect();
    let mut i = 0;
    while i < resend.len() {
        let mut j = i + 1;
        while j < resend.len() && resend[j].op_index != 0 {
            j += 1;
        }
        log.append(resend[i..j].to_vec()).unwrap();
        i = j;
    }
    assert!(log.flush(Duration::from_secs(30)));
    let got = read_all(&log, 1, 100);
    assert_eq!(got.len(), written.len());
    for (a, b) in written.iter().zip(&got) {
        assert_same(a, b);
    }
    (durable, written.len() as u64)
}

#[test]
fn torn_journal_tail_is_truncated_and_resumed() {
    for cut in [1u64, 7, 100, 5000, 60_000] {
        let (durable, total) = damage_and_recover(|dir| {
            // Journals are preallocated: cut from the end of the written data.
            let path = newest_journal(dir);
            let end = data_end(&path);
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(end.saturating_sub(cut)).unwrap();
        });
        eprintln!("cut {cut} bytes: resumed after {durable} of {total}");
        assert!(durable < total, "the torn commit is gone");
    }
}

#[test]
fn corrupt_newest_segment_is_dropped_and_reported() {
    let (durable, total) = damage_and_recover(|dir| {
        // Garble the second half of the newest data file, as a torn write under the
        // newest segment's values would leave it.
        let data = dir.join("events").join("data");
        let mut files: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let path = files.pop().expect("a data file");
        let mut bad = std::fs::read(&path).unwrap();
        let n = bad.len();
        for b in &mut bad[n / 2..] {
            *b ^= 0xA5;
        }
        std::fs::write(&path, bad).unwrap();
    });
    assert!(durable < total, "the damaged segment was dropped");
}

#[test]
fn flipped_byte_in_journal_tail() {
    let (durable, total) = damage_and_recover(|dir| {
        let path = newest_journal(dir);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = data_end(&path) as usize;
        bytes[n - 40] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    });
    eprintln!("flipped byte: resumed after {durable} of {total}");
}
