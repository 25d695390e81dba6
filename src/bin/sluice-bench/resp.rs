//! A small RESP (Redis protocol) client for the benches' own Redis consumers and
//! subscribers: commands out, replies in (nested, or flattened to their strings).

use anyhow::bail;
use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpStream, ToSocketAddrs};

/// One reply.
pub(crate) enum Resp {
    Nil,
    Int(i64),
    Str(Bytes),
    Arr(Vec<Resp>),
}

/// A command as RESP bytes: an array of bulk strings.
pub(crate) fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply (nested arrays at most 8 deep, bulk strings at most 64 MiB).
pub(crate) async fn read_value<R: AsyncBufRead + Unpin + Send>(
    r: &mut R,
    depth: usize,
) -> anyhow::Result<Resp> {
    if depth > 8 {
        bail!("RESP nesting too deep");
    }
    let mut line = Vec::with_capacity(32);
    let n = r.read_until(b'\n', &mut line).await?;
    if n == 0 {
        bail!("redis closed the connection");
    }
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        bail!("malformed RESP line");
    }
    let text = std::str::from_utf8(&line[1..line.len() - 2])?;
    match line[0] {
        b'*' => {
            let count: i64 = text.parse()?;
            if count < 0 {
                return Ok(Resp::Nil);
            }
            let mut items = Vec::with_capacity(usize::try_from(count)?.min(4096));
            for _ in 0..count {
                items.push(Box::pin(read_value(r, depth + 1)).await?);
            }
            Ok(Resp::Arr(items))
        }
        b'$' => {
            let len: i64 = text.parse()?;
            if len < 0 {
                return Ok(Resp::Nil);
            }
            let len = usize::try_from(len)?;
            if len > 64 << 20 {
                bail!("RESP bulk string too large");
            }
            let mut buf = vec![0u8; len + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(len);
            Ok(Resp::Str(Bytes::from(buf)))
        }
        b':' => Ok(Resp::Int(text.parse()?)),
        b'+' => Ok(Resp::Str(Bytes::copy_from_slice(text.as_bytes()))),
        b'-' => bail!("redis error: {text}"),
        other => bail!("unexpected RESP type {other}"),
    }
}

/// Reads one reply as a list of strings, arrays flattened: bulk and simple strings as they
/// are, integers as their text, a nil as an empty string.
pub(crate) async fn read_flat<R: AsyncBufRead + Unpin + Send>(
    r: &mut R,
    out: &mut Vec<Bytes>,
) -> anyhow::Result<()> {
    fn flatten(value: Resp, out: &mut Vec<Bytes>) {
        match value {
            Resp::Nil => out.push(Bytes::new()),
            Resp::Int(n) => out.push(Bytes::from(n.to_string())),
            Resp::Str(b) => out.push(b),
            Resp::Arr(items) => items.into_iter().for_each(|item| flatten(item, out)),
        }
    }
    flatten(read_value(r, 0).await?, out);
    Ok(())
}

/// A connection for PUBLISHing, buffered (1 MiB) for pipelining: its replies (one integer
/// per PUBLISH, the number of receivers) are read and dropped on a task of their own.
pub(crate) async fn publishing_conn(
    addr: impl ToSocketAddrs,
) -> std::io::Result<BufWriter<OwnedWriteHalf>> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (mut r, w) = stream.into_split();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    Ok(BufWriter::with_capacity(1 << 20, w))
}
