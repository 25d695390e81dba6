//! `sluice tail`: an operator's consumer for sluice's Jetstream v1 endpoint (`/subscribe`)
//! or any real Jetstream. Subscribes with collection/DID filters and a cursor, prints each
//! event (pretty or JSONL), shows catch-up progress on a terminal, keeps its place in a
//! `--cursor-file`, and reconnects with jittered backoff, resuming from its cursor.
//!
//! Owns the client side of the v1 wire only. Must never: print an event twice or skip one
//! across a reconnect or restart (the cursor is inclusive; [`cursor::Position`] dedups the
//! overlap), save a cursor past output that has not been flushed, write anything but
//! events to stdout, retry a request the server rejected as invalid (HTTP 4xx other
//! than 429), or move past a cursor the server no longer retains (`CursorTooOld`) on its
//! own. Server retry hints (HTTP `Retry-After`, "in N s" in a 1012 close reason) are
//! honoured.

pub mod cursor;
pub mod endpoint;
pub mod format;
pub mod progress;

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{
    self,
    client::IntoClientRequest,
    http::{header, HeaderValue, StatusCode},
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

use cursor::{CursorFile, Position};
use format::Format;
use progress::Progress;

/// Default endpoint: a local sluice's Jetstream v1 listener.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:6008/subscribe";

/// How often a changed cursor is saved to `--cursor-file` (and on exit).
pub const CURSOR_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Arguments of `sluice tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Jetstream v1 endpoint: ws://host:port/subscribe, wss://..., or just host[:port]
    /// (a loopback host or an explicit port means ws://, otherwise wss://; the path
    /// defaults to /subscribe).
    #[arg(long, env = "SLUICE_TAIL_URL", default_value = DEFAULT_URL)]
    pub url: String,

    /// Only events of this collection (NSID), or of a namespace with `prefix.*`.
    /// Repeatable, at most 100. Sent as `wantedCollections`.
    #[arg(long = "collection", value_name = "NSID")]
    pub collections: Vec<String>,

    /// Only events of this repo DID. Repeatable, at most 10,000. Sent as `wantedDids`.
    #[arg(long = "did", value_name = "DID")]
    pub dids: Vec<String>,

    /// Start here instead of live: unix microseconds (as Jetstream v1 `cursor`), an
    /// RFC 3339 time (2026-07-04T06:00:00Z), or a duration ago (90m, 2h). A saved
    /// --cursor-file takes precedence.
    #[arg(long, value_parser = parse_cursor, allow_hyphen_values = true)]
    pub cursor: Option<i64>,

    /// Resume from this file's saved cursor if it exists, and keep saving the last
    /// `time_us` printed there (atomically, at most every second, and on exit).
    #[arg(long, value_name = "PATH")]
    pub cursor_file: Option<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value = "pretty")]
    pub format: Format,

    /// Stop after printing this many events.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Stop after this long, e.g. 30s, 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Never draw the catch-up progress bar (it is only drawn when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,

    /// Ask sluice for notice events (e.g. an oversized event withheld); `notices=true`.
    #[arg(long)]
    pub notices: bool,

    /// Replace the connection after this long without any message or pong.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// Smallest reconnect backoff (doubling per failed attempt, jittered).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub backoff_min: Duration,

    /// Largest reconnect backoff.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
}

/// Why a tail ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `--count` events printed.
    Count,
    /// `--duration` elapsed.
    Duration,
    /// The stop future resolved (Ctrl-C / SIGTERM).
    Interrupted,
    /// stdout was closed (e.g. piped into `head`).
    OutputClosed,
}

/// What a tail did.
#[derive(Debug, Clone)]
pub struct TailSummary {
    /// Events printed.
    pub events: u64,
    /// Events received again after a resume and not printed.
    pub duplicates_skipped: u64,
    /// Messages that were not JSON events (skipped, with a warning).
    pub unparsable: u64,
    /// Successful websocket connections.
    pub connections: u64,
    /// The last `time_us` printed (what the cursor file holds).
    pub last_time_us: Option<i64>,
    pub stop: StopReason,
}

/// `sluice tail`: prints to stdout until Ctrl-C or SIGTERM (or `--count`/`--duration`),
/// saving the cursor on the way out.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let summary = tail(&args, stdout, interrupted()).await?;
    tracing::debug!(?summary, "tail finished");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops tail");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The tail loop, writing events to `out` until a stop condition or `stop` resolves.
/// Progress is drawn on stderr only if stderr is a terminal and `--no-progress` is unset.
pub async fn tail<W: Write + Send>(
    args: &TailArgs,
    out: W,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<TailSummary> {
    let base = endpoint::base_url(&args.url)?;
    endpoint::check_filters(&args.collections, &args.dids)?;
    if args.backoff_min > args.backoff_max {
        anyhow::bail!("--backoff-min is larger than --backoff-max");
    }
    let mut cursor_file = args
        .cursor_file
        .as_deref()
        .map(|p| CursorFile::new(p, CURSOR_SAVE_INTERVAL));
    let mut pos = Position::new();
    let mut start_cursor = args.cursor;
    if let Some(file) = &mut cursor_file {
        if let Some(saved) = file.load()? {
            tracing::info!(
                path = %file.path().display(),
                time_us = saved.time_us(),
                "resuming from the cursor file"
            );
            pos = saved;
        }
    }
    let progress_on = !args.no_progress && std::io::stderr().is_terminal();
    let mut t = Tailer {
        args,
        out,
        out_is_terminal: false,
        durable: pos.clone(),
        pos,
        cursor_file,
        progress: Progress::stderr(progress_on),
        summary: TailSummary {
            events: 0,
            duplicates_skipped: 0,
            unparsable: 0,
            connections: 0,
            last_time_us: None,
            stop: StopReason::Interrupted,
        },
    };
    t.out_is_terminal = progress_on && std::io::stdout().is_terminal();
    let deadline = args.duration.map(|d| Instant::now() + d);
    tokio::pin!(stop);

    let mut attempt: u32 = 0;
    let stop_reason = loop {
        let cursor = t.pos.time_us().or(start_cursor);
        let url =
            endpoint::subscribe_url(&base, &args.collections, &args.dids, cursor, args.notices);
        if cursor.is_none() {
            // Started live: if this connection drops before any event, resume from when
            // it was opened rather than from "live again", so nothing in between is lost.
            start_cursor = Some(crate::clock::now_us());
        }
        let ended = t.connection(&url, deadline, stop.as_mut()).await;
        let (progressed, retry_after, why) = match ended {
            End::Stop(reason) => break reason,
            End::Fatal(err) => {
                t.finish();
                return Err(err);
            }
            End::Dropped {
                progressed,
                retry_after,
                why,
            } => (progressed, retry_after, why),
        };
        attempt = if progressed {
            0
        } else {
            attempt.saturating_add(1)
        };
        let delay = retry_after.unwrap_or_else(|| backoff(args, attempt));
        t.progress.clear();
        tracing::warn!(
            reason = %why,
            retry_in_ms = delay.as_millis() as u64,
            cursor = t.pos.time_us().or(start_cursor),
            "disconnected; reconnecting"
        );
        if let Err(err) = t.flush_and_save(true) {
            t.finish();
            return Err(err);
        }
        let wake = Instant::now() + delay;
        tokio::select! {
            _ = stop.as_mut() => break StopReason::Interrupted,
            _ = sleep_until_opt(deadline) => break StopReason::Duration,
            _ = tokio::time::sleep_until(wake) => {}
        }
    };
    t.summary.stop = stop_reason;
    let saved = t.flush_and_save(true);
    t.finish();
    if stop_reason != StopReason::OutputClosed {
        saved?;
    }
    t.summary.last_time_us = t.durable.time_us();
    Ok(t.summary)
}

fn parse_cursor(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(us) = text.parse::<i64>() {
        return if us >= 0 {
            Ok(us)
        } else {
            Err("a cursor is unix microseconds, not negative".into())
        };
    }
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return i64::try_from(t.unix_timestamp_nanos() / 1000)
            .map_err(|_| format!("{text} is out of range"));
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        let ago_us = i64::try_from(ago.as_micros()).unwrap_or(i64::MAX);
        return Ok(crate::clock::now_us().saturating_sub(ago_us).max(0));
    }
    Err(format!(
        "{text:?} is not unix microseconds, an RFC 3339 time or a duration ago (2h)"
    ))
}

/// Doubling ceiling from `--backoff-min` to `--backoff-max`, "equal jitter": a random
/// delay between half the ceiling and the ceiling, so reconnects never stampede.
fn backoff(args: &TailArgs, attempt: u32) -> Duration {
    let min = args.backoff_min.as_micros().max(1) as u64;
    let max = (args.backoff_max.as_micros() as u64).max(min);
    let ceiling = min.saturating_mul(1u64 << attempt.min(32)).min(max);
    let low = ceiling / 2;
    Duration::from_micros(rand::thread_rng().gen_range(low..=ceiling))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

enum End {
    Stop(StopReason),
    Dropped {
        progressed: bool,
        retry_after: Option<Duration>,
        why: String,
    },
    Fatal(anyhow::Error),
}

enum Handled {
    Continue,
    Stop(StopReason),
}

struct Tailer<'a, W: Write> {
    args: &'a TailArgs,
    out: W,
    /// stdout shares the terminal with the progress bar: erase the bar before printing.
    out_is_terminal: bool,
    /// Everything written to `out`.
    pos: Position,
    /// Everything written and flushed: the only position ever saved.
    durable: Position,
    cursor_file: Option<CursorFile>,
    progress: Progress,
    summary: TailSummary,
}

impl<W: Write> Tailer<'_, W> {
    async fn connection(
        &mut self,
        url: &url::Url,
        deadline: Option<Instant>,
        mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> End {
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(err) => return End::Fatal(anyhow::anyhow!("bad url {url}: {err}")),
        };
        request.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("sluice-tail/", env!("CARGO_PKG_VERSION"))),
        );
        tracing::debug!(%url, "connecting");
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(request, None, true),
        );
        let ws = tokio::select! {
            _ = stop.as_mut() => return End::Stop(StopReason::Interrupted),
            _ = sleep_until_opt(deadline) => return End::Stop(StopReason::Duration),
            result = connect => match result {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(err)) => return refused(err),
                Err(_) => return dropped(false, "connect timed out after 10s"),
            },
        };
        self.summary.connections += 1;
        let (mut sink, mut source) = ws.split();
        let mut ping =
            tokio::time::interval((self.args.stall_timeout / 3).max(Duration::from_millis(10)));
        ping.tick().await;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_heard = Instant::now();
        let mut progressed = false;
        let close = |code: CloseCode| {
            Message::Close(Some(CloseFrame {
                code,
                reason: "sluice tail done".into(),
            }))
        };
        loop {
            let stall_at = last_heard + self.args.stall_timeout;
            let next = tokio::select! {
                biased;
                _ = stop.as_mut() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(CloseCode::Normal))).await;
                    return End::Stop(StopReason::Interrupted);
                }
                _ = sleep_until_opt(deadline) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(CloseCode::Normal))).await;
                    return End::Stop(StopReason::Duration);
                }
                _ = tick.tick() => {
                    self.progress.tick(crate::clock::now_us());
                    if let Err(end) = self.flush_and_save(false).map_err(|e| self.output_failed(e)) {
                        return end;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(stall_at) => {
                    return dropped(progressed, format!("no message or pong for {:?}", self.args.stall_timeout));
                }
                _ = ping.tick() => {
                    if let Err(err) = sink.send(Message::Ping(Default::default())).await {
                        return dropped(progressed, format!("ping failed: {err}"));
                    }
                    continue;
                }
                next = source.next() => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    match self.handle(text.as_str()) {
                        Ok(Handled::Continue) => progressed = true,
                        Ok(Handled::Stop(reason)) => {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                sink.send(close(CloseCode::Normal)),
                            )
                            .await;
                            return End::Stop(reason);
                        }
                        Err(err) => return self.output_failed(err),
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    last_heard = Instant::now();
                    self.summary.unparsable += 1;
                    if self.summary.unparsable == 1 || self.summary.unparsable % 1000 == 0 {
                        self.progress.clear();
                        tracing::warn!(
                            bytes = bytes.len(),
                            skipped = self.summary.unparsable,
                            "binary message skipped (compressed? tail does not request compress=true)"
                        );
                    }
                }
                Some(Ok(Message::Close(frame))) => return closed_by_server(progressed, frame),
                Some(Ok(_)) => last_heard = Instant::now(),
                Some(Err(err)) => return dropped(progressed, format!("read failed: {err}")),
                None => return dropped(progressed, "connection ended"),
            }
        }
    }

    /// Prints one message if it is a new event. Errors are output errors.
    fn handle(&mut self, text: &str) -> std::io::Result<Handled> {
        let event: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) | Err(_) => {
                self.summary.unparsable += 1;
                if self.summary.unparsable == 1 || self.summary.unparsable % 1000 == 0 {
                    self.progress.clear();
                    tracing::warn!(
                        skipped = self.summary.unparsable,
                        message = %text.chars().take(120).collect::<String>(),
                        "message is not a JSON event; skipped"
                    );
                }
                return Ok(Handled::Continue);
            }
        };
        let time_us = event.get("time_us").and_then(Value::as_i64);
        let identity = match time_us {
            Some(t) => {
                let id = format::identity(&event);
                if self.pos.is_duplicate(t, &id) {
                    self.summary.duplicates_skipped += 1;
                    return Ok(Handled::Continue);
                }
                Some((t, id))
            }
            None => None,
        };
        if self.out_is_terminal {
            self.progress.clear();
        }
        match self.args.format {
            Format::Jsonl => {
                self.out.write_all(format::jsonl(text).as_bytes())?;
            }
            Format::Pretty => {
                self.out.write_all(format::pretty(&event).as_bytes())?;
            }
        }
        self.out.write_all(b"\n")?;
        if self.out_is_terminal {
            self.flush_output()?;
        }
        self.summary.events += 1;
        if let Some((t, id)) = identity {
            self.pos.advance(t, id);
            self.progress.on_event(t, crate::clock::now_us());
        }
        if self.args.count.is_some_and(|n| self.summary.events >= n) {
            return Ok(Handled::Stop(StopReason::Count));
        }
        Ok(Handled::Continue)
    }

    fn flush_output(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        if self.durable != self.pos {
            self.durable = self.pos.clone();
        }
        Ok(())
    }

    /// Flushes stdout, then saves the flushed position (rate-limited unless `now`).
    fn flush_and_save(&mut self, now: bool) -> anyhow::Result<()> {
        self.flush_output().context("cannot write to stdout")?;
        if let Some(file) = &mut self.cursor_file {
            if now {
                file.save(&self.durable)?;
            } else {
                file.maybe_save(&self.durable)?;
            }
        }
        Ok(())
    }

    fn output_failed(&mut self, err: impl Into<anyhow::Error>) -> End {
        let err: anyhow::Error = err.into();
        let closed = err.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if closed {
            End::Stop(StopReason::OutputClosed)
        } else {
            End::Fatal(err)
        }
    }

    fn finish(&mut self) {
        self.progress.finish();
    }
}

fn dropped(progressed: bool, why: impl Into<String>) -> End {
    End::Dropped {
        progressed,
        retry_after: None,
        why: why.into(),
    }
}

/// The server closed the stream: resume from the cursor (after its retry hint, if it gave
/// one), except when resuming cannot work.
fn closed_by_server(progressed: bool, frame: Option<CloseFrame>) -> End {
    let Some(frame) = frame else {
        return dropped(progressed, "server closed");
    };
    let code = u16::from(frame.code);
    let reason = frame.reason.as_str();
    let why = format!("server closed: {code} {reason}");
    if reason.starts_with("CursorTooOld") {
        // Reconnecting with the same cursor cannot succeed, and moving it silently would
        // skip events: the operator decides.
        return End::Fatal(anyhow::anyhow!(
            "{why}; events after the saved cursor are no longer retained. Start again with an \
             explicit --cursor (or without the cursor file) to accept the gap"
        ));
    }
    if code == 1008 && !reason.starts_with("ConsumerTooSlow") {
        return End::Fatal(anyhow::anyhow!("{why}"));
    }
    End::Dropped {
        progressed,
        retry_after: retry_hint(reason),
        why,
    }
}

/// A server-advised delay in a close reason: "... in 7 s", "... in 7 seconds".
fn retry_hint(reason: &str) -> Option<Duration> {
    let words: Vec<&str> = reason
        .split(|c: char| c.is_whitespace() || c == ';' || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(3).find_map(|w| {
        let unit_ok = matches!(w[2].trim_end_matches('.'), "s" | "sec" | "secs" | "seconds");
        if w[0] == "in" && unit_ok {
            let secs: f64 = w[1].parse().ok()?;
            (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
        } else {
            None
        }
    })
}

/// A failed handshake: retry unless the server said the request itself is wrong.
fn refused(err: tungstenite::Error) -> End {
    let tungstenite::Error::Http(response) = &err else {
        return dropped(false, format!("connect failed: {err}"));
    };
    let status = response.status();
    let body = response
        .body()
        .as_deref()
        .map(|b| {
            String::from_utf8_lossy(b)
                .trim()
                .chars()
                .take(300)
                .collect::<String>()
        })
        .unwrap_or_default();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        return End::Dropped {
            progressed: false,
            retry_after,
            why: format!("server answered {status} {body}"),
        };
    }
    End::Fatal(anyhow::anyhow!(
        "server refused the subscription: {status} {body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tail: TailArgs,
    }

    fn args(extra: &[&str]) -> TailArgs {
        let mut argv = vec!["tail"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).tail
    }

    #[test]
    fn parses_cursors() {
        assert_eq!(parse_cursor("1700000000000000"), Ok(1_700_000_000_000_000));
        assert_eq!(
            parse_cursor("2023-11-14T22:13:20Z"),
            Ok(1_700_000_000_000_000)
        );
        let ago = parse_cursor("1h").unwrap();
        let expect = crate::clock::now_us() - 3_600_000_000;
        assert!((ago - expect).abs() < 5_000_000);
        assert!(parse_cursor("-5").is_err());
        assert!(parse_cursor("yesterday-ish").is_err());
    }

    #[test]
    fn reads_retry_hints() {
        assert_eq!(
            retry_hint("sluice is restarting; resume with your cursor in 7 s"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_hint("try again in 2.5 seconds."),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(retry_hint("sluice is restarting"), None);
        assert_eq!(retry_hint("in x s"), None);
    }

    #[test]
    fn backoff_is_jittered_within_bounds() {
        let a = args(&["--backoff-min", "100ms", "--backoff-max", "1s"]);
        for attempt in 0..40 {
            let d = backoff(&a, attempt);
            let ceiling = (100u64 << attempt.min(32)).min(1000);
            assert!(d <= Duration::from_millis(ceiling), "{attempt}: {d:?}");
            assert!(d >= Duration::from_millis(ceiling / 2), "{attempt}: {d:?}");
        }
    }

    #[test]
    fn args_parse() {
        let a = args(&[
            "--collection",
            "app.bsky.feed.post",
            "--collection",
            "app.bsky.graph.*",
            "--did",
            "did:plc:x",
            "--format",
            "jsonl",
            "--count",
            "5",
            "--duration",
            "10s",
        ]);
        assert_eq!(a.collections.len(), 2);
        assert_eq!(a.format, Format::Jsonl);
        assert_eq!(a.count, Some(5));
        assert_eq!(a.duration, Some(Duration::from_secs(10)));
        assert_eq!(a.url, DEFAULT_URL);
    }
}
