//! The subscriber websocket: the upgrade handshake and a socket whose data frames are
//! written straight from the shared event payloads.
//!
//! Owns the server side of RFC 6455 for subscribers: validating the upgrade request,
//! answering it, and writing data frames with one `writev` per batch (a frame header of a
//! few bytes per message, the payload itself borrowed from the event every subscriber
//! shares). tungstenite still reads every client frame (unmasking, fragments, size limits,
//! automatic pongs) and writes the control frames (ping, close). Also owns the connection
//! under the websocket ([`Conn`]), which the session and the fan-out dispatcher's direct
//! writes share through one lock.
//! Must never: copy an event payload per subscriber, let a control frame from
//! tungstenite's buffer and a data frame from the batch interleave on the wire, or start a
//! direct write while another writer's frame is half written.
//!
//! Why not axum's `WebSocket`: it owns the stream behind tungstenite, which copies every
//! message into its write buffer and frames it per subscriber (DECISIONS, "Subscriber
//! writes"). The handshake here does what axum's does for HTTP/1.1; HTTP/2 websockets are
//! not served (the daemon speaks HTTP/1.1 only).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::fanout::Direct;
use crate::http::budget::ConnMemory;
use crate::http::listen::Counted;
use crate::wire::Frame;

/// The websocket opcode a frame goes out with.
fn opcode(frame: &Frame) -> OpCode {
    match frame {
        Frame::Text(_) => OpCode::Data(Data::Text),
        Frame::Binary(_) => OpCode::Data(Data::Binary),
    }
}

/// A validated websocket upgrade request (HTTP/1.1 only), extracted like axum's own
/// `WebSocketUpgrade` so a handler can still refuse with a plain HTTP response.
pub struct Upgrade {
    key: HeaderValue,
    requested_protocols: Vec<HeaderValue>,
    protocol: Option<HeaderValue>,
    config: WebSocketConfig,
    on_upgrade: hyper::upgrade::OnUpgrade,
    /// The connection's charge in the client-memory budget (set by `http::listen`).
    memory: Option<Arc<ConnMemory>>,
    /// The client's address (set by `http::listen`).
    peer: Option<std::net::SocketAddr>,
}

/// Why a request is not a websocket upgrade: an HTTP 4xx naming the problem.
#[derive(Debug)]
pub struct NotAnUpgrade(StatusCode, &'static str);

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(NotAnUpgrade(
                StatusCode::METHOD_NOT_ALLOWED,
                "websocket upgrades use GET",
            ));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Connection header must include 'upgrade'",
            ));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Upgrade header must be 'websocket'",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13",
            ));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key header missing",
            ))?;
        if !valid_key(key.as_bytes()) {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ));
        }
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotAnUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "connection cannot be upgraded",
            ))?;
        let requested_protocols = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .filter_map(|name| HeaderValue::from_bytes(name.trim_ascii()).ok())
            .collect();
        let memory = parts.extensions.get::<Arc<ConnMemory>>().cloned();
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0);
        Ok(Self {
            key,
            requested_protocols,
            protocol: None,
            config: WebSocketConfig::default(),
            on_upgrade,
            memory,
            peer,
        })
    }
}

impl Upgrade {
    /// Settings for reading client frames (buffer size, message and frame limits).
    pub fn config(mut self, config: WebSocketConfig) -> Self {
        self.config = config;
        self
    }

    /// Selects the first of `protocols` the client asked for, if any.
    pub fn protocols(mut self, protocols: impl IntoIterator<Item = &'static str>) -> Self {
        self.protocol = protocols
            .into_iter()
            .map(HeaderValue::from_static)
            .find(|p| self.requested_protocols.contains(p));
        self
    }

    /// Answers 101 and runs `callback` with the socket once hyper hands the connection over.
    pub fn on_upgrade<C, Fut>(self, callback: C) -> Response
    where
        C: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Upgrade {
            key,
            protocol,
            config,
            on_upgrade,
            memory,
            peer,
            ..
        } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let stream = WebSocketStream::from_raw_socket(
                        Conn::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    if let Some(memory) = &memory {
                        memory.arm();
                    }
                    let mut socket = Socket::new(stream);
                    socket.memory = memory;
                    socket.peer = peer;
                    callback(socket).await;
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(protocol) = protocol {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    }
}

/// Whether a `Sec-WebSocket-Key` is what RFC 6455 (4.2.1) asks for: 16 bytes in base64.
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|raw| raw.len() == 16)
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The upgraded connection under a subscriber's websocket, shared by its session
/// (tungstenite's reads, pongs, pings and closes, and [`Socket::write_frames`]) and the
/// dispatcher's direct writes ([`Conn::try_write_frames`]). Every read and write takes
/// its one lock, so only one writer at a time touches the socket, and a write never
/// starts while another one's frame is half on the wire.
#[derive(Clone)]
pub struct Conn {
    shared: Arc<parking_lot::Mutex<ConnState>>,
}

struct ConnState {
    io: Io,
    /// What hyper read past the upgrade request (the client's first frames): read first.
    leftover: Bytes,
    /// The unwritten rest of a direct write, in order: written before anything else.
    tail: VecDeque<Bytes>,
    /// The last write through the session's path (tungstenite's buffer or
    /// `write_frames`) ended inside a frame, whose rest its writer still holds.
    mid_frame: bool,
    /// The session is ending: no more direct writes.
    closed: bool,
}

/// The socket under the upgrade: the listener's counted TCP stream, which takes a write
/// without a task context, or (for a connection served some other way) hyper's upgraded
/// stream, which the dispatcher does not write to.
enum Io {
    Listener(Counted),
    Other(TokioIo<hyper::upgrade::Upgraded>),
}

impl Conn {
    fn new(upgraded: hyper::upgrade::Upgraded) -> Self {
        let (io, leftover) = match upgraded.downcast::<TokioIo<Counted>>() {
            Ok(parts) => (Io::Listener(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => (Io::Other(TokioIo::new(upgraded)), Bytes::new()),
        };
        Conn {
            shared: Arc::new(parking_lot::Mutex::new(ConnState {
                io,
                leftover,
                tail: VecDeque::new(),
                mid_frame: false,
                closed: false,
            })),
        }
    }

    /// Whether the dispatcher can write to this connection directly at all.
    pub fn takes_direct(&self) -> bool {
        matches!(self.shared.lock().io, Io::Listener(_))
    }

    /// No more direct writes: the session writes its last frames now.
    pub fn close_direct(&self) {
        self.shared.lock().closed = true;
    }

    /// Writes `frames` now if the socket takes them without blocking: all of them
    /// ([`Direct::Written`]), part of them with the rest kept to be written before
    /// anything else ([`Direct::Handed`]; the session flushes it), or nothing
    /// ([`Direct::Refused`]: the socket would block, is closing, is not a plain TCP
    /// stream, or another write is under way). `headers` is scratch space.
    pub fn try_write_frames(&self, frames: &[Frame], headers: &mut Vec<u8>) -> Direct {
        let mut state = self.shared.lock();
        let state = &mut *state;
        let Io::Listener(tcp) = &state.io else {
            return Direct::Refused;
        };
        if state.closed || state.mid_frame || !state.tail.is_empty() {
            return Direct::Refused;
        }
        if format_headers(frames, headers).is_err() {
            return Direct::Refused;
        }
        let (mut inline, mut spilled) = ([IoSlice::new(&[]); INLINE_SLICES], Vec::new());
        let slices = slices_of(frames, headers, &mut inline, &mut spilled);
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let written = match tcp.try_write_vectored(slices) {
            Ok(n) => n,
            // Would block, or failed: the session's own write meets the failure.
            Err(_) => return Direct::Refused,
        };
        if written == 0 {
            return Direct::Refused;
        }
        if written == total {
            return Direct::Written;
        }
        // The rest, without copying a payload: header bytes copied, payloads sliced.
        let mut skip = written;
        let mut at = 0;
        for frame in frames {
            let header_len = frame_header(frame).len(frame.len() as u64);
            let header = &headers[at..at + header_len];
            at += header_len;
            if skip >= header.len() {
                skip -= header.len();
            } else {
                state
                    .tail
                    .push_back(Bytes::copy_from_slice(&header[skip..]));
                skip = 0;
            }
            let payload = frame.payload();
            if skip >= payload.len() {
                skip -= payload.len();
            } else {
                state.tail.push_back(payload.slice(skip..));
                skip = 0;
            }
        }
        Direct::Handed
    }
}

impl ConnState {
    /// Writes the rest of a direct write, if any: ready when none is left.
    fn poll_tail(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tail.is_empty() {
            let mut slices = [IoSlice::new(&[]); INLINE_SLICES];
            let n = self.tail.len().min(INLINE_SLICES);
            for (slot, bytes) in slices.iter_mut().zip(self.tail.iter()) {
                *slot = IoSlice::new(bytes);
            }
            let mut written = match &mut self.io {
                Io::Listener(io) => ready!(Pin::new(io).poll_write_vectored(cx, &slices[..n]))?,
                Io::Other(io) => ready!(Pin::new(io).poll_write_vectored(cx, &slices[..n]))?,
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while let Some(front) = self.tail.front_mut() {
                if written < front.len() {
                    bytes::Buf::advance(front, written);
                    break;
                }
                written -= front.len();
                self.tail.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }

    fn io(&mut self) -> Pin<&mut dyn AsyncReadWrite> {
        match &mut self.io {
            Io::Listener(io) => Pin::new(io),
            Io::Other(io) => Pin::new(io),
        }
    }
}

/// What the session's side needs of the socket under a [`Conn`].
trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncReadWrite for T {}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if !state.leftover.is_empty() {
            let n = state.leftover.len().min(buf.remaining());
            buf.put_slice(&state.leftover.split_to(n));
            return Poll::Ready(Ok(()));
        }
        state.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        ready!(state.poll_tail(cx))?;
        let poll = state.io().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            state.mid_frame = n < buf.len();
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        ready!(state.poll_tail(cx))?;
        let poll = state.io().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            state.mid_frame = n < bufs.iter().map(|b| b.len()).sum::<usize>();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        ready!(state.poll_tail(cx))?;
        state.io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        ready!(state.poll_tail(cx))?;
        state.io().poll_shutdown(cx)
    }
}

/// The upgraded connection of one subscriber.
pub struct Socket<S = Conn> {
    stream: WebSocketStream<S>,
    /// Frame headers of the batch being written; kept to reuse its allocation.
    headers: Vec<u8>,
    /// What this connection is charged in the client-memory budget, if anything.
    memory: Option<Arc<ConnMemory>>,
    /// The client's address, when known.
    peer: Option<std::net::SocketAddr>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    pub fn new(stream: WebSocketStream<S>) -> Self {
        Self {
            stream,
            headers: Vec::new(),
            memory: None,
            peer: None,
        }
    }

    /// The client's address, when known.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// The connection's charge in the client-memory budget, if it has one.
    pub fn memory(&self) -> Option<&Arc<ConnMemory>> {
        self.memory.as_ref()
    }

    /// The next message from the client; tungstenite answers pings on its own.
    pub async fn recv(&mut self) -> Option<Result<Message, WsError>> {
        self.stream.next().await
    }

    /// Writes out what tungstenite has queued (e.g. the answer to a close frame).
    pub async fn flush(&mut self) -> Result<(), WsError> {
        self.stream.flush().await
    }

    /// Sends a ping.
    pub async fn ping(&mut self) -> Result<(), WsError> {
        self.stream.send(Message::Ping(Bytes::new())).await
    }

    /// Sends a close frame with `code` and `reason` (cut to the protocol's 123 bytes).
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        let frame = CloseFrame {
            code: code.into(),
            reason: truncate_reason(reason).into_owned().into(),
        };
        self.stream.send(Message::Close(Some(frame))).await
    }

    /// Writes `frames` in order, one `writev` per call the kernel accepts.
    ///
    /// Anything tungstenite still holds (a pong it queued while reading) is flushed first,
    /// so a control frame is never cut by a data frame. Not cancel-safe: a write abandoned
    /// half-way leaves a partial frame on the wire, so a session that times out here must
    /// end the connection (it does, with `WriteTimeout`).
    pub async fn write_frames(&mut self, frames: &[Frame]) -> Result<(), WsError> {
        self.stream.flush().await?;
        format_headers(frames, &mut self.headers)?;
        let (mut inline, mut spilled) = ([IoSlice::new(&[]); INLINE_SLICES], Vec::new());
        let slices = slices_of(frames, &self.headers, &mut inline, &mut spilled);
        write_all_vectored(self.stream.get_mut(), slices).await?;
        Ok(())
    }
}

impl Socket<Conn> {
    /// The connection under the websocket, for the dispatcher's direct writes.
    pub fn conn(&self) -> &Conn {
        self.stream.get_ref()
    }
}

/// Formats the header of each of `frames`, in order, into `headers`.
fn format_headers(frames: &[Frame], headers: &mut Vec<u8>) -> Result<(), WsError> {
    headers.clear();
    for frame in frames {
        frame_header(frame).format(frame.len() as u64, headers)?;
    }
    Ok(())
}

/// The slices of `frames` in wire order (headers formatted by [`format_headers`]). At
/// live rates a write carries one to a few messages: their slices live in `inline`, on
/// the caller's stack, so such a write allocates nothing; more go in `spilled`.
fn slices_of<'a, 'b>(
    frames: &'a [Frame],
    headers: &'a [u8],
    inline: &'b mut [IoSlice<'a>; INLINE_SLICES],
    spilled: &'b mut Vec<IoSlice<'a>>,
) -> &'b mut [IoSlice<'a>] {
    if frames.len() * 2 <= INLINE_SLICES {
        let n = fill_slices(frames, headers, |i, s| inline[i] = s);
        &mut inline[..n]
    } else {
        spilled.reserve_exact(frames.len() * 2);
        fill_slices(frames, headers, |_, s| spilled.push(s));
        spilled
    }
}

/// Slices a write of up to this many (two per message: header, payload) keeps on the stack.
const INLINE_SLICES: usize = 16;

/// Hands `put` the slices of `frames` in wire order (each header from `headers`, where they
/// were formatted in the same order, then the payload unless empty); how many there were.
fn fill_slices<'a>(
    frames: &'a [Frame],
    headers: &'a [u8],
    mut put: impl FnMut(usize, IoSlice<'a>),
) -> usize {
    let (mut n, mut at) = (0, 0);
    for frame in frames {
        let header_len = frame_header(frame).len(frame.len() as u64);
        put(n, IoSlice::new(&headers[at..at + header_len]));
        n += 1;
        at += header_len;
        if !frame.is_empty() {
            put(n, IoSlice::new(frame.payload()));
            n += 1;
        }
    }
    n
}

/// The header of a server's (unmasked, unfragmented) frame carrying `frame`.
fn frame_header(frame: &Frame) -> FrameHeader {
    FrameHeader {
        opcode: opcode(frame),
        ..FrameHeader::default()
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let written =
            std::future::poll_fn(|cx| Pin::new(&mut *writer).poll_write_vectored(cx, slices))
                .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// Close reasons are limited to 123 bytes by the websocket protocol.
pub fn truncate_reason(reason: &str) -> Cow<'_, str> {
    if reason.len() <= 123 {
        return Cow::Borrowed(reason);
    }
    let mut cut = 123;
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(reason[..cut].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(
        capacity: usize,
    ) -> (
        Socket<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (server, client) = tokio::io::duplex(capacity);
        let server = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (Socket::new(server), client)
    }

    fn payload(i: usize, len: usize) -> Bytes {
        Bytes::from((0..len).map(|j| (i * 31 + j) as u8).collect::<Vec<u8>>())
    }

    /// Every length encoding (7-bit, 16-bit, 64-bit), text and binary, written through a
    /// pipe far smaller than the batch so `writev` is cut mid-header and mid-payload.
    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_through_partial_writes() {
        let (mut server, mut client) = pair(333).await;
        let lengths = [0usize, 1, 125, 126, 127, 1000, 65535, 65536, 70_000, 3];
        let frames: Vec<Frame> = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                if i % 2 == 0 {
                    Frame::Binary(payload(i, len))
                } else {
                    Frame::Text(Bytes::from("é".repeat(len / 2) + &"x".repeat(len % 2)))
                }
            })
            .collect();
        let expected = frames.clone();
        let writer =
            tokio::spawn(async move { server.write_frames(&frames).await.map(|()| server) });
        for frame in &expected {
            let got = client.next().await;
            match (frame, got) {
                (Frame::Binary(want), Some(Ok(Message::Binary(got)))) => assert_eq!(&got, want),
                (Frame::Text(want), Some(Ok(Message::Text(got)))) => {
                    assert_eq!(got.as_bytes(), &want[..])
                }
                (want, got) => panic!("wanted {} bytes as {want:?}, got {got:?}", want.len()),
            }
        }
        assert!(writer.await.is_ok_and(|r| r.is_ok()));
    }

    /// Batches on both sides of `INLINE_SLICES` (slices on the stack, then in a vector),
    /// with empty messages (a header and no payload slice) among them, through a pipe that
    /// cuts the `writev`: every message arrives whole, once, in order.
    #[tokio::test]
    async fn small_and_large_batches_arrive_in_order() {
        let (mut server, mut client) = pair(97).await;
        let mut sent = Vec::new();
        let mut batches = Vec::new();
        for count in 1..=INLINE_SLICES / 2 + 2 {
            let batch: Vec<Frame> = (0..count)
                .map(|i| {
                    let n = sent.len() + i;
                    if n % 3 == 0 {
                        Frame::Binary(Bytes::new())
                    } else {
                        Frame::Binary(payload(n, 40 + n))
                    }
                })
                .collect();
            sent.extend(batch.iter().cloned());
            batches.push(batch);
        }
        let writer = tokio::spawn(async move {
            for batch in &batches {
                server.write_frames(batch).await?;
            }
            Ok::<_, WsError>(server)
        });
        for want in &sent {
            match client.next().await {
                Some(Ok(Message::Binary(got))) => assert_eq!(&got, want.payload()),
                other => panic!("wanted {} bytes, got {other:?}", want.len()),
            }
        }
        assert!(writer.await.is_ok_and(|r| r.is_ok()));
    }

    /// A pong tungstenite queued while reading goes out whole before the next data frames,
    /// even when the pipe took only part of it during the read.
    #[tokio::test]
    async fn a_queued_pong_is_not_cut_by_data_frames() {
        let (mut server, mut client) = pair(200).await;
        // Leave the server-to-client pipe room for only part of a 127-byte pong.
        let filler = Frame::Binary(payload(0, 150));
        assert!(server
            .write_frames(std::slice::from_ref(&filler))
            .await
            .is_ok());
        let ping = Message::Ping(payload(7, 125));
        assert!(client.send(ping).await.is_ok());
        assert!(client.send(Message::Text("hello".into())).await.is_ok());
        // Reading the ping queues the pong, and the pipe takes only part of it.
        assert!(matches!(server.recv().await, Some(Ok(Message::Ping(_)))));
        let hello = server.recv().await;
        assert!(matches!(hello, Some(Ok(Message::Text(t))) if t.as_str() == "hello"));
        let frames = vec![
            Frame::Binary(payload(1, 5000)),
            Frame::Text(Bytes::from_static(b"{}")),
        ];
        let writer =
            tokio::spawn(async move { server.write_frames(&frames).await.map(|()| server) });
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(client.next().await);
        }
        assert!(matches!(&got[0], Some(Ok(Message::Binary(b))) if b == filler.payload()));
        assert!(matches!(&got[1], Some(Ok(Message::Pong(p))) if *p == payload(7, 125)));
        assert!(matches!(&got[2], Some(Ok(Message::Binary(b))) if *b == payload(1, 5000)));
        assert!(matches!(&got[3], Some(Ok(Message::Text(t))) if t.as_str() == "{}"));
        assert!(writer.await.is_ok_and(|r| r.is_ok()));
    }

    #[test]
    fn keys_must_be_sixteen_bytes_of_base64() {
        // RFC 6455's own example key.
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            &b""[..],
            b"  ",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZQ=!",
            b"YWJj",
        ] {
            assert!(!valid_key(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123 && cut.len() >= 121);
        assert_eq!(truncate_reason("short"), "short");
    }
}
