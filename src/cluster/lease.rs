//! Named leases: "at most one node of the cluster does X at a time", for work other than
//! ingest (the Redis sink is the first user).
//!
//! Owns: taking, renewing, releasing and losing one named lease (`sluice:{cluster}:lease:
//! <name>`, with its own fencing epoch counter `sluice:{cluster}:epoch:<name>`) through the
//! cluster's function library, and telling its user, through a watch channel, whether and
//! under which epoch this node holds it. Must never: say the lease is held after this
//! node's own clock says it may have expired (it says so a fifth of the TTL early, as the
//! ingest lease does), or wait on Redis without a deadline.
//!
//! A lease decides who works; it is not, on its own, what keeps the work correct: a node
//! frozen past its lease can still finish a write it started. Users that must never write
//! twice check their own position in the same step as the write (the sink does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use super::link::{Keys, Link, NamedAcquire};
use super::{ClusterConfig, ClusterError};

/// A running holder of one named lease.
pub struct NamedLease {
    held: watch::Receiver<Option<u64>>,
    /// Times this node took the lease.
    pub takeovers: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl NamedLease {
    /// Starts trying to take the lease `name` of `config`'s cluster, as `config.node_id`,
    /// with the cluster's TTL and standby poll. Redis being away is not an error: the
    /// lease is simply not held until it answers.
    pub fn start(config: &ClusterConfig, name: &str) -> Result<Self, ClusterError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ClusterError::Config(format!(
                "lease name {name:?} must be letters, digits or '-'"
            )));
        }
        let link = Link::new(&config.redis_url, config.redis_timeout)?;
        let (held_tx, held) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let takeovers = Arc::new(AtomicU64::new(0));
        let keys = Keys::new(&config.name);
        let keeper = Keeper {
            name: name.to_string(),
            lease_key: keys.named_lease(name),
            epoch_key: keys.named_epoch(name),
            node: config.node_id.clone(),
            ttl: config.lease_ttl,
            poll: config.standby_poll,
            link,
            held: held_tx,
            takeovers: takeovers.clone(),
            stop: stop_rx,
        };
        let task = tokio::spawn(keeper.run());
        Ok(Self {
            held,
            takeovers,
            stop,
            task,
        })
    }

    /// `Some(epoch)` while this node holds the lease.
    pub fn subscribe(&self) -> watch::Receiver<Option<u64>> {
        self.held.clone()
    }

    /// Stops renewing and releases the lease if held, so another node takes it at once.
    /// Stop the lease's user first: after this, another node may be working.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "lease task failed");
        }
    }
}

/// Stop trusting the lease this long before it can have expired (as the ingest lease).
fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(100))
}

struct Keeper {
    name: String,
    lease_key: String,
    epoch_key: String,
    node: String,
    ttl: Duration,
    poll: Duration,
    link: Link,
    held: watch::Sender<Option<u64>>,
    takeovers: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
}

impl Keeper {
    async fn run(mut self) {
        // (epoch, the instant after which the lease may have expired, less the margin)
        let mut holding: Option<(u64, Instant)> = None;
        let mut max_epoch = 0u64;
        let mut stop = self.stop.clone();
        loop {
            let wait = match holding {
                Some(_) => self.ttl / 3,
                None => {
                    let base = self.poll.as_millis().max(2) as u64;
                    Duration::from_millis(rand::thread_rng().gen_range(base / 2..=base + base / 2))
                }
            };
            let valid_until = holding.map(|(_, until)| until);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
                _ = sleep_until(valid_until) => {}
            }
            if *self.stop.borrow() {
                break;
            }
            if let Some((epoch, until)) = holding {
                if Instant::now() >= until {
                    self.lose(&mut holding, epoch, "not renewed before it may expire");
                    continue;
                }
                let sent = Instant::now();
                // The renewal may take no longer than the lease is still ours.
                let within = until.saturating_duration_since(sent);
                match tokio::time::timeout(
                    within,
                    self.link
                        .renew_named(&self.lease_key, &self.node, epoch, self.ttl),
                )
                .await
                {
                    Ok(Ok(())) => {
                        holding = Some((epoch, sent + self.ttl - safety_margin(self.ttl)));
                    }
                    Ok(Err(ClusterError::Unavailable(e))) => {
                        tracing::debug!(lease = %self.name, error = %e, "lease renewal failed; retrying while it is still ours");
                    }
                    Ok(Err(e)) => {
                        self.reload_if_missing(&e).await;
                        self.lose(&mut holding, epoch, &e.to_string());
                    }
                    Err(_) => self.lose(&mut holding, epoch, "renewal did not answer in time"),
                }
                continue;
            }
            let sent = Instant::now();
            match self
                .link
                .acquire_named(
                    &self.lease_key,
                    &self.epoch_key,
                    &self.node,
                    self.ttl,
                    max_epoch,
                )
                .await
            {
                Ok(NamedAcquire::Granted { epoch }) => {
                    max_epoch = max_epoch.max(epoch);
                    let until = sent + self.ttl - safety_margin(self.ttl);
                    if Instant::now() < until {
                        holding = Some((epoch, until));
                        self.takeovers.fetch_add(1, Ordering::Relaxed);
                        self.held.send_replace(Some(epoch));
                        tracing::info!(lease = %self.name, epoch, "took the lease: this node does the work");
                    }
                }
                Ok(NamedAcquire::Held { .. }) => {}
                Err(e) => {
                    self.reload_if_missing(&e).await;
                    tracing::debug!(lease = %self.name, error = %e, "lease not taken");
                }
            }
        }
        if let Some((epoch, _)) = holding {
            self.held.send_replace(None);
            match self
                .link
                .release_named(&self.lease_key, &self.node, epoch)
                .await
            {
                Ok(true) => {
                    tracing::info!(lease = %self.name, epoch, "released the lease for another node to take at once")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "could not release the lease; another node takes it when it expires")
                }
            }
        }
    }

    fn lose(&self, holding: &mut Option<(u64, Instant)>, epoch: u64, why: &str) {
        *holding = None;
        self.held.send_replace(None);
        tracing::warn!(lease = %self.name, epoch, why, "lost the lease: this node stops the work");
    }

    /// Redis lost the function library (its data, or a new server): load it again.
    async fn reload_if_missing(&mut self, e: &ClusterError) {
        if e.is_missing_function() {
            if let Err(e) = self.link.load_functions().await {
                tracing::warn!(lease = %self.name, error = %e, "cannot reload the cluster functions");
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
