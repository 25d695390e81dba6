//! sd_notify end to end: each test creates its own NOTIFY_SOCKET datagram socket (in a
//! tempdir or the abstract namespace) and reads what sluice's systemd module sends.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice::systemd::{self, Heartbeat, Notifier, Watchdog};

/// How long a test waits for something it needs before failing: generous, since the
/// watchdog thread and the test's own threads can be starved for long on a loaded machine
/// (CI's two cores, other tests of this binary beside them). Tests wait on what they
/// observe (datagrams, the watchdog's counters), never on a window of wall-clock time.
const PATIENCE: Duration = Duration::from_secs(30);

fn bind_in(dir: &tempfile::TempDir) -> (UnixDatagram, String) {
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    (socket, path.to_str().unwrap().to_string())
}

/// Every datagram that arrives within `window`.
fn collect(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let end = Instant::now() + window;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

fn recv_one(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let end = Instant::now() + PATIENCE;
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(_) if Instant::now() < end => continue,
            Err(err) => panic!("no notification within {PATIENCE:?}: {err}"),
        }
    }
}

/// Every datagram already queued on the socket, without waiting for more.
fn drain(socket: &UnixDatagram, into: &mut Vec<String>) {
    socket.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    socket.set_nonblocking(false).unwrap();
}

/// Whether the last two datagrams are pings: the watchdog's last two checks saw every
/// heartbeat advance, so it is not reporting a stall and sends nothing after the last one
/// until its next check.
fn ends_with_two_pings(got: &[String]) -> bool {
    got.len() >= 2 && got[got.len() - 2..].iter().all(|m| m == "WATCHDOG=1")
}

#[test]
fn lifecycle_messages_reach_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, path) = bind_in(&dir);
    let notifier = Notifier::from_socket(&path);
    assert!(notifier.is_enabled());
    notifier.ready().unwrap();
    assert_eq!(recv_one(&socket), "READY=1");
    notifier.status("ingesting: lag 0.4s\nsecond line").unwrap();
    assert_eq!(recv_one(&socket), "STATUS=ingesting: lag 0.4s second line");
    notifier.reloading().unwrap();
    assert_eq!(recv_one(&socket), "RELOADING=1");
    notifier.extend_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(recv_one(&socket), "EXTEND_TIMEOUT_USEC=5000000");
    notifier.watchdog().unwrap();
    assert_eq!(recv_one(&socket), "WATCHDOG=1");
    notifier.stopping().unwrap();
    assert_eq!(recv_one(&socket), "STOPPING=1");
}

#[cfg(target_os = "linux")]
#[test]
fn abstract_socket_names_work() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("sluice-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    Notifier::from_socket(&format!("@{name}")).ready().unwrap();
    assert_eq!(recv_one(&socket), "READY=1");
}

#[test]
fn a_missing_socket_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nobody-listens.sock");
    let notifier = Notifier::from_socket(gone.to_str().unwrap());
    assert!(notifier.ready().is_err());
}

/// The only test that touches the process environment (tests run in parallel threads).
#[test]
fn free_functions_follow_the_environment() {
    // Not under systemd: no-ops that succeed.
    std::env::remove_var("NOTIFY_SOCKET");
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
    systemd::notify_ready().unwrap();
    systemd::notify_status("x").unwrap();
    systemd::notify_watchdog().unwrap();
    systemd::notify_stopping().unwrap();
    assert_eq!(systemd::watchdog_interval(), None);
    assert!(Watchdog::from_env(vec![Heartbeat::new("ingest loop")])
        .unwrap()
        .is_none());

    let dir = tempfile::tempdir().unwrap();
    let (socket, path) = bind_in(&dir);
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "200000");
    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
    assert_eq!(
        systemd::watchdog_interval(),
        Some(Duration::from_millis(200))
    );
    systemd::notify_ready().unwrap();
    assert_eq!(recv_one(&socket), "READY=1");
    systemd::notify_status("running").unwrap();
    assert_eq!(recv_one(&socket), "STATUS=running");

    // A watchdog from the environment checks every WATCHDOG_USEC / 2.
    let heartbeat = Heartbeat::new("ingest loop");
    let watchdog = Watchdog::from_env(vec![heartbeat.clone()])
        .unwrap()
        .expect("watchdog requested by the environment");
    assert_eq!(watchdog.period(), Duration::from_millis(100));
    // Beats until the watchdog has pinged twice (its checks run when the machine lets
    // them: counted, not timed).
    let deadline = Instant::now() + PATIENCE;
    while watchdog.stats().pings.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "fewer than 2 pings within {PATIENCE:?} of beating"
        );
        heartbeat.beat();
        std::thread::sleep(Duration::from_millis(10));
    }
    watchdog.stop();
    let got = collect(&socket, Duration::from_millis(100));
    assert!(
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2,
        "{got:?}"
    );

    systemd::notify_stopping().unwrap();
    assert_eq!(recv_one(&socket), "STOPPING=1");

    // Another process's watchdog is not ours.
    std::env::set_var("WATCHDOG_PID", "1");
    if std::process::id() != 1 {
        assert_eq!(systemd::watchdog_interval(), None);
    }
    std::env::remove_var("NOTIFY_SOCKET");
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
}

#[test]
fn watchdog_pings_only_while_the_probe_advances() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, path) = bind_in(&dir);
    let ingest = Heartbeat::new("ingest loop");
    let upstream = Heartbeat::new("upstream task");
    let period = Duration::from_millis(60);
    let watchdog = Watchdog::start(
        Notifier::from_socket(&path),
        period,
        vec![ingest.clone(), upstream.clone()],
    )
    .unwrap();

    // Beats `beats` every 5 ms and collects the datagrams until `done` holds of them; each
    // phase waits on what the watchdog sent (or counted), not on a window of time: on a
    // loaded machine a 60 ms check can come late, and this thread can miss a period (the
    // watchdog then rightly reports a stall).
    let beat_until = |beats: &[&Heartbeat], what: &str, done: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        loop {
            for hb in beats {
                hb.beat();
            }
            std::thread::sleep(Duration::from_millis(5));
            drain(&socket, &mut got);
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {PATIENCE:?}: {got:?}"
            );
        }
    };

    // Both loops iterate: pings flow. The phase ends on two pings in a row, so no stall
    // (this thread starved for a period) is being reported when the ingest loop wedges.
    beat_until(&[&ingest, &upstream], "3 pings while alive", &|got| {
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3 && ends_with_two_pings(got)
    });

    // The ingest loop wedges while the upstream task still runs. The first check may
    // still see ingest beats from before the wedge and ping once; after that no ping at
    // all, and a STATUS that names the stalled loop (sent at the first stalled check,
    // before the next check counts).
    let withheld = || watchdog.stats().withheld.load(Ordering::Relaxed);
    let withheld_before = withheld();
    let upstream_only = beat_until(&[&upstream], "3 checks withheld", &|_| {
        withheld() >= withheld_before + 3
    });
    let status_at = upstream_only
        .iter()
        .position(|m| m.starts_with("STATUS=watchdog: no progress from ingest loop"))
        .unwrap_or_else(|| panic!("no stall status: {upstream_only:?}"));
    assert!(
        !upstream_only[status_at..].iter().any(|m| m == "WATCHDOG=1"),
        "pinged while the ingest loop was stalled: {upstream_only:?}"
    );
    assert!(
        upstream_only[..status_at].len() <= 1,
        "more than one ping after the wedge: {upstream_only:?}"
    );

    // It recovers: pings resume and the status says so.
    beat_until(&[&ingest, &upstream], "recovery", &|got| {
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
            && got.iter().any(|m| m == "STATUS=running")
    });

    // Stopped (the thread is joined: nothing more can be sent): silence, even while
    // beating.
    watchdog.stop();
    let _ = collect(&socket, Duration::from_millis(10));
    let after_stop = std::thread::scope(|s| {
        let beating = s.spawn(|| {
            let end = Instant::now() + Duration::from_millis(200);
            while Instant::now() < end {
                ingest.beat();
                upstream.beat();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let got = collect(&socket, Duration::from_millis(200));
        let _ = beating.join();
        got
    });
    assert!(after_stop.is_empty(), "{after_stop:?}");
}
