//! For tests that run `sluice serve` as a child process, kill it and must know when it
//! holds a whole capture: a paced upstream of synthetic frames, and the raw wire asked
//! for the capture's last frame.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{generate, SynthOptions};
use tokio_tungstenite::tungstenite::Message;

/// `count` synthetic frames (seed `seed`) served once by an in-test `replay` upstream on
/// 127.0.0.1 at `speed` times real time: the frames and the upstream's URL.
pub async fn paced_upstream(count: usize, seed: u64, speed: f64) -> (Vec<Bytes>, String) {
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count,
        seed,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let url = format!("ws://{}", listener.local_addr().expect("upstream address"));
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames.clone()),
        listen: Listen::Listener(listener),
        speed: Speed::Factor(speed),
        looped: false,
    }));
    (frames, url)
}

/// The upstream `seq` of a message frame.
pub fn upstream_seq(frame: &Bytes) -> i64 {
    match sluice::decode::decode_frame(frame, &Default::default()) {
        Ok(sluice::decode::DecodedFrame::Message(m)) => m.seq.expect("a message frame has a seq"),
        other => panic!("not a message frame: {other:?}"),
    }
}

/// Returns once `sluice serve` on `port` delivers `last` (a capture's last frame) on its
/// raw wire, asking with the cursor just before it (raw cursors are exclusive). Until the
/// frame is in, that cursor is in sluice's future and the answer is a `FutureCursor`
/// error frame, so it asks again every 200 ms. Callers bound the wait.
pub async fn raw_wire_delivers(port: u16, last: &Bytes) {
    let last_upstream = upstream_seq(last);
    let url = format!(
        "ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos?cursor={}",
        last_upstream - 1
    );
    loop {
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await {
            if let Some(Ok(Message::Binary(frame))) = ws.next().await {
                if frame == *last {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
