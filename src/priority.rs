//! Lowering a thread's scheduling priority, for work that may use only what the
//! delivering threads leave of the cores.
//!
//! Owns: the calls that set the calling thread's niceness or scheduling class. Must
//! never: import anything of the crate, or raise a priority (only a higher niceness, or
//! the idle class, is asked for).

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
pub fn this_thread_is_idle() -> std::io::Result<bool> {
    use thread_priority::unix::{
        thread_native_id, thread_schedule_policy_param, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    let (policy, _) = thread_schedule_policy_param(thread_native_id())
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    Ok(policy == ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle))
}

/// The calling thread's niceness (Linux), for checks and logs.
pub fn this_thread_nice() -> std::io::Result<i32> {
    let tid = rustix::thread::gettid();
    rustix::process::getpriority_process(Some(tid)).map_err(std::io::Error::from)
}
