//! Replay-to-live handover and slow consumers, end to end over real websockets while ingest
//! is running: subscribers with cursors inside retention get gapless, duplicate-free,
//! ordered streams; a subscriber that stops reading overflows its (tiny) queue, catches up
//! from the log and rejoins without losing or repeating anything; under the `disconnect`
//! policy it gets ConsumerTooSlow on its wire and is closed.

use crate::wire_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice::fanout::SlowPolicy;
use sluice::upstream::replay::Speed;
use wire_common::*;

/// Expected positions on `wire` from position `from` (inclusive) to the end of the log.
fn expected(env: &Env, wire: Wire, from: u64, only_collection: Option<&str>) -> Vec<u64> {
    match wire {
        Wire::Raw => env
            .frames
            .iter()
            .map(|f| frame_seq(f) as u64)
            .filter(|&s| s >= from)
            .collect(),
        Wire::V1 | Wire::V2 => env
            .events_from(1)
            .iter()
            .filter(|e| e.seq >= from)
            .filter(|e| match wire {
                Wire::V1 => e.v1_json.is_some(),
                _ => e.v2_json.is_some(),
            })
            .filter(|e| match (only_collection, &e.collection) {
                (Some(want), Some(c)) => **c == *want,
                _ => true,
            })
            .map(|e| e.seq)
            .collect(),
    }
}

struct Client {
    name: String,
    wire: Wire,
    target: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Followed>,
}

fn spawn_client(name: &str, mut ws: Ws, how: Follow) -> Client {
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let t = target.clone();
    let task = tokio::spawn(async move { follow(&mut ws, how, &t).await });
    Client {
        name: name.to_string(),
        wire: how.wire,
        target,
        task,
    }
}

fn plain(wire: Wire) -> Follow {
    Follow {
        wire,
        pause_after: None,
        pause: Duration::ZERO,
        deadline: tokio::time::Instant::now() + Duration::from_secs(90),
    }
}

fn slow(wire: Wire) -> Follow {
    Follow {
        pause_after: Some(100),
        pause: Duration::from_secs(2),
        ..plain(wire)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_is_gapless_while_ingest_runs() {
    let _machine = crate::exclusive::alone().await;
    // ~3,200 frames at twice real time: ingest runs for about four seconds.
    let frames = synth(3200, 31, Duration::from_secs(1200));
    let env = Env::start(frames, Speed::Factor(2.0), false, |_| {}).await;
    env.wait_seq(800).await;
    let log = env.events_from(1);
    let at = |seq: u64| log.iter().find(|e| e.seq == seq).unwrap().clone();
    let newest = env.daemon.log.reader().newest_seq();
    let raw_after = at(300).upstream_seq;
    let like = "app.bsky.feed.like";
    let specs: Vec<(&str, Wire, String, u64, Option<&str>)> = vec![
        (
            "v1 from seq 100",
            Wire::V1,
            format!("/subscribe?cursor={}", at(100).time_us),
            100,
            None,
        ),
        (
            "v1 likes from seq 50",
            Wire::V1,
            format!(
                "/subscribe?cursor={}&wantedCollections={like}",
                at(50).time_us
            ),
            50,
            Some(like),
        ),
        (
            "v2 from seq 200",
            Wire::V2,
            format!("{V2_PATH}?cursor=200"),
            200,
            None,
        ),
        (
            "v2 near the tip",
            Wire::V2,
            format!("{V2_PATH}?cursor={}", newest - 3),
            newest - 3,
            None,
        ),
        (
            "raw after upstream seq of seq 300",
            Wire::Raw,
            format!("{RAW_PATH}?cursor={raw_after}"),
            raw_after as u64 + 1,
            None,
        ),
    ];
    let mut clients = Vec::new();
    for (name, wire, path, _, _) in &specs {
        let ws = connect(&env.url(path)).await;
        clients.push(spawn_client(name, ws, plain(*wire)));
    }
    env.wait_all_ingested().await;
    let mut wants = Vec::new();
    for ((_, wire, _, from, only), client) in specs.iter().zip(&clients) {
        let want = expected(&env, *wire, *from, *only);
        client
            .target
            .store(*want.last().unwrap(), Ordering::Release);
        wants.push(want);
    }
    for (client, want) in clients.into_iter().zip(wants) {
        let got = client.task.await.unwrap();
        assert_eq!(got.close, None, "{}", client.name);
        assert!(
            got.positions == want,
            "{}: {} events, expected {}; first difference at {:?}",
            client.name,
            got.positions.len(),
            want.len(),
            got.positions.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
    env.stop().await;
}

/// Checks a client that started live: everything from its first event to the end.
fn assert_complete(env: &Env, name: &str, wire: Wire, got: &Followed) {
    let first = *got
        .positions
        .first()
        .unwrap_or_else(|| panic!("{name}: no events"));
    let want = expected(env, wire, first, None);
    assert!(
        got.positions == want,
        "{name}: {} events, expected {}; first difference at {:?}; ended {:?} {:?}",
        got.positions.len(),
        want.len(),
        got.positions.iter().zip(&want).position(|(a, b)| a != b),
        got.error,
        got.close
    );
}

/// Checks a client closed as too slow: a gapless prefix, then ConsumerTooSlow.
fn assert_too_slow(env: &Env, name: &str, wire: Wire, got: &Followed) {
    let first = *got
        .positions
        .first()
        .unwrap_or_else(|| panic!("{name}: no events"));
    let want = expected(env, wire, first, None);
    assert!(
        got.positions.len() < want.len() && got.positions[..] == want[..got.positions.len()],
        "{name}: not a strict gapless prefix ({} of {})",
        got.positions.len(),
        want.len()
    );
    let close = got
        .close
        .clone()
        .unwrap_or_else(|| panic!("{name}: not closed"));
    assert_eq!(close.0, 1008, "{name}: close {close:?}");
    match wire {
        Wire::V1 => assert_eq!(close.1, "ConsumerTooSlow", "{name}"),
        Wire::V2 | Wire::Raw => {
            assert_eq!(got.error.as_deref(), Some("ConsumerTooSlow"), "{name}")
        }
    }
}

async fn slow_env(policy: SlowPolicy) -> Env {
    // ~3,200 frames at real time: ~8 s of ingest at ~400 events/s.
    let frames = synth(3200, 31, Duration::from_secs(1200));
    let env = Env::start(frames, Speed::Factor(1.0), false, move |c| {
        c.hub.queue_max_events = 8;
        c.slow_policy = policy;
    })
    .await;
    env.wait_seq(1).await;
    env
}

async fn finish(env: &Env, clients: Vec<Client>) -> Vec<(String, Wire, Followed)> {
    env.wait_all_ingested().await;
    let last_seq = env.daemon.log.reader().newest_seq();
    let last_upstream = frame_seq(env.frames.last().unwrap()) as u64;
    let last_of = |wire: Wire| match wire {
        Wire::Raw => last_upstream,
        Wire::V1 => expected(env, Wire::V1, 1, None).pop().unwrap_or(last_seq),
        Wire::V2 => expected(env, Wire::V2, 1, None).pop().unwrap_or(last_seq),
    };
    for c in &clients {
        c.target.store(last_of(c.wire), Ordering::Release);
    }
    let mut out = Vec::new();
    for c in clients {
        out.push((c.name, c.wire, c.task.await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_catches_up_losslessly_on_every_wire() {
    let _machine = crate::exclusive::alone().await;
    let env = slow_env(SlowPolicy::Catchup).await;
    let mut clients = Vec::new();
    for (name, wire, path) in [
        ("slow v1", Wire::V1, "/subscribe".to_string()),
        ("slow v2", Wire::V2, V2_PATH.to_string()),
        ("slow raw", Wire::Raw, RAW_PATH.to_string()),
        (
            "slow v2 asking for catchup",
            Wire::V2,
            format!("{V2_PATH}?slowConsumer=catchup"),
        ),
    ] {
        let ws = connect_small_buffer(&env.url(&path), SMALL_RCVBUF).await;
        clients.push(spawn_client(name, ws, slow(wire)));
    }
    let fast = connect(&env.url("/subscribe")).await;
    clients.push(spawn_client("fast v1", fast, plain(Wire::V1)));
    let too_slow = connect_small_buffer(
        &env.url(&format!("{V2_PATH}?slowConsumer=disconnect")),
        SMALL_RCVBUF,
    )
    .await;
    clients.push(spawn_client(
        "v2 asking for disconnect",
        too_slow,
        slow(Wire::V2),
    ));

    let results = finish(&env, clients).await;
    for (name, wire, got) in &results {
        if name.contains("disconnect") {
            assert_too_slow(&env, name, *wire, got);
        } else {
            assert_complete(&env, name, *wire, got);
            assert_eq!(got.close, None, "{name}");
        }
    }
    let stats = env.daemon.hub.stats();
    let (overflows, rejoins) = (
        stats.overflows.load(Ordering::Relaxed),
        stats.rejoins.load(Ordering::Relaxed),
    );
    // Five paused clients overflowed; the four under catch-up came back to the live path.
    assert!(overflows >= 5, "overflows {overflows}");
    assert!(rejoins >= 4, "rejoins {rejoins}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disconnect_policy_sends_consumer_too_slow_on_every_wire() {
    let _machine = crate::exclusive::alone().await;
    // Server default: disconnect (the strict relay behaviour); a client may opt into catchup.
    let env = slow_env(SlowPolicy::Disconnect).await;
    let mut clients = Vec::new();
    for (name, wire, path) in [
        ("v1 disconnect", Wire::V1, "/subscribe".to_string()),
        ("v2 disconnect", Wire::V2, V2_PATH.to_string()),
        ("raw disconnect", Wire::Raw, RAW_PATH.to_string()),
        (
            "v1 disconnect by parameter",
            Wire::V1,
            "/subscribe?slowConsumer=disconnect".to_string(),
        ),
        (
            "raw opting into catchup",
            Wire::Raw,
            format!("{RAW_PATH}?slowConsumer=catchup"),
        ),
        (
            "v1 opting into catchup",
            Wire::V1,
            "/subscribe?slowConsumer=catchup".to_string(),
        ),
    ] {
        let ws = connect_small_buffer(&env.url(&path), SMALL_RCVBUF).await;
        clients.push(spawn_client(name, ws, slow(wire)));
    }
    let results = finish(&env, clients).await;
    for (name, wire, got) in &results {
        if name.contains("catchup") {
            assert_complete(&env, name, *wire, got);
        } else {
            assert_too_slow(&env, name, *wire, got);
        }
    }
    env.stop().await;
}

/// A subscriber that stops reading in the middle of a large replay batch is dropped once
/// the write timeout passes without progress: the session must not wait forever inside a
/// batch (tungstenite's `feed` blocks once its buffer is full), where it would see neither
/// pings nor shutdown. Reading again, the client gets what the sockets held and then the
/// end of the connection, long before the whole replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replay_is_dropped_after_the_write_timeout() {
    let _machine = crate::exclusive::alone().await;
    let frames = synth(3000, 43, Duration::from_secs(1200));
    let total = frames.len();
    let env = Env::start_with(
        frames,
        Speed::Max,
        false,
        false,
        &["--write-timeout-secs", "1"],
        |_| {},
    )
    .await;
    env.wait_all_ingested().await;
    // Replay from the first frame, and read nothing for a while.
    let mut ws =
        connect_small_buffer(&env.url(&format!("{RAW_PATH}?cursor=0")), SMALL_RCVBUF).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (received, end) = count_binary_until_end(&mut ws, LIMIT).await;
    assert!(
        matches!(end, Got::Gone(_) | Got::Closed(_)),
        "expected the connection to end, got {end:?} after {received} frames"
    );
    assert!(
        received < total,
        "the stalled subscriber was not dropped: it got all {received} of {total} frames"
    );
    env.stop().await;
}
