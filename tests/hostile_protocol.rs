//! Small hostile-client cases on the wire: websocket protocol violations are answered with
//! the right close code and counted as protocol errors (not as a peer that left), a
//! handshake without a proper `Sec-WebSocket-Key` is refused with 400, and a parameter
//! given twice counts with its last value on every endpoint.

mod wire_common;

use std::net::SocketAddr;
use std::time::Duration;

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
