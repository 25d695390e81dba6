//! Which tests of one binary may run side by side. Tests in one binary run on parallel
//! threads; a test that bounds a time or needs the whole machine (a slow consumer's
//! timing, fairness between clients, memory, keepalive deadlines, budget waits, takeovers)
//! takes the lock alone, every other test of that binary shares it, so grouping files into
//! one binary never runs a sensitive test beside a heavy sibling.

use std::sync::LazyLock;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static MACHINE: LazyLock<RwLock<()>> = LazyLock::new(|| RwLock::new(()));

/// For a test that must not share the machine with its siblings.
pub async fn alone() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// For every other test of a binary that has `alone` tests.
#[allow(dead_code)] // A binary of storms only has `alone` tests.
pub async fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}

/// [`shared`] for a test that is not async.
#[allow(dead_code)] // Not every binary has a test that is not async.
pub fn shared_blocking() -> RwLockReadGuard<'static, ()> {
    MACHINE.blocking_read()
}
