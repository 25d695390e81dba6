//! Websocket clients: connecting (with a subprotocol, a small receive buffer, or refused),
//! reading, sending.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use super::{Ws, LIMIT, QUIET};

/// A URL short enough for a panic message.
pub fn short(url: &str) -> &str {
    match url.char_indices().nth(160) {
        Some((i, _)) => &url[..i],
        None => url,
    }
}

/// Connects, failing the test on refusal or timeout.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {} timed out", short(url)))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", short(url)));
    ws
}

/// Connects offering `protocol` as the websocket subprotocol; returns the response headers.
pub async fn connect_protocol(url: &str, protocol: &str) -> (Ws, HeaderMap) {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, response) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect to {}: {e}", short(url)));
    (ws, response.headers().clone())
}

/// A receive buffer small next to the streams the tests send (megabytes), so a client that
/// stops reading pushes back on the server quickly, yet at least one loopback segment
/// (64 KiB MSS): a window below one segment leaves the sender on TCP's persist timer, whose
/// backoff stalls even a reading client for seconds, which no real client would see.
pub const SMALL_RCVBUF: u32 = 64 * 1024;

/// Connects through a socket with a small receive buffer, so that a client that stops
/// reading pushes back on the server quickly.
pub async fn connect_small_buffer(url: &str, rcvbuf: u32) -> Ws {
    let parsed = url::Url::parse(url).unwrap();
    let addr: SocketAddr = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap())
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    let stream = tokio::time::timeout(LIMIT, socket.connect(addr))
        .await
        .expect("tcp connect timed out")
        .unwrap();
    let (ws, _) = tokio::time::timeout(
        LIMIT,
        tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake timed out")
    .unwrap_or_else(|e| panic!("connect to {}: {e}", short(url)));
    ws
}

/// A refused handshake: status, headers and body text. Panics if the upgrade succeeds.
pub async fn refused(url: &str) -> (u16, HeaderMap, String) {
    match try_connect(url).await {
        Ok(_) => panic!("{} was accepted; expected a refusal", short(url)),
        Err(r) => r,
    }
}

/// Connects, or returns the refusal (status, headers, body).
pub async fn try_connect(url: &str) -> Result<Ws, (u16, HeaderMap, String)> {
    let result = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {} timed out", short(url)));
    match result {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, headers, body))
        }
        Err(e) => panic!("connect to {}: unexpected error {e}", short(url)),
    }
}

/// What a read yielded.
#[derive(Debug)]
pub enum Got {
    Text(String),
    Binary(Bytes),
    Closed(Option<CloseFrame>),
    /// The stream ended without a close frame, or with an error.
    Gone(String),
    Timeout,
}

/// The next data or close message within `wait` (pings and pongs are skipped).
pub async fn next(ws: &mut Ws, wait: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Got::Timeout,
            Ok(None) => return Got::Gone("end of stream".into()),
            Ok(Some(Err(e))) => return Got::Gone(e.to_string()),
            Ok(Some(Ok(message))) => match message {
                Message::Text(t) => return Got::Text(t.as_str().to_string()),
                Message::Binary(b) => return Got::Binary(b),
                Message::Close(frame) => return Got::Closed(frame),
                _ => continue,
            },
        }
    }
}

/// Counts binary messages until something else comes (each read within `wait`): the
/// count, and what ended it. For a server that is expected to close a stalled reader.
pub async fn count_binary_until_end(ws: &mut Ws, wait: Duration) -> (usize, Got) {
    let mut received = 0usize;
    loop {
        match next(ws, wait).await {
            Got::Binary(_) => received += 1,
            other => return (received, other),
        }
    }
}

/// Reads exactly `n` text messages as JSON, failing on anything else or on timeout.
pub async fn read_json(ws: &mut Ws, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while out.len() < n {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Text(t) => out.push(serde_json::from_str(&t).unwrap()),
            other => panic!("after {} of {n} messages: got {other:?}", out.len()),
        }
    }
    out
}

/// Reads exactly `n` text messages, raw.
pub async fn read_texts(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while out.len() < n {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Text(t) => out.push(t),
            other => panic!("after {} of {n} messages: got {other:?}", out.len()),
        }
    }
    out
}

/// Reads exactly `n` binary messages.
pub async fn read_binaries(ws: &mut Ws, n: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while out.len() < n {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Binary(b) => out.push(b),
            other => panic!("after {} of {n} messages: got {other:?}", out.len()),
        }
    }
    out
}

/// Asserts nothing but pings arrives for [`QUIET`].
pub async fn assert_quiet(ws: &mut Ws, what: &str) {
    match next(ws, QUIET).await {
        Got::Timeout => {}
        other => panic!("{what}: expected nothing more, got {other:?}"),
    }
}

/// Sends a text message.
pub async fn send_text(ws: &mut Ws, text: String) {
    tokio::time::timeout(LIMIT, ws.send(Message::text(text)))
        .await
        .expect("send timed out")
        .expect("send");
}

/// Reads until a close frame (or the end of the stream), returning the messages before it.
pub async fn read_until_close(ws: &mut Ws, max: usize) -> (Vec<Got>, Option<CloseFrame>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    for _ in 0..max {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Closed(frame) => return (seen, frame),
            Got::Gone(e) => panic!("stream ended without a close frame: {e}"),
            Got::Timeout => panic!("no close frame within {LIMIT:?}"),
            other => seen.push(other),
        }
    }
    panic!("no close frame within {max} messages")
}

/// `"key":<number>` scanned out of a JSON text without parsing the whole thing.
pub fn scan_u64(text: &str, key: &str) -> Option<u64> {
    let needle = format!("\"{key}\":");
    let at = text.find(&needle)? + needle.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}
