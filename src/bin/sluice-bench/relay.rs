//! The Redis pub/sub rebroadcaster baseline, run as its own process (`redis-relay`).

use std::io::Write as _;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::RedisRelayArgs;

/// The pub/sub channel the publisher PUBLISHes to and Redis subscribers SUBSCRIBE to.
pub(crate) const REDIS_CHANNEL: &str = "sluice-bench";

/// Reads one RESP value as a list of bulk strings (arrays flattened); integers and simple
/// strings are returned as their text.
pub(crate) async fn read_resp<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<Bytes>,
    depth: usize,
) -> anyhow::Result<()> {
    if depth > 4 {
        bail!("RESP nesting too deep");
    }
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line).await?;
    if n == 0 {
        bail!("redis closed the connection");
    }
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        bail!("malformed RESP line");
    }
    let kind = line[0];
    let text = std::str::from_utf8(&line[1..line.len() - 2])?;
    match kind {
        b'*' => {
            let count: i64 = text.parse()?;
            for _ in 0..count.max(0) {
                Box::pin(read_resp(r, out, depth + 1)).await?;
            }
        }
        b'$' => {
            let len: i64 = text.parse()?;
            if len < 0 {
                out.push(Bytes::new());
                return Ok(());
            }
            let len = usize::try_from(len)?;
            if len > 64 << 20 {
                bail!("RESP bulk string too large");
            }
            let mut buf = vec![0u8; len + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(len);
            out.push(Bytes::from(buf));
        }
        b':' | b'+' => out.push(Bytes::copy_from_slice(text.as_bytes())),
        b'-' => bail!("redis error: {text}"),
        _ => bail!("unexpected RESP type {kind}"),
    }
    Ok(())
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
    read_resp(&mut r, &mut parts, 0).await?;
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
        read_resp(&mut r, &mut parts, 0).await?;
        if parts.len() == 3 && parts[0].as_ref() == b"message" {
            let payload = parts.pop().unwrap_or_default();
            let _ = tx.send(payload);
        }
    }
}
