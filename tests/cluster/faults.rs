//! Cluster faults on real processes: a leader frozen past its lease (fencing), Redis
//! killed and restarted on its AOF during ingest, and a node away longer than the
//! stream's window (its too-old answers on the v2 and raw wires).

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{generate, SynthOptions};

/// Synthetic frames dated from now, so readiness (lag under 120 s) can be checked.
fn frames(count: usize, seed: u64) -> Vec<Bytes> {
    let now_ms = sluice::clock::now_us() / 1000;
    generate(&SynthOptions {
        count,
        seed,
        start_time_ms: now_ms - 5_000,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect()
}

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

/// Starts the in-test upstream at `speed` (synth frames are 1-4 ms apart).
async fn upstream(frames: &[Bytes], speed: f64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames.to_vec()),
        listen: Listen::Listener(listener),
        speed: Speed::Factor(speed),
        looped: false,
    }));
    url
}

/// Two nodes, `a` and `b`, on a fresh redis-server, following an upstream of `count`
/// synthetic frames (seed `seed`) at 1.25 times real time; returned once the leader has
/// ingested 300 events. Bound in this order, the nodes are dropped (killed) first.
struct TwoNodes {
    _dir: tempfile::TempDir,
    redis: RedisServer,
    frames: Vec<Bytes>,
    total: u64,
    leader: usize,
    nodes: Vec<Node>,
}

async fn two_nodes_ingesting(count: usize, seed: u64) -> TwoNodes {
    let frames = frames(count, seed);
    let total = events_of(&frames);
    let url = upstream(&frames, 1.25).await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = ["a", "b"]
        .iter()
        .map(|id| Node::new(id, dir.path(), &redis.url(), &url, &[]))
        .collect();
    let first = wait_for("a leader", Duration::from_secs(60), || leader(&nodes)).await;
    wait_for("ingest under way", Duration::from_secs(60), || async {
        (nodes[first].newest_seq().await? > 300).then_some(())
    })
    .await;
    TwoNodes {
        _dir: dir,
        redis,
        frames,
        total,
        leader: first,
        nodes,
    }
}

/// The epoch of every entry in the stream, in stream order.
async fn stream_epochs(redis: &RedisServer) -> Vec<u64> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<(String, Vec<(String, redis::Value)>)> = redis::cmd("XRANGE")
        .arg("sluice:{test}:stream")
        .arg("-")
        .arg("+")
        .query_async::<redis::Value>(&mut conn)
        .await
        .map(|v| match v {
            redis::Value::Array(items) => items
                .into_iter()
                .map(|e| match e {
                    redis::Value::Array(mut p) => {
                        let fields = match p.pop() {
                            Some(redis::Value::Array(f)) => f
                                .chunks(2)
                                .map(|kv| match (&kv[0], &kv[1]) {
                                    (redis::Value::BulkString(k), v) => {
                                        (String::from_utf8_lossy(k).into_owned(), v.clone())
                                    }
                                    other => panic!("{other:?}"),
                                })
                                .collect(),
                            other => panic!("{other:?}"),
                        };
                        let id = match p.pop() {
                            Some(redis::Value::BulkString(id)) => String::from_utf8(id).unwrap(),
                            other => panic!("{other:?}"),
                        };
                        (id, fields)
                    }
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        })
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let e = fields.iter().find(|(k, _)| k == "e").expect("entry epoch");
            match &e.1 {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).parse().unwrap(),
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

async fn assert_every_node_complete(nodes: &[Node], frames: &[Bytes], total: u64) {
    let first_upstream = upstream_seq(&frames[0]);
    let last = frames.last().unwrap();
    for n in nodes {
        wait_for(
            &format!("{} to hold all {total} events", n.id),
            Duration::from_secs(90),
            || async { (n.newest_seq().await? == total).then_some(()) },
        )
        .await;
        let seqs = v2_seqs(n.addr(), total).await;
        assert!(
            seqs.iter().copied().eq(1..=total),
            "{}: v2 1..{total} gapless",
            n.id
        );
        let raw = raw_frames(n.addr(), first_upstream - 1, last).await;
        assert!(
            raw == frames,
            "{}: every upstream frame exactly once, in order",
            n.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_appends_nothing_and_steps_down() {
    let _machine = crate::exclusive::shared().await;
    let TwoNodes {
        _dir,
        redis,
        frames,
        total,
        leader: old,
        mut nodes,
    } = two_nodes_ingesting(4000, 23).await;
    nodes[old].signal("STOP");
    let new = 1 - old;
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        || async { (nodes[new].role().await.as_deref() == Some("leader")).then_some(()) },
    )
    .await;
    // Let the new leader append for a while before the old one wakes up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[old].signal("CONT");
    wait_for(
        "the old leader to step down",
        Duration::from_secs(30),
        || async { (nodes[old].role().await.as_deref() == Some("standby")).then_some(()) },
    )
    .await;
    let log = nodes[old].log();
    assert!(
        log.contains("stepped down"),
        "the old leader says it stepped down:\n{log}"
    );
    assert_every_node_complete(&nodes, &frames, total).await;
    // Fencing: no entry of the old epoch comes after one of a newer epoch.
    let epochs = stream_epochs(&redis).await;
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "epochs along the stream: {epochs:?}"
    );
    assert!(
        epochs.first() < epochs.last(),
        "the stream holds both terms: {epochs:?}"
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_on_its_aof_loses_reuses_and_duplicates_nothing() {
    let _machine = crate::exclusive::shared().await;
    let TwoNodes {
        _dir,
        mut redis,
        frames,
        total,
        leader: _,
        mut nodes,
    } = two_nodes_ingesting(4000, 29).await;
    redis.kill9();
    // Both nodes keep serving what they hold and say why they are not ready.
    for n in &nodes {
        let (status, reason) = wait_for(
            "readyz to report redis",
            Duration::from_secs(20),
            || async { n.readyz().await.filter(|(s, _)| *s == 503) },
        )
        .await;
        assert_eq!(status, 503);
        assert!(reason.contains("redis"), "{}: {reason}", n.id);
        assert!(
            n.newest_seq().await.unwrap() > 300,
            "{} still serves its log",
            n.id
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    assert_every_node_complete(&nodes, &frames, total).await;
    for n in &nodes {
        wait_for("ready again", Duration::from_secs(20), || async {
            n.readyz().await.filter(|(s, _)| *s == 200)
        })
        .await;
    }
    for n in nodes.iter_mut() {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_longer_than_the_window_rejoins_with_a_recorded_discontinuity() {
    let _machine = crate::exclusive::shared().await;
    let frames = frames(5000, 31);
    let total = events_of(&frames);
    let url = upstream(&frames, 2.5).await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let window = [
        "--cluster-window-events",
        "1000",
        "--cluster-window-floor-events",
        "0",
    ];
    let mut a = Node::new("a", dir.path(), &redis.url(), &url, &window);
    wait_for("a to lead", Duration::from_secs(60), || async {
        (a.role().await.as_deref() == Some("leader")).then_some(())
    })
    .await;
    let mut b = Node::new("b", dir.path(), &redis.url(), &url, &window);
    let held = wait_for("b to hold some events", Duration::from_secs(60), || async {
        b.newest_seq().await.filter(|&n| n > 100)
    })
    .await;
    b.kill9();
    wait_for("a to hold everything", Duration::from_secs(90), || async {
        (a.newest_seq().await? == total).then_some(())
    })
    .await;
    // b's report goes stale (3 lease TTLs), then the window trims past it.
    wait_for(
        "the stream to be trimmed past b",
        Duration::from_secs(30),
        || async {
            let m = a.metrics().await;
            let trimmed = m
                .lines()
                .find(|l| l.starts_with("sluice_cluster_trimmed_entries_total"))?
                .rsplit(' ')
                .next()?
                .parse::<u64>()
                .ok()?;
            (trimmed > 0).then_some(())
        },
    )
    .await;
    b.start();
    wait_for("b to catch up", Duration::from_secs(60), || async {
        (b.newest_seq().await? == total).then_some(())
    })
    .await;
    let status = b.status().await.unwrap();
    assert_eq!(status["cluster"]["discontinuities"], 1, "{status}");
    let oldest = status["log"]["bounds"]["oldest_seq"].as_u64().unwrap();
    assert!(
        oldest > held + 1,
        "b's floor moved past its hole: oldest {oldest}, held {held}"
    );
    assert!(
        b.log().contains("DISCONTINUITY"),
        "b logs the discontinuity"
    );
    // Inside the hole: v2 answers CursorTooOld before the upgrade.
    let url = format!(
        "ws://{}/xrpc/network.bsky.jetstream.subscribeEvents?cursor={held}",
        b.addr()
    );
    let (code, body) = match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!(
            "a cursor inside the hole is refused before the upgrade: {:?}",
            other.map(|_| ())
        ),
    };
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("CursorTooOld"), "{body}");
    // Inside the hole, the raw wire says OutdatedCursor and starts at b's oldest frame.
    let first_up = upstream_seq(&frames[0]);
    let url = format!(
        "ws://{}/xrpc/com.atproto.sync.subscribeRepos?cursor={first_up}",
        b.addr()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut got: Vec<Bytes> = Vec::new();
    while got.len() < 11 {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(f))) => got.push(f),
            Some(Ok(_)) => {}
            other => panic!("raw from b ended: {other:?}"),
        }
    }
    match sluice::decode::decode_frame(&got[0], &Default::default()) {
        Ok(sluice::decode::DecodedFrame::Message(m)) => assert_eq!(m.t, "#info"),
        other => panic!("the raw wire's first answer: {other:?}"),
    }
    assert!(
        got[0].windows(14).any(|w| w == b"OutdatedCursor"),
        "the #info frame names OutdatedCursor"
    );
    let at = frames
        .iter()
        .position(|f| *f == got[1])
        .expect("then a frame of the upstream");
    assert!(at > 0, "b starts past its hole");
    assert!(got[1..] == frames[at..at + 10], "then gapless, in order");
    // From the new floor b serves gaplessly to the end; a still serves everything.
    let url = format!(
        "ws://{}/xrpc/network.bsky.jetstream.subscribeEvents?cursor={oldest}",
        b.addr()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut next = oldest;
    while next <= total {
        use futures_util::StreamExt;
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap();
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if let Some(seq) = v["payload"]["seq"].as_u64() {
                assert_eq!(seq, next, "b from its floor: gapless");
                next += 1;
            }
        }
    }
    assert!(v2_seqs(a.addr(), total).await.iter().copied().eq(1..=total));
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_lease_over_and_nothing_is_lost() {
    let _machine = crate::exclusive::shared().await;
    let TwoNodes {
        _dir,
        redis: _redis,
        frames,
        total,
        leader: old,
        mut nodes,
    } = two_nodes_ingesting(3000, 37).await;
    nodes[old].stop();
    assert!(
        nodes[old].log().contains("released the cluster lease"),
        "the leader hands the lease over on SIGTERM:\n{}",
        nodes[old].log()
    );
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        || async { (nodes[1 - old].role().await.as_deref() == Some("leader")).then_some(()) },
    )
    .await;
    nodes[old].start();
    assert_every_node_complete(&nodes, &frames, total).await;
    for n in nodes.iter_mut() {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_all_its_data_is_reseeded_from_the_node_holding_the_most() {
    let _machine = crate::exclusive::shared().await;
    let TwoNodes {
        _dir,
        redis,
        frames: _,
        total,
        leader: _,
        mut nodes,
    } = two_nodes_ingesting(4000, 41).await;
    assert!(redis.command(&["FUNCTION", "FLUSH"]).starts_with("+OK"));
    assert!(redis.command(&["FLUSHALL"]).starts_with("+OK"));
    for n in &nodes {
        wait_for(
            &format!("{} to hold all {total} events", n.id),
            Duration::from_secs(90),
            || async { (n.newest_seq().await? == total).then_some(()) },
        )
        .await;
    }
    let logs: String = nodes.iter().map(|n| n.log()).collect();
    assert!(
        logs.contains("REDIS HAD LOST THE CLUSTER STATE"),
        "the re-seed is logged loudly"
    );
    // The seq space continued: no seq was reused for another event. Every node serves the
    // same bytes for every seq it holds, and the node that re-seeded holds 1..N.
    let mut by_node = Vec::new();
    for n in &nodes {
        let status = n.status().await.unwrap();
        let oldest = status["log"]["bounds"]["oldest_seq"].as_u64().unwrap();
        let url = format!(
            "ws://{}/xrpc/network.bsky.jetstream.subscribeEvents?cursor={oldest}",
            n.addr()
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let mut events = std::collections::BTreeMap::new();
        let mut next = oldest;
        while next <= total {
            use futures_util::StreamExt;
            let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .unwrap();
            if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = msg {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if let Some(seq) = v["payload"]["seq"].as_u64() {
                    assert_eq!(seq, next, "{}: gapless from its floor", n.id);
                    events.insert(seq, t.to_string());
                    next += 1;
                }
            }
        }
        by_node.push((oldest, events));
    }
    assert!(
        by_node.iter().any(|(oldest, _)| *oldest == 1),
        "one node holds 1..N"
    );
    for (seq, text) in &by_node[0].1 {
        if let Some(other) = by_node[1].1.get(seq) {
            assert_eq!(text, other, "seq {seq} is the same event on both nodes");
        }
    }
    for n in nodes.iter_mut() {
        n.stop();
    }
}
