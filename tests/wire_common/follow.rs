//! Clients that follow a wire across drops, resuming by cursor, and what they saw.

use std::time::Duration;

use super::client::{next, scan_u64, Got};
use super::frames::{cbor_int, cbor_text, decode_frame};
use super::Ws;

/// Which wire a following client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    V1,
    V2,
    Raw,
}

/// What a following client saw: the position of every event (v1 `cursor`, v2 `seq`, raw
/// upstream `seq`) in order, and how the stream ended if it did.
#[derive(Debug, Default)]
pub struct Followed {
    pub positions: Vec<u64>,
    /// An error frame (`error` name), if one came.
    pub error: Option<String>,
    /// Close code and reason, if the server closed.
    pub close: Option<(u16, String)>,
    /// Other messages (#info, notices), as text.
    pub other: Vec<String>,
}

/// How a following client behaves.
#[derive(Debug, Clone, Copy)]
pub struct Follow {
    pub wire: Wire,
    /// Stop reading for `pause` after this many events.
    pub pause_after: Option<usize>,
    pub pause: Duration,
    /// Give up at this instant.
    pub deadline: tokio::time::Instant,
}

/// The position carried by one message, or `None` for control messages (recorded).
fn position(wire: Wire, got: &Got, out: &mut Followed) -> Option<u64> {
    match (wire, got) {
        (Wire::V1, Got::Text(t)) => {
            if t.contains("\"kind\":\"notice\"") {
                out.other.push(t.clone());
                return None;
            }
            scan_u64(t, "cursor")
        }
        (Wire::V2, Got::Text(t)) => {
            if t.starts_with("{\"$type\":\"error\"") {
                let v: serde_json::Value = serde_json::from_str(t).unwrap();
                out.error = v["error"].as_str().map(str::to_string);
                return None;
            }
            if t.contains("subscribeEvents#info\"") {
                out.other.push(t.clone());
                return None;
            }
            scan_u64(t, "seq")
        }
        (Wire::Raw, Got::Binary(b)) => {
            let (header, body) = decode_frame(b);
            if cbor_int(&header, "op") == Some(-1) {
                out.error = cbor_text(&body, "error");
                return None;
            }
            if cbor_text(&header, "t").as_deref() == Some("#info") {
                out.other.push(format!("{body:?}"));
                return None;
            }
            cbor_int(&body, "seq").map(|s| s as u64)
        }
        (_, other) => panic!("{wire:?} client got {other:?}"),
    }
}

/// Reads until the position reaches `target` (read at each step: it may be set later),
/// the server closes, or the deadline passes; pauses once if asked.
pub async fn follow(ws: &mut Ws, how: Follow, target: &std::sync::atomic::AtomicU64) -> Followed {
    use std::sync::atomic::Ordering;
    let mut out = Followed::default();
    let mut paused = false;
    loop {
        if out.positions.last().copied().unwrap_or(0) >= target.load(Ordering::Acquire) {
            return out;
        }
        if let Some(n) = how.pause_after {
            if !paused && out.positions.len() >= n {
                paused = true;
                tokio::time::sleep(how.pause).await;
            }
        }
        // Short slices, so a target set while the stream is idle is noticed.
        let wait = how
            .deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_millis(50));
        let got = next(ws, wait).await;
        match &got {
            Got::Timeout if tokio::time::Instant::now() >= how.deadline => return out,
            Got::Timeout => continue,
            Got::Closed(frame) => {
                out.close = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_string()));
                return out;
            }
            Got::Gone(e) => {
                out.close = Some((0, e.clone()));
                return out;
            }
            _ => {}
        }
        if let Some(p) = position(how.wire, &got, &mut out) {
            out.positions.push(p);
        }
    }
}
