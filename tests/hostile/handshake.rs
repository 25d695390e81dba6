//! Hostile clients before the websocket upgrade, against a real `sluice serve`: a
//! slowloris of 500 connections is closed by the deadline while a new subscriber and
//! `/metrics` are served; under a low open-file limit the descriptors kept for the log and
//! the admin listener stay free (the log keeps committing, `/healthz` answers); SIGTERM
//! with 100 half-open handshakes exits at once. A well-behaved subscriber reads through
//! each attack and loses nothing.

use crate::common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;

const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

fn closed_unfinished(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!(
            "sluice_connections_closed_unfinished_total{{listener=\"subscriber\",reason=\"{reason}\""
        ),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_by_the_deadline_while_others_are_served() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(3000, 0.5).await;
    let serve = Serve::start(
        &upstream,
        &[
            "--header-read-timeout-secs",
            "2",
            "--handshake-timeout-secs",
            "3",
            // Let all 500 in, so the deadline (not a cap) is what closes them.
            "--max-pending-per-ip",
            "1000",
        ],
        None,
    )
    .await;
    let mut bystander = Bystander::connect(&serve, 1).await;
    bystander.read_for(Duration::from_millis(500)).await;

    let started = Instant::now();
    let attack: Vec<_> = (0..500)
        .map(|_| {
            tokio::spawn(slowloris(
                ATTACKER,
                serve.addr,
                Duration::from_millis(500),
                Duration::from_secs(12),
            ))
        })
        .collect();
    // While the attack is on: a new subscriber is served and /metrics answers.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pending = metric(
        &serve.metrics().await,
        "sluice_connections_pending{listener=\"subscriber\"",
    );
    assert!(
        pending.is_some_and(|p| p >= 200.0),
        "the attack is under way: {pending:?} pending"
    );
    let connected = Instant::now();
    let mut newcomer = Bystander::connect(&serve, 1).await;
    newcomer.read_for(Duration::from_millis(300)).await;
    // A hang bound: held up behind the slowloris, it would wait for their deadline (3 s)
    // or never be served.
    assert!(
        connected.elapsed() < Duration::from_secs(6),
        "a new subscriber waited {:?}",
        connected.elapsed()
    );
    newcomer.assert_gapless_from(1);
    bystander.read_for(Duration::from_secs(1)).await;

    let mut closed_after = Vec::new();
    for task in attack {
        closed_after.push(task.await.expect("slowloris task"));
    }
    let still_open = closed_after.iter().filter(|c| c.is_none()).count();
    assert_eq!(still_open, 0, "connections outliving the deadline");
    let latest = closed_after.iter().flatten().max().copied();
    // Deadline 3 s from accept; connecting 500 sockets, the timer's granularity and a
    // loaded machine add to it: twice the deadline still tells a deadline from none.
    assert!(
        latest.is_some_and(|l| l <= Duration::from_secs(6)),
        "the last one was closed after {latest:?}"
    );
    let metrics = serve.metrics().await;
    let closed = closed_unfinished(&metrics, "header_timeout")
        + closed_unfinished(&metrics, "handshake_timeout");
    assert!(closed >= 500.0, "{closed} counted as closed unfinished");
    assert_eq!(
        metric(
            &metrics,
            "sluice_connections_pending{listener=\"subscriber\""
        ),
        Some(0.0)
    );
    bystander.read_for(Duration::from_millis(500)).await;
    bystander.assert_gapless_from(1);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_fd_limit_the_log_and_admin_keep_their_descriptors() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(3000, 0.5).await;
    let mut serve = Serve::start(
        &upstream,
        &[
            "--fd-reserve",
            "128",
            // Long deadlines and generous pending caps: only the descriptor budget stands
            // between the attack and the open-file limit.
            "--header-read-timeout-secs",
            "60",
            "--handshake-timeout-secs",
            "60",
            "--max-pending-per-ip",
            "1000",
            "--max-pending-connections",
            "1000",
            "--commit-interval-ms",
            "20",
        ],
        Some(256),
    )
    .await;
    let mut bystander = Bystander::connect(&serve, 1).await;
    bystander.read_for(Duration::from_millis(500)).await;
    let before = serve.metrics().await;
    assert_eq!(metric(&before, "sluice_open_file_limit"), Some(256.0));
    assert_eq!(
        metric(&before, "sluice_connections_fd_cap{listener=\"subscriber\""),
        Some(128.0)
    );

    // 300 connections that never finish their headers: more than the limit allows.
    let attack: Vec<_> = (0..300)
        .map(|_| {
            tokio::spawn(slowloris(
                ATTACKER,
                serve.addr,
                Duration::from_millis(500),
                Duration::from_secs(6),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = serve.metrics().await;
    let open = metric(&during, "sluice_connections_open{listener=\"subscriber\"");
    assert!(
        open.is_some_and(|o| (100.0..=128.0).contains(&o)),
        "subscriber connections held: {open:?}"
    );
    let refused = metric(
        &during,
        "sluice_connections_refused_total{listener=\"subscriber\",reason=\"fd_reserve\"",
    );
    assert!(
        refused.is_some_and(|r| r >= 150.0),
        "refused for the reserve: {refused:?}"
    );
    // The log keeps committing and the admin listener answers while the attack holds on.
    let commits_before = metric(&during, "sluice_log_commits_total").unwrap_or(0.0);
    bystander.read_for(Duration::from_secs(2)).await;
    assert_eq!(
        http_get(serve.admin, "/healthz").await.map(|r| r.0),
        Some(200)
    );
    let after = serve.metrics().await;
    let commits_after = metric(&after, "sluice_log_commits_total").unwrap_or(0.0);
    assert!(
        commits_after > commits_before,
        "the log stopped committing: {commits_before} -> {commits_after}"
    );
    assert_eq!(
        metric(&after, "sluice_log_commit_failures_total"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &after,
            "sluice_connections_accept_errors_total{listener=\"subscriber\""
        ),
        Some(0.0),
        "accept never ran out of descriptors"
    );
    let still_open = futures_util::future::join_all(attack)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(None)))
        .count();
    assert!(still_open <= 128, "{still_open} attack connections held");
    bystander.read_for(Duration::from_millis(500)).await;
    bystander.assert_gapless_from(1);
    let stderr = serve.stderr_text();
    assert!(
        !stderr.contains("Too many open files"),
        "descriptors ran out: {stderr}"
    );
    serve.signal("-TERM");
    let (status, _) = serve.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {}", serve.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_half_open_handshakes_exits_at_once() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(1000, 1.0).await;
    let mut serve = Serve::start(
        &upstream,
        &[
            "--max-pending-per-ip",
            "200",
            "--shutdown-timeout-secs",
            "15",
        ],
        None,
    )
    .await;
    let attack: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(slowloris(
                ATTACKER,
                serve.addr,
                Duration::from_millis(500),
                Duration::from_secs(10),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending = metric(
            &serve.metrics().await,
            "sluice_connections_pending{listener=\"subscriber\"",
        );
        if pending == Some(100.0) {
            break;
        }
        assert!(Instant::now() < deadline, "pending stayed at {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve.signal("-TERM");
    let (status, took) = serve.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {}", serve.stderr_text());
    // Without closing the handshakes it took the whole shutdown timeout (15 s); a third
    // of it leaves room for a loaded machine and still tells the two apart.
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with 100 half-open handshakes"
    );
    for task in attack {
        let closed = task.await.expect("slowloris task");
        assert!(
            closed.is_some_and(|c| c < Duration::from_secs(10)),
            "a handshake outlived the daemon: {closed:?}"
        );
    }
}
