//! Lowering a thread's scheduling priority, for work that may use only what the
//! delivering threads leave of the cores.
//!
//! Owns: the one call that sets the calling thread's niceness. Must never: import
//! anything of the crate, or raise a priority (only a higher niceness is asked for).

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

/// The calling thread's niceness (Linux), for checks and logs.
pub fn this_thread_nice() -> std::io::Result<i32> {
    let tid = rustix::thread::gettid();
    rustix::process::getpriority_process(Some(tid)).map_err(std::io::Error::from)
}
