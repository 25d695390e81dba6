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

/// `n` frames' worth of events continuing `state`, cycling over `templates`.
fn restamp(templates: &[Vec<Event>], state: &mut StampState, frames: usize) -> Vec<Vec<Event>> {
    let mut out = Vec::with_capacity(frames);
    for k in 0..frames {
        let upstream = state.upstream_cursor.map_or(1_000, |c| c + 1);
        let mut frame = Vec::new();
        for (j, t) in templates[k % templates.len()].iter().enumerate() {
            let mut e = t.clone();
            e.seq = state.next_seq;
            e.time_us = state.last_time_us.max(1_700_000_000_000_000) + 100;
            e.upstream_seq = upstream;
            e.op_index = j as u16;
            state.next_seq += 1;
            state.last_time_us = e.time_us;
            frame.push(e);
        }
        state.upstream_cursor = Some(upstream);
        out.push(frame);
    }
    out
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
/// `SLUICE_BENCH_RAW_LEVEL`, `SLUICE_BENCH_SEGMENT_BYTES` and `SLUICE_BENCH_ENCODE_THREADS`
/// override (to compare settings on the same events; unset for the recorded numbers).
fn store_config(dir: &std::path::Path) -> FjallConfig {
    let mut c = FjallConfig::new(dir.join("events"));
    if let Some(l) = env_num("SLUICE_BENCH_JSON_LEVEL") {
        c.compression.json_level = l;
    }
    if let Some(l) = env_num("SLUICE_BENCH_RAW_LEVEL") {
        c.compression.raw_level = l;
    }
    if let Some(b) = env_num("SLUICE_BENCH_SEGMENT_BYTES") {
        c.segment_target_bytes = b;
    }
    if let Some(t) = env_num("SLUICE_BENCH_ENCODE_THREADS") {
        c.encode_threads = t;
    }
    c
}

/// Stored bytes per event for a set of frames written once, as one stream.
fn bytes_per_event(name: &str, frames: &[Vec<Event>]) {
    let dir = bench_dir();
    let Ok((store, _)) = FjallStore::open(store_config(dir.path())) else {
        return;
    };
    let mut state = StampState::fresh();
    // Keep the content, renumber so the frames continue one seq space.
    let events: Vec<Arc<Event>> = frames
        .iter()
        .flat_map(|f| {
            let upstream = state.upstream_cursor.map_or(1, |c| c + 1);
            state.upstream_cursor = Some(upstream);
            f.iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.seq = state.next_seq;
                    e.upstream_seq = upstream;
                    state.next_seq += 1;
                    Arc::new(e)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let raw: usize = frames.iter().map(|f| f[0].raw_frame.len()).sum();
    let json: usize = events
        .iter()
        .map(|e| {
            e.v1_json.as_ref().map_or(0, Bytes::len) + e.v2_json.as_ref().map_or(0, Bytes::len)
        })
        .sum();
    if store.append(&events, state).is_err() {
        return;
    }
    let stored = store.size_bytes();
    let n = events.len() as f64;
    eprintln!(
        "bytes/event {name}: {} frames, {} events; input raw {:.0} + json {:.0} B/event; \
         stored {:.0} B/event ({:.1}% of input)",
        frames.len(),
        events.len(),
        raw as f64 / n,
        json as f64 / n,
        stored as f64 / n,
        100.0 * stored as f64 / (raw + json) as f64
    );
}

fn bench_sizes(_c: &mut Criterion) {
    bytes_per_event("corpus", &corpus());
    let synth = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/synth-1000.bin");
    match ingest_file(&synth) {
        Some(frames) if !frames.is_empty() => bytes_per_event("synth-1000", &frames),
        _ => eprintln!("bytes/event synth-1000: fixture absent"),
    }
}

fn bench_scan(c: &mut Criterion) {
    const EVENTS_IN_STORE: usize = 120_000;
    const SCAN: usize = 50_000;
    let templates = corpus();
    let dir = bench_dir();
    let (store, _) = FjallStore::open(store_config(dir.path())).expect("store");
    let mut state = StampState::fresh();
    let mut written = 0;
    while written < EVENTS_IN_STORE {
        let frames = restamp(&templates, &mut state, 2_000);
        let batch: Vec<Arc<Event>> = frames.into_iter().flatten().map(Arc::new).collect();
        written += batch.len();
        store.append(&batch, state).expect("append");
    }
    let from = (written / 3) as u64;
    let mut g = c.benchmark_group("log_scan");
    g.throughput(Throughput::Elements(SCAN as u64));
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
                let end = from + SCAN as u64;
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

    let tail = HotTail::new(1, usize::MAX);
    let mut state = StampState::fresh();
    let frames = restamp(&templates, &mut state, 100_000);
    for f in frames {
        let shared: Vec<Arc<Event>> = f.into_iter().map(Arc::new).collect();
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
    let mut config = LogConfig::new(dir.path());
    config.tail_max_bytes = 64 << 20;
    let store = store_config(dir.path());
    config.compression = store.compression;
    config.segment_target_bytes = store.segment_target_bytes;
    config.encode_threads = store.encode_threads;
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
    eprintln!(
        "append: {} commits, {} events, store {} MiB",
        stats.commits.load(std::sync::atomic::Ordering::Relaxed),
        stats
            .events_committed
            .load(std::sync::atomic::Ordering::Relaxed),
        log.reader().store().size_bytes() >> 20
    );
    let _ = log.close();
}

/// One thread compressing one segment at a time: the CPU cost of storing an event, which
/// bounds what the append pipeline can sustain on these cores.
fn bench_encode(c: &mut Criterion) {
    let templates = corpus();
    let mut state = StampState::fresh();
    let events: Vec<Arc<Event>> = restamp(&templates, &mut state, 2_000)
        .into_iter()
        .flatten()
        .map(Arc::new)
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

criterion_group!(benches, bench_sizes, bench_scan, bench_encode, bench_append);
criterion_main!(benches);
