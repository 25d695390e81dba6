//! The Redis side of the cluster: keys, the function library, and one typed call per
//! function, over a connection that reconnects on its own.
//!
//! Owns: key names, loading `functions.lua`, the durability check, and turning replies
//! and errors into [`ClusterError`]s with stable reasons. Must never: retry a write on its
//! own (the caller decides, holding the lease), or wait on Redis without a deadline.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};

use super::ClusterError;
use crate::event::StampState;

/// The function library, loaded with `FUNCTION LOAD REPLACE` at every start.
pub const FUNCTIONS: &str = include_str!("functions.lua");

/// The keys of one cluster. The `{name}` hash tag keeps them on one shard.
#[derive(Debug, Clone)]
pub struct Keys {
    pub lease: String,
    pub epoch: String,
    pub state: String,
    pub stream: String,
    pub nodes: String,
    pub seed: String,
    /// Prefix of the nodes' fence keys ([`Keys::fence`]).
    pub fence: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        let k = |what: &str| format!("sluice:{{{cluster}}}:{what}");
        Self {
            lease: k("lease"),
            epoch: k("epoch"),
            state: k("state"),
            stream: k("stream"),
            nodes: k("nodes"),
            seed: k("seed"),
            fence: k("fence"),
        }
    }

    /// The key `append_check` raises when it refuses one of `node`'s batches.
    pub fn fence(&self, node: &str) -> String {
        format!("{}:{node}", self.fence)
    }
}

impl Keys {
    /// The key of the named lease `name` (work other than ingest, e.g. the Redis sink).
    pub fn named_lease(&self, name: &str) -> String {
        format!("{}:{name}", self.lease)
    }

    /// The fencing epoch counter of the named lease `name`.
    pub fn named_epoch(&self, name: &str) -> String {
        format!("{}:{name}", self.epoch)
    }
}

/// The answer to an acquire of a named lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedAcquire {
    Granted {
        epoch: u64,
    },
    /// Another node holds it for `pttl_ms` more.
    Held {
        holder: String,
        pttl_ms: i64,
    },
}

/// One connection to Redis, made on first use and again after any failure.
pub struct Link {
    client: Client,
    conn: Option<MultiplexedConnection>,
    /// Deadline of every command (a blocking read adds its block time).
    timeout: Duration,
}

/// Transactions aborted in a row before an append gives up (as unavailable: the caller
/// retries while its lease is valid).
pub const ABORTS_BEFORE_GIVING_UP: usize = 8;

/// One batch as an append sends it: stream entry `<last_seq>-0` carrying `payload`, and
/// the resume state after it.
#[derive(Debug, Clone, Copy)]
pub struct AppendBatch<'a> {
    pub first_seq: u64,
    pub last_seq: u64,
    pub state: StampState,
    /// Trim the stream below this seq in the same transaction (0: do not).
    pub trim_below: u64,
    pub payload: &'a [u8],
}

/// The commands of one append, sent as one pipeline (and several appends may be in
/// flight on one connection, in order): `WATCH` of the state, the stream and this node's
/// fence key; `FCALL sluice_append_check` (every check, made when the batch reaches
/// Redis; a refusal raises the fence key); `MULTI`, `XADD`, `HSET` of the state, the trim,
/// `EXEC`, which Redis refuses if the check refused or anything wrote the state (every
/// grant of the lease does) or the stream in between. The payload goes straight to `XADD`:
/// a Redis Function writing the entry would copy it into a Lua string and back
/// (docs/DECISIONS.md, "Cluster").
pub struct AppendCommands {
    /// Shared, so sending it again (after a lost connection) copies no payload.
    pub pipe: std::sync::Arc<redis::Pipeline>,
    /// Replies the pipeline gets.
    pub replies: usize,
    trims: bool,
}

impl AppendCommands {
    pub fn new(keys: &Keys, node: &str, epoch: u64, batch: &AppendBatch<'_>) -> Self {
        let up = batch.state.upstream_cursor.unwrap_or(i64::MIN);
        let fence = keys.fence(node);
        let mut pipe = redis::pipe();
        pipe.cmd("WATCH")
            .arg(&keys.state)
            .arg(&keys.stream)
            .arg(&fence)
            .cmd("FCALL")
            .arg("sluice_append_check")
            .arg(4)
            .arg(&keys.lease)
            .arg(&keys.state)
            .arg(&keys.stream)
            .arg(&fence)
            .arg(node)
            .arg(epoch)
            .arg(batch.first_seq)
            .arg(batch.last_seq)
            .arg(up)
            .arg(format!("{}-0", batch.first_seq.saturating_sub(1)))
            .cmd("MULTI")
            .cmd("XADD")
            .arg(&keys.stream)
            .arg(format!("{}-0", batch.last_seq))
            .arg("b")
            .arg(batch.payload)
            .arg("e")
            .arg(epoch)
            .cmd("HSET")
            .arg(&keys.state)
            .arg("next_seq")
            .arg(batch.last_seq + 1)
            .arg("last_time_us")
            .arg(batch.state.last_time_us)
            .arg("upstream_cursor")
            .arg(up);
        let trims = batch.trim_below > 0;
        if trims {
            pipe.cmd("XTRIM")
                .arg(&keys.stream)
                .arg("MINID")
                .arg("~")
                .arg(format!("{}-0", batch.trim_below));
        }
        pipe.cmd("EXEC");
        // WATCH, FCALL, MULTI, one QUEUED per command inside, EXEC.
        let replies = 3 + if trims { 3 } else { 2 } + 1;
        Self {
            pipe: std::sync::Arc::new(pipe),
            replies,
            trims,
        }
    }

    /// What Redis did with the batch, from the pipeline's replies.
    pub fn outcome(&self, replies: &[Value]) -> Result<AppendOutcome, ClusterError> {
        let (Some(check), Some(exec)) = (replies.get(1), replies.last()) else {
            return Err(ClusterError::Protocol(format!(
                "an append answered {replies:?}"
            )));
        };
        let before = match check {
            Value::ServerError(e) => return Err(ClusterError::from_server(e.code(), e.details())),
            v => {
                let items = array(v)?;
                match items.first().and_then(int) {
                    Some(2) => return Ok(AppendOutcome::Already),
                    Some(1) => (
                        items.get(1).and_then(int).unwrap_or(0),
                        items.get(2).and_then(int),
                    ),
                    _ => {
                        return Err(ClusterError::Protocol(format!(
                            "the append check answered {v:?}"
                        )))
                    }
                }
            }
        };
        match exec {
            Value::Nil => Ok(AppendOutcome::Aborted),
            Value::Array(results) => {
                if let Some(Value::ServerError(e)) = results.first() {
                    // Only possible when the stream's last id is past what its state says
                    // (changed from outside): the state was written regardless.
                    return Ok(AppendOutcome::StreamRefused {
                        detail: e.details().unwrap_or("").to_string(),
                        last_time_us: before.0,
                        upstream_cursor: before.1,
                    });
                }
                let trimmed = if self.trims {
                    results.get(2).and_then(int).unwrap_or(0).max(0) as u64
                } else {
                    0
                };
                Ok(AppendOutcome::Written { trimmed })
            }
            Value::ServerError(e) => Err(ClusterError::from_server(e.code(), e.details())),
            other => Err(ClusterError::Protocol(format!("EXEC answered {other:?}"))),
        }
    }
}

/// What Redis did with one append whose check passed (a refused check is the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Written {
        /// Entries removed by the trim.
        trimmed: u64,
    },
    /// The batch was already in the stream (a resend after a lost reply): nothing written.
    Already,
    /// Something else wrote the state or the stream between the check and the `EXEC`:
    /// nothing written; check and send again.
    Aborted,
    /// Redis refused the entry inside the transaction (the stream's last id is past its
    /// state: changed from outside); the state was written anyway, and was this before.
    StreamRefused {
        detail: String,
        last_time_us: i64,
        upstream_cursor: Option<i64>,
    },
}

/// A pipeline sent on a connection, its replies awaited.
pub type PendingReplies =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Value>, ClusterError>>>>;

/// The lease was granted: stamping resumes from `state` under `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub epoch: u64,
    pub state: StampState,
    /// The resume state was missing and was seeded from this node's own log.
    pub seeded: bool,
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    Granted(Grant),
    /// Another node holds the lease for `pttl_ms` more.
    Held {
        holder: String,
        pttl_ms: i64,
    },
    /// The resume state is missing and this node may not re-seed it (yet): `why` names
    /// the live node holding more of the log, or says the reports are awaited.
    SeedBlocked {
        why: String,
    },
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub next_seq: u64,
    /// Entries removed by the trim that followed.
    pub trimmed: u64,
    /// The batch was already the stream's last (a retry after a lost reply).
    pub already: bool,
}

/// One stream entry as read.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// The last seq of the batch (the entry id's first part).
    pub last_seq: u64,
    pub payload: Vec<u8>,
}

impl Link {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, ClusterError> {
        let client = Client::open(url).map_err(|e| ClusterError::Config(e.to_string()))?;
        Ok(Self {
            client,
            conn: None,
            timeout,
        })
    }

    async fn conn(&mut self) -> Result<&mut MultiplexedConnection, ClusterError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(self.timeout + Duration::from_secs(5));
            let conn = tokio::time::timeout(
                self.timeout,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .map_err(|_| ClusterError::Unavailable("connect timed out".into()))?
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ClusterError::Unavailable("no connection".into()))
    }

    /// Runs one command under the deadline (plus `extra` for blocking reads). A failure of
    /// the connection drops it, so the next call reconnects.
    pub async fn query(
        &mut self,
        cmd: &redis::Cmd,
        extra: Duration,
    ) -> Result<Value, ClusterError> {
        let deadline = self.timeout + extra;
        let conn = self.conn().await?;
        let outcome = tokio::time::timeout(deadline, cmd.query_async::<Value>(conn)).await;
        self.settle(outcome)
    }

    /// What a command's outcome means to the caller: a server's refusal is passed on as
    /// it is; a timeout or a broken connection drops the connection, so the next call
    /// connects again.
    fn settle<T>(
        &mut self,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, ClusterError> {
        match outcome {
            Err(_) => {
                self.reset();
                Err(ClusterError::Unavailable("command timed out".into()))
            }
            Ok(Err(e)) if e.code().is_some() && !e.is_io_error() => Err(ClusterError::from_server(
                e.code().unwrap_or(""),
                e.detail(),
            )),
            Ok(Err(e)) => {
                self.reset();
                Err(ClusterError::Unavailable(e.to_string()))
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Loads (or replaces) the function library.
    pub async fn load_functions(&mut self) -> Result<(), ClusterError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(FUNCTIONS);
        self.query(&cmd, Duration::ZERO).await.map(|_| ())
    }

    /// `appendonly` and `appendfsync` of the server.
    pub async fn durability(&mut self) -> Result<(String, String), ClusterError> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("append*");
        let v = self.query(&cmd, Duration::ZERO).await?;
        let pairs = flat_pairs(&v);
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        Ok((get("appendonly"), get("appendfsync")))
    }

    pub async fn acquire(
        &mut self,
        keys: &Keys,
        node: &str,
        ttl: Duration,
        min_epoch: u64,
        local: StampState,
    ) -> Result<Acquire, ClusterError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("sluice_acquire")
            .arg(5)
            .arg(&keys.lease)
            .arg(&keys.epoch)
            .arg(&keys.state)
            .arg(&keys.nodes)
            .arg(&keys.seed)
            .arg(node)
            .arg(ttl.as_millis() as u64)
            .arg(min_epoch)
            .arg(now_ms())
            .arg(local.next_seq)
            .arg(local.last_time_us)
            .arg(
                local
                    .upstream_cursor
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
            );
        let v = self.query(&cmd, Duration::ZERO).await?;
        let items = array(&v)?;
        let granted = items.first().and_then(int) == Some(1);
        if granted {
            let epoch = items.get(1).and_then(int).unwrap_or(0);
            let next_seq = items.get(2).and_then(int).unwrap_or(1);
            let last_time_us = items.get(3).and_then(int).unwrap_or(0);
            let cursor = items.get(4).and_then(int);
            return Ok(Acquire::Granted(Grant {
                epoch: u64::try_from(epoch).unwrap_or(0),
                state: StampState {
                    next_seq: u64::try_from(next_seq).unwrap_or(1).max(1),
                    last_time_us,
                    upstream_cursor: cursor,
                },
                seeded: items.get(5).and_then(int) == Some(1),
            }));
        }
        let holder = items.get(1).and_then(text).unwrap_or_default();
        if holder.is_empty() {
            let why = items.get(3).and_then(text).unwrap_or_default();
            return Ok(Acquire::SeedBlocked { why });
        }
        Ok(Acquire::Held {
            holder,
            pttl_ms: items.get(2).and_then(int).unwrap_or(0),
        })
    }

    pub async fn renew(
        &mut self,
        keys: &Keys,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        self.renew_named(&keys.lease, node, epoch, ttl).await
    }

    /// True if the lease was ours and is now free.
    pub async fn release(
        &mut self,
        keys: &Keys,
        node: &str,
        epoch: u64,
    ) -> Result<bool, ClusterError> {
        self.release_named(&keys.lease, node, epoch).await
    }

    /// Takes the named lease at `lease` (epochs from `epoch_key`) unless another node
    /// holds it.
    pub async fn acquire_named(
        &mut self,
        lease: &str,
        epoch_key: &str,
        node: &str,
        ttl: Duration,
        min_epoch: u64,
    ) -> Result<NamedAcquire, ClusterError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("sluice_lease_acquire")
            .arg(2)
            .arg(lease)
            .arg(epoch_key)
            .arg(node)
            .arg(ttl.as_millis() as u64)
            .arg(min_epoch);
        let v = self.query(&cmd, Duration::ZERO).await?;
        let items = array(&v)?;
        if items.first().and_then(int) == Some(1) {
            let epoch = items.get(1).and_then(int).unwrap_or(0);
            return Ok(NamedAcquire::Granted {
                epoch: u64::try_from(epoch).unwrap_or(0),
            });
        }
        Ok(NamedAcquire::Held {
            holder: items.get(1).and_then(text).unwrap_or_default(),
            pttl_ms: items.get(2).and_then(int).unwrap_or(0),
        })
    }

    /// Extends the lease at `lease` if `node` holds it under `epoch`; `Fenced` otherwise.
    pub async fn renew_named(
        &mut self,
        lease: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("sluice_renew")
            .arg(1)
            .arg(lease)
            .arg(node)
            .arg(epoch)
            .arg(ttl.as_millis() as u64);
        self.query(&cmd, Duration::ZERO).await.map(|_| ())
    }

    /// True if the lease at `lease` was ours and is now free.
    pub async fn release_named(
        &mut self,
        lease: &str,
        node: &str,
        epoch: u64,
    ) -> Result<bool, ClusterError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("sluice_release")
            .arg(1)
            .arg(lease)
            .arg(node)
            .arg(epoch);
        let v = self.query(&cmd, Duration::ZERO).await?;
        Ok(int(&v) == Some(1))
    }

    /// Appends one batch as stream entry `<last_seq>-0` with the new resume state, or
    /// writes nothing and says why: [`ClusterError::Fenced`] (this node does not hold the
    /// lease under `epoch`), [`ClusterError::Gap`] (the batch does not continue the stream),
    /// [`ClusterError::Cursor`] (the upstream cursor does not advance). A batch already in
    /// the stream (a retry after a lost reply) is answered as done. One batch, one round
    /// trip ([`AppendCommands`]); the leader's appender keeps several in flight instead.
    #[allow(clippy::too_many_arguments)]
    pub async fn append(
        &mut self,
        keys: &Keys,
        node: &str,
        epoch: u64,
        first_seq: u64,
        last_seq: u64,
        state: StampState,
        trim_below: u64,
        payload: &[u8],
    ) -> Result<Appended, ClusterError> {
        let batch = AppendBatch {
            first_seq,
            last_seq,
            state,
            trim_below,
            payload,
        };
        let commands = AppendCommands::new(keys, node, epoch, &batch);
        // A transaction aborted by a write in between is checked and tried again; this
        // many aborts in a row is reported as unavailable.
        for _ in 0..ABORTS_BEFORE_GIVING_UP {
            let replies = self.pipeline(&commands.pipe, commands.replies).await?;
            let (trimmed, already) = match commands.outcome(&replies)? {
                AppendOutcome::Written { trimmed } => (trimmed, false),
                AppendOutcome::Already => (0, true),
                AppendOutcome::Aborted => continue,
                AppendOutcome::StreamRefused {
                    detail,
                    last_time_us,
                    upstream_cursor,
                } => {
                    self.restore_state(keys, first_seq, last_time_us, upstream_cursor)
                        .await;
                    return Err(ClusterError::Gap(format!(
                        "the stream refused entry {last_seq}: {detail}"
                    )));
                }
            };
            return Ok(Appended {
                next_seq: last_seq + 1,
                trimmed,
                already,
            });
        }
        Err(ClusterError::Unavailable(format!(
            "the append transaction was aborted {ABORTS_BEFORE_GIVING_UP} times in a row"
        )))
    }

    /// Sends a pipeline without waiting: several sent in turn are answered in order. The
    /// replies' future fails as unavailable on a timeout or a broken connection; the
    /// caller then calls [`Link::reset`].
    pub async fn send(
        &mut self,
        pipe: std::sync::Arc<redis::Pipeline>,
        count: usize,
    ) -> Result<PendingReplies, ClusterError> {
        use redis::aio::ConnectionLike;
        let deadline = self.timeout;
        let mut conn = self.conn().await?.clone();
        let mut pending: PendingReplies = Box::pin(async move {
            match tokio::time::timeout(deadline, conn.req_packed_commands(&pipe, 0, count)).await {
                Err(_) => Err(ClusterError::Unavailable("command timed out".into())),
                Ok(Err(e)) if e.code().is_some() && !e.is_io_error() => Err(
                    ClusterError::from_server(e.code().unwrap_or(""), e.detail()),
                ),
                Ok(Err(e)) => Err(ClusterError::Unavailable(e.to_string())),
                Ok(Ok(v)) if v.len() == count => Ok(v),
                Ok(Ok(v)) => Err(ClusterError::Protocol(format!(
                    "{} replies to a pipeline of {count}",
                    v.len()
                ))),
            }
        });
        // Polled once here, so the request is queued on the connection now, in the order
        // of the calls (the connection's queue holds far more than the appends in flight).
        if let std::task::Poll::Ready(done) =
            std::future::poll_fn(|cx| std::task::Poll::Ready(pending.as_mut().poll(cx))).await
        {
            return Ok(Box::pin(std::future::ready(done)));
        }
        Ok(pending)
    }

    /// Drops the connection (after a failure), so the next call connects again.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Puts the resume state back to before a batch starting at `next_seq` after Redis
    /// refused its entry inside the transaction (best effort, logged).
    pub async fn restore_state(
        &mut self,
        keys: &Keys,
        next_seq: u64,
        last_time_us: i64,
        upstream_cursor: Option<i64>,
    ) {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&keys.state)
            .arg("next_seq")
            .arg(next_seq)
            .arg("last_time_us")
            .arg(last_time_us)
            .arg("upstream_cursor")
            .arg(upstream_cursor.map(|c| c.to_string()).unwrap_or_default());
        if let Err(e) = self.query(&cmd, Duration::ZERO).await {
            tracing::error!(error = %e, "could not restore the cluster's resume state after a refused entry");
        }
    }

    /// Sends a pipeline and returns every reply, server errors included as values.
    async fn pipeline(
        &mut self,
        pipe: &redis::Pipeline,
        count: usize,
    ) -> Result<Vec<Value>, ClusterError> {
        use redis::aio::ConnectionLike;
        let deadline = self.timeout;
        let conn = self.conn().await?;
        let outcome =
            tokio::time::timeout(deadline, conn.req_packed_commands(pipe, 0, count)).await;
        let replies = self.settle(outcome)?;
        if replies.len() != count {
            self.reset();
            return Err(ClusterError::Protocol(format!(
                "{} replies to a pipeline of {count}",
                replies.len()
            )));
        }
        Ok(replies)
    }

    /// The resume state as Redis holds it, `None` when it is missing.
    pub async fn state(&mut self, keys: &Keys) -> Result<Option<(StampState, u64)>, ClusterError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&keys.state)
            .arg("next_seq")
            .arg("last_time_us")
            .arg("upstream_cursor")
            .arg("epoch");
        let v = self.query(&cmd, Duration::ZERO).await?;
        let items = array(&v)?;
        let Some(next_seq) = items.first().and_then(int) else {
            return Ok(None);
        };
        Ok(Some((
            StampState {
                next_seq: next_seq.max(1) as u64,
                last_time_us: items.get(1).and_then(int).unwrap_or(0),
                upstream_cursor: items.get(2).and_then(int),
            },
            items.get(3).and_then(int).unwrap_or(0).max(0) as u64,
        )))
    }

    /// Up to `count` entries with ids after `after_seq`, waiting up to `block` for one.
    pub async fn read_after(
        &mut self,
        keys: &Keys,
        after_seq: u64,
        count: usize,
        block: Duration,
    ) -> Result<Vec<RawEntry>, ClusterError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count);
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(&keys.stream)
            .arg(format!("{after_seq}-0"));
        let v = self.query(&cmd, block).await?;
        parse_xread(&v)
    }

    /// The oldest entry's id (its batch's last seq), `None` when the stream is empty.
    pub async fn first_entry(&mut self, keys: &Keys) -> Result<Option<RawEntry>, ClusterError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&keys.stream).arg("-").arg("+").arg("COUNT").arg(1);
        let v = self.query(&cmd, Duration::ZERO).await?;
        Ok(parse_entries(&v)?.into_iter().next())
    }

    /// Publishes this node's position for the others and for trimming.
    pub async fn report(
        &mut self,
        keys: &Keys,
        node: &str,
        report: &str,
    ) -> Result<(), ClusterError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&keys.nodes).arg(node).arg(report);
        self.query(&cmd, Duration::ZERO).await.map(|_| ())
    }

    /// Every node's last report.
    pub async fn reports(&mut self, keys: &Keys) -> Result<Vec<(String, String)>, ClusterError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&keys.nodes);
        let v = self.query(&cmd, Duration::ZERO).await?;
        Ok(flat_pairs(&v))
    }

    /// Removes reports of nodes not heard from for a long time.
    pub async fn forget(&mut self, keys: &Keys, node: &str) -> Result<(), ClusterError> {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&keys.nodes).arg(node);
        self.query(&cmd, Duration::ZERO).await.map(|_| ())
    }

    /// Bytes Redis uses for the stream (`MEMORY USAGE`, sampling every entry).
    pub async fn stream_memory(&mut self, keys: &Keys) -> Result<u64, ClusterError> {
        let mut cmd = redis::cmd("MEMORY");
        cmd.arg("USAGE").arg(&keys.stream).arg("SAMPLES").arg(0);
        let v = self.query(&cmd, Duration::from_secs(5)).await?;
        Ok(int(&v).unwrap_or(0).max(0) as u64)
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn array(v: &Value) -> Result<&[Value], ClusterError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(ClusterError::Protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

fn flat_pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
            .collect(),
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_id(v: &Value) -> Result<u64, ClusterError> {
    let id = text(v).ok_or_else(|| ClusterError::Protocol("entry id is not text".into()))?;
    let (ms, _) = id
        .split_once('-')
        .ok_or_else(|| ClusterError::Protocol(format!("entry id {id:?}")))?;
    ms.parse()
        .map_err(|_| ClusterError::Protocol(format!("entry id {id:?}")))
}

fn parse_entries(v: &Value) -> Result<Vec<RawEntry>, ClusterError> {
    let mut out = Vec::new();
    for entry in array(v)? {
        let parts = array(entry)?;
        let last_seq = parse_id(
            parts
                .first()
                .ok_or_else(|| ClusterError::Protocol("entry without id".into()))?,
        )?;
        let fields = parts.get(1).map(array).transpose()?.unwrap_or_default();
        let payload = fields
            .chunks(2)
            .find_map(|p| match (p.first(), p.get(1)) {
                (Some(Value::BulkString(k)), Some(Value::BulkString(v))) if k == b"b" => {
                    Some(v.clone())
                }
                _ => None,
            })
            .ok_or_else(|| ClusterError::Protocol(format!("entry {last_seq} has no payload")))?;
        out.push(RawEntry { last_seq, payload });
    }
    Ok(out)
}

fn parse_xread(v: &Value) -> Result<Vec<RawEntry>, ClusterError> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => match streams.first() {
            None => Ok(Vec::new()),
            Some(stream) => {
                let parts = array(stream)?;
                match parts.get(1) {
                    Some(entries) => parse_entries(entries),
                    None => Ok(Vec::new()),
                }
            }
        },
        Value::Map(streams) => match streams.first() {
            None => Ok(Vec::new()),
            Some((_, entries)) => parse_entries(entries),
        },
        other => Err(ClusterError::Protocol(format!(
            "unexpected XREAD reply {other:?}"
        ))),
    }
}
