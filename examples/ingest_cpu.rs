//! CPU time per frame of the whole ingest step (decode, stamp, v1 + v2 JSON) over the real
//! corpus. Reports CPU time (from /proc/self/stat), which a shared machine's load does not
//! inflate the way it inflates wall time.
//!
//! Run: `cargo run --release --example ingest_cpu [ITERATIONS]` (default 2000 passes over the
//! 150 frames). Needs the shared upstream fixtures.

use bytes::Bytes;
use sluice::decode::{decode_frame, DecodeLimits};
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    let frames: Vec<Bytes> = match read_all(&path, 5 << 20) {
        Ok(frames) => frames.into_iter().map(Bytes::from).collect(),
        Err(e) => {
            eprintln!("cannot read {}: {e}", path.display());
            std::process::exit(2);
        }
    };
    let limits = DecodeLimits::default();
    for (label, ingest_too) in [
        ("decode_frame only", false),
        ("ingest (decode + stamp + v1 + v2)", true),
    ] {
        let (cpu0, wall0) = (cpu_seconds(), std::time::Instant::now());
        let mut events = 0usize;
        for _ in 0..iterations {
            let mut ingestor = Ingestor::new(StampState::fresh(), limits.clone());
            for f in &frames {
                if ingest_too {
                    if let IngestOutcome::Events(e) = ingestor.ingest(f.clone(), i64::MAX / 2) {
                        events += e.len();
                    }
                } else if decode_frame(f, &limits).is_ok() {
                    events += 1;
                }
            }
        }
        let n = (iterations * frames.len()) as f64;
        let cpu = cpu_seconds() - cpu0;
        let wall = wall0.elapsed().as_secs_f64();
        println!(
            "{label}: {n} frames, {events} outputs; CPU {:.2} µs/frame = {:.0} frames/s per core; wall {:.0} frames/s",
            cpu / n * 1e6,
            n / cpu,
            n / wall
        );
    }
}
