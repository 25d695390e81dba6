//! The synthetic frame generator, the paced publisher and the in-process upstream server.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use sluice::upstream::synth::{Synth, SynthOptions};

use crate::control::{Control, Tally, PH_COUNT, PH_WARMUP};
use crate::frame_meta::{frame_meta, seq_key, FrameMeta};
use crate::hist::{now_ns, Hist};
use crate::stamps::Stamps;

pub(crate) struct GenFrame {
    pub(crate) bytes: Bytes,
    pub(crate) meta: FrameMeta,
}

/// Starts the synthetic frame generator on its own thread; it stays ahead of the publisher
/// by at most `ahead` frames and ends when the receiver is dropped.
pub(crate) fn start_generator(
    seed: u64,
    dids: usize,
    ahead: usize,
) -> (Receiver<GenFrame>, Arc<AtomicU64>) {
    start_generator_from(seed, dids, ahead, SynthOptions::default().start_seq)
}

/// [`start_generator`] with the upstream seqs starting at `start_seq` (above what a
/// pre-filled log already holds, so sluice does not drop the frames as already seen).
pub(crate) fn start_generator_from(
    seed: u64,
    dids: usize,
    ahead: usize,
    start_seq: u64,
) -> (Receiver<GenFrame>, Arc<AtomicU64>) {
    let (tx, rx) = sync_channel::<GenFrame>(ahead);
    let made = Arc::new(AtomicU64::new(0));
    let made2 = Arc::clone(&made);
    std::thread::spawn(move || {
        // Frames are dated from now, like a live firehose: with the synthesizer's fixed
        // 2025 date, sluice's retention (by source time) deleted each segment as it was
        // committed, and a subscriber that fell into catch-up was ended as too old.
        let synth = Synth::new(&SynthOptions {
            seed,
            count: usize::MAX,
            dids,
            start_seq,
            start_time_ms: sluice::clock::now_us() / 1000,
        });
        for frame in synth {
            let meta = frame_meta(&frame);
            if tx
                .send(GenFrame {
                    bytes: Bytes::from(frame),
                    meta,
                })
                .is_err()
            {
                return;
            }
            made2.fetch_add(1, Ordering::Relaxed);
        }
    });
    (rx, made)
}

pub(crate) type BoxSink = Pin<Box<dyn Sink<Message, Error = anyhow::Error> + Send>>;

pub(crate) enum PubSink {
    Ws(BoxSink),
    Redis {
        w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
        channel: String,
    },
}

impl PubSink {
    pub(crate) async fn feed(&mut self, frame: &Bytes) -> anyhow::Result<()> {
        match self {
            PubSink::Ws(s) => s.feed(Message::Binary(frame.clone())).await,
            PubSink::Redis { w, channel } => {
                let head = format!(
                    "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{}\r\n${}\r\n",
                    channel.len(),
                    channel,
                    frame.len()
                );
                w.write_all(head.as_bytes()).await?;
                w.write_all(frame).await?;
                w.write_all(b"\r\n").await?;
                Ok(())
            }
        }
    }
    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            PubSink::Ws(s) => s.flush().await,
            PubSink::Redis { w, .. } => Ok(w.flush().await?),
        }
    }
}

#[derive(Default)]
pub(crate) struct PubStats {
    pub(crate) sent: u64,
    pub(crate) underruns: u64,
    pub(crate) send_errors: u64,
    pub(crate) reconnects: u64,
    /// Lateness of each send against its schedule, µs.
    pub(crate) lag: Hist,
}

/// The generator's next frame, waited for without blocking the runtime; None once the
/// generator has ended. (It takes `&mut`: a `&Receiver` held across the wait would make
/// the caller's future not `Send`.)
pub(crate) async fn next_frame(frames: &mut Receiver<GenFrame>) -> Option<GenFrame> {
    loop {
        match frames.try_recv() {
            Ok(frame) => return Some(frame),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return None,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Clone)]
pub(crate) struct PubCtx {
    pub(crate) rate: f64,
    pub(crate) ctl: Arc<Control>,
    pub(crate) stamps: Arc<Stamps>,
    pub(crate) tallies: Arc<[Tally; PH_COUNT]>,
}

/// A paced feed made ready before anything is measured: the state the publisher shares
/// with the subscribers, and the generator already running ahead.
pub(crate) struct Feed {
    pub(crate) ctx: PubCtx,
    frames: Receiver<GenFrame>,
}

impl Feed {
    /// The control in warmup, send stamps for 360 s at `rate` frames/s, and the generator
    /// filled 4 s ahead (at least 1,000 frames; waiting at most 60 s for it).
    pub(crate) async fn ready(rate: u32, seed: u64, dids: usize) -> Feed {
        Self::ready_from(rate, seed, dids, SynthOptions::default().start_seq).await
    }

    /// [`Feed::ready`] with the upstream seqs starting at `start_seq`.
    pub(crate) async fn ready_from(rate: u32, seed: u64, dids: usize, start_seq: u64) -> Feed {
        let ctl = Arc::new(Control {
            phase: AtomicU8::new(PH_WARMUP),
            stall_active: AtomicBool::new(false),
            stop_publish: AtomicBool::new(false),
        });
        let ahead = (rate as usize * 4).max(1000);
        let rate = f64::from(rate.max(1));
        let stamps = Arc::new(Stamps::new((rate * 180.0) as usize * 2));
        let tallies: Arc<[Tally; PH_COUNT]> = Arc::new(Default::default());
        let (frames, made) = start_generator_from(seed, dids, ahead, start_seq);
        let fill_deadline = Instant::now() + Duration::from_secs(60);
        while made.load(Ordering::Relaxed) < ahead as u64 && Instant::now() < fill_deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Feed {
            ctx: PubCtx {
                rate,
                ctl,
                stamps,
                tallies,
            },
            frames,
        }
    }

    /// Publishes into `sinks` on a task of its own and waits out `warmup_secs`; the
    /// task ends (with its stats) once `stop_publish` is set.
    pub(crate) async fn start(
        self,
        sinks: tokio::sync::mpsc::Receiver<PubSink>,
        warmup_secs: u64,
    ) -> tokio::task::JoinHandle<PubStats> {
        let publisher = tokio::spawn(publish(self.ctx, self.frames, sinks));
        tokio::time::sleep(Duration::from_secs(warmup_secs)).await;
        publisher
    }
}

/// Paces frames out at `rate` until `stop_publish`. New sinks (an upstream reconnect)
/// replace the current one.
pub(crate) async fn publish(
    ctx: PubCtx,
    rx: Receiver<GenFrame>,
    mut sinks: tokio::sync::mpsc::Receiver<PubSink>,
) -> PubStats {
    let mut stats = PubStats::default();
    let mut sink = match tokio::time::timeout(Duration::from_secs(30), sinks.recv()).await {
        Ok(Some(s)) => Some(s),
        _ => return stats,
    };
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    while !ctx.ctl.stop_publish.load(Ordering::Relaxed) {
        if let Ok(new) = sinks.try_recv() {
            sink = Some(new);
            stats.reconnects += 1;
        }
        let due = (t0.elapsed().as_secs_f64() * ctx.rate) as u64;
        let mut starved = false;
        let mut fed = false;
        while sent < due {
            let frame = match rx.try_recv() {
                Ok(f) => f,
                Err(TryRecvError::Empty) => {
                    stats.underruns += 1;
                    starved = true;
                    break;
                }
                Err(TryRecvError::Disconnected) => return stats,
            };
            let scheduled = t0 + Duration::from_secs_f64(sent as f64 / ctx.rate);
            sent += 1;
            let ns = now_ns();
            stats
                .lag
                .record(u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX));
            if let Some(seq) = frame.meta.seq {
                ctx.stamps.insert(seq_key(seq), ns);
            }
            if let Some(k) = frame.meta.commit_key {
                ctx.stamps.insert(k, ns);
            }
            let phase = ctx.ctl.phase.load(Ordering::Relaxed) as usize;
            ctx.tallies[phase.min(PH_COUNT - 1)].add(&frame.meta);
            if let Some(s) = sink.as_mut() {
                if s.feed(&frame.bytes).await.is_err() {
                    stats.send_errors += 1;
                    sink = None;
                } else {
                    fed = true;
                }
            }
            stats.sent += 1;
            // Never hold the socket unflushed for long when far behind.
            if fed && sent % 64 == 0 {
                if let Some(s) = sink.as_mut() {
                    if s.flush().await.is_err() {
                        stats.send_errors += 1;
                        sink = None;
                    }
                }
            }
        }
        if fed {
            if let Some(s) = sink.as_mut() {
                if s.flush().await.is_err() {
                    stats.send_errors += 1;
                    sink = None;
                }
            }
        }
        let next = t0 + Duration::from_secs_f64((sent + 1) as f64 / ctx.rate);
        if starved {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::time::sleep_until(next.into()).await;
        }
    }
    stats
}

/// Starts the in-process upstream relay on a free loopback port, handing each connection
/// from sluice to the publisher through `sinks`; returns the URL for `--upstream`.
pub(crate) async fn start_upstream(
    sinks: tokio::sync::mpsc::Sender<PubSink>,
) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(upstream_server(listener, sinks));
    Ok(format!(
        "ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos"
    ))
}

/// Accepts upstream connections from sluice on `listener` (any path) and hands each one's
/// sink to the publisher; reads are drained so pings are answered.
pub(crate) async fn upstream_server(
    listener: TcpListener,
    sinks: tokio::sync::mpsc::Sender<PubSink>,
) {
    for _ in 0..1000 {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(Ok(ws)) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::accept_async(stream),
        )
        .await
        else {
            continue;
        };
        let (sink, mut source) = ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
        let sink: BoxSink = Box::pin(sink.sink_map_err(anyhow::Error::from));
        if sinks.send(PubSink::Ws(sink)).await.is_err() {
            return;
        }
    }
}
