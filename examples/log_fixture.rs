//! Writes a small event store from `fixtures/synth-1000.bin`: the first 300 frames, ingested
//! with a fixed receipt time and appended in three commits. Run at a commit whose store
//! layout a fixture should preserve, so later code can prove it still opens that layout:
//!
//! `cargo run --example log_fixture -- fixtures/log-format-1`
//!
//! `tests/log/format.rs` re-ingests the same frames the same way and compares every event.

use bytes::Bytes;
use sluice::decode::DecodeLimits;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{EventStore, FjallConfig, FjallStore};
use sluice::upstream::capture::read_all;

/// Receipt time given to every frame (after the synthetic frames' own times).
const RECEIVED_US: i64 = 1_748_800_000_000_000;

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: log_fixture OUT_DIR");
        std::process::exit(2);
    };
    let out = std::path::PathBuf::from(out);
    if out.exists() {
        eprintln!("{} exists; remove it first", out.display());
        std::process::exit(2);
    }
    let synth = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/synth-1000.bin");
    let frames = match read_all(&synth, 8 << 20) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let (store, _) = match FjallStore::open(FjallConfig::new(out.join("events"))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open the store: {e}");
            std::process::exit(1);
        }
    };
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    for chunk in frames.chunks(100).take(3) {
        let mut events = Vec::new();
        for f in chunk {
            if let IngestOutcome::Events(e) = ingestor.ingest(Bytes::from(f.clone()), RECEIVED_US) {
                events.extend(sluice::log::SharedEvent::run(e));
            }
        }
        if let Err(e) = store.append(&events, ingestor.state()) {
            eprintln!("append failed: {e}");
            std::process::exit(1);
        }
    }
    let bounds = store.bounds();
    println!(
        "wrote {} segments, {} bytes, bounds {bounds:?}",
        store.segments(usize::MAX).len(),
        store.size_bytes()
    );
}
