//! The admin endpoints during a replay-driven run: metrics show the real state, readiness
//! follows the upstream, and the status page renders live data in a real browser.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sluice::daemon::Daemon;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{generate, SynthOptions};

/// A blocking HTTP/1.1 GET: status code and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn start() -> (Daemon, tempfile::TempDir, usize) {
    let now_ms = sluice::clock::now_us() / 1000 - 60_000;
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count: 400,
        start_time_ms: now_ms,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let count = frames.len();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames),
        listen: Listen::Listener(listener),
        speed: Speed::Max,
        looped: false,
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = sluice::config::parse_serve_args([
        "x",
        "--upstream",
        &format!("ws://{upstream}"),
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .unwrap()
    .to_config()
    .unwrap();
    (Daemon::start(config).await.unwrap(), dir, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_show_the_real_state() {
    let _machine = crate::exclusive::shared().await;
    let (daemon, _dir, frames) = start().await;
    let admin = daemon.admin_addr;
    let url = format!(
        "ws://{}/subscribe?wantedCollections=app.bsky.feed.post",
        daemon.addr
    );
    let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut ingested = 0.0;
    for _ in 0..500 {
        let text = tokio::task::spawn_blocking(move || get(admin, "/metrics").1)
            .await
            .unwrap();
        ingested = metric(&text, "sluice_upstream_frames_total").unwrap_or(0.0);
        if ingested >= frames as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ingested, frames as f64, "every frame counted");
    // A live subscriber receives something, then the metrics show it.
    let first = tokio::time::timeout(Duration::from_secs(10), client.next()).await;
    let _ = first; // live-only subscriber: nothing may arrive after the replay ended
    let (status, text) = tokio::task::spawn_blocking(move || get(admin, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "sluice_upstream_connected"), Some(1.0));
    assert!(metric(&text, r#"sluice_ingested_events_total{kind="commit"}"#).unwrap() > 300.0);
    assert!(
        metric(
            &text,
            r#"sluice_ingested_commit_ops_total{collection="app.bsky.feed.like"}"#
        )
        .unwrap()
            > 100.0
    );
    assert_eq!(
        metric(&text, r#"sluice_subscribers{wire="jetstream_v1"}"#),
        Some(1.0)
    );
    assert!(metric(&text, "sluice_log_newest_seq").unwrap() > 400.0);
    assert!(metric(&text, "sluice_upstream_lag_seconds").unwrap() < 120.0);
    // The depth the log holds, once every event is durable: all of them, over the source
    // time they span, with a projection no deeper than the age limit.
    let newest = metric(&text, "sluice_log_newest_seq").unwrap();
    let mut text = text;
    for _ in 0..500 {
        if metric(&text, "sluice_log_retained_events") == Some(newest) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = tokio::task::spawn_blocking(move || get(admin, "/metrics").1)
            .await
            .unwrap();
    }
    assert_eq!(metric(&text, "sluice_log_retained_events"), Some(newest));
    assert!(metric(&text, "sluice_log_retained_seconds").unwrap() > 0.0);
    assert!(metric(&text, "sluice_log_recent_events_per_second").unwrap() > 0.0);
    let per_event = metric(&text, "sluice_log_stored_bytes_per_event").unwrap();
    assert!((50.0..20_000.0).contains(&per_event), "{per_event}");
    let projected = metric(&text, "sluice_log_projected_depth_seconds").unwrap();
    assert!(projected > 0.0 && projected <= 72.0 * 3600.0, "{projected}");
    // Raw files past the page cache (the default) where the data dir's file system takes
    // O_DIRECT (ext4; tmpfs since Linux 6.6), through it where it refuses.
    let probe = _dir.path().join("o-direct-probe");
    let fs_takes_direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok()
    };
    let _ = std::fs::remove_file(&probe);
    assert_eq!(
        metric(&text, "sluice_log_direct_raw_writes"),
        Some(if fs_takes_direct { 1.0 } else { 0.0 })
    );
    let (status, body) = tokio::task::spawn_blocking(move || get(admin, "/readyz"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ready"));
    let (status, _) = tokio::task::spawn_blocking(move || get(admin, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, status_json) = tokio::task::spawn_blocking(move || get(admin, "/status.json"))
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status_json).unwrap();
    assert_eq!(status["upstream"]["connected"], true);
    assert_eq!(status["wires"]["jetstream_v1"]["subscribers"], 1);
    drop(client);
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_live_data_in_chromium() {
    let _machine = crate::exclusive::shared().await;
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok()
        })
        .expect(
            "chromium is required for this test (Debian package `chromium`; .ci/run installs it)",
        );
    let (daemon, dir, _) = start().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let url = format!("http://{}/", daemon.admin_addr);
    let shot = dir.path().join("status.png");
    let profile = tempfile::tempdir().unwrap();
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=6000",
        "--window-size=1200,900",
    ];
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let dom = tokio::task::spawn_blocking({
        let (url, profile_arg) = (url.clone(), profile_arg.clone());
        move || {
            std::process::Command::new(chromium)
                .args(common)
                .arg(&profile_arg)
                .arg("--dump-dom")
                .arg(&url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.contains("class=\"ok\">ready"),
        "page shows readiness: {dom}"
    );
    assert!(dom.contains("app.bsky.feed.like"), "page shows collections");
    assert!(dom.contains("jetstream_v1"), "page shows wires");
    let shot_arg = format!("--screenshot={}", shot.display());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(chromium)
            .args(common)
            .arg(&profile_arg)
            .arg(&shot_arg)
            .arg(&url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    if let Some(keep) = std::env::var_os("SLUICE_KEEP_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
    daemon.shutdown().await.unwrap();
}

/// Every metric family, with each of its known label values, as a dashboard or an alert
/// expects to find it on a healthy daemon that has seen no error at all.
const EXPECTED_SERIES: &[&str] = &[
    r#"sluice_ingested_events_total{kind="commit"}"#,
    r#"sluice_ingested_events_total{kind="sync"}"#,
    r#"sluice_ingested_events_total{kind="unknown"}"#,
    r#"sluice_decode_errors_total{reason="truncated"}"#,
    r#"sluice_decode_errors_total{reason="invalid_cbor"}"#,
    r#"sluice_decode_errors_total{reason="limit_exceeded"}"#,
    "sluice_upstream_frames_total",
    "sluice_upstream_duplicates_dropped_total",
    "sluice_upstream_seq_regressions_total",
    "sluice_records_missing_total",
    "sluice_too_big_commits_total",
    "sluice_upstream_connected",
    "sluice_upstream_reconnects_total",
    "sluice_upstream_stalls_total",
    "sluice_upstream_oversized_frames_total",
    "sluice_upstream_lag_seconds",
    r#"sluice_subscribers{wire="jetstream_v2"}"#,
    r#"sluice_delivered_events_total{wire="raw"}"#,
    r#"sluice_delivered_bytes_total{wire="jetstream_v1"}"#,
    r#"sluice_oversized_events_total{wire="jetstream_v2"}"#,
    "sluice_queued_events",
    r#"sluice_slow_consumer_transitions_total{to="catchup"}"#,
    r#"sluice_slow_consumer_transitions_total{to="live"}"#,
    r#"sluice_subscriber_disconnects_total{reason="peer_closed"}"#,
    r#"sluice_subscriber_disconnects_total{reason="write_timeout"}"#,
    r#"sluice_subscriber_disconnects_total{reason="too_slow"}"#,
    r#"sluice_subscriber_disconnects_total{reason="index_busy"}"#,
    r#"sluice_admission_refused_total{reason="rate"}"#,
    r#"sluice_admission_refused_total{reason="full"}"#,
    r#"sluice_admission_refused_total{reason="invalid"}"#,
    "sluice_active_replays",
    "sluice_cold_reads_total",
    "sluice_catchup_pool_threads",
    r#"sluice_catchup_pool_work{kind="read"}"#,
    r#"sluice_catchup_pool_work{kind="write"}"#,
    "sluice_catchup_pool_panics_total",
    "sluice_catchup_pool_raises_total",
    "sluice_catchup_pool_raise_refusals_total",
    "sluice_catchup_pool_raised",
    "sluice_catchup_pool_starvation_bound_seconds",
    "sluice_catchup_pace_bytes_per_second",
    "sluice_catchup_paced_writes_total",
    "sluice_catchup_paced_seconds_total",
    "sluice_catchup_paced_bytes_total",
    "sluice_catchup_pace_events_per_second",
    "sluice_catchup_paced_events_total",
    r#"sluice_index_budget_total{outcome="refused"}"#,
    "sluice_log_bytes",
    "sluice_log_direct_raw_writes",
    "sluice_log_disk_bytes",
    "sluice_log_max_bytes",
    "sluice_log_tail_bytes",
    "sluice_log_writer_queue_bytes",
    "sluice_log_commits_total",
    "sluice_log_commit_failures_total",
    "sluice_log_retention_deleted_events_total",
    r#"sluice_log_segment_decodes_total{outcome="decoded"}"#,
    r#"sluice_log_segment_decodes_total{outcome="shared"}"#,
    r#"sluice_log_raw_level_segments_total{level="3"}"#,
    r#"sluice_log_raw_level_segments_total{level="-3"}"#,
    "sluice_log_oldest_seq",
    "sluice_log_newest_seq",
    "sluice_log_retained_events",
    "sluice_log_retained_seconds",
    "sluice_log_recent_events_per_second",
    "sluice_log_stored_bytes_per_event",
    "sluice_log_projected_depth_seconds",
    "sluice_log_oldest_time_seconds",
    "sluice_log_newest_time_seconds",
    "sluice_ready",
];

fn promtool() -> &'static str {
    let ok = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "promtool is required (Debian package `prometheus`; .ci/run installs it)"
    );
    "promtool"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_exists_from_the_first_scrape_and_passes_promtool() {
    let _machine = crate::exclusive::shared().await;
    let (daemon, _dir, frames) = start().await;
    let admin = daemon.admin_addr;
    let mut text = String::new();
    for _ in 0..500 {
        text = tokio::task::spawn_blocking(move || get(admin, "/metrics").1)
            .await
            .unwrap();
        if metric(&text, "sluice_upstream_frames_total") >= Some(frames as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&text, "sluice_upstream_frames_total"),
        Some(frames as f64)
    );
    for series in EXPECTED_SERIES {
        assert!(
            metric(&text, series).is_some(),
            "{series} is missing from the scrape:\n{text}"
        );
    }
    // Only valid frames were ingested: every error counter is present and 0.
    assert_eq!(
        metric(
            &text,
            r#"sluice_decode_errors_total{reason="invalid_cbor"}"#
        ),
        Some(0.0)
    );
    let mut check = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics complained:\n{complaints}"
    );
    // The shipped alert rules and dashboard query only families this scrape has.
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for file in ["sluice.rules.yml", "sluice.grafana.json"] {
        let shipped = std::fs::read_to_string(docs.join(file)).unwrap();
        let names = metric_names(&shipped);
        assert!(names.len() >= 8, "{file} names {names:?}");
        for name in names {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                "{file} uses {name}, which /metrics does not export"
            );
        }
    }
    daemon.shutdown().await.unwrap();
}

/// The `sluice_*` metric names a rules file or dashboard mentions.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sluice_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // Alert names are CamelCase (`Sluice...`), so only metric names match here.
        names.insert(name.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alerting_rules_pass_promtool_and_fire_as_their_tests_say() {
    let _machine = crate::exclusive::shared_blocking();
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for args in [
        ["check", "rules", "sluice.rules.yml"],
        ["test", "rules", "sluice.rules.test.yml"],
    ] {
        let out = std::process::Command::new(promtool())
            .args(args)
            .current_dir(&docs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
