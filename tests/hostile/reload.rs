//! SIGHUP applies new hostile-client limits to a running `sluice serve` without dropping
//! anyone: the pending-connection caps and deadlines before the upgrade, the client-memory
//! budget and the per-IP shares of the index and scan budgets are read again from the
//! config file; connections accepted from then on get the new ones, what is already held
//! stays, a bystander subscriber loses nothing, and a file that does not validate changes
//! nothing. The per-session settings (the client message deadline, the update rate) apply
//! to sessions that start after the reload; running ones keep theirs.

use crate::common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

const PENDING: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
const BEFORE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 4));
const AFTER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 5));

/// A limit in force, from `/metrics`.
async fn limit(serve: &Serve, setting: &str) -> Option<f64> {
    metric(
        &serve.metrics().await,
        &format!("sluice_limit{{setting=\"{setting}\""),
    )
}

/// Waits until `setting` is `value` in `/metrics` (the reload is asynchronous).
async fn wait_limit(serve: &Serve, setting: &str, value: f64) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let now = limit(serve, setting).await;
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{setting} is {now:?}, not {value}: {}",
            serve.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_config(path: &Path, settings: &[(&str, u64)]) {
    let text: String = settings
        .iter()
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
    std::fs::write(path, text).expect("write the config file");
}

/// Four subscribers from `from`, each with a filter of 1,400 DIDs (charged ~300 KB):
/// how many were closed with 1013.
async fn four_filters(serve: &Serve, from: IpAddr) -> (Vec<tokio::net::TcpStream>, usize) {
    let dids: Vec<String> = (0..1400).map(|i| format!("did:plc:{i:024}")).collect();
    let path = format!("/subscribe?wantedDids={}", dids.join("&wantedDids="));
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(raw_ws(from, serve.addr, &path).await.expect("upgrade"));
    }
    let codes = futures_util::future::join_all(
        streams
            .iter_mut()
            .map(|stream| close_code(stream, Duration::from_millis(700))),
    )
    .await;
    let refused = codes.iter().filter(|c| **c == Some(1013)).count();
    (streams, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_limits_to_new_connections_and_drops_no_one() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(1500, 0.5).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sluice.toml");
    write_config(
        &file,
        &[
            ("header_read_timeout_secs", 60),
            ("handshake_timeout_secs", 60),
            ("max_pending_per_ip", 64),
            ("client_memory_per_ip_mib", 32),
        ],
    );
    let serve = Serve::start(&upstream, &["--config", &path_str(&file)], None).await;
    assert_eq!(limit(&serve, "max_pending_per_ip").await, Some(64.0));
    assert_eq!(limit(&serve, "client_memory_per_ip_mib").await, Some(32.0));
    assert_eq!(
        limit(&serve, "scan_events_per_sec_per_ip").await,
        Some(50_000.0)
    );
    wait_logged(&serve, 1).await;
    let mut bystander = Bystander::connect(&serve, 1).await;

    // Before: three unfinished handshakes from one address are held, and four 1,400-DID
    // filters from another fit its 32 MiB share.
    let mut pending = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from(PENDING, serve.addr).await.expect("connect");
        stream
            .write_all(b"GET /subscribe HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("a partial head");
        pending.push(stream);
    }
    let (held, refused) = four_filters(&serve, BEFORE).await;
    assert_eq!(refused, 0, "all fit 32 MiB");

    write_config(
        &file,
        &[
            ("header_read_timeout_secs", 2),
            ("handshake_timeout_secs", 3),
            ("max_pending_per_ip", 2),
            ("client_memory_per_ip_mib", 1),
            ("max_index_changes_per_sec_per_ip", 20_000),
            ("scan_events_per_sec_per_ip", 1000),
        ],
    );
    serve.signal("-HUP");
    wait_limit(&serve, "max_pending_per_ip", 2.0).await;
    let reloaded_at = metric(&serve.metrics().await, "sluice_log_newest_seq").unwrap_or(0.0);
    for (setting, value) in [
        ("header_read_timeout_secs", 2.0),
        ("handshake_timeout_secs", 3.0),
        ("client_memory_per_ip_mib", 1.0),
        ("max_index_changes_per_sec_per_ip", 20_000.0),
        ("scan_events_per_sec_per_ip", 1000.0),
    ] {
        assert_eq!(limit(&serve, setting).await, Some(value), "{setting}");
    }
    let metrics = serve.metrics().await;
    assert_eq!(
        metric(&metrics, "sluice_client_memory_limit_bytes"),
        Some(256.0 * 1024.0 * 1024.0),
        "the total was not in the file: its default stays"
    );

    // After: the address holding three pending connections is over its new cap of two.
    assert_eq!(
        http_status_from(PENDING, serve.addr, "/event/1").await,
        Some(429)
    );
    assert_eq!(
        http_status_from(OTHER, serve.addr, "/event/1").await,
        Some(200)
    );
    // A new slow client gets the new 2 s header deadline (60 s before the reload).
    let closed_after = slowloris(
        OTHER,
        serve.addr,
        Duration::from_millis(500),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        closed_after.is_some(),
        "a slowloris connected after the reload was not closed within 20 s"
    );
    // Three 1,400-DID filters fill most of the new 1 MiB share: the fourth is refused.
    let (_after, refused) = four_filters(&serve, AFTER).await;
    assert_eq!(refused, 1, "one of four does not fit 1 MiB");
    // What was held before the reload is kept.
    let mut held = held;
    let codes = futures_util::future::join_all(
        held.iter_mut()
            .map(|stream| close_code(stream, Duration::from_millis(200))),
    )
    .await;
    assert!(
        codes.iter().all(Option::is_none),
        "a filter admitted before the reload was dropped: {codes:?}"
    );

    // A file that does not validate (a per-IP share over the total) changes nothing.
    write_config(
        &file,
        &[("max_pending_per_ip", 9), ("client_memory_per_ip_mib", 512)],
    );
    serve.signal("-HUP");
    let deadline = Instant::now() + LIMIT;
    while !serve.stderr_text().contains("nothing changed") {
        assert!(Instant::now() < deadline, "no reload error logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(limit(&serve, "max_pending_per_ip").await, Some(2.0));
    assert_eq!(limit(&serve, "client_memory_per_ip_mib").await, Some(1.0));

    // The bystander, connected before all this, lost nothing and kept receiving.
    bystander.read_for(Duration::from_secs(2)).await;
    bystander.assert_gapless_from(1);
    let last = bystander.seqs.last().copied().unwrap_or(0);
    assert!(
        last as f64 > reloaded_at,
        "no event after the reload (last {last}, reload at {reloaded_at})"
    );
    drop(pending);
}

/// A small v1 `options_update`.
const SMALL_UPDATE: &[u8] =
    br#"{"type":"options_update","payload":{"wantedCollections":["none.match.nothing"]}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_session_limits_for_sessions_that_start_after_it() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(1300, 4.0).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sluice.toml");
    write_config(
        &file,
        &[
            ("client_message_timeout_secs", 60),
            ("max_client_updates_per_sec", 10),
            ("replay_events_per_sec", 200_000),
        ],
    );
    let serve = Serve::start(&upstream, &["--config", &path_str(&file)], None).await;
    assert_eq!(
        limit(&serve, "client_message_timeout_secs").await,
        Some(60.0)
    );
    let path = "/subscribe?wantedCollections=none.match.nothing";
    let mut before = raw_ws(BEFORE, serve.addr, path).await.expect("upgrade");
    wait_logged(&serve, 1200).await;
    // A replay from the start before the reload reads the whole log at once.
    let mut replay = Bystander::connect(&serve, 1).await;
    replay.read_for(Duration::from_secs(2)).await;
    assert!(replay.seqs.len() >= 1200, "{} replayed", replay.seqs.len());

    write_config(
        &file,
        &[
            ("client_message_timeout_secs", 1),
            ("max_client_updates_per_sec", 1),
            ("replay_events_per_sec", 100),
        ],
    );
    serve.signal("-HUP");
    wait_limit(&serve, "client_message_timeout_secs", 1.0).await;
    assert_eq!(limit(&serve, "max_client_updates_per_sec").await, Some(1.0));
    assert_eq!(limit(&serve, "replay_events_per_sec").await, Some(100.0));

    // One after it is paced at 100 events a second: its burst of 100, then 100 a second,
    // and at most one catch-up batch (256 events) taken ahead. (Its first batch waits
    // 1.6 s, longer than the 1 s message-deadline timer that wakes the session: the read
    // must resume its wait, not pay again, or nothing would ever come.)
    let mut replay = Bystander::connect(&serve, 1).await;
    replay.read_for(Duration::from_secs(4)).await;
    replay.assert_gapless_from(1);
    assert!(
        replay.seqs.len() <= 100 + 4 * 100 + 256,
        "{} replayed in 4 s at 100 a second",
        replay.seqs.len()
    );

    // Three updates back to back: over the new rate of one a second for a session that
    // started after the reload, within the old ten for one that started before.
    let mut after = raw_ws(AFTER, serve.addr, path).await.expect("upgrade");
    for stream in [&mut before, &mut after] {
        for _ in 0..3 {
            stream
                .write_all(&client_frame(true, 1, SMALL_UPDATE))
                .await
                .expect("send an update");
        }
    }
    assert_eq!(
        close_code(&mut after, Duration::from_secs(10)).await,
        Some(1008),
        "three updates in a row at one a second"
    );
    assert_eq!(
        close_code(&mut before, Duration::from_secs(1)).await,
        None,
        "the session from before the reload keeps ten a second"
    );

    // A message left unfinished: a new session is closed by the new 1 s deadline; the
    // one from before keeps its 60 s.
    let mut slow = raw_ws(OTHER, serve.addr, path).await.expect("upgrade");
    for stream in [&mut before, &mut slow] {
        stream
            .write_all(&client_frame(false, 1, b"{\"type\":"))
            .await
            .expect("start a message");
    }
    assert_eq!(
        close_code(&mut slow, Duration::from_secs(10)).await,
        Some(1008),
        "an unfinished message past the new deadline"
    );
    assert_eq!(
        close_code(&mut before, Duration::from_secs(1)).await,
        None,
        "the session from before the reload keeps its 60 s"
    );
    let metrics = serve.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sluice_subscriber_disconnects_total{reason=\"message_timeout\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "sluice_subscriber_disconnects_total{reason=\"updates_too_fast\""
        ),
        Some(1.0)
    );
}
