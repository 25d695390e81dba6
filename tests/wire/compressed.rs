//! Compression existing clients can decode, end to end over real websockets: v1
//! `compress=true` and `Socket-Encoding: zstd` with Jetstream's v1 dictionary, v2
//! `getZstdDictionary` + `zstdDictionary=<id>` with its v2 dictionary (events, `#info` and
//! error frames alike), the refusals before the upgrade, and size limits applying to the
//! uncompressed message. Every message is decoded with the dictionary files as Jetstream
//! ships them (`../shared/jetstream-dictionaries`) through the `zstd` crate, never through
//! sluice's own code.

use crate::wire_common;

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use sluice::upstream::replay::Speed;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wire_common::*;

const V1_DICTIONARY_ID: u32 = 1_612_007_021;
const V2_DICTIONARY_ID: u32 = 20_260_811;
const GET_DICTIONARY: &str = "/xrpc/network.bsky.jetstream.getZstdDictionary";

/// Decodes one message with `dictionary`, checking the frame names `id`.
fn decode(frame: &[u8], dictionary: &[u8], id: u32) -> String {
    assert_eq!(
        zstd::zstd_safe::get_dict_id_from_frame(frame).map(|n| n.get()),
        Some(id),
        "the frame names its dictionary"
    );
    let mut d = zstd::bulk::Decompressor::with_dictionary(dictionary).unwrap();
    String::from_utf8(d.decompress(frame, 8 << 20).expect("decodes with the file")).unwrap()
}

/// Connects with extra request headers, or returns the refusal (status, body).
async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Ws, (u16, String)> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let result = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out");
    match result {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        )),
        Err(e) => panic!("connect to {}: {e}", short(url)),
    }
}

/// `sluice_zstd_compressed_events_total{scheme}` from the daemon's metrics.
fn compressed_events(env: &Env, scheme: &str) -> u64 {
    let metrics = env.daemon.admin.render_metrics();
    let key = format!("sluice_zstd_compressed_events_total{{scheme=\"{scheme}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the metrics"))
}

/// Messages until `n` have come, every one binary.
async fn binaries(ws: &mut Ws, n: usize) -> Vec<Bytes> {
    let got = read_binaries(ws, n).await;
    assert_quiet(ws, "after the corpus").await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_compressed_messages_decode_with_jetstreams_v1_dictionary() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let dictionary = jetstream_dictionary("legacy_subscribe.zdict");
    // The uncompressed wire is the reference.
    let mut plain_ws = connect(&env.url("/subscribe?cursor=1")).await;
    let n = env.events().iter().filter(|e| e.v1_json.is_some()).count();
    let plain = read_texts(&mut plain_ws, n).await;
    assert_quiet(&mut plain_ws, "plain").await;
    assert!(n >= 150, "{n} v1 events");

    for (how, query, headers) in [
        ("compress=true", "/subscribe?cursor=1&compress=true", vec![]),
        (
            "Socket-Encoding: zstd",
            "/subscribe?cursor=1",
            vec![("Socket-Encoding", "zstd")],
        ),
    ] {
        let mut ws = connect_with(&env.url(query), &headers).await.unwrap();
        let got = binaries(&mut ws, n).await;
        let (mut compressed, mut uncompressed) = (0, 0);
        for (frame, text) in got.iter().zip(&plain) {
            let decoded = decode(frame, &dictionary, V1_DICTIONARY_ID);
            assert_eq!(&decoded, text, "{how}: same bytes as the uncompressed wire");
            let a: Value = serde_json::from_str(&decoded).unwrap();
            let b: Value = serde_json::from_str(text).unwrap();
            assert_eq!(a, b, "{how}: same JSON");
            compressed += frame.len();
            uncompressed += text.len();
        }
        assert!(
            compressed * 3 < uncompressed * 2,
            "{how}: {compressed} compressed bytes of {uncompressed}"
        );
    }

    // Two subscribers, each event compressed once.
    assert_eq!(compressed_events(&env, "v1"), n as u64);

    // The dictionary endpoint serves exactly the file clients embed.
    let (status, _, served) = http_get(env.addr(), "/zstd-dictionary").await;
    assert_eq!(status, 200);
    assert!(served == dictionary, "served the v1 dictionary file");

    // zstd and permessage-deflate together: refused, naming the choice.
    for (query, headers) in [
        ("/subscribe?compress=true", vec![]),
        ("/subscribe", vec![("Socket-Encoding", "zstd")]),
    ] {
        let mut headers = headers;
        headers.push((
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        ));
        match connect_with(&env.url(query), &headers).await {
            Err((400, body)) => assert!(
                body.contains("permessage-deflate") && body.contains("zstd"),
                "{body}"
            ),
            Err(other) => panic!("{query}: {other:?}"),
            Ok(_) => panic!("{query} with permessage-deflate was accepted"),
        }
    }
    // permessage-deflate alone is not negotiated: plain text.
    let mut ws = connect_with(
        &env.url("/subscribe?cursor=1"),
        &[("Sec-WebSocket-Extensions", "permessage-deflate")],
    )
    .await
    .unwrap();
    assert_eq!(read_texts(&mut ws, 1).await[0], plain[0]);
    env.stop().await;
}

/// `maxMessageSizeBytes` applies to the uncompressed message: an event over it is not sent
/// even though its compressed form would fit, and the notice about it is compressed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_size_limit_applies_to_the_uncompressed_message() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let dictionary = jetstream_dictionary("legacy_subscribe.zdict");
    let all: Vec<_> = env
        .events()
        .into_iter()
        .filter(|e| e.v1_json.is_some())
        .collect();
    let biggest = all
        .iter()
        .max_by_key(|e| e.v1_json.as_ref().unwrap().len())
        .unwrap();
    let limit = biggest.v1_json.as_ref().unwrap().len() - 1;
    let big: Vec<u64> = all
        .iter()
        .filter(|e| e.v1_json.as_ref().unwrap().len() > limit)
        .map(|e| e.seq)
        .collect();
    let mut ws = connect(&env.url(&format!(
        "/subscribe?cursor=1&compress=true&notices=true&maxMessageSizeBytes={limit}"
    )))
    .await;
    let got = binaries(&mut ws, all.len()).await;
    let decoded: Vec<Value> = got
        .iter()
        .map(|f| serde_json::from_str(&decode(f, &dictionary, V1_DICTIONARY_ID)).unwrap())
        .collect();
    let notices: Vec<u64> = decoded
        .iter()
        .filter(|v| v["kind"] == "notice")
        .map(|v| v["cursor"].as_u64().unwrap())
        .collect();
    assert_eq!(notices, big, "a notice for each event over the limit");
    for v in decoded.iter().filter(|v| v["kind"] == "notice") {
        assert_eq!(v["notice"]["limit"].as_u64(), Some(limit as u64));
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_dictionary_negotiation_decodes_every_frame() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let file = jetstream_dictionary("subscribe_events_20260811.zdict");

    // The dictionary, its ID in its own header, cacheable.
    let (status, headers, dictionary) = http_get(env.addr(), GET_DICTIONARY).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/octet-stream")
    );
    assert!(dictionary == file, "serves Jetstream's v2 dictionary");
    assert_eq!(&dictionary[..4], &0xEC30_A437u32.to_le_bytes());
    let id = u32::from_le_bytes(dictionary[4..8].try_into().unwrap());
    assert_eq!(id, V2_DICTIONARY_ID);
    assert!(header(&headers, "etag").is_some_and(|e| e.contains(&id.to_string())));
    let (status, headers, by_id) = http_get(env.addr(), &format!("{GET_DICTIONARY}?id={id}")).await;
    assert_eq!(status, 200);
    assert!(by_id == file);
    assert!(
        header(&headers, "cache-control").is_some_and(|c| c.contains("immutable")),
        "{headers:?}"
    );
    for query in [
        "?id=1",
        "?id=x",
        &format!("?id={}", u64::from(id) + (1 << 32)),
    ] {
        let (status, _, body) = http_get(env.addr(), &format!("{GET_DICTIONARY}{query}")).await;
        assert_eq!(status, 400, "{query}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "UnknownZstdDictionary", "{query}");
        assert!(v["message"].as_str().unwrap().contains(&id.to_string()));
    }

    // The uncompressed frames are the reference, byte for byte.
    let n = env.events().iter().filter(|e| e.v2_json.is_some()).count();
    let mut plain_ws = connect(&env.url(&format!("{V2_PATH}?cursor=1"))).await;
    let plain = read_texts(&mut plain_ws, n).await;
    let (mut ws, headers) = connect_protocol(
        &env.url(&format!("{V2_PATH}?cursor=1&zstdDictionary={id}")),
        "xrpc.v1.json",
    )
    .await;
    assert_eq!(
        headers.get("sec-websocket-protocol").unwrap(),
        "xrpc.v1.json"
    );
    let got = binaries(&mut ws, n).await;
    let (mut compressed, mut uncompressed) = (0, 0);
    for (frame, text) in got.iter().zip(&plain) {
        assert_eq!(&decode(frame, &file, id), text);
        compressed += frame.len();
        uncompressed += text.len();
    }
    assert!(
        compressed * 3 < uncompressed * 2,
        "{compressed} compressed bytes of {uncompressed}"
    );

    // #info frames are compressed too: FutureCursor, then EventTooBig.
    let next = env.daemon.log.reader().newest_seq() + 1;
    let far = next + 1000;
    let limit = plain.iter().map(String::len).max().unwrap() - 1;
    let query = format!("cursor={far}&maxMessageSizeBytes={limit}");
    let mut plain_ws = connect(&env.url(&format!("{V2_PATH}?{query}"))).await;
    let want = read_texts(&mut plain_ws, 1).await.remove(0);
    assert!(
        want.contains("#info") && want.contains("FutureCursor"),
        "{want}"
    );
    let mut ws = connect(&env.url(&format!("{V2_PATH}?{query}&zstdDictionary={id}"))).await;
    let info = read_binaries(&mut ws, 1).await.remove(0);
    assert_eq!(decode(&info, &file, id), want);
    let query = format!("cursor=1&maxMessageSizeBytes={limit}&zstdDictionary={id}");
    let mut ws = connect(&env.url(&format!("{V2_PATH}?{query}"))).await;
    let got = binaries(&mut ws, n).await;
    let infos: Vec<String> = got
        .iter()
        .map(|f| decode(f, &file, id))
        .filter(|t| t.contains("subscribeEvents#info"))
        .collect();
    assert_eq!(infos.len(), 1, "one event over the limit: {infos:?}");
    assert!(infos[0].contains("EventTooBig"), "{}", infos[0]);

    // Two subscribers got every event compressed: each was compressed once.
    assert_eq!(compressed_events(&env, "v2"), n as u64);

    // Refusals before the upgrade.
    for (query, error, needle) in [
        ("zstdDictionary=1", "UnknownZstdDictionary", "20260811"),
        ("zstdDictionary=abc", "UnknownZstdDictionary", "20260811"),
        ("zstdDictionary=", "UnknownZstdDictionary", "20260811"),
        ("compress=true", "InvalidRequest", "zstdDictionary"),
    ] {
        let (status, _, body) = refused(&env.url(&format!("{V2_PATH}?{query}"))).await;
        assert_eq!(status, 400, "{query}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], error, "{query}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{body}");
    }
    env.stop().await;
}

/// The error frame that ends a compressed v2 stream is compressed like everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_compressed_error_frame_ends_a_too_slow_stream() {
    let _machine = crate::exclusive::shared().await;
    let file = jetstream_dictionary("subscribe_events_20260811.zdict");
    // ~800 events/s for four seconds into a queue of 8 and a small send buffer.
    let frames = synth(1600, 57, Duration::from_secs(1200));
    let env = Env::start(frames, Speed::Factor(2.0), false, |c| {
        c.hub.queue_max_events = 8;
        c.session.socket_send_buffer = 4096;
    })
    .await;
    env.wait_seq(1).await;
    let mut ws = connect_small_buffer(
        &env.url(&format!(
            "{V2_PATH}?slowConsumer=disconnect&zstdDictionary={V2_DICTIONARY_ID}"
        )),
        SMALL_RCVBUF,
    )
    .await;
    let first = read_binaries(&mut ws, 1).await.remove(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rest, close) = read_until_close(&mut ws, 100_000).await;
    let mut texts = vec![decode(&first, &file, V2_DICTIONARY_ID)];
    for got in rest {
        match got {
            Got::Binary(b) => texts.push(decode(&b, &file, V2_DICTIONARY_ID)),
            other => panic!("a compressed stream sent {other:?}"),
        }
    }
    let last: Value = serde_json::from_str(texts.last().unwrap()).unwrap();
    assert_eq!(last["$type"], "error", "{last}");
    assert_eq!(last["error"], "ConsumerTooSlow");
    let close = close.expect("close frame");
    assert_eq!(u16::from(close.code), 1008);
    // Before it, a gapless run of events.
    let seqs: Vec<u64> = texts[..texts.len() - 1]
        .iter()
        .map(|t| scan_u64(t, "seq").unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gapless: {seqs:?}"
    );
    env.stop().await;
}

/// `--zstd-dictionary-v2 FILE`: the file is served and its header's ID is the one to ask
/// for; a file without an ID (raw content) cannot serve v2 and stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_operator_dictionary_replaces_the_default_by_its_id() {
    let _machine = crate::exclusive::shared().await;
    let files = tempfile::tempdir().unwrap();
    // Any structured dictionary will do: Jetstream's v1 one, ID 1612007021.
    let own = jetstream_dictionary("legacy_subscribe.zdict");
    let path = files.path().join("own.zdict");
    std::fs::write(&path, &own).unwrap();
    let env = Env::start_with(
        corpus(),
        Speed::Max,
        false,
        false,
        &["--zstd-dictionary-v2", path.to_str().unwrap()],
        |_| {},
    )
    .await;
    env.wait_all_ingested().await;
    let (status, _, served) = http_get(env.addr(), GET_DICTIONARY).await;
    assert_eq!(status, 200);
    assert!(served == own, "serves the operator's file");
    let mut plain_ws = connect(&env.url(&format!("{V2_PATH}?cursor=1"))).await;
    let first = read_texts(&mut plain_ws, 1).await.remove(0);
    let mut ws = connect(&env.url(&format!(
        "{V2_PATH}?cursor=1&zstdDictionary={V1_DICTIONARY_ID}"
    )))
    .await;
    let got = read_binaries(&mut ws, 1).await.remove(0);
    assert_eq!(decode(&got, &own, V1_DICTIONARY_ID), first);
    let (status, _, body) =
        refused(&env.url(&format!("{V2_PATH}?zstdDictionary={V2_DICTIONARY_ID}"))).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("UnknownZstdDictionary") && body.contains("1612007021"),
        "{body}"
    );
    env.stop().await;

    let raw = files.path().join("raw");
    std::fs::write(&raw, b"{\"did\":\"did:plc:\",\"kind\":\"commit\"}").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = serve_config(
        upstream,
        dir.path(),
        false,
        &["--zstd-dictionary-v2", raw.to_str().unwrap()],
    );
    let err = match sluice::daemon::Daemon::start(config).await {
        Ok(_) => panic!("a raw-content dictionary was accepted for v2"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot serve v2"), "{err}");
}
