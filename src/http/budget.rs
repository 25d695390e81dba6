//! One server-wide budget for memory that subscribers make the daemon hold: the bytes of
//! a message they have started and not finished, and their filter sets.
//!
//! Owns the total and per-IP accounting of that memory and each connection's charge.
//! Must never: let a connection hold client memory it was not charged for, let one IP
//! take more than its share, or block (a charge that does not fit is refused at once and
//! the caller closes with 1013).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Limits on client-held memory.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Across all subscribers, bytes.
    pub total_bytes: usize,
    /// Per client IP, bytes.
    pub per_ip_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            total_bytes: 256 * 1024 * 1024,
            per_ip_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Why a charge did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    Total,
    PerIp,
}

impl Spent {
    pub fn reason(self) -> &'static str {
        match self {
            Spent::Total => "total",
            Spent::PerIp => "per_ip",
        }
    }
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spent::Total => f.write_str("the server's memory budget for clients is spent"),
            Spent::PerIp => f.write_str("this address's share of client memory is spent"),
        }
    }
}

impl std::error::Error for Spent {}

#[derive(Default)]
struct Usage {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The server-wide budget.
pub struct ClientMemory {
    /// The limits; SIGHUP may change them ([`ClientMemory::set_config`]).
    config: parking_lot::RwLock<MemoryConfig>,
    usage: Mutex<Usage>,
    refused_total: AtomicU64,
    refused_per_ip: AtomicU64,
}

impl ClientMemory {
    pub fn new(config: MemoryConfig) -> Self {
        Self {
            config: parking_lot::RwLock::new(config),
            usage: Mutex::new(Usage::default()),
            refused_total: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> MemoryConfig {
        self.config.read().clone()
    }

    /// New limits (SIGHUP). What connections hold already is kept even above a lower
    /// limit: only their next charge that would grow past it is refused.
    pub fn set_config(&self, config: MemoryConfig) {
        *self.config.write() = config;
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.usage.lock().total
    }

    pub fn refused(&self, why: Spent) -> u64 {
        match why {
            Spent::Total => self.refused_total.load(Ordering::Relaxed),
            Spent::PerIp => self.refused_per_ip.load(Ordering::Relaxed),
        }
    }

    /// A connection from `ip`, holding nothing yet.
    pub fn connection(self: &Arc<Self>, ip: IpAddr) -> Arc<ConnMemory> {
        Arc::new(ConnMemory {
            memory: self.clone(),
            ip,
            inner: Mutex::new(Held::default()),
        })
    }

    /// Moves `ip`'s charge from `from` to `to` bytes; growing fails if it does not fit.
    fn resize(&self, ip: IpAddr, from: usize, to: usize) -> Result<(), Spent> {
        let mut usage = self.usage.lock();
        if to > from {
            let grow = to - from;
            let mine = usage.per_ip.get(&ip).copied().unwrap_or(0);
            let (total_bytes, per_ip_bytes) = {
                let config = self.config.read();
                (config.total_bytes, config.per_ip_bytes)
            };
            if mine + grow > per_ip_bytes {
                self.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                return Err(Spent::PerIp);
            }
            if usage.total + grow > total_bytes {
                self.refused_total.fetch_add(1, Ordering::Relaxed);
                return Err(Spent::Total);
            }
        }
        usage.total = usage.total + to - from;
        let mine = usage.per_ip.entry(ip).or_default();
        *mine = *mine + to - from;
        if *mine == 0 {
            usage.per_ip.remove(&ip);
        }
        Ok(())
    }
}

#[derive(Default)]
struct Held {
    /// Bytes read from the websocket and not yet handed over as a whole message.
    reading: usize,
    /// The estimated size of the subscriber's filter.
    filter: usize,
    /// When the bytes in `reading` started (a message under way).
    partial_since: Option<tokio::time::Instant>,
    /// Charging starts at the upgrade: the request head before it is bounded elsewhere.
    armed: bool,
}

/// One connection's charge; given back when it is dropped (with the socket).
pub struct ConnMemory {
    memory: Arc<ClientMemory>,
    ip: IpAddr,
    inner: Mutex<Held>,
}

impl ConnMemory {
    /// Starts charging reads (at the upgrade).
    pub fn arm(&self) {
        self.inner.lock().armed = true;
    }

    /// `n` more bytes were read from the socket.
    pub fn on_read(&self, n: usize) -> Result<(), Spent> {
        let mut held = self.inner.lock();
        if !held.armed || n == 0 {
            return Ok(());
        }
        let before = held.reading + held.filter;
        self.memory.resize(self.ip, before, before + n)?;
        held.reading += n;
        held.partial_since
            .get_or_insert_with(tokio::time::Instant::now);
        Ok(())
    }

    /// A data message was handed over whole: what was read is no longer held. (Bytes of
    /// the next message read in the same call, at most one read buffer, are forgotten.)
    pub fn message_done(&self) {
        self.consumed(usize::MAX);
    }

    /// A control frame of `bytes` on the wire was handed over; a message it interrupted
    /// is still held.
    pub fn control_done(&self, bytes: usize) {
        self.consumed(bytes);
    }

    fn consumed(&self, bytes: usize) {
        let mut held = self.inner.lock();
        let before = held.reading + held.filter;
        held.reading = held.reading.saturating_sub(bytes);
        if held.reading == 0 {
            held.partial_since = None;
        }
        // Shrinking always fits.
        let _ = self
            .memory
            .resize(self.ip, before, held.reading + held.filter);
    }

    /// Charges a filter of `bytes` in place of the previous one.
    pub fn set_filter(&self, bytes: usize) -> Result<(), Spent> {
        let mut held = self.inner.lock();
        let before = held.reading + held.filter;
        self.memory.resize(self.ip, before, held.reading + bytes)?;
        held.filter = bytes;
        Ok(())
    }

    /// When the message under way (if any) started.
    pub fn partial_since(&self) -> Option<tokio::time::Instant> {
        self.inner.lock().partial_since
    }

    pub fn held(&self) -> usize {
        let held = self.inner.lock();
        held.reading + held.filter
    }
}

impl Drop for ConnMemory {
    fn drop(&mut self) {
        let held = self.inner.get_mut();
        let _ = self.memory.resize(self.ip, held.reading + held.filter, 0);
    }
}

/// The error a socket read returns when the bytes read do not fit the budget; the session
/// finds it with [`spent_in`].
pub fn read_refused(why: Spent) -> std::io::Error {
    std::io::Error::other(why)
}

/// The budget refusal inside an I/O error, if that is what it is.
pub fn spent_in(error: &std::io::Error) -> Option<Spent> {
    error.get_ref()?.downcast_ref::<Spent>().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn charges_fit_the_total_and_the_per_ip_share_and_come_back() {
        let memory = Arc::new(ClientMemory::new(MemoryConfig {
            total_bytes: 1000,
            per_ip_bytes: 600,
        }));
        let a = memory.connection(ip(2));
        let a2 = memory.connection(ip(2));
        let b = memory.connection(ip(3));
        // Not armed: the request head is not charged here.
        assert!(a.on_read(10_000).is_ok());
        assert_eq!(memory.used(), 0);
        for c in [&a, &a2, &b] {
            c.arm();
        }
        assert!(a.on_read(400).is_ok());
        assert_eq!(a2.on_read(201), Err(Spent::PerIp));
        assert!(a2.set_filter(200).is_ok());
        assert!(b.on_read(400).is_ok());
        assert_eq!(b.on_read(1), Err(Spent::Total));
        assert_eq!(memory.used(), 1000);
        assert_eq!(
            (memory.refused(Spent::PerIp), memory.refused(Spent::Total)),
            (1, 1)
        );
        // A control frame leaves the message under way charged; its end frees it.
        assert!(a.partial_since().is_some());
        a.control_done(6);
        assert_eq!(a.held(), 394);
        a.message_done();
        assert_eq!((a.held(), a.partial_since()), (0, None));
        drop(a2);
        assert_eq!(memory.used(), 400);
        drop(b);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn new_limits_apply_to_the_next_charge_and_keep_what_is_held() {
        let memory = Arc::new(ClientMemory::new(MemoryConfig {
            total_bytes: 1000,
            per_ip_bytes: 1000,
        }));
        let a = memory.connection(ip(2));
        a.arm();
        assert!(a.on_read(600).is_ok());
        memory.set_config(MemoryConfig {
            total_bytes: 2000,
            per_ip_bytes: 500,
        });
        assert_eq!(a.held(), 600, "what is held stays");
        assert_eq!(a.on_read(1), Err(Spent::PerIp));
        assert!(memory.connection(ip(3)).set_filter(500).is_ok());
        a.message_done();
        assert!(
            a.set_filter(500).is_ok(),
            "room again once it was given back"
        );
        assert_eq!(memory.config().per_ip_bytes, 500);
    }

    #[test]
    fn a_refusal_travels_inside_an_io_error() {
        let error = read_refused(Spent::PerIp);
        assert_eq!(spent_in(&error), Some(Spent::PerIp));
        assert_eq!(spent_in(&std::io::Error::other("x")), None);
    }
}
