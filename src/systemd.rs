//! systemd integration: the sd_notify protocol and a watchdog tied to real liveness.
//!
//! Owns talking to the service manager over `$NOTIFY_SOCKET` (a unix datagram socket, a
//! filesystem path or an abstract `@name`), reading `$WATCHDOG_USEC`/`$WATCHDOG_PID`, and
//! the [`Watchdog`] thread that sends `WATCHDOG=1` only while the [`Heartbeat`]s it
//! watches keep advancing. Everything is a no-op returning `Ok` when sluice is not
//! started by systemd (no `$NOTIFY_SOCKET`).
//!
//! Must never: send `WATCHDOG=1` from a plain timer (a wedged daemon would look healthy),
//! block the caller (datagrams are sent non-blocking and a full socket is an error, not a
//! wait), modify the process environment, or link libsystemd.
//!
//! # Watchdog semantics
//!
//! With `WatchdogSec=N` systemd restarts sluice unless it receives `WATCHDOG=1` at least
//! every N seconds. [`Watchdog`] checks its heartbeats every `N / 2` (the check period) and
//! pings only if **every** heartbeat advanced since the previous check. A heartbeat is a
//! counter bumped once per iteration of a loop that must keep running: for sluice that is
//! the ingest thread's loop (`UpstreamShared::ingest_heartbeat`), which iterates at least
//! once per idle tick (1 s by default) even when the upstream is idle or disconnected,
//! because it waits for frames with that timeout. An upstream that is merely disconnected therefore does not trigger
//! a restart (readiness reports that); an ingest loop that deadlocks, spins inside one
//! iteration or dies does, within `N` to `1.5 N` seconds. When a heartbeat stalls, the
//! watchdog logs an error naming it and sets `STATUS=` so `systemctl status` shows why.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where notifications go, parsed from a `$NOTIFY_SOCKET` value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Not under systemd: every notification is a successful no-op.
    Disabled,
    /// A socket in the filesystem.
    Path(PathBuf),
    /// A socket in the Linux abstract namespace (`@name`, sent with a leading NUL).
    Abstract(Vec<u8>),
    /// An address family sluice does not speak (e.g. `vsock:`); sending fails.
    Unsupported(String),
}

/// A handle on the service manager's notification socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    target: Target,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; unset or empty means not under systemd.
    pub fn from_env() -> Self {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(value) => match value.to_str() {
                Some(text) => Self::from_socket(text),
                None => Notifier {
                    target: Target::Unsupported(value.to_string_lossy().into_owned()),
                },
            },
            None => Self::disabled(),
        }
    }

    /// A notifier for an explicit `$NOTIFY_SOCKET`-style value: `/path`, `@abstract`, or
    /// empty for disabled.
    pub fn from_socket(socket: &str) -> Self {
        let target = if socket.is_empty() {
            Target::Disabled
        } else if let Some(name) = socket.strip_prefix('@') {
            Target::Abstract(name.as_bytes().to_vec())
        } else if socket.starts_with('/') {
            Target::Path(PathBuf::from(socket))
        } else {
            Target::Unsupported(socket.to_string())
        };
        Notifier { target }
    }

    /// A notifier that does nothing.
    pub fn disabled() -> Self {
        Notifier {
            target: Target::Disabled,
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target != Target::Disabled
    }

    /// Sends a raw state block (newline-separated `KEY=value` lines) in one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let socket = match &self.target {
            Target::Disabled => return Ok(()),
            Target::Unsupported(addr) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("NOTIFY_SOCKET={addr:?} is not a unix socket path or @abstract name"),
                ))
            }
            _ => UnixDatagram::unbound()?,
        };
        socket.set_nonblocking(true)?;
        let sent = match &self.target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Target::Abstract(name) => send_abstract(&socket, name, state.as_bytes())?,
            Target::Disabled | Target::Unsupported(_) => return Ok(()),
        };
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "sd_notify datagram truncated ({sent} of {} bytes)",
                    state.len()
                ),
            ));
        }
        Ok(())
    }

    /// `READY=1`: startup finished (listeners bound, log open), or a reload finished.
    pub fn ready(&self) -> io::Result<()> {
        self.send("READY=1")
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    /// `RELOADING=1`: a reload (SIGHUP) has begun; send [`Notifier::ready`] when done.
    pub fn reloading(&self) -> io::Result<()> {
        self.send("RELOADING=1")
    }

    /// `STATUS=...`: a one-line human status for `systemctl status`. Newlines become
    /// spaces, since each line of a notification is a separate assignment.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`. Prefer [`Watchdog`], which only pings while the daemon makes progress.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    /// `EXTEND_TIMEOUT_USEC=...`: asks for more time for the current start or stop phase.
    pub fn extend_timeout(&self, by: Duration) -> io::Result<()> {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(socket: &UnixDatagram, name: &[u8], data: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(data, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_socket: &UnixDatagram, _name: &[u8], _data: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

/// `READY=1` to `$NOTIFY_SOCKET`; `Ok` without doing anything when not under systemd.
pub fn notify_ready() -> io::Result<()> {
    Notifier::from_env().ready()
}

/// `STOPPING=1` to `$NOTIFY_SOCKET`.
pub fn notify_stopping() -> io::Result<()> {
    Notifier::from_env().stopping()
}

/// `RELOADING=1` to `$NOTIFY_SOCKET`.
pub fn notify_reloading() -> io::Result<()> {
    Notifier::from_env().reloading()
}

/// `STATUS=...` to `$NOTIFY_SOCKET`.
pub fn notify_status(status: &str) -> io::Result<()> {
    Notifier::from_env().status(status)
}

/// `WATCHDOG=1` to `$NOTIFY_SOCKET`, unconditionally. Prefer [`Watchdog`].
pub fn notify_watchdog() -> io::Result<()> {
    Notifier::from_env().watchdog()
}

/// `EXTEND_TIMEOUT_USEC=...` to `$NOTIFY_SOCKET`.
pub fn notify_extend_timeout(by: Duration) -> io::Result<()> {
    Notifier::from_env().extend_timeout(by)
}

/// The watchdog timeout systemd enforces on this process, from `$WATCHDOG_USEC`, or
/// `None` when there is none, it is zero or unparsable, or `$WATCHDOG_PID` names another
/// process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on explicit values (for tests and callers that read the
/// environment themselves).
pub fn watchdog_interval_from(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    let usec: u64 = watchdog_usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = watchdog_pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// A progress counter a loop bumps once per iteration; cheap to clone and to bump. It
/// either owns its counter ([`Heartbeat::new`] + [`Heartbeat::beat`]) or reads one that
/// already exists ([`Heartbeat::from_probe`], e.g. a field of a shared stats struct).
#[derive(Clone)]
pub struct Heartbeat {
    name: Arc<str>,
    source: Source,
}

type Probe = Arc<dyn Fn() -> u64 + Send + Sync>;

#[derive(Clone)]
enum Source {
    Counter(Arc<AtomicU64>),
    Probe(Probe),
}

impl Heartbeat {
    /// A heartbeat with its own counter, named for logs and `STATUS=` (e.g.
    /// `"ingest loop"`).
    pub fn new(name: &str) -> Self {
        Heartbeat {
            name: Arc::from(name),
            source: Source::Counter(Arc::new(AtomicU64::new(0))),
        }
    }

    /// A heartbeat that reads an existing progress counter, e.g.
    /// `Heartbeat::from_probe("ingest loop", move || shared.ingest_heartbeat.load(Relaxed))`.
    /// The probe must be cheap and must not block: it runs on the watchdog thread.
    pub fn from_probe(name: &str, probe: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Heartbeat {
            name: Arc::from(name),
            source: Source::Probe(Arc::new(probe)),
        }
    }

    /// Records one iteration of the watched loop. No effect on a probe heartbeat, which
    /// advances with the counter it reads.
    pub fn beat(&self) {
        if let Source::Counter(c) = &self.source {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Iterations recorded so far.
    pub fn count(&self) -> u64 {
        match &self.source {
            Source::Counter(c) => c.load(Ordering::Relaxed),
            Source::Probe(p) => p(),
        }
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("name", &self.name)
            .field("count", &self.count())
            .finish()
    }
}

/// Counters of what a [`Watchdog`] did, readable while it runs.
#[derive(Debug, Default)]
pub struct WatchdogStats {
    /// `WATCHDOG=1` datagrams sent.
    pub pings: AtomicU64,
    /// Checks at which some heartbeat had not advanced, so no ping was sent.
    pub withheld: AtomicU64,
    /// Pings that could not be sent (socket errors).
    pub send_errors: AtomicU64,
}

/// A thread that sends `WATCHDOG=1` every check period, but only while every watched
/// [`Heartbeat`] advanced since the previous check (see the module docs). Stops when
/// dropped or on [`Watchdog::stop`].
#[derive(Debug)]
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<WatchdogStats>,
    period: Duration,
}

impl Watchdog {
    /// Starts a watchdog when systemd asked for one (`$WATCHDOG_USEC` for this process and
    /// a `$NOTIFY_SOCKET`), checking every half of the watchdog timeout; `Ok(None)`
    /// otherwise.
    pub fn from_env(heartbeats: Vec<Heartbeat>) -> io::Result<Option<Watchdog>> {
        let notifier = Notifier::from_env();
        if !notifier.is_enabled() {
            return Ok(None);
        }
        match watchdog_interval() {
            Some(timeout) => Watchdog::start(notifier, timeout / 2, heartbeats).map(Some),
            None => Ok(None),
        }
    }

    /// Starts a watchdog that checks `heartbeats` every `period` and pings `notifier`
    /// when all of them advanced. At least one heartbeat is required: a watchdog that
    /// watches nothing would be the always-firing timer this module exists to avoid.
    pub fn start(
        notifier: Notifier,
        period: Duration,
        heartbeats: Vec<Heartbeat>,
    ) -> io::Result<Watchdog> {
        if heartbeats.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a watchdog needs at least one heartbeat to watch",
            ));
        }
        let period = period.max(Duration::from_millis(1));
        let stats = Arc::new(WatchdogStats::default());
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-watchdog".into())
            .spawn(move || watch(notifier, period, heartbeats, stop_rx, &thread_stats))?;
        Ok(Watchdog {
            stop: Some(stop_tx),
            thread: Some(thread),
            stats,
            period,
        })
    }

    /// What the watchdog has done so far.
    pub fn stats(&self) -> &WatchdogStats {
        &self.stats
    }

    /// How often heartbeats are checked.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Stops the thread and waits for it. Call after `STOPPING=1`: from then on the
    /// stop timeout (`TimeoutStopSec`) bounds the shutdown instead.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shut();
    }
}

fn watch(
    notifier: Notifier,
    period: Duration,
    heartbeats: Vec<Heartbeat>,
    stop: mpsc::Receiver<()>,
    stats: &WatchdogStats,
) {
    let mut last: Vec<u64> = heartbeats.iter().map(Heartbeat::count).collect();
    let mut last_progress = Instant::now();
    let mut stalled_reported = false;
    loop {
        match stop.recv_timeout(period) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now: Vec<u64> = heartbeats.iter().map(Heartbeat::count).collect();
        let stalled: Vec<&str> = heartbeats
            .iter()
            .zip(now.iter().zip(last.iter()))
            .filter(|(_, (now, last))| now == last)
            .map(|(hb, _)| hb.name())
            .collect();
        last = now;
        if stalled.is_empty() {
            last_progress = Instant::now();
            match notifier.watchdog() {
                Ok(()) => {
                    stats.pings.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, "cannot send WATCHDOG=1 to systemd");
                }
            }
            if stalled_reported {
                stalled_reported = false;
                tracing::info!("watchdog: all heartbeats advancing again; pinging systemd");
                let _ = notifier.status("running");
            }
        } else {
            stats.withheld.fetch_add(1, Ordering::Relaxed);
            let names = stalled.join(", ");
            let for_s = last_progress.elapsed().as_secs_f64();
            if !stalled_reported {
                stalled_reported = true;
                tracing::error!(
                    stalled = %names,
                    for_s,
                    "watchdog: no progress; withholding WATCHDOG=1 so systemd restarts sluice if this persists"
                );
                let _ = notifier.status(&format!(
                    "watchdog: no progress from {names} for {for_s:.1}s; withholding WATCHDOG=1"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_addresses() {
        assert!(!Notifier::from_socket("").is_enabled());
        assert_eq!(
            Notifier::from_socket("/run/systemd/notify").target,
            Target::Path(PathBuf::from("/run/systemd/notify"))
        );
        assert_eq!(
            Notifier::from_socket("@/org/freedesktop/systemd1/notify").target,
            Target::Abstract(b"/org/freedesktop/systemd1/notify".to_vec())
        );
        let vsock = Notifier::from_socket("vsock:2:1234");
        assert!(vsock.is_enabled());
        assert!(vsock.ready().is_err());
        assert!(Notifier::disabled().ready().is_ok());
    }

    #[test]
    fn watchdog_interval_honours_pid() {
        let d = Some(Duration::from_secs(30));
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 7), d);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("7"), 7), d);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }

    #[test]
    fn probe_heartbeats_read_their_source() {
        let shared = Arc::new(AtomicU64::new(7));
        let reader = shared.clone();
        let hb = Heartbeat::from_probe("ingest loop", move || reader.load(Ordering::Relaxed));
        assert_eq!(hb.count(), 7);
        hb.beat();
        assert_eq!(hb.count(), 7);
        shared.fetch_add(1, Ordering::Relaxed);
        assert_eq!(hb.count(), 8);
        assert!(format!("{hb:?}").contains("ingest loop"));
    }

    #[test]
    fn a_watchdog_needs_a_heartbeat() {
        assert!(Watchdog::start(Notifier::disabled(), Duration::from_millis(5), vec![]).is_err());
    }
}
