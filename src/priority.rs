//! Lowering a thread's scheduling priority, for work that may use only what the
//! delivering threads leave of the cores.
//!
//! Owns: the calls that set the calling thread's niceness or scheduling class, and the
//! starvation bound of idle-class threads ([`IdleWatch`]). Must never: import anything of
//! the crate, or raise a priority above what was asked for (only a higher niceness, or
//! the idle class, is asked for; the starvation bound raises an idle thread to nice 19
//! while it is starved, and back).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the threads of a background pool give way to the delivering threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// A higher niceness (0-19; 0 = the daemon's): a share of the cores weighted against
    /// the normal threads' (nice 19 weighs 15 against nice 0's 1024). A woken normal
    /// thread may wait for a running niced one to end its time slice.
    Nice(i32),
    /// Linux's `SCHED_IDLE` class: runs only on what the normal threads leave of a core,
    /// and a woken normal thread takes the core from it at once.
    Idle,
}

/// Moves the calling thread to `class` (never up): [`lower_this_thread`] for a niceness,
/// the idle scheduling class otherwise.
pub fn lower_this_thread_to(class: Background) -> std::io::Result<()> {
    match class {
        Background::Nice(nice) => lower_this_thread(nice),
        Background::Idle => idle_this_thread(),
    }
}

/// [`lower_this_thread_to`] for a background thread that works at any priority: a
/// failure is logged (naming `thread`), and the thread goes on at the one it has.
pub fn lower_this_thread_or_log(class: Background, thread: &str) {
    if let Err(e) = lower_this_thread_to(class) {
        tracing::warn!(error = %e, ?class, thread, "cannot lower a thread's priority");
    }
}

/// Sets the calling thread's niceness to `nice` (at most 19; Linux: `setpriority` on a
/// thread id applies to that thread only), unless it is already at least that nice (a
/// daemon started niced stays so). 0 leaves it as it is.
pub fn lower_this_thread(nice: i32) -> std::io::Result<()> {
    let nice = nice.min(19);
    if nice <= 0 || this_thread_nice()? >= nice {
        return Ok(());
    }
    let tid = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(tid), nice).map_err(std::io::Error::from)
}

/// Puts the calling thread in the `SCHED_IDLE` class (Linux; any user may, it only
/// lowers). Its niceness is kept (the class ignores it).
fn idle_this_thread() -> std::io::Result<()> {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    if this_thread_is_idle()? {
        return Ok(());
    }
    let nice = this_thread_nice()?;
    let set = set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    // The crate sets the class, then the niceness to the class's only priority, 0: that
    // fails for a niced thread without privileges (the class is set all the same) and
    // raises one with them. What counts is the class; the niceness is put back.
    if !this_thread_is_idle()? {
        return Err(std::io::Error::other(format!(
            "cannot enter SCHED_IDLE: {:?}",
            set.err()
        )));
    }
    lower_this_thread(nice)
}

/// Whether the calling thread is in the `SCHED_IDLE` class (Linux), for checks and logs.
/// Asks the kernel (`/proc/thread-self/stat`): glibc's `pthread_getschedparam` answers
/// from what the thread itself last set, and misses a change made by [`IdleWatch`].
pub fn this_thread_is_idle() -> std::io::Result<bool> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    let parsed = ThreadStat::parse(&stat)
        .ok_or_else(|| std::io::Error::other(format!("unexpected thread stat: {stat}")))?;
    Ok(parsed.idle())
}

/// The calling thread's niceness (Linux), for checks and logs.
pub fn this_thread_nice() -> std::io::Result<i32> {
    let tid = rustix::thread::gettid();
    rustix::process::getpriority_process(Some(tid)).map_err(std::io::Error::from)
}

/// The niceness an idle-class thread runs at while [`IdleWatch`] has raised it.
pub const RAISED_NICE: i32 = 19;

/// A starvation bound for the idle-class threads of this process with given names (the
/// catch-up pool's and the log's read-ahead): when work has been handed to them and none
/// of it finished for a whole `bound` while one of them was ready to run (so the cores
/// were busy with other work, rather than the threads waiting on a peer or the disk),
/// every such thread is moved to the normal class at nice [`RAISED_NICE`] until some work
/// finishes, then back to the idle class. Catch-up then waits at most about two bounds for a core however
/// busy the machine is, and takes nice 19's share meanwhile.
///
/// The raise needs `RLIMIT_NICE` of at least 1 (or `CAP_SYS_NICE`): a refused one is
/// counted and logged once, and the threads stay idle. Ends with the last clone.
#[derive(Clone)]
pub struct IdleWatch {
    shared: Arc<WatchShared>,
    /// Ends the watch's thread when the last clone is dropped.
    _running: Arc<Running>,
}

/// What [`IdleWatch`] has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Times the idle threads were raised because work made no progress for a bound.
    pub raises: AtomicU64,
    /// Raises the kernel refused (no `RLIMIT_NICE` for nice 19, no `CAP_SYS_NICE`).
    pub refused: AtomicU64,
    /// Whether the idle threads are raised now.
    pub raised: AtomicBool,
}

struct WatchShared {
    /// Work finished so far ([`IdleWatch::finished`]).
    progress: AtomicU64,
    /// Work handed over and not finished.
    pending: AtomicUsize,
    stats: WatchStats,
    stop: parking_lot::Mutex<bool>,
    wake: parking_lot::Condvar,
}

/// Tells the watch's thread to end when dropped.
struct Running(Arc<WatchShared>);

impl Drop for Running {
    fn drop(&mut self) {
        *self.0.stop.lock() = true;
        self.0.wake.notify_all();
    }
}

impl IdleWatch {
    /// Starts the watch's thread (normal priority; it wakes once per `bound`) over the
    /// idle-class threads whose names start with one of `names`.
    pub fn start(bound: Duration, names: &'static [&'static str]) -> std::io::Result<Self> {
        let shared = Arc::new(WatchShared {
            progress: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            stats: WatchStats::default(),
            stop: parking_lot::Mutex::new(false),
            wake: parking_lot::Condvar::new(),
        });
        let watched = shared.clone();
        let bound = bound.max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("sluice-idle-watch".into())
            .spawn(move || watch(&watched, bound, names))?;
        Ok(Self {
            _running: Arc::new(Running(shared.clone())),
            shared,
        })
    }

    /// Work was handed to the idle threads.
    pub fn handed(&self) {
        self.shared.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Work handed over has finished (or was dropped).
    pub fn finished(&self) {
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        self.shared.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// What the watch has done.
    pub fn stats(&self) -> &WatchStats {
        &self.shared.stats
    }
}

/// The watch's thread: looks once per `bound` until the watch is dropped.
fn watch(shared: &WatchShared, bound: Duration, names: &[&str]) {
    let mut seen = 0;
    let mut warned = false;
    // The threads it raised (to lower them again).
    let mut raised: Vec<i32> = Vec::new();
    loop {
        {
            let mut stop = shared.stop.lock();
            if !*stop {
                shared.wake.wait_for(&mut stop, bound);
            }
            if *stop {
                break;
            }
        }
        let progress = shared.progress.load(Ordering::Relaxed);
        let moved = progress != seen;
        seen = progress;
        let stats = &shared.stats;
        if !raised.is_empty() && moved {
            // Some work finished: back to the idle class (if still starved, the next
            // bound without progress raises them again).
            for tid in raised.drain(..) {
                let _ = set_class(tid, Class::Idle);
            }
            stats.raised.store(false, Ordering::Relaxed);
            continue;
        }
        if moved || shared.pending.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let idle = idle_threads(names);
        let starved = idle.iter().any(|t| t.ready);
        if raised.is_empty() && !starved {
            continue;
        }
        // Starved (or raised and still without progress: threads started since the raise
        // are raised too).
        if raised.is_empty() {
            stats.raises.fetch_add(1, Ordering::Relaxed);
        }
        for thread in idle {
            let up = lower_thread(thread.tid, RAISED_NICE)
                .and_then(|()| set_class(thread.tid, Class::Normal));
            match up {
                Ok(()) => raised.push(thread.tid),
                Err(e) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        warned = true;
                        tracing::warn!(
                            error = %e,
                            "idle-class threads starved, and raising them to nice 19 was \
                             refused (it needs RLIMIT_NICE of 1 or more, e.g. LimitNICE=1 \
                             under systemd, or CAP_SYS_NICE)"
                        );
                    }
                }
            }
        }
        stats.raised.store(!raised.is_empty(), Ordering::Relaxed);
    }
    for tid in raised {
        let _ = set_class(tid, Class::Idle);
    }
}

/// A thread of this process in the idle class.
struct IdleThread {
    tid: i32,
    /// Running or ready to run (state `R`).
    ready: bool,
}

/// The threads of this process in the `SCHED_IDLE` class now whose names start with one
/// of `names` (a thread's name is cut at 15 bytes), from `/proc/self/task/<tid>/stat`; a
/// thread that ends meanwhile is left out.
fn idle_threads(names: &[&str]) -> Vec<IdleThread> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some(thread) = ThreadStat::parse(&stat) else {
            continue;
        };
        if thread.idle()
            && names
                .iter()
                .any(|n| thread.name.starts_with(n.get(..15).unwrap_or(n)))
        {
            out.push(IdleThread {
                tid,
                ready: thread.state == "R",
            });
        }
    }
    out
}

/// What the watch reads of a thread's `/proc/.../stat`.
struct ThreadStat<'a> {
    name: &'a str,
    /// `R` running or ready to run, `S` sleeping, ...
    state: &'a str,
    /// The scheduling policy's number (`SCHED_IDLE` = 5).
    policy: &'a str,
}

impl<'a> ThreadStat<'a> {
    /// `tid (name) state ...`: the name may hold spaces and parentheses; after it the
    /// state is the first field and the policy the 39th (proc(5): fields 3 and 41).
    fn parse(stat: &'a str) -> Option<Self> {
        let (start, end) = (stat.find('(')?, stat.rfind(')')?);
        let mut fields = stat.get(end + 1..)?.split_whitespace();
        let state = fields.next()?;
        let policy = fields.nth(37)?;
        Some(Self {
            name: stat.get(start + 1..end)?,
            state,
            policy,
        })
    }

    fn idle(&self) -> bool {
        self.policy == "5"
    }
}

/// Sets thread `tid`'s niceness to `nice` if it is lower (any thread of the process).
fn lower_thread(tid: i32, nice: i32) -> std::io::Result<()> {
    let pid = rustix::process::Pid::from_raw(tid)
        .ok_or_else(|| std::io::Error::other(format!("no thread {tid}")))?;
    if rustix::process::getpriority_process(Some(pid))? >= nice {
        return Ok(());
    }
    rustix::process::setpriority_process(Some(pid), nice).map_err(std::io::Error::from)
}

/// The scheduling classes the watch moves threads between.
#[derive(Clone, Copy)]
enum Class {
    Normal,
    Idle,
}

/// Moves thread `tid` to `class`, keeping its niceness.
fn set_class(tid: i32, class: Class) -> std::io::Result<()> {
    let policy = match class {
        Class::Normal => libc::SCHED_OTHER,
        Class::Idle => libc::SCHED_IDLE,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` only reads the `sched_param` it is given, a valid local
    // that outlives the call, and acts on a thread id; no memory is kept or written.
    // Needed because neither rustix nor thread-priority sets the class of another thread
    // (thread-priority's call sets the niceness of the calling thread), and only another
    // thread can raise a starved one (docs/DECISIONS.md, "Session 13").
    let done = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A busy loop at normal priority on every core until `until` or `stop`.
    fn saturate(until: Instant, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect()
    }

    /// Whether this process may move an idle-class thread to nice 19 in the normal class
    /// (root, `CAP_SYS_NICE` or `RLIMIT_NICE` >= 1): tried on a thread of its own, with the
    /// same calls the watch makes.
    fn raising_is_permitted() -> bool {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let probe = std::thread::spawn(move || {
            let entered =
                idle_this_thread().map(|()| rustix::thread::gettid().as_raw_nonzero().get());
            let _ = tid_tx.send(entered);
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        });
        let tid = tid_rx.recv().unwrap().unwrap();
        let permitted = lower_thread(tid, RAISED_NICE)
            .and_then(|()| set_class(tid, Class::Normal))
            .is_ok();
        let _ = done_tx.send(());
        probe.join().unwrap();
        permitted
    }

    /// With the privilege, a starved idle thread is raised to nice 19 (no higher) and put
    /// back when its work finishes; without it, the refusal is counted and the thread stays
    /// in the idle class (the daemon goes on; the unit files grant `LimitNICE=1`).
    #[test]
    fn a_starved_idle_thread_is_raised_to_nice_19_until_its_work_finishes() {
        let permitted = raising_is_permitted();
        let watch = IdleWatch::start(Duration::from_millis(50), &["test-starved"]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // The cores busy at normal priority for at most 10 s (the bound catches a hang).
        let busy = saturate(Instant::now() + Duration::from_secs(10), &stop);
        watch.handed();
        let give_up = Arc::new(AtomicBool::new(false));
        let worker = {
            let give_up = give_up.clone();
            std::thread::Builder::new()
                .name("test-starved".into())
                .spawn(move || {
                    idle_this_thread().unwrap();
                    // Work until the thread finds itself out of the idle class (raised), at
                    // most 10 s or until told to stop: then report whether it was raised and
                    // at what niceness.
                    let until = Instant::now() + Duration::from_secs(10);
                    while this_thread_is_idle().unwrap()
                        && Instant::now() < until
                        && !give_up.load(Ordering::Relaxed)
                    {
                        std::hint::spin_loop();
                    }
                    (this_thread_is_idle().unwrap(), this_thread_nice().unwrap())
                })
                .unwrap()
        };
        if !permitted {
            // Not permitted: the watch tries, is refused, counts it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while watch.stats().refused.load(Ordering::Relaxed) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the refused raise was never counted"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            give_up.store(true, Ordering::Relaxed);
        }
        let (idle, nice) = worker.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        for b in busy {
            b.join().unwrap();
        }
        if !permitted {
            assert!(idle, "a refused raise leaves the thread in the idle class");
            assert!(watch.stats().raises.load(Ordering::Relaxed) >= 1);
            return;
        }
        assert!(!idle, "the starved thread was raised out of the idle class");
        assert_eq!(nice, RAISED_NICE, "to nice 19, no higher");
        assert!(watch.stats().raises.load(Ordering::Relaxed) >= 1);
        assert!(watch.stats().raised.load(Ordering::Relaxed));
        // Its work finished: the watch stands down at its next look.
        watch.finished();
        let deadline = Instant::now() + Duration::from_secs(10);
        while watch.stats().raised.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "the watch never stood down");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(watch.stats().refused.load(Ordering::Relaxed), 0);
    }

    /// A thread's count of voluntary context switches (it went to sleep), from
    /// `/proc/self/task/<tid>/status`.
    fn voluntary_switches(tid: i32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn an_idle_thread_waiting_on_something_else_than_a_core_is_never_raised() {
        let watch = IdleWatch::start(Duration::from_millis(20), &["test-sleeping"]).unwrap();
        let (entered, is_in) = std::sync::mpsc::channel::<()>();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::Builder::new()
            .name("test-sleeping".into())
            .spawn(move || {
                idle_this_thread().unwrap();
                entered.send(()).unwrap();
                let _ = wait.recv_timeout(Duration::from_secs(10));
                this_thread_is_idle().unwrap()
            })
            .unwrap();
        is_in.recv().unwrap();
        // Work handed over once the thread sleeps (waits on a peer, not on a core). The
        // kernel is asked, not a clock: an idle-class thread on cores busy with another
        // test's loops can stay ready to run for long between its send and its wait.
        // Asleep in its long wait, not in a short one on the way to it (a lock): asleep at
        // two looks 20 ms apart without a voluntary switch between them.
        let asleep = || {
            let seen = idle_threads(&["test-sleeping"]);
            match seen.as_slice() {
                [t] if !t.ready => voluntary_switches(t.tid),
                _ => None,
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(before) = asleep() {
                std::thread::sleep(Duration::from_millis(20));
                if asleep() == Some(before) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the thread never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Ten bounds without progress.
        watch.handed();
        std::thread::sleep(Duration::from_millis(200));
        // The work ends before the thread wakes: once woken it is ready to run, and on
        // cores busy with other work (another test's busy loops) rightly raised.
        watch.finished();
        done.send(()).unwrap();
        assert!(sleeper.join().unwrap(), "a sleeping thread stays idle");
        assert_eq!(watch.stats().raises.load(Ordering::Relaxed), 0);
    }
}
