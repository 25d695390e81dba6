//! Three `sluice serve --redis` nodes on one real `redis-server`, fed by an in-test
//! upstream that honours `cursor`: the leader is SIGKILLed at random moments and restarted
//! as a standby; v1, v2 and raw subscribers follow the cluster across the deaths. Afterwards
//! every node's v2 wire returns seq 1..N gapless and its raw wire every upstream frame
//! exactly once, in order, and the subscribers saw the same (the v1 one: every event a
//! node's v1 wire replays, once, in order).

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{generate, SynthOptions};
use tokio_tungstenite::tungstenite::Message;

/// The number of leader kills, all while the upstream is sending.
const KILLS: usize = 20;

/// Events ingest makes of `frames` (what seq N must reach).
fn events_of(frames: &[Bytes]) -> u64 {
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    frames
        .iter()
        .map(
            |f| match ingestor.ingest(f.clone(), 1_900_000_000_000_000) {
                IngestOutcome::Events(e) => e.len() as u64,
                _ => 0,
            },
        )
        .sum()
}

/// A v2 subscriber that moves to the next node whenever its node goes away, resuming with
/// its cursor; returns every seq it saw until `last`.
async fn follow_v2(addrs: Vec<SocketAddr>, last: u64, limit: Duration) -> (Vec<u64>, usize) {
    let deadline = Instant::now() + limit;
    let mut seqs: Vec<u64> = Vec::new();
    let mut moves = 0;
    let mut at = 0;
    while seqs.last().copied().unwrap_or(0) < last {
        assert!(
            Instant::now() < deadline,
            "v2 follower: {} events by the deadline",
            seqs.len()
        );
        let cursor = seqs.last().map_or(1, |s| s + 1);
        let addr = addrs[at % addrs.len()];
        let url =
            format!("ws://{addr}/xrpc/network.bsky.jetstream.subscribeEvents?cursor={cursor}");
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            at += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if let Some(seq) = v["payload"]["seq"].as_u64() {
                        seqs.push(seq);
                        if seq >= last {
                            break;
                        }
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        if seqs.last().copied().unwrap_or(0) < last {
            moves += 1;
            at += 1;
        }
    }
    (seqs, moves)
}

/// The `(cursor, time_us)` of a v1 event.
fn v1_stamp(text: &str) -> Option<(u64, i64)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some((v["cursor"].as_u64()?, v["time_us"].as_i64()?))
}

/// A v1 subscriber that moves to the next node whenever its node goes away, resuming from
/// the time after its last event (v1 cursors are unix µs, inclusive); returns the
/// `(cursor, time_us)` of every event it saw, until one at or past `*until` (set later).
async fn follow_v1(
    addrs: Vec<SocketAddr>,
    until: tokio::sync::watch::Receiver<u64>,
    limit: Duration,
) -> Vec<(u64, i64)> {
    let deadline = Instant::now() + limit;
    let mut seen: Vec<(u64, i64)> = Vec::new();
    let mut at = 2;
    let done = |seen: &Vec<(u64, i64)>| seen.last().is_some_and(|l| l.0 >= *until.borrow());
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "v1 follower: {} events by the deadline",
            seen.len()
        );
        let cursor = seen.last().map_or(1, |l| l.1 + 1);
        let addr = addrs[at % addrs.len()];
        let url = format!("ws://{addr}/subscribe?cursor={cursor}");
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            at += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Some(stamp) = v1_stamp(&t) {
                        seen.push(stamp);
                        if done(&seen) {
                            break;
                        }
                    }
                }
                Ok(Some(Ok(_))) => {}
                // Idle while the target is unknown: keep reading this node.
                Err(_) if !done(&seen) && *until.borrow() == u64::MAX => {}
                _ => break,
            }
        }
        if !done(&seen) {
            at += 1;
        }
    }
    seen
}

/// Every v1 event a node replays from the start, until it has been idle for 3 s.
async fn v1_replay(addr: SocketAddr) -> Vec<(u64, i64)> {
    let url = format!("ws://{addr}/subscribe?cursor=1");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
        assert!(Instant::now() < deadline, "v1 replay from {addr}");
        if let Message::Text(t) = msg {
            seen.extend(v1_stamp(&t));
        }
    }
    seen
}

/// A raw subscriber that moves between nodes with its (exclusive) upstream cursor.
async fn follow_raw(
    addrs: Vec<SocketAddr>,
    after: i64,
    last: Bytes,
    limit: Duration,
) -> Vec<Bytes> {
    let deadline = Instant::now() + limit;
    let mut frames: Vec<Bytes> = Vec::new();
    let mut at = 1;
    while frames.last() != Some(&last) {
        assert!(
            Instant::now() < deadline,
            "raw follower: {} frames by the deadline",
            frames.len()
        );
        let cursor = frames.last().map_or(after, |f| upstream_seq(f));
        let addr = addrs[at % addrs.len()];
        let url = format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}");
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            at += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    let done = b == last;
                    frames.push(b);
                    if done {
                        break;
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        if frames.last() != Some(&last) {
            at += 1;
        }
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_lose_and_duplicate_nothing_on_any_node_or_subscriber() {
    let _machine = crate::exclusive::alone().await;
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count: 12_000,
        seed: 17,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let total = events_of(&frames);
    let first_upstream = upstream_seq(&frames[0]);
    let last_frame = frames.last().unwrap().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}", listener.local_addr().unwrap());
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|id| Node::new(id, dir.path(), &redis.url(), &upstream, &[]))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr()).collect();
    // Subscribers connect before the upstream starts, so they see the stream from seq 1.
    wait_for("every node serving", Duration::from_secs(60), || async {
        for n in &nodes {
            n.status().await?;
        }
        Some(())
    })
    .await;
    let v2 = tokio::spawn(follow_v2(addrs.clone(), total, Duration::from_secs(120)));
    let raw = tokio::spawn(follow_raw(
        addrs.clone(),
        first_upstream - 1,
        last_frame.clone(),
        Duration::from_secs(120),
    ));
    let (v1_until, v1_target) = tokio::sync::watch::channel(u64::MAX);
    let v1 = tokio::spawn(follow_v1(
        addrs.clone(),
        v1_target,
        Duration::from_secs(150),
    ));
    // ~500 frames/s (synth frames are 1-4 ms apart): ~24 s of traffic, about what 20 kills
    // a few hundred ms apart take (each waits for the next leader).
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames.clone()),
        listen: Listen::Listener(listener),
        speed: Speed::Factor(1.25),
        looped: false,
    }));
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut takeovers = Vec::new();
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..500))).await;
        let old = wait_for("a leader", Duration::from_secs(30), || leader(&nodes)).await;
        nodes[old].kill9();
        let killed = Instant::now();
        let new = wait_for(
            "a new leader after the kill",
            Duration::from_secs(30),
            || leader(&nodes),
        )
        .await;
        takeovers.push(killed.elapsed());
        assert_ne!(new, old, "kill {kill}: the killed node cannot lead");
        nodes[old].start();
    }
    eprintln!("takeover times (kill to a node reporting leader): {takeovers:?}");
    for n in &nodes {
        wait_for(
            &format!("{} to hold all {total} events", n.id),
            Duration::from_secs(90),
            || async { (n.newest_seq().await? == total).then_some(()) },
        )
        .await;
    }
    for n in &nodes {
        let seqs = v2_seqs(n.addr(), total).await;
        assert!(
            seqs.iter().copied().eq(1..=total),
            "{}: v2 from seq 1 is 1..{total} gapless, {} events",
            n.id,
            seqs.len()
        );
        let raw = raw_frames(n.addr(), first_upstream - 1, &last_frame).await;
        assert_eq!(
            raw.len(),
            frames.len(),
            "{}: every upstream frame exactly once",
            n.id
        );
        assert!(raw == frames, "{}: in order, byte for byte", n.id);
    }
    let (seen, moves) = v2.await.unwrap();
    assert!(
        seen.iter().copied().eq(1..=total),
        "the v2 subscriber saw 1..{total} once each across {moves} moves ({} events)",
        seen.len()
    );
    let seen_raw = raw.await.unwrap();
    assert!(
        seen_raw == frames,
        "the raw subscriber saw every frame once, in order"
    );
    // v1: what the moving subscriber saw is exactly what a node replays from the start.
    let replayed = v1_replay(nodes[0].addr()).await;
    assert!(
        replayed.len() as u64 >= total / 2,
        "{} v1 events",
        replayed.len()
    );
    assert!(
        replayed
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
        "v1 seqs and times increase"
    );
    v1_until.send_replace(replayed.last().unwrap().0);
    let seen_v1 = v1.await.unwrap();
    assert!(
        seen_v1 == replayed,
        "the v1 subscriber saw every v1 event once, in order ({} of {})",
        seen_v1.len(),
        replayed.len()
    );
    let metrics = nodes[0].metrics().await;
    for family in [
        "sluice_cluster_lease_epoch",
        "sluice_cluster_role",
        "sluice_cluster_takeovers_total",
        "sluice_cluster_append_seconds_bucket",
        "sluice_cluster_node_lag_events",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "{family} is described:\n{metrics}"
        );
    }
    for n in nodes.iter_mut() {
        n.stop();
    }
    let log = nodes.iter().map(|n| n.log()).collect::<Vec<_>>().join("\n");
    assert!(!log.contains("panicked"), "{log}");
}
