//! Small hostile-client cases on the wire: websocket protocol violations are answered with
//! the right close code and counted as protocol errors (not as a peer that left), a
//! handshake without a proper `Sec-WebSocket-Key` is refused with 400, a parameter given
//! twice counts with its last value on every endpoint, a URI too long gets a 414 that
//! names the way to send what did not fit, and a dictionary not trained yet is a 503 with
//! `Retry-After`.

use crate::wire_common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice::upstream::replay::Speed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire_common::*;

/// A raw upgrade request to `path` with `key`; the stream and the response head.
async fn raw_upgrade(addr: SocketAddr, path: &str, key: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(LIMIT, stream.read(&mut byte))
            .await
            .expect("response head timed out")
            .unwrap();
        assert_eq!(n, 1, "closed before the response head ended: {head:?}");
        head.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// A frame from the client: masked unless `masked` is false.
fn client_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    if masked {
        frame.push(0x80 | payload.len() as u8);
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        frame.push(payload.len() as u8);
        frame.extend_from_slice(payload);
    }
    frame
}

/// Reads server frames until a close frame: its code, or `None` if the connection ended
/// without one.
async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    let work = async {
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.ok()?;
            let len = match head[1] & 0x7f {
                126 => u64::from(stream.read_u16().await.ok()?),
                127 => stream.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("no close within the limit")
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_get_1002_or_1007_and_count_as_protocol_errors() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let cases: [(&str, Vec<u8>, u16); 3] = [
        ("an unmasked frame", client_frame(0x1, b"{}", false), 1002),
        (
            "text that is not UTF-8",
            client_frame(0x1, &[0x7b, 0xff, 0xfe, 0x7d], true),
            1007,
        ),
        (
            "close code 999",
            client_frame(0x8, &999u16.to_be_bytes(), true),
            1002,
        ),
    ];
    for (what, frame, want) in cases {
        let (mut stream, head) = raw_upgrade(env.addr(), "/subscribe", KEY).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
        stream.write_all(&frame).await.unwrap();
        assert_eq!(close_code(&mut stream).await, Some(want), "{what}");
    }
    // A clean close is still a peer that left.
    let (mut stream, _) = raw_upgrade(env.addr(), "/subscribe", KEY).await;
    stream
        .write_all(&client_frame(0x8, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut stream).await,
        Some(1000),
        "the close is echoed"
    );
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let ended = env.daemon.app.stats.ended.lock().clone();
        if ended.get("protocol_error") == Some(&3) && ended.get("peer_closed") == Some(&1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions ended as {ended:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_malformed_websocket_key_is_refused_with_400() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    for key in ["", "abc", "dGhlIHNhbXBsZSBub25jZQ"] {
        let (_, head) = raw_upgrade(env.addr(), "/subscribe", key).await;
        assert!(head.starts_with("HTTP/1.1 400"), "key {key:?}: {head}");
    }
    let (_, head) = raw_upgrade(env.addr(), "/subscribe", KEY).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_given_twice_counts_with_its_last_value() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let (status, headers, _) = http_get(env.addr(), "/event/1?wire=raw&wire=v2").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let (status, headers, _) = http_get(env.addr(), "/event/1?wire=v2&wire=raw").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/vnd.ipld.dag-cbor")
    );
    // Subscribe endpoints: the last `cursor` wins (v2 cursors are seqs, inclusive).
    let newest = env.daemon.log.reader().newest_seq();
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={newest}&cursor=1"))).await;
    let first = read_json(&mut ws, 1).await;
    assert_eq!(first[0]["payload"]["seq"].as_u64(), Some(1), "{first:?}");
    env.stop().await;
}

/// `n` DIDs as repeated `param=` query pairs.
fn did_params(param: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{param}=did:plc:{i:024}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_too_long_gets_a_414_that_names_the_way() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    // What fits is taken: 1,400 v1 DIDs make a URI of ~61 KiB.
    let fits = format!("/subscribe?{}", did_params("wantedDids", 1400));
    assert!(fits.len() < sluice::http::listen::MAX_URI_BYTES);
    let (_, head) = raw_upgrade(env.addr(), &fits, KEY).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let cases = [
        ("/subscribe", "wantedDids", "options_update"),
        (V2_PATH, "dids", "several connections"),
        (
            "/xrpc/com.atproto.sync.subscribeRepos",
            "wantedCollections",
            "wantedCollections",
        ),
    ];
    for (path, param, way) in cases {
        let uri = format!("{path}?{}", did_params(param, 2000));
        let (status, headers, body) = http_get(env.addr(), &uri).await;
        assert_eq!(status, 414, "{path}");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        let answer: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
        assert_eq!(answer["error"], "URITooLong", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(way), "{path}: {message}");
    }
    let stats = env
        .daemon
        .app
        .connections
        .stats(sluice::http::listen::Side::Subscriber);
    assert_eq!(stats.uri_too_long.load(Ordering::Relaxed), 3);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dictionary_still_being_trained_is_a_503_with_retry_after() {
    let _machine = crate::exclusive::shared().await;
    let env = Env::start_with(corpus(), Speed::Max, false, true, &[], |_| {}).await;
    // As while the background training runs (it is not started: it is marked under way).
    env.daemon
        .app
        .zstd_v1_training
        .store(true, Ordering::Release);
    // --retry-after-secs 5 by default, plus up to as much again of jitter.
    let in_range = |r: Option<u64>| r.is_some_and(|r| (5..=10).contains(&r));
    let (status, headers, _) = http_get(env.addr(), "/zstd-dictionary").await;
    assert_eq!(status, 503);
    let retry = header(&headers, "retry-after").and_then(|r| r.parse().ok());
    assert!(in_range(retry), "{headers:?}");
    match try_connect(&env.url("/subscribe?compress=true")).await {
        Err((503, headers, _)) => {
            let retry = headers
                .get("retry-after")
                .and_then(|r| r.to_str().ok())
                .and_then(|r| r.parse().ok());
            assert!(in_range(retry), "{headers:?}");
        }
        Err(other) => panic!("compress=true before the dictionary: {other:?}"),
        Ok(_) => panic!("compress=true was upgraded before the dictionary exists"),
    }
    env.stop().await;
}
