//! Websocket subscribers: filters, URLs, connect, and the read loop that times each message.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::control::{Control, PH_COUNT};
use crate::frame_meta::{commit_key, frame_seq, json_str, seq_key, CLS_FOLLOW, CLS_LIKE, CLS_POST};
use crate::hist::{now_ns, Hist};
use crate::relay::REDIS_CHANNEL;
use crate::resp::read_flat;
use crate::stamps::Stamps;
use crate::target::{Target, Wire};

pub(crate) struct SubShared {
    /// Messages received per phase.
    pub(crate) delivered: [AtomicU64; PH_COUNT],
    pub(crate) hist: Mutex<[Hist; PH_COUNT]>,
    pub(crate) unmatched: AtomicU64,
    pub(crate) connected: AtomicBool,
    pub(crate) ended: AtomicBool,
    /// Why the connection ended, if it did.
    pub(crate) end_reason: Mutex<Option<String>>,
}

impl SubShared {
    pub(crate) fn new() -> Self {
        SubShared {
            delivered: Default::default(),
            hist: Mutex::new([Hist::new(), Hist::new(), Hist::new(), Hist::new()]),
            unmatched: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            end_reason: Mutex::new(None),
        }
    }
}

/// Events delivered in phase `ph`, summed over `subs`.
pub(crate) fn delivered(subs: &[Arc<SubShared>], ph: u8) -> u64 {
    subs.iter()
        .map(|s| s.delivered[ph as usize].load(Ordering::Relaxed))
        .sum()
}

pub(crate) struct SubSpec {
    pub(crate) url: String,
    pub(crate) v2: bool,
    /// A compressed wire (v1z, v2z).
    pub(crate) compressed: bool,
    /// The zstd dictionary of a compressed wire for the subscribers that decompress each
    /// message to time it: one in `TIMED_EVERY`, so that decompressing in the bench's own
    /// process does not starve the publisher and the other subscribers (it did at 200).
    pub(crate) dictionary: Option<&'static zstd::dict::DecoderDictionary<'static>>,
    /// CLS_* mask, None = everything.
    pub(crate) filter: Option<u8>,
    pub(crate) stalls: bool,
}

pub(crate) fn filter_names(f: u8) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f & CLS_POST != 0 {
        v.push("app.bsky.feed.post");
    }
    if f & CLS_LIKE != 0 {
        v.push("app.bsky.feed.like");
    }
    if f & CLS_FOLLOW != 0 {
        v.push("app.bsky.graph.follow");
    }
    v
}

/// The realistic mix: subscriber i takes everything with probability 0.1, else 1-3 of
/// posts/likes/follows; deterministic in (seed, i).
pub(crate) fn realistic_filter(seed: u64, i: usize) -> Option<u8> {
    let r = seq_key((seed as i64).wrapping_mul(1_000_003).wrapping_add(i as i64));
    if r % 10 == 0 {
        return None;
    }
    let r = r / 10;
    let k = 1 + (r % 3) as usize;
    let mut bits = [CLS_POST, CLS_LIKE, CLS_FOLLOW];
    // A tiny deterministic shuffle.
    let mut s = r / 3;
    for j in (1..3).rev() {
        let pick = (s % (j as u64 + 1)) as usize;
        bits.swap(j, pick);
        s /= j as u64 + 1;
    }
    Some(bits[..k].iter().fold(0, |a, b| a | b))
}

/// On a compressed wire, one subscriber in this many decompresses (and times) every message;
/// the others count what they receive.
pub(crate) const TIMED_EVERY: usize = 10;

/// Jetstream's v1 (1) or v2 (2) dictionary, prepared once for the bench's subscribers.
pub(crate) fn decoder_dictionary(version: u8) -> &'static zstd::dict::DecoderDictionary<'static> {
    static V1: std::sync::OnceLock<zstd::dict::DecoderDictionary<'static>> =
        std::sync::OnceLock::new();
    static V2: std::sync::OnceLock<zstd::dict::DecoderDictionary<'static>> =
        std::sync::OnceLock::new();
    if version == 1 {
        V1.get_or_init(|| {
            zstd::dict::DecoderDictionary::copy(sluice::wire::zstd::JETSTREAM_V1_DICTIONARY)
        })
    } else {
        V2.get_or_init(|| {
            zstd::dict::DecoderDictionary::copy(sluice::wire::zstd::JETSTREAM_V2_DICTIONARY)
        })
    }
}

pub(crate) fn sub_url(target: Target, port: u16, filter: Option<u8>) -> String {
    let base = format!("ws://127.0.0.1:{port}");
    let (path, param) = match target {
        Target::Sluice(Wire::Raw) => ("/xrpc/com.atproto.sync.subscribeRepos", "wantedCollections"),
        Target::Sluice(Wire::V1 | Wire::V1z) => ("/subscribe", "wantedCollections"),
        Target::Sluice(Wire::V2 | Wire::V2z) => (
            "/xrpc/network.bsky.jetstream.subscribeEvents",
            "collections",
        ),
        Target::Websocat | Target::RedisRelay => return format!("{base}/"),
        Target::RedisPubsub => return format!("redis://127.0.0.1:{port}"),
    };
    let mut url = format!("{base}{path}");
    if let Some(f) = filter {
        for (i, c) in filter_names(f).into_iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(param);
            url.push('=');
            url.push_str(c);
        }
    }
    let opt_in = match target {
        Target::Sluice(Wire::V1z) => Some("compress=true".to_string()),
        Target::Sluice(Wire::V2z) => Some(format!(
            "zstdDictionary={}",
            sluice::wire::zstd::JETSTREAM_V2_DICTIONARY_ID
        )),
        _ => None,
    };
    if let Some(opt_in) = opt_in {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&opt_in);
    }
    url
}

pub(crate) type ClientWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A connected subscriber: a websocket client, or a plain Redis pub/sub client.
pub(crate) enum SubConn {
    /// Boxed: tungstenite's stream is over a kilobyte, the RESP reader a tenth of that.
    Ws(Box<ClientWs>),
    Resp(BufReader<TcpStream>),
}

/// Connects a subscriber of either kind (`redis://host:port` URLs are pub/sub clients).
pub(crate) async fn connect(spec: &SubSpec) -> anyhow::Result<SubConn> {
    connect_from(spec, None).await
}

/// [`connect`], a websocket subscriber from the local address `source` (a loopback
/// address: one client IP of many) when given.
pub(crate) async fn connect_from(
    spec: &SubSpec,
    source: Option<IpAddr>,
) -> anyhow::Result<SubConn> {
    match spec.url.strip_prefix("redis://") {
        Some(addr) => connect_resp(addr).await.map(SubConn::Resp),
        None => connect_sub_from(spec, source)
            .await
            .map(|ws| SubConn::Ws(Box::new(ws))),
    }
}

/// A plain Redis pub/sub subscriber: its own RESP connection, subscribed to the channel the
/// publisher PUBLISHes to, the SUBSCRIBE confirmed before it counts as connected.
async fn connect_resp(addr: &str) -> anyhow::Result<BufReader<TcpStream>> {
    let mut last = anyhow!("not tried");
    for attempt in 0..5u64 {
        let attempt_once = async {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            let mut r = BufReader::with_capacity(64 * 1024, stream);
            let cmd = format!(
                "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{}\r\n",
                REDIS_CHANNEL.len(),
                REDIS_CHANNEL
            );
            r.get_mut().write_all(cmd.as_bytes()).await?;
            let mut parts = Vec::new();
            read_flat(&mut r, &mut parts).await?;
            if parts.first().map(|b| b.as_ref()) != Some(b"subscribe".as_slice()) {
                bail!("unexpected SUBSCRIBE reply");
            }
            Ok(r)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt_once).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) => last = e,
            Err(_) => last = anyhow!("connect timed out"),
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    Err(last)
}

/// Where a subscriber's messages come from.
enum Source {
    Ws(futures_util::stream::SplitStream<ClientWs>),
    /// The RESP connection and its scratch list of bulk strings.
    Resp(BufReader<TcpStream>, Vec<Bytes>),
}

impl Source {
    /// The next message (a pub/sub message's payload as a binary message), `None` at the
    /// end of the stream.
    async fn next(&mut self) -> Option<Result<Message, String>> {
        match self {
            Source::Ws(source) => source.next().await.map(|m| m.map_err(|e| e.to_string())),
            Source::Resp(r, parts) => loop {
                parts.clear();
                if let Err(e) = read_flat(r, parts).await {
                    return Some(Err(e.to_string()));
                }
                // Anything but `message <channel> <payload>` (none is expected) is skipped.
                if parts.len() == 3 && parts[0].as_ref() == b"message" {
                    return parts.pop().map(|payload| Ok(Message::Binary(payload)));
                }
            },
        }
    }
}

pub(crate) async fn connect_sub(spec: &SubSpec) -> anyhow::Result<ClientWs> {
    connect_sub_from(spec, None).await
}

async fn connect_sub_from(spec: &SubSpec, source: Option<IpAddr>) -> anyhow::Result<ClientWs> {
    let mut last = anyhow!("not tried");
    for attempt in 0..5u64 {
        let mut req = spec.url.as_str().into_client_request()?;
        if spec.v2 {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("xrpc.v1.json"),
            );
        }
        let attempt_once = async {
            let Some(source) = source else {
                return Ok(tokio_tungstenite::connect_async(req).await?.0);
            };
            let uri = req.uri();
            let host = uri.host().ok_or_else(|| anyhow!("no host in {uri}"))?;
            let port = uri.port_u16().ok_or_else(|| anyhow!("no port in {uri}"))?;
            let addr: SocketAddr = format!("{host}:{port}").parse()?;
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(addr).await?;
            let plain = tokio_tungstenite::MaybeTlsStream::Plain(stream);
            anyhow::Ok(tokio_tungstenite::client_async(req, plain).await?.0)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt_once).await {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => last = anyhow!("{e}"),
            Err(_) => last = anyhow!("connect timed out"),
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    Err(last)
}

pub(crate) async fn run_sub(
    spec: Arc<SubSpec>,
    conn: SubConn,
    ctl: Arc<Control>,
    stamps: Arc<Stamps>,
    me: Arc<SubShared>,
) {
    me.connected.store(true, Ordering::Relaxed);
    let stalled = || spec.stalls && ctl.stall_active.load(Ordering::Relaxed);
    let end = read_messages(&spec, conn, stalled, |key, timed| {
        let now = now_ns();
        let phase = (ctl.phase.load(Ordering::Relaxed) as usize).min(PH_COUNT - 1);
        me.delivered[phase].fetch_add(1, Ordering::Relaxed);
        match key.and_then(|k| stamps.get(k)) {
            Some(sent) => {
                let us = now.saturating_sub(sent) / 1000;
                me.hist.lock()[phase].record(us);
            }
            None if timed => {
                me.unmatched.fetch_add(1, Ordering::Relaxed);
            }
            // identity/account events carry no rev: not timed.
            None => {}
        }
    })
    .await;
    *me.end_reason.lock() = Some(end);
    me.ended.store(true, Ordering::Relaxed);
}

/// Reads a subscriber's messages until its stream ends (why, returned), calling `each`
/// as each one arrives with its match key, if it has one, and whether it should have
/// one (a raw frame always does; a commit event's key comes from its `did` and `rev`).
/// While `stalled()` says so, it stops reading (the peer sees a full socket).
pub(crate) async fn read_messages(
    spec: &SubSpec,
    conn: SubConn,
    stalled: impl Fn() -> bool,
    mut each: impl FnMut(Option<u64>, bool),
) -> String {
    // The sink half is kept so the connection stays open.
    let (_sink, mut source) = match conn {
        SubConn::Ws(ws) => {
            let (sink, source) = (*ws).split();
            (Some(sink), Source::Ws(source))
        }
        SubConn::Resp(r) => (None, Source::Resp(r, Vec::new())),
    };
    let mut decompressor = spec
        .dictionary
        .and_then(|d| zstd::bulk::Decompressor::with_prepared_dictionary(d).ok());
    loop {
        if stalled() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let msg = match source.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return format!("error: {e}"),
            None => return "stream ended".into(),
        };
        let key = match &msg {
            Message::Binary(b) if spec.compressed => decompressor
                .as_mut()
                .and_then(|d| d.decompress(b, 64 << 20).ok())
                .and_then(|plain| {
                    let t = std::str::from_utf8(&plain).ok()?;
                    Some(commit_key(json_str(t, "did")?, json_str(t, "rev")?))
                }),
            Message::Binary(b) => frame_seq(b).map(seq_key),
            Message::Text(t) => {
                let t = t.as_str();
                match (json_str(t, "did"), json_str(t, "rev")) {
                    (Some(d), Some(r)) => Some(commit_key(d, r)),
                    _ => None,
                }
            }
            Message::Close(c) => return format!("closed: {c:?}"),
            _ => continue,
        };
        let timed = (matches!(msg, Message::Binary(_)) && !spec.compressed) || key.is_some();
        each(key, timed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain Redis subscriber takes each pub/sub message's payload as one binary message,
    /// in order, skips any other reply, and ends with an error when Redis goes away.
    #[tokio::test]
    async fn resp_messages_arrive_as_binary_messages_in_order() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (client, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr()?),
            listener.accept()
        );
        let (mut redis, _) = accepted?;
        redis
            .write_all(
                b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nabc\r\n\
                  *3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n\
                  *3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$0\r\n\r\n",
            )
            .await?;
        drop(redis);
        let mut source = Source::Resp(BufReader::new(client?), Vec::new());
        let first = source.next().await;
        assert!(
            matches!(&first, Some(Ok(Message::Binary(b))) if b.as_ref() == b"abc"),
            "{first:?}"
        );
        let second = source.next().await;
        assert!(
            matches!(&second, Some(Ok(Message::Binary(b))) if b.is_empty()),
            "{second:?}"
        );
        assert!(matches!(source.next().await, Some(Err(_))));
        Ok(())
    }

    #[test]
    fn realistic_mix_shape() {
        let n = 10_000;
        let all = (0..n).filter(|i| realistic_filter(7, *i).is_none()).count();
        assert!((800..1200).contains(&all), "{all}");
        for i in 0..n {
            if let Some(f) = realistic_filter(7, i) {
                assert!(f != 0 && f & !(CLS_POST | CLS_LIKE | CLS_FOLLOW) == 0);
            }
        }
    }
}
