//! The `fanout` command: every target phase in turn, runs alternated, then the summary.

use std::io::Write as _;
use std::time::Duration;

use anyhow::bail;

use crate::cli::FanoutArgs;
use crate::phase::run_phase;
use crate::procs::start_watchdog;
use crate::report::{open_results, print_summary};
use crate::target::{BaselineArg, Target};

pub(crate) async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    if args.subscribers == 0 || args.rate == 0 || args.duration == 0 {
        bail!("--subscribers, --rate and --duration must be positive");
    }
    if !(0.0..=1.0).contains(&args.stall_fraction) {
        bail!("--stall-fraction must be within 0..=1");
    }
    let mut targets: Vec<Target> = args.wire.iter().map(|w| Target::Sluice(*w)).collect();
    for b in &args.baselines {
        match b {
            BaselineArg::Websocat => targets.push(Target::Websocat),
            BaselineArg::RedisPubsub => targets.push(Target::RedisPubsub),
            BaselineArg::RedisRelay => targets.push(Target::RedisRelay),
            BaselineArg::None => {}
        }
    }
    targets.dedup();
    let runs = args.runs.max(1);
    // Watchdog: every phase is bounded; this bounds the whole run even if something hangs.
    let per_phase = args.warmup + args.duration + args.stall_secs + args.drain_secs + 120;
    let bound = Duration::from_secs(per_phase * (targets.len() * runs) as u64 + 120);
    start_watchdog(bound);

    let mut out = open_results(args.json.as_deref())?;
    let mut results = Vec::new();
    for run in 1..=runs {
        for t in &targets {
            match run_phase(&args, *t, run).await {
                Ok(r) => {
                    if let Some(f) = out.as_mut() {
                        writeln!(f, "{r}")?;
                    }
                    results.push(r);
                }
                Err(e) => eprintln!("  phase {} failed: {e:#}", t.name()),
            }
        }
    }
    println!(
        "\nsubscribers={} rate={}/s duration={}s warmup={}s mix={:?} runs={} (medians)",
        args.subscribers, args.rate, args.duration, args.warmup, args.mix, runs
    );
    print_summary(&results);
    Ok(())
}
