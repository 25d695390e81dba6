//! `kill -9` at random moments during ingest, 20 times, then a clean run: the log holds
//! every upstream event exactly once, in order, with sluice seqs gapless from 1.

mod serve_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sluice::log::{Log, LogConfig};

const KILLS: usize = 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `sluice serve` child that is killed if the test panics before stopping it.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(upstream: &str, data: &std::path::Path, port: u16) -> Serve {
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--upstream", upstream, "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        // Short commit interval: more commits, so kills land before, inside and after them.
        .args([
            "--commit-interval-ms",
            "20",
            "--backoff-min-ms",
            "20",
            "--backoff-max-ms",
            "200",
        ])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(data.with_extension("log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Serve(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_nines_lose_and_duplicate_nothing() {
    // Paced so the 20 kills all land while frames are still arriving.
    let (frames, upstream) = serve_common::paced_upstream(4000, 9, 0.8).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut durable_after_kill = Vec::new();
    for _ in 0..KILLS {
        let mut child = spawn(&upstream, &data, free_port());
        let wait = Duration::from_millis(rng.gen_range(150..700));
        tokio::time::sleep(wait).await;
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        let (log, state) = Log::open(LogConfig::new(&data)).unwrap();
        durable_after_kill.push(state.next_seq - 1);
        drop(log);
    }
    // The kills landed while ingest was under way, not all before or after it.
    assert!(
        durable_after_kill.windows(2).all(|w| w[1] >= w[0]),
        "{durable_after_kill:?}"
    );
    let mid_stream = durable_after_kill.iter().filter(|&&n| n > 0).count();
    assert!(mid_stream >= KILLS / 2, "{durable_after_kill:?}");
    // A final clean run until every frame is in.
    let port = free_port();
    let mut child = spawn(&upstream, &data, port);
    let last_upstream = serve_common::upstream_seq(frames.last().unwrap());
    // Ready when the raw wire delivers the last upstream frame.
    let probe = serve_common::raw_wire_delivers(port, frames.last().unwrap());
    tokio::time::timeout(Duration::from_secs(90), probe)
        .await
        .expect("the final run ingests everything within 90 s");
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.0.wait().unwrap();
    assert!(
        exit.success(),
        "clean exit after SIGTERM: {exit:?}\n{}",
        std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
    );
    let (log, state) = Log::open(LogConfig::new(&data)).unwrap();
    assert_eq!(state.upstream_cursor, Some(last_upstream));
    let reader = log.reader();
    let mut events = Vec::new();
    let mut next = 1;
    while next <= reader.newest_seq() {
        let batch = reader.read_from(next, 10_000, usize::MAX).unwrap();
        next = batch.last().unwrap().seq + 1;
        events.extend(batch);
    }
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "sluice seq gapless from 1");
    }
    let raw: Vec<Bytes> = events
        .iter()
        .filter_map(|e| sluice::wire::raw::frame_of(e).cloned())
        .collect();
    assert_eq!(raw.len(), frames.len(), "every upstream frame exactly once");
    assert!(raw == frames, "in order, byte for byte");
}
