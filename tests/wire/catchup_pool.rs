//! Replays beside live traffic: subscribers in catch-up read and write on the catch-up
//! pool (low-priority threads), live subscribers on the main runtime. Whatever the two
//! share, every live subscriber gets every event once and in order while two dozen
//! replayers read the log from below the hot tail, every replayer hands over to live
//! without a gap, and the pool's threads end with the daemon's shutdown.

use crate::wire_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice::upstream::replay::Speed;
use wire_common::*;

/// Positions `wire` carries from seq `from` (inclusive) to the end of the log.
fn expected(env: &Env, wire: Wire, from: u64) -> Vec<u64> {
    env.events_from(from)
        .iter()
        .filter(|e| match wire {
            Wire::V1 => e.v1_json.is_some(),
            _ => e.v2_json.is_some(),
        })
        .map(|e| e.seq)
        .collect()
}

struct Client {
    name: String,
    wire: Wire,
    /// The seq the client started from, or `None` for a live one (it starts wherever its
    /// first event is).
    from: Option<u64>,
    target: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Followed>,
}

fn spawn(name: String, wire: Wire, from: Option<u64>, mut ws: Ws) -> Client {
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let t = target.clone();
    let how = Follow {
        wire,
        pause_after: None,
        pause: Duration::ZERO,
        deadline: tokio::time::Instant::now() + Duration::from_secs(120),
    };
    let task = tokio::spawn(async move { follow(&mut ws, how, &t).await });
    Client {
        name,
        wire,
        from,
        target,
        task,
    }
}

/// Two v1 replays from the oldest event, run to `want`'s last position: each gets every
/// event once and in order, and neither is closed (for the pace or anything else).
async fn two_replays_get_every_event_in_order(env: &Env, want: &[u64], what: &str) {
    let first = env.events_from(1).first().map(|e| e.time_us).unwrap();
    let mut replays = Vec::new();
    for i in 0..2 {
        let ws = connect(&env.url(&format!("/subscribe?cursor={first}"))).await;
        let replay = spawn(format!("{what} replay v1 {i}"), Wire::V1, Some(1), ws);
        replay
            .target
            .store(*want.last().unwrap(), Ordering::Release);
        replays.push(replay);
    }
    for replay in replays {
        let got = replay.task.await.unwrap();
        assert!(
            got.positions == want,
            "{}: {} events of {}, first difference at {:?}; closed {:?}",
            replay.name,
            got.positions.len(),
            want.len(),
            got.positions.iter().zip(want).position(|(a, b)| a != b),
            got.close
        );
        assert_eq!(got.close, None, "{}: not closed for the pace", replay.name);
    }
}

/// The daemon's `/metrics` now, as a lookup of one unlabelled sample's value by name.
async fn metrics_of(env: &Env) -> impl Fn(&str) -> Option<f64> {
    let metrics = http_get(env.daemon.admin_addr, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.2).into_owned();
    move |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscribers_stay_gapless_and_in_order_while_two_dozen_replays_catch_up() {
    let _machine = crate::exclusive::alone().await;
    // ~6,000 frames at real time: ingest runs for several seconds after the replays
    // start. A hot tail of 64 KiB keeps all but the newest events in the store, so the
    // replays read below it (on the pool's blocking threads) and write on its workers.
    let frames = synth(6000, 47, Duration::from_secs(1800));
    let env = Env::start(frames, Speed::Factor(1.0), false, |c| {
        c.log.tail_max_bytes = 64 * 1024;
        c.hub.catchup_batch_bytes = 64 * 1024;
    })
    .await;
    // The live subscribers from the start, the replays once most of the log is stored.
    env.wait_seq(1).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let ws = connect(&env.url("/subscribe")).await;
        clients.push(spawn(format!("live v1 {i}"), Wire::V1, None, ws));
    }
    let ws = connect(&env.url(V2_PATH)).await;
    clients.push(spawn("live v2".into(), Wire::V2, None, ws));
    env.wait_seq(1500).await;
    env.wait_durable().await;
    let first = env.events_from(1).first().map(|e| e.time_us).unwrap();
    for i in 0..20 {
        let ws = connect(&env.url(&format!("/subscribe?cursor={first}"))).await;
        clients.push(spawn(format!("replay v1 {i}"), Wire::V1, Some(1), ws));
    }
    for i in 0..4 {
        let ws = connect(&env.url(&format!("{V2_PATH}?cursor=1"))).await;
        clients.push(spawn(format!("replay v2 {i}"), Wire::V2, Some(1), ws));
    }
    env.wait_all_ingested().await;
    // Every replayer rejoins the live path once it has read what was dispatched, on its
    // session's next look at the log. Checked while the clients still read: one whose
    // client has its last event closes, and a closed session never rejoins. The bound
    // only catches a hang.
    let stats = env.daemon.hub.stats();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.rejoins.load(Ordering::Relaxed) < 24 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejoins = stats.rejoins.load(Ordering::Relaxed);
    assert!(
        rejoins >= 24,
        "every replayer rejoined the live path within 30 s: {rejoins} rejoins, {} deferred",
        stats.rejoins_deferred.load(Ordering::Relaxed)
    );
    let last = |wire| expected(&env, wire, 1).pop().unwrap();
    for c in &clients {
        c.target.store(last(c.wire), Ordering::Release);
    }
    let cold_reads = env.daemon.hub.stats().cold_reads.load(Ordering::Relaxed);
    for c in clients {
        let got = c.task.await.unwrap();
        let from = match c.from {
            Some(from) => from,
            None => *got
                .positions
                .first()
                .unwrap_or_else(|| panic!("{}: no events", c.name)),
        };
        let want = expected(&env, c.wire, from);
        assert!(
            got.positions == want,
            "{}: {} events, expected {}; first difference at {:?}; closed {:?}",
            c.name,
            got.positions.len(),
            want.len(),
            got.positions.iter().zip(&want).position(|(a, b)| a != b),
            got.close
        );
        assert_eq!(got.close, None, "{}", c.name);
    }
    assert!(
        cold_reads > 0,
        "the replays read below the hot tail (cold reads {cold_reads})"
    );
    let hub = env.daemon.hub.clone();
    assert!(hub.catchup().is_running());
    assert!(hub.catchup().threads_alive() > 0);
    env.stop().await;
    assert!(!hub.catchup().is_running(), "the pool stops on shutdown");
    assert_eq!(
        hub.catchup().threads_alive(),
        0,
        "every catch-up thread ended with the shutdown"
    );
}

/// The idle class with its starvation bound (`--catchup-sched idle`): a replay completes,
/// gapless and in order, while a busy loop at normal priority holds every core (the
/// pool's threads are raised to nice 19 whenever its work makes no progress for the
/// bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_class_replay_completes_while_normal_priority_work_saturates_the_cores() {
    use sluice::priority::Background;
    let _machine = crate::exclusive::alone().await;
    let frames = synth(3000, 53, Duration::from_secs(1800));
    let env = Env::start(frames, Speed::Max, false, |c| {
        c.log.tail_max_bytes = 64 * 1024;
        c.log.read_ahead_class = Background::Idle;
        c.hub.catchup_batch_bytes = 64 * 1024;
        c.hub.catchup.class = Background::Idle;
        c.hub.catchup.starvation_bound = Duration::from_millis(50);
    })
    .await;
    env.wait_all_ingested().await;
    env.wait_durable().await;
    // Every core busy at normal priority until the replay is done (at most 30 s).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let busy: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let first = env.events_from(1).first().map(|e| e.time_us).unwrap();
    let ws = connect(&env.url(&format!("/subscribe?cursor={first}"))).await;
    let replay = spawn("replay v1".into(), Wire::V1, Some(1), ws);
    let want = expected(&env, Wire::V1, 1);
    replay
        .target
        .store(*want.last().unwrap(), Ordering::Release);
    // The follower's own deadline (120 s) only catches a hang.
    let got = replay.task.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    assert!(
        got.positions == want,
        "the replay got {} events of {}; closed {:?}",
        got.positions.len(),
        want.len(),
        got.close
    );
    let hub = env.daemon.hub.clone();
    assert!(hub.stats().cold_reads.load(Ordering::Relaxed) > 0);
    // Whether it was raised depends on how the kernel shares the cores out, and whether a
    // raise is permitted on the privilege this test runs with (both cases are tested in
    // `priority::tests`): the pool of an idle-class hub has the bound either way.
    assert!(
        hub.catchup().starvation().is_some(),
        "idle pools have the bound"
    );
    env.stop().await;
}

/// The server-wide catch-up pace (`--catchup-pace-mib-per-sec`): two replays paced far
/// below what the machine could send still get every event once and in order, and every
/// byte they were sent was paid into the one bucket they share (counted, not timed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_replays_get_every_event_in_order_and_pay_every_byte_into_one_pace() {
    let _machine = crate::exclusive::shared().await;
    let frames = synth(1500, 59, Duration::from_secs(1800));
    // ~1,800 v1 events of a few hundred bytes each, per replay: a pace of 256 KiB/s
    // (a 20 ms burst of 5 KiB) makes nearly every catch-up write wait.
    let pace = 256 * 1024;
    let env = Env::start(frames, Speed::Max, false, |c| {
        c.log.tail_max_bytes = 64 * 1024;
        c.hub.catchup_batch_bytes = 64 * 1024;
        c.hub.catchup.pace_bytes_per_sec = pace;
    })
    .await;
    env.wait_all_ingested().await;
    env.wait_durable().await;
    let hub = env.daemon.hub.clone();
    assert_eq!(hub.catchup().pace_bytes_per_sec(), pace);
    let want = expected(&env, Wire::V1, 1);
    let want_bytes: u64 = env
        .events_from(1)
        .iter()
        .filter_map(|e| e.v1_json.as_ref().map(|j| j.len() as u64))
        .sum();
    // Together ~2 x 0.9 MB at 256 KiB/s: ~7 s. The follower's own deadline (120 s) only
    // catches a hang.
    two_replays_get_every_event_in_order(&env, &want, "paced").await;
    let stats = hub.catchup().stats();
    assert!(hub.stats().cold_reads.load(Ordering::Relaxed) > 0);
    // Everything was in the log before the replays began, so every event reached them
    // by catch-up writes, each paid with its v1 bytes.
    assert_eq!(
        stats.paced_bytes.load(Ordering::Relaxed),
        2 * want_bytes,
        "every byte of both replays was paid into the pace"
    );
    assert!(
        stats.paced_writes.load(Ordering::Relaxed) > 0,
        "writes waited"
    );
    assert!(stats.paced_ns.load(Ordering::Relaxed) > 0);
    let value = metrics_of(&env).await;
    assert_eq!(
        value("sluice_catchup_pace_bytes_per_second"),
        Some(pace as f64),
        "the pace is reported in /metrics"
    );
    assert_eq!(
        value("sluice_catchup_paced_bytes_total"),
        Some((2 * want_bytes) as f64)
    );
    env.stop().await;
}

/// The pace in events (`--catchup-pace-events-per-sec`), with bytes unpaced: two replays
/// paced far below what the machine could send still get every event once and in order,
/// every event they were sent was paid into the one bucket they share, and writes waited
/// for it (counted, not timed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_paced_in_events_get_every_event_in_order_and_pay_each_one() {
    let _machine = crate::exclusive::shared().await;
    let frames = synth(1500, 61, Duration::from_secs(1800));
    // ~1,800 v1 events per replay at 1,000 events/s for both (a 20 ms burst of 20):
    // nearly every catch-up write waits, ~4 s in all.
    let pace = 1_000;
    let env = Env::start(frames, Speed::Max, false, |c| {
        c.log.tail_max_bytes = 64 * 1024;
        c.hub.catchup_batch_bytes = 64 * 1024;
        c.hub.catchup.pace_bytes_per_sec = 0;
        c.hub.catchup.pace_events_per_sec = pace;
    })
    .await;
    env.wait_all_ingested().await;
    env.wait_durable().await;
    let hub = env.daemon.hub.clone();
    assert_eq!(hub.catchup().pace_events_per_sec(), pace);
    assert_eq!(hub.catchup().pace_bytes_per_sec(), 0);
    let want = expected(&env, Wire::V1, 1);
    let want_events = env
        .events_from(1)
        .iter()
        .filter(|e| e.v1_json.is_some())
        .count() as u64;
    two_replays_get_every_event_in_order(&env, &want, "events-paced").await;
    let stats = hub.catchup().stats();
    assert!(hub.stats().cold_reads.load(Ordering::Relaxed) > 0);
    assert_eq!(
        stats.paced_events.load(Ordering::Relaxed),
        2 * want_events,
        "every event of both replays was paid into the pace"
    );
    assert_eq!(
        stats.paced_bytes.load(Ordering::Relaxed),
        0,
        "bytes are unpaced, so not counted"
    );
    assert!(
        stats.paced_writes.load(Ordering::Relaxed) > 0,
        "writes waited"
    );
    assert!(stats.paced_ns.load(Ordering::Relaxed) > 0);
    let value = metrics_of(&env).await;
    assert_eq!(
        value("sluice_catchup_pace_events_per_second"),
        Some(pace as f64),
        "the pace is reported in /metrics"
    );
    assert_eq!(
        value("sluice_catchup_paced_events_total"),
        Some((2 * want_events) as f64)
    );
    env.stop().await;
}
