//! Accepting connections on both listeners (subscriber and admin), before any request is
//! routed.
//!
//! Owns what a connection may cost before it is a websocket or has had its answer: the
//! header-read timeout, the deadline to upgrade (or finish, for plain HTTP), the caps on
//! connections not yet upgraded (in total and per IP), the size of a request head, the file
//! descriptors kept back for the log and the admin listener, and closing pending
//! connections at once on shutdown; and holding refusals: a request refused by a limit
//! (an HTTP answer with `Retry-After`) gets its answer late and its connection closed, so
//! a client that retries at once waits instead of making the daemon answer it again
//! ([`hold_refusal`]), with a bounded number held per IP; and closing a connection refused
//! at accept without losing its answer: the answer is written, the write side shut, and the
//! client's request read and dropped before the close (a lingering close, [`refuse`]),
//! bounded in time, bytes, per IP and in total, never for a descriptor-reserve refusal.
//! Must never: accept past a cap (the connection is answered 503/429 and closed, and
//! counted), read from a socket without a deadline before its upgrade, let client
//! connections take the descriptors reserved for the log, or hold more refusals of one
//! IP than its cap (past it the answer goes out at once, and new connections from that IP
//! are refused before their request is read), or let a lingering close outlive its bounds
//! or take a descriptor the reserve keeps.

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
    /// The most DIDs a v1 `options_update` may name (`--max-dids`), quoted by the 414
    /// answer to a URI too long, which tells the client to send its DIDs that way.
    pub max_dids: usize,
    /// How long a refusal (an answer with `Retry-After`: 429, 503) is held before it is
    /// sent, at most its `Retry-After`; zero answers at once. Every refusal closes its
    /// connection either way.
    pub refusal_hold: Duration,
    /// Refusals held at once per client IP; past it a refusal is answered at once and new
    /// connections from that IP are refused (429) before their request is read.
    pub max_held_refusals_per_ip: usize,
    /// How long a connection refused at accept may stay open after its answer, reading
    /// and dropping the client's request so that the close is not a reset that loses the
    /// answer (at most `max_head_bytes` are read); zero closes at once.
    pub refusal_linger: Duration,
    /// Lingering closes at once per client IP; past it a refused connection is closed at
    /// once.
    pub max_lingering_refusals_per_ip: usize,
    /// Lingering closes at once on this listener, in total.
    pub max_lingering_refusals: usize,
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
            max_dids: 10_000,
            refusal_hold: Duration::from_secs(1),
            max_held_refusals_per_ip: 16,
            refusal_linger: Duration::from_secs(1),
            max_lingering_refusals_per_ip: 16,
            max_lingering_refusals: 256,
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
    /// The client's IP has its cap of refusals held (429): it keeps asking while being
    /// refused, so its requests are no longer read.
    HeldPerIp,
}

impl Refused {
    pub const ALL: [Refused; 4] = [
        Refused::PendingFull,
        Refused::PendingPerIp,
        Refused::FdReserve,
        Refused::HeldPerIp,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Refused::PendingFull => "pending_full",
            Refused::PendingPerIp => "pending_per_ip",
            Refused::FdReserve => "fd_reserve",
            Refused::HeldPerIp => "held_per_ip",
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
            Refused::HeldPerIp => (
                429,
                "Too Many Requests",
                "this address keeps asking while refused; wait for Retry-After",
            ),
        }
    }

    fn index(self) -> usize {
        match self {
            Refused::PendingFull => 0,
            Refused::PendingPerIp => 1,
            Refused::FdReserve => 2,
            Refused::HeldPerIp => 3,
        }
    }
}

/// Marks a response as a refusal that may be held: set by the handlers on every answer
/// with `Retry-After` (`reply::refusal_response`), read by [`hold_refusal`].
#[derive(Debug, Clone, Copy)]
pub struct HoldableRefusal {
    /// The `Retry-After` the answer carries: the hold never exceeds it.
    pub retry_after: Duration,
}

/// What [`hold_refusal`] did with a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Held, then answered.
    Held,
    /// Answered at once: the IP had its cap of held refusals.
    Full,
}

impl Hold {
    pub const ALL: [Hold; 2] = [Hold::Held, Hold::Full];

    pub fn reason(self) -> &'static str {
        match self {
            Hold::Held => "held",
            Hold::Full => "at_once",
        }
    }

    fn index(self) -> usize {
        match self {
            Hold::Held => 0,
            Hold::Full => 1,
        }
    }
}

/// How a connection refused at accept ([`Refused`]) was closed after its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linger {
    /// Lingered until the client closed or its request head had been read: nothing unread
    /// was left, so the close was not a reset.
    Clean,
    /// Lingered, then closed at the time or byte bound, on shutdown or on a socket error
    /// (what the client sends after that is answered with a reset).
    Cut,
    /// Closed at once: a descriptor-reserve refusal, lingering off, or no lingering slot
    /// (the IP's or the listener's cap, or no descriptor left under the reserve).
    AtOnce,
}

impl Linger {
    pub const ALL: [Linger; 3] = [Linger::Clean, Linger::Cut, Linger::AtOnce];

    pub fn reason(self) -> &'static str {
        match self {
            Linger::Clean => "lingered",
            Linger::Cut => "cut",
            Linger::AtOnce => "at_once",
        }
    }

    fn index(self) -> usize {
        match self {
            Linger::Clean => 0,
            Linger::Cut => 1,
            Linger::AtOnce => 2,
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
    refused: [AtomicU64; 4],
    /// Closed because their request head did not arrive within the header-read timeout.
    pub header_timeouts: AtomicU64,
    /// Closed because they were not upgraded by the handshake deadline.
    pub handshake_timeouts: AtomicU64,
    /// Closed unfinished by a shutdown.
    pub closed_on_shutdown: AtomicU64,
    /// Answered 414 and closed: the first request line held a URI over [`MAX_URI_BYTES`].
    pub uri_too_long: AtomicU64,
    /// `accept` itself failed (e.g. EMFILE).
    pub accept_errors: AtomicU64,
    /// Refusals being held now.
    pub held: AtomicUsize,
    /// Refusals answered, by [`Hold`] (indexed like [`Hold::ALL`]).
    holds: [AtomicU64; 2],
    /// Connections refused at accept lingering now after their answer.
    pub lingering: AtomicUsize,
    /// Connections refused at accept, by how they were closed (indexed like
    /// [`Linger::ALL`]).
    lingers: [AtomicU64; 3],
}

impl ListenStats {
    pub fn refused(&self, why: Refused) -> u64 {
        self.refused[why.index()].load(Ordering::Relaxed)
    }

    pub fn holds(&self, how: Hold) -> u64 {
        self.holds[how.index()].load(Ordering::Relaxed)
    }

    pub fn lingers(&self, how: Linger) -> u64 {
        self.lingers[how.index()].load(Ordering::Relaxed)
    }
}

/// Connection state shared by both listeners: the descriptor budget and each listener's
/// pending connections by IP.
pub struct Connections {
    /// The process's open-file limit (soft `RLIMIT_NOFILE`), if it could be read.
    nofile: Option<u64>,
    /// Descriptors client connections never take (see [`Connections::cap`]); SIGHUP may
    /// change it.
    reserve: AtomicU64,
    stats: [ListenStats; 2],
    pending_by_ip: [Mutex<HashMap<IpAddr, usize>>; 2],
    /// Refusals held now, per IP and listener (an IP is in the map only while it has one).
    held_by_ip: [Mutex<HashMap<IpAddr, usize>>; 2],
    /// Refused connections lingering now, the same way.
    lingering_by_ip: [Mutex<HashMap<IpAddr, usize>>; 2],
    /// What subscribers' connections are charged for what they make the daemon hold.
    memory: Arc<ClientMemory>,
    /// Each listener's limits, read by its accept loop for every connection it accepts,
    /// so new limits (SIGHUP) apply to the next connection.
    limits: [watch::Sender<ListenConfig>; 2],
}

impl Connections {
    /// `nofile` is the open-file limit (`None`: unknown, no descriptor cap); `reserve`
    /// descriptors are kept from subscriber connections: half for the log's open files,
    /// a quarter for admin connections, a quarter for everything else (listeners, the
    /// upstream, the runtime).
    pub fn new(nofile: Option<u64>, reserve: u64, memory: Arc<ClientMemory>) -> Self {
        Self {
            nofile,
            reserve: AtomicU64::new(reserve),
            stats: Default::default(),
            pending_by_ip: Default::default(),
            held_by_ip: Default::default(),
            lingering_by_ip: Default::default(),
            memory,
            limits: [
                watch::Sender::new(ListenConfig::default()),
                watch::Sender::new(ListenConfig::default()),
            ],
        }
    }

    /// Sets `side`'s limits: connections accepted from now on get them (those already
    /// accepted keep the deadlines they started with).
    pub fn set_limits(&self, side: Side, config: ListenConfig) {
        self.limits[side.index()].send_replace(config);
    }

    /// `side`'s limits in force.
    pub fn limits(&self, side: Side) -> ListenConfig {
        self.limits[side.index()].borrow().clone()
    }

    /// Sets the descriptor reserve (SIGHUP); connections already open keep their slots.
    pub fn set_reserve(&self, reserve: u64) {
        self.reserve.store(reserve, Ordering::Relaxed);
    }

    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
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
        let reserve = self.reserve();
        Some(match side {
            Side::Subscriber => nofile.saturating_sub(reserve),
            Side::Admin => reserve / 4,
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
        if self.held_by_ip[side.index()]
            .lock()
            .get(&ip)
            .is_some_and(|&n| n >= config.max_held_refusals_per_ip)
        {
            return Err(Refused::HeldPerIp);
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

/// What a [`KeptSlot`] keeps open for its IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// A refusal held before its answer ([`hold_refusal`]).
    Held,
    /// A refused connection lingering after its answer ([`refuse`]).
    Lingering,
}

/// One refusal held, or one refused connection lingering, for `ip`; given back on drop.
struct KeptSlot {
    connections: Arc<Connections>,
    side: Side,
    ip: IpAddr,
    kind: Kept,
}

impl Connections {
    /// The per-IP counts and the listener's total of `kind`.
    fn kept(&self, side: Side, kind: Kept) -> (&Mutex<HashMap<IpAddr, usize>>, &AtomicUsize) {
        let stats = self.stats(side);
        match kind {
            Kept::Held => (&self.held_by_ip[side.index()], &stats.held),
            Kept::Lingering => (&self.lingering_by_ip[side.index()], &stats.lingering),
        }
    }

    /// A slot of `kind` for `ip`, unless it has `max` already or the listener has
    /// `max_total` (`None`: no total cap).
    fn keep(
        self: &Arc<Self>,
        side: Side,
        ip: IpAddr,
        kind: Kept,
        max: usize,
        max_total: Option<usize>,
    ) -> Option<KeptSlot> {
        let (map, total) = self.kept(side, kind);
        let mut by_ip = map.lock();
        // Every count changes under this lock: the total is exact here.
        if max_total.is_some_and(|cap| total.load(Ordering::Relaxed) >= cap) {
            return None;
        }
        let mine = by_ip.entry(ip).or_default();
        if *mine >= max {
            if *mine == 0 {
                by_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        total.fetch_add(1, Ordering::Relaxed);
        Some(KeptSlot {
            connections: self.clone(),
            side,
            ip,
            kind,
        })
    }

    /// A held-refusal slot of `ip`, unless it has `max` already.
    fn hold(self: &Arc<Self>, side: Side, ip: IpAddr, max: usize) -> Option<KeptSlot> {
        self.keep(side, ip, Kept::Held, max, None)
    }

    /// What a connection refused at accept for `why` needs to linger after its answer: a
    /// lingering slot of `ip` within both caps, and a descriptor slot under the reserve
    /// (the socket stays open). `None` (close at once) for a descriptor-reserve refusal,
    /// which exists to free descriptors, and when lingering is off.
    fn linger(
        self: &Arc<Self>,
        side: Side,
        ip: IpAddr,
        why: Refused,
        config: &ListenConfig,
    ) -> Option<(KeptSlot, OpenSlot)> {
        if why == Refused::FdReserve || config.refusal_linger.is_zero() {
            return None;
        }
        let stats = self.stats(side);
        if self
            .cap(side)
            .is_some_and(|cap| stats.open.load(Ordering::Relaxed) as u64 >= cap)
        {
            return None;
        }
        let slot = self.keep(
            side,
            ip,
            Kept::Lingering,
            config.max_lingering_refusals_per_ip,
            Some(config.max_lingering_refusals),
        )?;
        stats.open.fetch_add(1, Ordering::Relaxed);
        Some((
            slot,
            OpenSlot {
                connections: self.clone(),
                side,
            },
        ))
    }
}

impl Drop for KeptSlot {
    fn drop(&mut self) {
        let (map, total) = self.connections.kept(self.side, self.kind);
        give_back(map, self.ip, total);
    }
}

/// Gives one slot of `ip` back to a per-IP count (an IP leaves the map at zero, so the map
/// holds only addresses that have a slot) and to the listener's total.
fn give_back(by_ip: &Mutex<HashMap<IpAddr, usize>>, ip: IpAddr, total: &AtomicUsize) {
    let mut by_ip = by_ip.lock();
    if let Some(n) = by_ip.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            by_ip.remove(&ip);
        }
    }
    total.fetch_sub(1, Ordering::Relaxed);
}

/// Makes a refusal cost the client time rather than the daemon work. `response` is what
/// the router answered; a refusal (marked [`HoldableRefusal`]) always closes its
/// connection (`Connection: close`: a client refused again and again on one kept-alive
/// connection pays for a new connection each time), and is held for the listener's
/// `refusal_hold` (at most its `Retry-After`) while `ip` holds fewer than its cap. A
/// client that retries as soon as it is answered so asks at most (cap / hold) times a
/// second per IP through the router; past the cap its new connections are refused at
/// accept, before their request is read ([`Refused::HeldPerIp`]). A held refusal is a
/// pending connection: the handshake deadline and shutdown end it like any other.
async fn hold_refusal(
    connections: &Arc<Connections>,
    side: Side,
    ip: IpAddr,
    config: &ListenConfig,
    mut response: axum::response::Response,
) -> axum::response::Response {
    let Some(refusal) = response.extensions().get::<HoldableRefusal>().copied() else {
        return response;
    };
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    let hold = config.refusal_hold.min(refusal.retry_after);
    if hold.is_zero() {
        return response;
    }
    let stats = connections.stats(side);
    match connections.hold(side, ip, config.max_held_refusals_per_ip) {
        Some(slot) => {
            tokio::time::sleep(hold).await;
            drop(slot);
            stats.holds[Hold::Held.index()].fetch_add(1, Ordering::Relaxed);
        }
        None => {
            stats.holds[Hold::Full.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
    response
}

/// Held until the connection is upgraded or closed: one pending connection.
struct PendingSlot {
    connections: Arc<Connections>,
    side: Side,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let connections = &self.connections;
        give_back(
            &connections.pending_by_ip[self.side.index()],
            self.ip,
            &connections.stats(self.side).pending,
        );
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

/// hyper's bound on a request URI (`u16::MAX - 1` bytes); a longer one gets HTTP 414.
pub const MAX_URI_BYTES: usize = 65_534;

/// Bytes of a request line kept to name its endpoint in the 414 answer.
const LINE_PREFIX: usize = 256;

/// Bytes of a request line after its URI at most: ` HTTP/1.1\r`.
const LINE_AFTER_URI: usize = 10;

/// Watches a connection's first request line for a URI longer than [`MAX_URI_BYTES`], so
/// that the 414 can tell the client what to do instead (hyper's own 414 has no body).
/// Once the URI is known to be too long the line is no longer passed to hyper: the rest
/// of the head is read and dropped (so closing does not reset the connection and lose the
/// answer), then the answer is written and the connection closed. Later requests on a
/// kept-alive connection are hyper's to judge.
struct FirstLine {
    /// The line's first bytes: method and path.
    prefix: Vec<u8>,
    /// Bytes of the line so far.
    len: usize,
    /// Where in the line the last space seen is (before the version).
    last_space: Option<usize>,
    /// Set once the URI is too long.
    refusing: Option<Refusing>,
    /// The most head bytes read and dropped before answering anyway.
    max_head_bytes: usize,
    max_dids: usize,
}

struct Refusing {
    /// Head bytes read and dropped.
    dropped: usize,
    /// Line ends in a row (a `\r` between them does not count): two end the head.
    line_ends: u8,
    /// The head has ended (or more than a head's worth was dropped): answer now.
    head_ended: bool,
    answered: bool,
}

/// What a read showed of the first request line.
enum Watch {
    /// Not ended yet, and not too long so far.
    Watching,
    /// Ended, with a URI hyper takes.
    Fine,
    /// Too long; the bytes read after the point where that was known.
    TooLong { rest: usize },
}

impl FirstLine {
    fn new(config: &ListenConfig) -> Self {
        Self {
            prefix: Vec::new(),
            len: 0,
            last_space: None,
            refusing: None,
            max_head_bytes: config.max_head_bytes,
            max_dids: config.max_dids,
        }
    }

    /// Where the URI starts: after the method's space.
    fn uri_start(&self) -> Option<usize> {
        self.prefix.iter().position(|&b| b == b' ').map(|i| i + 1)
    }

    fn feed(&mut self, data: &[u8]) -> Watch {
        let end = data.iter().position(|&b| b == b'\n');
        let line = &data[..end.unwrap_or(data.len())];
        let room = LINE_PREFIX.saturating_sub(self.prefix.len());
        self.prefix.extend_from_slice(&line[..line.len().min(room)]);
        if let Some(i) = line.iter().rposition(|&b| b == b' ') {
            self.last_space = Some(self.len + i);
        }
        self.len += line.len();
        let uri_start = self.uri_start().unwrap_or(self.len);
        let too_long = match end {
            // Ended: the URI runs to the last space (none: to the line's end).
            Some(_) => {
                let uri_end = self
                    .last_space
                    .filter(|&s| s >= uri_start)
                    .unwrap_or(self.len);
                uri_end.saturating_sub(uri_start) > MAX_URI_BYTES
            }
            // Not ended: too long once even the longest version could not make it fit.
            None => self.len.saturating_sub(uri_start) > MAX_URI_BYTES + LINE_AFTER_URI,
        };
        match (end, too_long) {
            (_, true) => {
                let rest = end.map_or(data.len(), |i| i + 1);
                self.refusing = Some(Refusing {
                    dropped: 0,
                    line_ends: u8::from(end.is_some()),
                    head_ended: false,
                    answered: false,
                });
                Watch::TooLong { rest }
            }
            (Some(_), false) => Watch::Fine,
            (None, false) => Watch::Watching,
        }
    }

    /// Drops `data` of a refused request's head; true once the head has ended (or more
    /// than a head's worth was dropped).
    fn drop_head(&mut self, data: &[u8]) -> bool {
        let max = self.max_head_bytes;
        let Some(refusing) = self.refusing.as_mut() else {
            return true;
        };
        for &b in data {
            match b {
                b'\n' => refusing.line_ends += 1,
                b'\r' => {}
                _ => refusing.line_ends = 0,
            }
            if refusing.line_ends >= 2 {
                refusing.head_ended = true;
                return true;
            }
        }
        refusing.dropped += data.len();
        refusing.head_ended = refusing.dropped > max;
        refusing.head_ended
    }

    /// The path of the request, as far as the prefix holds it.
    fn path(&self) -> &[u8] {
        let start = self.uri_start().unwrap_or(self.prefix.len());
        let rest = &self.prefix[start.min(self.prefix.len())..];
        let end = rest
            .iter()
            .position(|&b| b == b'?' || b == b' ')
            .unwrap_or(rest.len());
        &rest[..end]
    }
}

/// The 414 answer's message for a request to `path`: how to ask for what did not fit.
pub fn uri_too_long_message(path: &[u8], max_dids: usize) -> String {
    let limit = format!("the request URI is longer than {MAX_URI_BYTES} bytes");
    match path {
        b"/subscribe" => format!(
            "{limit} (a URL holds about 1,480 wantedDids). Send a larger DID set, up to \
             {max_dids}, in an options_update message: connect with requireHello=true, then \
             send {{\"type\":\"options_update\",\"payload\":{{\"wantedDids\":[...]}}}} first"
        ),
        b"/xrpc/network.bsky.jetstream.subscribeEvents" => format!(
            "{limit} (a URL holds about 1,720 dids). subscribeEvents takes its filter from \
             the URL only, with no message to change it: split the DIDs over several \
             connections, or subscribe by collections and filter by DID yourself; /subscribe \
             (Jetstream v1) takes up to {max_dids} DIDs in an options_update message"
        ),
        b"/xrpc/com.atproto.sync.subscribeRepos" => {
            format!("{limit}; subscribeRepos takes only cursor and wantedCollections")
        }
        _ => limit,
    }
}

/// A socket carrying its slot in the descriptor budget, so the slot is given back when
/// the socket closes, also after it became a websocket; on the subscriber listener it
/// also charges what is read to the client-memory budget once the socket is a websocket
/// (`ConnMemory::arm`), and fails the read that does not fit. Until its first request
/// line has ended it watches that line's URI ([`FirstLine`]).
pub(crate) struct Counted {
    tcp: TcpStream,
    slot: OpenSlot,
    memory: Option<Arc<ConnMemory>>,
    first_line: Option<FirstLine>,
}

impl Counted {
    /// Writes what the socket takes now, without a task context (the fan-out's direct
    /// writes to a subscriber, `http::websocket::Conn`).
    pub(crate) fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.tcp.try_write_vectored(bufs)
    }

    /// Reads and drops the rest of a refused request's head, then answers 414 and fails
    /// the read, which ends the connection.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(line) = self.first_line.as_mut() else {
            return Poll::Ready(Err(uri_too_long_error()));
        };
        if line.refusing.as_ref().is_some_and(|r| r.answered) {
            return Poll::Ready(Err(uri_too_long_error()));
        }
        let mut scratch = [0u8; 4096];
        while !line.refusing.as_ref().is_some_and(|r| r.head_ended) {
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => break,
                Poll::Ready(Ok(())) => {
                    line.drop_head(read.filled());
                }
            }
        }
        if let Some(refusing) = line.refusing.as_mut() {
            refusing.answered = true;
        }
        let message = uri_too_long_message(line.path(), line.max_dids);
        let body = serde_json::json!({"error": "URITooLong", "message": message}).to_string();
        let response = format!(
            "HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = self.tcp.try_write(response.as_bytes());
        self.slot
            .connections
            .stats(self.slot.side)
            .uri_too_long
            .fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Err(uri_too_long_error()))
    }
}

fn uri_too_long_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "request URI too long (answered 414)",
    )
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this
            .first_line
            .as_ref()
            .is_some_and(|l| l.refusing.is_some())
        {
            return this.poll_refuse(cx);
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(line)) = (&poll, this.first_line.as_mut()) {
            match line.feed(&buf.filled()[before..]) {
                Watch::Watching => {}
                Watch::Fine => this.first_line = None,
                Watch::TooLong { rest } => {
                    // hyper never sees the line; what followed it may end the head.
                    line.drop_head(&buf.filled()[before + rest..]);
                    buf.set_filled(before);
                    return this.poll_refuse(cx);
                }
            }
        }
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

/// hyper's HTTP/1.1 connection settings for `config`.
fn http_builder(config: &ListenConfig) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_head_bytes.max(8192));
    http
}

/// Serves `router` on `listener` until `shutdown` turns true, with `side`'s limits and
/// the descriptor budget of `connections` (limits set while it runs apply to the
/// connections accepted after). On shutdown it stops accepting, closes every connection
/// not yet upgraded at once (upgraded ones are closed by their sessions) and returns when
/// those are gone.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    side: Side,
    connections: Arc<Connections>,
) -> io::Result<()> {
    let mut limits = connections.limits[side.index()].subscribe();
    let mut config = limits.borrow_and_update().clone();
    let mut http = http_builder(&config);
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
        if limits.has_changed().unwrap_or(false) {
            config = limits.borrow_and_update().clone();
            http = http_builder(&config);
        }
        let (open, pending) = match connections.open(side, peer.ip(), &config) {
            Ok(slots) => slots,
            Err(why) => {
                stats.refused[why.index()].fetch_add(1, Ordering::Relaxed);
                let lingering = connections.linger(side, peer.ip(), why, &config);
                if lingering.is_none() {
                    stats.lingers[Linger::AtOnce.index()].fetch_add(1, Ordering::Relaxed);
                }
                refuse(
                    tcp,
                    why,
                    &config,
                    lingering,
                    shutdown.clone(),
                    done_rx.clone(),
                );
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
            slot: open,
            memory: memory.clone(),
            first_line: Some(FirstLine::new(&config)),
        });
        let router = router.clone();
        let holds = (connections.clone(), config.clone());
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(memory) = &memory {
                request.extensions_mut().insert(memory.clone());
            }
            let mut router = router.clone();
            let answer = tower_service::Service::call(&mut router, request);
            let (connections, config) = holds.clone();
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(
                    hold_refusal(&connections, side, peer.ip(), &config, response).await,
                )
            }
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

/// Answers a connection refused at accept with a short HTTP response and closes it
/// without a reset that could lose the answer. A close with unread bytes in the socket
/// (the client's request, which may arrive just after the refusal looked for it) is a
/// reset, and a client whose request lands after the close gets one too; a client may
/// then read no answer (a reset before the answer is read discards it on some systems,
/// and Linux hands over the answer and then fails the read). So, given `lingering` slots
/// ([`Connections::linger`]), the answer is written, the write side shut down, and the
/// client's request read and dropped until the client closes or the head has ended, at
/// most `max_head_bytes` and `refusal_linger` (and not past shutdown), then the socket
/// is closed: nothing is left unread and nothing more is expected. Without them (a
/// descriptor-reserve refusal, lingering off or over its caps) the answer is written and
/// the socket closed at once, after reading what the client already sent, no more
/// than 16 KiB.
fn refuse(
    tcp: TcpStream,
    why: Refused,
    config: &ListenConfig,
    lingering: Option<(KeptSlot, OpenSlot)>,
    mut shutdown: watch::Receiver<bool>,
    done: watch::Receiver<()>,
) {
    let (status, text, message) = why.status();
    let body = serde_json::json!({"error": "Unavailable", "message": message}).to_string();
    let response = format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: application/json\r\nretry-after: {}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        crate::rate::retry_after(config.retry_after_secs),
        body.len()
    );
    let Some((slot, open)) = lingering else {
        let mut scratch = [0u8; 4096];
        for _ in 0..4 {
            match tcp.try_read(&mut scratch) {
                Ok(n) if n == scratch.len() => continue,
                _ => break,
            }
        }
        let _ = tcp.try_write(response.as_bytes());
        return;
    };
    let deadline = tokio::time::Instant::now() + config.refusal_linger;
    // Counts the bytes dropped and finds the head's end, as for a URI too long.
    let mut head = FirstLine::new(config);
    head.refusing = Some(Refusing {
        dropped: 0,
        line_ends: 0,
        head_ended: false,
        answered: true,
    });
    tokio::spawn(async move {
        let how = linger(tcp, response.as_bytes(), head, deadline, &mut shutdown).await;
        let stats = slot.connections.stats(slot.side);
        stats.lingers[how.index()].fetch_add(1, Ordering::Relaxed);
        drop((slot, open));
        drop(done);
    });
}

/// Writes `response`, shuts the write side and reads and drops what the client sends
/// until it closes or `head` (a request head being dropped) has ended; gives up at the
/// head's byte bound, `deadline`, shutdown or a socket error. Closes the socket.
async fn linger(
    mut tcp: TcpStream,
    response: &[u8],
    mut head: FirstLine,
    deadline: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Linger {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A fresh socket's send buffer takes the few hundred bytes whole.
    if !matches!(tcp.try_write(response), Ok(n) if n == response.len()) {
        return Linger::Cut;
    }
    if tcp.shutdown().await.is_err() {
        return Linger::Cut;
    }
    let mut scratch = [0u8; 4096];
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|&s| s) => return Linger::Cut,
            _ = tokio::time::sleep_until(deadline) => return Linger::Cut,
            read = tcp.read(&mut scratch) => match read {
                Ok(0) => return Linger::Clean,
                Ok(n) => {
                    if head.drop_head(&scratch[..n]) {
                        // Ended, or more than a head's worth dropped.
                        let ended = head.refusing.as_ref().is_some_and(|r| r.line_ends >= 2);
                        return if ended { Linger::Clean } else { Linger::Cut };
                    }
                }
                Err(_) => return Linger::Cut,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Arc<ClientMemory> {
        Arc::new(ClientMemory::new(budget::MemoryConfig::default()))
    }

    fn line_of(uri_len: usize) -> Vec<u8> {
        let mut line = b"GET /subscribe?wantedDids=".to_vec();
        line.resize(4 + uri_len, b'a');
        line.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
        line
    }

    /// Feeds `data` in reads of `chunk` bytes; what the watch said last, and where.
    fn watch(data: &[u8], chunk: usize) -> (usize, Watch, FirstLine) {
        let mut line = FirstLine::new(&ListenConfig::default());
        let mut at = 0;
        for piece in data.chunks(chunk) {
            match line.feed(piece) {
                Watch::Watching => at += piece.len(),
                other => return (at, other, line),
            }
        }
        (at, Watch::Watching, line)
    }

    #[test]
    fn a_uri_hyper_takes_passes_and_one_byte_more_is_caught() {
        for chunk in [1, 7, 4096, 1 << 20] {
            let (_, said, _) = watch(&line_of(MAX_URI_BYTES), chunk);
            assert!(matches!(said, Watch::Fine), "chunk {chunk}");
            let (at, said, line) = watch(&line_of(MAX_URI_BYTES + 1), chunk);
            let Watch::TooLong { rest } = said else {
                panic!("chunk {chunk}: a URI over the bound passed");
            };
            // Caught at the line's end at the latest: what followed is the rest.
            let line_end = 4 + (MAX_URI_BYTES + 1) + " HTTP/1.1\r\n".len();
            assert!(at + rest <= line_end, "chunk {chunk}");
            assert_eq!(line.path(), b"/subscribe");
        }
        // A line that never ends is caught once no version could make it fit.
        let endless = vec![b'a'; 200_000];
        let mut request = b"GET /".to_vec();
        request.extend_from_slice(&endless);
        let (at, said, _) = watch(&request, 1000);
        assert!(matches!(said, Watch::TooLong { .. }));
        assert!(at <= 4 + MAX_URI_BYTES + LINE_AFTER_URI + 1, "{at}");
    }

    #[test]
    fn a_refused_head_is_dropped_to_its_end() {
        let (_, said, mut line) = watch(&line_of(MAX_URI_BYTES + 5), 1 << 20);
        assert!(matches!(said, Watch::TooLong { .. }));
        assert!(!line.drop_head(b"Host: x\r\n"));
        assert!(line.drop_head(b"X: y\r\n\r\nGET /next"));
        // Without an end, a head's worth at most.
        let mut unended = b"GET /subscribe?".to_vec();
        unended.resize(70_000, b'a');
        let (_, _, mut endless) = watch(&unended, 1 << 20);
        let config = ListenConfig::default();
        let chunk = vec![b'h'; 4096];
        let reads = (0..).take_while(|_| !endless.drop_head(&chunk)).count();
        assert_eq!(reads, config.max_head_bytes / 4096, "{reads}");
    }

    #[test]
    fn the_414_message_names_the_way_for_each_endpoint() {
        let v1 = uri_too_long_message(b"/subscribe", 10_000);
        assert!(v1.contains("options_update") && v1.contains("requireHello=true"));
        assert!(v1.contains("10000"), "{v1}");
        let v2 = uri_too_long_message(b"/xrpc/network.bsky.jetstream.subscribeEvents", 10_000);
        assert!(v2.contains("several connections") && v2.contains("/subscribe"));
        let raw = uri_too_long_message(b"/xrpc/com.atproto.sync.subscribeRepos", 10_000);
        assert!(raw.contains("wantedCollections"));
        assert!(uri_too_long_message(b"/metrics", 1).contains("65534"));
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
    fn held_refusals_are_capped_per_ip_and_then_refused_at_accept() {
        let connections = Arc::new(Connections::new(None, 8, memory()));
        let config = ListenConfig {
            max_held_refusals_per_ip: 2,
            ..ListenConfig::default()
        };
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = connections.hold(Side::Subscriber, a, 2);
        let second = connections.hold(Side::Subscriber, a, 2);
        assert!(first.is_some() && second.is_some());
        assert!(connections.hold(Side::Subscriber, a, 2).is_none());
        let stats = connections.stats(Side::Subscriber);
        assert_eq!(stats.held.load(Ordering::Relaxed), 2);
        // Its new connections are refused before a request is read; others' are not.
        assert_eq!(
            connections.open(Side::Subscriber, a, &config).err(),
            Some(Refused::HeldPerIp)
        );
        assert!(connections.open(Side::Subscriber, b, &config).is_ok());
        drop(first);
        assert!(connections.open(Side::Subscriber, a, &config).is_ok());
        drop(second);
        assert_eq!(stats.held.load(Ordering::Relaxed), 0);
        assert!(connections.held_by_ip[0].lock().is_empty());
    }

    #[test]
    fn lingering_closes_are_capped_per_ip_in_total_and_by_descriptors() {
        let connections = Arc::new(Connections::new(Some(10), 4, memory()));
        let config = ListenConfig {
            max_lingering_refusals_per_ip: 2,
            max_lingering_refusals: 3,
            ..ListenConfig::default()
        };
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let why = Refused::PendingPerIp;
        let linger = |ip| connections.linger(Side::Subscriber, ip, why, &config);
        // A descriptor-reserve refusal never lingers: it exists to free descriptors.
        assert!(connections
            .linger(Side::Subscriber, a, Refused::FdReserve, &config)
            .is_none());
        let first = linger(a);
        let second = linger(a);
        assert!(first.is_some() && second.is_some());
        assert!(linger(a).is_none(), "over the per-IP cap");
        let third = linger(b);
        assert!(third.is_some());
        assert!(linger(b).is_none(), "over the total");
        let stats = connections.stats(Side::Subscriber);
        assert_eq!(stats.lingering.load(Ordering::Relaxed), 3);
        // Each holds a descriptor of the budget while it lingers.
        assert_eq!(stats.open.load(Ordering::Relaxed), 3);
        drop(first);
        assert_eq!(stats.open.load(Ordering::Relaxed), 2);
        // Descriptors: the cap is 6; with 5 open one more may linger, with 6 none.
        let clients: Vec<_> = (0..3)
            .map(|_| connections.open(Side::Subscriber, b, &config).unwrap())
            .collect();
        let fourth = linger(a);
        assert!(fourth.is_some());
        assert!(linger(b).is_none(), "the total again");
        drop(third);
        drop(second);
        let more: Vec<_> = (0..2)
            .map(|_| connections.open(Side::Subscriber, a, &config).unwrap())
            .collect();
        assert_eq!(stats.open.load(Ordering::Relaxed), 6);
        assert!(linger(b).is_none(), "no descriptor left under the reserve");
        // Lingering off: nothing lingers.
        drop((clients, more, fourth));
        let off = ListenConfig {
            refusal_linger: Duration::ZERO,
            ..config.clone()
        };
        assert!(connections.linger(Side::Subscriber, a, why, &off).is_none());
        assert_eq!(stats.lingering.load(Ordering::Relaxed), 0);
        assert!(connections.lingering_by_ip[0].lock().is_empty());
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
