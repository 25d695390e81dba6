//! The `sluice` command line. Parses arguments and calls into the library; nothing else.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use sluice::config::IngestArgs;
use sluice::daemon;
use sluice::event::Event;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Firehose fan-out relay for the AT Protocol"
)]
struct Cli {
    /// Log format: pretty or json.
    #[arg(
        long,
        env = "SLUICE_LOG_FORMAT",
        default_value = "pretty",
        global = true
    )]
    log_format: String,

    /// Log filter (tracing EnvFilter syntax), e.g. info or sluice=debug.
    #[arg(long, env = "SLUICE_LOG", default_value = "info", global = true)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Subscribe to the upstream relay and ingest its events.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    ingest: IngestArgs,

    /// Seconds between progress summaries in the log (0 = never).
    #[arg(long, env = "SLUICE_STATS_INTERVAL_SECS", default_value_t = 10)]
    stats_interval_secs: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(err) = sluice::logging::init(&cli.log_format, &cli.log) {
        eprintln!("sluice: {err:#}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("sluice: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Per-second view of ingest for the progress log.
#[derive(Default)]
struct Progress {
    events: u64,
    last: Option<(u64, i64, i64)>,
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.ingest.to_config()?;
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::default()));
    let sink_progress = progress.clone();
    let sink = move |events: Vec<Event>| {
        if let Ok(mut p) = sink_progress.lock() {
            p.events += events.len() as u64;
            if let Some(e) = events.last() {
                p.last = Some((e.seq, e.time_us, e.upstream_seq));
            }
        }
    };
    let handle = daemon::start_ingest(config, sink)?;
    let shared = handle.shared.clone();
    let interval = Duration::from_secs(args.stats_interval_secs.max(1));
    let report = args.stats_interval_secs > 0;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticker.tick(), if report => {
                let (events, last) = match progress.lock() {
                    Ok(p) => (p.events, p.last),
                    Err(_) => (0, None),
                };
                let lag_s = last.map(|(_, t, _)| (sluice::ingest::now_us() - t) as f64 / 1e6);
                tracing::info!(
                    events,
                    rate = events as f64 / started.elapsed().as_secs_f64(),
                    last_seq = last.map(|l| l.0),
                    upstream_seq = last.map(|l| l.2),
                    lag_s,
                    connected = shared.connected.load(Ordering::Relaxed),
                    reconnects = shared.reconnects.load(Ordering::Relaxed),
                    "ingest progress"
                );
            }
        }
    }
    tracing::info!("shutting down");
    let stats = handle.shutdown().await?;
    tracing::info!(?stats, "ingest stopped");
    Ok(())
}
