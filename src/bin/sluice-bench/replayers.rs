//! `cold-replay`'s replayers, in processes of their own.
//!
//! The replayers stand for remote machines: in the bench's own process they shared a
//! runtime with the publisher and the live subscribers being timed, so the live latency
//! measured the bench as much as sluice. Each `sluice-bench cold-replay-read` child runs a
//! share of the replayers on one thread; the parent reads the children's CPU apart from
//! sluice's and from its own.
//!
//! On this one machine the children's reading competes for the cores with sluice and the
//! timed live subscribers, which remote replayers would not: `--replay-nice` runs them at
//! a lower priority, so what they take is what sluice's live path and the bench leave.
//! `--replay-idle` puts them in the SCHED_IDLE class instead, closer still to remote
//! machines: a live thread (sluice's or the bench's) that wakes takes the core from them
//! at once, rather than after their time slice.
//!
//! Protocol: the child writes `p <replayed> <caught up> <failed> <last caught unix ns>
//! <replayed bytes>` on stdout every 100 ms and once more when every replayer of it has ended; it exits when
//! its stdin closes (or the parent kills it).

use std::cell::RefCell;
use std::io::{BufRead, Write};
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::Parser;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::procs::{check_all_alive, cpu_secs_of, ChildGuard};
use crate::subscribers::{connect_sub, SubSpec};

#[derive(Parser, Clone)]
pub(crate) struct ReplayReadArgs {
    /// The v1 URL each replayer connects to (with its cursor).
    #[arg(long)]
    url: String,
    /// Source time (µs) of the last stored event: a later one is live, and ends the replay.
    #[arg(long)]
    last_stored_us: i64,
    /// Replayers in this process.
    #[arg(long)]
    replayers: usize,
    /// Niceness of this process (0-19).
    #[arg(long, default_value_t = 0)]
    nice: i32,
    /// Runs this process in the SCHED_IDLE class (`--nice` does not apply then).
    #[arg(long)]
    idle: bool,
}

pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The `time_us` of a v1 event (its fourth field or so: looked for near the start only).
pub(crate) fn time_us_of(text: &str) -> Option<i64> {
    const KEY: &[u8] = b"\"time_us\":";
    let head = &text.as_bytes()[..text.len().min(256)];
    let at = head.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = head[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&head[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// What the replayers of one child have done (one thread: no locks).
#[derive(Default, Clone, Copy)]
struct Tally {
    replayed: u64,
    /// The replayed events' v1 messages, summed (text bytes as received).
    replayed_bytes: u64,
    caught: u64,
    failed: u64,
    last_caught_ns: u64,
}

/// Reads `url` until the first event after `last_stored_us`, counting the events before it.
async fn replay(url: String, last_stored_us: i64, tally: Rc<RefCell<Tally>>) {
    let spec = SubSpec {
        url,
        v2: false,
        compressed: false,
        dictionary: None,
        filter: None,
        stalls: false,
    };
    let Ok(ws) = connect_sub(&spec).await else {
        tally.borrow_mut().failed += 1;
        return;
    };
    let (_sink, mut source) = ws.split();
    while let Some(msg) = source.next().await {
        let t = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            // A close, an error or a binary message: not a replay that can go on.
            _ => break,
        };
        let Some(time_us) = time_us_of(t.as_str()) else {
            continue;
        };
        let mut tally = tally.borrow_mut();
        if time_us > last_stored_us {
            tally.caught += 1;
            tally.last_caught_ns = unix_ns();
            return;
        }
        tally.replayed += 1;
        tally.replayed_bytes += t.len() as u64;
    }
    tally.borrow_mut().failed += 1;
}

/// `sluice-bench cold-replay-read`: the child. Runs until its stdin closes.
pub(crate) fn read_main(args: ReplayReadArgs) -> anyhow::Result<()> {
    // Before any other thread starts: they inherit it.
    let class = if args.idle {
        sluice::priority::Background::Idle
    } else {
        sluice::priority::Background::Nice(args.nice)
    };
    sluice::priority::lower_this_thread_to(class)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The end of stdin is the end of the run.
    std::thread::spawn(|| {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let tally = Rc::new(RefCell::new(Tally::default()));
        for _ in 0..args.replayers {
            tokio::task::spawn_local(replay(
                args.url.clone(),
                args.last_stored_us,
                Rc::clone(&tally),
            ));
        }
        let mut out = std::io::stdout().lock();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut ended = false;
        loop {
            tick.tick().await;
            let t = *tally.borrow();
            writeln!(
                out,
                "p {} {} {} {} {}",
                t.replayed, t.caught, t.failed, t.last_caught_ns, t.replayed_bytes
            )?;
            out.flush()?;
            if ended {
                // Reported once more after the end: wait for the parent to close stdin.
                std::future::pending::<()>().await;
            }
            ended = (t.caught + t.failed) as usize >= args.replayers;
        }
    })
}

/// What all the children reported last, summed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Progress {
    pub(crate) replayed: u64,
    /// The replayed events' v1 messages, summed.
    pub(crate) replayed_bytes: u64,
    pub(crate) caught: u64,
    pub(crate) failed: u64,
    /// When the last replayer caught up, on the bench's monotonic clock (ns), or 0.
    pub(crate) last_caught_ns: u64,
}

/// The parent's side: one replay window's children and their latest reports.
pub(crate) struct Replayers {
    children: Vec<ChildGuard>,
    latest: Vec<Arc<Mutex<Tally>>>,
    /// Wall clock (unix ns) minus the bench's monotonic clock.
    offset: i128,
}

impl Replayers {
    /// Starts `procs` children sharing `replayers` replayers of `url`.
    pub(crate) fn spawn(
        url: &str,
        last_stored_us: i64,
        replayers: usize,
        procs: usize,
        nice: i32,
        idle: bool,
        log_dir: &std::path::Path,
    ) -> anyhow::Result<Replayers> {
        let exe = std::env::current_exe()?;
        let procs = procs.clamp(1, replayers.max(1));
        let offset = i128::from(unix_ns()) - i128::from(crate::hist::now_ns());
        let mut out = Replayers {
            children: Vec::new(),
            latest: Vec::new(),
            offset,
        };
        for c in 0..procs {
            let share = replayers / procs + usize::from(c < replayers % procs);
            let mut cmd = Command::new(&exe);
            cmd.arg("cold-replay-read")
                .args(["--url", url])
                .args(["--last-stored-us", &last_stored_us.to_string()])
                .args(["--replayers", &share.to_string()])
                .args(["--nice", &nice.to_string()]);
            if idle {
                cmd.arg("--idle");
            }
            let mut guard = ChildGuard::spawn_piped(
                "cold-replay-read",
                &mut cmd,
                log_dir.join(format!("cold-replay-read-{c}.log")),
            )?;
            let Some(stdout) = guard.child.stdout.take() else {
                bail!("cold-replay-read has no stdout");
            };
            let latest = Arc::new(Mutex::new(Tally::default()));
            let mine = Arc::clone(&latest);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    let v: Vec<u64> = line
                        .split_ascii_whitespace()
                        .skip(1)
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    if let [replayed, caught, failed, last_caught_ns, replayed_bytes] = v[..] {
                        *mine.lock() = Tally {
                            replayed,
                            replayed_bytes,
                            caught,
                            failed,
                            last_caught_ns,
                        };
                    }
                }
            });
            out.children.push(guard);
            out.latest.push(latest);
        }
        Ok(out)
    }

    /// The children's last reports, summed.
    pub(crate) fn progress(&self) -> Progress {
        let mut p = Progress::default();
        let mut last_unix = 0u64;
        for t in &self.latest {
            let t = *t.lock();
            p.replayed += t.replayed;
            p.replayed_bytes += t.replayed_bytes;
            p.caught += t.caught;
            p.failed += t.failed;
            last_unix = last_unix.max(t.last_caught_ns);
        }
        if last_unix > 0 {
            p.last_caught_ns = u64::try_from(i128::from(last_unix) - self.offset).unwrap_or(0);
        }
        p
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
    use super::time_us_of;

    #[test]
    fn time_us_is_read_from_a_v1_event() {
        let e = r#"{"did":"did:plc:abc","time_us":1725911162329308,"kind":"commit","commit":{}}"#;
        assert_eq!(time_us_of(e), Some(1_725_911_162_329_308));
        assert_eq!(time_us_of(r#"{"did":"x","kind":"commit"}"#), None);
    }
}
