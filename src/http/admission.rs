//! Admission control for subscriber connections.
//!
//! Owns the limits checked before a websocket upgrade: total subscribers, new connections
//! per second (a token bucket, with a share per IP) and connections per IP; and the rate
//! of `/event` requests per IP. Must never admit past a limit, and never refuse without a
//! jittered `Retry-After`, so a reconnect storm spreads itself out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::rate::SharedBudget;

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub max_subscribers: usize,
    /// Sustained new connections per second; bursts up to `connect_burst`.
    pub connects_per_sec: f64,
    pub connect_burst: f64,
    pub max_per_ip: usize,
    /// Base of the `Retry-After` hint, seconds; up to as much again is added as jitter.
    pub retry_after_secs: u64,
    /// One IP's share of `connects_per_sec` (burst five times as many): one address
    /// churning connections cannot take the others' attempts.
    pub connects_per_sec_per_ip: f64,
    /// `/event/{seq}` requests per second per IP (burst as many).
    pub event_requests_per_sec_per_ip: f64,
    /// `/event/{seq}` requests per second from everyone together (burst as many): a
    /// lookup below the hot tail decodes a stored segment (up to ~1 ms of CPU), so many
    /// addresses each within their share must not add up to the daemon's cores.
    pub event_requests_per_sec: f64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_subscribers: 10_000,
            connects_per_sec: 500.0,
            connect_burst: 2_000.0,
            max_per_ip: 2_500,
            retry_after_secs: 5,
            connects_per_sec_per_ip: 100.0,
            event_requests_per_sec_per_ip: 50.0,
            event_requests_per_sec: 200.0,
        }
    }
}

/// Why a connection was refused: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub retry_after_secs: u64,
}

/// How much burst a per-IP connect share gets, in seconds of its rate.
const PER_IP_CONNECT_BURST_SECS: f64 = 5.0;

/// One IP's connect burst: five seconds of its rate, but never more than the server's
/// burst: a larger one would let one address keep the shared bucket empty for longer
/// than it takes to drain it once.
fn per_ip_connect_burst(config: &AdmissionConfig) -> f64 {
    (config.connects_per_sec_per_ip * PER_IP_CONNECT_BURST_SECS)
        .min(config.connect_burst)
        .max(1.0)
}

struct State {
    /// New connections, at `connects_per_sec` with a burst of `connect_burst`, and each
    /// IP's share.
    connects: SharedBudget<IpAddr>,
    /// `/event` requests per IP (no total: the cold-read pool bounds their work).
    events: SharedBudget<IpAddr>,
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// Shared admission state.
#[derive(Clone)]
pub struct Admission {
    config: Arc<Mutex<AdmissionConfig>>,
    state: Arc<Mutex<State>>,
}

/// Held for the life of an admitted connection; releases its slot on drop.
pub struct Permit {
    state: Arc<Mutex<State>>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.state.lock();
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                state.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        let connects = SharedBudget::new(
            config.connects_per_sec,
            config.connect_burst,
            config.connects_per_sec_per_ip,
            per_ip_connect_burst(&config),
        );
        let events = SharedBudget::new(
            config.event_requests_per_sec,
            config.event_requests_per_sec,
            config.event_requests_per_sec_per_ip,
            config.event_requests_per_sec_per_ip,
        );
        Self {
            config: Arc::new(Mutex::new(config)),
            state: Arc::new(Mutex::new(State {
                connects,
                events,
                per_ip: HashMap::new(),
                total: 0,
            })),
        }
    }

    /// Replaces the limits (SIGHUP); admitted connections are kept.
    pub fn reconfigure(&self, config: AdmissionConfig) {
        *self.config.lock() = config;
    }

    /// The limits in force.
    pub fn config(&self) -> AdmissionConfig {
        self.config.lock().clone()
    }

    pub fn admitted(&self) -> usize {
        self.state.lock().total
    }

    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let config = self.config.lock().clone();
        let retry = crate::rate::retry_after(config.retry_after_secs);
        let mut state = self.state.lock();
        // Read per call: SIGHUP may have changed them.
        state.connects.set_limits(
            config.connects_per_sec,
            config.connect_burst,
            config.connects_per_sec_per_ip,
            per_ip_connect_burst(&config),
        );
        if state.total >= config.max_subscribers {
            return Err(Refusal {
                status: 503,
                reason: "subscriber limit reached",
                retry_after_secs: retry,
            });
        }
        if state.per_ip.get(&ip).copied().unwrap_or(0) >= config.max_per_ip {
            return Err(Refusal {
                status: 429,
                reason: "too many connections from this address",
                retry_after_secs: retry,
            });
        }
        if state
            .connects
            .take_within(Some(ip), 1.0, std::time::Duration::ZERO)
            .is_err()
        {
            return Err(Refusal {
                status: 429,
                reason: "too many new connections; retry later",
                retry_after_secs: retry,
            });
        }
        state.total += 1;
        *state.per_ip.entry(ip).or_default() += 1;
        Ok(Permit {
            state: self.state.clone(),
            ip,
        })
    }
}

impl Admission {
    /// Takes one `/event` request of `ip`'s rate and of the total, or refuses it with 429.
    pub fn admit_event_request(&self, ip: IpAddr) -> Result<(), Refusal> {
        let config = self.config.lock().clone();
        let mut state = self.state.lock();
        let (total, per_ip) = (
            config.event_requests_per_sec,
            config.event_requests_per_sec_per_ip,
        );
        state.events.set_limits(total, total, per_ip, per_ip);
        state
            .events
            .take_within(Some(ip), 1.0, std::time::Duration::ZERO)
            .map(|_| ())
            .map_err(|refused| Refusal {
                status: 429,
                reason: "too many /event requests (from this address, or from everyone)",
                retry_after_secs: refused.would_wait.as_secs() + 1,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_per_ip_and_rate() {
        let admission = Admission::new(AdmissionConfig {
            max_subscribers: 3,
            connects_per_sec: 0.0001,
            connect_burst: 10.0,
            max_per_ip: 2,
            retry_after_secs: 2,
            ..AdmissionConfig::default()
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = admission.admit(a).unwrap();
        let _p2 = admission.admit(a).unwrap();
        let refused = admission.admit(a).err().unwrap();
        assert_eq!(refused.status, 429);
        assert!((2..=4).contains(&refused.retry_after_secs));
        let _p3 = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).err().unwrap().status, 503);
        drop(p1);
        assert!(admission.admit(b).is_ok());
    }

    #[test]
    fn token_bucket_refuses_a_burst() {
        let admission = Admission::new(AdmissionConfig {
            connects_per_sec: 0.0001,
            connect_burst: 3.0,
            ..AdmissionConfig::default()
        });
        // From three addresses: the server's burst is shared by all.
        let ips: Vec<IpAddr> = (1..=4).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let permits: Vec<_> = ips[..3]
            .iter()
            .map(|&ip| admission.admit(ip).unwrap())
            .collect();
        drop(permits);
        assert_eq!(admission.admit(ips[3]).err().unwrap().status, 429);
    }

    #[test]
    fn one_address_churning_does_not_take_the_others_connects() {
        // A share of 1/s: a burst of 5, then one a second.
        let admission = Admission::new(AdmissionConfig {
            connects_per_sec: 0.0001,
            connect_burst: 100.0,
            connects_per_sec_per_ip: 1.0,
            ..AdmissionConfig::default()
        });
        let churner: IpAddr = "127.0.0.2".parse().unwrap();
        let other: IpAddr = "127.0.0.3".parse().unwrap();
        let mut admitted = 0;
        for _ in 0..50 {
            if let Ok(permit) = admission.admit(churner) {
                admitted += 1;
                drop(permit);
            }
        }
        assert!((1..=5).contains(&admitted), "{admitted}");
        assert!(
            admission.admit(other).is_ok(),
            "the other address keeps its share"
        );
    }

    #[test]
    fn event_requests_are_limited_in_total_across_addresses() {
        let admission = Admission::new(AdmissionConfig {
            event_requests_per_sec_per_ip: 3.0,
            event_requests_per_sec: 4.0,
            ..AdmissionConfig::default()
        });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let c: IpAddr = "127.0.0.4".parse().unwrap();
        assert!((0..3).all(|_| admission.admit_event_request(a).is_ok()));
        assert!(admission.admit_event_request(b).is_ok());
        // Each address is within its own share, but the total (4) is spent.
        let refused = admission.admit_event_request(c).err();
        assert!(refused.is_some_and(|r| r.status == 429 && r.retry_after_secs >= 1));
    }

    #[test]
    fn event_requests_are_limited_per_address() {
        let admission = Admission::new(AdmissionConfig {
            event_requests_per_sec_per_ip: 3.0,
            ..AdmissionConfig::default()
        });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        assert!((0..3).all(|_| admission.admit_event_request(a).is_ok()));
        let refused = admission.admit_event_request(a).err();
        assert!(refused.is_some_and(|r| r.status == 429 && r.retry_after_secs >= 1));
        assert!(admission.admit_event_request(b).is_ok());
    }
}
