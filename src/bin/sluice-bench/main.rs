//! `sluice-bench`: fan-out benchmark of a real `sluice serve` against two raw-wire
//! baselines (a websocat broadcast relay and a home-made Redis pub/sub rebroadcaster).
//!
//! Everything runs on 127.0.0.1. The bench process is the upstream relay (an in-process
//! `subscribeRepos` server fed by the `sluice::upstream::synth` generator, paced to an exact
//! frame rate) and all the subscribers; the system under test runs as child processes, so
//! its CPU and memory are read from `/proc/<pid>` alone.
//!
//! Latency is measured without touching the frames: the publisher records the instant it
//! hands each frame to the socket, keyed by the frame's upstream `seq` and by its commit
//! `(repo DID, rev)`. A raw-wire subscriber reads the `seq` back out of the CBOR frame it
//! receives; a Jetstream v1/v2 subscriber reads `did` and `rev` out of the JSON event (all
//! events of one commit share its send instant; identity/account events carry no rev
//! and are counted but not timed). Latency = receive instant − send instant, both from the
//! bench's one monotonic clock. Frames are generated fresh (never looped), so every key is
//! unique within a run.
//!
//! Every load loop is bounded: the publisher by the phase's duration, connection attempts by
//! count and timeout, and the whole run by a watchdog that kills the children and exits.

mod cli;
mod cluster;
mod cold_replay;
mod control;
mod fanout;
mod frame_meta;
mod hist;
mod hostile;
mod phase;
mod procs;
mod publisher;
mod redis_readers;
mod relay;
mod replayers;
mod report;
mod resp;
mod sink;
mod sink_consumers;
mod stamps;
mod sub_procs;
mod subscribers;
mod target;

use clap::Parser;

use crate::cli::{Cli, Cmd};
use crate::fanout::fanout;
use crate::hist::epoch;
use crate::relay::redis_relay;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = epoch();
    let cmd = match cli.cmd {
        // A consumer child runs on one thread of its own.
        Cmd::RedisRead(args) => return redis_readers::read_main(args),
        Cmd::ColdReplayRead(args) => return replayers::read_main(args),
        Cmd::FanoutRead(args) => return sub_procs::read_main(args),
        cmd => cmd,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cmd {
        Cmd::Fanout(args) => rt.block_on(fanout(args)),
        Cmd::RedisRelay(args) => rt.block_on(redis_relay(args)),
        Cmd::ClusterAppend(args) => rt.block_on(cluster::append(args)),
        Cmd::ClusterFailover(args) => rt.block_on(cluster::failover(args)),
        Cmd::ClusterScale(args) => rt.block_on(cluster::scale(args)),
        Cmd::RedisSink(args) => rt.block_on(sink::redis_sink(args)),
        Cmd::RedisSinkMemory(args) => rt.block_on(sink::redis_sink_memory(args)),
        Cmd::RedisConsumers(args) => rt.block_on(sink_consumers::redis_consumers(args)),
        Cmd::RedisRebroadcast(args) => rt.block_on(sink_consumers::rebroadcast(args)),
        Cmd::RedisRead(_) | Cmd::ColdReplayRead(_) | Cmd::FanoutRead(_) => Ok(()),
        Cmd::Hostile(args) => rt.block_on(hostile::hostile(args)),
        Cmd::HostileAttack(args) => rt.block_on(hostile::attack(args)),
        Cmd::ColdReplay(args) => rt.block_on(cold_replay::cold_replay(args)),
    }
}
