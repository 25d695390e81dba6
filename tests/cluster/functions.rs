//! The cluster's Redis Functions against a real `redis-server`: every check that decides
//! whether an append or a lease grant happens.

use crate::common;

use std::time::Duration;

use common::RedisServer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sluice::cluster::append::{self as cluster_append, TermCtl};
use sluice::cluster::entry;
use sluice::cluster::link::{
    Acquire, AppendBatch, AppendCommands, AppendOutcome, Grant, Keys, Link,
};
use sluice::cluster::{ClusterConfig, ClusterError, ClusterShared};
use sluice::event::{Event, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};

fn state(next_seq: u64, last_time_us: i64, cursor: i64) -> StampState {
    StampState {
        next_seq,
        last_time_us,
        upstream_cursor: Some(cursor),
    }
}

async fn link(redis: &RedisServer) -> Link {
    let mut link = Link::new(&redis.url(), Duration::from_secs(2)).unwrap();
    link.load_functions().await.unwrap();
    link
}

#[tokio::test]
async fn appends_are_fenced_continuous_and_idempotent_on_retry() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let mut l = link(&redis).await;
    let keys = Keys::new("f");
    let ttl = Duration::from_secs(5);
    // A new cluster's state is seeded only after one TTL, once every live node reported.
    let short = Duration::from_millis(300);
    let first = l
        .acquire(&keys, "a", short, 0, StampState::fresh())
        .await
        .unwrap();
    assert!(matches!(first, Acquire::SeedBlocked { .. }), "{first:?}");
    tokio::time::sleep(short).await;
    let Acquire::Granted(a) = l
        .acquire(&keys, "a", short, 0, StampState::fresh())
        .await
        .unwrap()
    else {
        panic!("the first node gets the lease");
    };
    l.renew(&keys, "a", a.epoch, ttl).await.unwrap();
    assert_eq!(a.state.next_seq, 1);
    assert!(a.seeded, "a new cluster's state is seeded");
    // Another node is refused while the lease lives.
    match l
        .acquire(&keys, "b", ttl, 0, StampState::fresh())
        .await
        .unwrap()
    {
        Acquire::Held { holder, pttl_ms } => {
            assert_eq!(holder, "a");
            assert!(pttl_ms > 0);
        }
        other => panic!("{other:?}"),
    }
    let ok = l
        .append(&keys, "a", a.epoch, 1, 3, state(4, 30, 100), 0, b"x")
        .await
        .unwrap();
    assert_eq!((ok.next_seq, ok.already), (4, false));
    // The same batch again (a retry after a lost reply) is recognised, not written twice.
    let again = l
        .append(&keys, "a", a.epoch, 1, 3, state(4, 30, 100), 0, b"x")
        .await
        .unwrap();
    assert!(again.already);
    // Not continuing the stream.
    let gap = l
        .append(&keys, "a", a.epoch, 6, 7, state(8, 40, 101), 0, b"x")
        .await;
    assert!(matches!(gap, Err(ClusterError::Gap(_))), "{gap:?}");
    // The upstream cursor must advance.
    let back = l
        .append(&keys, "a", a.epoch, 4, 4, state(5, 40, 100), 0, b"x")
        .await;
    assert!(matches!(back, Err(ClusterError::Cursor(_))), "{back:?}");
    // A stale epoch or another node is fenced.
    let stale = l
        .append(&keys, "a", a.epoch - 1, 4, 4, state(5, 40, 101), 0, b"x")
        .await;
    assert!(matches!(stale, Err(ClusterError::Fenced(_))), "{stale:?}");
    let other = l
        .append(&keys, "b", a.epoch, 4, 4, state(5, 40, 101), 0, b"x")
        .await;
    assert!(matches!(other, Err(ClusterError::Fenced(_))), "{other:?}");
    // Release, and the next holder gets a higher epoch and the resume state.
    assert!(l.release(&keys, "a", a.epoch).await.unwrap());
    let Acquire::Granted(b) = l
        .acquire(&keys, "b", ttl, 0, StampState::fresh())
        .await
        .unwrap()
    else {
        panic!("b takes over a released lease");
    };
    assert!(b.epoch > a.epoch);
    assert!(!b.seeded);
    assert_eq!(b.state, state(4, 30, 100));
    // The old holder can neither append nor renew.
    let late = l
        .append(&keys, "a", a.epoch, 4, 4, state(5, 40, 101), 0, b"x")
        .await;
    assert!(matches!(late, Err(ClusterError::Fenced(_))), "{late:?}");
    let renew = l.renew(&keys, "a", a.epoch, ttl).await;
    assert!(matches!(renew, Err(ClusterError::Fenced(_))), "{renew:?}");
    l.renew(&keys, "b", b.epoch, ttl).await.unwrap();
    // Stream entries are keyed by the batch's last seq.
    let entries = l.read_after(&keys, 0, 10, Duration::ZERO).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.last_seq).collect::<Vec<_>>(),
        vec![3]
    );
}

#[tokio::test]
async fn a_lost_state_is_reseeded_only_by_the_node_holding_the_most() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let mut l = link(&redis).await;
    let keys = Keys::new("s");
    let now = sluice::cluster::link::now_ms();
    // Two live nodes reported their positions; then Redis lost the rest.
    l.report(&keys, "low", &format!("500 {now} standby 0"))
        .await
        .unwrap();
    l.report(&keys, "high", &format!("900 {now} standby 0"))
        .await
        .unwrap();
    let short = Duration::from_millis(300);
    let wait = l
        .acquire(&keys, "high", short, 7, state(901, 9, 90))
        .await
        .unwrap();
    assert!(
        matches!(wait, Acquire::SeedBlocked { .. }),
        "reports are awaited first: {wait:?}"
    );
    tokio::time::sleep(short).await;
    // One event more is enough: "low" holding 901 has the seq "high" would stamp next.
    l.report(&keys, "low", &format!("901 {now} standby 0"))
        .await
        .unwrap();
    match l
        .acquire(&keys, "high", short, 7, state(901, 9, 90))
        .await
        .unwrap()
    {
        Acquire::SeedBlocked { why } => assert_eq!(why, "low"),
        other => panic!("one event more blocks: {other:?}"),
    }
    l.report(&keys, "low", &format!("500 {now} standby 0"))
        .await
        .unwrap();
    match l
        .acquire(&keys, "low", short, 7, state(501, 5, 50))
        .await
        .unwrap()
    {
        Acquire::SeedBlocked { why } => assert_eq!(why, "high"),
        other => panic!("the node holding less may not re-seed: {other:?}"),
    }
    let Acquire::Granted(g) = l
        .acquire(&keys, "high", short, 7, state(901, 9, 90))
        .await
        .unwrap()
    else {
        panic!("the node holding the most re-seeds");
    };
    assert!(g.seeded);
    assert_eq!(
        g.state,
        state(901, 9, 90),
        "the seq space continues where its log ends"
    );
    assert!(
        g.epoch > 7,
        "epochs stay above any the node has seen, even after a data loss"
    );
}

/// The append's checks run in Redis just before its transaction, under `WATCH` of the state
/// and the stream: a renewal (which does not touch them) costs nothing, a takeover fences
/// the old holder, and a stream changed from outside refuses the batch.
#[tokio::test]
async fn an_append_whose_checks_went_stale_writes_nothing() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let keys = Keys::new("w");
    let mut a = link(&redis).await;
    let mut other = link(&redis).await;
    let short = Duration::from_millis(300);
    let ttl = Duration::from_secs(30);
    let first = a
        .acquire(&keys, "a", short, 0, StampState::fresh())
        .await
        .unwrap();
    assert!(matches!(first, Acquire::SeedBlocked { .. }), "{first:?}");
    tokio::time::sleep(short).await;
    let Acquire::Granted(g) = a
        .acquire(&keys, "a", short, 0, StampState::fresh())
        .await
        .unwrap()
    else {
        panic!("a gets the lease");
    };
    a.renew(&keys, "a", g.epoch, ttl).await.unwrap();
    let done = a
        .append(&keys, "a", g.epoch, 1, 3, state(4, 30, 100), 0, b"one")
        .await
        .unwrap();
    assert_eq!((done.next_seq, done.already), (4, false));
    // A renewal from another connection does not disturb the next append.
    other.renew(&keys, "a", g.epoch, ttl).await.unwrap();
    let done = a
        .append(&keys, "a", g.epoch, 4, 5, state(6, 50, 101), 0, b"two")
        .await
        .unwrap();
    assert_eq!((done.next_seq, done.already), (6, false));
    // The lease expires and another node takes it: a is told it is fenced.
    a.append(&keys, "a", g.epoch, 6, 6, state(7, 60, 102), 0, b"three")
        .await
        .unwrap();
    assert!(redis.command(&["DEL", &keys.lease]).contains(":1"));
    let Acquire::Granted(b) = other
        .acquire(&keys, "b", ttl, 0, StampState::fresh())
        .await
        .unwrap()
    else {
        panic!("b takes the expired lease");
    };
    assert!(b.epoch > g.epoch);
    let late = a
        .append(&keys, "a", g.epoch, 7, 7, state(8, 70, 103), 0, b"four")
        .await;
    assert!(matches!(late, Err(ClusterError::Fenced(_))), "{late:?}");
    let entries = other
        .read_after(&keys, 0, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        entries.iter().map(|e| e.last_seq).collect::<Vec<_>>(),
        vec![3, 5, 6],
        "each batch once, nothing from the deposed holder"
    );
    assert_eq!(entries[1].payload, b"two");
    let (stored, epoch) = other.state(&keys).await.unwrap().unwrap();
    assert_eq!(stored, state(7, 60, 102));
    assert_eq!(epoch, b.epoch);
    // b continues where a left off.
    other
        .append(&keys, "b", b.epoch, 7, 7, state(8, 70, 103), 0, b"four")
        .await
        .unwrap();
    // Something outside the cluster writes to the stream past the state: refused by the
    // check, and neither the entry nor the state is written.
    let outside = redis.command(&["XADD", &keys.stream, "100-0", "b", "x", "e", "0"]);
    assert!(outside.contains("100-0"), "{outside}");
    let past = other
        .append(&keys, "b", b.epoch, 8, 8, state(9, 80, 104), 0, b"five")
        .await;
    assert!(matches!(past, Err(ClusterError::Gap(_))), "{past:?}");
    // Deleted again, the stream still remembers id 100 as its last: Redis refuses the
    // entry inside the transaction, and the state the transaction wrote is put back.
    assert!(redis
        .command(&["XDEL", &keys.stream, "100-0"])
        .contains(":1"));
    let refused = other
        .append(&keys, "b", b.epoch, 8, 8, state(9, 80, 104), 0, b"five")
        .await;
    assert!(matches!(refused, Err(ClusterError::Gap(_))), "{refused:?}");
    let (stored, _) = other.state(&keys).await.unwrap().unwrap();
    assert_eq!(
        stored,
        state(8, 70, 103),
        "the refused batches left the state alone"
    );
}

/// Takes a new cluster's lease for `node` (seeding waits one short TTL) and holds it for
/// the rest of the test.
async fn take_new_lease(l: &mut Link, keys: &Keys, node: &str) -> Grant {
    let short = Duration::from_millis(200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Acquire::Granted(g) = l
            .acquire(keys, node, short, 0, StampState::fresh())
            .await
            .unwrap()
        {
            l.renew(keys, node, g.epoch, Duration::from_secs(600))
                .await
                .unwrap();
            return g;
        }
        assert!(Instant::now() < deadline, "the lease of a new cluster");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Several appends in flight on one connection are checked one by one as Redis reaches
/// them: batches sent again after lost replies are recognised (written once), a batch that
/// does not continue the stream is refused without stopping the one behind it that does,
/// and a refused check leaves nothing behind.
#[tokio::test]
async fn appends_in_flight_are_checked_in_order_when_redis_reaches_them() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let keys = Keys::new("p");
    let mut l = link(&redis).await;
    let g = take_new_lease(&mut l, &keys, "a").await;
    let cmds = |first: u64, last: u64, up: i64, payload: &'static [u8]| {
        AppendCommands::new(
            &keys,
            "a",
            g.epoch,
            &AppendBatch {
                first_seq: first,
                last_seq: last,
                state: state(last + 1, last as i64 * 10, up),
                trim_below: 0,
                payload,
            },
        )
    };
    let batches = [
        cmds(1, 2, 100, b"one"),
        cmds(3, 4, 101, b"two"),
        cmds(5, 6, 102, b"three"),
    ];
    // Sent back to back, answered in order.
    let mut pending = Vec::new();
    for b in &batches {
        pending.push(l.send(b.pipe.clone(), b.replies).await.unwrap());
    }
    for (b, p) in batches.iter().zip(pending) {
        let replies = p.await.unwrap();
        assert_eq!(
            b.outcome(&replies).unwrap(),
            AppendOutcome::Written { trimmed: 0 }
        );
    }
    // The same three again, as after a lost connection: each is already in.
    let mut pending = Vec::new();
    for b in &batches {
        pending.push(l.send(b.pipe.clone(), b.replies).await.unwrap());
    }
    for (b, p) in batches.iter().zip(pending) {
        assert_eq!(
            b.outcome(&p.await.unwrap()).unwrap(),
            AppendOutcome::Already
        );
    }
    // Out of order: the later batch is refused (and writes nothing), the next one lands.
    let late = cmds(8, 8, 104, b"five");
    let next = cmds(7, 7, 103, b"four");
    let p1 = l.send(late.pipe.clone(), late.replies).await.unwrap();
    let p2 = l.send(next.pipe.clone(), next.replies).await.unwrap();
    let refused = late.outcome(&p1.await.unwrap());
    assert!(matches!(refused, Err(ClusterError::Gap(_))), "{refused:?}");
    assert_eq!(
        next.outcome(&p2.await.unwrap()).unwrap(),
        AppendOutcome::Written { trimmed: 0 }
    );
    let entries = l.read_after(&keys, 0, 10, Duration::ZERO).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.last_seq).collect::<Vec<_>>(),
        vec![2, 4, 6, 7],
        "each batch once, in order, nothing from the refused one"
    );
    assert_eq!(entries[3].payload, b"four");
    let (stored, _) = l.state(&keys).await.unwrap().unwrap();
    assert_eq!(stored, state(8, 70, 103));
    // Another node's batches are fenced, however many are in flight.
    let mut other = Vec::new();
    for (first, up) in [(8u64, 105i64), (9, 106)] {
        let c = AppendCommands::new(
            &keys,
            "b",
            g.epoch,
            &AppendBatch {
                first_seq: first,
                last_seq: first,
                state: state(first + 1, 0, up),
                trim_below: 0,
                payload: b"x",
            },
        );
        let p = l.send(c.pipe.clone(), c.replies).await.unwrap();
        other.push((c, p));
    }
    for (c, p) in other {
        let r = c.outcome(&p.await.unwrap());
        assert!(matches!(r, Err(ClusterError::Fenced(_))), "{r:?}");
    }
    assert_eq!(
        l.read_after(&keys, 7, 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        0
    );
}

/// A stream entry as `XRANGE` returns it: id and field-value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Stamped events of synthetic frames, one `Vec` per frame as ingest hands them over.
fn stamped_frames(count: usize) -> Vec<Vec<Event>> {
    let frames = sluice::upstream::synth::generate(&sluice::upstream::synth::SynthOptions {
        count,
        ..Default::default()
    });
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    let mut out = Vec::new();
    for frame in frames {
        if let IngestOutcome::Events(events) = ingestor.ingest(Bytes::from(frame), 1) {
            out.push(events);
        }
    }
    out
}

/// The leader's appender with four appends in flight while another client keeps writing
/// the resume state (each write aborts the transactions watching it, as any write from
/// outside would): every event lands exactly once and in order, each entry under the
/// leader's epoch, and the aborted appends were sent again.
#[test]
fn the_appender_with_appends_in_flight_lands_every_batch_once_through_aborts() {
    let _machine = crate::exclusive::shared_blocking();
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys = Keys::new("q");
    let grant = rt.block_on(async {
        let mut l = link(&redis).await;
        take_new_lease(&mut l, &keys, "a").await
    });
    let frames = stamped_frames(800);
    let total: usize = frames.iter().map(Vec::len).sum();
    let mut config = ClusterConfig::new(redis.url(), "q", "a");
    config.batch_max_events = 8;
    config.append_in_flight = 4;
    let shared = Arc::new(ClusterShared::default());
    let ctl = Arc::new(TermCtl::new(
        grant.epoch,
        Instant::now(),
        Duration::from_secs(600),
    ));
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    let appender = {
        let (config, keys, shared, ctl) =
            (config.clone(), keys.clone(), shared.clone(), ctl.clone());
        std::thread::spawn(move || cluster_append::run(config, keys, shared, ctl, rx))
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let disturber = {
        let (url, state_key, done) = (redis.url(), keys.state.clone(), done.clone());
        std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_connection().unwrap();
            let started = Instant::now();
            let mut writes = 0u64;
            while !done.load(Ordering::Relaxed)
                && writes < 200_000
                && started.elapsed() < Duration::from_secs(60)
            {
                let mut pipe = redis::pipe();
                for _ in 0..20 {
                    pipe.cmd("HSET").arg(&state_key).arg("outside").arg(writes);
                    writes += 1;
                }
                let _: () = pipe.query(&mut conn).unwrap();
            }
            writes
        })
    };
    for f in frames {
        tx.send(f).unwrap();
    }
    drop(tx);
    appender.join().unwrap();
    done.store(true, Ordering::Relaxed);
    let writes = disturber.join().unwrap();
    assert_eq!(ctl.why.lock().clone(), None, "the term went on");
    assert_eq!(shared.appended_events.load(Ordering::Relaxed), total as u64);
    // Every entry, decoded: seqs 1..=total, each once, in order, under the grant's epoch.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
        .arg(&keys.stream)
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let mut next = 1u64;
    for (id, fields) in &entries {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(field("e"), grant.epoch.to_string().into_bytes());
        let records = entry::decode(&field("b"), 64 << 20).unwrap();
        for r in &records {
            assert_eq!(r.first_seq, next, "entry {id}");
            next = r.last_seq() + 1;
        }
        assert_eq!(id, &format!("{}-0", next - 1));
    }
    assert_eq!(next, total as u64 + 1, "every event once");
    let aborts = shared.append_aborts.load(Ordering::Relaxed);
    eprintln!(
        "{} entries, {aborts} aborted appends sent again, {writes} outside writes",
        entries.len()
    );
}
