//! Refusals cost the refused client time, not the daemon work: a request refused with
//! `Retry-After` is answered late (held) and its connection closed, at most
//! `--max-held-refusals-per-ip` at once per address; past that, the address's new
//! connections are refused before their request is read, while other addresses are
//! served as before.

use crate::common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const GOOD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// Sends a websocket upgrade to `/subscribe` from `from` on a kept-alive connection (no
/// `Connection: close` of its own) and reads until the daemon closes it: the whole answer.
async fn upgrade_until_closed(from: IpAddr, to: std::net::SocketAddr) -> String {
    let mut stream = connect_from(from, to).await.expect("connect");
    let request = format!(
        "GET /subscribe HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    // A hang bound: the hold is 8 s, the handshake deadline 20 s.
    tokio::time::timeout(Duration::from_secs(25), stream.read_to_end(&mut raw))
        .await
        .expect("the daemon closed the refused connection")
        .expect("read the answer");
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_held_closed_and_capped_per_address() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(2000, 1.0).await;
    let serve = Serve::start(
        &upstream,
        &[
            "--max-per-ip",
            "1",
            "--retry-after-secs",
            "30",
            "--refusal-hold-ms",
            "8000",
            "--max-held-refusals-per-ip",
            "2",
            "--handshake-timeout-secs",
            "20",
        ],
        None,
    )
    .await;
    // The attacker's one subscriber takes its address's only slot: every further
    // subscribe from it is refused (429, Retry-After).
    let _held_open = ws_from(ATTACKER, serve.addr, "/subscribe")
        .await
        .expect("the attacker's first subscriber");
    let to = serve.addr;
    let refused: Vec<_> = (0..2)
        .map(|_| tokio::spawn(upgrade_until_closed(ATTACKER, to)))
        .collect();
    // Both refusals are held (not answered) until the hold ends.
    let deadline = Instant::now() + LIMIT;
    loop {
        let metrics = serve.metrics().await;
        let held = metric(&metrics, "sluice_refusals_held{listener=\"subscriber\"");
        if held == Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two refusals held, but the gauge says {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused.iter().all(|task| !task.is_finished()),
        "a held refusal was answered before its hold ended"
    );
    // The address has its cap held: its next connection is refused before its request
    // is read, with a 429 and Retry-After of its own.
    let at_accept = upgrade_until_closed(ATTACKER, to).await;
    assert!(at_accept.starts_with("HTTP/1.1 429"), "{at_accept}");
    assert!(at_accept.contains("retry-after:"), "{at_accept}");
    // Another address is served meanwhile.
    let good = ws_from(GOOD, serve.addr, "/subscribe").await;
    assert!(
        good.is_ok(),
        "another address was refused: {:?}",
        good.err()
    );
    for task in refused {
        let answer = task.await.expect("refused client");
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        let head = answer.to_ascii_lowercase();
        assert!(head.contains("\r\nretry-after: "), "{answer}");
        // Closed by the daemon although the client asked to keep it alive.
        assert!(head.contains("\r\nconnection: close\r\n"), "{answer}");
    }
    let metrics = serve.metrics().await;
    let value = |prefix: &str| metric(&metrics, prefix).unwrap_or(-1.0);
    assert_eq!(value("sluice_refusals_held{listener=\"subscriber\""), 0.0);
    assert_eq!(
        value("sluice_refusals_total{listener=\"subscriber\",answered=\"held\""),
        2.0
    );
    assert_eq!(
        value("sluice_connections_refused_total{listener=\"subscriber\",reason=\"held_per_ip\""),
        1.0
    );
    assert_eq!(
        value("sluice_admission_refused_total{reason=\"rate\""),
        2.0,
        "the two held refusals were admission's (per-IP connections)"
    );
    assert_eq!(value("sluice_limit{setting=\"refusal_hold_ms\""), 8000.0);
    assert_eq!(
        value("sluice_limit{setting=\"max_held_refusals_per_ip\""),
        2.0
    );
}

/// A connection refused before its request is read still gets its answer when that
/// request is already waiting, unread, as the refusal is written: while the daemon is
/// stopped the clients connect (the kernel completes the handshake) and send a 40 KiB
/// request head, more than a close at once reads (16 KiB), so closing at once would leave
/// bytes unread and reset the connection (the client reads the 429, then ECONNRESET).
/// The daemon instead writes the answer, shuts its write side and reads the head to its
/// end before closing (`--refusal-linger-ms`): each client reads the whole 429 and a
/// clean end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_gets_its_answer_though_its_request_waits_unread() {
    let _machine = crate::exclusive::shared().await;
    let upstream = slow_upstream(200, 1.0).await;
    let serve = Serve::start(&upstream, &["--max-pending-per-ip", "1"], None).await;
    // The address's one pending slot: a head never finished.
    let mut pending = connect_from(ATTACKER, serve.addr).await.expect("connect");
    pending
        .write_all(b"GET /subscribe HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("a partial head");
    let deadline = Instant::now() + LIMIT;
    loop {
        let metrics = serve.metrics().await;
        let now = metric(
            &metrics,
            "sluice_connections_pending{listener=\"subscriber\"",
        );
        if now == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "pending connections: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = format!(
        "GET /event/1 HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    // Every request is in the daemon's socket before it accepts the connection.
    serve.signal("-STOP");
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stream = connect_from(ATTACKER, serve.addr).await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                serve.signal("-CONT");
                panic!("connect while the daemon is stopped: {e}");
            }
        };
        if let Err(e) = stream.write_all(request.as_bytes()).await {
            serve.signal("-CONT");
            panic!("send the request while the daemon is stopped: {e}");
        }
        clients.push(stream);
    }
    serve.signal("-CONT");
    for (i, mut stream) in clients.into_iter().enumerate() {
        let mut raw = Vec::new();
        let read = tokio::time::timeout(LIMIT, stream.read_to_end(&mut raw))
            .await
            .expect("the daemon closed the refused connection");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            read.is_ok() && text.starts_with("HTTP/1.1 429"),
            "client {i}: {read:?} after {} bytes: {text}",
            raw.len()
        );
        assert!(text.contains("retry-after:"), "client {i}: {text}");
    }
    // Each lingering close ends once it has read its head (the client saw the end of
    // the stream before that, when the write side was shut).
    let lingered =
        "sluice_connections_refused_closes_total{listener=\"subscriber\",closed=\"lingered\"";
    let deadline = Instant::now() + LIMIT;
    let metrics = loop {
        let metrics = serve.metrics().await;
        let now = metric(&metrics, lingered);
        if now == Some(4.0) {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "lingering closes that read their head: {now:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let value = |prefix: &str| metric(&metrics, prefix).unwrap_or(-1.0);
    assert_eq!(
        value("sluice_connections_refused_total{listener=\"subscriber\",reason=\"pending_per_ip\""),
        4.0
    );
    assert_eq!(
        value("sluice_refusals_lingering{listener=\"subscriber\""),
        0.0
    );
    assert_eq!(value("sluice_limit{setting=\"refusal_linger_ms\""), 1000.0);
    drop(pending);
}
