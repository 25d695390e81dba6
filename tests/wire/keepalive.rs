//! Subscriber keepalive, end to end over real sockets: with `--ping-interval-secs 1
//! --pong-timeout-secs 2`, a client that reads (and so answers every ping) stays connected
//! for seconds past the pong timeout, while a client that completed the websocket upgrade
//! and then went silent (never reads, never writes) is pinged, then dropped as `peer_dead`
//! with close 1001 "no pong" within a few seconds, and its admission slot is released.
//! The upstream is the small corpus, fully ingested before the clients connect, so the
//! live streams are idle: the silent client cannot be dropped by the write timeout.

use crate::wire_common;

use std::time::Duration;

use sluice::upstream::replay::Speed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire_common::*;

/// A websocket upgrade on a raw socket; returns the socket and any bytes read past the
/// response head. Panics unless the server answers 101.
async fn raw_upgrade(env: &Env, path: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(env.addr()).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        env.addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(LIMIT, stream.read(&mut buf))
            .await
            .expect("upgrade response timed out")
            .unwrap();
        assert!(n > 0, "connection closed during the upgrade");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    (stream, raw[head_end..].to_vec())
}

/// Server frames (unmasked) as (opcode, payload); panics on a truncated frame.
fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "truncated frame header");
        let opcode = bytes[0] & 0x0f;
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, skip) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert!(bytes.len() >= skip + len, "truncated frame payload");
        out.push((opcode, bytes[skip..skip + len].to_vec()));
        bytes = &bytes[skip + len..];
    }
    out
}

fn peer_dead(env: &Env) -> u64 {
    let ended = env.daemon.app.stats.ended.lock();
    ended.get("peer_dead").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_by_the_pong_timeout_and_a_reading_one_is_not() {
    let _machine = crate::exclusive::alone().await;
    let env = Env::start_with(
        corpus(),
        Speed::Max,
        false,
        false,
        &["--ping-interval-secs", "1", "--pong-timeout-secs", "2"],
        |_| {},
    )
    .await;
    env.wait_all_ingested().await;

    // A client that reads, and so answers pings, for 5 s: more than twice the pong timeout.
    let mut live = connect(&env.url("/subscribe")).await;
    let live_task = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let wait = until.saturating_duration_since(tokio::time::Instant::now());
            match next(&mut live, wait).await {
                Got::Timeout => return live,
                Got::Text(_) | Got::Binary(_) => continue,
                other => panic!("the reading client was dropped: {other:?}"),
            }
        }
    });

    // A client that upgrades, then never reads nor writes again.
    let (mut silent, mut received) = raw_upgrade(&env, "/subscribe").await;
    let connected = tokio::time::Instant::now();
    assert_eq!(env.daemon.app.admission.admitted(), 2);
    while peer_dead(&env) == 0 {
        assert!(
            connected.elapsed() < Duration::from_secs(6),
            "the silent client was not dropped within 6 s (pong timeout 2 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped_after = connected.elapsed();
    assert!(
        dropped_after >= Duration::from_millis(1500),
        "the silent client was dropped after {dropped_after:?}, before the pong timeout"
    );

    // Only now read what the server sent it: pings, then close 1001 "no pong", then the end.
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LIMIT, silent.read(&mut buf)).await {
            Err(_) => panic!("the server did not close the silent client's connection"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
    let frames = frames(&received);
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    assert!(pings >= 1, "no ping before the drop: {frames:?}");
    let (op, payload) = frames.last().expect("no frames at all");
    assert_eq!(*op, 0x8, "the last frame is not a close: {frames:?}");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    assert_eq!(&payload[2..], b"no pong");

    // The reading client outlived the silent one by seconds and is still admitted.
    let mut live = live_task.await.unwrap();
    assert_eq!(peer_dead(&env), 1, "the reading client was counted dead");
    assert_eq!(env.daemon.app.admission.admitted(), 1);
    assert_quiet(&mut live, "the reading client").await;
    println!("silent client dropped after {dropped_after:?}");
    env.stop().await;
}
