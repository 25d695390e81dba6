//! Event log throughput: durable scan from a cursor, hot-tail scan, sustained append with
//! group commit. Events are the real corpus frames (ingested once, then re-stamped with new
//! seqs, times and upstream seqs so any number can be made).
//!
//! Run: `cargo bench --bench log`. Needs the shared upstream fixtures. Set
//! `SLUICE_BENCH_DIR` to put the stores on a specific disk (default: the temp dir).
//! Also prints the stored bytes per event on the corpus and on `fixtures/synth-1000.bin`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::decode::DecodeLimits;
use sluice::event::{Event, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{
    EventStore, FjallConfig, FjallStore, HotTail, Log, LogConfig, Payloads, ReadLimits, TailRead,
};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

fn ingest_file(path: &std::path::Path) -> Option<Vec<Vec<Event>>> {
    let frames = read_all(path, 8 << 20).ok()?;
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut out = Vec::new();
    for f in frames {
        if let IngestOutcome::Events(events) = ingestor.ingest(Bytes::from(f), i64::MAX / 2) {
            out.push(events);
        }
    }
    Some(out)
}

fn corpus() -> Vec<Vec<Event>> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    ingest_file(&path).unwrap_or_else(|| panic!("corpus missing at {}", path.display()))
}

/// `n` frames' worth of events continuing `state`, cycling over `templates`: each frame is
/// ingested again with new stamps (seq, time), so its JSON says what its fields say, as
/// ingest makes it; upstream seqs are renumbered to keep increasing across cycles.
fn restamp(templates: &[Vec<Event>], state: &mut StampState, frames: usize) -> Vec<Vec<Event>> {
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut out = Vec::with_capacity(frames);
    for k in 0..frames {
        let upstream = state.upstream_cursor.map_or(1_000, |c| c + 1);
        let template = &templates[k % templates.len()];
        let first_time = state.last_time_us.max(1_700_000_000_000_000) + 100;
        let IngestOutcome::Events(mut frame) = ingestor.restamp(
            template[0].raw_frame.clone(),
            i64::MAX / 2,
            state.next_seq,
            first_time,
        ) else {
            panic!("a template frame no longer ingests");
        };
        for e in &mut frame {
            e.upstream_seq = upstream;
        }
        if let Some(last) = frame.last() {
            state.next_seq = last.seq + 1;
            state.last_time_us = last.time_us;
        }
        state.upstream_cursor = Some(upstream);
        out.push(frame);
    }
    out
}

/// True when run to measure (`cargo bench` passes `--bench`); `cargo test` runs every bench
/// once as a smoke test, where the data sets are kept small.
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("SLUICE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// The default store settings, except what `SLUICE_BENCH_JSON_LEVEL`,
/// `SLUICE_BENCH_RAW_LEVEL` (the raw level while the writer keeps up),
/// `SLUICE_BENCH_RAW_FAST_LEVEL` (behind), `SLUICE_BENCH_SEGMENT_BYTES`, `SLUICE_BENCH_ENCODE_THREADS` and
/// `SLUICE_BENCH_DECODED_CACHE_MIB`, `SLUICE_BENCH_READ_AHEAD_SEGMENTS` and
/// `SLUICE_BENCH_DIRECT_RAW` (0: raw files through the page cache) override (to compare
/// settings on the same events; unset for the recorded numbers).
fn store_config(dir: &std::path::Path) -> FjallConfig {
    let mut c = FjallConfig::new(dir.join("events"));
    if let Some(l) = env_num("SLUICE_BENCH_JSON_LEVEL") {
        c.compression.json_level = l;
    }
    if let Some(l) = env_num("SLUICE_BENCH_RAW_LEVEL") {
        c.compression.raw_level = l;
    }
    if let Some(l) = env_num("SLUICE_BENCH_RAW_FAST_LEVEL") {
        c.compression.raw_fast_level = l;
    }
    if let Some(b) = env_num("SLUICE_BENCH_SEGMENT_BYTES") {
        c.segment_target_bytes = b;
    }
    if let Some(t) = env_num("SLUICE_BENCH_ENCODE_THREADS") {
        c.encode_threads = t;
    }
    if let Some(m) = env_num::<usize>("SLUICE_BENCH_DECODED_CACHE_MIB") {
        c.decoded_cache_bytes = m << 20;
    }
    if let Some(n) = env_num("SLUICE_BENCH_READ_AHEAD_SEGMENTS") {
        c.read_ahead_segments = n;
    }
    if let Some(d) = env_num::<u8>("SLUICE_BENCH_DIRECT_RAW") {
        c.direct_raw_writes = d != 0;
    }
    if let Some(k) = env_num::<usize>("SLUICE_BENCH_MERGE_KEEP_KIB") {
        c.merge_keep_raw_bytes = k << 10;
    }
    c
}

/// The daemon's log settings with the store's as the benches set them (`store_config`).
fn log_config(dir: &std::path::Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    let store = store_config(dir);
    config.compression = store.compression;
    config.segment_target_bytes = store.segment_target_bytes;
    config.encode_threads = store.encode_threads;
    config.direct_raw_writes = store.direct_raw_writes;
    config
}

/// Calls `each` with every commit of `frames` as the log writer groups them (about
/// `commit_events` events, whole upstream frames); the number of events.
fn in_commits(
    frames: Vec<Vec<Event>>,
    commit_events: usize,
    mut each: impl FnMut(&[sluice::log::SharedEvent]),
) -> usize {
    let mut events = 0;
    let mut group: Vec<sluice::log::SharedEvent> = Vec::new();
    for f in frames {
        group.extend(f.into_iter().map(sluice::log::SharedEvent::new));
        if group.len() >= commit_events {
            each(&group);
            events += group.len();
            group.clear();
        }
    }
    if !group.is_empty() {
        each(&group);
        events += group.len();
    }
    events
}

/// A segment's raw frames back to back, each once (as its first event carries it).
fn frames_of(part: &[sluice::log::SharedEvent]) -> Vec<u8> {
    let mut plain = Vec::new();
    let mut starts = sluice::log::codec::FrameStarts::default();
    for e in part {
        if starts.next(e) {
            plain.extend_from_slice(&e.raw_frame);
        }
    }
    plain
}

/// Stored bytes per event of `frames` (renumbered into one seq space), committed in
/// groups of about `commit_events` events as the log writer does (a segment never spans a
/// commit): the JSON part (events values plus the 96-byte index entry of each segment)
/// and the raw part (frames values) apart, and beside it the same segments' frames
/// compressed whole by zstd at level 3 (the target's reference).
fn bytes_per_event(name: &str, frames: &[Vec<Event>], commit_events: usize, detail: bool) {
    let store = store_config(std::path::Path::new("."));
    let mut state = StampState::fresh();
    let frames = restamp(frames, &mut state, frames.len());
    let mut encoder = sluice::log::codec::Encoder::new(store.compression).expect("encoder");
    let (mut json, mut raw, mut segments) = (0usize, 0usize, 0usize);
    let (mut zstd3, mut raw_fast) = (0usize, 0usize);
    let mut columns: Vec<(&str, usize, usize)> = Vec::new();
    let events = in_commits(frames, commit_events, |group| {
        for part in sluice::log::codec::split_segments(group, store.segment_target_bytes) {
            let seg = encoder.encode(part).expect("encode");
            json += seg.events_value.len() + 96;
            raw += seg.frames_value.len();
            raw_fast += encoder
                .encode_at(part, store.compression.raw_fast_level)
                .expect("encode")
                .frames_value
                .len();
            zstd3 += zstd::bulk::compress(&frames_of(part), 3)
                .expect("zstd")
                .len();
            segments += 1;
            if let Ok(sizes) = sluice::log::codec::column_sizes(&seg.events_value) {
                if columns.is_empty() {
                    columns = sizes;
                } else {
                    for (acc, s) in columns.iter_mut().zip(sizes) {
                        acc.1 += s.1;
                        acc.2 += s.2;
                    }
                }
            }
        }
    });
    let n = events as f64;
    eprintln!(
        "bytes/event {name}, commits of {commit_events} events: {events} events in {segments} \
         segments; JSON wires {:.0} B/event, raw frames {:.0} B/event at level {} (zstd level 3 \
         of the same: {:.0}; at the fast level {}: {:.0}), total {:.0} B/event",
        json as f64 / n,
        raw as f64 / n,
        store.compression.raw_level,
        zstd3 as f64 / n,
        store.compression.raw_fast_level,
        raw_fast as f64 / n,
        (json + raw) as f64 / n
    );
    if detail {
        let cols: Vec<String> = columns
            .iter()
            .map(|(c, z, p)| format!("{c} {:.1}/{:.1}", *z as f64 / n, *p as f64 / n))
            .collect();
        eprintln!("  columns, compressed/plain B/event: {}", cols.join(", "));
    }
}

/// The raw frames of `frames` as the store's segments hold them (commits of about
/// `commit_events` events, cut into segments), each segment's frames back to back.
fn raw_segments(frames: &[Vec<Event>], commit_events: usize) -> (Vec<Vec<u8>>, usize) {
    let store = store_config(std::path::Path::new("."));
    let mut state = StampState::fresh();
    let frames = restamp(frames, &mut state, frames.len());
    let mut out = Vec::new();
    let events = in_commits(frames, commit_events, |group| {
        for part in sluice::log::codec::split_segments(group, store.segment_target_bytes) {
            out.push(frames_of(part));
        }
    });
    (out, events)
}

/// Raw-frame compression variants on the same segments: stored bytes per event against
/// plain zstd level 3, and one thread's compression speed (events/s, best of 3 passes).
/// `dict` is a dictionary trained on other frames than these.
fn raw_variants(name: &str, frames: &[Vec<Event>], commit_events: usize, dict: &[u8]) {
    let (segments, events) = raw_segments(frames, commit_events);
    let plain: usize = segments.iter().map(Vec::len).sum();
    let mut line = Vec::new();
    let mut reference = 0.0;
    for (label, level, with_dict) in [
        ("zstd 3", 3, false),
        ("-3", -3, false),
        ("1", 1, false),
        ("2", 2, false),
        ("-3+dict", -3, true),
        ("1+dict", 1, true),
        ("3+dict", 3, true),
    ] {
        let mut c = if with_dict {
            zstd::bulk::Compressor::with_dictionary(level, dict).expect("zstd")
        } else {
            zstd::bulk::Compressor::new(level).expect("zstd")
        };
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .expect("zstd");
        let passes: Vec<(f64, usize)> = (0..3)
            .map(|_| {
                let started = Instant::now();
                let bytes = segments
                    .iter()
                    .map(|s| c.compress(s).expect("compress").len())
                    .sum::<usize>();
                (started.elapsed().as_secs_f64(), bytes)
            })
            .collect();
        let best = passes.iter().map(|p| p.0).fold(f64::MAX, f64::min);
        let bytes = passes[0].1;
        let per_event = bytes as f64 / events as f64;
        if label == "zstd 3" {
            reference = per_event;
        }
        line.push(format!(
            "{label} {per_event:.0} B/event ({:+.1}%), {:.0}k events/s",
            (per_event / reference - 1.0) * 100.0,
            events as f64 / best / 1e3
        ));
    }
    eprintln!(
        "raw variants {name}, commits of {commit_events} ({} segments, {:.0} plain B/event): {}",
        segments.len(),
        plain as f64 / events as f64,
        line.join("; ")
    );
}

fn bench_sizes(_c: &mut Criterion) {
    // Not a timed bench: it runs on every invocation unless turned off, to time others.
    if env_num::<u8>("SLUICE_BENCH_SIZES") == Some(0) {
        return;
    }
    let synth_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/synth-1000.bin");
    let synth_long = {
        // `cargo test` runs this bench once as a smoke test (no `--bench` argument):
        // a short run there keeps the suite lean.
        synth_templates(
            2,
            env_num("SLUICE_BENCH_SYNTH_FRAMES").unwrap_or(if measuring() { 30_000 } else { 500 }),
        )
    };
    let sets = [
        ("corpus", corpus()),
        ("synth-1000", ingest_file(&synth_file).unwrap_or_default()),
        ("synth-long (1M DIDs)", synth_long),
    ];
    for (name, frames) in &sets {
        if frames.is_empty() {
            eprintln!("bytes/event {name}: absent");
            continue;
        }
        // 50: a 100 ms commit at 500 events/s; 200: at 2,000/s; 20,000: the largest group.
        for commit in [50, 200, 1_000, 20_000] {
            bytes_per_event(name, frames, commit, commit == 20_000);
        }
    }
    // A raw-frame dictionary trained on the long synthetic run (seed 2), tried on the
    // corpus and on synth-1000 (seed 1): never on the frames it was trained on.
    let samples: Vec<&[u8]> = sets[2]
        .1
        .iter()
        .filter_map(|f| f.first().map(|e| e.raw_frame.as_ref()))
        .collect();
    match zstd::dict::from_samples(&samples, 64 * 1024) {
        Ok(dict) => {
            for (name, frames) in &sets[..2] {
                if !frames.is_empty() {
                    for commit in [50, 200, 20_000] {
                        raw_variants(name, frames, commit, &dict);
                    }
                }
            }
        }
        Err(e) => eprintln!("raw variants: no dictionary ({e})"),
    }
}

/// The frames the scan benches store: the corpus (default; its 150 frames cycle, so a
/// segment of more than ~150 events holds some frames twice, which zstd finds), or with
/// `SLUICE_BENCH_SCAN_DATA=synth` synthetic frames that never repeat within a store (30,000
/// frames over 1M DIDs, more than a scan's store cycles through).
fn scan_templates() -> Vec<Vec<Event>> {
    if std::env::var("SLUICE_BENCH_SCAN_DATA").as_deref() != Ok("synth") {
        return corpus();
    }
    synth_templates(3, if measuring() { 30_000 } else { 500 })
}

/// `count` synthetic frames over 1M DIDs from `seed`, ingested into events.
fn synth_templates(seed: u64, count: usize) -> Vec<Vec<Event>> {
    use sluice::upstream::synth::{Synth, SynthOptions};
    let opts = SynthOptions {
        seed,
        count,
        dids: 1_000_000,
        ..SynthOptions::default()
    };
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    Synth::new(&opts)
        .filter_map(|f| match ingestor.ingest(Bytes::from(f), i64::MAX / 2) {
            IngestOutcome::Events(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// Appends `frames` to `store`, `frames_per_commit` frames per commit, until it holds
/// `events` events (or the frames run out); returns the events appended.
fn append_in_commits(
    store: &FjallStore,
    frames: Vec<Vec<Event>>,
    events: usize,
    frames_per_commit: usize,
) -> usize {
    let mut frames = frames.into_iter();
    let mut written = 0;
    while written < events {
        let batch: Vec<sluice::log::SharedEvent> = frames
            .by_ref()
            .take(frames_per_commit)
            .flatten()
            .map(sluice::log::SharedEvent::new)
            .collect();
        let Some(last) = batch.last() else { break };
        let resume = StampState {
            next_seq: last.seq + 1,
            last_time_us: last.time_us,
            upstream_cursor: Some(last.upstream_seq),
        };
        written += batch.len();
        store.append(&batch, resume).expect("append");
    }
    written
}

fn bench_scan(c: &mut Criterion) {
    // One tenth under `cargo test` (a smoke run of every bench, in a debug build).
    let scale = if measuring() { 1 } else { 10 };
    let (events_in_store, scan) = (120_000 / scale, 50_000 / scale);
    let templates = scan_templates();
    let dir = bench_dir();
    let (store, _) = FjallStore::open(store_config(dir.path())).expect("store");
    let store = Arc::new(store);
    let mut state = StampState::fresh();
    // One restamp of every frame the store gets (templates cycle once per call), then
    // appended 2,000 frames at a time.
    let per_frame = templates.iter().map(Vec::len).sum::<usize>() as f64 / templates.len() as f64;
    let all = restamp(
        &templates,
        &mut state,
        (events_in_store as f64 / per_frame).ceil() as usize + 2_000,
    );
    let written = append_in_commits(&store, all, events_in_store, 2_000 / scale);
    let from = (written / 3) as u64;
    let mut g = c.benchmark_group("log_scan");
    g.throughput(Throughput::Elements(scan as u64));
    g.sample_size(20);
    for (name, payloads) in [
        ("durable_v1", Payloads::V1),
        ("durable_v2", Payloads::V2),
        ("durable_raw", Payloads::RAW),
        ("durable_all", Payloads::ALL),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut next = from;
                let end = from + scan as u64;
                while next < end {
                    let got = store
                        .read(next, ReadLimits::events(4096), payloads)
                        .expect("read");
                    next += got.len() as u64;
                    black_box(got);
                }
            })
        });
    }

    // The same scans the way a catch-up session makes them: through the log's reader
    // (its floor checks, the hot tail's range, then the store), in reads of catch-up's
    // default size (512 events, at most 1 MiB of payload), with the store's read-ahead
    // as configured (`SLUICE_BENCH_READ_AHEAD_SEGMENTS`; default 1).
    {
        let mut config = LogConfig::new(dir.path());
        let sc = store_config(dir.path());
        config.decoded_cache_bytes = sc.decoded_cache_bytes;
        config.read_ahead_segments = sc.read_ahead_segments;
        let (log, _) =
            Log::open_with_store(store.clone() as Arc<dyn EventStore>, config).expect("log");
        let reader = log.reader();
        let limits = ReadLimits {
            max_events: 512,
            max_bytes: 1 << 20,
        };
        g.throughput(Throughput::Elements(scan as u64));
        for (name, payloads) in [("catchup_v1", Payloads::V1), ("catchup_raw", Payloads::RAW)] {
            g.bench_function(name, |b| {
                b.iter(|| {
                    let mut next = from;
                    let end = from + scan as u64;
                    while next < end {
                        let got = reader.read_from_with(next, limits, payloads).expect("read");
                        next += got.len() as u64;
                        black_box(got);
                    }
                })
            });
        }
        let _ = log.close();
    }

    // 100 concurrent v1 readers replaying the same stretch of the store, as after a
    // reconnect storm with cursors from the same time: what one process delivers from
    // disk when the decoded-segment cache shares each segment's decode (store reads only;
    // no websockets, no live subscribers).
    let readers = 100;
    let per_reader = scan / 5;
    g.throughput(Throughput::Elements((readers * per_reader) as u64));
    g.sample_size(10);
    g.bench_function("cold_v1_100_readers", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                for _ in 0..readers {
                    s.spawn(|| {
                        let mut next = from;
                        let end = from + per_reader as u64;
                        while next < end {
                            let got = store
                                .read(next, ReadLimits::events(1024), Payloads::V1)
                                .expect("read");
                            next += got.len() as u64;
                            black_box(got);
                        }
                    });
                }
            })
        })
    });
    g.sample_size(20);

    let tail = HotTail::new(1, usize::MAX);
    let mut state = StampState::fresh();
    let frames = restamp(&templates, &mut state, 100_000 / scale);
    for f in frames {
        let shared: Vec<sluice::log::SharedEvent> =
            f.into_iter().map(sluice::log::SharedEvent::new).collect();
        tail.push(&shared);
    }
    let n = tail.len();
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("hot_tail", |b| {
        b.iter(|| {
            let mut next = 1;
            loop {
                match tail.read_from(next, 1024, usize::MAX) {
                    TailRead::Events(got) if !got.is_empty() => {
                        next += got.len() as u64;
                        black_box(got);
                    }
                    _ => break,
                }
            }
        })
    });
    g.finish();
}

fn bench_append(c: &mut Criterion) {
    const PER_ITER: usize = 20_000;
    let templates = corpus();
    let dir = bench_dir();
    let mut config = log_config(dir.path());
    config.tail_max_bytes = 64 << 20;
    // The writer's settings, to find what bounds a sustained append (unset: defaults).
    if let Some(m) = env_num::<usize>("SLUICE_BENCH_QUEUE_MIB") {
        config.queue_max_bytes = m << 20;
    }
    if let Some(n) = env_num("SLUICE_BENCH_COMMIT_EVENTS") {
        config.commit_max_events = n;
    }
    if let Some(ms) = env_num("SLUICE_BENCH_COMMIT_MS") {
        config.commit_interval = Duration::from_millis(ms);
    }
    let (log, mut state) = Log::open(config).expect("log");
    let mut g = c.benchmark_group("log_append");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    // Events per iteration vary with frame sizes; measured per frame then reported.
    let frames_per_iter =
        PER_ITER * templates.len() / templates.iter().map(Vec::len).sum::<usize>();
    let events_per_iter: usize = (0..frames_per_iter)
        .map(|k| templates[k % templates.len()].len())
        .sum();
    g.throughput(Throughput::Elements(events_per_iter as u64));
    g.bench_function("group_commit_sustained", |b| {
        b.iter_custom(|iters| {
            // Made before the clock starts, then appended back to back: a sample is one
            // sustained stream of `iters` x ~20,000 events, timed until all of it is
            // durable, so the writer's encode/commit pipeline runs as it does under a
            // steady upstream instead of draining every 20,000 events.
            let frames = restamp(&templates, &mut state, frames_per_iter * iters as usize);
            let started = Instant::now();
            for f in frames {
                log.append(f).expect("append");
            }
            assert!(log.flush(Duration::from_secs(300)));
            started.elapsed()
        })
    });
    g.finish();
    let stats = log.writer_stats();
    let events = stats
        .events_committed
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "append: {} commits, {events} events, store {} MiB, raw frames {:.0} B/event, \
         segments per raw level {:?}",
        stats.commits.load(std::sync::atomic::Ordering::Relaxed),
        log.reader().store().size_bytes() >> 20,
        log.reader().store().raw_size_bytes() as f64 / events.max(1) as f64,
        stats.raw_level_segments()
    );
    let _ = log.close();
}

/// The `utime + stime` fields (clock ticks of 1/100 s) of a `/proc/.../stat` line, in seconds.
fn stat_cpu_secs(stat: &str) -> Option<f64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds of each live thread of this process by thread id, with its name (the main
/// thread named "appender": it is the one appending in the sustained bench).
fn threads_cpu_secs() -> std::collections::HashMap<String, (String, f64)> {
    let me = std::process::id().to_string();
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = match (stat.find('('), stat.rfind(')')) {
            _ if tid == me => "appender".to_string(),
            (Some(a), Some(b)) if a < b => stat[a + 1..b].to_string(),
            _ => "?".to_string(),
        };
        if let Some(secs) = stat_cpu_secs(&stat) {
            out.insert(tid, (name, secs));
        }
    }
    out
}

/// A sustained append as the ingest thread makes it under a backlog: the corpus's events,
/// made before the clock starts, appended frame by frame through `Log::append` with the
/// daemon's default log settings (`LogConfig::new`; the store's as `store_config` says),
/// timed until every one is durable. `SLUICE_BENCH_SUSTAINED_EVENTS` events (unset: not
/// run when measuring; make it several hundred thousand past the writer queue's ~5,000
/// corpus events, e.g. 1,000,000). Prints the rate, the commits, and the CPU of each
/// thread over the append alone, in cores and in µs per event; threads that ended meanwhile
/// (a commit's encoder helpers) count as "ended threads".
fn bench_sustained(_c: &mut Criterion) {
    let target: usize =
        env_num("SLUICE_BENCH_SUSTAINED_EVENTS").unwrap_or(if measuring() { 0 } else { 2_000 });
    if target == 0 {
        return;
    }
    let templates = corpus();
    let dir = bench_dir();
    let mut config = log_config(dir.path());
    if let Some(m) = env_num::<usize>("SLUICE_BENCH_QUEUE_MIB") {
        config.queue_max_bytes = m << 20;
    }
    if let Some(n) = env_num("SLUICE_BENCH_COMMIT_EVENTS") {
        config.commit_max_events = n;
    }
    let (log, mut state) = Log::open(config).expect("log");
    let per_frame = templates.iter().map(Vec::len).sum::<usize>() as f64 / templates.len() as f64;
    let frames = restamp(
        &templates,
        &mut state,
        (target as f64 / per_frame).ceil() as usize,
    );
    let events: usize = frames.iter().map(Vec::len).sum();
    let (threads_before, process_before) = (threads_cpu_secs(), process_cpu_secs());
    let started = Instant::now();
    for f in frames {
        log.append(f).expect("append");
    }
    assert!(log.flush(Duration::from_secs(600)));
    let wall = started.elapsed().as_secs_f64();
    let (threads_after, process_after) = (threads_cpu_secs(), process_cpu_secs());
    let mut by_name: Vec<(String, f64)> = Vec::new();
    for (tid, (name, after)) in &threads_after {
        let before = threads_before.get(tid).map_or(0.0, |t| t.1);
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 += after - before,
            None => by_name.push((name.clone(), after - before)),
        }
    }
    let process = process_after - process_before;
    let live: f64 = by_name.iter().map(|t| t.1).sum();
    by_name.push(("ended threads".into(), (process - live).max(0.0)));
    by_name.retain(|t| t.1 > 0.0);
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    let stats = log.writer_stats();
    let n = events as f64;
    let threads: Vec<String> = by_name
        .iter()
        .map(|(name, secs)| {
            format!(
                "{name} {:.2} cores ({:.1} us/event)",
                secs / wall,
                secs / n * 1e6
            )
        })
        .collect();
    eprintln!(
        "sustained append: {events} events in {wall:.1} s = {:.0} events/s; {} commits, \
         segments per raw level {:?}; CPU {:.2} cores ({:.1} us/event): {}",
        n / wall,
        stats.commits.load(std::sync::atomic::Ordering::Relaxed),
        stats.raw_level_segments(),
        process / wall,
        process / n * 1e6,
        threads.join(", ")
    );
    let _ = log.close();
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat` (clock ticks
/// of 1/100 s).
fn process_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_cpu_secs(&stat))
        .unwrap_or(f64::NAN)
}

/// Scans of a store written as the log writer writes at the live rate: one commit per
/// ~50 events (a 100 ms commit at 500 events/s; a segment is cut at every commit), first
/// as committed (`live_*`, what a store written before merging holds), then after merging
/// the small segments (`merged_*`, what the retention thread makes of them), beside the
/// bulk-written store's `durable_*`. Same reads as `durable_*`: 50,000 events from a
/// third in, 4,096 per read, through `EventStore::read` (with the read-ahead).
fn bench_scan_live(c: &mut Criterion) {
    if env_num::<u8>("SLUICE_BENCH_LIVE") == Some(0) {
        return;
    }
    let scale = if measuring() { 1 } else { 10 };
    let (events_in_store, scan) = (120_000 / scale, 50_000 / scale);
    let commit_frames: usize = env_num("SLUICE_BENCH_LIVE_COMMIT_FRAMES").unwrap_or(50);
    let templates = scan_templates();
    let dir = bench_dir();
    let (store, _) = FjallStore::open(store_config(dir.path())).expect("store");
    let mut state = StampState::fresh();
    let per_frame = templates.iter().map(Vec::len).sum::<usize>() as f64 / templates.len() as f64;
    let all = restamp(
        &templates,
        &mut state,
        (events_in_store as f64 / per_frame).ceil() as usize + commit_frames,
    );
    let started = Instant::now();
    let written = append_in_commits(&store, all, events_in_store, commit_frames);
    let committed = store.segments(usize::MAX).len();
    let from = (written / 3) as u64;
    let scan_all = |store: &FjallStore, payloads: Payloads| {
        let mut next = from;
        let end = from + scan as u64;
        while next < end {
            let got = store
                .read(next, ReadLimits::events(4096), payloads)
                .expect("read");
            next += got.len() as u64;
            black_box(got);
        }
    };
    let mut g = c.benchmark_group("log_scan");
    g.throughput(Throughput::Elements(scan as u64));
    g.sample_size(20);
    for (name, payloads) in [("live_v1", Payloads::V1), ("live_raw", Payloads::RAW)] {
        g.bench_function(name, |b| b.iter(|| scan_all(&store, payloads)));
    }
    let (merge_started, stored_before) = (Instant::now(), store.size_bytes());
    let raw_before = store.raw_size_bytes();
    let mut merged = 0;
    loop {
        let step = store.merge_small_segments().expect("merge");
        if step.merged == 0 {
            break;
        }
        merged += step.merged;
    }
    let merge_secs = merge_started.elapsed().as_secs_f64();
    let per_event = |b: u64| b as f64 / written as f64;
    eprintln!(
        "live-written store: {written} events in {committed} commits ({:.1} s); merged {merged} \
         segments into {} in {merge_secs:.2} s ({:.0}k events/s, merge keeps raw from {} KiB); \
         stored {} -> {} MiB; raw frames {:.0} -> {:.0} B/event, JSON {:.0} -> {:.0} B/event",
        (merge_started - started).as_secs_f64(),
        store.segments(usize::MAX).len(),
        written as f64 / merge_secs / 1e3,
        store_config(dir.path()).merge_keep_raw_bytes >> 10,
        stored_before >> 20,
        store.size_bytes() >> 20,
        per_event(raw_before),
        per_event(store.raw_size_bytes()),
        per_event(stored_before - raw_before),
        per_event(store.size_bytes() - store.raw_size_bytes()),
    );
    for (name, payloads) in [("merged_v1", Payloads::V1), ("merged_raw", Payloads::RAW)] {
        g.bench_function(name, |b| b.iter(|| scan_all(&store, payloads)));
    }
    g.finish();
}

/// Appends the corpus through the log at a live rate (`SLUICE_BENCH_PACED_RATE` events/s,
/// default 2,000) for `SLUICE_BENCH_PACED_SECS` seconds (unset: not run when measuring),
/// with the default writer settings and the store's levels (as the env overrides say), and
/// prints what the live rate stores and costs: raw bytes per event against zstd level 3
/// and the fast level of the same segments, the segments per raw level, and the CPU the
/// process used (the writer, its encoders and committer; the events are made before).
fn bench_paced(_c: &mut Criterion) {
    let secs: f64 =
        env_num("SLUICE_BENCH_PACED_SECS").unwrap_or(if measuring() { 0.0 } else { 0.3 });
    if secs <= 0.0 {
        return;
    }
    let rate: f64 = env_num("SLUICE_BENCH_PACED_RATE").unwrap_or(2_000.0);
    let templates = corpus();
    let dir = bench_dir();
    let config = log_config(dir.path());
    let raw_fast_level = config.compression.raw_fast_level;
    let (log, mut state) = Log::open(config).expect("log");
    let per_frame = templates.iter().map(Vec::len).sum::<usize>() as f64 / templates.len() as f64;
    let frames = restamp(
        &templates,
        &mut state,
        (rate * secs / per_frame).ceil() as usize,
    );
    let (cpu_before, started) = (process_cpu_secs(), Instant::now());
    let mut sent = 0usize;
    for f in frames {
        let due = started + Duration::from_secs_f64(sent as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sent += f.len();
        log.append(f).expect("append");
    }
    assert!(log.flush(Duration::from_secs(60)));
    let (wall, cpu) = (
        started.elapsed().as_secs_f64(),
        process_cpu_secs() - cpu_before,
    );
    let reader = log.reader();
    let store_ref = reader.store();
    let (mut zstd3, mut fast) = (0usize, 0usize);
    let segments = store_ref.segments(usize::MAX);
    for seg in &segments {
        let n = (seg.last_seq - seg.first_seq + 1) as usize;
        let events = store_ref
            .read(seg.first_seq, ReadLimits::events(n), Payloads::RAW)
            .expect("read");
        let plain = frames_of(&events);
        zstd3 += zstd::bulk::compress(&plain, 3).expect("zstd").len();
        fast += zstd::bulk::compress(&plain, raw_fast_level)
            .expect("zstd")
            .len();
    }
    let n = sent as f64;
    eprintln!(
        "paced {rate:.0} events/s for {wall:.1} s: {sent} events in {} commits, {} segments, \
         per raw level {:?}; raw frames {:.0} B/event (zstd level 3 of the same segments: \
         {:.0}; level {}: {:.0}); CPU {:.1}% of one core",
        log.writer_stats()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        segments.len(),
        log.writer_stats().raw_level_segments(),
        store_ref.raw_size_bytes() as f64 / n,
        zstd3 as f64 / n,
        raw_fast_level,
        fast as f64 / n,
        cpu / wall * 100.0
    );
    let _ = log.close();
}

/// One thread compressing one segment at a time: the CPU cost of storing an event, which
/// bounds what the append pipeline can sustain on these cores.
fn bench_encode(c: &mut Criterion) {
    let templates = corpus();
    let mut state = StampState::fresh();
    let events: Vec<sluice::log::SharedEvent> = restamp(&templates, &mut state, 2_000)
        .into_iter()
        .flatten()
        .map(sluice::log::SharedEvent::new)
        .collect();
    let store = store_config(std::path::Path::new("."));
    let segments = sluice::log::codec::split_segments(&events, store.segment_target_bytes);
    let mut encoder = sluice::log::codec::Encoder::new(store.compression).expect("encoder");
    let mut g = c.benchmark_group("log_encode");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("segments_one_thread", |b| {
        b.iter(|| {
            for s in &segments {
                black_box(encoder.encode(s).expect("encode"));
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_sizes,
    bench_paced,
    bench_sustained,
    bench_scan,
    bench_scan_live,
    bench_encode,
    bench_append
);
criterion_main!(benches);
