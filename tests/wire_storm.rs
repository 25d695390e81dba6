//! Reconnect storms, end to end over real websockets while ingest runs: many v1 and v2
//! clients follow the stream from its start, all drop at once (sockets closed without a
//! close handshake, as in a network blip), all reconnect at once with their last cursor,
//! and every one must end with the complete, gapless, duplicate-free stream of the whole
//! capture. One storm is admitted by raised limits; a smaller one runs against tight
//! limits and succeeds because the clients honour `Retry-After`.
//!
//! fds: 2,000 clients plus 2,000 server sockets need ~4,100 descriptors; `ulimit -n` here
//! is 20,000. `SLUICE_STORM_CLIENTS` overrides the count of the big storm.

mod exclusive;
// Uses a few of the wire tests' helpers.
#[allow(dead_code, unused_imports)]
mod wire_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use sluice::upstream::replay::Speed;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use wire_common::*;

#[derive(Default)]
struct Counters {
    refused: AtomicU64,
    connects: AtomicU64,
    /// Handshakes that timed out or were reset, then retried.
    transport_retries: AtomicU64,
}

/// Connects, sleeping the server's `Retry-After` (plus up to 1 s of our own jitter) on a
/// 429/503, until `deadline`. A connection the machine could not set up in time (a timed
/// out or reset handshake: 2,000 simultaneous connects overflow a loaded machine's accept
/// queue) is retried after a jittered pause, as a real client does; those are counted apart.
async fn connect_honouring_retry_after(
    url: &str,
    deadline: tokio::time::Instant,
    counters: &Counters,
) -> Ws {
    use tokio_tungstenite::tungstenite::Error as WsError;
    loop {
        let attempt = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(url)).await;
        match attempt {
            Ok(Ok((ws, _))) => {
                counters.connects.fetch_add(1, Ordering::Relaxed);
                return ws;
            }
            Ok(Err(WsError::Http(response))) => {
                let status = response.status().as_u16();
                assert!(
                    status == 429 || status == 503,
                    "refused with {status}: {:?}",
                    response.body()
                );
                counters.refused.fetch_add(1, Ordering::Relaxed);
                let secs: u64 = response
                    .headers()
                    .get("retry-after")
                    .unwrap_or_else(|| panic!("{status} without Retry-After"))
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let jitter = rand::thread_rng().gen_range(0..1000);
                let wake = tokio::time::Instant::now()
                    + Duration::from_secs(secs)
                    + Duration::from_millis(jitter);
                assert!(wake < deadline, "still refused at the deadline");
                tokio::time::sleep_until(wake).await;
            }
            Ok(Err(WsError::Io(_))) | Err(_) => {
                counters.transport_retries.fetch_add(1, Ordering::Relaxed);
                let wake = tokio::time::Instant::now()
                    + Duration::from_millis(rand::thread_rng().gen_range(100..1000));
                assert!(wake < deadline, "could not connect by the deadline");
                tokio::time::sleep_until(wake).await;
            }
            Ok(Err(e)) => panic!("connect to {url}: unexpected error {e}"),
        }
    }
}

/// One client: follows from the start of the log, drops its socket when `drop_now` fires,
/// reconnects with its last cursor and follows until `target`. Returns every position.
async fn storm_client(
    base: String,
    wire: Wire,
    mut drop_now: watch::Receiver<bool>,
    target: Arc<AtomicU64>,
    counters: Arc<Counters>,
    deadline: tokio::time::Instant,
) -> Vec<u64> {
    let key = if wire == Wire::V1 { "cursor" } else { "seq" };
    let url = |resume: Option<(u64, i64)>| match (wire, resume) {
        (Wire::V1, None) => format!("{base}/subscribe?cursor=1"),
        (Wire::V1, Some((_, time_us))) => format!("{base}/subscribe?cursor={}", time_us + 1),
        (_, None) => format!("{base}{V2_PATH}?cursor=1"),
        (_, Some((seq, _))) => format!("{base}{V2_PATH}?cursor={}", seq + 1),
    };
    let mut positions = Vec::new();
    let mut last: Option<(u64, i64)> = None;
    let mut ws = connect_honouring_retry_after(&url(None), deadline, &counters).await;
    let mut dropped = false;
    loop {
        if positions.last().copied().unwrap_or(0) >= target.load(Ordering::Acquire) {
            return positions;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client did not finish in time"
        );
        tokio::select! {
            _ = async { drop_now.wait_for(|&d| d).await.map(|_| ()) }, if !dropped => {
                dropped = true;
                // Abrupt: the TCP connection goes away with no close handshake.
                drop(ws);
                ws = connect_honouring_retry_after(&url(last), deadline, &counters).await;
            }
            message = tokio::time::timeout(Duration::from_millis(50), ws.next()) => {
                let text = match message {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(Message::Close(frame)))) => panic!("server closed: {frame:?}"),
                    Ok(Some(Ok(_))) => continue,
                    Ok(other) => panic!("stream ended: {other:?}"),
                };
                let pos = scan_u64(&text, key).unwrap_or_else(|| panic!("no {key} in {text}"));
                let time_us = match wire {
                    Wire::V1 => scan_u64(&text, "time_us").unwrap() as i64,
                    _ => 0,
                };
                positions.push(pos);
                last = Some((pos, time_us));
            }
        }
    }
}

struct Storm {
    clients: usize,
    frames: usize,
    speed: f64,
    tight_admission: bool,
}

async fn run_storm(storm: Storm) {
    let started = std::time::Instant::now();
    let frames = synth(storm.frames, 51, Duration::from_secs(1200));
    let tight = storm.tight_admission;
    let env = Env::start(frames, Speed::Factor(storm.speed), false, move |c| {
        if tight {
            c.admission.connects_per_sec = 100.0;
            c.admission.connect_burst = 100.0;
            c.admission.max_subscribers = storm.clients * 2;
            c.admission.retry_after_secs = 1;
        } else {
            c.admission.connects_per_sec = 1e6;
            c.admission.connect_burst = 1e6;
            c.admission.max_per_ip = 1_000_000;
            c.admission.max_subscribers = 1_000_000;
            // All 2,000 may be mid-handshake at once: no cap before the upgrade either,
            // and on a busy machine a handshake may wait long for the server itself.
            c.listen_limits.max_pending = 1_000_000;
            c.listen_limits.header_read_timeout = Duration::from_secs(60);
            c.listen_limits.handshake_timeout = Duration::from_secs(60);
        }
    })
    .await;
    env.wait_seq(1).await;
    let base = format!("ws://{}", env.addr());
    let (drop_tx, drop_rx) = watch::channel(false);
    let target_v1 = Arc::new(AtomicU64::new(u64::MAX));
    let target_v2 = Arc::new(AtomicU64::new(u64::MAX));
    let counters = Arc::new(Counters::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut tasks = Vec::with_capacity(storm.clients);
    for i in 0..storm.clients {
        let wire = if i % 2 == 0 { Wire::V1 } else { Wire::V2 };
        let target = if wire == Wire::V1 {
            target_v1.clone()
        } else {
            target_v2.clone()
        };
        tasks.push((
            wire,
            tokio::spawn(storm_client(
                base.clone(),
                wire,
                drop_rx.clone(),
                target,
                counters.clone(),
                deadline,
            )),
        ));
    }
    // Drop everyone at once, mid-ingest, after every client has connected.
    let wait_until = tokio::time::Instant::now() + Duration::from_secs(60);
    while counters.connects.load(Ordering::Relaxed) < storm.clients as u64 {
        assert!(
            tokio::time::Instant::now() < wait_until,
            "clients did not all connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let newest_at_drop = env.daemon.log.reader().newest_seq();
    let connected_in = started.elapsed();
    drop_tx.send(true).unwrap();
    env.wait_all_ingested().await;
    let all = env.events();
    assert!(
        newest_at_drop < all.last().unwrap().seq,
        "the drop came after ingest ended (clients took {connected_in:?} to connect); \
         slow the upstream down"
    );
    let want_v1: Vec<u64> = all
        .iter()
        .filter(|e| e.v1_json.is_some())
        .map(|e| e.seq)
        .collect();
    let want_v2: Vec<u64> = all
        .iter()
        .filter(|e| e.v2_json.is_some())
        .map(|e| e.seq)
        .collect();
    target_v1.store(*want_v1.last().unwrap(), Ordering::Release);
    target_v2.store(*want_v2.last().unwrap(), Ordering::Release);
    for (i, (wire, task)) in tasks.into_iter().enumerate() {
        let got = task.await.unwrap_or_else(|e| panic!("client {i}: {e}"));
        let want = if wire == Wire::V1 { &want_v1 } else { &want_v2 };
        assert!(
            &got == want,
            "client {i} ({wire:?}): {} events, expected {}; first difference at {:?}",
            got.len(),
            want.len(),
            got.iter().zip(want.iter()).position(|(a, b)| a != b)
        );
    }
    let refused = counters.refused.load(Ordering::Relaxed);
    eprintln!(
        "storm of {} clients: all connected after {connected_in:?} (log at seq {newest_at_drop} of {}), \
         {} connects, {refused} refusals, {} handshakes retried, done in {:?}",
        storm.clients,
        all.len(),
        counters.connects.load(Ordering::Relaxed),
        counters.transport_retries.load(Ordering::Relaxed),
        started.elapsed()
    );
    if tight {
        assert!(refused > 0, "the tight limits never refused anyone");
    } else {
        assert_eq!(refused, 0);
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_drop_at_once_and_resume_gapless() {
    // Each storm needs the whole machine: the two never run at once.
    let _machine = crate::exclusive::alone().await;
    let clients = std::env::var("SLUICE_STORM_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    run_storm(Storm {
        clients,
        frames: 600,
        speed: 0.06,
        tight_admission: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_against_tight_limits_succeeds_by_honouring_retry_after() {
    let _machine = crate::exclusive::alone().await;
    run_storm(Storm {
        clients: 300,
        frames: 600,
        speed: 0.05,
        tight_admission: true,
    })
    .await;
}
