//! CPU per compressed event and bytes saved, per compression scheme, over the events of the
//! real corpus: Jetstream's v1 dictionary on the v1 JSON, Jetstream's v2 dictionary on the
//! v2 frames, sluice's trained dictionary on the v1 JSON, and, for the permessage-deflate
//! decision, RFC 7692 deflate with context takeover (one compressor per subscriber, so its
//! cost is paid once per subscriber where zstd's is paid once per event).
//!
//! Each round runs every scheme once, in turn, so the machine's noise falls on all of
//! them; the medians over the rounds are reported. CPU time is read from /proc/self/stat
//! (10 ms ticks: at the default 2,000 passes a run takes over a second, so a tick is under
//! 1% of it).
//!
//! Run: `cargo run --release --example compress_cpu [ROUNDS] [PASSES]` (default 5 rounds of
//! 2,000 passes over the corpus's events). Needs the shared upstream fixtures.

use std::io::Write;

use bytes::Bytes;
use sluice::decode::DecodeLimits;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};
use sluice::wire::zstd::Zstd;

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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

/// One subscriber's permessage-deflate stream: a raw deflate context kept across messages
/// (context takeover), each message sync-flushed and its 4-byte tail dropped (RFC 7692 §7.2.1).
struct Deflate(flate2::Compress);

impl Deflate {
    fn new(level: u32) -> Self {
        Deflate(flate2::Compress::new(
            flate2::Compression::new(level),
            false,
        ))
    }

    /// The compressed size of one message (deflate never grows this input past the room
    /// given: stored blocks cost 5 bytes per 64 KiB).
    fn message(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        out.clear();
        out.reserve(input.len() + input.len() / 8 + 64);
        let before = self.0.total_in();
        let done = self
            .0
            .compress_vec(input, out, flate2::FlushCompress::Sync)
            .is_ok();
        assert!(
            done && self.0.total_in() - before == input.len() as u64,
            "deflate did not take the whole message"
        );
        out.len().saturating_sub(4)
    }
}

struct Scheme {
    name: &'static str,
    /// CPU µs per event of each round.
    cpu_us: Vec<f64>,
    plain: usize,
    compressed: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let passes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    let frames: Vec<Bytes> = match read_all(&path, 5 << 20) {
        Ok(frames) => frames.into_iter().map(Bytes::from).collect(),
        Err(e) => {
            eprintln!("cannot read {}: {e}", path.display());
            std::process::exit(2);
        }
    };
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let (mut v1, mut v2) = (Vec::new(), Vec::new());
    for f in frames {
        if let IngestOutcome::Events(events) = ingestor.ingest(f, i64::MAX / 2) {
            for e in events {
                v1.extend(e.v1_json.clone());
                v2.extend(e.v2_json.clone());
            }
        }
    }
    let trained = match sluice::ingest::trained_v1_dictionary() {
        Ok(d) => Zstd::new(d),
        Err(e) => {
            eprintln!("cannot train: {e}");
            std::process::exit(2);
        }
    };
    let zstd_schemes: [(&str, Zstd, &Vec<Bytes>); 3] = [
        ("zstd v1, Jetstream's dictionary", Zstd::jetstream_v1(), &v1),
        ("zstd v2, Jetstream's dictionary", Zstd::jetstream_v2(), &v2),
        ("zstd v1, sluice's trained dictionary", trained, &v1),
    ];
    let mut results: Vec<Scheme> = zstd_schemes
        .iter()
        .map(|(name, _, _)| Scheme {
            name,
            cpu_us: Vec::new(),
            plain: 0,
            compressed: 0,
        })
        .collect();
    results.push(Scheme {
        name: "permessage-deflate v1, level 1, context takeover (per subscriber)",
        cpu_us: Vec::new(),
        plain: 0,
        compressed: 0,
    });
    let mut scratch = Vec::new();
    for round in 0..rounds {
        for (i, (_, zstd, messages)) in zstd_schemes.iter().enumerate() {
            let (mut plain, mut compressed) = (0, 0);
            let cpu0 = cpu_seconds();
            for _ in 0..passes {
                for m in messages.iter() {
                    // Uncached: the cost the first subscriber of an event pays.
                    match zstd.compress(m) {
                        Ok(out) => compressed += out.len(),
                        Err(e) => panic!("{e}"),
                    }
                    plain += m.len();
                }
            }
            let n = (passes * messages.len()) as f64;
            results[i].cpu_us.push((cpu_seconds() - cpu0) / n * 1e6);
            results[i].plain = plain / passes;
            results[i].compressed = compressed / passes;
        }
        // One subscriber's deflate stream over the same v1 events.
        let (mut plain, mut compressed) = (0, 0);
        let cpu0 = cpu_seconds();
        for _ in 0..passes {
            let mut deflate = Deflate::new(1);
            for m in &v1 {
                compressed += deflate.message(m, &mut scratch);
                plain += m.len();
            }
        }
        let n = (passes * v1.len()) as f64;
        let last = results.len() - 1;
        results[last].cpu_us.push((cpu_seconds() - cpu0) / n * 1e6);
        results[last].plain = plain / passes;
        results[last].compressed = compressed / passes;
        eprint!("round {}/{rounds}\r", round + 1);
        let _ = std::io::stderr().flush();
    }
    eprintln!();
    println!(
        "{} v1 events, {} v2 events; {rounds} rounds x {passes} passes; medians",
        v1.len(),
        v2.len()
    );
    println!("| scheme | CPU µs per event (median) | runs (µs) | uncompressed bytes | compressed bytes | ratio | saved |");
    println!("|---|---|---|---|---|---|---|");
    for s in &mut results {
        let runs: Vec<String> = s.cpu_us.iter().map(|v| format!("{v:.2}")).collect();
        let med = median(&mut s.cpu_us);
        println!(
            "| {} | {:.2} | {} | {} | {} | {:.2}x | {:.0}% |",
            s.name,
            med,
            runs.join(" "),
            s.plain,
            s.compressed,
            s.plain as f64 / s.compressed as f64,
            100.0 * (1.0 - s.compressed as f64 / s.plain as f64)
        );
    }
}
