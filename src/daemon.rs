//! Assembly of the running daemon: upstream client → ingest thread → event sink.
//!
//! Owns the wiring between stages and their lifecycles. Must never hold events itself:
//! the ingest thread hands each batch to the sink and keeps only its stamp state.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::event::Event;
use crate::http::listen::{Connections, Side};
use crate::ingest::{start_ingest, EventSink, IngestHandle, IngestStats};
use crate::upstream::client::UpstreamShared;
use crate::wire::zstd::Zstd;

/// The log is the production sink: events are stored with their resume state.
impl EventSink for std::sync::Arc<crate::log::Log> {
    fn append(&mut self, events: Vec<Event>) -> anyhow::Result<()> {
        crate::log::Log::append(self, events).map_err(|e| anyhow::anyhow!("event log: {e}"))
    }
}

/// Fewest descriptors that must be left for client connections after `--fd-reserve`.
const MIN_CLIENT_FDS: u64 = 64;

/// The whole daemon: log, fan-out hub, subscriber endpoints and ingest.
pub struct Daemon {
    /// Where the subscriber endpoints listen (useful when the configured port was 0).
    pub addr: std::net::SocketAddr,
    pub log: Arc<crate::log::Log>,
    pub hub: crate::fanout::Hub,
    pub app: Arc<crate::http::app::AppState>,
    /// Where the admin endpoints listen.
    pub admin_addr: std::net::SocketAddr,
    pub admin: Arc<crate::http::admin::AdminState>,
    /// Single node: the ingest run. In a cluster the node starts and stops ingest itself.
    ingest: Option<IngestHandle>,
    node: Option<crate::cluster::Node>,
    upstream: Arc<UpstreamShared>,
    sink: Option<crate::sink::SinkHandle>,
    sink_lease: Option<crate::cluster::NamedLease>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    admin_server: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown_timeout: Duration,
}

impl Daemon {
    /// Opens the log, starts the hub, binds the listener and starts ingest.
    pub async fn start(config: crate::config::ServeConfig) -> anyhow::Result<Daemon> {
        let log_config = config.log.clone();
        let (log, state) = tokio::task::spawn_blocking(move || crate::log::Log::open(log_config))
            .await?
            .map_err(|e| anyhow::anyhow!("cannot open the event log: {e}"))?;
        let log = Arc::new(log);
        let (zstd_v1, zstd_v2) = load_dictionaries(&config)?;
        let hub = crate::fanout::Hub::start(log.reader(), config.hub.clone())
            .map_err(|e| anyhow::anyhow!("cannot start the catch-up threads: {e}"))?;
        let connections = Arc::new(Connections::new(
            crate::http::listen::raise_open_file_limit(),
            config.fd_reserve,
            Arc::new(crate::http::budget::ClientMemory::new(
                config.client_memory.clone(),
            )),
        ));
        match connections.nofile() {
            Some(nofile) if nofile < config.fd_reserve + MIN_CLIENT_FDS => anyhow::bail!(
                "the open-file limit ({nofile}) leaves fewer than {MIN_CLIENT_FDS} descriptors \
                 for clients after --fd-reserve ({}): raise LimitNOFILE (ulimit -n) or lower \
                 --fd-reserve",
                config.fd_reserve
            ),
            Some(nofile) => tracing::info!(
                nofile,
                fd_reserve = config.fd_reserve,
                "open-file limit; subscriber connections stop short of it by the reserve"
            ),
            None => tracing::warn!("open-file limit unknown: no descriptor budget for clients"),
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let app = Arc::new(crate::http::app::AppState {
            hub: hub.clone(),
            admission: crate::http::admission::Admission::new(config.admission.clone()),
            session: config.session.clone(),
            session_limits: parking_lot::Mutex::new(crate::http::app::SessionLimits::of(
                &config.session,
            )),
            filter_limits: config.filter_limits,
            slow_policy: config.slow_policy,
            shutdown: shutdown_rx.clone(),
            stats: crate::http::app::HttpStats::default(),
            zstd_v1,
            zstd_v1_training: std::sync::atomic::AtomicBool::new(false),
            zstd_v2,
            zstd_cache_bytes: config.zstd_cache_bytes,
            connections: connections.clone(),
            texts: crate::http::admission_text::TextPool::new(config.client_text.clone())
                .map_err(|e| anyhow::anyhow!("cannot start the client-text threads: {e}"))?,
            cursor_grace: config
                .cluster
                .as_ref()
                .map_or(Duration::ZERO, |c| c.cursor_grace),
        });
        let mut listen_limits = config.listen_limits.clone();
        listen_limits.send_buffer_bytes = Some(config.session.socket_send_buffer);
        connections.set_limits(Side::Subscriber, listen_limits);
        connections.set_limits(Side::Admin, config.admin_listen_limits());
        let server = tokio::spawn(crate::http::listen::serve(
            listener,
            crate::http::router(app.clone()),
            shutdown_rx,
            Side::Subscriber,
            connections.clone(),
        ));
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {} (admin): {e}", config.admin_listen)
            })?;
        let admin_addr = admin_listener.local_addr()?;
        let (ingest, node, upstream, ingest_stats) = match config.cluster.clone() {
            None => {
                let ingest = start_ingest(config.ingest.clone(), state, log.clone())?;
                let (upstream, stats) = (ingest.shared.clone(), ingest.stats.clone());
                (Some(ingest), None, upstream, stats)
            }
            Some(cluster) => {
                // The node ingests only while it leads; stamps come from Redis, not `state`.
                let upstream = Arc::new(UpstreamShared::new(state.upstream_cursor));
                let stats = Arc::new(parking_lot::Mutex::new(IngestStats::default()));
                let node = crate::cluster::Node::start(
                    cluster,
                    crate::cluster::NodeParts {
                        ingest: config.ingest.clone(),
                        log: log.clone(),
                        hub: hub.clone(),
                        upstream: upstream.clone(),
                        ingest_stats: stats.clone(),
                    },
                )
                .await?;
                (None, Some(node), upstream, stats)
            }
        };
        // The Redis sink is one more reader of the log: it never slows ingest. In a cluster
        // the node holding the cluster's `sink` lease runs it; every node holds the same
        // seqs and the sink compares and sets its position in Redis, so even a holder
        // that overstays its lease cannot write an event twice or skip one.
        let sink_lease = match (&config.redis_sink, &config.cluster) {
            (Some(_), Some(cluster)) => Some(
                crate::cluster::NamedLease::start(cluster, "sink")
                    .map_err(|e| anyhow::anyhow!("cannot start the sink lease: {e}"))?,
            ),
            _ => None,
        };
        let sink = match &config.redis_sink {
            Some(sink) => Some(
                crate::sink::start_with_lease(
                    log.reader(),
                    sink.clone(),
                    sink_lease.as_ref().map(|l| l.subscribe()),
                )
                .map_err(|e| anyhow::anyhow!("cannot start the redis sink: {e}"))?,
            ),
            None => None,
        };
        let mut admin = crate::http::admin::AdminState::new(
            log.clone(),
            hub.clone(),
            app.clone(),
            upstream.clone(),
            ingest_stats,
            crate::http::admin::AdminLimits {
                ready_max_lag: config.ready_max_lag,
                log_queue_max_bytes: config.log.queue_max_bytes,
                log_max_bytes: config.log.retention.max_bytes,
                log_max_age: config.log.retention.max_age,
                log_raw: config.log.retention.raw,
            },
            sink.as_ref().map(|s| s.stats.clone()),
        );
        admin.cluster = node.as_ref().map(|n| n.shared.clone());
        let admin = Arc::new(admin);
        let admin_shutdown = shutdown_tx.subscribe();
        let admin_server = tokio::spawn(crate::http::listen::serve(
            admin_listener,
            crate::http::admin::router(admin.clone()),
            admin_shutdown,
            Side::Admin,
            connections,
        ));
        tracing::info!(%addr, %admin_addr, "subscriber and admin endpoints listening");
        Ok(Daemon {
            addr,
            log,
            hub,
            app,
            admin_addr,
            admin,
            ingest,
            node,
            upstream,
            sink,
            sink_lease,
            shutdown: shutdown_tx,
            server,
            admin_server,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    pub fn upstream(&self) -> &Arc<UpstreamShared> {
        &self.upstream
    }

    /// Applies the live-reloadable limits of `config` (SIGHUP) without dropping anyone:
    /// admission, both listeners' limits before the upgrade (for connections accepted
    /// from now on) and the descriptor reserve, the client-memory budget, and the hub's
    /// index and scan budgets with their per-IP shares, the client-text budget and its
    /// per-IP share; and for sessions that start from now on, the client message deadline,
    /// the per-connection update rate and replay rate. Everything else (addresses, the
    /// log, queues, the other per-session settings) needs a restart. Checks first and changes
    /// nothing when a limit cannot be applied.
    pub fn reload(&self, config: &crate::config::ServeConfig) -> anyhow::Result<()> {
        let connections = &self.app.connections;
        if let Some(nofile) = connections.nofile() {
            if nofile < config.fd_reserve + MIN_CLIENT_FDS {
                anyhow::bail!(
                    "fd_reserve {} leaves fewer than {MIN_CLIENT_FDS} of the open-file limit \
                     ({nofile}) for clients",
                    config.fd_reserve
                );
            }
        }
        self.app.admission.reconfigure(config.admission.clone());
        let mut listen_limits = config.listen_limits.clone();
        // The socket buffer is a session setting, fixed at start.
        listen_limits.send_buffer_bytes = connections.limits(Side::Subscriber).send_buffer_bytes;
        connections.set_limits(Side::Subscriber, listen_limits);
        connections.set_limits(Side::Admin, config.admin_listen_limits());
        connections.set_reserve(config.fd_reserve);
        connections
            .memory()
            .set_config(config.client_memory.clone());
        self.hub.set_budgets(config.hub.budgets());
        self.app.texts.set_config(&config.client_text);
        *self.app.session_limits.lock() = crate::http::app::SessionLimits::of(&config.session);
        Ok(())
    }

    /// Stops accepting, stops ingest, makes the log durable, closes every subscriber with
    /// 1012 and a retry hint. Bounded by the configured shutdown timeout.
    pub async fn shutdown(self) -> anyhow::Result<IngestStats> {
        let timeout = self.shutdown_timeout;
        let work = async move {
            let _ = self.shutdown.send(true);
            self.app.texts.stop();
            let stats = match (self.ingest, self.node) {
                (Some(ingest), _) => ingest.shutdown().await?,
                (None, Some(node)) => {
                    // A leader hands the lease over before the log closes.
                    node.shutdown().await;
                    IngestStats::default()
                }
                (None, None) => IngestStats::default(),
            };
            if let Some(sink) = self.sink {
                sink.shutdown(timeout / 4).await;
            }
            // Released only after the sink stopped, so the next holder starts after it.
            if let Some(lease) = self.sink_lease {
                lease.shutdown().await;
            }
            let log = self.log.clone();
            tokio::task::spawn_blocking(move || {
                if !log.flush(Duration::from_secs(10)) {
                    tracing::error!("event log did not become durable in time");
                }
                log.close()
            })
            .await?
            .map_err(|e| anyhow::anyhow!("closing the event log: {e}"))?;
            let _ = self.admin_server.await;
            match self.server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "subscriber server ended with an error"),
                Err(e) => tracing::warn!(error = %e, "subscriber server task failed"),
            }
            // Last: sessions still catching up have had their close; a write under way
            // gets a short grace.
            let hub = self.hub.clone();
            let _ = tokio::task::spawn_blocking(move || hub.stop_catchup()).await;
            Ok::<_, anyhow::Error>(stats)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| anyhow::anyhow!("shutdown took longer than {} s", timeout.as_secs()))?
    }
}

/// The v1 and v2 compression schemes of `config`. A v1 `trained` dictionary is left unset:
/// it is trained on first use (`http::app::ensure_zstd_v1`), so restarts stay cheap.
#[allow(clippy::type_complexity)]
fn load_dictionaries(
    config: &crate::config::ServeConfig,
) -> anyhow::Result<(Arc<std::sync::OnceLock<Arc<Zstd>>>, Arc<Zstd>)> {
    use crate::wire::zstd::DictionarySource;
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read zstd dictionary {}: {e}", path.display()))
    };
    let cache = config.zstd_cache_bytes;
    let v1 = Arc::new(std::sync::OnceLock::new());
    match &config.zstd_dictionary {
        DictionarySource::Jetstream => {
            let _ = v1.set(Arc::new(Zstd::jetstream_v1().with_cache_limit(cache)));
        }
        DictionarySource::File(path) => {
            let _ = v1.set(Arc::new(Zstd::new(read(path)?).with_cache_limit(cache)));
        }
        DictionarySource::Trained => {}
    }
    let v2 = match &config.zstd_dictionary_v2 {
        DictionarySource::File(path) => Zstd::with_id(read(path)?).map_err(|e| {
            anyhow::anyhow!("zstd dictionary {} cannot serve v2: {e}", path.display())
        })?,
        _ => Zstd::jetstream_v2(),
    };
    Ok((v1, Arc::new(v2.with_cache_limit(cache))))
}
