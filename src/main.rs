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
    /// Record the upstream's frames to a capture file ([u32 LE length][frame] ...).
    Record(RecordArgs),
    /// Serve a capture file as a local subscribeRepos upstream, honouring `cursor`.
    Replay(ReplayArgs),
    /// Generate realistic synthetic frames into a capture file.
    Synth(SynthArgs),
}

#[derive(Debug, clap::Args)]
struct RecordArgs {
    /// Relay to record: a host or a full ws:// or wss:// URL (a `cursor` query is kept).
    #[arg(long, env = "SLUICE_UPSTREAM", default_value = sluice::upstream::client::DEFAULT_UPSTREAM)]
    upstream: String,
    /// Capture file to write (truncated unless --append).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Append to an existing capture instead of truncating it.
    #[arg(long)]
    append: bool,
    /// Stop after this many frames.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long, e.g. 30s, 10m, 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Largest frame recorded, bytes; larger frames are counted, logged and skipped.
    #[arg(long, default_value_t = 5 * 1024 * 1024)]
    max_frame_bytes: usize,
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// Capture file to serve.
    file: std::path::PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2470")]
    listen: std::net::SocketAddr,
    /// `max`, or a factor of real time (1 = as recorded, 10 = ten times faster).
    #[arg(long, default_value = "1")]
    speed: sluice::upstream::replay::Speed,
    /// Replay again and again, rewriting seq and time so both keep increasing.
    #[arg(long = "loop")]
    looped: bool,
}

#[derive(Debug, clap::Args)]
struct SynthArgs {
    /// Capture file to write.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Number of frames.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// RNG seed: the same seed and options always give the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Upstream seq of the first frame.
    #[arg(long, default_value_t = 1_000_000)]
    start_seq: u64,
    /// Size of the DID pool.
    #[arg(long, default_value_t = 2000)]
    dids: usize,
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
            Command::Record(args) => record(args).await,
            Command::Replay(args) => replay(args).await,
            Command::Synth(args) => synth(args),
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
            _ = shutdown_signal() => break,
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

async fn record(args: RecordArgs) -> anyhow::Result<()> {
    use sluice::upstream::record::{self, RecordOptions};
    let url = sluice::upstream::client::subscribe_url(&args.upstream, None)?;
    let mut opts = RecordOptions::new(url.as_str(), &args.out);
    opts.append = args.append;
    opts.count = args.count;
    opts.duration = args.duration;
    opts.max_frame = args.max_frame_bytes;
    // `record` stops cleanly on Ctrl-C and SIGTERM itself, flushing and syncing the file.
    let summary = record::record(opts).await?;
    tracing::info!(?summary, "recording finished");
    println!(
        "recorded {} frames ({} bytes) to {}; {} oversized skipped; stopped: {:?}",
        summary.frames,
        summary.bytes,
        args.out.display(),
        summary.oversized,
        summary.stop
    );
    Ok(())
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource};
    tracing::info!(file = %args.file.display(), listen = %args.listen, speed = ?args.speed, looped = args.looped, "replaying");
    let opts = ReplayOptions {
        frames: ReplaySource::File(args.file),
        listen: Listen::Addr(args.listen),
        speed: args.speed,
        looped: args.looped,
    };
    tokio::select! {
        result = replay::serve(opts) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn synth(args: SynthArgs) -> anyhow::Result<()> {
    use sluice::upstream::synth::{self, SynthOptions};
    let opts = SynthOptions {
        seed: args.seed,
        count: args.count,
        start_seq: args.start_seq,
        dids: args.dids,
        ..SynthOptions::default()
    };
    let written = synth::write_capture_file(&opts, &args.out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    println!("wrote {written} frames to {}", args.out.display());
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops sluice");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
