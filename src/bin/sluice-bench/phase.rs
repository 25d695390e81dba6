//! One phase: start a target, connect subscribers, publish, measure, stall, report.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;

use crate::cli::FanoutArgs;
use crate::control::{PH_AFTER, PH_MEASURE, PH_STALL, PH_WARMUP};
use crate::hist::Hist;
use crate::procs::{
    cpu_each, cpu_line, free_port, metric_with, metrics, rss_total, self_cpu, serve_command,
    wait_tcp, ChildGuard, TempDir, SERVE_NO_LIMITS,
};
use crate::publisher::{start_upstream, BoxSink, Feed, PubCtx, PubSink};
use crate::relay::REDIS_CHANNEL;
use crate::report::{print_phase, q};
use crate::resp::publishing_conn;
use crate::subscribers::{
    connect_from, connect_sub, decoder_dictionary, realistic_filter, run_sub, sub_url, SubShared,
    SubSpec, TIMED_EVERY,
};
use crate::target::{Mix, Target, Wire};

pub(crate) struct Running {
    /// Processes whose CPU is the target's (name, guard).
    pub(crate) procs: Vec<ChildGuard>,
    /// Where subscribers connect.
    pub(crate) port: u16,
    /// Sink the publisher writes to.
    pub(crate) sinks: tokio::sync::mpsc::Receiver<PubSink>,
    /// sluice's admin listener (its `/metrics`), if the target is sluice.
    pub(crate) admin: Option<std::net::SocketAddr>,
    pub(crate) _dir: Option<TempDir>,
}

pub(crate) async fn start_target(
    args: &FanoutArgs,
    target: Target,
    tag: &str,
) -> anyhow::Result<Running> {
    let dir = TempDir::fresh(&args.tmp, tag)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<PubSink>(4);
    match target {
        Target::Sluice(_) => {
            let upstream = start_upstream(tx).await?;
            let port = free_port()?;
            let admin_port = free_port()?;
            let mut cmd = serve_command(&args.serve.sluice, &upstream, port, &dir.0.join("data"));
            cmd.args(SERVE_NO_LIMITS)
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .args(&args.serve.serve_args);
            let mut g = ChildGuard::spawn("sluice serve", &mut cmd, Some(dir.0.join("serve.log")))?;
            wait_tcp(port, &mut g, 30).await?;
            Ok(Running {
                procs: vec![g],
                port,
                sinks: rx,
                admin: Some(([127, 0, 0, 1], admin_port).into()),
                _dir: Some(dir),
            })
        }
        Target::Websocat => {
            let port = free_port()?;
            let mut cmd = Command::new(&args.websocat);
            // -b: binary messages; broadcast:mirror: sends every message from any client
            // to all connected clients; the buffer holds the largest frame, the queue is
            // the broadcast reuser's backlog.
            cmd.args([
                "-b",
                "-E",
                "--buffer-size",
                "8388608",
                "--queue-len",
                "4096",
            ]);
            cmd.arg(format!("ws-l:127.0.0.1:{port}"))
                .arg("broadcast:mirror:");
            let mut g = ChildGuard::spawn("websocat", &mut cmd, Some(dir.0.join("websocat.log")))?;
            wait_tcp(port, &mut g, 30).await?;
            // The publisher is one more client; it drains the echo of its own frames.
            let ws = connect_sub(&SubSpec {
                url: format!("ws://127.0.0.1:{port}/"),
                v2: false,
                compressed: false,
                dictionary: None,
                filter: None,
                stalls: false,
            })
            .await
            .context("publisher connecting to websocat")?;
            let (sink, mut source) = ws.split();
            tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
            let sink: BoxSink = Box::pin(sink.sink_map_err(anyhow::Error::from));
            tx.send(PubSink::Ws(sink)).await.ok();
            Ok(Running {
                procs: vec![g],
                port,
                sinks: rx,
                admin: None,
                _dir: Some(dir),
            })
        }
        Target::RedisPubsub => {
            let (redis, rport) = start_redis(args, &dir).await?;
            tx.send(redis_publisher(rport).await?).await.ok();
            // Subscribers are RESP clients of redis-server itself.
            Ok(Running {
                procs: vec![redis],
                port: rport,
                sinks: rx,
                admin: None,
                _dir: Some(dir),
            })
        }
        Target::RedisRelay => {
            let (redis, rport) = start_redis(args, &dir).await?;
            let port = free_port()?;
            let exe = std::env::current_exe()?;
            let mut cmd = Command::new(exe);
            cmd.arg("redis-relay")
                .arg("--redis")
                .arg(format!("127.0.0.1:{rport}"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"));
            let mut relay =
                ChildGuard::spawn("redis-relay", &mut cmd, Some(dir.0.join("relay.log")))?;
            wait_tcp(port, &mut relay, 30).await?;
            // The relay listens only after its SUBSCRIBE was confirmed.
            tx.send(redis_publisher(rport).await?).await.ok();
            Ok(Running {
                procs: vec![relay, redis],
                port,
                sinks: rx,
                admin: None,
                _dir: Some(dir),
            })
        }
    }
}

/// A `redis-server` for a Redis baseline (no persistence; a pub/sub client may hold up to
/// 256 MB of output before Redis drops it), and its port.
async fn start_redis(args: &FanoutArgs, dir: &TempDir) -> anyhow::Result<(ChildGuard, u16)> {
    let rport = free_port()?;
    let mut cmd = Command::new(&args.redis_server);
    cmd.args(["--bind", "127.0.0.1", "--port", &rport.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--client-output-buffer-limit", "pubsub 256mb 64mb 60"])
        .arg("--dir")
        .arg(&dir.0);
    let mut redis = ChildGuard::spawn("redis-server", &mut cmd, Some(dir.0.join("redis.log")))?;
    wait_tcp(rport, &mut redis, 30).await?;
    Ok((redis, rport))
}

/// The publisher's own connection to Redis, PUBLISHing every frame; its replies (the
/// number of receivers) are read and dropped.
async fn redis_publisher(rport: u16) -> anyhow::Result<PubSink> {
    Ok(PubSink::Redis {
        w: publishing_conn(("127.0.0.1", rport)).await?,
        channel: REDIS_CHANNEL.into(),
    })
}

pub(crate) async fn run_phase(
    args: &FanoutArgs,
    target: Target,
    run: usize,
) -> anyhow::Result<serde_json::Value> {
    let tag = format!("{}-{run}", target.name().replace('/', "-"));
    eprintln!("== run {run}: {} ==", target.name());
    let mut running = start_target(args, target, &tag).await?;
    for p in &running.procs {
        eprintln!("  {} pid {}", p.name, p.pid());
    }
    let sinks = std::mem::replace(&mut running.sinks, tokio::sync::mpsc::channel(1).1);

    // Generate ahead before anything is measured.
    let feed = Feed::ready(args.rate, args.seed, args.dids).await;
    let PubCtx {
        ctl,
        stamps,
        tallies,
        ..
    } = feed.ctx.clone();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = rss_total(&running.procs);

    // Subscribers.
    let stall_every = if args.stall_fraction > 0.0 {
        (1.0 / args.stall_fraction).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let is_sluice = matches!(target, Target::Sluice(_));
    let specs: Vec<Arc<SubSpec>> = (0..args.subscribers)
        .map(|i| {
            let filter = if !is_sluice || args.mix == Mix::All {
                None
            } else {
                realistic_filter(args.seed, i)
            };
            Arc::new(SubSpec {
                url: sub_url(target, running.port, filter),
                v2: matches!(target.wire(), Wire::V2 | Wire::V2z) && is_sluice,
                compressed: matches!(target.wire(), Wire::V1z | Wire::V2z),
                dictionary: match target {
                    _ if i % TIMED_EVERY != 0 => None,
                    Target::Sluice(Wire::V1z) => Some(decoder_dictionary(1)),
                    Target::Sluice(Wire::V2z) => Some(decoder_dictionary(2)),
                    _ => None,
                },
                filter,
                stalls: is_sluice
                    && stall_every != usize::MAX
                    && i % stall_every == stall_every - 1,
            })
        })
        .collect();
    let shared: Vec<Arc<SubShared>> = specs.iter().map(|_| Arc::new(SubShared::new())).collect();
    let sources: Vec<Option<std::net::IpAddr>> = (0..specs.len())
        .map(|i| {
            (args.client_ips > 1).then(|| {
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                    127,
                    0,
                    0,
                    1 + (i as u32 % args.client_ips) as u8,
                ))
            })
        })
        .collect();
    let mut tasks = Vec::with_capacity(specs.len());
    let mut connect_errors = 0usize;
    let mut first_error = None;
    // With `--sub-procs`, the subscribers run in child processes instead.
    let mut sub_procs = None;
    if args.sub_procs > 0 {
        let subs: Vec<_> = specs.iter().cloned().zip(sources.iter().copied()).collect();
        let log_dir = running
            ._dir
            .as_ref()
            .map_or_else(|| args.tmp.clone(), |d| d.0.clone());
        let (readers, connected) = crate::sub_procs::spawn(
            &subs,
            args.sub_procs,
            args.sub_sample,
            &log_dir,
            Arc::clone(&ctl),
            Arc::clone(&stamps),
            Duration::from_secs(60),
        )
        .await?;
        connect_errors = specs.len() - connected.min(specs.len());
        if connect_errors > 0 {
            first_error = Some(format!("see {}/fanout-read-*.log", log_dir.display()));
        }
        sub_procs = Some(readers);
    } else {
        let sem = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
        let connecting: Vec<_> = specs
            .iter()
            .zip(&sources)
            .map(|(spec, source)| {
                let spec = Arc::clone(spec);
                let sem = Arc::clone(&sem);
                let source = *source;
                tokio::spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    connect_from(&spec, source).await
                })
            })
            .collect();
        for (i, c) in connecting.into_iter().enumerate() {
            match c.await {
                Ok(Ok(ws)) => tasks.push(tokio::spawn(run_sub(
                    Arc::clone(&specs[i]),
                    ws,
                    Arc::clone(&ctl),
                    Arc::clone(&stamps),
                    Arc::clone(&shared[i]),
                ))),
                Ok(Err(e)) => {
                    connect_errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
                Err(e) => {
                    connect_errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    for p in running.procs.iter_mut() {
        p.check_alive()?;
    }
    if connect_errors > 0 {
        eprintln!(
            "  {connect_errors} subscribers failed to connect (first: {})",
            first_error.unwrap_or_default()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_total(&running.procs);
    let connected = args.subscribers - connect_errors;
    let per_sub_idle = if connected > 0 {
        (rss_idle.saturating_sub(rss_base) * 1024) as f64 / connected as f64
    } else {
        0.0
    };

    // Traffic.
    let publisher = feed.start(sinks, args.warmup).await;

    let cpu0 = cpu_each(&running.procs);
    let self0 = self_cpu();
    let (subs_cpu0, snap0) = match sub_procs.as_mut() {
        Some(r) => (r.cpu_secs(), Some(r.snapshot().await?.totals)),
        None => (0.0, None),
    };
    let m0 = cpu_line();
    let hub0 = hub_metrics(running.admin).await;
    let t0 = Instant::now();
    ctl.phase.store(PH_MEASURE, Ordering::Relaxed);
    let rss_start_measure = rss_total(&running.procs);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rss_max_measure = 0;
    let measure_end = t0 + Duration::from_secs(args.duration);
    while Instant::now() < measure_end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max_measure = rss_max_measure.max(rss_total(&running.procs));
    }
    ctl.phase.store(PH_AFTER, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_each(&running.procs);
    let self1 = self_cpu();
    let m1 = cpu_line();
    let hub1 = hub_metrics(running.admin).await;
    let loadavg_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rss_end_measure = rss_total(&running.procs);
    // Per subscriber, in the window.
    let totals_end = totals_now(sub_procs.as_mut(), &shared).await?;
    let delivered_each: Vec<u64> = match snap0 {
        Some(snap0) => totals_end.iter().zip(&snap0).map(|(b, a)| b - a).collect(),
        None => shared
            .iter()
            .map(|s| s.delivered[PH_MEASURE as usize].load(Ordering::Relaxed))
            .collect(),
    };
    // What each subscriber should have had by the window's end (everything sent since
    // it connected, which was before the first frame).
    let expected_by_end: u64 = specs
        .iter()
        .map(|spec| {
            tallies[PH_WARMUP as usize].expected(target, spec.filter)
                + tallies[PH_MEASURE as usize].expected(target, spec.filter)
        })
        .sum();
    let behind_at_end = expected_by_end.saturating_sub(totals_end.iter().sum());
    let subs_cpu = sub_procs.as_ref().map_or(0.0, |r| r.cpu_secs() - subs_cpu0);
    let delivered_measure: u64 = delivered_each.iter().sum();

    // Stall phase (sluice only).
    let mut stall = serde_json::Value::Null;
    let stalled_count = specs.iter().filter(|s| s.stalls).count();
    if is_sluice && args.stall_secs > 0 && stalled_count > 0 && sub_procs.is_none() {
        let rss_start = rss_total(&running.procs);
        ctl.phase.store(PH_STALL, Ordering::Relaxed);
        ctl.stall_active.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        let end = Instant::now() + Duration::from_secs(args.stall_secs);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(rss_total(&running.procs));
        }
        ctl.stall_active.store(false, Ordering::Relaxed);
        ctl.phase.store(PH_AFTER, Ordering::Relaxed);
        let rss_max = samples.iter().copied().max().unwrap_or(rss_start);
        let rss_min = samples.iter().copied().min().unwrap_or(rss_start);
        let mut others = Hist::new();
        for (spec, s) in specs.iter().zip(&shared) {
            if !spec.stalls {
                others.merge(&s.hist.lock()[PH_STALL as usize]);
            }
        }
        // Give stalled subscribers time to catch up, bounded.
        let before: Vec<u64> = shared
            .iter()
            .map(|s| s.delivered[PH_AFTER as usize].load(Ordering::Relaxed))
            .collect();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let stalled_ended = specs
            .iter()
            .zip(&shared)
            .filter(|(sp, s)| sp.stalls && s.ended.load(Ordering::Relaxed))
            .count();
        let others_ended = specs
            .iter()
            .zip(&shared)
            .filter(|(sp, s)| !sp.stalls && s.ended.load(Ordering::Relaxed))
            .count();
        let stalled_resumed = specs
            .iter()
            .zip(&shared)
            .zip(&before)
            .filter(|((sp, s), b)| {
                sp.stalls && s.delivered[PH_AFTER as usize].load(Ordering::Relaxed) > **b
            })
            .count();
        let reasons: Vec<String> = specs
            .iter()
            .zip(&shared)
            .filter(|(sp, _)| sp.stalls)
            .filter_map(|(_, s)| s.end_reason.lock().clone())
            .take(3)
            .collect();
        let growth = if rss_start > 0 {
            (rss_max as f64 - rss_start as f64) / rss_start as f64 * 100.0
        } else {
            0.0
        };
        stall = json!({
            "secs": args.stall_secs,
            "stalled_subscribers": stalled_count,
            "rss_start_kb": rss_start,
            "rss_min_kb": rss_min,
            "rss_max_kb": rss_max,
            "rss_end_kb": samples.last().copied().unwrap_or(rss_start),
            "rss_growth_pct": growth,
            "rss_slope_kb_s": (samples.last().copied().unwrap_or(rss_start) as f64 - rss_start as f64)
                / args.stall_secs as f64,
            "rss_samples_kb": samples,
            "others_p50_us": q(&others, 0.5),
            "others_p99_us": q(&others, 0.99),
            "others_max_us": others.max,
            "others_ended": others_ended,
            "stalled_ended": stalled_ended,
            "stalled_resumed_reading": stalled_resumed,
            "stalled_end_reasons": reasons,
        });
    }

    ctl.stop_publish.store(true, Ordering::Relaxed);
    let pubstats = tokio::time::timeout(Duration::from_secs(10), publisher)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    // Late or lost: with the source stopped, wait (bounded) for the subscribers that were
    // behind to read what they still should get. What is missing when nobody makes any
    // more progress was lost; what arrives meanwhile was only late.
    let expected_each: Vec<u64> = specs
        .iter()
        .map(|spec| {
            tallies
                .iter()
                .map(|t| t.expected(target, spec.filter))
                .sum()
        })
        .collect();
    let drain_start = Instant::now();
    let (missing_after_drain, still_reading) = loop {
        let totals = totals_now(sub_procs.as_mut(), &shared).await?;
        let missing: u64 = expected_each
            .iter()
            .zip(&totals)
            .map(|(e, t)| e.saturating_sub(*t))
            .sum();
        if missing == 0 || drain_start.elapsed() >= Duration::from_secs(args.drain_secs) {
            break (missing, missing > 0);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later: u64 = totals_now(sub_procs.as_mut(), &shared).await?.iter().sum();
        if later == totals.iter().sum::<u64>() {
            // Nothing moved for 2 s: what is missing now is not coming.
            let missing = expected_each
                .iter()
                .zip(&totals)
                .map(|(e, t)| e.saturating_sub(*t))
                .sum();
            break (missing, false);
        }
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let hub_drained = hub_metrics(running.admin).await;
    for p in running.procs.iter_mut() {
        p.check_alive()?;
    }

    // Results.
    let mut hist = Hist::new();
    let mut unmatched = 0;
    let mut expected_measure = 0u64;
    let mut delivered_live = 0u64;
    for ((spec, s), got) in specs.iter().zip(&shared).zip(&delivered_each) {
        if sub_procs.is_none() && !s.connected.load(Ordering::Relaxed) {
            continue;
        }
        hist.merge(&s.hist.lock()[PH_MEASURE as usize]);
        unmatched += s.unmatched.load(Ordering::Relaxed);
        expected_measure += tallies[PH_MEASURE as usize].expected(target, spec.filter);
        delivered_live += got;
    }
    if let Some(r) = sub_procs.as_mut() {
        hist.merge(&r.hist.lock()[PH_MEASURE as usize]);
        unmatched += r.unmatched.load(Ordering::Relaxed);
        r.check_alive()?;
    }
    for t in tasks {
        t.abort();
    }
    let cpu_secs: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).collect();
    let total_cpu: f64 = cpu_secs.iter().sum();
    let per_event_us = if delivered_measure > 0 {
        total_cpu * 1e6 / delivered_measure as f64
    } else {
        f64::NAN
    };
    let (machine_busy, steal) = match (&m0, &m1) {
        (Some(a), Some(b)) if b.total > a.total => {
            let span = (b.total - a.total) as f64;
            (
                (b.busy - a.busy) as f64 / span * 100.0,
                (b.steal - a.steal) as f64 / span * 100.0,
            )
        }
        _ => (f64::NAN, f64::NAN),
    };
    let names: Vec<String> = running.procs.iter().map(|p| p.name.clone()).collect();
    let frames_measure = tallies[PH_MEASURE as usize].frames.load(Ordering::Relaxed);
    let mut result = json!({
        "run": run,
        "target": target.name(),
        "mix": if is_sluice { format!("{:?}", args.mix).to_lowercase() } else { "all (no filtering)".into() },
        "subscribers": args.subscribers,
        "connected": connected,
        "rate": args.rate,
        "duration_s": secs,
        "frames_sent_measure": frames_measure,
        "frame_rate_achieved": frames_measure as f64 / secs,
        "delivered_measure": delivered_measure,
        "delivered_per_sec": delivered_measure as f64 / secs,
        "expected_measure": expected_measure,
        "delivery_ratio": if expected_measure > 0 { delivered_live as f64 / expected_measure as f64 } else { f64::NAN },
        "cpu_us_per_event": per_event_us,
        "cpu_pct": total_cpu / secs * 100.0,
        "cpu_by_process": names.iter().zip(&cpu_secs).map(|(n, c)| json!({"name": n, "cpu_s": c, "us_per_event": if delivered_measure > 0 { c * 1e6 / delivered_measure as f64 } else { f64::NAN }})).collect::<Vec<_>>(),
        "bench_cpu_pct": (self1 - self0) / secs * 100.0,
        "machine_busy_pct": machine_busy,
        "p50_us": q(&hist, 0.5),
        "p90_us": q(&hist, 0.9),
        "p99_us": q(&hist, 0.99),
        "p999_us": q(&hist, 0.999),
        "max_us": hist.max,
        "timed_samples": hist.n,
        "unmatched": unmatched,
        "rss_base_kb": rss_base,
        "rss_idle_kb": rss_idle,
        "idle_bytes_per_subscriber": per_sub_idle,
        "rss_end_measure_kb": rss_end_measure,
        "rss_max_measure_kb": rss_max_measure,
        "rss_start_measure_kb": rss_start_measure,
        "rss_slope_measure_kb_s": (rss_end_measure as f64 - rss_start_measure as f64) / secs,
        "loadavg_at_measure": loadavg.trim(),
        "publisher": {
            "sent": pubstats.sent,
            "underruns": pubstats.underruns,
            "send_errors": pubstats.send_errors,
            "reconnects": pubstats.reconnects,
            "lag_p99_us": q(&pubstats.lag, 0.99),
            "lag_max_us": pubstats.lag.max,
        },
        "stall": stall,
    });
    // Outside the macro: one more key there passes its recursion limit.
    result["sub_procs"] = json!(args.sub_procs);
    result["sub_procs_cpu_pct"] = json!(subs_cpu / secs * 100.0);
    result["steal_pct"] = json!(steal);
    result["loadavg_at_end"] = json!(loadavg_end.trim());
    result["behind_at_end"] = json!(behind_at_end);
    result["missing_after_drain"] = json!(missing_after_drain);
    result["still_reading_after_drain"] = json!(still_reading);
    result["drain_s"] = json!(drain_secs);
    result["hub"] = hub_report(&hub0, &hub1, &hub_drained);
    print_phase(&result);
    drop(running);
    Ok(result)
}

/// Every subscriber's deliveries so far: the child processes' counts, or the in-process
/// subscribers' over all phases.
async fn totals_now(
    sub_procs: Option<&mut crate::redis_readers::Readers>,
    shared: &[Arc<SubShared>],
) -> anyhow::Result<Vec<u64>> {
    Ok(match sub_procs {
        Some(r) => r.snapshot().await?.totals,
        None => shared
            .iter()
            .map(|s| s.delivered.iter().map(|d| d.load(Ordering::Relaxed)).sum())
            .collect(),
    })
}

/// The fan-out's own account of a run, from sluice's `/metrics` (family, label).
const HUB_METRICS: [(&str, &str, &str); 11] = [
    (
        "to_catchup",
        "sluice_slow_consumer_transitions_total",
        "to=\"catchup\"",
    ),
    (
        "to_live",
        "sluice_slow_consumer_transitions_total",
        "to=\"live\"",
    ),
    ("in_catchup", "sluice_active_replays", ""),
    ("cold_reads", "sluice_cold_reads_total", ""),
    ("queued_events", "sluice_queued_events", ""),
    (
        "direct_written",
        "sluice_direct_writes_total",
        "outcome=\"written\"",
    ),
    (
        "direct_handed",
        "sluice_direct_writes_total",
        "outcome=\"handed\"",
    ),
    (
        "direct_refused",
        "sluice_direct_writes_total",
        "outcome=\"refused\"",
    ),
    (
        "disconnects_too_slow",
        "sluice_subscriber_disconnects_total",
        "reason=\"too_slow\"",
    ),
    (
        "disconnects_too_old",
        "sluice_subscriber_disconnects_total",
        "reason=\"too_old\"",
    ),
    ("log_tail_bytes", "sluice_log_tail_bytes", ""),
];

/// `/metrics` of sluice's admin listener (empty without one).
async fn hub_metrics(admin: Option<std::net::SocketAddr>) -> String {
    match admin {
        Some(a) => metrics(a).await,
        None => String::new(),
    }
}

/// Each of [`HUB_METRICS`] at the window's start, its end and after the drain.
fn hub_report(start: &str, end: &str, drained: &str) -> serde_json::Value {
    if start.is_empty() {
        return serde_json::Value::Null;
    }
    let mut out = serde_json::Map::new();
    for (key, name, label) in HUB_METRICS {
        let v = |t: &str| metric_with(t, name, label);
        out.insert(key.into(), json!([v(start), v(end), v(drained)]));
    }
    out.into()
}
