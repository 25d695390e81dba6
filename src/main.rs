//! The `sluice` command line. Parses arguments and calls into the library; nothing else.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The daemon allocates with jemalloc, not glibc's malloc: at 1,000 frames/s x 100
/// subscribers it cut the daemon's CPU per upstream frame by ~10% (the workers, the ingest
/// thread and the log's threads alike; raw wire 5.51 -> 4.93 us per message, v1 within
/// noise) for about the same RSS (docs/DECISIONS.md, "Subscriber writes", session 18).
/// Only this binary: the library and `sluice-bench` keep the system allocator. jemalloc's
/// own settings are read from `_RJEM_MALLOC_CONF` before `main` runs (README, "Settings").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    Serve(sluice::config::ServeArgs),
    /// Validate the configuration and print the effective settings.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Record the upstream's frames to a capture file ([u32 LE length][frame] ...).
    Record(RecordArgs),
    /// Serve a capture file as a local subscribeRepos upstream, honouring `cursor`.
    Replay(ReplayArgs),
    /// Generate realistic synthetic frames into a capture file.
    Synth(SynthArgs),
    /// Print events from a Jetstream v1 endpoint (sluice's /subscribe or any Jetstream).
    Tail(sluice::consumer::TailArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate flags, environment and --config file; print the effective settings.
    Check(sluice::config::ServeArgs),
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

fn main() -> std::process::ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let log_control = match sluice::logging::init(&cli.log_format, &cli.log) {
        Ok(control) => control,
        Err(err) => {
            eprintln!("sluice: {err:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // Serve settings are resolved before the runtime starts: they size it.
    let serve_args = match &cli.command {
        Command::Serve(args) => Some(match sub_matches(&matches, &["serve"]) {
            Some(m) => sluice::config::with_config_file(args.clone(), m),
            None => Err(anyhow::anyhow!("internal: serve arguments missing")),
        }),
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(Ok(args)) = &serve_args {
        builder.worker_threads(args.runtime_worker_threads());
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(_) => match serve_args {
                Some(Ok(args)) => serve(args, log_control).await,
                Some(Err(e)) => Err(e),
                None => Err(anyhow::anyhow!("internal: serve arguments missing")),
            },
            Command::Config {
                action: ConfigAction::Check(args),
            } => match sub_matches(&matches, &["config", "check"]) {
                Some(m) => sluice::config::with_config_file(args, m).and_then(config_check),
                None => Err(anyhow::anyhow!("internal: config arguments missing")),
            },
            Command::Record(args) => record(args).await,
            Command::Replay(args) => replay(args).await,
            Command::Synth(args) => synth(args),
            Command::Tail(args) => sluice::consumer::run(args).await,
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

fn sub_matches<'a>(matches: &'a clap::ArgMatches, path: &[&str]) -> Option<&'a clap::ArgMatches> {
    path.iter()
        .try_fold(matches, |m, name| m.subcommand_matches(name))
}

fn config_check(args: sluice::config::ServeArgs) -> anyhow::Result<()> {
    use sluice::log::depth::{
        projection, MEASURED_BYTES_PER_EVENT, MEASURED_JSON_BYTES_PER_EVENT,
        MEASURED_RAW_BYTES_PER_EVENT,
    };
    let config = args.to_config()?;
    println!("configuration is valid\n");
    println!("{args:#?}");
    // The store's journal and partly reclaimed files come off the JSON share
    // (log::retention).
    let retention = &config.log.retention;
    let overhead = config.log.store_config().overhead_bytes();
    let budget =
        sluice::log::retention::json_budget(retention.max_bytes, overhead, retention.raw.as_ref());
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let classes = match &retention.raw {
        Some(raw) => {
            println!(
                "\nsize caps: {:.1} GiB in all = {:.1} GiB for the JSON wires (less {:.2} GiB of \
                 store overhead) + {:.1} GiB for raw frames",
                gib(retention.max_bytes),
                gib(retention.max_bytes - raw.max_bytes),
                gib(overhead),
                gib(raw.max_bytes),
            );
            vec![
                (
                    "JSON wires (v1, v2)",
                    budget,
                    retention.max_age,
                    MEASURED_JSON_BYTES_PER_EVENT,
                    "--retention-max-gib less --raw-retention-max-gib",
                    "--retention-hours",
                ),
                (
                    "raw frames (subscribeRepos)",
                    raw.max_bytes,
                    raw.max_age.min(retention.max_age),
                    MEASURED_RAW_BYTES_PER_EVENT,
                    "--raw-retention-max-gib",
                    "--raw-retention-hours",
                ),
            ]
        }
        None => vec![(
            "JSON wires and raw frames",
            budget,
            retention.max_age,
            MEASURED_BYTES_PER_EVENT,
            "--retention-max-gib",
            "--retention-hours",
        )],
    };
    for (class, budget, max_age, per_event, size_flag, age_flag) in classes {
        println!(
            "\nreplay depth of the {class}, projected at {per_event} stored bytes per event \
             (measured on real traffic):"
        );
        for rate in [500.0, 1_000.0, 2_000.0] {
            let (secs, by_size) = projection(budget, max_age, per_event as f64, rate);
            println!(
                "  at {rate:>5} events/s: ~{:.1} h ({} is the limit)",
                secs / 3600.0,
                if by_size { size_flag } else { age_flag }
            );
        }
    }
    Ok(())
}

/// Re-reads the serve settings the process was started with (flags, env, config file).
fn reread_serve_args() -> anyhow::Result<sluice::config::ServeArgs> {
    let matches = <Cli as clap::CommandFactory>::command().try_get_matches()?;
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    match (cli.command, sub_matches(&matches, &["serve"])) {
        (Command::Serve(args), Some(m)) => sluice::config::with_config_file(args, m),
        _ => anyhow::bail!("not started as `sluice serve`"),
    }
}

async fn serve(
    args: sluice::config::ServeArgs,
    log_control: sluice::logging::LogControl,
) -> anyhow::Result<()> {
    use sluice::systemd;
    if let Some(filter) = &args.log_filter {
        log_control.set_filter(filter)?;
    }
    let config = args.to_config()?;
    let stats_interval = config.stats_interval;
    // Listen for signals before starting, so a SIGTERM during start-up is a clean stop too.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let daemon = sluice::daemon::Daemon::start(config).await?;
    let reader = daemon.log.reader();
    let upstream = daemon.upstream().clone();
    let hub = daemon.hub.clone();
    // READY once the log is open and both listeners are bound.
    if let Err(e) = systemd::notify_ready() {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let heartbeat = {
        let upstream = upstream.clone();
        systemd::Heartbeat::from_probe("ingest loop", move || {
            upstream.ingest_heartbeat.load(Ordering::Relaxed)
        })
    };
    let watchdog = systemd::Watchdog::from_env(vec![heartbeat])?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut ticker = tokio::time::interval(stats_interval.unwrap_or(Duration::from_secs(3600)));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => {
                let _ = systemd::notify_reloading();
                match reread_serve_args().and_then(|a| Ok((a.to_config()?, a.log_filter))) {
                    Ok((new, filter)) => match daemon.reload(&new) {
                        Ok(()) => {
                            if let Some(filter) = filter {
                                if let Err(e) = log_control.set_filter(&filter) {
                                    tracing::error!(error = %e, "SIGHUP: log filter not changed");
                                }
                            }
                            tracing::info!(
                                admission = ?new.admission,
                                listen = ?new.listen_limits,
                                fd_reserve = new.fd_reserve,
                                client_memory = ?new.client_memory,
                                budgets = ?new.hub.budgets(),
                                "SIGHUP: limits and log filter reloaded; no subscriber dropped"
                            );
                        }
                        Err(e) => tracing::error!(error = %e, "SIGHUP: limits cannot apply, nothing changed"),
                    },
                    Err(e) => tracing::error!(error = %e, "SIGHUP: configuration invalid, nothing changed"),
                }
                let _ = systemd::notify_ready();
            }
            _ = ticker.tick(), if stats_interval.is_some() => {
                let bounds = reader.bounds();
                let lag_s = bounds.map(|b| (sluice::clock::now_us() - b.newest_time_us) as f64 / 1e6);
                let subscribers = sluice::wire::WireKind::ALL.map(|w| hub.stats().subscribers(w));
                tracing::info!(
                    newest_seq = reader.newest_seq(),
                    oldest_seq = bounds.map(|b| b.oldest_seq),
                    lag_s,
                    connected = upstream.connected.load(Ordering::Relaxed),
                    reconnects = upstream.reconnects.load(Ordering::Relaxed),
                    subscribers_v1 = subscribers[0],
                    subscribers_v2 = subscribers[1],
                    subscribers_raw = subscribers[2],
                    "progress"
                );
                let _ = systemd::notify_status(&format!(
                    "seq {} · lag {:.1} s · {} subscribers",
                    reader.newest_seq(),
                    lag_s.unwrap_or(0.0),
                    subscribers.iter().sum::<u64>()
                ));
            }
        }
    }
    let _ = systemd::notify_stopping();
    tracing::info!("shutting down: closing subscribers, flushing the log");
    let stats = daemon.shutdown().await;
    if let Some(watchdog) = watchdog {
        watchdog.stop();
    }
    tracing::info!(stats = ?stats.as_ref().ok(), "stopped");
    stats.map(|_| ())
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

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when it is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot listen for SIGTERM/SIGINT; falling back to Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
