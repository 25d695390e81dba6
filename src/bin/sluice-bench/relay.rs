//! The Redis pub/sub rebroadcaster baseline, run as its own process (`redis-relay`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::resp::read_flat;

/// The pub/sub channel the publisher PUBLISHes to and Redis subscribers SUBSCRIBE to.
pub(crate) const REDIS_CHANNEL: &str = "sluice-bench";

#[derive(Parser, Clone)]
pub(crate) struct RedisRelayArgs {
    /// Redis server, host:port.
    #[arg(long)]
    pub(crate) redis: SocketAddr,
    /// Channel to subscribe to.
    #[arg(long, default_value = "sluice-bench")]
    pub(crate) channel: String,
    /// Websocket listen address.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Messages a client may lag behind before it skips ahead.
    #[arg(long, default_value_t = 16384)]
    pub(crate) capacity: usize,
}

pub(crate) async fn redis_relay(args: RedisRelayArgs) -> anyhow::Result<()> {
    let stream = TcpStream::connect(args.redis).await?;
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(1 << 20, r);
    let cmd = format!(
        "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{}\r\n",
        args.channel.len(),
        args.channel
    );
    w.write_all(cmd.as_bytes()).await?;
    let mut parts = Vec::new();
    read_flat(&mut r, &mut parts).await?;
    if parts.first().map(|b| b.as_ref()) != Some(b"subscribe".as_slice()) {
        bail!("unexpected SUBSCRIBE reply");
    }
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(args.capacity.max(16));
    let listener = TcpListener::bind(args.listen).await?;
    let tx2 = tx.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut rx = tx2.subscribe();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut sink, mut source) = ws.split();
                tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
                loop {
                    let first = match rx.recv().await {
                        Ok(b) => b,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    };
                    if sink.feed(Message::Binary(first)).await.is_err() {
                        return;
                    }
                    // Batch whatever else is ready, then flush once.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(b) => {
                                if sink.feed(Message::Binary(b)).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        parts.clear();
        read_flat(&mut r, &mut parts).await?;
        if parts.len() == 3 && parts[0].as_ref() == b"message" {
            let payload = parts.pop().unwrap_or_default();
            let _ = tx.send(payload);
        }
    }
}
