//! Replay server: serves a capture as a local `com.atproto.sync.subscribeRepos` upstream, so
//! anyone can stage sluice against recorded or synthetic traffic at any speed.
//!
//! Owns: the websocket endpoint, per-connection cursor handling (`?cursor=N` exclusive,
//! `FutureCursor`), pacing by the frames' own `time`, looping with `seq`/`time` rewritten,
//! and the few bytes of CBOR reading and patching that needs (via `ciborium-ll`, never via
//! `decode`, which is the code being staged). Must never: buffer more than one frame per
//! connection ahead of the socket, change any byte of a frame other than the top-level
//! `seq`/`time` values (and those only on looped laps), or let one connection's failure
//! affect another.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use ciborium_ll::{Decoder, Header};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

use super::capture;
use super::synth::Cbor;

/// The one path served; any other path is answered 404 before the upgrade.
pub const SUBSCRIBE_REPOS_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";

/// The longest a paced replay waits between two frames, whatever the source `time` gap
/// divided by the speed says: a capture spanning a quiet hour (or a clock jump between two
/// spliced captures) must not stall a staging run. Later frames keep their relative spacing.
pub const MAX_PACING_WAIT: Duration = Duration::from_secs(5);

/// The largest frame accepted when loading a capture file. Above the relay's 5 MB limit on
/// purpose: replay serves what was recorded, limits are for the consumer to enforce.
pub const REPLAY_LOAD_MAX_FRAME: usize = 64 << 20;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an error frame, how long to wait for the client to finish the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Nesting deeper than this is not a frame we can say anything about; it is served as is.
const MAX_DEPTH: usize = 64;

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as each connection's socket takes frames.
    Max,
    /// Source `time` deltas divided by this factor (1.0 = real time, 10.0 = ten times
    /// faster). Must be finite and > 0.
    Factor(f64),
}

impl FromStr for Speed {
    type Err = String;

    /// `max`, or a positive number such as `1`, `0.5`, `20`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Speed::Factor(f)),
            _ => Err(format!(
                "speed must be `max` or a positive number, not {s:?}"
            )),
        }
    }
}

/// The frames to serve.
#[derive(Debug, Clone)]
pub enum ReplaySource {
    /// Frames already in memory, in capture order.
    Frames(Vec<Bytes>),
    /// A capture file (`[u32 LE length][frame]`), read whole at start; frames above
    /// [`REPLAY_LOAD_MAX_FRAME`] make loading fail.
    File(PathBuf),
}

/// Where to listen.
#[derive(Debug)]
pub enum Listen {
    Addr(SocketAddr),
    /// An already-bound listener, e.g. bound to port 0 by a test that needs the port first.
    Listener(TcpListener),
}

/// Everything [`serve`] needs.
#[derive(Debug)]
pub struct ReplayOptions {
    pub frames: ReplaySource,
    pub listen: Listen,
    pub speed: Speed,
    /// Replay the capture again and again, rewriting `seq` and `time` (see [`serve`]).
    pub looped: bool,
}

/// Serves the capture on `ws://<listen>/xrpc/com.atproto.sync.subscribeRepos` until the
/// returned future is dropped (dropping it also ends every connection). Errors only if the
/// source cannot be loaded, the speed is invalid, or the address cannot be bound.
///
/// Per connection, independently of all others:
/// - no `cursor`: from the first frame of the capture; `?cursor=N`: only frames whose
///   upstream `seq` is > N (exclusive, as relays resume), plus seq-less frames after the
///   first such frame; a malformed cursor is refused with HTTP 400 before the upgrade;
/// - without `looped`, a cursor above the capture's last seq gets an error frame
///   `{op:-1}{error:"FutureCursor", message}` and a close; a cursor equal to the last seq
///   gets nothing (caught up);
/// - pacing: [`Speed::Max`] sends as fast as the socket takes frames; [`Speed::Factor`]
///   waits (source `time` delta / factor) between frames, each wait capped at
///   [`MAX_PACING_WAIT`], measuring from the latest `time` sent so far (a frame stamped
///   earlier than that goes out at once); frames without a readable `time` are not delayed;
/// - without `looped`, after the last frame the connection stays open and idle (a relay
///   does not close a caught-up subscriber) until the client closes it;
/// - with `looped`, lap k (from 0) serves every frame with `seq + k * S` and
///   `time + k * D`, where S = last seq - first seq + 1 and D = the capture's time span
///   (latest - earliest, as relay times are not strictly ordered) plus one mean inter-frame
///   gap, rounded up to whole milliseconds (at least 1 ms), so seq keeps increasing and
///   every time of a lap is later than every time of the laps before. Lap 0 is byte-identical to the capture; later laps change only those two values
///   (`time` keeps its fractional digits and is written in UTC with `Z`). A cursor maps
///   into the lap containing it, so there is no FutureCursor in loop mode;
/// - at most one frame is prepared ahead of the socket: each send completes (is flushed)
///   before the next frame is built.
pub async fn serve(opts: ReplayOptions) -> anyhow::Result<()> {
    if let Speed::Factor(f) = opts.speed {
        if !(f.is_finite() && f > 0.0) {
            bail!("replay speed factor must be finite and > 0, got {f}");
        }
    }
    let frames = match opts.frames {
        ReplaySource::Frames(frames) => frames,
        ReplaySource::File(path) => {
            let shown = path.display().to_string();
            tokio::task::spawn_blocking(move || capture::read_all(&path, REPLAY_LOAD_MAX_FRAME))
                .await
                .context("capture loader panicked")?
                .with_context(|| format!("loading capture {shown}"))?
                .into_iter()
                .map(Bytes::from)
                .collect()
        }
    };
    let listener = match opts.listen {
        Listen::Addr(addr) => TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding replay listener on {addr}"))?,
        Listen::Listener(l) => l,
    };
    let capture = Arc::new(Capture::new(frames));
    let local = listener.local_addr().ok();
    tracing::info!(
        frames = capture.entries.len(),
        unreadable = capture.unreadable,
        first_seq = ?capture.first_seq,
        last_seq = ?capture.last_seq,
        addr = ?local,
        speed = ?opts.speed,
        looped = opts.looped,
        "replay: serving capture"
    );
    let cfg = Arc::new(ConnConfig {
        speed: opts.speed,
        looped: opts.looped,
    });

    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let capture = Arc::clone(&capture);
                    let cfg = Arc::clone(&cfg);
                    conns.spawn(async move {
                        if let Err(e) = handle_connection(stream, capture, cfg).await {
                            tracing::debug!(%peer, error = %e, "replay: connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Usually fd exhaustion; back off instead of spinning on it.
                    tracing::warn!(error = %e, "replay: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

struct ConnConfig {
    speed: Speed,
    looped: bool,
}

/// The capture with the positions of the values a lap rewrites.
struct Capture {
    entries: Vec<Entry>,
    first_seq: Option<i64>,
    last_seq: Option<i64>,
    /// Seq advance per lap.
    seq_stride: i64,
    /// Time advance per lap, nanoseconds.
    lap_nanos: i128,
    unreadable: usize,
}

struct Entry {
    bytes: Bytes,
    seq: Option<Located<i64>>,
    time: Option<Located<SourceTime>>,
}

struct Located<T> {
    value: T,
    /// Byte range of the whole encoded value (head and payload) inside the frame.
    span: Range<usize>,
}

#[derive(Clone, Copy)]
struct SourceTime {
    unix_nanos: i128,
    frac_digits: usize,
}

impl Capture {
    fn new(frames: Vec<Bytes>) -> Self {
        let mut unreadable = 0;
        let entries: Vec<Entry> = frames
            .into_iter()
            .enumerate()
            .map(|(index, bytes)| {
                let (seq, time) = match locate_seq_time(&bytes) {
                    Ok(found) => found,
                    Err(Malformed(why)) => {
                        if unreadable == 0 {
                            tracing::warn!(
                                index,
                                why,
                                "replay: frame not readable; it and any like it are served \
                                 unchanged, unpaced and never rewritten"
                            );
                        }
                        unreadable += 1;
                        (None, None)
                    }
                };
                Entry { bytes, seq, time }
            })
            .collect();
        let seqs = || {
            entries
                .iter()
                .filter_map(|e| e.seq.as_ref().map(|s| s.value))
        };
        let first_seq = seqs().next();
        let last_seq = seqs().max();
        let seq_stride = match (first_seq, last_seq) {
            (Some(a), Some(b)) => b.saturating_sub(a).saturating_add(1).max(1),
            _ => 1,
        };
        let times: Vec<i128> = entries
            .iter()
            .filter_map(|e| e.time.as_ref().map(|t| t.value.unix_nanos))
            .collect();
        // Relay times are not strictly ordered: the span is max - min, so every time in
        // lap k+1 is later than every time in lap k.
        let lap_nanos = match (times.iter().min(), times.iter().max()) {
            (Some(&first), Some(&last)) if times.len() > 1 => {
                let span = last - first;
                let mean_gap = (span / (times.len() as i128 - 1)).max(1);
                // Whole milliseconds, so millisecond-precision times shift exactly.
                (span + mean_gap + 999_999) / 1_000_000 * 1_000_000
            }
            _ => 1_000_000,
        };
        Capture {
            entries,
            first_seq,
            last_seq,
            seq_stride,
            lap_nanos,
            unreadable,
        }
    }

    /// Where a connection with `cursor` starts: `(lap, index)`, or `None` for FutureCursor.
    fn start(&self, cursor: Option<i64>, looped: bool) -> Option<(i64, usize)> {
        let (Some(cursor), Some(first), Some(last)) = (cursor, self.first_seq, self.last_seq)
        else {
            return Some((0, 0));
        };
        let lap = if looped && cursor >= first {
            (cursor - first) / self.seq_stride
        } else {
            0
        };
        if !looped && cursor > last {
            return None;
        }
        let local = cursor - lap * self.seq_stride;
        let index = self
            .entries
            .iter()
            .position(|e| e.seq.as_ref().is_some_and(|s| s.value > local));
        match index {
            Some(i) => Some((lap, i)),
            None if looped => Some((lap + 1, 0)),
            None => Some((0, self.entries.len())),
        }
    }

    /// The frame at `index` as lap `lap` serves it, with its (shifted) source time.
    fn frame(&self, lap: i64, index: usize) -> (Bytes, Option<i128>, Option<i64>) {
        let e = &self.entries[index];
        let seq = e
            .seq
            .as_ref()
            .map(|s| s.value.saturating_add(lap.saturating_mul(self.seq_stride)));
        let shift = self.lap_nanos * lap as i128;
        let time = e.time.as_ref().map(|t| t.value.unix_nanos + shift);
        if lap == 0 {
            return (e.bytes.clone(), time, seq);
        }
        let mut patches: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(2);
        if let (Some(s), Some(new)) = (&e.seq, seq) {
            patches.push((s.span.clone(), Cbor::Int(new).to_vec()));
        }
        if let (Some(t), Some(new)) = (&e.time, time) {
            // A time past year 9999 cannot be written; keep the original rather than fail.
            if let Some(text) = format_rfc3339(new, t.value.frac_digits) {
                patches.push((t.span.clone(), Cbor::Text(text).to_vec()));
            }
        }
        (Bytes::from(splice(&e.bytes, patches)), time, seq)
    }
}

/// Replaces byte ranges of `frame` (non-overlapping) with new encodings; all other bytes,
/// including the map head (the key count does not change), are copied unchanged.
fn splice(frame: &[u8], mut patches: Vec<(Range<usize>, Vec<u8>)>) -> Vec<u8> {
    patches.sort_by_key(|(r, _)| r.start);
    let mut out = Vec::with_capacity(frame.len() + 16);
    let mut at = 0;
    for (range, bytes) in patches {
        out.extend_from_slice(&frame[at..range.start]);
        out.extend_from_slice(&bytes);
        at = range.end;
    }
    out.extend_from_slice(&frame[at..]);
    out
}

// ---------------------------------------------------------------------------------------
// Minimal CBOR reading
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Malformed(&'static str);

/// Reads the head at `pos`: the header and where its payload starts.
fn head_at(buf: &[u8], pos: usize) -> Result<(Header, usize), Malformed> {
    let rest = buf.get(pos..).ok_or(Malformed("position past end"))?;
    let mut dec = Decoder::from(rest);
    let header = dec.pull().map_err(|_| Malformed("bad CBOR head"))?;
    Ok((header, pos + dec.offset()))
}

fn definite(len: Option<usize>) -> Result<usize, Malformed> {
    len.ok_or(Malformed("indefinite length is not DAG-CBOR"))
}

/// The end of the value starting at `pos`.
fn skip_value(buf: &[u8], pos: usize, depth: usize) -> Result<usize, Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed("nesting too deep"));
    }
    let (header, mut at) = head_at(buf, pos)?;
    match header {
        Header::Bytes(len) | Header::Text(len) => {
            let end = at
                .checked_add(definite(len)?)
                .ok_or(Malformed("length overflow"))?;
            if end > buf.len() {
                return Err(Malformed("string past end of frame"));
            }
            Ok(end)
        }
        Header::Array(len) => {
            for _ in 0..definite(len)? {
                at = skip_value(buf, at, depth + 1)?;
            }
            Ok(at)
        }
        Header::Map(len) => {
            for _ in 0..definite(len)? {
                at = skip_value(buf, at, depth + 1)?;
                at = skip_value(buf, at, depth + 1)?;
            }
            Ok(at)
        }
        Header::Tag(_) => skip_value(buf, at, depth + 1),
        Header::Break => Err(Malformed("unexpected break")),
        Header::Positive(_) | Header::Negative(_) | Header::Simple(_) | Header::Float(_) => Ok(at),
    }
}

fn text_at(buf: &[u8], pos: usize) -> Result<Option<(&str, usize)>, Malformed> {
    match head_at(buf, pos)? {
        (Header::Text(len), at) => {
            let end = at.saturating_add(definite(len)?);
            let bytes = buf.get(at..end).ok_or(Malformed("text past end"))?;
            let s = std::str::from_utf8(bytes).map_err(|_| Malformed("text is not UTF-8"))?;
            Ok(Some((s, end)))
        }
        _ => Ok(None),
    }
}

type SeqTime = (Option<Located<i64>>, Option<Located<SourceTime>>);

/// Finds the body's top-level `seq` (an integer) and `time` (RFC 3339 text), with their
/// byte spans. Frames whose header or body is not a definite map are errors; a body
/// without those keys (e.g. an error frame) is fine.
fn locate_seq_time(frame: &[u8]) -> Result<SeqTime, Malformed> {
    let body = skip_value(frame, 0, 0)?;
    let (header, mut at) = head_at(frame, body)?;
    let Header::Map(len) = header else {
        return Err(Malformed("body is not a map"));
    };
    let (mut seq, mut time) = (None, None);
    for _ in 0..definite(len)? {
        let key = text_at(frame, at)?;
        let key_end = match key {
            Some((_, end)) => end,
            None => skip_value(frame, at, 1)?,
        };
        let value_end = skip_value(frame, key_end, 1)?;
        match key.map(|(k, _)| k) {
            Some("seq") => {
                let value = match head_at(frame, key_end)?.0 {
                    Header::Positive(n) => i64::try_from(n).ok(),
                    Header::Negative(n) => i64::try_from(n).ok().map(|n| -1 - n),
                    _ => None,
                };
                seq = value.map(|value| Located {
                    value,
                    span: key_end..value_end,
                });
            }
            Some("time") => {
                time = text_at(frame, key_end)?
                    .and_then(|(s, _)| parse_rfc3339(s))
                    .map(|value| Located {
                        value,
                        span: key_end..value_end,
                    });
            }
            _ => {}
        }
        at = value_end;
    }
    Ok((seq, time))
}

/// The body's top-level `seq`, if the frame is readable and has one.
pub(crate) fn frame_seq(frame: &[u8]) -> Option<i64> {
    locate_seq_time(frame).ok()?.0.map(|s| s.value)
}

fn parse_rfc3339(s: &str) -> Option<SourceTime> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let frac_digits = s
        .split_once('.')
        .map(|(_, rest)| rest.bytes().take_while(u8::is_ascii_digit).count().min(9))
        .unwrap_or(0);
    Some(SourceTime {
        unix_nanos: dt.unix_timestamp_nanos(),
        frac_digits,
    })
}

fn format_rfc3339(unix_nanos: i128, frac_digits: usize) -> Option<String> {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(unix_nanos).ok()?;
    if !(0..=9999).contains(&dt.year()) {
        return None;
    }
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    if frac_digits > 0 {
        let nanos = format!("{:09}", dt.nanosecond());
        s.push('.');
        s.push_str(&nanos[..frac_digits.min(9)]);
    }
    s.push('Z');
    Some(s)
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

/// `Ok(None)` without a cursor, `Err` with a message for HTTP 400.
fn parse_cursor(query: Option<&str>) -> Result<Option<i64>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut cursor = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "cursor" {
            let n = v
                .parse::<i64>()
                .map_err(|_| format!("cursor must be an integer, got {v:?}"))?;
            cursor = Some(n);
        }
    }
    Ok(cursor)
}

fn reject(status: StatusCode, message: String) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(message));
    *resp.status_mut() = status;
    resp
}

fn future_cursor_frame(cursor: i64, last: Option<i64>) -> Vec<u8> {
    let mut out = Cbor::Map(vec![("op", Cbor::Int(-1))]).to_vec();
    let message = match last {
        Some(last) => format!("cursor {cursor} is beyond the last seq {last} of this capture"),
        None => format!("cursor {cursor} is beyond the end of this capture"),
    };
    Cbor::Map(vec![
        ("error", Cbor::text("FutureCursor")),
        ("message", Cbor::Text(message)),
    ])
    .encode(&mut out);
    out
}

// tungstenite's handshake `Callback` fixes the (large) `ErrorResponse` error type.
#[allow(clippy::result_large_err)]
async fn handle_connection(
    stream: TcpStream,
    capture: Arc<Capture>,
    cfg: Arc<ConnConfig>,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut cursor = None;
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != SUBSCRIBE_REPOS_PATH {
            return Err(reject(
                StatusCode::NOT_FOUND,
                format!("only {SUBSCRIBE_REPOS_PATH} is served here"),
            ));
        }
        cursor = parse_cursor(req.uri().query()).map_err(|m| reject(StatusCode::BAD_REQUEST, m))?;
        Ok(resp)
    };
    let ws = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async(stream, callback),
    )
    .await
    .context("websocket handshake timed out")?
    .context("websocket handshake")?;
    let (mut sink, mut source) = ws.split();

    // Draining the client side is what notices a close and answers pings.
    let reader = async move {
        while let Some(msg) = source.next().await {
            if matches!(msg, Ok(Message::Close(_)) | Err(_)) {
                break;
            }
        }
    };
    tokio::pin!(reader);

    let Some((lap, index)) = capture.start(cursor, cfg.looped) else {
        let frame = future_cursor_frame(cursor.unwrap_or_default(), capture.last_seq);
        sink.send(Message::Binary(frame.into())).await?;
        sink.close().await?;
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
        return Ok(());
    };

    tokio::select! {
        _ = &mut reader => return Ok(()),
        sent = send_frames(&mut sink, &capture, &cfg, cursor, lap, index) => sent?,
    }
    // Caught up on a finite capture: stay connected and idle, like a quiet relay.
    reader.await;
    Ok(())
}

async fn send_frames<S>(
    sink: &mut S,
    capture: &Capture,
    cfg: &ConnConfig,
    cursor: Option<i64>,
    mut lap: i64,
    mut index: usize,
) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let n = capture.entries.len();
    let mut prev_time: Option<i128> = None;
    let mut deadline = Instant::now();
    loop {
        if index >= n {
            if !cfg.looped || n == 0 {
                return Ok(());
            }
            lap = lap.saturating_add(1);
            index = 0;
        }
        let (bytes, time, seq) = capture.frame(lap, index);
        index += 1;
        if let (Some(c), Some(s)) = (cursor, seq) {
            // A capture with out-of-order seqs still never sends at or below the cursor.
            if s <= c {
                continue;
            }
        }
        if let Speed::Factor(factor) = cfg.speed {
            if let (Some(prev), Some(now)) = (prev_time, time) {
                let delta = (now - prev).max(0) as f64 / factor;
                let wait = Duration::from_nanos(delta.min(u64::MAX as f64) as u64);
                deadline += wait.min(MAX_PACING_WAIT);
                // Behind schedule (slow socket): send at once and catch up, never burst
                // ahead of the source timeline.
                tokio::time::sleep_until(deadline).await;
            } else {
                deadline = deadline.max(Instant::now());
            }
            // Relay `time`s are not strictly ordered; pacing against the latest time seen
            // sends a late-stamped frame at once without stretching the timeline after it.
            prev_time = prev_time.max(time);
        }
        sink.send(Message::Binary(bytes)).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::synth::{self, SynthOptions};

    #[test]
    fn locates_and_patches_only_seq_and_time() {
        let frames = synth::generate(&SynthOptions {
            count: 20,
            ..SynthOptions::default()
        });
        let capture = Capture::new(frames.into_iter().map(Bytes::from).collect());
        assert_eq!(capture.unreadable, 0);
        assert_eq!(capture.first_seq, Some(1_000_000));
        for (i, e) in capture.entries.iter().enumerate() {
            let (same, _, _) = capture.frame(0, i);
            assert_eq!(same, e.bytes);
            let (patched, time, seq) = capture.frame(3, i);
            let (pseq, ptime) = locate_seq_time(&patched).expect("patched frame parses");
            let pseq = pseq.expect("seq");
            assert_eq!(Some(pseq.value), seq);
            assert_eq!(
                pseq.value,
                e.seq.as_ref().expect("seq").value + 3 * capture.seq_stride
            );
            assert_eq!(ptime.expect("time").value.unix_nanos, time.expect("time"));
            // Everything outside the two values is unchanged.
            let s = e.seq.as_ref().expect("seq").span.clone();
            assert_eq!(patched[..s.start], e.bytes[..s.start]);
        }
    }

    #[test]
    fn rfc3339_keeps_precision() {
        let t = parse_rfc3339("2024-07-04T14:38:07.517Z").expect("parse");
        assert_eq!(t.frac_digits, 3);
        assert_eq!(
            format_rfc3339(t.unix_nanos + 1_000_000, 3).as_deref(),
            Some("2024-07-04T14:38:07.518Z")
        );
        let t = parse_rfc3339("2024-07-04T14:38:07.123456+02:00").expect("parse");
        assert_eq!(
            format_rfc3339(t.unix_nanos, t.frac_digits).as_deref(),
            Some("2024-07-04T12:38:07.123456Z")
        );
    }

    #[test]
    fn cursor_parsing() {
        assert_eq!(parse_cursor(None), Ok(None));
        assert_eq!(parse_cursor(Some("cursor=12")), Ok(Some(12)));
        assert_eq!(parse_cursor(Some("x=1&cursor=-3")), Ok(Some(-3)));
        assert!(parse_cursor(Some("cursor=abc")).is_err());
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("2.5".parse::<Speed>(), Ok(Speed::Factor(2.5)));
        assert!("0".parse::<Speed>().is_err());
    }
}
