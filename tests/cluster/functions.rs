//! The cluster's Redis Functions against a real `redis-server`: every check that decides
//! whether an append or a lease grant happens.

use crate::common;

use std::time::Duration;

use common::RedisServer;
use sluice::cluster::link::{Acquire, Keys, Link};
use sluice::cluster::ClusterError;
use sluice::event::StampState;

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

/// The append's checks are read under `WATCH` and the reads for the next batch ride on the
/// previous `EXEC`, so they can be stale by the time the next batch is sent: Redis must
/// refuse that `EXEC` whenever the lease, the state or the stream changed in between.
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
    // A renewal from another connection touches the watched lease: the next append's
    // transaction is aborted, checked again and written once.
    other.renew(&keys, "a", g.epoch, ttl).await.unwrap();
    let done = a
        .append(&keys, "a", g.epoch, 4, 5, state(6, 50, 101), 0, b"two")
        .await
        .unwrap();
    assert_eq!((done.next_seq, done.already), (6, false));
    // The lease expires and another node takes it after the reads for a's next batch were
    // taken: a's transaction is aborted and a is told it is fenced.
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
