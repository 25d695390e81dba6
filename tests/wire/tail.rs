//! `sluice tail` against a tiny in-test Jetstream v1 server on 127.0.0.1: JSONL output,
//! filters and cursor as query parameters, cursor-file save/resume across a restart with
//! no duplicate and no gap, reconnect after the server drops, refusals, bounded runs.

// tungstenite's handshake callback fixes the large `Err` type of the server below.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use sluice::consumer::{self, StopReason, TailArgs};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::{
    handshake::server::{ErrorResponse, Request, Response},
    http::StatusCode,
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

const LIMIT: Duration = Duration::from_secs(20);

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    tail: TailArgs,
}

fn args(addr: std::net::SocketAddr, extra: &[&str]) -> TailArgs {
    let url = format!("ws://{addr}/subscribe");
    let mut argv = vec![
        "tail",
        "--url",
        &url,
        "--no-progress",
        "--backoff-min",
        "10ms",
        "--backoff-max",
        "50ms",
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).tail
}

/// Jetstream-v1-shaped commit events; several share a `time_us`, as the ops of one
/// commit do on a real Jetstream.
fn events(n: usize) -> Vec<(i64, String)> {
    let base = 1_751_609_602_000_000i64;
    (0..n)
        .map(|i| {
            let time_us = base + (i as i64 / 3) * 1000 + if i % 3 == 2 { 1 } else { 0 };
            let json = serde_json::json!({
                "did": format!("did:plc:test{}", i % 4),
                "time_us": time_us,
                "kind": "commit",
                "commit": {
                    "rev": format!("3lrev{}", i / 3),
                    "operation": "create",
                    "collection": "app.bsky.feed.post",
                    "rkey": format!("3lrkey{i}"),
                    "record": {"$type": "app.bsky.feed.post", "text": format!("post number {i}"),
                               "createdAt": "2025-07-04T06:13:22.000Z"},
                    "cid": format!("bafyrei{i}")
                }
            });
            (time_us, json.to_string())
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Mode {
    Serve,
    /// Drop the first connection abruptly after this many events.
    DropFirstAfter(usize),
    /// Refuse every handshake with this status.
    Refuse(u16),
    /// Close the first connection with this code and reason after this many events.
    CloseFirstAfter(usize, u16, &'static str),
}

struct Server {
    addr: std::net::SocketAddr,
    /// Request URIs (path and query) of every handshake, in order.
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn queries(&self) -> Vec<url::Url> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|uri| url::Url::parse(&format!("ws://x{uri}")).unwrap())
            .collect()
    }
}

fn param(url: &url::Url, key: &str) -> Vec<String> {
    url.query_pairs()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// Serves `events` honouring `cursor` inclusively, then stays open and idle.
async fn start_server(events: Vec<(i64, String)>, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reqs = requests.clone();
    tokio::spawn(async move {
        let mut connection = 0usize;
        while let Ok((tcp, _)) = listener.accept().await {
            connection += 1;
            let reqs = reqs.clone();
            let events = events.clone();
            let uri = Arc::new(Mutex::new(String::new()));
            let uri_in_cb = uri.clone();
            let callback = move |req: &Request,
                                 resp: Response|
                  -> Result<Response, ErrorResponse> {
                let path = req.uri().to_string();
                reqs.lock().unwrap().push(path.clone());
                *uri_in_cb.lock().unwrap() = path;
                if let Mode::Refuse(status) = mode {
                    let mut err = ErrorResponse::new(Some("wantedCollections: bad NSID".into()));
                    *err.status_mut() = StatusCode::from_u16(status).unwrap();
                    err.headers_mut()
                        .insert("retry-after", "0".parse().unwrap());
                    return Err(err);
                }
                Ok(resp)
            };
            let this_connection = connection;
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let uri = uri.lock().unwrap().clone();
                let url = url::Url::parse(&format!("ws://x{uri}")).unwrap();
                let cursor: Option<i64> = param(&url, "cursor").first().map(|c| c.parse().unwrap());
                let mut sent = 0usize;
                for (time_us, json) in &events {
                    if cursor.is_some_and(|c| *time_us < c) {
                        continue;
                    }
                    if let Mode::DropFirstAfter(k) = mode {
                        if this_connection == 1 && sent == k {
                            // Abrupt: no close frame, the TCP connection just goes away.
                            drop(ws);
                            return;
                        }
                    }
                    if let Mode::CloseFirstAfter(k, code, reason) = mode {
                        if this_connection == 1 && sent == k {
                            let frame = CloseFrame {
                                code: CloseCode::from(code),
                                reason: reason.into(),
                            };
                            let _ = ws.close(Some(frame)).await;
                            while let Some(Ok(_)) = ws.next().await {}
                            return;
                        }
                    }
                    if ws.send(Message::text(json.clone())).await.is_err() {
                        return;
                    }
                    sent += 1;
                }
                if matches!(mode, Mode::DropFirstAfter(_)) && this_connection == 1 {
                    return;
                }
                // Idle, answering pings, until the client leaves.
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    Server { addr, requests }
}

#[derive(Clone, Default)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOut {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

async fn run_tail(args: TailArgs) -> (Vec<String>, consumer::TailSummary) {
    let out = SharedOut::default();
    let summary = tokio::time::timeout(
        LIMIT,
        consumer::tail(&args, out.clone(), std::future::pending::<()>()),
    )
    .await
    .expect("tail finished in time")
    .expect("tail succeeded");
    (out.lines(), summary)
}

#[tokio::test]
async fn jsonl_is_verbatim_and_filters_are_query_params() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(12);
    let server = start_server(evs.clone(), Mode::Serve).await;
    let a = args(
        server.addr,
        &[
            "--collection",
            "app.bsky.feed.post",
            "--collection",
            "app.bsky.graph.*",
            "--did",
            "did:plc:test0",
            "--did",
            "did:plc:test1",
            "--cursor",
            &evs[0].0.to_string(),
            "--format",
            "jsonl",
            "--count",
            "5",
        ],
    );
    let (lines, summary) = run_tail(a).await;
    let expected: Vec<String> = evs[..5].iter().map(|(_, j)| j.clone()).collect();
    assert_eq!(lines, expected);
    assert_eq!(summary.stop, StopReason::Count);
    assert_eq!(summary.events, 5);
    let q = server.queries();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].path(), "/subscribe");
    assert_eq!(
        param(&q[0], "wantedCollections"),
        ["app.bsky.feed.post", "app.bsky.graph.*"]
    );
    assert_eq!(
        param(&q[0], "wantedDids"),
        ["did:plc:test0", "did:plc:test1"]
    );
    assert_eq!(param(&q[0], "cursor"), [evs[0].0.to_string()]);
}

#[tokio::test]
async fn pretty_prints_one_human_line_per_event() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(3);
    let server = start_server(evs, Mode::Serve).await;
    let (lines, _) = run_tail(args(server.addr, &["--count", "3"])).await;
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        "2025-07-04T06:13:22.000Z did:plc:test0 commit create app.bsky.feed.post/3lrkey0 \"post number 0\""
    );
    // Without a cursor the request asks for live.
    assert!(param(&server.queries()[0], "cursor").is_empty());
}

#[tokio::test]
async fn cursor_file_resumes_without_duplicate_or_gap() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(20);
    let all: Vec<String> = evs.iter().map(|(_, j)| j.clone()).collect();
    let server = start_server(evs.clone(), Mode::Serve).await;
    let dir = tempfile::tempdir().unwrap();
    let cursor_path = dir.path().join("tail.cursor");
    let cursor_arg = cursor_path.to_str().unwrap();
    let start = evs[0].0.to_string();

    // First run stops in the middle of a group of events sharing one time_us.
    let (first, s1) = run_tail(args(
        server.addr,
        &[
            "--format",
            "jsonl",
            "--cursor",
            &start,
            "--cursor-file",
            cursor_arg,
            "--count",
            "7",
        ],
    ))
    .await;
    assert_eq!(first, all[..7]);
    assert_eq!(s1.last_time_us, Some(evs[6].0));
    let saved = std::fs::read_to_string(&cursor_path).unwrap();
    assert_eq!(saved.lines().next(), Some(evs[6].0.to_string().as_str()));
    assert_eq!(evs[6].0, evs[7].0, "the stop splits a time_us group");

    // Second run: the file wins over --cursor; the inclusive overlap is skipped.
    let (second, s2) = run_tail(args(
        server.addr,
        &[
            "--format",
            "jsonl",
            "--cursor",
            &start,
            "--cursor-file",
            cursor_arg,
            "--count",
            "13",
        ],
    ))
    .await;
    let q = server.queries();
    assert_eq!(param(&q[1], "cursor"), [evs[6].0.to_string()]);
    assert_eq!(
        s2.duplicates_skipped, 1,
        "event 6 came back once and was skipped"
    );
    let mut joined = first;
    joined.extend(second);
    assert_eq!(joined, all, "no duplicate and no gap across the restart");
    let saved = std::fs::read_to_string(&cursor_path).unwrap();
    assert_eq!(saved.lines().next(), Some(evs[19].0.to_string().as_str()));
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 1, "only the cursor file, no temp files");
}

#[tokio::test]
async fn reconnects_after_a_server_drop_and_resumes_from_its_cursor() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(20);
    let all: Vec<String> = evs.iter().map(|(_, j)| j.clone()).collect();
    // Dropping after 7 events splits the group of events 6..=7 (same time_us).
    let server = start_server(evs.clone(), Mode::DropFirstAfter(7)).await;
    let (lines, summary) = run_tail(args(
        server.addr,
        &[
            "--format",
            "jsonl",
            "--cursor",
            &evs[0].0.to_string(),
            "--count",
            "20",
        ],
    ))
    .await;
    assert_eq!(lines, all);
    assert_eq!(summary.connections, 2);
    assert_eq!(summary.duplicates_skipped, 1);
    let q = server.queries();
    assert_eq!(q.len(), 2);
    assert_eq!(param(&q[1], "cursor"), [evs[6].0.to_string()]);
}

#[tokio::test]
async fn a_drop_before_any_event_resumes_from_connect_time_not_live() {
    let _machine = crate::exclusive::shared().await;
    let server = start_server(Vec::new(), Mode::DropFirstAfter(0)).await;
    let before = sluice::clock::now_us();
    let (lines, summary) = run_tail(args(server.addr, &["--duration", "400ms"])).await;
    assert!(lines.is_empty());
    assert_eq!(summary.stop, StopReason::Duration);
    let q = server.queries();
    assert!(q.len() >= 2, "{q:?}");
    assert!(param(&q[0], "cursor").is_empty());
    let resumed: i64 = param(&q[1], "cursor")[0].parse().unwrap();
    assert!(resumed >= before && resumed <= sluice::clock::now_us());
}

#[tokio::test]
async fn ctrl_c_saves_the_cursor_of_what_was_printed() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(30);
    let server = start_server(evs.clone(), Mode::Serve).await;
    let dir = tempfile::tempdir().unwrap();
    let cursor_path = dir.path().join("c");
    let a = args(
        server.addr,
        &[
            "--format",
            "jsonl",
            "--cursor",
            &evs[0].0.to_string(),
            "--cursor-file",
            cursor_path.to_str().unwrap(),
        ],
    );
    let out = SharedOut::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let out_in_task = out.clone();
    let task = tokio::spawn(async move {
        consumer::tail(&a, out_in_task, async {
            let _ = stop_rx.await;
        })
        .await
    });
    tokio::time::timeout(LIMIT, async {
        while out.lines().len() < 30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all events printed");
    stop_tx.send(()).unwrap();
    let summary = tokio::time::timeout(LIMIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.stop, StopReason::Interrupted);
    let saved = std::fs::read_to_string(&cursor_path).unwrap();
    assert_eq!(saved.lines().next(), Some(evs[29].0.to_string().as_str()));
}

#[tokio::test]
async fn an_invalid_request_fails_fast_instead_of_retrying() {
    let _machine = crate::exclusive::shared().await;
    let server = start_server(Vec::new(), Mode::Refuse(400)).await;
    let out = SharedOut::default();
    let result = tokio::time::timeout(
        LIMIT,
        consumer::tail(
            &args(server.addr, &["--collection", "app.bsky.feed.post"]),
            out,
            std::future::pending::<()>(),
        ),
    )
    .await
    .unwrap();
    let err = result.expect_err("a 400 is fatal");
    assert!(format!("{err:#}").contains("400"), "{err:#}");
    assert_eq!(server.queries().len(), 1);
}

#[tokio::test]
async fn overload_answers_are_retried() {
    let _machine = crate::exclusive::shared().await;
    let server = start_server(Vec::new(), Mode::Refuse(503)).await;
    let (_, summary) = run_tail(args(server.addr, &["--duration", "300ms"])).await;
    assert_eq!(summary.stop, StopReason::Duration);
    assert!(
        server.queries().len() >= 2,
        "retried after 503 Retry-After: 0"
    );
}

#[tokio::test]
async fn bad_filters_are_rejected_before_connecting() {
    let _machine = crate::exclusive::shared().await;
    let server = start_server(Vec::new(), Mode::Serve).await;
    let out = SharedOut::default();
    let result = consumer::tail(
        &args(server.addr, &["--collection", "*"]),
        out,
        std::future::pending::<()>(),
    )
    .await;
    assert!(result.is_err());
    assert!(server.queries().is_empty());
}

#[tokio::test]
async fn a_restarting_server_is_resumed_after_its_retry_hint() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(12);
    let all: Vec<String> = evs.iter().map(|(_, j)| j.clone()).collect();
    let server = start_server(
        evs.clone(),
        Mode::CloseFirstAfter(
            5,
            1012,
            "sluice is restarting; resume with your cursor in 1 s",
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let (lines, summary) = run_tail(args(
        server.addr,
        &[
            "--format",
            "jsonl",
            "--cursor",
            &evs[0].0.to_string(),
            "--count",
            "12",
        ],
    ))
    .await;
    assert_eq!(lines, all);
    assert_eq!(summary.connections, 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "reconnected before the server's hint: {:?}",
        started.elapsed()
    );
    assert_eq!(
        param(&server.queries()[1], "cursor"),
        [evs[4].0.to_string()]
    );
}

#[tokio::test]
async fn a_cursor_out_of_retention_stops_instead_of_skipping() {
    let _machine = crate::exclusive::shared().await;
    let evs = events(6);
    let server = start_server(
        evs.clone(),
        Mode::CloseFirstAfter(
            2,
            1008,
            "CursorTooOld: position fell out of retention (oldest seq 9)",
        ),
    )
    .await;
    let out = SharedOut::default();
    let result = tokio::time::timeout(
        LIMIT,
        consumer::tail(
            &args(server.addr, &["--format", "jsonl"]),
            out.clone(),
            std::future::pending::<()>(),
        ),
    )
    .await
    .unwrap();
    let err = result.expect_err("CursorTooOld is fatal");
    assert!(format!("{err:#}").contains("CursorTooOld"), "{err:#}");
    assert_eq!(out.lines().len(), 2);
    assert_eq!(server.queries().len(), 1);
}
