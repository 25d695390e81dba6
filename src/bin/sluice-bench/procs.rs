//! /proc readings (CPU, RSS, machine load) and child processes killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use tokio::net::TcpStream;

/// The sluice under test: its binary and the user's extra `sluice serve` arguments.
#[derive(clap::Args, Clone)]
pub(crate) struct ServeArgs {
    /// The sluice binary to benchmark.
    #[arg(long, default_value = "target/release/sluice")]
    pub(crate) sluice: PathBuf,
    /// Extra argument for `sluice serve` (repeat for several), e.g.
    /// `--serve-arg=--tail-max-mib=64`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub(crate) serve_args: Vec<String>,
}

/// `sluice serve` from `upstream`, listening on 127.0.0.1:`port` with its log under
/// `data_dir`, logging warnings only and no periodic stats lines. Callers add their own
/// flags, then the user's `--serve-args` last.
pub(crate) fn serve_command(sluice: &Path, upstream: &str, port: u16, data_dir: &Path) -> Command {
    let mut cmd = Command::new(sluice);
    cmd.arg("serve")
        .args(["--upstream", upstream])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--log", "warn", "--stats-interval-secs", "0"]);
    cmd
}

/// `sluice serve` flags that take its connection limits (rate, burst, per IP, in all) out
/// of the way of a bench's thousands of subscribers.
pub(crate) const SERVE_NO_LIMITS: [&str; 8] = [
    "--connects-per-sec",
    "1000000",
    "--connect-burst",
    "1000000",
    "--max-per-ip",
    "10000000",
    "--max-subscribers",
    "10000000",
];

pub(crate) fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, seconds.
pub(crate) fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

pub(crate) fn proc_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (busy, total) jiffies of the whole machine.
/// The first (all-CPU) line of `/proc/stat`, in jiffies.
pub(crate) struct CpuLine {
    /// Everything but idle and iowait (steal included: the hypervisor gave that time to
    /// someone else).
    pub(crate) busy: u64,
    pub(crate) total: u64,
    /// Time the hypervisor ran something else while this VM had work (`steal`).
    pub(crate) steal: u64,
}

pub(crate) fn cpu_line() -> Option<CpuLine> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some(CpuLine {
        busy: total - idle,
        total,
        steal: v.get(7).copied().unwrap_or(0),
    })
}

/// `/metrics` of an admin listener, or an empty text.
pub(crate) async fn metrics(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(String::from_utf8_lossy(&raw).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The first sample of the family `name` in a `/metrics` text.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    metric_with(text, name, "")
}

/// The first sample of the family `name` whose line contains `label` (e.g.
/// `to="catchup"`; empty: any).
pub(crate) fn metric_with(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

pub(crate) static CHILD_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Bounds a whole run even if something hangs: after `bound`, every child is killed and the
/// bench exits with status 3.
pub(crate) fn start_watchdog(bound: std::time::Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(bound);
        eprintln!("sluice-bench: watchdog: run exceeded {bound:?}; killing children");
        for pid in CHILD_PIDS.lock().iter() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        std::process::exit(3);
    });
}

/// CPU seconds of every child in `children` so far (those whose `/proc` entry is readable).
pub(crate) fn cpu_secs_of(children: &[ChildGuard]) -> f64 {
    children.iter().filter_map(|c| proc_cpu_secs(c.pid())).sum()
}

/// Fails naming the first child in `children` that has exited.
pub(crate) fn check_all_alive(children: &mut [ChildGuard]) -> anyhow::Result<()> {
    children.iter_mut().try_for_each(ChildGuard::check_alive)
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub(crate) struct ChildGuard {
    pub(crate) child: Child,
    pub(crate) name: String,
    pub(crate) log: Option<PathBuf>,
}

impl ChildGuard {
    pub(crate) fn spawn(
        name: &str,
        cmd: &mut Command,
        log: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        if let Some(path) = &log {
            let f = std::fs::File::create(path)?;
            cmd.stderr(Stdio::from(f.try_clone()?))
                .stdout(Stdio::from(f));
        }
        cmd.stdin(Stdio::null());
        Self::start(name, cmd, log)
    }

    /// `cmd` with its stdin and stdout piped to this process and its stderr to `log`.
    pub(crate) fn spawn_piped(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let f = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(f));
        Self::start(name, cmd, Some(log))
    }

    fn start(name: &str, cmd: &mut Command, log: Option<PathBuf>) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        CHILD_PIDS.lock().push(child.id());
        Ok(ChildGuard {
            child,
            name: name.to_owned(),
            log,
        })
    }
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited early ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
    pub(crate) fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        CHILD_PIDS.lock().retain(|p| *p != pid);
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) async fn wait_tcp(port: u16, child: &mut ChildGuard, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        child.check_alive()?;
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} did not listen on {port} within {secs}s; log tail:\n{}",
        child.name,
        child.log_tail()
    )
}

pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// `base/sluice-bench-<name>-<pid>`, emptied if a previous run left it.
    pub(crate) fn fresh(base: &std::path::Path, name: &str) -> anyhow::Result<Self> {
        let dir = base.join(format!("sluice-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn rss_total(procs: &[ChildGuard]) -> u64 {
    procs.iter().filter_map(|p| proc_rss_kb(p.pid())).sum()
}

pub(crate) fn cpu_each(procs: &[ChildGuard]) -> Vec<f64> {
    procs
        .iter()
        .map(|p| proc_cpu_secs(p.pid()).unwrap_or(0.0))
        .collect()
}

pub(crate) fn self_cpu() -> f64 {
    proc_cpu_secs(std::process::id()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample is found by its family and label, never by a family whose name only
    /// begins with the one asked for, and comment lines are skipped.
    #[test]
    fn metrics_are_read_by_family_and_label() {
        let text = "# HELP sluice_direct_writes_total x\n\
                    # TYPE sluice_direct_writes_total counter\n\
                    sluice_direct_writes_total_other 9\n\
                    sluice_direct_writes_total{outcome=\"written\"} 12\n\
                    sluice_direct_writes_total{outcome=\"refused\"} 3\n\
                    sluice_active_replays 4\n";
        assert_eq!(
            metric_with(text, "sluice_direct_writes_total", "outcome=\"refused\""),
            Some(3.0)
        );
        assert_eq!(metric(text, "sluice_direct_writes_total"), Some(12.0));
        assert_eq!(metric(text, "sluice_active_replays"), Some(4.0));
        assert_eq!(metric(text, "sluice_active"), None);
        assert_eq!(
            metric_with(text, "sluice_direct_writes_total", "outcome=\"handed\""),
            None
        );
    }

    /// This machine's `/proc/stat` parses, steal within the total and busy.
    #[test]
    fn the_cpu_line_has_steal_within_busy_within_total() {
        let c = cpu_line().expect("/proc/stat");
        assert!(c.total > 0);
        assert!(c.busy <= c.total);
        assert!(c.steal <= c.busy);
    }
}
