//! Cheap Redis consumers for `redis-consumers`, in processes of their own.
//!
//! With 100 consumers reading in the bench's own process (beside the publisher and the
//! websocket subscribers), the bench could not read what it was sent and measured itself,
//! not the targets. Here each `sluice-bench redis-read` child runs a share of the
//! consumers on one thread with a RESP reader that allocates nothing per entry: it walks
//! each reply once, counts every delivery and stamps one in `--sample` (the consumer
//! reads `did` and `rev` out of that event's JSON only). The parent turns the stamps into
//! latencies against its send stamps and reads the children's CPU apart from the targets'.
//!
//! Protocol on the child's stdin/stdout, one line each:
//! - stdout `s <commit key> <unix ns>`: a sampled delivery, read at that instant;
//! - stdin `snap` → stdout `snap <reconnects> <connected> <total of consumer 0> ...`;
//! - stdin closed: the child exits.
//!
//! Clocks: the child stamps with the wall clock (`CLOCK_REALTIME`, shared by processes);
//! the parent maps it onto its monotonic clock with an offset taken once at the start.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::control::{Control, PH_COUNT};
use crate::frame_meta::{commit_key, json_str};
use crate::hist::{now_ns, Hist};
use crate::procs::{check_all_alive, cpu_secs_of, ChildGuard};
use crate::resp::resp_command;
use crate::stamps::Stamps;

/// How consumers read: `XREAD BLOCK` from their last ids, or `SUBSCRIBE`.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Via {
    Streams,
    PubSub,
}

#[derive(Parser, Clone)]
pub(crate) struct ReadArgs {
    /// redis-server port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    #[arg(long, value_enum)]
    via: Via,
    /// The keys (streams or channels) of each consumer: one `--keys a,b,c` per consumer.
    #[arg(long = "keys", value_delimiter = ';')]
    keys: Vec<String>,
    /// One delivery in this many is stamped.
    #[arg(long, default_value_t = 8)]
    sample: u64,
    /// Niceness of this process (0 = as started).
    #[arg(long, default_value_t = 0)]
    nice: i32,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One token of a RESP reply: an array's length (`-1` for a nil array), a string's
/// place in the buffer, or something this reader does not look at (integers, nil strings).
#[derive(Clone, Copy)]
enum Tok {
    Arr(i64),
    Str(usize, usize),
    Other,
}

/// Walks one RESP value at `*pos` in `buf`, pushing its tokens. `Ok(false)` if the value
/// is not complete yet (read more and walk again from the same start).
fn walk(buf: &[u8], pos: &mut usize, toks: &mut Vec<Tok>, depth: usize) -> anyhow::Result<bool> {
    if depth > 8 {
        bail!("RESP nesting too deep");
    }
    let Some(nl) = buf[*pos..].iter().position(|&b| b == b'\n') else {
        return Ok(false);
    };
    let line = &buf[*pos..*pos + nl + 1];
    if line.len() < 3 || line[line.len() - 2] != b'\r' {
        bail!("malformed RESP line");
    }
    let text = std::str::from_utf8(&line[1..line.len() - 2])?;
    let after = *pos + nl + 1;
    match line[0] {
        b'*' => {
            let n: i64 = text.parse()?;
            toks.push(Tok::Arr(n));
            *pos = after;
            for _ in 0..n.max(0) {
                if !walk(buf, pos, toks, depth + 1)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        b'$' => {
            let n: i64 = text.parse()?;
            if n < 0 {
                toks.push(Tok::Other);
                *pos = after;
                return Ok(true);
            }
            let n = usize::try_from(n)?;
            if buf.len() < after + n + 2 {
                return Ok(false);
            }
            toks.push(Tok::Str(after, after + n));
            *pos = after + n + 2;
            Ok(true)
        }
        b'+' => {
            toks.push(Tok::Str(*pos + 1, *pos + nl - 1));
            *pos = after;
            Ok(true)
        }
        b':' => {
            toks.push(Tok::Other);
            *pos = after;
            Ok(true)
        }
        b'-' => bail!("redis error: {text}"),
        other => bail!("unexpected RESP type {other}"),
    }
}

/// What every consumer of one child shares (one thread: no locks).
pub(crate) struct Shared {
    /// Deliveries so far, per consumer.
    pub(crate) totals: Vec<u64>,
    pub(crate) reconnects: u64,
    pub(crate) connected: Vec<bool>,
    /// Sampled deliveries not yet reported: (match key, unix ns read).
    pub(crate) samples: Vec<(u64, u64)>,
}

struct Reader {
    i: usize,
    keys: Vec<String>,
    sample: u64,
    shared: Rc<RefCell<Shared>>,
    seen: u64,
}

impl Reader {
    fn delivered(&mut self, json: &[u8], at: u64) {
        self.seen += 1;
        let mut s = self.shared.borrow_mut();
        s.totals[self.i] += 1;
        if self.seen % self.sample != 0 || s.samples.len() >= 1 << 20 {
            return;
        }
        let Ok(text) = std::str::from_utf8(json) else {
            return;
        };
        if let (Some(did), Some(rev)) = (json_str(text, "did"), json_str(text, "rev")) {
            s.samples.push((commit_key(did, rev), at));
        }
    }
}

/// Reads one complete reply (with `more`: as many complete replies as the buffer holds,
/// at least one) and leaves their tokens in `toks`; returns where they end in `buf` (the
/// caller drains `..end` once it has looked at them).
async fn next_replies(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
    toks: &mut Vec<Tok>,
    more: bool,
) -> anyhow::Result<usize> {
    loop {
        toks.clear();
        let (mut pos, mut end) = (0, 0);
        loop {
            let mark = toks.len();
            if !walk(buf, &mut pos, toks, 0)? {
                toks.truncate(mark);
                break;
            }
            end = pos;
            if !more || pos == buf.len() {
                break;
            }
        }
        if end > 0 {
            return Ok(end);
        }
        buf.reserve(1 << 16);
        if r.read_buf(buf).await? == 0 {
            bail!("redis closed the connection");
        }
    }
}

async fn read_streams(
    rd: &mut Reader,
    stream: TcpStream,
    ids: &mut [Vec<u8>],
) -> anyhow::Result<()> {
    let (mut r, mut w) = stream.into_split();
    let index: HashMap<Vec<u8>, usize> = rd
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_bytes().to_vec(), i))
        .collect();
    let mut buf = Vec::with_capacity(1 << 20);
    let mut toks = Vec::with_capacity(1 << 14);
    loop {
        let mut args: Vec<&[u8]> = vec![b"XREAD", b"COUNT", b"1000", b"BLOCK", b"500", b"STREAMS"];
        args.extend(rd.keys.iter().map(|k| k.as_bytes()));
        args.extend(ids.iter().map(|id| id.as_slice()));
        w.write_all(&resp_command(&args)).await?;
        let end = next_replies(&mut r, &mut buf, &mut toks, false).await?;
        let at = unix_ns();
        // [streams: [key, [entries: [id, [field, value, ...]]]]] or a nil array.
        let mut t = toks.iter().copied();
        let streams = match t.next() {
            Some(Tok::Arr(n)) => n.max(0),
            _ => bail!("unexpected XREAD reply"),
        };
        for _ in 0..streams {
            let (Some(Tok::Arr(2)), Some(Tok::Str(a, b)), Some(Tok::Arr(entries))) =
                (t.next(), t.next(), t.next())
            else {
                bail!("unexpected XREAD stream");
            };
            let Some(&k) = index.get(&buf[a..b]) else {
                bail!("XREAD answered for a key not asked");
            };
            for _ in 0..entries {
                let (Some(Tok::Arr(2)), Some(Tok::Str(ia, ib)), Some(Tok::Arr(fields))) =
                    (t.next(), t.next(), t.next())
                else {
                    bail!("unexpected stream entry");
                };
                ids[k].clear();
                ids[k].extend_from_slice(&buf[ia..ib]);
                let mut event = None;
                for f in 0..fields.max(0) / 2 {
                    let (Some(Tok::Str(fa, fb)), Some(v)) = (t.next(), t.next()) else {
                        bail!("unexpected stream field");
                    };
                    if f == 0 && &buf[fa..fb] == b"event" {
                        event = Some(v);
                    }
                }
                if let Some(Tok::Str(va, vb)) = event {
                    rd.delivered(&buf[va..vb], at);
                }
            }
        }
        buf.drain(..end);
    }
}

async fn read_channels(rd: &mut Reader, stream: TcpStream) -> anyhow::Result<()> {
    let (mut r, mut w) = stream.into_split();
    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    args.extend(rd.keys.iter().map(|k| k.as_bytes()));
    w.write_all(&resp_command(&args)).await?;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut toks = Vec::with_capacity(1 << 14);
    loop {
        let end = next_replies(&mut r, &mut buf, &mut toks, true).await?;
        let at = unix_ns();
        // Each reply: [kind, channel, payload] (subscribe confirmations have a count).
        for reply in toks.chunks(4) {
            match reply {
                [Tok::Arr(3), Tok::Str(a, b), _, Tok::Str(pa, pb)]
                    if &buf[*a..*b] == b"message" =>
                {
                    rd.delivered(&buf[*pa..*pb], at);
                }
                [Tok::Arr(3), ..] => {}
                _ => bail!("unexpected pub/sub reply"),
            }
        }
        buf.drain(..end);
    }
}

async fn consume(mut rd: Reader, port: u16, via: Via) {
    let mut ids: Vec<Vec<u8>> = vec![b"0-0".to_vec(); rd.keys.len()];
    let mut first = true;
    loop {
        if !first {
            rd.shared.borrow_mut().reconnects += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        first = false;
        let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        rd.shared.borrow_mut().connected[rd.i] = true;
        let _ = match via {
            Via::Streams => read_streams(&mut rd, stream, &mut ids).await,
            Via::PubSub => read_channels(&mut rd, stream).await,
        };
        rd.shared.borrow_mut().connected[rd.i] = false;
    }
}

/// `sluice-bench redis-read`: the child. Runs until its stdin closes.
pub(crate) fn read_main(args: ReadArgs) -> anyhow::Result<()> {
    // Before any thread is made, so that every one inherits it.
    sluice::priority::lower_this_thread(args.nice)?;
    let n = args.keys.len();
    child_main(n, move |shared| {
        for (i, keys) in args.keys.iter().enumerate() {
            let rd = Reader {
                i,
                keys: keys.split(',').map(str::to_owned).collect(),
                sample: args.sample.max(1),
                shared: Rc::clone(&shared),
                seen: 0,
            };
            tokio::task::spawn_local(consume(rd, args.port, args.via));
        }
    })
}

/// A reader child's main: a one-thread runtime where `start` spawns the `n` readers
/// (local tasks sharing what they count), then the protocol above on stdin and stdout
/// until stdin closes. Shared by every bench whose readers run in processes of their own.
pub(crate) fn child_main(n: usize, start: impl FnOnce(Rc<RefCell<Shared>>)) -> anyhow::Result<()> {
    // Stdin on a thread of its own: each line is a request, its end the end of the run.
    let (tx, mut requests) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shared = Rc::new(RefCell::new(Shared {
            totals: vec![0; n],
            reconnects: 0,
            connected: vec![false; n],
            samples: Vec::new(),
        }));
        start(Rc::clone(&shared));
        let mut out = std::io::stdout().lock();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                line = requests.recv() => {
                    let Some(line) = line else { return Ok(()) };
                    if line.trim() == "snap" {
                        let s = shared.borrow();
                        write!(
                            out,
                            "snap {} {}",
                            s.reconnects,
                            s.connected.iter().filter(|c| **c).count()
                        )?;
                        for t in &s.totals {
                            write!(out, " {t}")?;
                        }
                        writeln!(out)?;
                        out.flush()?;
                    }
                }
                _ = tick.tick() => {
                    let samples = std::mem::take(&mut shared.borrow_mut().samples);
                    if !samples.is_empty() {
                        for (key, at) in samples {
                            writeln!(out, "s {key} {at}")?;
                        }
                        out.flush()?;
                    }
                }
            }
        }
    })
}

/// The parent's side: the children, and the latencies of their samples per phase.
pub(crate) struct Readers {
    children: Vec<ChildGuard>,
    stdins: Vec<std::process::ChildStdin>,
    snaps: Vec<tokio::sync::mpsc::Receiver<Vec<u64>>>,
    /// Consumers per child, in order.
    sizes: Vec<usize>,
    pub(crate) hist: Arc<Mutex<[Hist; PH_COUNT]>>,
    /// Sampled deliveries with no send stamp (identity/account events are not sampled).
    pub(crate) unmatched: Arc<AtomicU64>,
}

/// What the children reported at one instant.
pub(crate) struct Snapshot {
    pub(crate) reconnects: u64,
    pub(crate) connected: u64,
    /// Deliveries so far, per consumer.
    pub(crate) totals: Vec<u64>,
}

/// Where the children's processes write their logs, and how many there are.
pub(crate) struct ReadersAt<'a> {
    pub(crate) procs: usize,
    pub(crate) sample: u64,
    pub(crate) log_dir: &'a std::path::Path,
    /// Niceness of the children (0 = the bench's).
    pub(crate) nice: i32,
}

impl Readers {
    /// Starts `at.procs` children sharing `consumers` (the keys of each), all reading
    /// redis-server on `port`.
    pub(crate) fn spawn(
        port: u16,
        via: Via,
        consumers: &[Vec<String>],
        at: ReadersAt<'_>,
        ctl: Arc<Control>,
        stamps: Arc<Stamps>,
    ) -> anyhow::Result<Readers> {
        let exe = std::env::current_exe()?;
        let procs = at.procs.clamp(1, consumers.len().max(1));
        let per = consumers.len().div_ceil(procs).max(1);
        let commands = consumers
            .chunks(per)
            .map(|share| {
                let mut cmd = Command::new(&exe);
                cmd.arg("redis-read")
                    .args(["--port", &port.to_string()])
                    .args([
                        "--via",
                        if via == Via::Streams {
                            "streams"
                        } else {
                            "pub-sub"
                        },
                    ])
                    .args(["--sample", &at.sample.to_string()])
                    .args(["--nice", &at.nice.to_string()]);
                for keys in share {
                    cmd.arg(format!("--keys={}", keys.join(",")));
                }
                (cmd, share.len())
            })
            .collect();
        Readers::start("redis-read", commands, at.log_dir, ctl, stamps)
    }

    /// Starts one reader child per command (with the number of readers it runs), each
    /// speaking the protocol above ([`child_main`]); its stderr goes to `log_dir`.
    pub(crate) fn start(
        name: &str,
        commands: Vec<(Command, usize)>,
        log_dir: &std::path::Path,
        ctl: Arc<Control>,
        stamps: Arc<Stamps>,
    ) -> anyhow::Result<Readers> {
        // Wall clock → the bench's monotonic clock.
        let offset = i128::from(unix_ns()) - i128::from(now_ns());
        let hist = Arc::new(Mutex::new(std::array::from_fn(|_| Hist::new())));
        let unmatched = Arc::new(AtomicU64::new(0));
        let mut readers = Readers {
            children: Vec::new(),
            stdins: Vec::new(),
            snaps: Vec::new(),
            sizes: Vec::new(),
            hist: Arc::clone(&hist),
            unmatched: Arc::clone(&unmatched),
        };
        for (c, (mut cmd, size)) in commands.into_iter().enumerate() {
            let mut guard =
                ChildGuard::spawn_piped(name, &mut cmd, log_dir.join(format!("{name}-{c}.log")))?;
            let (Some(stdin), Some(stdout)) = (guard.child.stdin.take(), guard.child.stdout.take())
            else {
                bail!("{name} has no pipes");
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let (ctl, stamps, hist, unmatched) = (
                Arc::clone(&ctl),
                Arc::clone(&stamps),
                Arc::clone(&hist),
                Arc::clone(&unmatched),
            );
            // The child's reports, read on a thread until it ends.
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    let mut parts = line.split_ascii_whitespace();
                    match parts.next() {
                        Some("s") => {
                            let (Some(Ok(key)), Some(Ok(at))) = (
                                parts.next().map(str::parse::<u64>),
                                parts.next().map(str::parse::<i128>),
                            ) else {
                                continue;
                            };
                            let read = u64::try_from(at - offset).unwrap_or(0);
                            let phase =
                                (ctl.phase.load(Ordering::Relaxed) as usize).min(PH_COUNT - 1);
                            match stamps.get(key) {
                                Some(sent) => {
                                    hist.lock()[phase].record(read.saturating_sub(sent) / 1000)
                                }
                                None => {
                                    unmatched.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Some("snap") => {
                            let v: Vec<u64> = parts.filter_map(|p| p.parse().ok()).collect();
                            if tx.blocking_send(v).is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            });
            readers.children.push(guard);
            readers.stdins.push(stdin);
            readers.snaps.push(rx);
            readers.sizes.push(size);
        }
        Ok(readers)
    }

    /// Every child's counts, now.
    pub(crate) async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        for s in &mut self.stdins {
            s.write_all(b"snap\n")?;
            s.flush()?;
        }
        let mut snap = Snapshot {
            reconnects: 0,
            connected: 0,
            totals: Vec::new(),
        };
        for (rx, size) in self.snaps.iter_mut().zip(&self.sizes) {
            let v = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("a reader child did not answer within 10 s")?
                .context("a reader child ended")?;
            if v.len() != size + 2 {
                bail!(
                    "a reader child answered {} numbers for {size} consumers",
                    v.len()
                );
            }
            snap.reconnects += v[0];
            snap.connected += v[1];
            snap.totals.extend_from_slice(&v[2..]);
        }
        Ok(snap)
    }

    /// CPU seconds of all the children so far.
    pub(crate) fn cpu_secs(&self) -> f64 {
        cpu_secs_of(&self.children)
    }

    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        check_all_alive(&mut self.children)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(buf: &[u8], toks: &[Tok]) -> Vec<String> {
        toks.iter()
            .map(|t| match *t {
                Tok::Arr(n) => format!("*{n}"),
                Tok::Str(a, b) => String::from_utf8_lossy(&buf[a..b]).into_owned(),
                Tok::Other => "?".into(),
            })
            .collect()
    }

    #[test]
    fn walks_an_xread_reply_and_waits_for_the_rest_of_a_cut_one() {
        let reply =
            b"*1\r\n*2\r\n$3\r\nk:a\r\n*1\r\n*2\r\n$4\r\n12-0\r\n*2\r\n$5\r\nevent\r\n$2\r\n{}\r\n";
        let mut toks = Vec::new();
        let mut pos = 0;
        assert!(walk(reply, &mut pos, &mut toks, 0).unwrap());
        assert_eq!(pos, reply.len());
        assert_eq!(
            strs(reply, &toks),
            ["*1", "*2", "k:a", "*1", "*2", "12-0", "*2", "event", "{}"]
        );
        for cut in 1..reply.len() {
            let (mut toks, mut pos) = (Vec::new(), 0);
            assert!(
                !walk(&reply[..cut], &mut pos, &mut toks, 0).unwrap(),
                "a reply cut at {cut} is not complete"
            );
        }
    }

    #[test]
    fn walks_pub_sub_messages_nil_arrays_and_refuses_errors() {
        let two = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n";
        let (mut toks, mut pos) = (Vec::new(), 0);
        assert!(walk(two, &mut pos, &mut toks, 0).unwrap());
        assert!(walk(two, &mut pos, &mut toks, 0).unwrap());
        assert_eq!(pos, two.len());
        assert_eq!(
            strs(two, &toks),
            ["*3", "subscribe", "c", "?", "*3", "message", "c", "hi"]
        );
        let (mut toks, mut pos) = (Vec::new(), 0);
        assert!(walk(b"*-1\r\n", &mut pos, &mut toks, 0).unwrap());
        assert_eq!(strs(b"", &toks), ["*-1"]);
        let (mut toks, mut pos) = (Vec::new(), 0);
        assert!(walk(b"-ERR no\r\n", &mut pos, &mut toks, 0).is_err());
    }
}
