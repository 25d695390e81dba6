//! Decoder throughput on the 150 real frames of the jetstream corpus.
//!
//! `decode`: the whole corpus per iteration (header, body, CAR walk, records to JSON), with
//! the production path (`ciborium-ll`) next to the same logic driven by the hand-rolled
//! reader (the comparison recorded in docs/DECISIONS.md). Later stages (wire encodings) belong in
//! this group too. `decode_frame_only`: `decode_frame` alone, so its cost stays visible
//! whatever is added to `decode`.
//!
//! Run: `cargo bench --bench decode`. Needs the shared upstream fixtures.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::decode::{
    decode_frame, decode_frame_ciborium_ll, decode_frame_hand_rolled, DecodeLimits,
};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

/// The 150 corpus frames, raw.
fn corpus_frames() -> Vec<Vec<u8>> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    read_all(&path, 5 << 20)
        .unwrap_or_else(|e| panic!("corpus missing ({e}); set SLUICE_UPSTREAM_FIXTURES"))
}

fn bench_decode(c: &mut Criterion) {
    let frames = corpus_frames();
    let limits = DecodeLimits::default();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("corpus_hand_rolled", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(decode_frame_hand_rolled(black_box(f), &limits).ok());
            }
        })
    });
    g.bench_function("corpus_ciborium_ll", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(decode_frame_ciborium_ll(black_box(f), &limits).ok());
            }
        })
    });
    g.finish();
}

fn bench_decode_frame_only(c: &mut Criterion) {
    let frames = corpus_frames();
    let limits = DecodeLimits::default();
    let mut g = c.benchmark_group("decode_frame_only");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("corpus", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(decode_frame(black_box(f), &limits).ok());
            }
        })
    });
    let largest = frames
        .iter()
        .max_by_key(|f| f.len())
        .cloned()
        .unwrap_or_default();
    g.throughput(Throughput::Elements(1));
    g.bench_function("largest_frame", |b| {
        b.iter(|| black_box(decode_frame(black_box(&largest), &limits).ok()))
    });
    g.finish();
}

/// The whole ingest step per frame: decode, stamp, and encode the v1 and v2 JSON once.
fn bench_ingest(c: &mut Criterion) {
    use sluice::event::StampState;
    use sluice::ingest::{IngestOutcome, Ingestor};
    let frames: Vec<bytes::Bytes> = corpus_frames()
        .into_iter()
        .map(bytes::Bytes::from)
        .collect();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("corpus_decode_stamp_v1_v2", |b| {
        b.iter(|| {
            let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
            for f in &frames {
                match ingestor.ingest(f.clone(), i64::MAX / 2) {
                    IngestOutcome::Events(events) => {
                        black_box(events);
                    }
                    other => panic!("corpus frame did not ingest: {other:?}"),
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decode, bench_decode_frame_only, bench_ingest);
criterion_main!(benches);
