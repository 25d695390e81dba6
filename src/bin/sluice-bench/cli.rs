//! The command line: subcommands and the fan-out arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cluster;
use crate::cold_replay;
use crate::hostile;
use crate::procs::ServeArgs;
use crate::redis_readers;
use crate::relay;
use crate::replayers;
use crate::sink;
use crate::sink_consumers;
use crate::sub_procs;
use crate::target::{BaselineArg, Mix, Wire};

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "Fan-out benchmark: sluice serve vs websocat, Redis pub/sub and a Redis rebroadcaster",
    long_about = "Fan-out benchmark of a real `sluice serve` (child process) fed by an in-process \
paced upstream of synthetic relay frames, with N websocket subscribers; measures relay CPU per \
delivered event, latency from upstream send to subscriber read, RSS at idle and while a fraction \
of subscribers stall, and the same for raw-wire baselines (websocat broadcast, Redis pub/sub \
to plain RESP subscribers, a websocket rebroadcaster in front of Redis pub/sub) on the same frames, rate and subscriber count. Only 127.0.0.1 is used."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run the fan-out benchmark (sluice on the chosen wires, then the baselines).
    Fanout(FanoutArgs),
    /// Internal: the Redis pub/sub rebroadcaster baseline, run as its own process so its
    /// CPU can be measured. Subscribes to a Redis channel and forwards every message to
    /// every websocket client (tokio broadcast channel of shared bytes; a lagging client
    /// skips messages, as pub/sub does).
    RedisRelay(relay::RedisRelayArgs),
    /// Cluster: the leader's fenced append into a real redis-server, per batch size and
    /// zstd level (events/s, bytes per event in Redis).
    ClusterAppend(cluster::AppendArgs),
    /// Cluster: N nodes on one redis-server; leader SIGKILLs and graceful handovers, the
    /// silence each causes at a surviving node's subscriber.
    ClusterFailover(cluster::FailoverArgs),
    /// Cluster: CPU of Redis and of each node per event with 1, 2, 3 nodes on one
    /// redis-server and a number of subscribers per node.
    ClusterScale(cluster::ScaleArgs),
    /// Throughput of the Redis sink into a local redis-server: a log of synthetic events
    /// written out from position 0, timed, with CPU per event of the sink and of Redis.
    RedisSink(sink::RedisSinkArgs),
    /// Redis memory under the sink at a live rate (2,000 events/s by default) for minutes,
    /// sampled every 10 s: with trimming it levels off and stays flat.
    RedisSinkMemory(sink::RedisSinkMemoryArgs),
    /// Redis consumers of the sink (`XREAD BLOCK`) side by side with the pub/sub
    /// rebroadcaster baseline (`SUBSCRIBE`) at a live rate: latency from upstream send to
    /// consumer read and CPU per delivered event; optionally a Redis outage mid-run.
    RedisConsumers(sink_consumers::RedisConsumersArgs),
    /// Internal: the home-made pub/sub rebroadcaster (upstream websocket, decode, one
    /// PUBLISH per event on its collection's channel), run as its own process.
    RedisRebroadcast(sink_consumers::RebroadcastArgs),
    /// Internal: a share of `redis-consumers`' Redis consumers, in a process of their own
    /// (counts on stdout; see redis_readers.rs).
    RedisRead(redis_readers::ReadArgs),
    /// Hostile clients: a bystander subscriber's latency, losses and repeats during each
    /// attack (slowloris, fragment hoarding, /event flood, zero-match scans, connect
    /// churn, 10,000-DID filter updates), alternating with unloaded phases.
    Hostile(hostile::HostileArgs),
    /// Internal: one attack of `hostile`, run as its own (niced) process.
    HostileAttack(hostile::AttackArgs),
    /// Cold replay: an hour of events stored first, then 100 v1 subscribers replaying it
    /// from disk while live subscribers are timed, alternating with windows without replay.
    ColdReplay(cold_replay::ColdReplayArgs),
    /// Internal: a share of `cold-replay`'s replayers, in a process of their own
    /// (progress on stdout; see replayers.rs).
    ColdReplayRead(replayers::ReplayReadArgs),
    /// Internal: a share of `fanout`'s subscribers, in a process of their own
    /// (`--sub-procs`; counts and timing stamps on stdout, see sub_procs.rs).
    FanoutRead(sub_procs::FanoutReadArgs),
}

#[derive(Parser, Clone)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
    /// Websocket subscribers per phase.
    #[arg(long, default_value_t = 100)]
    pub(crate) subscribers: usize,
    /// Upstream frames per second (each synthetic commit frame is one repo op, so this is
    /// also about the v1/v2 event rate).
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Measurement window per phase, seconds (after the warmup).
    #[arg(long, default_value_t = 20)]
    pub(crate) duration: u64,
    /// Seconds of traffic before the measurement window starts.
    #[arg(long, default_value_t = 5)]
    pub(crate) warmup: u64,
    /// sluice wires to measure, comma separated: raw, v1, v2. Each is its own phase.
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    pub(crate) wire: Vec<Wire>,
    /// Subscriber filters on sluice: `realistic` (about 90% take 1-3 of posts/likes/follows,
    /// 10% take everything) or `all` (everyone takes everything). The baselines cannot
    /// filter: their subscribers always get every frame.
    #[arg(long, value_enum, default_value = "realistic")]
    pub(crate) mix: Mix,
    /// Baselines to run after the sluice phases, comma separated: websocat, redis-pubsub
    /// (plain RESP subscribers), redis-relay (a websocket rebroadcaster in front of Redis;
    /// `redis` is its old name), none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "websocat,redis-pubsub,redis-relay"
    )]
    pub(crate) baselines: Vec<BaselineArg>,
    /// Fraction of subscribers that stop reading during the stall phase (sluice only).
    #[arg(long, default_value_t = 0.1)]
    pub(crate) stall_fraction: f64,
    /// Length of the stall phase, seconds (0 skips it). Issue 4 asks for 300.
    #[arg(long, default_value_t = 20)]
    pub(crate) stall_secs: u64,
    /// Repeat every phase this many times; the summary shows medians.
    #[arg(long, default_value_t = 1)]
    pub(crate) runs: usize,
    /// Seed of the synthetic frames and of the filter mix (the same in every phase, so all
    /// targets see the same frames).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// DID pool of the synthetic frames.
    #[arg(long, default_value_t = 2000)]
    pub(crate) dids: usize,
    /// websocat binary.
    #[arg(long, default_value = "websocat")]
    pub(crate) websocat: String,
    /// redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub(crate) redis_server: String,
    /// Concurrent connection attempts while subscribers connect.
    #[arg(long, default_value_t = 64)]
    pub(crate) connect_concurrency: usize,
    /// Loopback addresses the websocket subscribers connect from, in turn (127.0.0.1 to
    /// 127.0.0.N). sluice gives each client IP a share of its catch-up scan budget
    /// (`--scan-events-per-sec-per-ip`): with 1, every subscriber that falls into
    /// catch-up shares one client's share, as they would behind one NAT.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=250))]
    pub(crate) client_ips: u32,
    /// Run the subscribers in this many processes of their own (`fanout-read`, one thread
    /// each) instead of the bench's: the target is then not timed through the bench's
    /// busy runtime, and their CPU is reported apart. 0 keeps them in the bench. No stall
    /// phase with this.
    #[arg(long, default_value_t = 0)]
    pub(crate) sub_procs: usize,
    /// With `--sub-procs`: one message in this many per subscriber is timed.
    #[arg(long, default_value_t = 4)]
    pub(crate) sub_sample: u64,
    /// After the source stops, how long (at most) to wait for subscribers that are behind
    /// to read the rest: what they still lack then is reported as missing (lost, if
    /// nothing moved for 2 s) apart from what was only late.
    #[arg(long, default_value_t = 30)]
    pub(crate) drain_secs: u64,
    /// Write every phase's result as one JSON line to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Where temporary data dirs and child logs go.
    #[arg(long, default_value = "/tmp")]
    pub(crate) tmp: PathBuf,
}
