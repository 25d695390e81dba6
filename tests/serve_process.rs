//! The real `sluice serve` binary under a fake systemd: READY once listening, watchdog pings
//! tied to ingest liveness, SIGHUP reloads without dropping anyone, SIGTERM closes
//! subscribers with 1012 and loses nothing: after a restart they resume from their cursors
//! with no gap and no duplicate.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{generate, SynthOptions};
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Serve {
    child: Child,
    port: u16,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(upstream: &str, data: &std::path::Path, notify: &std::path::Path) -> Serve {
    let port = free_port();
    let admin = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--upstream", upstream, "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--shutdown-timeout-secs", "15", "--retry-after-secs", "1"])
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Serve { child, port }
}

/// Collects sd_notify datagrams until `want` has been seen (or the deadline passes).
fn wait_for_notify(socket: &UnixDatagram, seen: &mut Vec<String>, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if seen.iter().any(|m| m.lines().any(|l| l == want)) {
            return;
        }
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_fan_out_loses_nothing() {
    let now_ms = sluice::clock::now_us() / 1000 - 120_000;
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count: 3000,
        start_time_ms: now_ms,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames),
        listen: Listen::Listener(listener),
        // ~2 ms between frames at real speed: 3000 frames last several seconds at 1x.
        speed: Speed::Factor(1.0),
        looped: false,
    }));
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let data = dir.path().join("data");
    let mut seen = Vec::new();

    let serve = spawn_serve(&upstream, &data, &notify_path);
    wait_for_notify(&notify, &mut seen, "READY=1", Duration::from_secs(30));
    let url = format!(
        "ws://127.0.0.1:{}/xrpc/network.bsky.jetstream.subscribeEvents?cursor=1",
        serve.port
    );
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut seqs: Vec<u64> = Vec::new();
    // Read a while, then reload, then keep reading on the same connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    while seqs.len() < 500 && Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(5), client.next()).await
        {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if let Some(seq) = v["payload"]["seq"].as_u64() {
                seqs.push(seq);
            }
        }
    }
    assert!(seqs.len() >= 500, "stream flows before SIGHUP");
    signal(&serve.child, "-HUP");
    wait_for_notify(&notify, &mut seen, "RELOADING=1", Duration::from_secs(10));
    let before = seqs.len();
    while seqs.len() < before + 200 && Instant::now() < deadline + Duration::from_secs(10) {
        match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if let Some(seq) = v["payload"]["seq"].as_u64() {
                    seqs.push(seq);
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("subscriber dropped by SIGHUP: {other:?}"),
        }
    }
    assert!(
        seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "watchdog pings while ingest is alive: {seen:?}"
    );
    // SIGTERM mid-stream: the subscriber is closed with 1012 and a retry hint.
    signal(&serve.child, "-TERM");
    let mut close_code = None;
    let close_deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < close_deadline {
        match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if let Some(seq) = v["payload"]["seq"].as_u64() {
                    seqs.push(seq);
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_code = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let (code, reason) = close_code.expect("a close frame on shutdown");
    assert_eq!(code, 1012);
    assert!(reason.contains("resume"), "{reason}");
    wait_for_notify(&notify, &mut seen, "STOPPING=1", Duration::from_secs(10));
    let mut serve = serve;
    let status = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = serve.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(status.success(), "clean exit: {status:?}");
    drop(serve);

    // Restart on the same data dir; the subscriber resumes from its cursor.
    let last = *seqs.last().unwrap();
    seen.clear();
    let serve = spawn_serve(&upstream, &data, &notify_path);
    wait_for_notify(&notify, &mut seen, "READY=1", Duration::from_secs(30));
    let url = format!(
        "ws://127.0.0.1:{}/xrpc/network.bsky.jetstream.subscribeEvents?cursor={}",
        serve.port,
        last + 1
    );
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut resumed = Vec::new();
    while resumed.len() < 300 {
        match tokio::time::timeout(Duration::from_secs(10), client.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if let Some(seq) = v["payload"]["seq"].as_u64() {
                    resumed.push(seq);
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "resumed stream ended early after {} events: {other:?}",
                resumed.len()
            ),
        }
    }
    seqs.extend(resumed);
    for pair in seqs.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "gapless and duplicate-free across the restart"
        );
    }
    drop(serve);
}

/// The value of an unlabelled metric on the admin listener, once it answers.
fn metric_from(admin: u16, name: &str) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
            use std::io::{Read, Write};
            let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            let mut text = String::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut text).is_ok()
            {
                return text.lines().find_map(|line| {
                    let (key, value) = line.rsplit_once(' ')?;
                    (key == name).then(|| value.parse().ok())?
                });
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("admin listener on {admin} did not answer within 30 s");
}

/// `worker_threads` sizes the async runtime, and is read from the config file too, which is
/// resolved before the runtime starts. The default is one worker per core.
#[test]
fn worker_threads_sizes_the_runtime_from_flag_or_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "worker_threads = 3\n").unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let cases: [(&[&str], usize); 3] = [
        (&["--worker-threads", "1"], 1),
        (&["--config", config.to_str().unwrap()], 3),
        (&[], cores),
    ];
    for (i, (extra, want)) in cases.into_iter().enumerate() {
        let admin = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            // Nothing listens upstream: the daemon keeps retrying, its listeners still serve.
            .args([
                "serve",
                "--upstream",
                &format!("ws://127.0.0.1:{}", free_port()),
            ])
            .arg("--data-dir")
            .arg(dir.path().join(format!("data{i}")))
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(extra)
            .env_remove("SLUICE_WORKER_THREADS")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let serve = Serve { child, port: 0 };
        let workers = metric_from(admin, "sluice_runtime_worker_threads");
        drop(serve);
        assert_eq!(workers, Some(want as f64), "case {extra:?}");
    }
}

/// The daemon binary allocates with jemalloc (DECISIONS, "Subscriber writes", session 18):
/// asked through jemalloc's own settings variable to print its statistics at exit, the binary
/// does; with glibc's malloc (or any other allocator) nothing reads the variable and nothing
/// is printed.
#[test]
fn the_daemon_binary_allocates_with_jemalloc() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice --version failed: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Begin jemalloc statistics"),
        "no jemalloc statistics on stderr; the daemon is not on jemalloc: {stderr}"
    );
}
