//! The PyPI `atproto` package's `JetstreamClient` (Jetstream v2) against the real binaries:
//! `sluice replay` serves the real corpus, `sluice serve` ingests it, and the client runs as
//! its users run it (`tests/clients/pyatproto_jetstream_client.py`). With its default
//! `compress=True` it fetches the dictionary, opts in with `zstdDictionary` and must get
//! binary (compressed) messages, not fall back to text; starting fresh (`cursor=0`) it
//! must get every event from seq 1. Needs `python3` with `atproto` installed (`.ci/run`
//! installs it); fails loudly without.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use sluice::decode::DecodeLimits;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};

const NSID: &str = "network.bsky.jetstream.subscribeEvents";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn corpus_path() -> PathBuf {
    let dir = match std::env::var_os("SLUICE_UPSTREAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures-upstream"),
    };
    dir.join("jetstream-corpus/frames.bin")
}

/// (seq, did, `$type`) of every v2 event the corpus becomes, stamped from a fresh state as
/// the daemon stamps it: the ground truth, computed without the daemon.
fn expected_events(corpus: &Path) -> Vec<(u64, String, String)> {
    let frames = sluice::upstream::capture::read_all(corpus, 64 << 20)
        .unwrap_or_else(|e| panic!("the shared corpus is required ({}): {e}", corpus.display()));
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut out = Vec::new();
    for frame in frames {
        if let IngestOutcome::Events(events) = ingestor.ingest(Bytes::from(frame), i64::MAX / 2) {
            for e in events.into_iter().filter(|e| e.v2_json.is_some()) {
                let v: Value = serde_json::from_slice(e.v2_json.as_ref().unwrap()).unwrap();
                let kind = v["payload"]["$type"].as_str().unwrap().to_string();
                out.push((e.seq, e.did.to_string(), kind));
            }
        }
    }
    out
}

/// Waits until `GET path` answers 200.
fn wait_for_200(port: u16, path: &str, within: Duration) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if tcp.write_all(request.as_bytes()).is_ok()
                && tcp.read_exact(&mut head).is_ok()
                && &head[9..12] == b"200"
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("GET {path} on port {port} never answered 200 within {within:?}");
}

/// What the Python client reported.
struct Report {
    events: Vec<(u64, String, String)>,
    compressed: bool,
    binary: u64,
    text: u64,
    raw: String,
}

fn run_client(port: u16, cursor: u64, expect: usize, compress: bool) -> Report {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pyatproto_jetstream_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--base-uri", &format!("ws://127.0.0.1:{port}/xrpc")])
        .args(["--cursor", &cursor.to_string()])
        .args(["--expect", &expect.to_string()])
        .args(["--timeout", "30"]);
    if !compress {
        cmd.arg("--no-compress");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("python3 is required to run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(2),
        "the PyPI package atproto is required (pip install atproto): {stderr}"
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}): status {:?}, stdout {stdout}, stderr {stderr}",
            out.status
        )
    });
    assert!(
        out.status.success(),
        "the client did not get every event: error {}, {} events; stderr {stderr}",
        v["error"],
        v["events"].as_array().map_or(0, Vec::len)
    );
    let events = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_u64().unwrap(),
                e[1].as_str().unwrap().to_string(),
                e[2].as_str().unwrap().to_string(),
            )
        })
        .collect();
    Report {
        events,
        compressed: v["compressed"].as_bool().unwrap(),
        binary: v["binary_messages"].as_u64().unwrap(),
        text: v["text_messages"].as_u64().unwrap(),
        raw: stdout,
    }
}

#[test]
fn pypi_atproto_jetstream_client_gets_every_event_compressed_from_cursor_zero() {
    let _machine = crate::exclusive::shared_blocking();
    let corpus = corpus_path();
    let expected = expected_events(&corpus);
    assert_eq!(expected.first().map(|e| e.0), Some(1));
    assert!(expected.iter().all(|e| e.2.starts_with(NSID)));

    let dir = tempfile::tempdir().unwrap();
    let (upstream, port, admin) = (free_port(), free_port(), free_port());
    let bin = env!("CARGO_BIN_EXE_sluice");
    let quiet = |c: &mut Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    };
    let mut replay = Command::new(bin);
    replay.arg("replay").arg(&corpus).args([
        "--listen",
        &format!("127.0.0.1:{upstream}"),
        "--speed",
        "max",
    ]);
    quiet(&mut replay);
    let _replay = Running(replay.spawn().unwrap());
    let mut serve = Command::new(bin);
    serve
        .args(["serve", "--upstream", &format!("ws://127.0.0.1:{upstream}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--backoff-min-ms", "20", "--backoff-max-ms", "200"]);
    quiet(&mut serve);
    let _serve = Running(serve.spawn().unwrap());
    let last = expected.last().unwrap().0;
    wait_for_200(
        port,
        &format!("/event/{last}?wire=v2"),
        Duration::from_secs(60),
    );

    // Default: compressed. Then uncompressed, which must carry the same events.
    let compressed = run_client(port, 0, expected.len(), true);
    assert!(
        compressed.compressed,
        "the client fell back: {}",
        compressed.raw
    );
    assert_eq!(compressed.text, 0, "text messages on a compressed stream");
    assert_eq!(compressed.binary as usize, expected.len());
    assert_eq!(
        compressed.events, expected,
        "every event from seq 1, in order"
    );

    let plain = run_client(port, 0, expected.len(), false);
    assert!(!plain.compressed);
    assert_eq!(plain.binary, 0);
    assert_eq!(plain.text as usize, expected.len());
    assert_eq!(plain.events, expected);
}
