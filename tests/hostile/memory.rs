//! Client-held memory against a real `sluice serve`: a message started and never finished
//! is closed by its deadline even while the client keeps pinging, and unfinished messages
//! are charged to one server-wide budget with a per-IP share, so one address cannot take
//! it all and the total never passes it; a bystander keeps its stream throughout.

use crate::common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
const MIB: f64 = 1024.0 * 1024.0;

/// A v1 filter that matches nothing the upstream sends, so only control frames come back.
const QUIET_V1: &str = "/subscribe?wantedCollections=none.example.nothing";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_message_is_closed_by_its_deadline_despite_pings() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(1000, 1.0).await;
    let serve = Serve::start(&upstream, &["--client-message-timeout-secs", "2"], None).await;
    let stream = raw_ws(ATTACKER, serve.addr, QUIET_V1)
        .await
        .expect("upgrade");
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(&client_frame(false, 0x1, &vec![b'x'; 64 * 1024]))
        .await
        .unwrap();
    let started = Instant::now();
    let pinger = tokio::spawn(async move {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write
                .write_all(&client_frame(true, 0x9, b"ping"))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let code = close_code(&mut read, Duration::from_secs(8)).await;
    let took = started.elapsed();
    pinger.abort();
    assert_eq!(code, Some(1008), "after {took:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "closed after {took:?} for a 2 s deadline"
    );
    // The session records its end once the close is written.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = serve.metrics().await;
        let ended = metric(
            &metrics,
            "sluice_subscriber_disconnects_total{reason=\"message_timeout\"",
        );
        if ended == Some(1.0) {
            assert_eq!(metric(&metrics, "sluice_client_memory_bytes"), Some(0.0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ended as message_timeout: {ended:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Six connections from one address, each with 700 KiB of a message under way. One at a
/// time: each is read and charged (or closed and given back) before the next starts, so
/// how many fit does not depend on how a loaded machine interleaves their reads.
async fn flood(from: IpAddr, serve: &Serve) -> Vec<tokio::net::TcpStream> {
    let fragment = client_frame(false, 0x2, &vec![7u8; 700 * 1024]);
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut stream = raw_ws(from, serve.addr, QUIET_V1).await.expect("upgrade");
        // The write may fail half-way once the daemon closes for the budget.
        let _ = stream.write_all(&fragment).await;
        settled_memory(serve).await;
        held.push(stream);
    }
    held
}

/// The client-held memory once it has stopped changing (the same in three reads 100 ms
/// apart, or whatever it is after 10 s).
async fn settled_memory(serve: &Serve) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (-1.0, 0);
    loop {
        let used = metric(&serve.metrics().await, "sluice_client_memory_bytes").unwrap_or(-1.0);
        same = if used == last { same + 1 } else { 0 };
        last = used;
        if same >= 2 || Instant::now() >= deadline {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of `streams` were closed with `code` (waiting up to 3 s each).
async fn closed_with(streams: &mut [tokio::net::TcpStream], code: u16) -> usize {
    let mut n = 0;
    for stream in streams.iter_mut() {
        if close_code(stream, Duration::from_millis(1500)).await == Some(code) {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_are_held_within_the_total_and_per_ip_budget() {
    let _machine = crate::exclusive::alone().await;
    let upstream = slow_upstream(3000, 0.5).await;
    let serve = Serve::start(
        &upstream,
        &[
            "--client-memory-mib",
            "3",
            "--client-memory-per-ip-mib",
            "2",
            "--client-message-timeout-secs",
            "60",
        ],
        None,
    )
    .await;
    let mut bystander = Bystander::connect(&serve, 1).await;
    bystander.read_for(Duration::from_millis(300)).await;

    // Per IP 2 MiB: two messages of 700 KiB fit, each later one is closed when its bytes
    // pass the share (and what it held is given back).
    let mut a = flood(ATTACKER, &serve).await;
    let used = settled_memory(&serve).await;
    assert!(
        (1.3 * MIB..=2.0 * MIB).contains(&used),
        "one address holds its share and no more: {used}"
    );
    assert_eq!(
        closed_with(&mut a, 1013).await,
        4,
        "closed for the per-IP share"
    );
    // Another address gets two in as well, then the 3 MiB total is what stops it.
    let mut b = flood(OTHER, &serve).await;
    let used = settled_memory(&serve).await;
    let metrics = serve.metrics().await;
    assert!(
        (2.6 * MIB..=3.0 * MIB).contains(&used),
        "two addresses, within the total: {used}"
    );
    assert_eq!(closed_with(&mut b, 1013).await, 4, "closed for the total");
    for budget in ["per_ip", "total"] {
        let refused = metric(
            &metrics,
            &format!("sluice_client_memory_refused_total{{budget=\"{budget}\""),
        );
        assert!(refused.is_some_and(|n| n >= 4.0), "{budget}: {refused:?}");
    }
    // What is left (~270 KB) does not hold a 1,400-DID filter (~300 KB): that subscriber
    // is closed with 1013, while one holding nothing is served.
    let dids: Vec<String> = (0..1400).map(|i| format!("did:plc:{i:024}")).collect();
    let with_dids = format!("/subscribe?wantedDids={}", dids.join("&wantedDids="));
    let mut refused = raw_ws(IpAddr::from([127, 0, 0, 4]), serve.addr, &with_dids)
        .await
        .expect("upgrade");
    assert_eq!(
        close_code(&mut refused, Duration::from_secs(5)).await,
        Some(1013)
    );
    let mut newcomer = Bystander::connect(&serve, 1).await;
    newcomer.read_for(Duration::from_millis(300)).await;
    newcomer.assert_gapless_from(1);
    // Closing the attackers gives their memory back.
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = metric(&serve.metrics().await, "sluice_client_memory_bytes");
        if used == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "still charged: {used:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut served = raw_ws(IpAddr::from([127, 0, 0, 4]), serve.addr, &with_dids)
        .await
        .expect("upgrade");
    assert_eq!(
        close_code(&mut served, Duration::from_millis(500)).await,
        None,
        "the DID filter fits again"
    );
    bystander.read_for(Duration::from_millis(500)).await;
    bystander.assert_gapless_from(1);
}
