//! What one `options_update` naming 10,000 DIDs costs: building the filter (on the
//! session's worker) and swapping its routing-index entries (under the hub's lock, where
//! it holds up dispatch to every subscriber). The reason `--max-client-updates-per-sec`
//! exists; see docs/DECISIONS.md, "Subscriber updates".
//!
//! `cargo run --release --example filter_swap`

use std::time::{Duration, Instant};

use sluice::fanout::filter::{Filter, FilterLimits};
use sluice::fanout::{Hub, HubConfig, SlowPolicy, Start};
use sluice::log::{Log, LogConfig};
use sluice::wire::WireKind;

const UPDATES: u32 = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (log, _) = Log::open(LogConfig::new(dir.path()))?;
    let hub = Hub::start(log.reader(), HubConfig::default())?;
    let limits = FilterLimits::default();
    let dids = |prefix: &str| -> Vec<String> {
        (0..10_000)
            .map(|i| format!("did:plc:{prefix}{i:018}"))
            .collect()
    };
    let sets = [dids("a"), dids("b")];
    let first = Filter::build(&[], &sets[0], &[], &limits).map_err(anyhow::Error::msg)?;
    let mut sub = hub.subscribe(
        WireKind::JetstreamV1,
        first,
        SlowPolicy::Catchup,
        Start::Live,
    );
    let (mut build, mut swap) = (Duration::ZERO, Duration::ZERO);
    for i in 0..UPDATES {
        let started = Instant::now();
        let next = &sets[(i as usize + 1) % 2];
        let filter = Filter::build(&[], next, &[], &limits).map_err(anyhow::Error::msg)?;
        let built = Instant::now();
        sub.set_filter(filter);
        build += built - started;
        swap += built.elapsed();
    }
    println!(
        "per 10,000-DID update: build {:.2} ms, index swap under the hub lock {:.2} ms",
        build.as_secs_f64() * 1e3 / f64::from(UPDATES),
        swap.as_secs_f64() * 1e3 / f64::from(UPDATES)
    );
    Ok(())
}
