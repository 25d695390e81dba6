//! Accepting connections on both listeners (subscriber and admin), before any request is
//! routed.
//!
//! Owns what a connection may cost before it is a websocket or has had its answer: the
//! header-read timeout, the deadline to upgrade (or finish, for plain HTTP), the caps on
//! connections not yet upgraded (in total and per IP), the size of a request head, the file
//! descriptors kept back for the log and the admin listener, and closing pending
//! connections at once on shutdown.
//! Must never: accept past a cap (the connection is answered 503/429 and closed, and
//! counted), read from a socket without a deadline before its upgrade, or let client
//! connections take the descriptors reserved for the log.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::budget::{self, ClientMemory, ConnMemory};
use crate::logging::RateLimited;

/// Limits of one listener, applied before a request reaches the router.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// A request head (request line and headers) must arrive whole within this long.
    pub header_read_timeout: Duration,
    /// A connection not upgraded to a websocket within this long after it was accepted is
    /// closed: a slow handshake, or a plain HTTP connection (`/event`, `/metrics`), which
    /// lives at most this long.
    pub handshake_timeout: Duration,
    /// Connections accepted and not yet upgraded, on this listener; one more is answered
    /// 503 and closed.
    pub max_pending: usize,
    /// The same, per client IP; one more is answered 429 and closed.
    pub max_pending_per_ip: usize,
    /// Largest request head buffered, bytes (hyper's read buffer; a URI is at most 64 KiB
    /// anyway): what one pending connection can make the daemon hold.
    pub max_head_bytes: usize,
    /// Kernel send buffer of each accepted socket, when set.
    pub send_buffer_bytes: Option<usize>,
    /// Base of the `Retry-After` on refusals (jitter of as much again is added).
    pub retry_after_secs: u64,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(15),
            max_pending: 1024,
            max_pending_per_ip: 64,
            max_head_bytes: 80 * 1024,
            send_buffer_bytes: None,
            retry_after_secs: 5,
        }
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Subscriber,
    Admin,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Subscriber => "subscriber",
            Side::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Subscriber => 0,
            Side::Admin => 1,
        }
    }
}

/// Why a connection was refused or closed before its upgrade, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener's cap on pending connections was reached (503).
    PendingFull,
    /// The client's IP had its share of pending connections (429).
    PendingPerIp,
    /// Accepting would have eaten into the descriptors kept for the log (503).
    FdReserve,
}

impl Refused {
    pub const ALL: [Refused; 3] = [
        Refused::PendingFull,
        Refused::PendingPerIp,
        Refused::FdReserve,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Refused::PendingFull => "pending_full",
            Refused::PendingPerIp => "pending_per_ip",
            Refused::FdReserve => "fd_reserve",
        }
    }

    fn status(self) -> (u16, &'static str, &'static str) {
        match self {
            Refused::PendingFull => (
                503,
                "Service Unavailable",
                "too many connections are being set up",
            ),
            Refused::PendingPerIp => (
                429,
                "Too Many Requests",
                "too many connections being set up from this address",
            ),
            Refused::FdReserve => (503, "Service Unavailable", "no connection capacity left"),
        }
    }

    fn index(self) -> usize {
        match self {
            Refused::PendingFull => 0,
            Refused::PendingPerIp => 1,
            Refused::FdReserve => 2,
        }
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenStats {
    /// Connections open now (upgraded or not).
    pub open: AtomicUsize,
    /// Connections accepted and not yet upgraded (or done).
    pub pending: AtomicUsize,
    pub accepted: AtomicU64,
    /// Indexed like [`Refused::ALL`].
    refused: [AtomicU64; 3],
    /// Closed because their request head did not arrive within the header-read timeout.
    pub header_timeouts: AtomicU64,
    /// Closed because they were not upgraded by the handshake deadline.
    pub handshake_timeouts: AtomicU64,
    /// Closed unfinished by a shutdown.
    pub closed_on_shutdown: AtomicU64,
    /// `accept` itself failed (e.g. EMFILE).
    pub accept_errors: AtomicU64,
}

impl ListenStats {
    pub fn refused(&self, why: Refused) -> u64 {
        self.refused[why.index()].load(Ordering::Relaxed)
    }
}

/// Connection state shared by both listeners: the descriptor budget and each listener's
/// pending connections by IP.
pub struct Connections {
    /// The process's open-file limit (soft `RLIMIT_NOFILE`), if it could be read.
    nofile: Option<u64>,
    /// Descriptors client connections never take (see [`Connections::cap`]).
    reserve: u64,
    stats: [ListenStats; 2],
    pending_by_ip: [Mutex<HashMap<IpAddr, usize>>; 2],
    /// What subscribers' connections are charged for what they make the daemon hold.
    memory: Arc<ClientMemory>,
}

impl Connections {
    /// `nofile` is the open-file limit (`None`: unknown, no descriptor cap); `reserve`
    /// descriptors are kept from subscriber connections: half for the log's open files,
    /// a quarter for admin connections, a quarter for everything else (listeners, the
    /// upstream, the runtime).
    pub fn new(nofile: Option<u64>, reserve: u64, memory: Arc<ClientMemory>) -> Self {
        Self {
            nofile,
            reserve,
            stats: Default::default(),
            pending_by_ip: Default::default(),
            memory,
        }
    }

    /// The client-memory budget of the subscriber listener.
    pub fn memory(&self) -> &Arc<ClientMemory> {
        &self.memory
    }

    pub fn stats(&self, side: Side) -> &ListenStats {
        &self.stats[side.index()]
    }

    pub fn nofile(&self) -> Option<u64> {
        self.nofile
    }

    /// Most connections `side` may hold open at once given the descriptor budget: the
    /// subscriber listener stops `reserve` short of the limit, the admin listener may use
    /// a quarter of the reserve (its own count).
    pub fn cap(&self, side: Side) -> Option<u64> {
        let nofile = self.nofile?;
        Some(match side {
            Side::Subscriber => nofile.saturating_sub(self.reserve),
            Side::Admin => self.reserve / 4,
        })
    }

    /// Takes a slot for a connection just accepted from `ip`, or says why not.
    fn open(
        self: &Arc<Self>,
        side: Side,
        ip: IpAddr,
        config: &ListenConfig,
    ) -> Result<(OpenSlot, PendingSlot), Refused> {
        let stats = self.stats(side);
        if let Some(cap) = self.cap(side) {
            if stats.open.load(Ordering::Relaxed) as u64 >= cap {
                return Err(Refused::FdReserve);
            }
        }
        {
            let mut by_ip = self.pending_by_ip[side.index()].lock();
            if stats.pending.load(Ordering::Relaxed) >= config.max_pending {
                return Err(Refused::PendingFull);
            }
            let mine = by_ip.entry(ip).or_default();
            if *mine >= config.max_pending_per_ip {
                return Err(Refused::PendingPerIp);
            }
            *mine += 1;
            stats.pending.fetch_add(1, Ordering::Relaxed);
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        Ok((
            OpenSlot {
                connections: self.clone(),
                side,
            },
            PendingSlot {
                connections: self.clone(),
                side,
                ip,
            },
        ))
    }
}

/// Held by the socket itself (it travels into the upgraded websocket): one open
/// connection of the descriptor budget.
struct OpenSlot {
    connections: Arc<Connections>,
    side: Side,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.connections
            .stats(self.side)
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Held until the connection is upgraded or closed: one pending connection.
struct PendingSlot {
    connections: Arc<Connections>,
    side: Side,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut by_ip = self.connections.pending_by_ip[self.side.index()].lock();
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.connections
            .stats(self.side)
            .pending
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises this process's soft open-file limit to its hard limit (every subscriber is a
/// socket; systemd and most shells start services with a soft limit of 1,024) and returns
/// the limit in force; `None` when it cannot be read or is unlimited.
pub fn raise_open_file_limit() -> Option<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let limit = if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    (limit != rlimit::INFINITY).then_some(limit)
}

/// A socket carrying its slot in the descriptor budget, so the slot is given back when
/// the socket closes, also after it became a websocket; on the subscriber listener it
/// also charges what is read to the client-memory budget once the socket is a websocket
/// (`ConnMemory::arm`), and fails the read that does not fit.
struct Counted {
    tcp: TcpStream,
    _slot: OpenSlot,
    memory: Option<Arc<ConnMemory>>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(memory)) = (&poll, &this.memory) {
            if let Err(why) = memory.on_read(buf.filled().len() - before) {
                return Poll::Ready(Err(budget::read_refused(why)));
            }
        }
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, with the limits of `config`
/// and the descriptor budget of `connections`. On shutdown it stops accepting, closes
/// every connection not yet upgraded at once (upgraded ones are closed by their sessions)
/// and returns when those are gone.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    side: Side,
    connections: Arc<Connections>,
    config: ListenConfig,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_head_bytes.max(8192));
    // Held by every connection task: `closed()` resolves once all have ended.
    let (done_tx, done_rx) = watch::channel(());
    let mut accept_log = RateLimited::new(5, Duration::from_secs(10));
    let stats = connections.stats(side);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|&s| s) => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if let (true, suppressed) = accept_log.check() {
                    tracing::warn!(listener = side.as_str(), error = %e, suppressed, "accept failed");
                }
                // Out of descriptors or memory: accepting again at once would spin.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = shutdown.wait_for(|&s| s) => break,
                }
                continue;
            }
        };
        let (open, pending) = match connections.open(side, peer.ip(), &config) {
            Ok(slots) => slots,
            Err(why) => {
                stats.refused[why.index()].fetch_add(1, Ordering::Relaxed);
                refuse(tcp, why, config.retry_after_secs);
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        if let Some(bytes) = config.send_buffer_bytes {
            if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(bytes) {
                tracing::debug!(error = %e, "cannot set the send buffer");
            }
        }
        let memory = (side == Side::Subscriber).then(|| connections.memory.connection(peer.ip()));
        let io = TokioIo::new(Counted {
            tcp,
            _slot: open,
            memory: memory.clone(),
        });
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(memory) = &memory {
                request.extensions_mut().insert(memory.clone());
            }
            let mut router = router.clone();
            tower_service::Service::call(&mut router, request)
        });
        let connection = http.serve_connection(io, service).with_upgrades();
        let mut shutdown = shutdown.clone();
        let done = done_rx.clone();
        let deadline = config.handshake_timeout;
        let connections = connections.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                // Done: served and closed, or upgraded (the socket now belongs to the
                // websocket session, which keeps the descriptor slot).
                served = connection.as_mut() => {
                    if served.is_err_and(|e| e.is_timeout()) {
                        connections.stats(side).header_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = tokio::time::sleep(deadline) => {
                    connections.stats(side).handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                _ = shutdown.wait_for(|&s| s) => {
                    connections.stats(side).closed_on_shutdown.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(pending);
            drop(done);
        });
    }
    drop(listener);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// Answers a refused connection with a short HTTP response and closes it, without waiting
/// on the peer: what it already sent is read (so the close is not a reset that loses the
/// answer) only as far as it is there.
fn refuse(tcp: TcpStream, why: Refused, retry_after_secs: u64) {
    let (status, text, message) = why.status();
    let body = serde_json::json!({"error": "Unavailable", "message": message}).to_string();
    let response = format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: application/json\r\nretry-after: {}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        crate::http::session::retry_after(retry_after_secs),
        body.len()
    );
    let mut scratch = [0u8; 4096];
    for _ in 0..4 {
        match tcp.try_read(&mut scratch) {
            Ok(n) if n == scratch.len() => continue,
            _ => break,
        }
    }
    let _ = tcp.try_write(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Arc<ClientMemory> {
        Arc::new(ClientMemory::new(budget::MemoryConfig::default()))
    }

    #[test]
    fn the_open_file_limit_is_known_and_not_lowered() {
        let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).ok();
        let limit = raise_open_file_limit();
        assert!(
            limit.zip(before).is_some_and(|(n, b)| n >= b),
            "{limit:?} {before:?}"
        );
    }

    #[test]
    fn pending_caps_total_and_per_ip_and_give_back_on_drop() {
        let connections = Arc::new(Connections::new(Some(100), 40, memory()));
        let config = ListenConfig {
            max_pending: 3,
            max_pending_per_ip: 2,
            ..ListenConfig::default()
        };
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = connections.open(Side::Subscriber, a, &config).unwrap();
        let _second = connections.open(Side::Subscriber, a, &config).unwrap();
        assert_eq!(
            connections.open(Side::Subscriber, a, &config).err(),
            Some(Refused::PendingPerIp)
        );
        let _third = connections.open(Side::Subscriber, b, &config).unwrap();
        assert_eq!(
            connections.open(Side::Subscriber, b, &config).err(),
            Some(Refused::PendingFull)
        );
        // The admin listener has its own pending count.
        assert!(connections.open(Side::Admin, a, &config).is_ok());
        // An upgrade gives back the pending slot and keeps the descriptor.
        let (open, pending) = first;
        drop(pending);
        assert!(connections.open(Side::Subscriber, a, &config).is_ok());
        assert_eq!(
            connections
                .stats(Side::Subscriber)
                .open
                .load(Ordering::Relaxed),
            3
        );
        drop(open);
        assert_eq!(
            connections
                .stats(Side::Subscriber)
                .open
                .load(Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn descriptors_in_the_reserve_are_not_given_to_clients() {
        let connections = Arc::new(Connections::new(Some(10), 8, memory()));
        let config = ListenConfig::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(connections.cap(Side::Subscriber), Some(2));
        assert_eq!(connections.cap(Side::Admin), Some(2));
        let held: Vec<_> = (0..2)
            .map(|_| connections.open(Side::Subscriber, ip, &config).unwrap())
            .collect();
        assert_eq!(
            connections.open(Side::Subscriber, ip, &config).err(),
            Some(Refused::FdReserve)
        );
        // The admin listener still has its quarter of the reserve.
        assert!(connections.open(Side::Admin, ip, &config).is_ok());
        drop(held);
        assert!(connections.open(Side::Subscriber, ip, &config).is_ok());
        // An unknown limit caps nothing.
        let unknown = Arc::new(Connections::new(None, 8, memory()));
        assert_eq!(unknown.cap(Side::Subscriber), None);
    }
}
